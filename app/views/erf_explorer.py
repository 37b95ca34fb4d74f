"""ERF explorer (landing page): effective receptive fields of up to four configurations on one colour scale.

ERF = gradient of the centre output pixel w.r.t. the input, aggregated over images (Luo et al., NeurIPS 2016;
RepLKNet, Ding et al., CVPR 2022, Sec. 5.2). Renders without any click the shipped trained K = 3 and K = 31
models (data/trained/cue-world) side by side on cue-world validation images; random init is one click away.
"""
from __future__ import annotations

import streamlit as st

from app import erf_maps, models, safety
from app.cache import sha
from app.commands import erf_cli_args, options_text
from app.figures import show_figure
from app.ui import checkpoint_upload, cli_hint, guard, model_options_input, parse_int_tuple
from erf_lab.checkpoint import selection_text
from erf_lab.erf.metrics import GLOBAL_RF_REASON, TRF_EXCEEDS_MAP_NOTE, kernels_alone
from erf_lab.erf.tables import rf_text

st.title("ERF explorer")
st.caption("Effective receptive field: ReLU(d output-centre / d input) aggregated over images (Luo et al., 2016), "
           "shown as log10(A+1)/max like RepLKNet (Ding et al., CVPR 2022, Fig. 1). "
           "The default compares RepLKNets with 3x3 and 31x31 kernels trained on cue-world (erf-lab's built-in "
           "shape/texture world, data/trained/cue-world), measured at 128 px (twice their training size) on "
           "cue-world validation images; switch a configuration to random init to see the untrained network.")

AGGREGATES = ["relu", "abs"]
MAX_CONFIGS = 4
#: kernel size of each configuration's default: the shipped trained model, or the same K at random init
DEFAULT_KERNELS = (3, 31, 7, 13)
INITS = {"trained": "trained (shipped)", "random": "random init / upload"}


def _pct(v):
    return "n/r" if v is None else f"{v:.1f}%"  # None: the centred square does not reach t inside the image


def _config_widgets(i: int, choices: list[str], input_size: int) -> tuple[dict, bytes | None]:
    """Widgets of one configuration column; returns the spec (plain JSON-able dict) and the uploaded checkpoint's
    bytes (None: random init or shipped weights). The uploader comes first: a bad setting below it (shown as an
    error) leaves the upload in place."""
    k = DEFAULT_KERNELS[i % len(DEFAULT_KERNELS)]
    if st.radio("Weights", list(INITS), format_func=INITS.get, key=f"erf-init-{i}", horizontal=True) == "trained":
        names = erf_maps.shipped_names()
        name = st.selectbox("Shipped model (data/trained/cue-world)", names,
                            index=names.index(erf_maps.SHIPPED_FAMILY[k]), key=f"erf-shipped-{i}")
        reparam = st.toggle("Re-parameterized (deploy form)", value=True, key=f"erf-rep-{i}")
        return erf_maps.shipped_spec(name, reparameterize=reparam), None
    weights, weights_name = checkpoint_upload(f"erf-ckpt-{i}", "Checkpoint (optional; random init otherwise)")
    default_model = models.DEFAULT_MODEL if models.DEFAULT_MODEL in choices else choices[0]
    name = st.selectbox("Model", choices, index=choices.index(default_model), key=f"erf-model-{i}",
                        accept_new_options=True, help="a registered model or timm/<name> (any timm architecture)")
    models.check_registered(name)
    overrides: dict = {}
    if models.is_replknet(name):
        default_k = ",".join(map(str, models.PAPER_31B_KERNELS)) if k == 31 else str(k)
        kernels = parse_int_tuple(st.text_input("Large kernels (per stage, or one)", default_k, key=f"erf-k-{i}",
                                                help="e.g. 31,29,27,13 (RepLKNet-31B) or 13 or 3"),
                                  4, "large kernels")
        small = st.selectbox("Small kernel (re-param branch)", [5, 3, "none"], key=f"erf-sk-{i}")
        size = st.selectbox("Width / depth", ["tiny (16-128 ch, 1-1-2-1 blocks)", "paper"], key=f"erf-size-{i}")
        overrides["large_kernel_sizes"] = list(kernels)
        overrides["small_kernel"] = None if small == "none" or small >= min(kernels) else int(small)
        if size.startswith("tiny"):
            overrides["channels"] = list(models.TINY_CHANNELS)
            overrides["layers"] = list(models.TINY_LAYERS)
    elif name == "efficientnet_lite0" and st.toggle("Pretrained ImageNet weights", value=True, key=f"erf-pre-{i}"):
        overrides["pretrained"] = True
    elif models.fixed_input_size(name):
        overrides["img_size"] = int(input_size)  # a ViT / Swin is built for one input size
    reparam = st.toggle("Re-parameterized (deploy form)", value=True, key=f"erf-rep-{i}",
                        help="Merge each small-kernel/BN branch into the large kernel first; the ERF must not change.")
    overrides.update(model_options_input(f"erf-opts-{i}"))
    if shipped := erf_maps.shipped_upload(weights):  # its record gives the architecture it was trained as
        spec = erf_maps.shipped_spec(shipped, reparameterize=reparam)
        st.info(f"{weights_name} is the shipped {erf_maps.SHIPPED_PREFIX}{shipped}: measured as the model it was "
                f"trained as, {options_text(spec)} (its record; the model settings here do not apply).",
                icon=":material/info:")
        return spec, None
    spec = {"model": name, "overrides": models.overrides_key(overrides), "reparameterize": reparam}
    if weights is not None:
        spec.update(weights_name=weights_name, weights_sha=sha(weights))
    return spec, weights


