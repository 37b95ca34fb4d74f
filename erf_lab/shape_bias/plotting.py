"""Model-vs-human style shape-bias figure (Geirhos et al., ICLR 2019, Fig. 4; NeurIPS 2021 plotting code):
one row per category, markers at the fraction of 'shape' decisions (1 on the left, 0 on the right; texture on
the top axis), the mean of each observer as a vertical line, humans as reference."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.categories import CATEGORIES
from erf_lab.shape_bias.download import CREDIT

_HUMAN_STYLE = {"color": "#d62728", "marker": "D", "label": "humans"}
_MARKERS = ["o", "s", "^", "v", "P", "X", "<", ">", "h", "*"]
_CREDIT_PT = 6.0  # the stimuli's and human data's credit line: 5.5 pt was under a journal's 6 pt floor


def plot_shape_bias(summaries: Sequence[dict], stem, human_csv_paths: Sequence[os.PathLike] | None = None,
                    title: str | None = None, note: str = ""):
    """Draw and save ``stem.png`` / ``stem.pdf``; ``summaries`` are ``summary.json`` dicts; ``note``: what makes them
    not like with like (:func:`settings_note`), printed under the plot. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from erf_lab.io import save_figure

    observers = []
    if human_csv_paths:
        from erf_lab.shape_bias.analysis import shape_bias_from_csv

        h = shape_bias_from_csv(list(human_csv_paths), only_humans=True)
        observers.append((f"humans (n={len(h['per_subject'])})", h, _HUMAN_STYLE["color"], _HUMAN_STYLE["marker"]))
    cmap = matplotlib.colormaps["tab10"]
    palette = [cmap(k) for k in (0, 1, 2, 4, 5, 6, 8, 9, 7)]  # tab10 without its red (kept for humans)
    for i, s in enumerate(summaries):
        observers.append((_run_name(s, i), s, palette[i % len(palette)],
                          _MARKERS[i % len(_MARKERS)]))

    fig, ax = plt.subplots(figsize=(5.2, 0.28 * len(CATEGORIES) + 1.9), layout="constrained")
    ys = np.arange(len(CATEGORIES))
    for name, s, color, marker in observers:
        xs = [((s["per_category"].get(c) or {}).get("shape_bias")) for c in CATEGORIES]
        xs = np.array([np.nan if x is None else x for x in xs], dtype=float)
        ax.scatter(xs, ys, color=color, marker=marker, s=34, edgecolor=(0.3, 0.3, 0.3, 0.4), linewidth=0.4,
                   zorder=3, label=f"{name}: {s['shape_bias']:.3f}{_evidence(s)}" if s.get("shape_bias") is not None
                   else name)
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
    _footer(fig, note)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def _footer(fig, note: str = "") -> None:
    """The data credit under a figure, after the comparison's note on what is not like with like (if any)."""
    fig.text(0.5, -0.01, (f"Not like with like: {note}\n" if note else "") + CREDIT, ha="center", va="top",
             fontsize=_CREDIT_PT, wrap=True, color="0.2" if note else "0.35")


def _evidence(s: dict) -> str:
    """How much a shape bias rests on, for its legend entry: the number of shape-or-texture decisions and the 95 %
    Wilson interval (a bias from 6 decisions spans 0.30-0.90: the figure alone showed it as exact)."""
    hits = [s.get("shape_hits"), s.get("texture_hits")]
    if not all(isinstance(h, int) and not isinstance(h, bool) for h in hits):
        return ""
    ci = s.get("shape_bias_ci95")
    ci = f", 95% CI {ci[0]:.2f}-{ci[1]:.2f}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
    return f" ({sum(hits)} decisions{ci})"


