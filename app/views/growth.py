"""Growth: how the ERF grows with kernel size (RepLKNet Table 5 family) and with depth, train-time vs
re-parameterized (identical function, Ding et al., CVPR 2022, Sec. 3); by default the shipped family trained on
cue-world (data/trained/cue-world), random init and loaded weights one click away."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from erf_lab.erf.metrics import TRF_EXCEEDS_MAP_NOTE, theoretical_rf_exceeds_map
from erf_lab.erf.rundir import RANDOM_MARK
from erf_lab.erf.sweep import find_family_weights
from erf_lab.erf.tables import weights_note
from erf_lab.errors import ErfLabError

from app import erf_maps, models, safety
from app.commands import override_args
from app.figures import show_figure
from app.ui import cli_hint, file_downloads, guard, model_options_input, parse_int_tuple

st.title("ERF growth")
st.caption("Kernel-size family of RepLKNet (Ding et al., CVPR 2022, Table 5): kernels K-K-K-min(K,13) "
           "(31-29-27-13 for K = 31, RepLKNet-31B), "
           "measured on a narrow, shallow body so the default answers in seconds. Train-time and "
           "re-parameterized (deploy) forms compute the same function, so their ERFs must coincide.")

tab_k, tab_d, tab_s = st.tabs(["vs kernel size", "vs depth", "vs input size"])


def show_metrics(rows: list[dict], columns: list[str] | None = None, drop: tuple[str, ...] = ()) -> None:
    """Metric rows as a table (a threshold not reached inside the image: n/r, explained under it)."""
    table = erf_maps.metrics_table(rows).drop(columns=list(drop), errors="ignore")
    table = table[columns] if columns else table
    st.dataframe(table, hide_index=True)
    if (table == "n/r").any().any():
        st.caption(erf_maps.NOT_REACHED_NOTE)


INITS = {"trained": "trained (shipped cue-world family)", "random": "random", "weights": "weights (a folder)"}

with tab_k:
    c1, c2, c3, c4 = st.columns(4)
    kernels_text = c1.text_input("Kernel sizes", "3,7,13,31", key="g-kernels", help="odd sizes from 3 to 31")
    reparam = c2.selectbox("Form", ["both", "train", "deploy"], key="g-reparam",
                           help="train: with the small-kernel branch; deploy: merged into one large kernel")
    size = c3.select_slider("Input size (px)", [64, 96, 128, 224], value=erf_maps.DEFAULT_INPUT, key="g-size",
                            help="the shipped models were trained at 64 px; at 128 px the larger kernels can show")
    c5, c6 = st.columns([2, 3])
    init = c5.radio("Weights", list(INITS), format_func=INITS.get, key="g-init", horizontal=True,
                    help="trained: data/trained/cue-world (K = 3, 7, 13, 31, seed 0; trained at 64 px on "
                         "cue-world); random: seeded init (seed 0); weights: one checkpoint per K in a folder")
    trained = init == "trained"
    n_img = c4.number_input("Images (cue-world val)" if trained else "Images (built-in set)", 1, 20,
                            erf_maps.DEFAULT_CUE_WORLD_IMAGES if trained else 1, key=f"g-nimg-{trained}")
    if trained:
        beside = c6.toggle("Random init beside (same architectures and images)", value=False, key="g-beside")
        st.caption("The shipped family: RepLKNet K = 3, 7, 13, 31 at 16-128 channels, one block per stage, trained "
                   "10 epochs at 64 px on cue-world (data/trained/cue-world/README.md), measured on cue-world "
                   "validation images.")
    else:
        tiny = c6.toggle("Tiny width/depth (16-128 channels, 1-1-2-1 blocks)", value=True, key="g-tiny")
    weights_dir = None
    options: dict = {}
    ok = False  # until every setting is read: a refused folder must not sweep without its checkpoints
    ks, bad = [], []
    with guard("Settings"):
        if not trained:  # the kernels are the swept ones; width, depth, classes of the checkpoints' training
            options = model_options_input("g-opts")
        ks = list(parse_int_tuple(kernels_text, what="kernel sizes"))
        bad = [k for k in ks if k < 3 or k % 2 == 0 or k > 31]
        if bad:
            raise ErfLabError(f"kernel sizes must be odd integers in 3..31, got {kernels_text!r}")
        if len(set(ks)) != len(ks):  # as `erf-lab sweep --kernels` (each size would be measured and listed twice)
            bad = ks
            raise ErfLabError(f"kernel sizes: each once, got {kernels_text!r}")
        if init == "weights":
            text = st.text_input("Checkpoint folder (replknet_<K>.pth / K<K>.pth ...)", key="g-wdir")
            weights_dir = str(safety.safe_directory(text, "checkpoint folder")) if text else None
            if weights_dir is None:
                st.info("Enter the folder holding one checkpoint per kernel size.")
            else:  # one line for every kernel size without its checkpoint, not one per K
                find_family_weights(weights_dir, ks)
        ok = init != "weights" or weights_dir is not None
    if ok and ks and not bad:
        rows, maps, diffs = [], {}, []
        bar = st.progress(0.0, text="sweeping kernel sizes")
        infos = {}  # K -> the run.json of its measurement (which part of its checkpoint file loaded)
        for i, k in enumerate(ks):
            with guard(f"K = {k}"):
                if trained:
                    runs = [erf_maps.shipped_member(k, reparam=reparam, input_size=int(size), num_images=int(n_img),
                                                    random_init=r) for r in ((False, True) if beside else (False,))]
                else:
                    runs = [erf_maps.sweep_member(k, reparam=reparam, init=init, weights_dir=weights_dir,
                                                  input_size=int(size), num_images=int(n_img),
                                                  overrides_json=models.overrides_key({**models.parse_overrides(
                                                      models.tiny_overrides() if tiny else "{}"), **options}))]
                for r in runs:
                    rows += r["rows"]
                    infos.update({f"K = {k}": info for info in (r.get("run_info") or {}).values()})  # one per file
                    diffs += r["reparam_diff"]
                    series = r["rows"][0].get("init", init)
                    for mode, erf in r["maps"].items():
                        maps[(k, f"{series} {mode}")] = erf
            bar.progress((i + 1) / len(ks), text=f"K = {k} done ({i + 1}/{len(ks)})")
        bar.empty()
        done = [k for k in ks if any(key[0] == k for key in maps)]
        series = list(dict.fromkeys(key[1] for key in maps))
        if done:
            for row in rows:
                row["series"] = f"{row.get('init', init)} {row['reparam']}"
            with guard("Growth curves"):
                show_figure("erf_growth", (rows,), stem="growth", key="g-growth",
                            kwargs={"x": "kernel", "group": "series"})
            with guard("Heatmap grid"):
                show_figure("erf_grid", ([[maps.get((k, m)) for k in done] for m in series], series,
                                         [f"K = {k}" for k in done]), stem="grid", key="g-grid")
            show_metrics(rows, drop=("run_dir", "series"))
            if loaded := weights_note(list(infos.items())):  # e.g. a file's raw weights, not the EMA beside them
                st.caption(loaded)
            if beyond := list(dict.fromkeys(r["kernel"] for r in rows if r.get("erf/trf") is not None and
                                            theoretical_rf_exceeds_map(r.get("trf"), (int(size), int(size))))):
                st.caption(f"erf/trf: the theoretical RF exceeds the {size} px image for K = "
                           f"{', '.join(map(str, beyond))}; there {TRF_EXCEEDS_MAP_NOTE}.")
            if any("random" in (r.get("weights"), r.get("init")) for r in rows):
                st.warning(f"{erf_maps.RANDOM_INIT_NOTE} (the rows and curves marked random).",
                           icon=":material/warning:")
            if diffs:
                worst = max(d["max_rel_diff"] for d in diffs)
                st.metric("train vs deploy ERF: largest relative difference", f"{worst:.2e}",
                          help="max |ERF_train - ERF_deploy| / max ERF_train over all kernel sizes")
                st.dataframe(pd.DataFrame(diffs), hide_index=True)
        args = ["sweep", "--kernels", "3,7,13,25,31", "--reparam", "both", "--input-size", "1024",
                "--num-images", "50", "--images", "IMAGENET_VAL_DIR"]
        if init == "weights":
            args += ["--init", "weights", "--weights-dir", "CHECKPOINT_DIR", *override_args(options)]
        if trained:
            cli_hint(["compute", "--model", "replknet_31b", "--weights", "builtin:cue-world/K31-seed0",
                      "--input-size", str(size), "--out", "runs/erf-K31-trained"],
                     "One shipped model from the command line (on the built-in photos):")
        cli_hint(args + ["--out", "runs/sweep"], "Full-size sweep (paper protocol) from the command line:")

with tab_d:
    st.caption("ERF at the output of each stage of one network (deeper layers see further): the tiny width / depth "
               "at random init (seed 0), untrained.")
    d1, d2, d3 = st.columns(3)
    model = d1.selectbox("Model", ["replknet_31b", "replknet_13", "replknet_7", "replknet_3"], key="d-model")
    d_size = d2.select_slider("Input size (px)", [64, 96, 128], value=64, key="d-size")
    d_rep = d3.toggle("Re-parameterized", value=True, key="d-rep")
    run_depth = st.button("Compute ERF vs depth", key="d-run", icon=":material/play_arrow:")
    if run_depth or st.session_state.get("d-done"):
        st.session_state["d-done"] = True
        with guard("ERF vs depth"):
            ov = models.tiny_overrides()
            table = models.layer_table(model, ov, int(d_size))
            stage_rows = [r for r in table if r["name"].count(".") == 1 and r["name"].startswith("stages.")]
            results, rows = [], []
            bar = st.progress(0.0, text="stages")
            for i, r in enumerate(stage_rows):
                spec = {"model": model, "overrides": ov, "reparameterize": d_rep, "layer": r["name"],
                        "trf": r.get("theoretical_rf"), "input_size": int(d_size), "aggregate": "relu"}
                res = erf_maps.erf_for(spec, ("builtin", tuple(erf_maps.builtin_image_names()[:1])))
                results.append(res)
                rows.append({"depth": i + 1, "reparam": "deploy" if d_rep else "train", **res["summary"]})
                bar.progress((i + 1) / len(stage_rows), text=f"stage {i + 1}/{len(stage_rows)}")
            bar.empty()
            show_figure("erf_comparison", ([r["erf"] for r in results],
                                           [f"stage {i + 1} {RANDOM_MARK}" for i in range(len(results))]),
                        stem="erf-vs-depth", key="d-fig")
            show_figure("erf_growth", (rows,), stem="growth-vs-depth", key="d-growth",
                        kwargs={"x": "depth", "group": "reparam"})
            show_metrics(rows)

with tab_s:
    st.caption("ERF of one network (the tiny width / depth at random init, seed 0, untrained) at several input "
               "sizes. The paper's area ratios are fractions of the image: "
               "they shrink as the image grows even when the ERF in pixels does not, so compare the size-free "
               "metrics (effective radius r_rms, radius holding 50 % / 99 % of the mass, Gaussian sigma, pixels) "
               "across sizes. A network measured far from its training resolution may also behave differently "
               "(the paper measures 224-trained models at 1024).")
    s1, s2, s3 = st.columns(3)
    s_model = s1.selectbox("Model", ["replknet_31b", "replknet_13", "replknet_7", "replknet_3"], key="s-model")
    s_sizes = s2.multiselect("Input sizes (px)", [64, 96, 128, 192, 256, 384], default=[64, 128, 256], key="s-sizes")
    s_n = s3.number_input("Images (built-in set)", 1, 8, 1, key="s-nimg")
    if st.button("Compute ERF vs input size", key="s-run", icon=":material/play_arrow:") or st.session_state.get("s-done"):
        st.session_state["s-done"] = True
        with guard("ERF vs input size"):
            if len(s_sizes) < 2:
                raise ErfLabError("choose at least two input sizes")
            s_bar = st.progress(0.0, text="measuring the ERF at each input size")
            try:
                sweep = erf_maps.size_sweep(tuple(s_sizes), model=s_model, overrides_json=models.tiny_overrides(),
                                            num_images=int(s_n), on_progress=lambda done, total: s_bar.progress(
                                                done / max(total, 1), text=f"input size {done} of {total} measured"))
            finally:
                s_bar.empty()
            from pathlib import Path

            out = Path(sweep["out_dir"])
            st.image(str(out / "growth.png"), caption="area ratios (fractions of the image) and size-free metrics "
                                                      "(pixels) against input size")
            st.image(str(out / "grid.png"), caption="ERF heatmaps, each at its own size")
            cols = ["input_size", "area@20%", "area@50%", "area@99%", "r_rms", "r50", "r99", "gauss_sigma_y",
                    "gauss_sigma_x", "gauss_fit"]  # both sigmas, as sweep.csv / sweep.md: an anisotropic ERF's differ
            show_metrics(sweep["rows"], cols)
            if bad := [r["input_size"] for r in sweep["rows"] if r.get("gauss_fit") == "n/m"]:
                st.warning(f"Gaussian fit not meaningful (gauss_fit n/m) at {', '.join(f'{s} px' for s in bad)}: a "
                           "parameter at its bound, a sigma wider than the map or R^2 < 0.5, so its sigma is not an "
                           "ERF size (left out of the growth figure).", icon=":material/warning:")
            file_downloads([out / n for n in ("growth.png", "growth.pdf", "grid.png", "grid.pdf", "sweep.csv",
                                              "sweep.json")], key="s-files")
        cli_hint(["sweep", "--input-sizes", "224,384,640,1024", "--model", s_model, "--reparam", "deploy",
                  "--num-images", "50", "--images", "IMAGENET_VAL_DIR", "--out", "runs/size-sweep"],
                 "Full-size input-size sweep from the command line:")
