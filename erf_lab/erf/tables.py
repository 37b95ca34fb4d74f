"""Metric tables of ERF runs: rows, markdown, CSV and the console text with the paper's Table 10 beside them."""
from __future__ import annotations

import csv
import io
from typing import Sequence

from erf_lab.erf.metrics import (GAUSS_MIN_R2, GLOBAL_RF_REASON, NOT_MEANINGFUL, PAPER_TABLE10, TRF_EXCEEDS_MAP_NOTE,
                                 gaussian_fit_ok, paper_caveat, paper_reference, summary)

TABLE_COLUMNS = ("label", "source", "shape", "area@20%", "area@30%", "area@50%", "area@99%", "r_rms", "std_y", "std_x",
                 "gauss_sigma_y", "gauss_sigma_x", "gauss_r2", "gauss_fit", "trf", "erf/trf")
#: maps of different sizes: the size-free metrics (pixels) first, the area ratios (fractions of each map) last
MIXED_SIZE_COLUMNS = ("label", "shape", "r_rms", "r20", "r50", "r99", "gauss_sigma_y", "gauss_sigma_x", "gauss_fit",
                      "trf", "erf/trf", "area@20%", "area@50%", "area@99%")
NOT_COMPARABLE = "n/c"
#: the columns whose numbers come from the Gaussian fit: shown as "n/m (value)" where the fit is not meaningful
GAUSS_COLUMNS = ("gauss_sigma_y", "gauss_sigma_x", "gauss_r2")


_TEXT_COLUMNS = ("label", "source", "shape", "model", "reparam", "run_dir", "gauss_fit")


def _fmt(v, column: str = "") -> str:
    if v is None:
        return "n/r" if column.startswith(("area@", "side@")) else "-"  # n/r: threshold not reached
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _cell(row: dict, column: str) -> str:
    text = _fmt(row.get(column), column)
    if column in GAUSS_COLUMNS and row.get("gauss_fit") == NOT_MEANINGFUL and row.get(column) is not None:
        return f"{NOT_MEANINGFUL} ({text})"
    return text


def gauss_note(measured: Sequence[tuple[str, dict]]) -> str:
    """One line naming the runs whose Gaussian fit is not meaningful and why ("" when every fit is fine)."""
    bad = [(label, (m.get("gaussian_fit") or {}).get("reason") or f"R^2 < {GAUSS_MIN_R2:g}")
           for label, m in measured if gaussian_fit_ok(m.get("gaussian_fit")) is False]
    if not bad:
        return ""
    return (f"{NOT_MEANINGFUL} = Gaussian fit not meaningful (a parameter at its bound, a sigma wider than the map, "
            f"or R^2 < {GAUSS_MIN_R2:g}); its sigma is not an ERF size: "
            + "; ".join(f"{label}: {reason}" for label, reason in bad) + ".")


def trf_exceeds_line(names: Sequence[str]) -> str:
    """One line naming the runs (``names``) whose theoretical RF is wider than their image ("" for none)."""
    return (f"erf/trf: the theoretical RF exceeds the image for {', '.join(names)}; there {TRF_EXCEEDS_MAP_NOTE}."
            if names else "")


def trf_note(measured: Sequence[tuple[str, dict]]) -> str:
    """:func:`trf_exceeds_line` for the measured runs ((label, metrics)) flagged ``theoretical_rf_exceeds_map``: their
    erf/trf is bounded by the input size."""
    return trf_exceeds_line([label for label, m in measured if "theoretical_rf_exceeds_map" in (m.get("flags") or [])])


def rf_text(info: dict, unit: str = "") -> str:
    """A layer's theoretical RF as tables and pages show it, from a layer row or a run.json: ``{N}{unit}``,
    ``global ({kernel RF}{unit})`` after a pooling, normalization or attention over the whole map (``rf_global``;
    ``global`` where the kernels have no RF either: after window attention or a resampling),
    ``n/a`` where there is none (after window attention)."""
    if info.get("rf_global"):
        return "global" if info.get("kernel_rf") is None else f"global ({info['kernel_rf']}{unit})"
    return f"{info['theoretical_rf']}{unit}" if info.get("theoretical_rf") else "n/a"