def plot_error_consistency(summaries: Sequence[dict], stem, title: str | None = None, note: str = ""):
    """Error consistency (Cohen's kappa; Geirhos, Meding & Wichmann, NeurIPS 2020) per dataset: each model's
    kappa with each human subject (small markers) and its mean (large), over a grey band spanning the
    human-human pairs (line: their mean); ``note`` as in :func:`plot_shape_bias`. Saves ``stem.png`` /
    ``stem.pdf``; returns the paths ([] and no figure when no summary was compared with humans)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from erf_lab.io import save_figure
    from erf_lab.shape_bias.consistency import MVH_DATASETS

    datasets = [d for d in MVH_DATASETS.values()
                if any(((s.get("consistency") or {}).get(d) or {}).get("vs_humans") for s in summaries)]
    if not datasets:
        return []
    ncols = 2 if len(datasets) > 1 else 1  # of the legend
    fig, ax = plt.subplots(figsize=(1.6 * len(datasets) + 1.4, 3.6 + 0.14 * math.ceil((len(summaries) + 2) / ncols)),
                           layout="constrained")
    cmap = matplotlib.colormaps["tab10"]
    palette = [cmap(k) for k in (0, 1, 2, 4, 5, 6, 8, 9, 7)]
    width = 0.7
    named = set()  # a model is named at its first marker (a run measured on edges alone has none on cue-conflict)
    for x, ds in enumerate(datasets):
        hh = next(((s["consistency"].get(ds) or {}).get("human_vs_human") for s in summaries
                   if (s.get("consistency") or {}).get(ds, {}).get("human_vs_human")), None)
        if hh:
            k = hh["error_consistency"]
            ax.fill_between([x - width / 2, x + width / 2], k["min"], k["max"], color="0.88", zorder=1,
                            label="human-human pairs (range)" if x == 0 else None)
            ax.plot([x - width / 2, x + width / 2], [k["mean"]] * 2, color=_HUMAN_STYLE["color"], lw=1.5, zorder=2,
                    label="human-human mean" if x == 0 else None)
        n = len(summaries)
        for i, s in enumerate(summaries):
            vs = ((s.get("consistency") or {}).get(ds) or {}).get("vs_humans")
            if not vs:
                continue
            xi = x + (i - (n - 1) / 2) * width / max(n, 2)
            per = [v["error_consistency"] for v in vs["per_subject"].values()]
            jitter = np.linspace(-0.04, 0.04, len(per))
            color = palette[i % len(palette)]
            ax.scatter(xi + jitter, per, s=10, color=color, alpha=0.55, zorder=3, linewidth=0)
            ax.scatter([xi], [vs["error_consistency"]["mean"]], s=60, color=color, marker=_MARKERS[i % len(_MARKERS)],
                       edgecolor="0.2", linewidth=0.5, zorder=4,
                       label=None if i in named else _run_name(s, i))
            named.add(i)
    ax.axhline(0, color="0.5", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_xlim(-0.6, len(datasets) - 0.4)
    ax.set_ylim(-0.2, 1.03)
    ax.set_ylabel("error consistency (kappa)")
    ax.spines[["right", "top"]].set_visible(False)
    ax.set_title(title or "Error consistency with each human subject", fontsize=10)
    # under the axes: at their right, six model names made the figure 7.5 in wide, half of it legend
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False, fontsize=7, ncols=ncols,
              title="large marker: mean over subjects; small: each subject", title_fontsize=7)
    _footer(fig, note)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def _run_name(s: dict, i: int) -> str:
    """The name of run ``i`` in a figure's legend: its label, else its model, else ``model <i>``."""
    return s.get("label") or s.get("model") or f"model {i}"


def _runs_inside(folder) -> dict[Path, str]:
    """The shape-bias results in the sub-folders of ``folder`` (sorted) and their kind (:func:`erf_lab.io.result_kind`):
    a multi-model ``--from-csv`` output holds one per model and no summary.json of its own."""
    from erf_lab.io import result_kind

    kinds = {p.parent: result_kind(p.parent) for p in sorted(Path(folder).glob("*/summary.json"))}
    return {d: k for d, k in kinds.items() if k in ("shape-bias", "shape-bias --from-csv")}


def run_folders(run_dirs: Sequence[os.PathLike]) -> list:
    """``--compare``'s run folders: each as given, but the top folder of a ``--from-csv`` output of several models
    (no summary.json of its own, nothing but ``--from-csv`` results in its sub-folders) as its per-model folders."""
    out = []
    for d in run_dirs:
        inside = {} if (Path(d) / "summary.json").exists() else _runs_inside(d)
        from_csv = bool(inside) and all(k == "shape-bias --from-csv" for k in inside.values())
        out += list(inside) if from_csv else [d]
    return out


