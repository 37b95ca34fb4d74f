"""Kernels: why large depthwise kernels can be fast (RepLKNet, Ding et al., CVPR 2022, Sec. 3 guideline 1 and
Table 1): latency of a depthwise conv against kernel size per resolution, and which fastconv backend runs."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import kernel_bench, safety
from app.figures import bench_figure, show_matplotlib
from app.ui import cli_hint, guard, parse_int_tuple
from erf_lab.errors import ErfLabError
from fastconv.bench import padding_note

st.title("Kernels")
st.caption("RepLKNet's Table 1 measures a depthwise conv from 3x3 to 31x31 at several resolutions: with a "
           "good implementation the latency grows far slower than the K^2 FLOPs. `fastconv` picks the fastest "
           "exact backend per call (autotuned, cached) and says why.")

#: bounds of the live benchmark (Table 1 spans K = 3..31 at R = 16..64); beyond them the command line
MAX_LIVE_KERNEL, MAX_LIVE_RESOLUTION = 31, 128

tab_bench, tab_explain = st.tabs(["Table-1 benchmark", "Backend choice"])

with tab_explain:
    c1, c2, c3, c4 = st.columns(4)
    res = c1.select_slider("Resolution (H = W)", [7, 14, 28, 56, 112], value=28, key="k-res")
    k = c2.select_slider("Kernel size", [3, 5, 7, 9, 13, 17, 21, 25, 27, 29, 31], value=31, key="k-k")
    ch = c3.select_slider("Channels", [16, 32, 64, 128, 256, 512], value=64, key="k-ch")
    layout = c4.radio("Layout", ["channels_last", "NCHW"], key="k-layout")
    grads = st.toggle("Training (input and weight gradients)", value=False, key="k-grads")
    with guard("Backend explanation"):
        text = kernel_bench.fastconv_explain(int(res), int(k), int(ch), layout == "channels_last", bool(grads))
        st.code(text, language="text")
        st.caption("First use of a shape times every applicable backend once; later calls read the cache.")

with tab_bench:
    mode = st.radio("Source", ["Run a small benchmark", "Load saved results"], horizontal=True, key="kb-mode")
    with guard("Benchmark"):
        table = None
        if mode == "Run a small benchmark":
            b1, b2, b3 = st.columns(3)
            ks_text = b1.text_input("Kernel sizes", "3,13,31", key="kb-ks")
            res_text = b2.text_input("Resolutions", "16,32", key="kb-res")
            channels = b3.select_slider("Channels", [16, 32, 64, 128, 256], value=32, key="kb-ch")
            ks = tuple(dict.fromkeys(parse_int_tuple(ks_text, what="kernel sizes")))  # "3,3": measured once
            rs = tuple(dict.fromkeys(parse_int_tuple(res_text, what="resolutions")))
            if any(k % 2 == 0 or k > MAX_LIVE_KERNEL for k in ks) or max(rs) > MAX_LIVE_RESOLUTION:
                raise ErfLabError(f"the live benchmark takes odd kernel sizes up to {MAX_LIVE_KERNEL} and resolutions "
                                  f"up to {MAX_LIVE_RESOLUTION}, got {ks_text!r} and {res_text!r}; larger ones: "
                                  "erf-lab bench (below)")
            if st.button("Run benchmark", key="kb-run", icon=":material/play_arrow:"):
                st.session_state["kb-last"] = (ks, rs, int(channels))
            last = st.session_state.get("kb-last")
            if last is None:
                st.info("Press **Run benchmark** (a few seconds per resolution: 3 implementations per kernel size).")
        if mode == "Run a small benchmark" and st.session_state.get("kb-last") is not None:
            if st.session_state["kb-last"] != (ks, rs, int(channels)):  # the settings above were changed since
                lk, lr, lc = st.session_state["kb-last"]
                st.info(f"Shown: the last benchmark run (kernel sizes {','.join(map(str, lk))}, resolutions "
                        f"{','.join(map(str, lr))}, {lc} channels), not the settings above; press **Run benchmark** "
                        "to measure those.")
            ks, rs, channels = st.session_state["kb-last"]
            bar = st.progress(0.0, text="benchmark")
            table = kernel_bench.fastconv_bench(ks, rs, channels,
                                           on_progress=lambda f, t: bar.progress(min(f, 1.0), text=t))
            st.caption(f"{table['meta'].get('device')} · {table['meta'].get('threads')} threads · batch "
                       f"{table['meta'].get('batch')} · {table['meta'].get('channels')} channels · "
                       f"{table['meta'].get('layers')} stacked layers · forward only")
            bar.empty()
        elif mode == "Load saved results":
            text = st.text_input("Benchmark results folder (holds results.json from fastconv.bench --out)", key="kb-dir")
            if text:
                table = kernel_bench.load_bench_results(safety.safe_directory(text, "benchmark folder"))
        if table is not None:
            show_matplotlib(bench_figure(table["rows"]), "kernel-latency", key="kb-fig")
            st.dataframe(pd.DataFrame(table["rows"]), hide_index=True)
            if note := padding_note(table["rows"]):  # the rates of cells that mostly multiply zero padding
                st.caption(note.strip().strip("()"))
    cli_hint(["bench", "--out", "runs/bench"], "Full Table-1 benchmark from the command line (CSV + JSON):")