def global_rf_note(runs: Sequence[tuple[str, dict | None]]) -> str:
    """One line naming the runs ((label, run.json or a sweep row)) whose theoretical RF is global (``rf_global``:
    after a pooling or normalization over the whole map), where the tables show no trf and no erf/trf ("" for
    none)."""
    named = [label if info.get("kernel_rf") is None else f"{label} (its kernels alone: {info['kernel_rf']} px)"
             for label, info in runs if (info or {}).get("rf_global")]
    return ("trf -: the theoretical RF is the whole image for " + ", ".join(named) + f": {GLOBAL_RF_REASON}, so "
            "there is no erf/trf.") if named else ""


def square_note(measured: Sequence[tuple[str, dict]]) -> str:
    """One line naming the measured runs ((label, metrics)) with a threshold not reached whose squares are centred off
    the map's middle (on the measured unit, flag ``centre_off_map_middle``), with the largest square that fits the
    image about that centre: an ``n/r`` there is bounded by that square, which can be far smaller than the map (33 px
    at stride 32: unit 1 of a 2 x 2 map, centred on the last pixel, so 1 px) ("" for none)."""
    parts = []
    for label, m in measured:
        flags = m.get("flags") or []
        if "centre_off_map_middle" in flags and any(f.startswith("threshold_") for f in flags):
            (h, w), (cy, cx) = m["shape"], m["center"]
            parts.append(f"{label} (centre ({cy}, {cx}) of {h}x{w}: {2 * min(cy, cx, h - 1 - cy, w - 1 - cx) + 1} px)")
    return ("n/r: the squares are centred on the measured unit's receptive field, and the largest that fits the image "
            "about it is smaller than the map for " + ", ".join(parts) + "; a threshold not reached is bounded by "
            "that square, not by the ERF's size alone.") if parts else ""


def paper_protocol_note(runs: Sequence[tuple[str, dict | None]]) -> str:
    """One sentence naming the measured runs ((label, run.json or None)) whose maps were not made as the paper's
    Table 10 rows were (ReLU of the gradient, at ``forward_features``: the last stage's output), so that their area
    ratios cannot be read against those rows; "" when every run follows it (or says nothing of how it was made)."""
    from erf_lab.erf.receptive_field import DEFAULT_LAYER

    other = []
    for label, info in runs:
        info = info or {}
        why = ([f"aggregate {info['aggregate']}"] if info.get("aggregate") not in (None, "relu") else []) + (
            [f"layer {info['layer']}"] if info.get("layer") not in (None, DEFAULT_LAYER) else [])
        if why:
            other.append(f"{label} ({', '.join(why)})")
    return ("The paper rows are ReLU-aggregated gradients at forward_features (the last stage's output); not "
            "comparable to them: " + "; ".join(other) + ".") if other else ""


def weights_note(runs: Sequence[tuple[str, dict | None]]) -> str:
    """One sentence naming, for each measured run ((label, run.json or None)) whose checkpoint file held more than the
    weights it measured, the part that loaded (:func:`erf_lab.checkpoint.selection_text`: the raw weights beside an
    EMA, an mmseg ``backbone.``); "" when every file loaded whole (or the runs do not say)."""
    from erf_lab.checkpoint import selection_text

    loaded = [(label, text) for label, info in runs if (text := selection_text((info or {}).get("weights_selection")))]
    return ("Weights loaded from the checkpoint files: " + "; ".join(f"{label}: {text}" for label, text in loaded)
            + ".") if loaded else ""