def _image_source():
    """cue-world val images, built-in photos, a folder (under the allowed roots) or uploads -> a hashable source."""
    kind = st.radio("Images", ["cue-world val", "Built-in", "Folder", "Upload"], horizontal=True, key="erf-img-kind",
                    help="cue-world val: the validation images of the world the shipped models were trained on; "
                         "Built-in: photos in data/default_images")
    if kind == "cue-world val":
        return ("cue-world", int(st.number_input("cue-world val images", 1, safety.MAX_IMAGES,
                                                 erf_maps.DEFAULT_CUE_WORLD_IMAGES, key="erf-img-cue")))
    if kind == "Built-in":
        names = erf_maps.builtin_image_names()
        chosen = st.multiselect("Built-in images", names, default=names[:erf_maps.DEFAULT_NUM_IMAGES],
                                key="erf-img-builtin")
        if not chosen:
            st.info("Choose at least one image.")
            return None
        return ("builtin", tuple(chosen))
    if kind == "Folder":
        text = st.text_input("Image folder", key="erf-img-folder",
                             help="Under the working directory, your home, data/ or the datasets root.")
        if not text:
            return None
        folder = safety.safe_directory(text, "image folder")
        files = safety.image_files(folder)
        st.caption(f"{len(files)} image(s) in {folder} (at most {safety.MAX_IMAGES} are used)")
        return ("folder", str(folder))
    ups = st.file_uploader("Upload images", type=[s.lstrip(".") for s in safety.IMAGE_SUFFIXES],
                           accept_multiple_files=True, max_upload_size=safety.MAX_IMAGE_MB, key="erf-img-up")
    if not ups:
        return None
    good, skipped = safety.split_uploads((up.name, up.getvalue()) for up in ups[:safety.MAX_IMAGES])
    over = tuple((up.name, f"over the {safety.MAX_IMAGES}-image limit") for up in ups[safety.MAX_IMAGES:])
    return ("upload", good, skipped + over)


with guard("Model list"):
    MODELS = models.registered_models() + models.timm_models()

with st.sidebar:
    st.subheader("ERF settings")
    n_cfg = st.number_input("Configurations side by side", 1, MAX_CONFIGS, 2, key="erf-ncfg")
    input_size = st.select_slider("Input size (px)", [64, 128, 192, 256, 320, 384], value=erf_maps.DEFAULT_INPUT,
                                  key="erf-size", help="Multiples of 64 give an even feature map whose centre pixel "
                                  "lies over the image centre (as at the paper's 1024 px).")
    aggregate = st.selectbox("Aggregation over output channels", AGGREGATES, key="erf-agg",
                             help="relu: sum of positive gradients (official RepLKNet script); abs: |gradient|")
    source = None
    with guard("Images"):
        source = _image_source()

specs = []
weights_for: dict[int, bytes | None] = {}
if "MODELS" in globals() and MODELS:
    cols = st.columns(int(n_cfg))
    for i, col in enumerate(cols):
        with col, st.expander(f"Configuration {i + 1}", expanded=int(n_cfg) > 1), guard(f"Configuration {i + 1}"):
            spec, weights = _config_widgets(i, MODELS, int(input_size))
            rows = models.layer_table(spec["model"], spec["overrides"], int(input_size),
                                     spec.get("reparameterize", True))
            show_all = st.checkbox("List every layer", key=f"erf-all-{i}")
            rows = models.main_layers(rows, show_all)
            names = [r["name"] for r in rows]
            layer = st.selectbox("Layer (centre pixel of its output)", names, index=len(names) - 1,
                                 key=f"erf-layer-{i}", help="forward_features = last stage, as in the paper")
            row = rows[names.index(layer)]
            spec.update(layer=layer, trf=row.get("theoretical_rf"), input_size=int(input_size), aggregate=aggregate)
            weights_for[len(specs)] = weights
            specs.append(spec)

def _is_quick(spec: dict) -> bool:
    """Tiny RepLKNets and small models at <= 160 px run automatically; anything bigger waits for a click."""
    tiny = '"channels": [16' in spec["overrides"] or spec["model"] == "efficientnet_lite0" or spec["model"].startswith("mobilenetv2")
    return tiny and spec["input_size"] <= 160 and spec.get("weights_sha") is None


