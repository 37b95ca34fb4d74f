"""Paper-style ERF figures (Ding et al., CVPR 2022, Fig. 1 / App. C and the official ``erf/analyze_erf.py``).

Heatmaps show a display transform of A scaled by its max (``DISPLAY_PRESETS``; default RepLKNet's
A' = log10(A + 1) / max) as the official script's ``seaborn.heatmap`` draws them (a square ``pcolormesh``, row 0 at
the top; drawn here with matplotlib alone, as one image for large maps: seaborn's import cost 1.6 s per process),
``RdYlGn`` centred at 0 (so [0, 1] maps onto the yellow-green half), no tick labels and a horizontal colour bar on
top. Figures are built on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state) and written
atomically by :func:`erf_lab.io.save_figure` as PNG (``FIGURE_DPI``, 300 dpi) and PDF (vector text and axes, the map
rasterized), plus SVG on request, in every erf-lab figure's font (``FIGURE_FONT``, a Times serif as in the paper).
A figure of several panels (compare, a sweep's grid and growth curves) is drawn at most a page's text width wide
(``PAGE_WIDTH_IN``) in 6-8 pt type, the sizes it prints at; long panel titles shrink, then wrap, to their panel.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.erf.metrics import log10_1p, validate_erf
from erf_lab.errors import ErfLabError
from erf_lab.io import FIGURE_RC, save_figure

FORMATS = ("png", "pdf", "svg")
# name -> (formula shown in the figure, whose convention, transform before dividing by the max). Display only:
# erf.npy and the metrics never depend on it.
DISPLAY_PRESETS = {
    "replknet": ("log10(A+1)/max", "RepLKNet, Ding et al., CVPR 2022", log10_1p),
    "slak": ("A/max", "SLaK, Liu et al., ICLR 2023", lambda a: a),
    "power": ("A^0.25/max", "VMamba, Liu et al., NeurIPS 2024 (analyze/utils.py simpnorm)", lambda a: a ** 0.25),
}
DEFAULT_DISPLAY = "replknet"
CMAP = "RdYlGn"
_RC = {
    "axes.unicode_minus": False,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    # every figure's font (erf_lab.io.FIGURE_FONT: Times, as the paper's); PDF text as embedded TrueType (editable,
    # accepted by publishers), SVG text as text
    **FIGURE_RC,
    "axes.facecolor": "white",
    "axes.grid": False,
}
#: a two-column paper's text width (CVPR / ICCV 6.875 in): a figure of several panels is drawn at most this wide, in
#: :data:`_PRINT_RC`'s point sizes, so the sizes are those it prints at; drawn 3 in per panel (a sweep of 8 kernels:
#: 19.8 in), its 7 pt colour-bar label printed at 2.4 pt
PAGE_WIDTH_IN = 6.875
_PRINT_RC = {"axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
             "legend.fontsize": 7, "legend.title_fontsize": 7}
MIN_PRINT_PT = 6.0


def parse_formats(text: str | Sequence[str] | None, default=("png", "pdf")) -> tuple[str, ...]:
    """'png,pdf,svg' -> ('png', 'pdf', 'svg'); ErfLabError on an unknown format."""
    if text is None:
        return tuple(default)
    items = text.split(",") if isinstance(text, str) else list(text)
    fmts = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ErfLabError(f"unknown figure format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return fmts


@contextlib.contextmanager
def _style(print_sizes: bool = False):
    """Draw in :data:`_RC`; ``print_sizes``: a figure of several panels, in :data:`_PRINT_RC`'s sizes."""
    import matplotlib

    with matplotlib.rc_context({**_RC, **(_PRINT_RC if print_sizes else {})}):
        yield


def _panel_width(ncols: int, preferred: float, margin: float = 0.0) -> float:
    """Inches per panel: ``preferred``, or less so that ``ncols`` panels and ``margin`` fit :data:`PAGE_WIDTH_IN`."""
    return min(preferred, (PAGE_WIDTH_IN - margin) / ncols)


def _fit_text(text: str, width_in: float, fontsize: float) -> tuple[str, float]:
    """``(text, size)`` for a label ``width_in`` wide: ``fontsize`` or smaller (down to :data:`MIN_PRINT_PT`),
    then broken into lines after ``_`` / ``.`` / ``-`` / spaces (a long model name no longer runs into the next
    panel's). A character is taken as 0.55 em wide, a serif font's widest lower-case average."""
    text = str(text)
    per_char = 0.55 / 72  # inches per point of size
    for size in np.arange(fontsize, MIN_PRINT_PT - 1e-9, -0.5):
        if max(len(line) for line in text.split("\n")) * size * per_char <= width_in:
            return text, float(size)
    limit = max(4, int(width_in / (MIN_PRINT_PT * per_char)))
    lines, line = [], ""
    for piece in re.findall(r"[^_.\-\s]*[_.\-\s]?", text):
        if line and len(line + piece) > limit:
            lines.append(line.rstrip())
            line = ""
        while len(piece) > limit:  # one piece longer than a line: cut it
            lines.append(piece[:limit])
            piece = piece[limit:]
        line += piece
    lines.append(line.rstrip())
    return "\n".join(x for x in lines if x), MIN_PRINT_PT


