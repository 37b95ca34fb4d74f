"""Shape-bias numbers from decisions, and from model-vs-human-format CSVs (humans and models alike).

Shape bias (Geirhos et al., ICLR 2019, Sec. 3): over cue-conflict images whose shape and texture categories
differ, ``shape hits / (shape hits + texture hits)``. Images whose shape equals their texture (80 of 1280) are
excluded, exactly as model-vs-human's ``ShapeBias`` analysis does (Geirhos et al., NeurIPS 2021).
"""
from __future__ import annotations

import csv
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.categories import CATEGORIES
from erf_lab.shape_bias.consistency import MVH_COLUMNS, is_human, read_mvh_csv
from erf_lab.shape_bias.stimuli import parse_name

CHANCE_SHAPE_OR_TEXTURE = 2 / len(CATEGORIES)  # a guess hits the shape or the texture category
DEGENERATE_SHARE = 0.9  # one category for at least this share of the images: the model is not looking
FEW_DECISIONS = 30  # fewer shape-or-texture decisions: the shape bias is flagged with its 95 % interval
BLANK_REFUSED = 0.5  # more than this share of a model's responses blank: a script that wrote no decisions, refused


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float] | None:
    """95 % Wilson score interval of the proportion ``hits / n`` (None for n = 0): how far a shape bias from ``n``
    shape-or-texture decisions can be trusted (Wilson, JASA 1927)."""
    if n <= 0:
        return None
    p, z2 = hits / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


#: a val accuracy within this many binomial standard errors of chance (1 / classes) is "at chance"
CHANCE_SE = 3.0


def at_chance(val_acc: float, num_classes: int, val_size: int, floor: float | None = None) -> bool:
    """Whether ``val_acc`` on ``val_size`` images is within CHANCE_SE binomial standard errors of guessing among
    ``num_classes`` classes (such a model has learned nothing, so its shape bias means nothing), or of ``floor``
    where that is higher (uneven classes: the accuracy of always answering the largest one)."""
    p = max(1.0 / num_classes, floor or 0.0)
    return val_acc <= p + CHANCE_SE * (p * (1 - p) / val_size) ** 0.5


def shape_bias_from_decisions(rows: Iterable[tuple[str, str, str]]) -> dict:
    """``rows`` of ``(shape, texture, decision)`` -> shape bias, hit fractions, counts and per-category values.

    ``fraction_shape_hits`` / ``fraction_texture_hits`` are over the cue-conflict images (shape != texture);
    ``fraction_correct_shape`` / ``fraction_correct_texture`` are model-vs-human's ``fraction-correct-shape`` /
    ``-texture`` (``ShapeBias.analysis``): the same hits over every trial, the ``n_trials - n_conflict`` without a
    conflict included. Per-category shape bias groups images by their *shape* category. ``shape_bias`` is
    ``None`` when there is no shape or texture hit at all.
    """
    n = shape_hits = texture_hits = trials = 0
    per = defaultdict(lambda: [0, 0, 0])  # shape category -> [n, shape hits, texture hits]
    for shape, texture, decision in rows:
        trials += 1
        if shape == texture:
            continue
        n += 1
        p = per[shape]
        p[0] += 1
        if decision == shape:
            shape_hits += 1
            p[1] += 1
        elif decision == texture:
            texture_hits += 1
            p[2] += 1

    def ratio(a, b):
        return a / (a + b) if a + b else None

    return {
        "shape_bias": ratio(shape_hits, texture_hits),
        "shape_bias_ci95": wilson_interval(shape_hits, shape_hits + texture_hits),
        "fraction_shape_hits": shape_hits / n if n else None,
        "fraction_texture_hits": texture_hits / n if n else None,
        "fraction_shape_or_texture_hits": (shape_hits + texture_hits) / n if n else None,
        "fraction_correct_shape": shape_hits / trials if trials else None,
        "fraction_correct_texture": texture_hits / trials if trials else None,
        "n_conflict": n,
        "n_trials": trials,
        "shape_hits": shape_hits,
        "texture_hits": texture_hits,
        "per_category": {c: {"shape_bias": ratio(per[c][1], per[c][2]), "n": per[c][0],
                             "shape_hits": per[c][1], "texture_hits": per[c][2]}
                         for c in CATEGORIES if c in per},
    }


