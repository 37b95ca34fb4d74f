"""Trial-wise agreement with the human observers of model-vs-human (Geirhos et al., NeurIPS 2021).

Definitions as in model-vs-human (``modelvshuman/plotting/analyses.py``: ``SixteenClassAccuracy``,
``ErrorConsistency``; ``helper/plotting_helper.py``: ``get_short_imagename``; ``plotting/plot.py``:
``get_raw_benchmark_df`` / ``get_raw_matrix``):

- a trial is correct when ``object_response == category`` (the *shape* category on cue-conflict); every trial
  counts, including the 80 cue-conflict images whose shape equals their texture (those are left out of the
  shape bias only) and the humans' ``na`` answers (wrong);
- 16-class accuracy p = correct trials / trials;
- two observers are matched trial by trial on the image id (the last ``_`` part of ``imagename``, e.g.
  ``0001_s5n_s01_0_bird_00_bird3-bird2.png`` -> ``bird3-bird2.png``);
- observed consistency c_obs = share of trials both got right or both got wrong; expected consistency
  c_exp = p1 p2 + (1 - p1)(1 - p2); error consistency kappa = (c_obs - c_exp) / (1 - c_exp), and 1 when
  c_obs = 1 (Cohen's kappa; Geirhos, Meding & Wichmann, NeurIPS 2020, Eqs. 1-3);
- accuracy difference = (p1 - p2)^2, the squared difference of the two accuracies (``SixteenClassAccuracyDifference``
  with its default ``norm=np.square``; the benchmark's "accuracy diff.", lower is more human-like);
- a model's value is the mean over the 10 subjects; the human reference averages every pair of subjects.

model-vs-human requires both observers to have seen the same images; here the pair is matched on the images
both saw (all of them for full runs), and ``n_trials`` says how many that was.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.categories import CATEGORIES, NO_ANSWER
from erf_lab.shape_bias.stimuli import is_cue_conflict_name, name_words, parse_name

# erf-lab stimulus folder -> model-vs-human dataset name (CSV prefix, human-<name>/ folder)
MVH_DATASETS = {"cue-conflict": "cue-conflict", "edges": "edge", "silhouettes": "silhouette"}
HUMAN_PREFIX = "subject-"
MEASURES = ("observed_consistency", "expected_consistency", "error_consistency", "accuracy_difference")

MVH_COLUMNS = ("subj", "session", "trial", "rt", "object_response", "category", "condition", "imagename")
REQUIRED_COLUMNS = ("subj", "object_response", "category", "imagename")
Trials = dict  # image id -> (category, object_response)


def image_id(imagename: str) -> str:
    """model-vs-human's trial key (``get_short_imagename``): the last ``_`` part of the name, keeping the
    ``n0...`` synset prefix of ImageNet file names."""
    parts = str(imagename).split("_")
    if len(parts) == 1:
        return parts[0]
    return "_".join(parts[-2:]) if parts[-2].startswith("n0") else parts[-1]


def subject_tag(subject: str) -> str:
    """A subject's name as it goes into file and folder names: ``_`` (model-vs-human's field separator in CSV names),
    ``/`` and every character but letters, digits, ``.``, ``+`` and ``-`` become ``-`` (``timm/resnet18``:
    ``timm-resnet18``)."""
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(subject))


def is_human(subject: str) -> bool:
    """model-vs-human's rule (``get_human_and_CNN_subjects``): human subjects are named ``subject-NN``."""
    return str(subject).startswith(HUMAN_PREFIX)


def dataset_of(path: str | os.PathLike) -> str:
    """The model-vs-human dataset of a raw-data CSV from its file name (``<dataset>_<subject>_session...``)."""
    name = Path(path).name
    for ds in sorted(MVH_DATASETS.values(), key=len, reverse=True):
        if name.startswith(ds + "_"):
            return ds
    raise ErfLabError(f"{path}: cannot tell the dataset from the file name; model-vs-human names its CSVs "
                      f"<dataset>_<subject>_session-1.csv with dataset one of {', '.join(MVH_DATASETS.values())}")