def _fit_labels(labels: Sequence[str | None], width_in: float, fontsize: float) -> tuple[list[str | None], float]:
    """:func:`_fit_text` for labels of one kind (a figure's panel titles), at ONE size: the smallest any needs."""
    size = min([_fit_text(t, width_in, fontsize)[1] for t in labels if t] or [fontsize])
    return [_fit_text(t, width_in, size)[0] if t else t for t in labels], size


def _value_ticks(ax, xs: Sequence[float], panel_in: float) -> None:
    """A tick at each of ``xs`` (the measured values), labelled ``{:g}``; slanted when the labels would not fit
    side by side in 80 % of a panel ``panel_in`` wide at :data:`_PRINT_RC`'s tick size."""
    crowded = sum(len(f"{v:g}") + 1 for v in xs) * _PRINT_RC["xtick.labelsize"] * 0.55 / 72 > 0.8 * panel_in
    slanted = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if crowded else {}
    ax.set_xticks(list(xs), [f"{v:g}" for v in xs], **slanted)


def _plain_log_ticks(axis) -> None:
    """Plain numbers (``{:g}``: 0.5, 4, 20) on a log-scale ``axis`` (``ax.yaxis``), at the ticks matplotlib labels:
    its default labels a span under a decade ``4x10^0``, ``6x10^0`` and ``10^1``, where a reader wants milliseconds."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain())  # which minor ticks get a label: matplotlib's own choice, by the span shown


def _new_figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def paper_cmap():
    """``RdYlGn`` recentred at 0 for data in [0, 1], i.e. its upper half (what the official script gets from
    ``sns.heatmap(..., cmap='RdYlGn', center=0)``), built directly to avoid seaborn's deprecated ``set_bad``."""
    import matplotlib

    base = matplotlib.colormaps[CMAP]
    return matplotlib.colors.ListedColormap(base(np.linspace(0.5, 1.0, 256)), name="RdYlGn_center0")


#: maps up to this many cells are drawn as seaborn draws them, a QuadMesh of one quad per cell; larger ones as one
#: image (nearest neighbour, colour-mapped after resampling). Both give the same pixels (tested); per ERF figure
#: (PNG + PDF) on the dev box the QuadMesh is 0.05-0.1 s quicker at 64-224 px and 1.2-1.6 s slower at 1024 px.
QUADMESH_MAX_CELLS = 256 * 256


def _heatmap(ax, data: np.ndarray, title: str | None = None, title_size: float | None = None):
    """One paper-style panel on ``ax`` (as ``seaborn.heatmap(square=True)``: cells on the integer grid, row 0 at
    the top, no ticks); returns the QuadMesh or AxesImage (for a shared colour bar)."""
    h, w = data.shape
    if h * w <= QUADMESH_MAX_CELLS:
        image = ax.pcolormesh(data, cmap=paper_cmap(), vmin=0.0, vmax=1.0, rasterized=True)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_aspect("equal")
    else:
        image = ax.imshow(data, cmap=paper_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest",
                          interpolation_stage="data", origin="upper", extent=(0, w, h, 0), aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))  # None: font.size
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _colorbar(fig, image, axes, display: str | None = None, joint: bool = False):
    cb = fig.colorbar(image, ax=axes, location="top", fraction=0.05, pad=0.04, aspect=40 if np.ndim(axes) else 25)
    cb.set_ticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    import matplotlib

    # a tick label's size less 1 pt, at least 7: the single map's 7 pt printed at 5.8 pt in a 3.3 in column
    cb.set_label(display_caption(display, joint), fontsize=max(7, matplotlib.rcParams["xtick.labelsize"] - 1))
    cb.outline.set_linewidth(0.5)
    return cb


def display_preset(name: str | None) -> str:
    """The preset name (None -> the default); ErfLabError for an unknown one."""
    name = DEFAULT_DISPLAY if name is None else str(name).lower()
    if name not in DISPLAY_PRESETS:
        raise ErfLabError(f"unknown display preset {name!r}; choose from {', '.join(DISPLAY_PRESETS)}")
    return name


def display_caption(name: str | None, joint: bool = False) -> str:
    """What a figure drawn with preset ``name`` shows, e.g. ``'log10(A+1)/max (RepLKNet, ...)'``; ``joint``: the
    max is the one over all maps of the figure (``comparison_figure(normalize="joint")``), not each map's own."""
    formula, source, _ = DISPLAY_PRESETS[display_preset(name)]
    return f"{formula}{' over all maps' if joint else ''} ({source})"


