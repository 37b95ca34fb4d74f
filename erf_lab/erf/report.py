"""ERF result directories and the analysis built on them (``erf-lab analyze`` / ``erf-lab compare``).

A run directory holds ``erf.npy`` (mean contribution map, float64 H x W), ``metrics.json``
(:func:`erf_lab.erf.metrics.compute_metrics`), ``erf.png`` / ``erf.pdf`` (paper-style heatmap) and ``run.json``
(how it was made + a metrics summary). Every file is written atomically and run.json last, so a directory that
has run.json is complete.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.erf.metrics import PAPER_TABLE10, compute_metrics, paper_reference, summary, validate_erf
from erf_lab.errors import ErfLabError
from erf_lab.io import atomic_path, save_npy, write_json

ERF_FILE, METRICS_FILE, RUN_FILE = "erf.npy", "metrics.json", "run.json"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of the packages that shape the numbers and figures."""
    import matplotlib
    import scipy
    import seaborn

    import erf_lab

    out = {"erf-lab": erf_lab.__version__, "python": sys.version.split()[0], "numpy": np.__version__,
           "scipy": scipy.__version__, "matplotlib": matplotlib.__version__, "seaborn": seaborn.__version__}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def provenance(command: str, params: dict, argv: Sequence[str] | None = None) -> dict:
    """The record every output directory carries: command line, parameters, versions, time."""
    return {"command": command, "argv": list(argv) if argv is not None else list(sys.argv), "cwd": os.getcwd(),
            "parameters": params, "versions": versions(), "time": now()}


def write_run_dir(out_dir: str | os.PathLike, erf, run_info: dict, theoretical_rf: int | None = None,
                  formats: Sequence[str] = ("png", "pdf")) -> dict:
    """Write a complete run directory; returns the metrics.

    Order: erf.npy, metrics.json, erf.<formats>, then run.json (= ``run_info`` + ``metrics_summary`` +
    ``files``) last, so its presence marks the directory complete.
    """
    from erf_lab.erf.plotting import plot_erf

    a = validate_erf(erf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / ERF_FILE, a)
    metrics = compute_metrics(a, theoretical_rf=theoretical_rf)
    write_json(out / METRICS_FILE, metrics)
    title = run_info.get("title") or run_info.get("label") or run_info.get("model")
    figs = plot_erf(a, out / "erf", title=title, formats=tuple(formats))
    info = dict(run_info)
    if theoretical_rf is not None:
        info.setdefault("theoretical_rf", int(theoretical_rf))
    info["metrics_summary"] = summary(metrics)
    info["files"] = [ERF_FILE, METRICS_FILE] + [p.name for p in figs]
    info.setdefault("written", now())
    write_json(out / RUN_FILE, info)
    return metrics


