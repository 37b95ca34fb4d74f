"""Shape bias on the cue-conflict stimuli (Geirhos et al., ICLR 2019): over images whose shape and texture
categories differ, shape hits / (shape hits + texture hits); humans (model-vs-human, Geirhos et al., NeurIPS
2021) as reference. Stimuli and human data: CC BY 4.0."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app import erf_maps, models, safety
from app.commands import override_args
from app.runs import UNTRAINED_NOTE, own_file
from app.shape_bias_runs import SHAPE_BIAS_MODELS, is_complete, shape_bias_run, shape_bias_run_dir
from app.ui import checkpoint_upload, cli_hint, file_downloads, guard, model_options_input
from erf_lab.checkpoint import selection_text
from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.analysis import read_decisions_csv
from erf_lab.shape_bias.consistency import consistency_rows
from erf_lab.shape_bias.plotting import load_run

st.title("Shape bias")
st.caption("Cue-conflict stimuli and human data: Geirhos et al., ICLR 2019 "
           "([texture-vs-shape](https://github.com/rgeirhos/texture-vs-shape)) and NeurIPS 2021 "
           "([model-vs-human](https://github.com/bethgelab/model-vs-human)), licensed "
           "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/).")

mode = st.radio("Source", ["Run a model", "Load results"], horizontal=True, key="sb-mode")
run_dir = None
if mode == "Run a model":
    c1, c2, c3 = st.columns(3)
    with guard("Model list"):
        registered = models.registered_models()
        options = [m for m in SHAPE_BIAS_MODELS if m in registered]
        options += [m for m in registered if m not in options] + models.timm_models()
    model = c1.selectbox("Model", options or list(SHAPE_BIAS_MODELS), key="sb-model", accept_new_options=True,
                         help="a registered model or timm/<name> (any timm architecture; its own preprocessing)")
    known = False
    with guard("Model"):
        models.check_registered(model)
        known = True
    # packaged weights exist for efficientnet_lite0 only: for another model the toggle is off (its own key: the
    # state of lite0's toggle stayed on, disabled, and put --pretrained into the command hint) and means nothing
    has_weights = model == "efficientnet_lite0"
    pretrained = c2.toggle("Pretrained ImageNet weights", value=has_weights, key="sb-pre" if has_weights else
                           "sb-pre-none", disabled=not has_weights,
                           help="packaged weights exist for efficientnet_lite0; others: upload a checkpoint")
    pretrained = has_weights and pretrained
    limit = c3.number_input("Cue-conflict images (--limit)", 16, 1280, 16, step=16, key="sb-limit",
                            help="an even spread over the 16 categories; the full set has 1280")
    weights_name, options, marked = "", {}, None
    if known:
        with guard("Shape-bias evaluation"):
            weights, weights_name = checkpoint_upload("sb-ckpt")
            if shipped := erf_maps.shipped_upload(weights):  # built or not, it cannot classify these stimuli
                spec = erf_maps.shipped_spec(shipped)
                raise ErfLabError(
                    f"{weights_name} is the shipped {erf_maps.SHIPPED_PREFIX}{shipped}, a classifier of cue-world's "
                    f"{models.parse_overrides(spec['overrides']).get('num_classes', 10)} classes: the cue-conflict "
                    "stimuli need an ImageNet (1000-way) or 16-way classifier. Its shape bias on cue-world's own "
                    f"cue-conflict images: erf-lab shape-bias --stimuli cue-world --model {spec['model']} --weights "
                    f"{erf_maps.SHIPPED_PREFIX}{shipped}")
            options = model_options_input("sb-opts")  # an upload's architecture (an erf-lab train run's options)
            marked = models.upload_random_init(weights, weights_name)  # the CLI measures it with --allow-random only
            # random init of a RepLKNet: the tiny width / depth of the other pages, under any option typed
            tiny = models.parse_overrides(models.tiny_overrides()) if model.startswith("replknet") and weights is None \
                else {}
            settings = dict(pretrained=pretrained, limit=int(limit), overrides_json=models.overrides_key(
                {**tiny, **options}), weights=weights)
            target = shape_bias_run_dir(model, **settings)
            # the default (16 images, a listed model, no upload or options) and finished runs show at once; the rest
            # on a click
            quick = int(limit) <= 16 and weights is None and not options and model in SHAPE_BIAS_MODELS
            if not (quick or is_complete(target)):
                if st.button("Run shape-bias evaluation", type="primary", key="sb-run", icon=":material/play_arrow:"):
                    st.session_state["sb-confirmed"] = str(target)
                if st.session_state.get("sb-confirmed") != str(target):
                    st.info(f"{model} on {limit} cue-conflict images (+ edges / silhouettes) takes longer than the "
                            "interactive default; press **Run shape-bias evaluation**.")
                    target = None
            if target is not None:
                bar = st.progress(0.0, text=f"classifying {limit} cue-conflict images (+ edges / silhouettes)")
                try:
                    run_dir = shape_bias_run(model, weights_name=weights_name, **settings, on_progress=lambda name,
                                             done, total: bar.progress(done / max(total, 1),
                                                                       text=f"{name}: {done} of {total} images"))
                finally:
                    bar.empty()
            # a random-init run is marked below from its summary (random_weights: UNTRAINED_NOTE), once
    args = (["shape-bias", "--model", model, *override_args(options)]
            + (["--pretrained"] if pretrained else ["--weights", weights_name or "CHECKPOINT.pth"])
            + (["--allow-random"] if marked else []))
    cli_hint(args + ["--out", "runs/shape-bias"], "Full stimulus set (1280 images) from the command line:")
else:
    text = st.text_input("Shape-bias results folder (holds summary.json)", key="sb-dir")
    if text:
        with guard("Results folder"):
            run_dir = safety.safe_directory(text, "results folder")

s = None
if run_dir is not None:
    with guard("Shape-bias results"):
        s = load_run(run_dir)

#: a run of `erf-lab shape-bias --stimuli cue-world`: cue-world's own images and classes, which no human judged
cue_world = s is not None and s.get("stimuli") == "cue-world"
if s is not None:  # the sections below read the run's summary: none of them without it
    with guard("Shape-bias results"):
        human = (s.get("human_reference") or {})
        if cue_world:
            st.info("A cue-world probe (erf-lab shape-bias --stimuli cue-world): the built-in world's own "
                    "cue-conflict, shape-only and texture-only images of its classes, not the Geirhos stimuli; no "
                    "human judged them, so there is no human reference, consistency or stimulus browser.",
                    icon=":material/info:")
        if s.get("random_weights"):
            st.warning(UNTRAINED_NOTE)
        for w in s.get("warnings") or []:
            st.warning(w)
        if loaded := selection_text(s.get("weights_selection")):  # e.g. the raw weights, not the EMA beside them
            st.caption(f"Weights loaded: {loaded}")
        m1, m2, m3, m4 = st.columns(4)
        ci = s.get("shape_bias_ci95")
        m1.metric("Shape bias", "n/a" if s.get("shape_bias") is None else f"{s['shape_bias']:.3f}",
                  help=None if not ci else f"95% Wilson interval {ci[0]:.3f}-{ci[1]:.3f}")
        if cue_world:  # its shape-only and texture-only splits say whether the model learned each cue at all
            chance = f"chance: 1/{(s.get('probe') or {}).get('num_classes', '?')}"
            for col, split in ((m2, "shape_only"), (m3, "texture_only")):
                acc = s.get(f"{split}_accuracy")
                col.metric(f"{split.replace('_', '-').capitalize()} accuracy", "n/a" if acc is None else f"{acc:.1%}",
                           help=chance)
        else:
            m2.metric("Humans", "n/a" if human.get("shape_bias") is None else f"{human['shape_bias']:.3f}",
                      help=f"{human.get('n_subjects', '?')} subjects (model-vs-human)")
            m3.metric("Shape or texture hits", "n/a" if s.get("fraction_shape_or_texture_hits") is None
                      else f"{s['fraction_shape_or_texture_hits']:.1%}",
                      help=f"chance: {s.get('chance_shape_or_texture', 0.125):.1%}")
        m4.metric("Conflict images", s.get("n_conflict", 0))
        fig = Path(run_dir) / "shape_bias.png"
        if own_file(fig):
            st.image(str(fig), caption="shape bias on cue-world's cue-conflict images" if cue_world else
                     "model vs humans (dashed: mean shape bias)", width=560)
            files = [fig, fig.with_suffix(".pdf"), Path(run_dir) / "decisions.csv"]
            file_downloads([p for p in files if own_file(p)], key="sb-dl")
        rows = []
        for cat, v in sorted(s.get("per_category", {}).items()):
            h = (human.get("per_category") or {}).get(cat) or {}
            rows.append({"category": cat, "images": v.get("n"), "shape hits": v.get("shape_hits"),
                         "texture hits": v.get("texture_hits"), "shape bias": v.get("shape_bias"),
                         "humans": h.get("shape_bias")})
        if cue_world:  # per class (cue-world's shape/texture pairs), by the shape the image shows
            names = s.get("classes") if isinstance(s.get("classes"), list) else []
            per_class = s.get("per_class") if isinstance(s.get("per_class"), dict) else {}
            for i, v in sorted(per_class.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
                v = v if isinstance(v, dict) else {}  # an edited file: its row empty, not a failed page
                rows.append({"class": names[int(i)] if str(i).isdigit() and int(i) < len(names) else str(i),
                             "images": v.get("n"), "shape hits": v.get("shape_hits"),
                             "texture hits": v.get("texture_hits")})
        st.subheader("Per class" if cue_world else "Per category")
        st.dataframe(pd.DataFrame(rows), hide_index=True)

if s is not None and not cue_world:
    with guard("Consistency with humans"):
        st.subheader("Consistency with the 10 human subjects")
        report = s.get("consistency")
        if not report:
            st.info("This run has no model-vs-human consistency results (older run, or no human data found).")
        else:
            st.caption("16-class accuracy (correct = the shape category, all trials), and trial by trial against each "
                       "subject: observed consistency (both right or both wrong), expected consistency from the two "
                       "accuracies, error consistency = Cohen's kappa (Geirhos, Meding & Wichmann, NeurIPS 2020), "
                       "accuracy difference = squared difference of the two accuracies (lower is more human-like); "
                       "mean over subjects, human-human = mean over the 45 pairs of subjects (model-vs-human).")
            st.dataframe(pd.DataFrame(consistency_rows(report)), hide_index=True)
            fig = Path(run_dir) / "error_consistency.png"
            if own_file(fig):
                st.image(str(fig), caption="error consistency with each subject (grey: human-human range)",
                         width=560)
                file_downloads([p for p in (fig, fig.with_suffix(".pdf")) if own_file(p)], key="sb-ec-dl")

    with guard("Stimulus browser"):
        st.subheader("Stimuli and decisions")
        if not own_file(Path(run_dir) / "decisions.csv"):  # a symlink (to any server file) is not read either
            raise ErfLabError("this run has no decisions.csv (written by erf-lab shape-bias with each run)"
                              + (": it is a symlink, not the folder's own file"
                                 if (Path(run_dir) / "decisions.csv").is_symlink() else ""))
        decisions = [r for r in read_decisions_csv(Path(run_dir) / "decisions.csv") if r.get("set") == "cue-conflict"]
        # summary.json names the stimulus folder; it is still held to the app's path policy.
        if not s.get("stimuli_dir"):
            raise ErfLabError("this run does not record its stimulus folder (stimuli_dir in summary.json)")
        stim_dir = safety.safe_directory(s["stimuli_dir"], "stimulus folder")
        cats = sorted({r["shape"] for r in decisions})
        f1, f2 = st.columns(2)
        cat = f1.selectbox("Shape category", ["all"] + cats, key="sb-cat")
        outcome = f2.selectbox("Decision", ["all", "shape", "texture", "other"], key="sb-outcome")

        def kind(r):
            return "shape" if r["decision"] == r["shape"] else ("texture" if r["decision"] == r["texture"] else "other")

        shown = [r for r in decisions if (cat == "all" or r["shape"] == cat) and (outcome == "all" or kind(r) == outcome)]
        st.caption(f"{len(shown)} of {len(decisions)} images")
        cols = st.columns(6)
        for i, r in enumerate(shown[:24]):
            p = (stim_dir / r["shape"] / r["image"]).resolve()
            if not p.is_file():
                p = (stim_dir / r["image"]).resolve()
            if p.is_file() and stim_dir in p.parents and p.suffix.lower() in safety.IMAGE_SUFFIXES:
                cols[i % 6].image(str(p), caption=f"{r['shape']}/{r['texture']} → {r['decision']} ({kind(r)})",
                                  width="stretch")