def _check_categories(path: Path, line: int, row: dict) -> None:
    """ErfLabError naming the file, line and value unless the row's response is one of the 16 categories, ``na``
    (no answer) or empty, and its ``category`` and the categories in its image name are among the 16 (another
    value, e.g. a 1000-class label or a typo, would be counted as a wrong trial without a word), and its
    ``category`` is the shape in its image name (as in every model-vs-human CSV: another one, e.g. the response and
    category columns swapped, would be read as the shape of the image and change every number)."""
    values = [("object_response", row["object_response"], (*CATEGORIES, NO_ANSWER, "")),
              ("category", row["category"], CATEGORIES)]
    words = name_words(row["imagename"])  # names outside the stimulus convention are not parsed (unparsed_rows)
    values += [(f"the {what} category in the image name {row['imagename']!r}", w, CATEGORIES)
               for what, w in zip(("shape", "texture"), words or ())]
    for what, value, allowed in values:
        if value not in allowed:
            raise ErfLabError(f"{path}, line {line}: {what} is {value!r}, not one of the 16 categories "
                              f"({', '.join(CATEGORIES)}){' or na (no answer)' if NO_ANSWER in allowed else ''}")
    if words and words[0] != row["category"]:
        raise ErfLabError(f"{path}, line {line}: category is {row['category']!r}, but the image "
                          f"{row['imagename']!r} has the shape {words[0]!r} (model-vs-human's category is the "
                          f"image's shape category; are the object_response and category columns swapped?)")


def _check_dataset(path: Path, line: int, imagename: str, dataset: str) -> None:
    """ErfLabError unless ``imagename`` is named as a stimulus of ``dataset`` (the one the file name says): a
    cue-conflict CSV holds ``<shape><i>-<texture><j>`` images, an edge or silhouette CSV ``<shape><i>`` ones (another
    data set's CSV under the name would be analysed as this one: an edge CSV as cue-conflict trials without a
    conflict, no shape bias and no trial in common with the humans)."""
    cue = dataset == MVH_DATASETS["cue-conflict"]
    named = name_words(imagename) is not None
    if named and is_cue_conflict_name(imagename) == cue:
        return
    other, a = "an edge or silhouette" if cue else "a cue-conflict", "an" if dataset[0] in "aeiou" else "a"
    raise ErfLabError(f"{path}, line {line}: image {imagename!r} is not named as {a} {dataset} stimulus "
                      f"({'<shape><i>-<texture><j>' if cue else '<shape><i>'}.png)"
                      + (f" but as {other} one: a CSV of another data set under {a} {dataset} file name?" if named
                         else ""))


def read_mvh_csv(path: str | os.PathLike, dataset: str | None = None) -> list[dict]:
    """Rows of one model-vs-human-format CSV; raises ``ErfLabError`` for an empty file or one without rows, missing
    columns, a truncated row, a response or category outside the 16 categories (``na``, no answer, is a response),
    a category that is not the shape in the image name, or (``dataset`` given: the model-vs-human data set the file
    is of) an image not named as a stimulus of ``dataset``."""
    path = Path(path)
    if not path.is_file():
        raise ErfLabError(f"CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is no column
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ErfLabError(f"{path}: an empty file, not a model-vs-human CSV")
            missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames)
            if missing:
                raise ErfLabError(f"{path}: not a model-vs-human CSV (missing columns {', '.join(sorted(missing))})")
            rows = []
            for r in reader:
                # a short (truncated) row has None there; without an image or a category it is no trial (kept, it
                # was one image 'None' whose response None equals its category None: a phantom correct trial)
                bad = [c for c in REQUIRED_COLUMNS if r.get(c) is None or c != "object_response" and not r[c].strip()]
                if bad:
                    raise ErfLabError(f"{path}, line {reader.line_num}: no {', '.join(bad)} (a truncated or damaged "
                                      f"row)")
                _check_categories(path, reader.line_num, r)
                if dataset is not None:
                    _check_dataset(path, reader.line_num, r["imagename"], dataset)
                rows.append(r)
            if not rows:
                raise ErfLabError(f"{path}: no trials (a header without rows)")
            return rows
    except (UnicodeDecodeError, csv.Error) as e:
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"malformed CSV ({e})"
        raise ErfLabError(f"{path}: {what}, not a model-vs-human CSV") from None