def load_run(run_dir) -> dict:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        inside = _runs_inside(run_dir) if Path(run_dir).is_dir() else []
        raise ErfLabError(f"{run_dir}: no summary.json (not an 'erf-lab shape-bias' output folder)" + (
            f"; its sub-folders {', '.join(d.name for d in inside)} are shape-bias results: pass them"
            if inside else ""))
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ErfLabError(f"{p}: not UTF-8 text (not an 'erf-lab shape-bias' summary)") from None
    except json.JSONDecodeError as e:
        raise ErfLabError(f"{p}: unreadable JSON ({e.msg})") from None
    if not (isinstance(summary, dict) and "shape_bias" in summary):
        raise ErfLabError(f"{p}: not an 'erf-lab shape-bias' summary (no shape_bias)")
    if (bad := _impossible_value(summary)) is not None:
        raise ErfLabError(f"{p}: {bad}: not a value an 'erf-lab shape-bias' run writes (a damaged or edited file)")
    return summary


#: summary fields that are fractions (shape bias, hit rates, accuracies): None or a number in [0, 1]
_FRACTIONS = ("shape_bias", "fraction_shape_hits", "fraction_texture_hits", "fraction_shape_or_texture_hits",
              "fraction_correct_shape", "fraction_correct_texture", "chance_shape_or_texture", "edge_accuracy",
              "silhouette_accuracy", "cue_conflict_accuracy", "cue_conflict_accuracy_nonconflict")
#: summary fields that are counts: None or a non-negative integer
_COUNTS = ("n_conflict", "n_trials", "shape_hits", "texture_hits", "n_skipped")


def _impossible_value(s: dict) -> str | None:
    """The first field of a shape-bias summary whose value cannot mean what it names (a fraction outside [0, 1] or
    not finite, a negative or fractional count, a table that is no table), as ``"name is value"``; None if none."""
    def fraction(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0)

    def count(v):
        return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)

    checks = [(k, s.get(k), fraction) for k in _FRACTIONS] + [(k, s.get(k), count) for k in _COUNTS]
    ci = s.get("shape_bias_ci95")
    checks.append(("shape_bias_ci95", ci, lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                                                   and all(fraction(x) and x is not None for x in v)
                                                                   and v[0] <= v[1])))
    for table in ("per_category", "human_reference", "consistency"):
        checks.append((table, s.get(table), lambda v: v is None or isinstance(v, dict)))
    checks.append(("warnings", s.get("warnings"), lambda v: v is None or isinstance(v, list)))
    # the figures' and tables' names (_run_name): text or absent
    checks += [(k, s.get(k), lambda v: v is None or isinstance(v, str)) for k in ("model", "label")]
    checks.append(("random_weights", s.get("random_weights"), lambda v: v is None or isinstance(v, bool)))
    human = s.get("human_reference") if isinstance(s.get("human_reference"), dict) else {}
    checks.append(("human_reference.shape_bias", human.get("shape_bias"), fraction))
    for name, group in (("per_category", s.get("per_category")), ("human_reference.per_category",
                                                                   human.get("per_category"))):
        for cat, row in (group.items() if isinstance(group, dict) else ()):
            if not isinstance(row, dict):
                checks.append((f"{name}.{cat}", row, lambda v: False))
                continue
            checks.append((f"{name}.{cat}.shape_bias", row.get("shape_bias"), fraction))
            checks += [(f"{name}.{cat}.{k}", row.get(k), count) for k in ("n", "shape_hits", "texture_hits")]
    for name, value, ok in checks:
        if not ok(value):
            return f"{name} is {json.dumps(value, default=str)[:60]}"
    return None


def _correct_fractions(s: dict) -> dict:
    """model-vs-human's fraction-correct-shape / -texture of a summary; derived for summaries written before they
    were recorded: the hits over the decoded cue-conflict images (``n_images`` less the undecodable ones)."""
    if "fraction_correct_shape" in s:
        return {k: s[k] for k in ("fraction_correct_shape", "fraction_correct_texture")}
    try:
        trials = s["n_images"]["cue-conflict"] - sum(u.get("set") == "cue-conflict"
                                                     for u in s.get("undecodable_files", []))
        return {"fraction_correct_shape": s["shape_hits"] / trials, "fraction_correct_texture":
                s["texture_hits"] / trials}
    except (KeyError, TypeError, ZeroDivisionError):
        return {"fraction_correct_shape": None, "fraction_correct_texture": None}