def shape_bias_from_csv(paths: str | os.PathLike | Sequence[str | os.PathLike], only_humans: bool = False) -> dict:
    """Shape bias of model-vs-human-format CSVs: pooled over all rows, and per subject (``subj`` column).
    ``only_humans``: the rows of human subjects (``subject-NN``) only, as the human reference is (a copy of
    model-vs-human's ``raw-data/cue-conflict/`` holds the models' CSVs beside the humans').

    As in model-vs-human: the shape is the ``category`` column, the texture is the last ``-`` part of the image
    name (digits removed), rows with shape == texture are dropped. On the 10 human cue-conflict CSVs the pooled
    value is 0.95869.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ErfLabError("no CSV files given")
    by_subject: dict[str, list] = defaultdict(list)
    bad = 0
    for p in paths:
        for r in read_mvh_csv(p):
            if only_humans and not is_human(r["subj"]):
                continue
            try:
                _, texture = parse_name(r["imagename"])
            except ValueError:
                bad += 1
                continue
            by_subject[r["subj"]].append((r["category"], texture, r["object_response"]))
    pooled = shape_bias_from_decisions(row for rows in by_subject.values() for row in rows)
    pooled["per_subject"] = {s: shape_bias_from_decisions(rows)["shape_bias"] for s, rows in sorted(by_subject.items())}
    pooled["unparsed_rows"] = bad
    pooled["files"] = [str(p) for p in paths]
    return pooled


def write_mvh_csv(path: str | os.PathLike, subject: str, images: Sequence[str], shapes: Sequence[str],
                  decisions: Sequence[str]) -> None:
    """Write model decisions in model-vs-human format (atomically) so ``shape_bias_from_csv`` reads them too."""
    from erf_lab.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MVH_COLUMNS)
        for i, (img, shape, dec) in enumerate(zip(images, shapes, decisions), start=1):
            w.writerow([subject, 1, i, "NaN", dec, shape, 0, Path(img).name])


def human_csvs(root: Path | None = None, dataset: str = "cue-conflict") -> list[Path]:
    """The human CSVs under ``<root>/human-<dataset>`` (``root`` default: the datasets root); [] when absent."""
    from erf_lab.paths import datasets_root

    root = root or datasets_root()
    if root is None:
        return []
    return sorted((Path(root) / f"human-{dataset}").glob("*.csv"))


def humans_root(near: Path | None = None) -> Path | None:
    """Where the human data lie: beside the stimuli (``near``) when they are there, else the datasets root."""
    from erf_lab.paths import datasets_root

    for p in ([Path(near), Path(near).parent] if near is not None else []):
        if human_csvs(p):
            return p
    return datasets_root()


def check_human_data(near: Path | None = None, with_humans: bool = True) -> None:
    """Read the human CSVs :func:`add_consistency` will use (found as it finds them), so a damaged one (a category
    outside the 16, a truncated row: ErfLabError naming file, line and value) is refused before a command makes its
    output folder, not after: a refused run leaves nothing behind."""
    from erf_lab.shape_bias.consistency import human_trials

    root = humans_root(near) if with_humans else None
    if root:
        human_trials(root)  # every human-<dataset>/ CSV: the cue-conflict ones of the reference shape bias too


def add_consistency(summary: dict, model_trials: dict, near: Path | None = None, with_humans: bool = True
                    ) -> list[Path]:
    """Add the human reference shape bias, the model-vs-human consistency report (``consistency``: accuracies,
    and with ``with_humans`` the comparison with each subject) and its flat keys to ``summary``; returns the
    human cue-conflict CSVs used (empty without human data)."""
    from erf_lab.shape_bias.consistency import consistency_summary, flat_keys, human_trials

    root = humans_root(near) if with_humans else None
    humans = human_csvs(root) if root else []
    if humans:
        h = shape_bias_from_csv(humans, only_humans=True)
        summary["human_reference"] = {"shape_bias": h["shape_bias"], "per_category": h["per_category"],
                                      "n_subjects": len(h["per_subject"])}
    subjects = human_trials(root) if root else {}
    report = consistency_summary(model_trials, subjects)
    summary.update(flat_keys(report))
    summary["consistency"] = report
    for ds, r in report.items():  # a subset run (--limit): say so where its numbers are compared with full sets
        full = max((len(t) for t in (subjects.get(ds) or {}).values()), default=0)
        seen = set().union(*(t.keys() for t in (subjects.get(ds) or {}).values()))
        unmatched = sorted(model_trials[ds].keys() - seen) if seen else []
        if unmatched:  # e.g. the stimuli saved as .jpg: matched on nothing, the comparison was left out unsaid
            summary.setdefault("warnings", []).append(
                f"{ds}: {len(unmatched)} of the model's {r['n_trials']} images (e.g. {unmatched[0]!r}) are not among "
                f"the subjects' (e.g. {min(seen)!r}; trials are matched by image name as model-vs-human matches them, "
                f"suffix included): " + ("no accuracy difference or error consistency with the subjects" if not
                                         r["vs_humans"] else "its accuracy counts them, the error consistency and "
                                         "accuracy difference with the subjects do not"))
        if r["vs_humans"] and r["n_trials"] < full:
            summary.setdefault("warnings", []).append(
                f"{ds}: accuracy and consistency from {r['n_trials']} of the subjects' {full} trials (a subset of "
                f"the stimuli): model-vs-human compares whole sets, and an error consistency over few trials "
                f"varies widely from subset to subset")
    if with_humans:  # a set measured without its humans says so (an older download had only human-cue-conflict)
        for ds in model_trials:
            if not (root and human_csvs(root, ds)):
                summary.setdefault("warnings", []).append(
                    f"no human responses for {ds} (no human-{ds}/ CSVs{f' in {root}' if root else ''}): its "
                    f"accuracy has no comparison with the subjects; 'erf-lab data download' fetches them")
    return humans


DECISION_COLUMNS = ("set", "image", "shape", "texture", "decision")


def read_decisions_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of an erf-lab ``decisions.csv``; a file that is none (not UTF-8 text, no ``set`` / ``image``
    / ``shape`` / ``texture`` / ``decision`` header) raises one ``ErfLabError`` line naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as e:
        raise ErfLabError(f"{path}: not an erf-lab decisions.csv ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    missing = [c for c in DECISION_COLUMNS if c not in header]
    if missing:
        raise ErfLabError(f"{path}: not an erf-lab decisions.csv (no {', '.join(missing)} column"
                          f"{'s' if len(missing) > 1 else ''})")
    return rows


def blank_responses(trials: dict, sources: dict, subjects: Sequence[str]) -> dict[str, list[str]]:
    """Warnings on the blank ``object_response`` of each of ``subjects`` in each data set of ``trials`` (as
    :func:`~erf_lab.shape_bias.consistency.read_trials` returns them, ``sources`` filled by it): model-vs-human reads
    a blank as NaN, a wrong trial, and so are they counted, but said (how many, in which file). More than
    ``BLANK_REFUSED`` of one subject's responses blank (a script that wrote no decisions) raises one ErfLabError line,
    since every number would count the blanks. Returns ``{subject: [warning, ...]}``."""
    out: dict[str, list[str]] = {s: [] for s in subjects}
    for ds, by_subject in trials.items():
        for subj in subjects:
            t = by_subject.get(subj) or {}
            n = sum(not response for _, response in t.values())
            if not n:
                continue
            what = (f"{', '.join(map(str, sources.get((ds, subj), [])))}: {n} of the {len(t)} {ds} responses of "
                    f"{subj} are blank")
            if n > BLANK_REFUSED * len(t):
                raise ErfLabError(f"{what} (no decision recorded: did the script that wrote it fail?); model-vs-human "
                                  f"reads a blank as a wrong trial, so every number would count blanks")
            out[subj].append(f"{what}: counted as wrong trials, as model-vs-human counts them (it reads a blank as "
                             f"NaN)")
    return out


def degenerate_warnings(rows, chance: float = CHANCE_SHAPE_OR_TEXTURE) -> list[str]:
    """Signs that a run measured nothing, from ``(shape, texture, decision)`` of the decoded cue-conflict images:
    one category for at least 90 % of them, fewer shape-or-texture hits than chance (2/16 of the conflict
    images, Geirhos et al., ICLR 2019: a guess among 16 categories hits one of the two cues that often), or so
    few shape-or-texture decisions (< ``FEW_DECISIONS``) that the shape bias is a wide interval. ``chance``: the
    share of conflict images a guess hits one cue of (2 / classes; cue-world: 2 / its class count)."""
    rows = list(rows)
    out = []
    if rows:
        top, n = Counter(d for _, _, d in rows).most_common(1)[0]
        if n >= DEGENERATE_SHARE * len(rows):
            out.append(f"degenerate run: {n} of {len(rows)} cue-conflict images ({n / len(rows):.0%}) are classified "
                       f"'{top}'")
    conflict = [(s, t, d) for s, t, d in rows if s != t]
    if conflict:
        hits = sum(d in (s, t) for s, t, d in conflict) / len(conflict)
        if hits < chance:
            out.append(f"shape-or-texture hits on {hits:.3f} of the conflict images, below chance "
                       f"({chance:.3f}): the shape bias is noise")
        decided = sum(d in (s, t) for s, t, d in conflict)
        if 0 < decided < FEW_DECISIONS:
            lo, hi = wilson_interval(sum(d == s for s, _, d in conflict), decided)
            out.append(f"shape bias from only {decided} shape-or-texture decisions: its 95% interval is "
                       f"{lo:.2f}-{hi:.2f}")
    return out