@dataclass
class Run:
    """A loaded ERF: the map, where it came from, and run.json / metrics.json when present."""

    erf: np.ndarray
    npy: Path
    run_dir: Path | None
    run_info: dict | None = None
    metrics: dict | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def theoretical_rf(self) -> int | None:
        for src in (self.run_info or {}, self.metrics or {}):
            if src.get("theoretical_rf") is not None:
                return int(src["theoretical_rf"])
        return None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ErfLabError(f"cannot read {path}: corrupt JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise ErfLabError(f"cannot read {path}: expected a JSON object")
    return obj


def load_erf_npy(path: str | os.PathLike) -> np.ndarray:
    """np.load with allow_pickle=False; ErfLabError for missing, corrupt or non-2-D files."""
    path = Path(path)
    if not path.is_file():
        raise ErfLabError(f"ERF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ErfLabError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if magic[:2] == b"PK":
        raise ErfLabError(f"{path} is an .npz archive; expected a single 2-D array saved with np.save")
    if magic != b"\x93NUMPY":
        raise ErfLabError(f"cannot read {path}: corrupt or not a .npy file (no NumPy header)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else "unreadable"
        if "pickle" in msg.lower():
            raise ErfLabError(f"refusing to load {path}: it holds Python objects (pickle), not a numeric map") from None
        raise ErfLabError(f"cannot read {path}: corrupt or not a .npy file ({msg})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ErfLabError(f"cannot read {path}: corrupt or not a .npy file ({type(e).__name__})") from None
    try:
        return validate_erf(arr)
    except ErfLabError as e:
        raise ErfLabError(f"{path}: {e}") from None


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory (needs erf.npy; run.json / metrics.json optional) or a bare ``.npy`` file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ErfLabError(f"no such run directory or ERF file: {p}")
    if p.is_dir():
        npy = p / ERF_FILE
        if not npy.is_file():
            hint = " (incomplete run? it has no run.json either)" if not (p / RUN_FILE).exists() else ""
            raise ErfLabError(f"{p} is not a run directory: no {ERF_FILE}{hint}")
        run_dir = p
    else:
        if p.suffix != ".npy":
            raise ErfLabError(f"expected a run directory or a .npy file, got {p}")
        npy, run_dir = p, (p.parent if p.name == ERF_FILE else None)
    erf = load_erf_npy(npy)
    run_info = metrics = None
    if run_dir is not None:
        if (run_dir / RUN_FILE).is_file():
            run_info = _read_json(run_dir / RUN_FILE)
        if (run_dir / METRICS_FILE).is_file():
            metrics = _read_json(run_dir / METRICS_FILE)
    label = (run_info or {}).get("label") or (run_info or {}).get("model") or (
        run_dir.name if run_dir is not None else npy.stem)
    return Run(erf=erf, npy=npy, run_dir=run_dir, run_info=run_info, metrics=metrics, label=str(label))


# ------------------------------------------------------------------------------------------------- tables
TABLE_COLUMNS = ("label", "source", "shape", "area@20%", "area@30%", "area@50%", "area@99%", "r_rms", "std_y", "std_x",
                 "gauss_sigma_y", "gauss_sigma_x", "gauss_r2", "trf", "erf/trf")


_TEXT_COLUMNS = ("label", "source", "shape", "model", "reparam", "run_dir")


def _fmt(v, column: str = "") -> str:
    if v is None:
        return "n/r" if column.startswith(("area@", "side@")) else "-"  # n/r: threshold not reached
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


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
    body = ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def csv_text(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def metrics_text(metrics: dict, label: str = "") -> str:
    """Human-readable metrics with the paper's Table 10 beside the area ratios."""
    lines = [f"ERF {label} ({metrics['shape'][0]}x{metrics['shape'][1]})".replace("  ", " ")]
    ref = paper_reference()
    names = list(PAPER_TABLE10)
    lines.append(f"  high-contribution area ratio on log10(A+1)/max (paper Table 10 at {ref['input_size']}^2, trained):")
    lines.append(f"    {'t':>5}  {'side':>5}  {'area %':>11} | " + " | ".join(f"{n:>11}" for n in names))
    for i, e in enumerate(metrics["high_contribution"]):
        side = "n/r" if not e["reached"] else str(e["side"])
        area = "not reached" if not e["reached"] else f"{100 * e['area_ratio']:.2f}"
        known = i < len(ref["thresholds"]) and e["threshold"] == ref["thresholds"][i]
        refs = " | ".join(f"{PAPER_TABLE10[n][i]:>11.1f}" if known else f"{'-':>11}" for n in names)
        lines.append(f"    {100 * e['threshold']:>4.0f}%  {side:>5}  {area:>11} | {refs}")
    d = metrics.get("distribution")
    if d:
        lines.append(f"  std (y, x) = {d['std']['y']:.2f}, {d['std']['x']:.2f} px about the centre of mass "
                     f"({d['center_of_mass'][0]:.1f}, {d['center_of_mass'][1]:.1f}); r_rms = {d['r_rms']:.2f} px, "
                     f"r50 = {d['r50']:.1f} px, r90 = {d['r90']:.1f} px")
    g = metrics.get("gaussian_fit")
    if g and g.get("r2") is not None:
        lines.append(f"  Gaussian fit: sigma (y, x) = {g['sigma_y']:.2f}, {g['sigma_x']:.2f} px, R^2 = {g['r2']:.4f}"
                     + ("" if g.get("converged") else " (not converged)"))
    if metrics.get("theoretical_rf"):
        r = metrics["erf_to_trf"]
        lines.append(f"  theoretical RF = {metrics['theoretical_rf']} px; ERF / TRF (2 r_rms / TRF) = "
                     + ("n/a" if r["rms_diameter"] is None else f"{r['rms_diameter']:.4f}"))
    if metrics.get("flags"):
        lines.append("  flags: " + ", ".join(metrics["flags"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ analyze
def analyze(path: str | os.PathLike, *, out: str | os.PathLike | None = None, formats: Sequence[str] = ("png", "pdf"),
            theoretical_rf: int | None = None, argv: Sequence[str] | None = None) -> dict:
    """Recompute metrics and figures of a run dir or an ``.npy`` (``erf-lab analyze``).

    Writes next to the npy (``metrics.json`` + ``erf.<fmt>`` for ``erf.npy``; ``<stem>.metrics.json`` +
    ``<stem>.<fmt>`` for another name), or into ``out``; ``analysis.json`` records how. run.json of a
    run directory is left untouched. Returns ``{"metrics", "files", "out_dir", "text", "label"}``.
    """
    from erf_lab.erf.plotting import plot_erf

    run = load_run(path)
    trf = theoretical_rf if theoretical_rf is not None else run.theoretical_rf
    metrics = compute_metrics(run.erf, theoretical_rf=trf)
    out_dir = Path(out) if out is not None else run.npy.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = run.npy.stem
    prefix = "" if stem == "erf" else f"{stem}."
    mpath = out_dir / f"{prefix}{METRICS_FILE}"
    write_json(mpath, metrics)
    files = [mpath] + plot_erf(run.erf, out_dir / stem, title=run.label, formats=tuple(formats))
    text = metrics_text(metrics, run.label)
    record = provenance("analyze", {"source": str(run.npy.resolve()), "out": str(out_dir.resolve()),
                                    "formats": list(formats), "theoretical_rf": trf}, argv)
    record["source_run"] = run.run_info
    record["metrics_summary"] = summary(metrics)
    record["files"] = [p.name for p in files]
    write_json(out_dir / f"{prefix}analysis.json", record)
    return {"metrics": metrics, "files": files + [out_dir / f"{prefix}analysis.json"], "out_dir": out_dir,
            "text": text, "label": run.label}


# ------------------------------------------------------------------------------------------------ compare
def compare(paths: Sequence[str | os.PathLike], *, labels: Sequence[str] | None = None,
            out: str | os.PathLike = "compare", formats: Sequence[str] = ("png", "pdf"),
            allow_mixed_sizes: bool = False, normalize: str = "each", argv: Sequence[str] | None = None) -> dict:
    """Side-by-side heatmaps on one colour scale + a metrics table (markdown + CSV) with the paper rows.

    Maps of different sizes are refused (area ratios are relative to the map, so they would not be
    comparable) unless ``allow_mixed_sizes``: then each panel is drawn at its own size and each map's
    metrics are computed on its own area (the table's ``shape`` column shows it).
    Writes ``out/compare.<fmt>``, ``compare.md``, ``compare.csv``, ``compare.json`` (last).
    """
    from erf_lab.erf.plotting import plot_comparison

    if not paths:
        raise ErfLabError("give at least one run directory or .npy file")
    if labels is not None and len(labels) != len(paths):
        raise ErfLabError(f"--labels has {len(labels)} names for {len(paths)} runs")
    runs = [load_run(p) for p in paths]
    if labels is not None:
        for r, lab in zip(runs, labels):
            r.label = lab
    names = [r.label for r in runs]
    if len(set(names)) != len(names):  # disambiguate equal labels (e.g. two dirs both named after the model)
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
        for r, n in zip(runs, names):
            r.label = n
    shapes = {r.erf.shape for r in runs}
    if len(shapes) > 1 and not allow_mixed_sizes:
        desc = ", ".join(f"{r.label}: {r.erf.shape[0]}x{r.erf.shape[1]}" for r in runs)
        raise ErfLabError(f"ERF maps differ in size ({desc}); area ratios are relative to the map size and not "
                          "comparable - use the same --input-size, or pass --allow-mixed-sizes")
    measured = [(r.label, compute_metrics(r.erf, theoretical_rf=r.theoretical_rf)) for r in runs]
    rows = table_rows(measured)
    md = markdown_table(rows)
    csv_s = csv_text(rows)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = plot_comparison([r.erf for r in runs], [r.label for r in runs], out_dir / "compare",
                           formats=tuple(formats), normalize=normalize)
    note = ("Area columns: % of the map area inside the smallest centred square holding > t of log10(A+1)/max; "
            "n/r = not reached, - = not available. Paper rows: Ding et al., CVPR 2022, Table 10 (1024x1024, trained weights).")
    write_text(out_dir / "compare.md", md + "\n\n" + note + "\n")
    write_text(out_dir / "compare.csv", csv_s)
    record = provenance("compare", {"runs": [str(r.npy.resolve()) for r in runs], "labels": names,
                                    "formats": list(formats), "allow_mixed_sizes": allow_mixed_sizes,
                                    "normalize": normalize}, argv)
    record["rows"] = rows
    record["files"] = [p.name for p in figs] + ["compare.md", "compare.csv"]
    write_json(out_dir / "compare.json", record)
    return {"rows": rows, "markdown": md, "csv": csv_s, "note": note, "files": figs + [
        out_dir / "compare.md", out_dir / "compare.csv", out_dir / "compare.json"], "out_dir": out_dir,
        "metrics": dict(measured)}
