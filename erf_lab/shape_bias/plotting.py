"""Model-vs-human style shape-bias figure (Geirhos et al., ICLR 2019, Fig. 4; NeurIPS 2021 plotting code):
one row per category, markers at the fraction of 'shape' decisions (1 on the left, 0 on the right; texture on
the top axis), the mean of each observer as a vertical line, humans as reference."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.categories import CATEGORIES
from erf_lab.shape_bias.download import CREDIT

_HUMAN_STYLE = {"color": "#d62728", "marker": "D", "label": "humans"}
_MARKERS = ["o", "s", "^", "v", "P", "X", "<", ">", "h", "*"]


def plot_shape_bias(summaries: Sequence[dict], stem, human_csv_paths: Sequence[os.PathLike] | None = None,
                    title: str | None = None):
    """Draw and save ``stem.png`` / ``stem.pdf``; ``summaries`` are ``summary.json`` dicts. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from erf_lab.io import save_figure

    observers = []
    if human_csv_paths:
        from erf_lab.shape_bias.analysis import shape_bias_from_csv

        h = shape_bias_from_csv(list(human_csv_paths))
        observers.append((f"humans (n={len(h['per_subject'])})", h, _HUMAN_STYLE["color"], _HUMAN_STYLE["marker"]))
    cmap = matplotlib.colormaps["tab10"]
    palette = [cmap(k) for k in (0, 1, 2, 4, 5, 6, 8, 9, 7)]  # tab10 without its red (kept for humans)
    for i, s in enumerate(summaries):
        observers.append((s.get("label") or s.get("model", f"model {i}"), s, palette[i % len(palette)],
                          _MARKERS[i % len(_MARKERS)]))

    fig, ax = plt.subplots(figsize=(5.2, 0.28 * len(CATEGORIES) + 1.9), layout="constrained")
    ys = np.arange(len(CATEGORIES))
    for name, s, color, marker in observers:
        xs = [((s["per_category"].get(c) or {}).get("shape_bias")) for c in CATEGORIES]
        xs = np.array([np.nan if x is None else x for x in xs], dtype=float)
        ax.scatter(xs, ys, color=color, marker=marker, s=34, edgecolor=(0.3, 0.3, 0.3, 0.4), linewidth=0.4,
                   zorder=3, label=f"{name}: {s['shape_bias']:.3f}" if s.get("shape_bias") is not None else name)
        if s.get("shape_bias") is not None:
            ax.axvline(s["shape_bias"], color=color, linestyle="--", linewidth=1.2, zorder=2)
    ax.set_yticks(ys, CATEGORIES)
    ax.set_ylim(len(CATEGORIES) - 0.5, -0.5)
    ax.set_xlim(1.02, -0.02)  # shape (1) on the left, texture on the right
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("fraction of 'shape' decisions")
    top = ax.secondary_xaxis("top", functions=(lambda x: 1 - x, lambda x: 1 - x))
    top.set_xlabel("fraction of 'texture' decisions")
    ax.grid(axis="y", color="0.92", linewidth=0.8, zorder=0)
    ax.spines[["right"]].set_visible(False)
    ax.set_title(title or "Shape vs. texture decisions on cue-conflict stimuli", fontsize=10, pad=8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False, fontsize=8,
              title="shape bias (dashed: mean)", title_fontsize=8)
    fig.text(0.5, -0.01, CREDIT, ha="center", va="top", fontsize=5.5, wrap=True, color="0.35")
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def load_run(run_dir) -> dict:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        raise ErfLabError(f"{run_dir}: no summary.json (not an 'erf-lab shape-bias' output folder)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ErfLabError(f"{p}: unreadable JSON ({e.msg})") from None


def compare_runs(run_dirs: Sequence[os.PathLike], out, human_csv_paths=None) -> dict:
    """Several runs in one figure and one table (``comparison.md`` + ``comparison.csv``). Returns the rows."""
    from erf_lab.io import atomic_path, write_json

    if not run_dirs:
        raise ErfLabError("--compare needs at least one run folder")
    summaries = [load_run(d) for d in run_dirs]
    labels = [s.get("label", s.get("model")) for s in summaries]
    for i, lab in enumerate(labels):  # disambiguate equal labels by folder name
        if labels.count(lab) > 1:
            summaries[i]["label"] = f"{lab} [{Path(run_dirs[i]).name}]"
    cols = ["model", "shape_bias", "fraction_shape_hits", "fraction_texture_hits", "edge_accuracy",
            "silhouette_accuracy", "n_conflict", "run"]
    rows = []
    if human_csv_paths:
        from erf_lab.shape_bias.analysis import shape_bias_from_csv

        h = shape_bias_from_csv(list(human_csv_paths))
        rows.append({"model": "humans", "shape_bias": h["shape_bias"], "fraction_shape_hits": h["fraction_shape_hits"],
                     "fraction_texture_hits": h["fraction_texture_hits"], "edge_accuracy": None,
                     "silhouette_accuracy": None, "n_conflict": h["n_conflict"], "run": "human-cue-conflict"})
    for s, d in zip(summaries, run_dirs):
        rows.append({"model": s.get("label", s.get("model")), **{c: s.get(c) for c in cols[1:-1]}, "run": str(d)})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "comparison.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    md = ["| " + " | ".join(cols[:-1]) + " |", "|" + "---|" * (len(cols) - 1)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols[:-1]) + " |" for r in rows]
    md += ["", f"_{CREDIT}_"]
    with atomic_path(out / "comparison.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    plot_shape_bias(summaries, out / "shape_bias_comparison", human_csv_paths=human_csv_paths)
    import sys

    write_json(out / "run.json", {"what": "erf-lab shape-bias --compare", "runs": [str(d) for d in run_dirs],
                                  "command": sys.argv})
    return {"rows": rows, "markdown": "\n".join(md)}
