"""Structural re-parameterization (RepLKNet, Ding et al., CVPR 2022, Sec. 3 guideline 2 / Fig. 2): a depthwise
KxK conv-BN with a parallel small-kernel conv-BN equals one KxK conv after fusing each BN into its conv
(w' = w gamma/sigma, b' = beta - mu gamma/sigma) and adding the zero-padded small kernel."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

import loaders
import safety
from ui import cli_hint, guard, matplotlib_downloads

st.title("Re-parameterization")
st.caption("Large kernel, small kernel, both BN-fused, and the merged kernel of one depthwise channel; the "
           "measured output difference of the merged / fully fused network; parameters and FLOPs (MACs) of each form.")

RLK = ["replknet_31b", "replknet_31l", "replknet_xl", "replknet_25", "replknet_13", "replknet_7", "replknet_3"]

c1, c2, c3, c4 = st.columns(4)
with guard("Model list"):
    models = [m for m in RLK if m in loaders.registered_models()]
model = c1.selectbox("Model", models or RLK, key="rp-model")
tiny = c2.toggle("Tiny width/depth", value=True, key="rp-tiny", help="16-128 channels, 1-1-2-1 blocks")
random_bn = c3.toggle("Random BN statistics", value=True, key="rp-bn",
                      help="A fresh model has identity BNs (fusion would be trivial); randomize them, seeded")
size = c4.select_slider("Test input (px)", [64, 96, 128, 224], value=64, key="rp-size")
ck = st.file_uploader("Checkpoint (optional)", type=["pth", "pt", "bin", "safetensors"],
                      max_upload_size=safety.MAX_CHECKPOINT_MB, key="rp-ckpt")

report = None
with guard("Re-parameterization"):
    weights = None
    if ck is not None:
        safety.check_checkpoint_upload(ck.name, ck.size)
        weights = ck.getvalue()
    ov = loaders.overrides_key({"channels": list(loaders.TINY_CHANNELS), "layers": list(loaders.TINY_LAYERS)}
                               if tiny else {})
    with st.spinner("building, merging and comparing the forms ..."):
        report = loaders.reparam_report(model, ov, bool(random_bn and ck is None), int(size), 0, _weights=weights,
                                        weights_sha=loaders.sha(weights), weights_name=ck.name if ck else "")

if report:
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
            from matplotlib.figure import Figure

            panels = [("large kernel", data["large"][ch]), ("small kernel", None if data["small"] is None
                                                            else data["small"][ch]),
                      ("large, BN-fused", data["large_fused"][ch]),
                      ("small, BN-fused", None if data["small_fused"] is None else data["small_fused"][ch]),
                      ("merged (deploy)", data["merged"][ch])]
            panels = [(t, a) for t, a in panels if a is not None]
            fig = Figure(figsize=(3.0 * len(panels), 3.2), layout="constrained")
            axes = fig.subplots(1, len(panels))
            vmax = max(float(np.abs(a).max()) for _, a in panels) or 1.0
            for ax, (title, a) in zip(np.atleast_1d(axes), panels):
                im = ax.imshow(a, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
                ax.set_title(f"{title}\n{a.shape[0]}x{a.shape[1]}", fontsize=10)
                ax.set_xticks([])
                ax.set_yticks([])
            fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8, label="weight")
            st.pyplot(fig, width="stretch")
            matplotlib_downloads(fig, f"kernels-{block}-ch{ch}", key="rp-fig")
            st.caption(f"One symmetric colour scale. Merged = fused large + zero-padded fused small "
                       f"(K={data['kernel']}, small={data['small_kernel']}).")
    cli_hint(["reparam", "--model", model, "--weights", "CHECKPOINT.pth", "--out", "replknet_deploy.pth"],
             "Export the merged (official deploy layout) checkpoint of a trained model from the command line:")