def display_map(erf, display: str | None = None, scale: float | None = None) -> np.ndarray:
    """The heatmap values of one map: the preset's transform divided by its max (or by ``scale``, the joint
    max over several maps). An all-zero map stays zero."""
    t = DISPLAY_PRESETS[display_preset(display)][2](validate_erf(erf))
    m = float(t.max()) if scale is None else scale
    return t / m if m > 0 else t


def display_levels(erf) -> np.ndarray:
    """The colour of each cell of a map's heatmap (default display) as its index into :func:`paper_cmap`'s 256
    colours (uint8; the map's maximum is 255): what a figure shows of the map, 1 byte a cell."""
    return np.clip(np.floor(display_map(erf) * 256), 0, 255).astype(np.uint8)


def levels_map(levels) -> np.ndarray:
    """A map whose heatmap (default display) has exactly the colours ``levels`` (:func:`display_levels`) name:
    log10(A + 1) = (level + 0.5) / 256. ErfLabError when ``levels`` are not a map's (no cell at 255)."""
    levels = np.asarray(levels)
    if levels.ndim != 2 or levels.dtype != np.uint8 or levels.max() != 255:
        raise ErfLabError(f"not the display levels of a map (uint8, maximum 255): {levels.dtype}, shape "
                          f"{levels.shape}, maximum {levels.max() if levels.size else None}")
    return 10.0 ** ((levels.astype(np.float64) + 0.5) / 256) - 1.0


def erf_figure(erf, title: str | None = None, display: str | None = None, caption: str | None = None):
    """The paper-style heatmap of one ERF as a ``matplotlib.figure.Figure`` (e.g. for ``st.pyplot``); the colour
    bar names the ``display`` preset; ``caption``, in small type under the map, what was measured
    (:func:`erf_lab.erf.rundir.run_caption`)."""
    data = display_map(erf, display)
    with _style():
        fig = _new_figure((4.0, 4.4))
        ax = fig.add_subplot()
        image = _heatmap(ax, data, title)
        if caption:
            ax.set_xlabel(caption, fontsize=8)
        _colorbar(fig, image, ax, display)
    return fig


def plot_erf(erf, stem: str | os.PathLike, title: str | None = None,
             formats: Sequence[str] = ("png", "pdf"), display: str | None = None,
             caption: str | None = None) -> list[Path]:
    """Paper-style heatmap of one ERF saved as ``stem.<fmt>``; returns the written paths."""
    fig = erf_figure(erf, title, display, caption)
    with _style():
        return save_figure(fig, stem, tuple(formats))


def plot_comparison(erfs: Sequence, labels: Sequence[str], stem: str | os.PathLike,
                    formats: Sequence[str] = ("png", "pdf"), normalize: str = "each",
                    ncols: int | None = None, display: str | None = None) -> list[Path]:
    """:func:`comparison_figure` saved as ``stem.<fmt>``; returns the written paths."""
    fig = comparison_figure(erfs, labels, normalize=normalize, ncols=ncols, display=display)
    with _style():
        return save_figure(fig, stem, tuple(formats))


def comparison_figure(erfs: Sequence, labels: Sequence[str], normalize: str = "each", ncols: int | None = None,
                      display: str | None = None):
    """Several ERFs side by side on ONE colour scale with titles (the paper's ResNet vs RepLKNet figure).

    ``normalize="each"`` (paper): every map is the ``display`` transform (default log10(A+1)) / its own max, so
    all lie in [0, 1] and share one colour bar. ``"joint"``: divide by the largest transformed value over all maps.
    """
    if len(erfs) != len(labels):
        raise ErfLabError(f"{len(erfs)} maps but {len(labels)} labels")
    if not erfs:
        raise ErfLabError("nothing to compare")
    if normalize not in ("each", "joint"):
        raise ErfLabError(f"normalize must be 'each' or 'joint', got {normalize!r}")
    scale = None
    if normalize == "joint":
        scale = max(float(display_map(e, display, scale=1.0).max()) for e in erfs)
    data = [display_map(e, display, scale) for e in erfs]
    n = len(data)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    panel = _panel_width(ncols, 3.2)
    with _style(print_sizes=True):
        fig = _new_figure((panel * ncols, (panel + 0.35) * nrows + 0.5))
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        titles, size = _fit_labels(labels, panel, _PRINT_RC["axes.titlesize"])
        image = None
        for ax, d, lab in zip(axes, data, titles):
            image = _heatmap(ax, d, lab, size)
        for ax in axes[n:]:
            ax.set_axis_off()
        _colorbar(fig, image, list(axes), display, joint=normalize == "joint")
    return fig


