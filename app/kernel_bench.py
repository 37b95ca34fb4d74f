"""Kernels page: ``fastconv.explain`` and a small Table-1 benchmark (``fastconv.bench.run``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import streamlit as st
import torch

import fastconv
from fastconv import bench

from app.cache import cached
from erf_lab.errors import ErfLabError


@st.cache_data(max_entries=64, show_spinner=False)
def fastconv_explain(res: int, k: int, ch: int, channels_last: bool, grads: bool) -> str:
    """``fastconv.explain`` for a (1, C, H, W) input and a (C, 1, K, K) depthwise weight."""
    x = torch.randn(1, ch, res, res)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return fastconv.explain(x.requires_grad_(grads), torch.randn(ch, 1, k, k, requires_grad=grads))


def fastconv_bench(kernels, resolutions, channels: int, layers: int = 2, on_progress=None) -> dict:
    """Forward latencies of ``fastconv.bench.run``, one resolution at a time (``on_progress(fraction, text)``
    before each); cached across sessions."""
    key = "bench:" + json.dumps([list(kernels), list(resolutions), channels, layers])
    return cached(key, lambda: _bench(kernels, resolutions, channels, layers, on_progress))


def _bench(kernels, resolutions, channels, layers, on_progress) -> dict:
    rows, meta = [], None
    for i, r in enumerate(resolutions):
        if on_progress:
            on_progress(i / len(resolutions), f"resolution {r} ({i + 1}/{len(resolutions)})")
        res = bench.run(kernels=tuple(kernels), resolutions=(int(r),), channels=int(channels), layers=int(layers),
                        repeats=3, warmup=1, modes=("fwd",), show_progress=False)
        rows += res["rows"]
        meta = res["meta"]
    return {"meta": meta, "rows": rows}


def load_bench_results(folder: Path) -> dict:
    """``results.json`` written by ``fastconv.bench.write_results``."""
    p = Path(folder) / "results.json"
    if not p.is_file():
        raise ErfLabError(f"{folder} has no results.json (not a fastconv benchmark folder)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ErfLabError(f"cannot read {p}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise ErfLabError(f"{p} does not hold benchmark rows")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or not all(_positive_int(row.get(k)) for k in ("R", "K")):
            raise ErfLabError(f"{p}: row {i + 1} has no resolution R and kernel size K (positive integers): not a "
                              "fastconv benchmark result")
        for k, v in row.items():
            if k.endswith("_ms") and v is not None and not _positive_number(v):
                raise ErfLabError(f"{p}: row {i + 1} (R = {row['R']}, K = {row['K']}): {k} is {v!r}, not a latency "
                                  "(a positive number of milliseconds)")
    return data


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