def table_rows(runs: Sequence[tuple[str, dict]], with_paper: bool = True) -> list[dict]:
    """Flat rows (label + :func:`summary`) for measured runs, then the paper's Table 10 references."""
    rows = [{"label": label, "source": "measured", **summary(m)} for label, m in runs]
    if with_paper:
        ref = paper_reference()
        for name, vals in PAPER_TABLE10.items():
            row = {c: None for c in TABLE_COLUMNS}
            row["source"] = "paper"
            row.update({"label": name, "shape": f"{ref['input_size']}x{ref['input_size']}"})
            for t, v in zip(ref["thresholds"], vals):
                row[f"area@{round(t * 100)}%"] = v
            rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """GitHub-flavoured markdown; area columns are percent of the map area, ``n/r`` = not reached."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" if c in _TEXT_COLUMNS else "---:" for c in columns) + "|"
    body = ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def csv_text(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def metrics_text(metrics: dict, label: str = "") -> str:
    """Human-readable metrics with the paper's Table 10 beside the area ratios."""
    lines = [f"ERF {label} ({metrics['shape'][0]}x{metrics['shape'][1]})".replace("  ", " ")]
    ref = paper_reference()
    names = list(PAPER_TABLE10)
    lines.append(f"  high-contribution area ratio on log10(A+1)/max (paper Table 10 at {ref['input_size']}^2, trained"
                 + (f"; {caveat}" if (caveat := paper_caveat()) else "") + "):")
    lines.append(f"    {'t':>5}  {'side':>5}  {'area %':>11} | " + " | ".join(f"{n:>11}" for n in names))
    for i, e in enumerate(metrics["high_contribution"]):
        side = "n/r" if not e["reached"] else str(e["side"])
        area = "not reached" if not e["reached"] else _fmt(100 * e["area_ratio"])  # as the tables: never "0.00"
        known = i < len(ref["thresholds"]) and e["threshold"] == ref["thresholds"][i]
        refs = " | ".join(f"{PAPER_TABLE10[n][i]:>11.1f}" if known else f"{'-':>11}" for n in names)
        lines.append(f"    {100 * e['threshold']:>4.0f}%  {side:>5}  {area:>11} | {refs}")
    d = metrics.get("distribution")
    if d:
        lines.append(f"  std (y, x) = {d['std']['y']:.2f}, {d['std']['x']:.2f} px about the centre of mass "
                     f"({d['center_of_mass'][0]:.1f}, {d['center_of_mass'][1]:.1f}); r_rms = {d['r_rms']:.2f} px, "
                     f"r50 = {d['r50']:.1f} px, r90 = {d['r90']:.1f} px")
    g = metrics.get("gaussian_fit")
    if g and gaussian_fit_ok(g) is False:
        r2 = "undefined" if g.get("r2") is None else f"{g['r2']:.4f}"
        lines.append(f"  Gaussian fit NOT MEANINGFUL ({g.get('reason') or f'R^2 < {GAUSS_MIN_R2:g}'}): "
                     f"sigma (y, x) = {g['sigma_y']:.2f}, {g['sigma_x']:.2f} px, R^2 = {r2} describe a degenerate "
                     "fit, not the ERF's size")
    elif g and g.get("r2") is not None:
        lines.append(f"  Gaussian fit: sigma (y, x) = {g['sigma_y']:.2f}, {g['sigma_x']:.2f} px, R^2 = {g['r2']:.4f}"
                     + ("" if g.get("converged") else " (not converged)"))
    if metrics.get("theoretical_rf"):
        r = metrics["erf_to_trf"]
        lines.append(f"  theoretical RF = {metrics['theoretical_rf']} px; ERF / TRF (2 r_rms / TRF) = "
                     + ("n/a" if r["rms_diameter"] is None else f"{r['rms_diameter']:.4f}"))
    if metrics.get("flags"):
        lines.append("  flags: " + ", ".join(metrics["flags"]))
    return "\n".join(lines)