def plot_grid(erfs: Sequence[Sequence], row_labels: Sequence[str], col_labels: Sequence[str],
              stem: str | os.PathLike, formats: Sequence[str] = ("png", "pdf"),
              display: str | None = None) -> list[Path]:
    """Heatmap grid (rows x columns, e.g. re-param mode x kernel size) on one [0, 1] colour scale.

    ``erfs[r][c]`` may be None for a missing cell (left blank).
    """
    nrows, ncols = len(row_labels), len(col_labels)
    if nrows == 0 or ncols == 0 or len(erfs) != nrows or any(len(r) != ncols for r in erfs):
        raise ErfLabError(f"grid shape does not match labels ({nrows} rows x {ncols} columns)")
    panel = _panel_width(ncols, 2.4, margin=0.4)
    with _style(print_sizes=True):
        fig = _new_figure((panel * ncols + 0.4, (panel + 0.15) * nrows + 0.6))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        titles, title_size = _fit_labels(col_labels, panel, _PRINT_RC["axes.titlesize"])
        rows, row_size = _fit_labels(row_labels, panel, _PRINT_RC["axes.labelsize"])
        image = None
        # each label on its row's / column's first map: on the first row and column only, a missing first cell
        # left its row or column unnamed
        first_in_row = {r: next((c for c in range(ncols) if erfs[r][c] is not None), None) for r in range(nrows)}
        first_in_col = {c: next((r for r in range(nrows) if erfs[r][c] is not None), None) for c in range(ncols)}
        for r in range(nrows):
            for c in range(ncols):
                ax = axes[r][c]
                if erfs[r][c] is None:
                    ax.set_axis_off()
                    continue
                image = _heatmap(ax, display_map(erfs[r][c], display), titles[c] if first_in_col[c] == r else None,
                                 title_size)
                if first_in_row[r] == c:
                    ax.set_ylabel(rows[r], fontsize=row_size)
        if image is None:
            raise ErfLabError("grid has no maps")
        _colorbar(fig, image, list(axes.ravel()), display)
        return save_figure(fig, stem, tuple(formats))


GROWTH_METRICS = (
    ("area@20%", "area ratio t=20% (%)"),
    ("area@50%", "area ratio t=50% (%)"),
    ("area@99%", "area ratio t=99% (%)"),
    ("r_rms", "effective radius r_rms (px)"),
)


def plot_growth(rows: Sequence[dict], stem: str | os.PathLike, *, x: str = "kernel", group: str = "reparam",
                metrics=GROWTH_METRICS, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Growth curves: each metric against ``x`` (kernel size), one line per ``group`` (re-param mode).

    ``rows`` are flat dicts (see :func:`erf_lab.erf.metrics.summary`) holding ``x``, ``group`` and the metric
    keys; None values (threshold not reached) are left out of the line.
    """
    if not rows:
        raise ErfLabError("no rows to plot")
    groups = list(dict.fromkeys(r.get(group, "") for r in rows))
    markers = "osD^v<>"
    ncols = min(len(metrics), 4)  # 4 panels a row: 7 in a row (the input-size sweep) were 21 in wide
    nrows = math.ceil(len(metrics) / ncols)
    panel = _panel_width(ncols, 3.0)
    with _style(print_sizes=True):
        fig = _new_figure((panel * ncols, 2.1 * nrows))
        grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in grid[len(metrics):]:
            fig.delaxes(ax)
        axes = grid[:len(metrics)]
        fitted, ylabel_size = _fit_labels([label for _, label in metrics], 1.6, _PRINT_RC["axes.labelsize"])
        ylabels = dict(zip([key for key, _ in metrics], fitted))  # fitted into a panel's height
        for ax, (key, label) in zip(axes, metrics):
            for gi, g in enumerate(groups):
                pts = sorted((r[x], r.get(key)) for r in rows if r.get(group, "") == g and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[gi % len(markers)],
                            linestyle="-" if gi == 0 else "--", label=str(g), linewidth=1.4, markersize=5)
            ax.set_xlabel({"kernel": "kernel size", "input_size": "input size (px)"}.get(x, x))
            ax.set_ylabel(ylabels[key], fontsize=ylabel_size)
            _value_ticks(ax, sorted({r[x] for r in rows}), panel)
            ax.grid(True, linewidth=0.4, alpha=0.5)
        if len(groups) > 1 or groups[0]:  # from the first panel with a line (a metric never reached draws none),
            drawn = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), None)
            if drawn is not None:  # above the panels: in one, it covered its lines
                fig.legend(*drawn.get_legend_handles_labels(), title=group, frameon=False, loc="outside upper center",
                           ncols=min(len(groups), 4))
        return save_figure(fig, stem, tuple(formats))