def _human_accuracies(human_csv_paths) -> dict:
    """Mean 16-class accuracy over the human subjects of each data set whose ``human-<dataset>/`` folder lies beside
    the folder of the human cue-conflict CSVs (model-vs-human's human accuracy: the mean over subjects)."""
    from erf_lab.shape_bias.consistency import accuracy, human_trials

    folders = {Path(p).parent for p in human_csv_paths}
    if len(folders) != 1 or next(iter(folders)).name != "human-cue-conflict":
        return {}
    out = {}
    for ds, subjects in human_trials(next(iter(folders)).parent).items():
        accs = [a for a in (accuracy(t) for t in subjects.values()) if a is not None]
        out[ds] = sum(accs) / len(accs) if accs else None
    return out


def compare_runs(run_dirs: Sequence[os.PathLike], out, human_csv_paths=None) -> dict:
    """Several runs in one figure and one table (``comparison.md`` + ``comparison.csv``); a multi-model
    ``--from-csv`` output's top folder stands for its models (:func:`run_folders`). Returns the rows, the table,
    the note on what is not like with like and the run folders compared."""
    from erf_lab.io import (atomic_path, hold_folder, prepare_out_dir, refuse_other_result, remove_earlier_outputs,
                            write_json)

    started = time.monotonic()
    if not run_dirs:
        raise ErfLabError("--compare needs at least one run folder")
    run_dirs = run_folders(run_dirs)  # a multi-model --from-csv output: its models
    summaries = [load_run(d) for d in run_dirs]
    for d, s in zip(run_dirs, summaries):
        if not isinstance(s.get("per_category"), dict):
            raise ErfLabError(f"{d}: no per-category shape bias in its summary.json (a cue-world probe has per_class "
                              "instead); --compare draws model-vs-human cue-conflict runs")
    refuse_other_result(out, "shape-bias --compare")
    cols = ["model", "shape_bias", "fraction_correct_shape", "fraction_correct_texture", "edge_accuracy",
            "silhouette_accuracy", "n_conflict", "run"]
    rows = []
    if human_csv_paths:  # read before --out is made: a bad human CSV leaves nothing behind
        from erf_lab.shape_bias.analysis import shape_bias_from_csv

        h = shape_bias_from_csv(list(human_csv_paths), only_humans=True)
        acc = _human_accuracies(human_csv_paths)
        rows.append({"model": "humans", **{c: h[c] for c in cols[1:4]}, "edge_accuracy": acc.get("edge"),
                     "silhouette_accuracy": acc.get("silhouette"), "n_conflict": h["n_conflict"],
                     "run": "human-cue-conflict"})
    out = prepare_out_dir(out)
    with hold_folder(out):  # another comparison into it meanwhile would mix its tables and figures in
        labels = [s.get("label", s.get("model")) for s in summaries]
        for i, lab in enumerate(labels):  # disambiguate equal labels by folder name
            if labels.count(lab) > 1:
                summaries[i]["label"] = f"{lab} [{Path(run_dirs[i]).name}]"
        for s, d in zip(summaries, run_dirs):
            rows.append({"model": s.get("label", s.get("model")), **{c: s.get(c) for c in cols[1:-1]},
                         **_correct_fractions(s), "run": str(d)})
        with atomic_path(out / "comparison.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

        def fmt(v):
            return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

        md = ["| " + " | ".join(cols[:-1]) + " |", "|" + "---|" * (len(cols) - 1)]
        md += ["| " + " | ".join(fmt(r[c]) for c in cols[:-1]) + " |" for r in rows]
        note = settings_note(summaries)
        md += ([""] + [f"**Not like with like:** {note}"] if note else []) + ["", f"_{CREDIT}_"]
        with atomic_path(out / "comparison.md") as tmp:
            tmp.write_text("\n".join(md) + "\n")
        figs = plot_shape_bias(summaries, out / "shape_bias_comparison", human_csv_paths=human_csv_paths, note=note)
        figs += plot_error_consistency(summaries, out / "error_consistency_comparison", note=note)
        import sys

        outputs = ["comparison.csv", "comparison.md", *(Path(p).name for p in figs)]
        remove_earlier_outputs(out, outputs)  # an earlier comparison's figures this one does not draw (--no-humans)
        from erf_lab.io import file_identity
        from erf_lab.provenance import source_identity

        sources = [source_identity(d, s, [file_identity(Path(d) / "summary.json")])
                   for d, s in zip(run_dirs, summaries)]
        write_json(out / "run.json", {"what": "erf-lab shape-bias --compare", "runs": [str(d) for d in run_dirs],
                                      "derived_from": sources,
                                      "outputs": outputs, "command": sys.argv, "not_like_with_like": note or None,
                                      **_made_with(started)})
        return {"rows": rows, "markdown": "\n".join(md), "note": note, "runs": [str(d) for d in run_dirs]}


def settings_note(summaries: Sequence[dict]) -> str:
    """What makes shape-bias runs not like with like, for a comparison of them: other images (the number of stimuli
    of a set both measured, i.e. another ``--limit``; a model run's ``edges`` are a ``--from-csv`` run's ``edge``),
    another crop (``--crop-pct``: model-vs-human feeds the whole stimulus, a crop cuts its border) or input size,
    untrained weights (``random_weights``; a model run of an erf-lab from before it was recorded, without
    ``--weights`` or ``--pretrained``, may be one), and runs the error-consistency figure leaves out (no consistency
    with the humans: an older erf-lab, or ``--no-humans``); "" when they agree (or do not say)."""
    from erf_lab.shape_bias.consistency import MVH_DATASETS

    def label(s):
        return s.get("label") or s.get("model")

    def names(labels):
        return ", ".join(map(str, labels))

    parts = []
    counts = [(label(s), s.get("n_images")) for s in summaries if isinstance(s.get("n_images"), dict)]
    sets = {MVH_DATASETS.get(k, k) for _, n in counts for k in n}
    if any(len({v for _, n in counts for k, v in n.items() if MVH_DATASETS.get(k, k) == ds}) > 1 for ds in sets):
        parts.append("the runs measured different numbers of stimuli (" + "; ".join(
            f"{lab}: " + ", ".join(f"{v} {k}" for k, v in n.items()) for lab, n in counts) + "), e.g. another --limit")
    prep = [(label(s), s["preprocessing"]) for s in summaries if isinstance(s.get("preprocessing"), dict)]
    for key, what in (("crop_pct", "the crop fraction"), ("input_size", "the input size")):
        if len({json.dumps(p.get(key)) for _, p in prep}) > 1:
            parts.append(f"{what} differs (" + ", ".join(f"{lab}: {p.get(key)}" for lab, p in prep) + ")")
    untrained = [label(s) for s in summaries if s.get("random_weights") is True]
    if untrained:
        parts.append(f"{names(untrained)}: random initial weights (untrained), numbers that describe no trained "
                     f"model")
    unmarked = [label(s) for s in summaries if "random_weights" not in s and "from_csv" not in s and "weights" in s
                and s.get("weights") is None and not s.get("pretrained")]
    if unmarked:
        parts.append(f"{names(unmarked)}: written by an older erf-lab that did not record random initial weights, "
                     f"with neither --weights nor --pretrained recorded: perhaps untrained")
    with_ec = [any((r or {}).get("vs_humans") for r in (s.get("consistency") or {}).values()) for s in summaries]
    if any(with_ec) and not all(with_ec):
        parts.append(f"{names(lab for lab, ok in zip(map(label, summaries), with_ec) if not ok)}: no error "
                     f"consistency with the humans (an older erf-lab, or run without human data), not in the "
                     f"error-consistency figure")
    return "; ".join(parts) + ("." if parts else "")


def _made_with(started: float) -> dict:
    """Where, with which versions, on which machine and when a record was written, and how long its command took
    since ``started`` (``time.monotonic()``), as every other erf-lab run.json says (no model runs: ``host``'s
    device is None)."""
    from erf_lab.provenance import finished, host, now, versions

    return {"versions": versions(), "host": host(), "cwd": os.getcwd(), "time_utc": now(), **finished(started)}


def analyse_csvs(paths: Sequence[str | os.PathLike], out, *, near: Path | None = None, humans: bool = True,
                 command: list[str] | None = None) -> list[dict]:
    """``erf-lab shape-bias --from-csv``: every non-human subject of model-vs-human CSVs (any of cue-conflict,
    edge, silhouette, told apart by file name) analysed like a model run, without running a model: shape bias,
    accuracies and consistency with the humans (found beside ``near`` or under the datasets root). Writes
    ``summary.json``, ``run.json`` and the figures into ``out`` (one subject) or ``out/<subject>/``."""
    import sys

    from erf_lab.io import (file_identity, hold_folder, prepare_out_dir, refuse_other_result, remove_earlier_outputs,
                            write_json)
    from erf_lab.shape_bias.analysis import add_consistency, check_human_data, shape_bias_from_decisions
    from erf_lab.shape_bias.consistency import is_human, read_trials, subject_tag
    from erf_lab.shape_bias.analysis import blank_responses, degenerate_warnings
    from erf_lab.shape_bias.stimuli import parse_name

    if not paths:
        raise ErfLabError("--from-csv needs at least one CSV file")
    started = time.monotonic()
    sources: dict = {}
    trials = read_trials(paths, sources)
    inputs = [file_identity(p) for p in paths]  # the bytes read (a CSV rewritten later is told apart)
    subjects = sorted({s for by_subject in trials.values() for s in by_subject if not is_human(s)})
    if not subjects:
        raise ErfLabError("no model in these CSVs: every subject is a human (subject-NN); model-vs-human names "
                          "model subjects by the model")
    blanks = blank_responses(trials, sources, subjects)  # a CSV of (nearly) nothing but blanks is refused here
    def folder_of(subj):
        return Path(out) if len(subjects) == 1 else Path(out) / subject_tag(subj)

    if len(subjects) > 1:  # one folder each: two subjects in one, the second overwrote the first's outputs unsaid
        from collections import defaultdict

        by_folder: dict[str, list[str]] = defaultdict(list)
        for subj in subjects:
            by_folder[subject_tag(subj)].append(subj)
        for tag, subjs in sorted(by_folder.items()):
            if len(subjs) > 1:
                raise ErfLabError(f"model subjects {' and '.join(map(repr, subjs))} would both be written to the "
                                  f"folder {tag!r} of --out (the second over the first): rename one in its CSV's subj "
                                  f"column")
            if not tag.strip("."):
                raise ErfLabError(f"model subject {subjs[0]!r} names no folder of its own in --out ({tag!r}): rename "
                                  f"it in its CSV's subj column")

    def cue_rows(subj):  # (shape, texture, decision) of each cue-conflict trial
        rows = []
        for img, (category, response) in ((trials.get("cue-conflict") or {}).get(subj) or {}).items():
            try:
                rows.append((category, parse_name(img)[1], response))
            except ValueError as e:
                raise ErfLabError(f"cue-conflict trial of {subj}: {e}") from None
        return rows

    for subj in subjects:
        refuse_other_result(folder_of(subj), "shape-bias --from-csv")
    # every CSV read before --out is made: a bad one (the subjects' or the humans') leaves nothing behind
    cue = {subj: cue_rows(subj) for subj in subjects}
    check_human_data(near, humans)
    out = prepare_out_dir(out)
    with hold_folder(out):  # another analysis into it meanwhile would mix its summaries and figures in
        summaries = []
        for subj in subjects:
            model = {ds: t[subj] for ds, t in trials.items() if subj in t}
            rows = cue[subj]
            summary = {"model": subj, "label": subj, "from_csv": [str(p) for p in paths],
                       **shape_bias_from_decisions(rows), "chance_shape_or_texture": 2 / len(CATEGORIES),
                       "n_images": {ds: len(t) for ds, t in model.items()},
                       "warnings": blanks[subj] + degenerate_warnings(rows)}  # flagged as a model run's are
            human_paths = add_consistency(summary, model, near, with_humans=humans)
            folder = folder_of(subj)
            folder.mkdir(parents=True, exist_ok=True)
            summary["command"] = command or sys.argv
            write_json(folder / "summary.json", summary)
            figs = plot_shape_bias([summary], folder / "shape_bias", human_csv_paths=human_paths) if rows else []
            figs += plot_error_consistency([summary], folder / "error_consistency")
            outputs = ["summary.json", *(Path(p).name for p in figs)]
            remove_earlier_outputs(folder, outputs)  # an earlier run's figures this one does not draw (--no-humans)
            write_json(folder / "run.json", {"what": "erf-lab shape-bias --from-csv", "model": subj,
                                             "csv": summary["from_csv"], "outputs": outputs, "inputs": inputs,
                                             "command": summary["command"], **_made_with(started)})
            summaries.append(dict(summary, out=str(folder)))
        return summaries
