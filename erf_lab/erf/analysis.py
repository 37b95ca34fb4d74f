"""``erf-lab analyze`` and ``erf-lab compare``: metrics and figures recomputed from run directories."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from erf_lab.erf.metrics import compute_metrics, paper_caveat, summary
from erf_lab.erf.rundir import METRICS_FILE, RANDOM_MARK, load_run, run_caption, update_run_summary
from erf_lab.erf.metrics import gaussian_fit_ok
from erf_lab.erf.tables import (MIXED_SIZE_COLUMNS, NOT_COMPARABLE, TABLE_COLUMNS, csv_text, gauss_note,
                                global_rf_note, markdown_table, metrics_text, paper_protocol_note, square_note,
                                table_rows, trf_note, weights_note)
from erf_lab.errors import ErfLabError
from erf_lab.io import (command_record, file_identity, hold_folder, prepare_out_dir, read_json_or_none,
                        refuse_other_result, remove_earlier_outputs, write_json, write_text)
from erf_lab.provenance import finished, provenance, source_identity


def _source(run) -> dict:
    """The identity of a loaded run a result is derived from (:func:`~erf_lab.provenance.source_identity`): its
    folder (or the bare .npy), its run.json's record and the digest of the map read."""
    return source_identity(run.run_dir or run.npy, run.run_info, [file_identity(run.npy)])


def analyze(path: str | os.PathLike, *, out: str | os.PathLike | None = None, formats: Sequence[str] = ("png", "pdf"),
            theoretical_rf: int | None = None, argv: Sequence[str] | None = None, display: str | None = None) -> dict:
    """Recompute metrics and figures of a run dir or an ``.npy`` (``erf-lab analyze``).

    Writes next to the npy (``metrics.json`` + ``erf.<fmt>`` for ``erf.npy``; ``<stem>.metrics.json`` +
    ``<stem>.<fmt>`` for another name), or into ``out``; ``analysis.json`` records how. In a run directory its
    run.json's fields that depend on the metrics follow them (:func:`~erf_lab.erf.rundir.update_run_summary`: a
    ``theoretical_rf`` given here replaces the run's; ``files`` ends with run.json where it changed); with ``out``
    elsewhere run.json is left untouched. Returns ``{"metrics", "files", "out_dir", "text", "label"}``.
    """
    from erf_lab.erf.plotting import FORMATS, display_preset, plot_erf

    started = time.monotonic()
    display = display_preset(display)
    run = load_run(path)
    trf = theoretical_rf if theoretical_rf is not None else run.theoretical_rf
    metrics = compute_metrics(run.erf, theoretical_rf=trf, centre=run.centre)
    if out is not None and Path(out).expanduser().resolve() != run.npy.parent.resolve():
        refuse_other_result(out, "analysis")  # its metrics.json and figures would replace that result's
    out_dir = prepare_out_dir(out if out is not None else run.npy.parent)
    with hold_folder(out_dir):  # a run measured there, or another analyze, writes the same metrics and figures
        stem = run.npy.stem
        prefix = "" if stem == "erf" else f"{stem}."
        mpath = out_dir / f"{prefix}{METRICS_FILE}"
        earlier = read_json_or_none(out_dir / f"{prefix}analysis.json")  # its figures not drawn now go after
        random_init = bool((run.run_info or {}).get("random_init") or (run.metrics or {}).get("random_init"))
        if random_init:  # metrics.json, figure and console all say so
            metrics["random_init"] = True
        own = read_json_or_none(out_dir / "run.json")  # a run folder's own figures (run.json's files) stay
        own = [f for f in own["files"] if isinstance(f, str)] if isinstance(own, dict) and \
            isinstance(own.get("files"), list) else []
        # and are drawn again with the new ones: left as they were, erf.pdf showed the earlier display (or map)
        # beside a new erf.png
        formats = tuple(dict.fromkeys([*formats, *(Path(f).suffix[1:] for f in own
                                                   if Path(f).stem == stem and Path(f).suffix[1:] in FORMATS)]))
        write_json(mpath, metrics)
        prov = provenance("analyze", {"source": str(run.npy.resolve()), "out": str(out_dir.resolve()),
                                      "formats": list(formats), "theoretical_rf": trf, "display": display}, argv,
                          derived_from=[_source(run)])
        # in its run folder, run.json's theoretical_rf and metrics_summary follow metrics.json (compare, a sweep's
        # rows and the app read them there); what they were stays in the file (run.json's analyses)
        rewrote = run.run_dir is not None and out_dir.resolve() == run.run_dir.resolve() and \
            update_run_summary(out_dir, metrics, prov)
        title = f"{run.label} {RANDOM_MARK}" if random_init else run.label
        files = [mpath] + plot_erf(run.erf, out_dir / stem, title=title, formats=tuple(formats), display=display,
                                   caption=run_caption(run.run_info))
        text = metrics_text(metrics, title)
        for note in (square_note([(run.label, metrics)]), trf_note([(run.label, metrics)]),
                     global_rf_note([(run.label, run.run_info)]) if trf is None else "",
                     paper_protocol_note([(run.label, run.run_info)])):
            if note:
                text += f"\n  note: {note}"
        record = dict(prov)
        record["source_run"] = run.run_info
        record["metrics_summary"] = summary(metrics)
        record["files"] = [p.name for p in files]
        record.update(finished(started))
        write_json(out_dir / f"{prefix}analysis.json", record)
        keep = record["files"] + own
        remove_earlier_outputs(out_dir, keep, names=earlier.get("files") if isinstance(earlier, dict) else None)
    return {"metrics": metrics, "files": files + [out_dir / f"{prefix}analysis.json"] + (
        [out_dir / "run.json"] if rewrote else []), "out_dir": out_dir,
            "text": text, "label": run.label}


