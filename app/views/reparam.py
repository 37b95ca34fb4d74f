"""Structural re-parameterization (RepLKNet, Ding et al., CVPR 2022, Sec. 3 guideline 2 / Fig. 2): a depthwise
KxK conv-BN with a parallel small-kernel conv-BN equals one KxK conv after fusing each BN into its conv
(w' = w gamma/sigma, b' = beta - mu gamma/sigma) and adding the zero-padded small kernel."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import erf_maps, models
from app.cache import sha
from app.commands import options_text, override_args
from app.figures import kernels_figure, show_matplotlib
from app.reparam_forms import reparam_report
from app.ui import checkpoint_upload, cli_hint, guard, model_options_input
from erf_lab.checkpoint import selection_text

st.title("Re-parameterization")
st.caption("Large kernel, small kernel, both BN-fused, and the merged kernel of one depthwise channel; the "
           "measured output difference of the merged / fully fused network; parameters and FLOPs (MACs) of each form.")

RLK = ["replknet_31b", "replknet_31l", "replknet_xl", "replknet_25", "replknet_13", "replknet_7", "replknet_3"]

c1, c2, c3, c4 = st.columns(4)
choices = []
with guard("Model list"):
    choices = [m for m in RLK if m in models.registered_models()]
model = c1.selectbox("Model", choices or RLK, key="rp-model")
tiny = c2.toggle("Tiny width/depth", value=True, key="rp-tiny", help="16-128 channels, 1-1-2-1 blocks")
size = c4.select_slider("Test input (px)", [64, 96, 128, 224], value=64, key="rp-size")

report, shipped, options, random_bn, weights, weights_name = None, None, {}, False, None, ""
with guard("Re-parameterization"):
    weights, weights_name = checkpoint_upload("rp-ckpt")
    # an upload keeps its own BN statistics: the toggle is off and disabled for it (its own key: the random-init
    # toggle's state is not shown as if it applied)
    fresh = weights is None
    random_bn = c3.toggle("Random BN statistics", value=fresh, key="rp-bn" if fresh else "rp-bn-upload",
                          disabled=not fresh,
                          help="A fresh model has identity BNs (fusion would be trivial); randomize them, seeded"
                          if fresh else "An uploaded checkpoint is used with its own BN statistics") and fresh
    options = model_options_input("rp-opts")
    ov = models.overrides_key({**models.parse_overrides(models.tiny_overrides() if tiny else "{}"), **options})
    if shipped := erf_maps.shipped_upload(weights):  # its record gives the architecture it was trained as
        spec = erf_maps.shipped_spec(shipped)
        model, ov, options = spec["model"], spec["overrides"], models.parse_overrides(spec["overrides"])
        st.info(f"{weights_name} is the shipped {erf_maps.SHIPPED_PREFIX}{shipped}: built as the model it was "
                f"trained as, {options_text(spec)} (its record; the model settings above do not apply).",
                icon=":material/info:")
    args = (model, ov, random_bn, int(size), 0)
    # the tiny random-init default shows at once; a paper-size network or an upload waits for a click
    if not tiny or weights is not None:
        key = repr((args, sha(weights)))
        if st.button("Compare the forms", type="primary", key="rp-run", icon=":material/play_arrow:"):
            st.session_state["rp-confirmed"] = key
        if st.session_state.get("rp-confirmed") != key:
            st.info(f"{model} at paper size or with a checkpoint is built three times (train-time, merged, fused); "
                    "press **Compare the forms**.")
            args = None
    if args is not None:
        bar = st.progress(0.0, text="building, merging and comparing the forms")
        try:
            report = reparam_report(*args, weights=weights, weights_name=weights_name,
                                    on_progress=lambda frac, text: bar.progress(frac, text=text))
        finally:
            bar.empty()

if report:
    if weights is None:
        st.caption(f"{model} at random init (seed 0), untrained"
                   f"{' (BN statistics randomized, seed 1)' if random_bn else ''}: the kernels below are no trained "
                   "network's; the forms' equivalence holds for any weights (upload a checkpoint to see trained ones).")
    elif report.get("random_init"):  # e.g. epoch 0 of an erf-lab train run: marked so in the file
        st.caption(f"{weights_name} is marked as an untrained initialisation (random init, seed "
                   f"{report['random_init'].get('seed')}): the kernels below are no trained network's; the forms' "
                   "equivalence holds for any weights.")
    if loaded := selection_text(report.get("weights_selection")):  # e.g. the raw weights, not the EMA beside them
        st.caption(f"Weights loaded: {loaded}")
    forms = report["forms"]
    cols = st.columns(len(forms))
    base = forms["train-time"]
    for col, (name, f) in zip(cols, forms.items()):
        col.metric(f"{name}: params", f"{f['params'] / 1e6:.3f} M",
                   delta=None if f is base else f"{(f['params'] - base['params']) / 1e6:+.3f} M", delta_color="off")
        col.metric(f"FLOPs (MACs) @ {report['input_size']} px", f"{f['flops'] / 1e6:.1f} M",
                   delta=None if f is base else f"{(f['flops'] - base['flops']) / 1e6:+.1f} M", delta_color="off")
        if f is not base:
            col.metric("max relative output error", f"{f['error']:.2e}",
                       help="max|y_train - y_form| / max|y_train| on a seeded random batch (eval mode)")
    st.dataframe(pd.DataFrame([{"form": k, **v} for k, v in forms.items()]), hide_index=True)

    blocks = report["blocks"]
    if not blocks:
        st.info("This model has no re-parameterizable large-kernel blocks.")
    else:
        b1, b2 = st.columns([2, 1])
        block = b1.selectbox("Block", list(blocks), key="rp-block")
        data = blocks[block]
        ch = b2.number_input("Channel", 0, data["large"].shape[0] - 1, 0, key="rp-ch")
        with guard("Kernel heatmaps"):
            panels = [("large kernel", data["large"]), ("small kernel", data["small"]),
                      ("large, BN-fused", data["large_fused"]), ("small, BN-fused", data["small_fused"]),
                      ("merged (deploy)", data["merged"])]
            show_matplotlib(kernels_figure([(t, a[ch]) for t, a in panels if a is not None]),
                            f"kernels-{block}-ch{ch}", key="rp-fig")
            st.caption(f"One symmetric colour scale. Merged = fused large + zero-padded fused small "
                       f"(K={data['kernel']}, small={data['small_kernel']}).")
    cli_hint(["reparam", "--model", model, "--weights", f"{erf_maps.SHIPPED_PREFIX}{shipped}" if shipped else
              weights_name or "CHECKPOINT.pth", *override_args(options), "--out", "replknet_deploy.pth"],
             "Export the merged (official deploy layout) checkpoint of a trained model from the command line:")