if specs and source is not None and not all(_is_quick(s) for s in specs):
    import json

    key = json.dumps([specs, str(source)[:2000]], sort_keys=True, default=str)
    if st.button("Compute ERFs", type="primary", key="erf-run", icon=":material/play_arrow:"):
        st.session_state["erf-confirmed"] = key
    if st.session_state.get("erf-confirmed") != key:
        st.info("This configuration is larger than the interactive default; press **Compute ERFs** to run it "
                "(or use the command line below for the full protocol).")
        cli_hint(erf_cli_args(specs[0], source, full=False), "This configuration from the command line:")
        specs = []

if specs and source is not None:
    results = []
    bar = st.progress(0.0, text="computing ERFs")
    for i, spec in enumerate(specs):
        def on_progress(frac, i=i):
            bar.progress((i + frac) / len(specs), text=f"ERF {i + 1}/{len(specs)}: {frac:.0%} of the images")
        with guard(f"ERF of configuration {i + 1}"):
            results.append((spec, erf_maps.erf_for(spec, source, weights_for.get(i), on_progress)))
    bar.empty()
    if results:
        with guard("ERF figure"):
            normalize = st.radio("Colour scale", ["each", "joint"], horizontal=True, key="erf-norm",
                                 help="each: log10(A+1)/own max (paper); joint: divide by the largest map's max")
            show_figure("erf_comparison", ([r["erf"] for _, r in results], [r["label"] for _, r in results]),
                        stem="erf", key="erf-fig", kwargs={"normalize": normalize},
                        caption="log10(A+1) normalized; one colour scale for all panels",
                        width="stretch" if len(results) > 1 else 520)
        cols = st.columns(len(results))
        for col, (spec, res) in zip(cols, results):
            with col:
                s = res["summary"]
                st.markdown(f"**{res['label']}**")
                st.caption(f"{res['num_used']} image(s), {res['num_skipped']} skipped · layer `{res['layer']}` · "
                           f"theoretical RF {rf_text(res['info'], ' px')} · {res['seconds']:.1f} s")
                if skipped := erf_maps.skip_message(res["skipped"], res["num_used"]):
                    st.warning(skipped, icon=":material/warning:")
                if res["info"].get("random_init"):
                    st.warning(erf_maps.RANDOM_INIT_NOTE, icon=":material/warning:")
                if loaded := selection_text(res["info"].get("weights_selection")):  # e.g. the raw weights, not the EMA
                    st.caption(f"Weights loaded: {loaded}")
                flags = (res["metrics"] or {}).get("flags") or []
                if "empty_map" in flags:
                    st.warning(erf_maps.EMPTY_MAP_NOTE, icon=":material/warning:")
                m1, m2 = st.columns(2)
                m1.metric("Area @20%", _pct(s.get("area@20%")))
                m2.metric("Area @50%", _pct(s.get("area@50%")))
                m3, m4 = st.columns(2)
                m3.metric("r_rms (px)", "n/a" if s.get("r_rms") is None else f"{s['r_rms']:.1f}")
                m4.metric("ERF / TRF", "n/a" if s.get("erf/trf") is None else f"{s['erf/trf']:.2f}",
                          help="RMS diameter (2 r_rms) / theoretical RF")
                if res["info"].get("rf_global"):
                    st.caption(f"ERF / TRF: none, the theoretical RF is the whole image: {GLOBAL_RF_REASON}"
                               f"{kernels_alone(res['info'])}.")
                if "theoretical_rf_exceeds_map" in flags and s.get("erf/trf") is not None:
                    st.caption(f"ERF / TRF: the theoretical RF ({res['trf']} px) is wider than the "
                               f"{spec['input_size']} px image; {TRF_EXCEEDS_MAP_NOTE}.")
        with guard("Metrics table"):
            st.dataframe(erf_maps.summary_table(results), hide_index=True)
            st.caption("Area @t: smallest centred square holding t of the contribution, % of the input "
                       "(Ding et al. 2022, Table 10; n/r: not reached inside the image); r_rms: RMS radius "
                       "(Luo et al. 2016); gauss_fit n/m: the "
                       "Gaussian fit is degenerate (a parameter at its bound, a sigma wider than the map or "
                       "R^2 < 0.5), so its sigma is not an ERF size.")
        first_spec, first = results[0]
        cli_hint(erf_cli_args(first_spec, source, full=False, run_info=first["info"]),
                 f"Configuration {specs.index(first_spec) + 1} from the command line (the same images, as the app "
                 "stored them):")
        cli_hint(erf_cli_args(first_spec, source, full=True),
                 "Full-size protocol (paper: trained weights, 50 ImageNet images at 1024 px):")
elif source is None:
    st.info("Choose images in the sidebar.")