# ------------------------------------------------------------------------------------------------ compare
def compare(paths: Sequence[str | os.PathLike], *, labels: Sequence[str] | None = None,
            out: str | os.PathLike = "compare", formats: Sequence[str] = ("png", "pdf"),
            allow_mixed_sizes: bool = False, normalize: str = "each", argv: Sequence[str] | None = None,
            display: str | None = None) -> dict:
    """Side-by-side heatmaps on one colour scale + a metrics table (markdown + CSV) with the paper rows.

    Maps of different sizes: the paper's area ratios are fractions of each map, so they are marked ``n/c`` (not
    comparable) and the size-free metrics (r_rms, r20 / r50 / r99, Gaussian sigma, in pixels) carry the
    comparison (the Gaussian sigma only where every fit is meaningful: a flagged fit is shown ``n/m (value)``); no
    heatmap figure is drawn unless ``allow_mixed_sizes`` (then each panel at its own size, and each map's area
    ratios on its own area). Writes ``out/compare.<fmt>``, ``compare.md``, ``compare.csv`` and ``compare.json``
    (first with ``"complete": false``, so an interrupted comparison's folder is recognised; complete last).
    """
    from erf_lab.erf.plotting import display_preset, plot_comparison

    display = display_preset(display)
    if not paths:
        raise ErfLabError("give at least one run directory or .npy file")
    if labels is not None and len(labels) != len(paths):
        raise ErfLabError(f"--labels has {len(labels)} names for {len(paths)} runs")
    runs = [load_run(p) for p in paths]
    if labels is not None:
        for r, lab in zip(runs, labels):
            r.label = lab
    table = comparison_table(runs, allow_mixed_sizes=allow_mixed_sizes)
    rows, md, csv_s, mixed = table["rows"], table["markdown"], table["csv"], table["mixed"]
    refuse_other_result(out, "compare")  # e.g. --out one of the runs compared: its figures would be replaced
    out_dir = prepare_out_dir(out)
    with hold_folder(out_dir):  # another comparison into it meanwhile would mix its figures and tables in
        record = provenance("compare", {"runs": [str(r.npy.resolve()) for r in runs], "labels": table["names"],
                                        "formats": list(formats), "allow_mixed_sizes": allow_mixed_sizes,
                                        "normalize": normalize, "display": display}, argv,
                            derived_from=[_source(r) for r in runs])
        earlier = read_json_or_none(out_dir / "compare.json")  # its files: those not written now go afterwards
        # the folder is a comparison from now on (every input was checked: an error now is a file that cannot be
        # written)
        with command_record(out_dir / "compare.json", record, undo_on_error=False) as save:
            figs = [] if mixed and not allow_mixed_sizes else plot_comparison(
                [r.erf for r in runs], [r.label for r in runs], out_dir / "compare", formats=tuple(formats),
                normalize=normalize, display=display)
            write_text(out_dir / "compare.md", md + "\n\n" + table["note"] + "\n")
            write_text(out_dir / "compare.csv", csv_s)
            save(complete=True, rows=rows, mixed_sizes=mixed,
                 files=[p.name for p in figs] + ["compare.md", "compare.csv"])
        remove_earlier_outputs(out_dir, [p.name for p in figs] + ["compare.md", "compare.csv", "compare.json"],
                               names=earlier.get("files") if isinstance(earlier, dict) else None)
    return {"rows": rows, "markdown": md, "csv": csv_s, "note": table["note"], "files": figs + [
        out_dir / "compare.md", out_dir / "compare.csv", out_dir / "compare.json"], "out_dir": out_dir,
        "metrics": dict(table["measured"])}