def read_trials(paths: Sequence[str | os.PathLike], sources: dict | None = None) -> dict[str, dict[str, Trials]]:
    """``{dataset: {subject: {image id: (category, response)}}}`` from model-vs-human CSVs; ``sources`` (given) is
    filled with ``{(dataset, subject): [the paths that hold its trials]}``.

    ErfLabError for a missing file, what :func:`read_mvh_csv` refuses (images not named as stimuli of the data set
    the file name says included) or an image seen twice by one subject in one dataset.
    """
    out: dict[str, dict[str, Trials]] = defaultdict(dict)
    given: dict[Path, int] = {}  # each file (resolved) -> its place in paths
    where: dict[tuple[str, str, str], int] = {}  # (dataset, subject, image id) -> the place of its file
    for i, p in enumerate(paths):
        if not Path(p).is_file():
            raise ErfLabError(f"CSV not found: {p}")
        if (first := given.setdefault(Path(p).resolve(), i)) != i:
            also = "" if str(paths[first]) == str(p) else f" (also as {paths[first]})"
            raise ErfLabError(f"{p}: given twice{also}: its trials would count twice")
        ds = dataset_of(p)
        for r in read_mvh_csv(p, ds):
            t = out[ds].setdefault(r["subj"], {})
            key = image_id(r["imagename"])
            if key in t:
                before = where[ds, r["subj"], key]
                raise ErfLabError(f"{p}: subject {r['subj']} saw image {key} twice"
                                  + ("" if before == i else f" (in {paths[before]} too)"))
            t[key] = (r["category"], r["object_response"])
            where[ds, r["subj"], key] = i
            if sources is not None and p not in (held := sources.setdefault((ds, r["subj"]), [])):
                held.append(p)
    return dict(out)


def accuracy(trials: Trials) -> float | None:
    """16-class accuracy: share of trials with response == category (``SixteenClassAccuracy``)."""
    return sum(c == r for c, r in trials.values()) / len(trials) if trials else None


def texture_accuracy(trials: Trials) -> float | None:
    """Cue-conflict share of trials answered with the *texture* category (from the image name), all trials."""
    if not trials:
        return None
    return sum(r == parse_name(img)[1] for img, (_, r) in trials.items()) / len(trials)


def consistency(a: Trials, b: Trials) -> dict:
    """Observed, expected and error consistency and the accuracy difference of two observers over the images both
    saw."""
    common = sorted(a.keys() & b.keys())
    if not common:
        raise ErfLabError("the two observers share no image (check that both CSVs are of the same dataset)")
    ca = [a[k][0] == a[k][1] for k in common]
    cb = [b[k][0] == b[k][1] for k in common]
    n = len(common)
    p1, p2 = sum(ca) / n, sum(cb) / n
    expected = p1 * p2 + (1 - p1) * (1 - p2)
    observed = sum(x == y for x, y in zip(ca, cb)) / n
    kappa = 1.0 if observed == 1.0 else (observed - expected) / (1 - expected)
    return {"observed_consistency": observed, "expected_consistency": expected, "error_consistency": kappa,
            "accuracy_difference": (p1 - p2) ** 2, "n_trials": n}


def _spread(values: Sequence[dict]) -> dict:
    """Mean, sample SD (ddof = 1), min and max of each measure over a list of ``consistency`` results."""
    out = {}
    for m in MEASURES:
        v = [d[m] for d in values]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
        out[m] = {"mean": mean, "sd": sd, "min": min(v), "max": max(v)}
    return out


def human_vs_human(humans: Mapping[str, Trials]) -> dict | None:
    """Every pair of subjects who share an image: ``{"pairs": {"a|b": ...}, <measure>: {mean, sd, min, max},
    "n_pairs"}`` (None without such a pair)."""
    pairs = {f"{s}|{t}": consistency(humans[s], humans[t]) for s, t in combinations(sorted(humans), 2)
             if humans[s].keys() & humans[t].keys()}
    if not pairs:
        return None
    return {"n_pairs": len(pairs), **_spread(list(pairs.values())), "pairs": pairs}


