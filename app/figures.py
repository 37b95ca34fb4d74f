"""Figures of the app: library figures rendered to bytes (cached) and shown with PNG / PDF / SVG downloads,
and the two figures the library does not draw (benchmark latency, one channel's kernels)."""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import streamlit as st
from matplotlib.figure import Figure

from erf_lab.erf import plotting
from erf_lab.errors import ErfLabError
from erf_lab.io import write_figure

# Library plotting functions the app renders (each writes ``stem.<fmt>`` files atomically).
PLOTS = {"erf_comparison": plotting.plot_comparison, "erf_grid": plotting.plot_grid,
         "erf_growth": plotting.plot_growth}
_MIME = {"png": "image/png", "pdf": "application/pdf", "svg": "image/svg+xml"}


@st.cache_data(max_entries=48, show_spinner=False)
def render_figure(kind: str, fmt: str, args: tuple, kwargs_json: str = "{}") -> bytes:
    """Bytes of a library figure in ``fmt`` (png/pdf/svg), rendered through the library's own function."""
    if kind not in PLOTS:
        raise ErfLabError(f"unknown figure kind {kind!r}")
    with tempfile.TemporaryDirectory() as d:
        paths = PLOTS[kind](*args, stem=Path(d) / "figure", formats=(fmt,), **json.loads(kwargs_json))
        return Path(paths[0]).read_bytes()


def show_figure(kind: str, args: tuple, stem: str, key: str, kwargs: dict | None = None,
                caption: str | None = None, width: int | str = "stretch") -> None:
    """Render a library figure (PNG shown) with PNG / PDF / SVG downloads (PDF / SVG made on click)."""
    kw = json.dumps(kwargs or {}, sort_keys=True)
    png = render_figure(kind, "png", args, kw)
    st.image(png, caption=caption, width=width)
    for col, fmt in zip(st.columns(3), ("png", "pdf", "svg")):
        data = png if fmt == "png" else (lambda fmt=fmt: render_figure(kind, fmt, args, kw))
        col.download_button(fmt.upper(), data=data, file_name=f"{stem}.{fmt}", mime=_MIME[fmt],
                            key=f"{key}-{fmt}", icon=":material/download:", on_click="ignore")


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """A matplotlib figure as ``fmt`` bytes."""
    buf = io.BytesIO()
    write_figure(fig, buf, fmt)  # as erf_lab.io.save_figure writes every figure file (font, dpi, no dates)
    return buf.getvalue()


def show_matplotlib(fig: Figure, stem: str, key: str) -> None:
    """Show a figure drawn by the app with PNG / PDF / SVG download buttons (the PNG shown is the one downloaded;
    ``st.pyplot`` rendered its own at 200 dpi)."""
    png = figure_bytes(fig, "png")
    st.image(png, width="stretch")
    for col, fmt in zip(st.columns(3), ("png", "pdf", "svg")):
        data = png if fmt == "png" else figure_bytes(fig, fmt)
        col.download_button(fmt.upper(), data=data, file_name=f"{stem}.{fmt}", mime=_MIME[fmt],
                            key=f"{key}-{fmt}", icon=":material/download:", on_click="ignore")


def bench_figure(rows: list[dict]) -> Figure:
    """Latency (ms, log scale) against kernel size, one panel per resolution, one line per implementation;
    the paper's Table 1 (GTX 2080Ti, B=64) dashed for its shape, not its absolute scale. Drawn as the CLI's figures
    (:mod:`erf_lab.erf.plotting`): at most a page's text width wide, in the sizes it prints at, the legend above
    the panels (inside one, it covered its lines)."""
    res = sorted({r["R"] for r in rows})
    impls = [i for i in ("pytorch_nchw", "pytorch_cl", "fastconv") if any(f"fwd_{i}_ms" in r for r in rows)]
    panel = plotting._panel_width(len(res), 2.6)
    with plotting._style(print_sizes=True):
        fig = plotting._new_figure((panel * len(res), 2.5))
        axes = fig.subplots(1, len(res), squeeze=False)[0]
        titles, title_size = plotting._fit_labels([f"{r} x {r} px" for r in res], panel,
                                                  plotting._PRINT_RC["axes.titlesize"])
        for ax, r, title in zip(axes, res, titles):
            sub = sorted((x for x in rows if x["R"] == r), key=lambda x: x["K"])
            for impl, marker in zip(impls, "osD"):
                ax.plot([x["K"] for x in sub], [x.get(f"fwd_{impl}_ms") for x in sub], marker=marker, label=impl,
                        linewidth=1.2, markersize=3.5)
            for key, lab in (("paper_pytorch_ms", "paper: PyTorch"), ("paper_ours_ms", "paper: block-wise")):
                pts = [(x["K"], x[key]) for x in sub if x.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle="--", color="0.6" if "pytorch" in key else "0.3", linewidth=1,
                            label=lab)
            ax.set_yscale("log")
            plotting._plain_log_ticks(ax.yaxis)
            ax.set_xlabel("kernel size K (px)")
            ax.set_title(title, fontsize=title_size)
            plotting._value_ticks(ax, [x["K"] for x in sub], panel)
            ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
        axes[0].set_ylabel("forward latency (ms)")
        handles = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
        fig.legend(*handles, loc="outside upper center", ncols=min(len(handles[0]), 5 if len(res) > 1 else 3),
                   frameon=False)
    return fig


def kernels_figure(panels: list[tuple[str, np.ndarray]]) -> Figure:
    """2-D kernels side by side on one symmetric colour scale (``panels``: (title, K x K array)), drawn as the CLI's
    figures: at most a page's text width wide, in the sizes it prints at."""
    panel = plotting._panel_width(len(panels), 1.8, margin=0.7)  # the colour bar and its label
    with plotting._style(print_sizes=True):
        fig = plotting._new_figure((panel * len(panels) + 0.7, panel + 0.6))
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        vmax = max(float(np.abs(a).max()) for _, a in panels) or 1.0
        titles, size = plotting._fit_labels([f"{t}\n{a.shape[0]} x {a.shape[1]}" for t, a in panels], panel,
                                            plotting._PRINT_RC["axes.titlesize"])
        for ax, (_, a), title in zip(axes, panels, titles):
            im = ax.imshow(a, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=size)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="kernel weight")
    return fig