def comparison_table(runs: Sequence, allow_mixed_sizes: bool = False) -> dict:
    """The table of ``erf-lab compare`` for loaded runs (:func:`erf_lab.erf.rundir.load_run`): metrics recomputed
    from each map, equal labels numbered and untrained runs marked :data:`RANDOM_MARK` (``runs``' labels are
    updated in place, as the figure shows them), the paper rows unless the maps differ in size, whose area ratios
    are then ``n/c`` unless ``allow_mixed_sizes``. Returns ``{"rows", "columns", "markdown", "csv", "note",
    "names", "random", "mixed", "measured"}``."""
    names = [r.label for r in runs]
    if len(set(names)) != len(names):  # disambiguate equal labels (e.g. two dirs both named after the model) by
        # the run's folder (a bare map: its file name), which says which is which; numbered where those repeat too
        where = [r.npy.parent.name if r.npy.name == "erf.npy" else r.npy.stem for r in runs]
        names = [f"{n} ({w})" for n, w in zip(names, where)]
        if len(set(names)) != len(names):
            names = [f"{n} ({i + 1})" for i, n in enumerate(r.label for r in runs)]
        for r, n in zip(runs, names):
            r.label = n
    random = [bool((r.run_info or {}).get("random_init")) for r in runs]
    for r, rand in zip(runs, random):  # every table row and heatmap title of an untrained model says so
        if rand:
            r.label = f"{r.label} {RANDOM_MARK}"
    mixed = len({r.erf.shape for r in runs}) > 1
    measured = [(r.label, compute_metrics(r.erf, theoretical_rf=r.theoretical_rf, centre=r.centre)) for r in runs]
    rows = table_rows(measured, with_paper=not mixed)
    columns = MIXED_SIZE_COLUMNS if mixed else TABLE_COLUMNS
    if mixed and not allow_mixed_sizes:
        for row in rows:
            row.update({c: NOT_COMPARABLE for c in columns if c.startswith("area@")})
    for row, rand in zip(rows, random):  # the measured rows come first
        row["random_init"] = rand
    note = ("Area columns: % of the map area inside the smallest centred square holding > t of log10(A+1)/max; "
            "n/r = not reached, - = not available. Paper rows: Ding et al., CVPR 2022, Table 10 (1024x1024, trained weights)"
            + (f"; {caveat}." if (caveat := paper_caveat()) else "."))
    gauss_bad = [label for label, m in measured if gaussian_fit_ok(m.get("gaussian_fit")) is False]
    if mixed:
        note = ("The maps differ in size (" + ", ".join(f"{r.label}: {r.erf.shape[0]}x{r.erf.shape[1]}" for r in runs)
                + "): area ratios are fractions of each image and change with the image size even when the ERF in "
                "pixels does not" + (", so they are marked n/c (not comparable) and no heatmap figure is drawn "
                "(--allow-mixed-sizes draws each map at its own size)" if not allow_mixed_sizes else "")
                + ". Compare the size-free columns: r_rms and r20/r50/r99 (radius holding that share of the mass)"
                + (", all in pixels; not the Gaussian sigma, whose fit is not meaningful for "
                   + ", ".join(gauss_bad) if gauss_bad else " and the Gaussian sigma, all in pixels") + ".")
    if gauss := gauss_note(measured):
        note += " " + gauss
    for line in (square_note(measured) if not mixed or allow_mixed_sizes else "", trf_note(measured),
                 global_rf_note([(label, r.run_info) for (label, m), r in zip(measured, runs)
                                 if m.get("theoretical_rf") is None])):
        if line:
            note += " " + line
    note += protocol_note(runs)
    if not mixed and (paper := paper_protocol_note([(r.label, r.run_info) for r in runs])):
        note += " " + paper
    if weights := weights_note([(r.label, r.run_info) for r in runs]):
        note += " " + weights
    if empty := [label for label, m in measured if "empty_map" in (m.get("flags") or [])]:
        note += (" Empty map (all zero: no gradient reached the input, so its n/r and - are no ERF size): "
                 + ", ".join(empty) + ".")
    if any(random):
        note += f" {RANDOM_MARK}: randomly initialised weights (never trained), not comparable to trained models."
    return {"rows": rows, "columns": columns, "markdown": markdown_table(rows, columns), "csv": csv_text(rows, columns),
            "note": note, "names": names, "random": random, "mixed": mixed, "measured": measured}


def protocol_note(runs: Sequence) -> str:
    """" Not like with like: ..." when the runs' maps were made with different gradient aggregations (relu / abs
    give different maps of one network) or on different images (one SHA-256 over the images' contents), else ""."""
    parts = []
    agg = [(r.label, (r.run_info or {}).get("aggregate")) for r in runs]
    if len({a for _, a in agg if a is not None}) > 1:
        parts.append("the gradient aggregation differs (" + ", ".join(f"{lab}: {a}" for lab, a in agg if a) + "), "
                     "which changes the map of one and the same network")
    shas = [((r.run_info or {}).get("config") or {}).get("images_sha256") for r in runs]
    if len({s for s in shas if s}) > 1:
        parts.append("the maps were measured on different images")
    return (" Not like with like: " + "; ".join(parts) + ".") if parts else ""