def versus_humans(model: Trials, humans: Mapping[str, Trials]) -> dict | None:
    """The model against each subject who saw an image the model saw: ``{"per_subject": {...}, <measure>: {mean,
    sd, min, max}, "n_subjects", "subjects_without_common_trials"}`` (None when no subject shares an image)."""
    per = {s: consistency(model, humans[s]) for s in sorted(humans) if model.keys() & humans[s].keys()}
    if not per:
        return None
    return {"n_subjects": len(per), **_spread(list(per.values())), "per_subject": per,
            "subjects_without_common_trials": sorted(set(humans) - set(per))}


def dataset_report(model: Trials, humans: Mapping[str, Trials], dataset: str) -> dict:
    """Accuracy (and on cue-conflict the texture-label accuracy), consistency with each human and the human
    reference on one model-vs-human dataset."""
    out = {"n_trials": len(model), "accuracy": accuracy(model)}
    if dataset == "cue-conflict":
        out["texture_accuracy"] = texture_accuracy(model)
    out["vs_humans"] = versus_humans(model, humans)
    out["human_accuracy"] = ({s: accuracy(t) for s, t in sorted(humans.items())} if humans else None)
    out["human_vs_human"] = human_vs_human(humans)
    return out


def human_trials(root: str | os.PathLike | None = None) -> dict[str, dict[str, Trials]]:
    """The human subjects' trials under ``<datasets root>/human-<dataset>/`` (missing datasets are absent)."""
    from erf_lab.paths import datasets_root

    root = Path(root) if root is not None else datasets_root()
    if root is None:
        return {}
    paths = [p for ds in MVH_DATASETS.values() for p in sorted((root / f"human-{ds}").glob("*.csv"))]
    return {ds: {s: t for s, t in subj.items() if is_human(s)} for ds, subj in read_trials(paths).items()}


def consistency_summary(model: Mapping[str, Trials], humans: Mapping[str, Mapping[str, Trials]]) -> dict:
    """``dataset_report`` for every dataset the model has trials on (model-vs-human dataset names)."""
    return {ds: dataset_report(model[ds], humans.get(ds) or {}, ds) for ds in MVH_DATASETS.values() if model.get(ds)}


def flat_keys(report: Mapping[str, dict]) -> dict:
    """A few flat keys for tables: accuracy, mean error consistency and mean accuracy difference per dataset."""
    out = {}
    for ds, r in report.items():
        key = re.sub(r"\W", "_", ds)
        out[f"{key}_accuracy"] = r["accuracy"]
        out[f"{key}_error_consistency"] = (r["vs_humans"] or {}).get("error_consistency", {}).get("mean")
        out[f"{key}_accuracy_difference"] = (r["vs_humans"] or {}).get("accuracy_difference", {}).get("mean")
    return out


def consistency_rows(report: Mapping[str, dict]) -> list[dict]:
    """One table row per dataset: trials, accuracies, the mean (and SD, range) over subjects of each measure,
    and the human-human mean error consistency."""
    rows = []
    for ds, r in report.items():
        vs, hh = r.get("vs_humans") or {}, r.get("human_vs_human") or {}
        k = vs.get("error_consistency") or {}
        rows.append({"dataset": ds, "trials": r["n_trials"], "accuracy": r["accuracy"],
                     "texture-label accuracy": r.get("texture_accuracy"),
                     "observed consistency": (vs.get("observed_consistency") or {}).get("mean"),
                     "expected consistency": (vs.get("expected_consistency") or {}).get("mean"),
                     "error consistency": k.get("mean"), "SD over subjects": k.get("sd"),
                     "min": k.get("min"), "max": k.get("max"),
                     "human-human": (hh.get("error_consistency") or {}).get("mean"),
                     "accuracy difference": (vs.get("accuracy_difference") or {}).get("mean"),
                     "accuracy difference human-human": (hh.get("accuracy_difference") or {}).get("mean")})
    return rows
