"""Run directories: where the app writes its own, and finding / listing those written by the CLI."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

from erf_lab.paths import cache_dir

DOWNLOAD_SUFFIXES = {".png": "image/png", ".pdf": "application/pdf", ".svg": "image/svg+xml",
                     ".npy": "application/octet-stream", ".csv": "text/csv", ".json": "application/json",
                     ".md": "text/markdown"}
MAX_DOWNLOAD_MB = 200
#: result directories listed from one folder (breadth first); the Results page says when the list is cut there
MAX_RUNS = 300
#: shown with results whose record says the weights were a random initialisation (:func:`is_untrained`)
UNTRAINED_NOTE = "UNTRAINED: these results come from random initial weights and describe no trained model."
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters no CSV text holds


def app_runs_dir() -> Path:
    """Where the app writes its run directories: ``$ERF_LAB_APP_RUNS`` or ``<cache>/app-runs``; the Results
    page opens them like any CLI run directory."""
    d = Path(os.environ.get("ERF_LAB_APP_RUNS") or cache_dir() / "app-runs").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_kind(d: Path) -> str | None:
    """What a directory holds: erf / sweep / shape-bias / benchmark / compare / timeline / study / run (has
    run.json), else None. compare, timeline and study folders (``erf-lab compare --out``, ``timeline``, ``study``)
    are told by their record (:data:`erf_lab.io.MARKER_FILES`), as the CLI tells them."""
    from erf_lab.io import MARKER_FILES, read_json_or_none

    if (d / "erf.npy").is_file():
        return "erf"
    if (d / "sweep.json").is_file():
        return "sweep"
    if (d / "summary.json").is_file() and (d / "decisions.csv").is_file():
        return "shape-bias"
    if (d / "results.json").is_file() and (d / "table.csv").is_file():
        return "benchmark"
    for kind in ("compare", "timeline", "study"):
        name, is_ours = MARKER_FILES[kind]
        if (d / name).is_file():
            info = read_json_or_none(d / name)
            if isinstance(info, dict) and is_ours(info):
                return kind
    if (d / "run.json").is_file():
        return "run"
    return None


def incomplete_note(d: Path) -> str | None:
    """A line for a folder whose sweep / compare / timeline record says the command has not finished (it was
    interrupted or is still running; :func:`erf_lab.io.command_record`), else None: its tables and figures are
    partial or missing, and the same command run again completes the folder."""
    from erf_lab.io import MARKER_FILES, RESULT_KINDS, read_json_or_none, record_complete

    for kind, (name, is_ours) in MARKER_FILES.items():
        info = read_json_or_none(d / name) if (d / name).is_file() else None
        if isinstance(info, dict) and is_ours(info) and not record_complete(info):
            planned = info.get("members") or info.get("epochs")
            done = (f": {len(info.get('rows') or [])} of {len(planned)} measured"
                    if isinstance(planned, list) and isinstance(info.get("rows"), list) else "")
            return (f"Incomplete: {RESULT_KINDS[kind]} that was interrupted or is still running ({name} says "
                    f"complete: false{done}); run its command again to finish it.")
    return None


def find_runs(root: Path, max_depth: int = 4, limit: int | None = None) -> list[dict]:
    """Result directories under ``root`` (itself included), breadth first, symlinks not followed; at most ``limit``
    (default :data:`MAX_RUNS`: a caller that gets that many says the list may be cut)."""
    limit = MAX_RUNS if limit is None else limit
    out, frontier = [], [(root, 0)]
    while frontier and len(out) < limit:
        d, depth = frontier.pop(0)
        kind = run_kind(d)
        if kind:
            out.append({"path": d, "name": "." if d == root else d.relative_to(root).as_posix(), "kind": kind})
        if depth < max_depth:
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
            except OSError:
                continue
            frontier += [(p, depth + 1) for p in subs]
    return out


def listed_caption(d: Path) -> str | None:
    """What a run directory's run.json says it measured, beside its name in a list (the app's own folders are named
    by a hash): its label, random init marked (:func:`is_untrained`), then :func:`erf_lab.erf.rundir.run_caption`
    (layer, size, images), e.g. ``"K31-seed0 · trained (cue-world) · re-param · forward_features, 128x128 px, 4
    images"``; None without a readable run.json."""
    from erf_lab.erf.rundir import RANDOM_MARK, run_caption
    from erf_lab.io import read_json_or_none

    info = read_json_or_none(d / "run.json") if own_file(d / "run.json") else None
    if not isinstance(info, dict):
        return None
    label = info.get("label") or info.get("model")
    if label and is_untrained(d):
        label = f"{label} {RANDOM_MARK}"
    return " · ".join(str(p) for p in (label, run_caption(info)) if p) or None


def is_untrained(d: Path) -> bool:
    """True when a run directory's record says its weights were a random initialisation: run.json ``random_init``
    (an ERF run) or summary.json ``random_weights`` (a shape-bias run, whose run.json does not say)."""
    from erf_lab.io import read_json_or_none

    for name, key in (("run.json", "random_init"), ("summary.json", "random_weights")):
        info = read_json_or_none(d / name) if own_file(d / name) else None
        if isinstance(info, dict) and info.get(key) is True:
            return True
    return False

def own_file(p: Path) -> bool:
    """A file of the folder itself: a symlink (to anything on the server) is neither read, shown nor offered."""
    return p.is_file() and not p.is_symlink()


def downloadable_files(d: Path) -> list[Path]:
    """Figure and data files directly inside a result directory (size-limited, no symlinks)."""
    return [p for p in sorted(d.iterdir()) if own_file(p) and p.suffix.lower() in
            DOWNLOAD_SUFFIXES and not p.name.startswith(".") and p.stat().st_size <= MAX_DOWNLOAD_MB * 2**20]


def read_csv_table(path: Path, shown: str | None = None):
    """The table of a CSV file of a result directory (a pandas DataFrame). A file that is none (binary bytes, not
    UTF-8 text, a row pandas cannot parse) raises one line naming it as ``shown`` (default: its name): a junk file
    must not be shown as a table of junk."""
    import pandas as pd

    from erf_lab.errors import ErfLabError

    shown = shown or path.name
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or _BINARY.search(text):
        raise ErfLabError(f"{shown} is not a CSV table (binary or not UTF-8 text); nothing shown from it")
    try:
        return pd.read_csv(io.StringIO(text))
    except (ValueError, pd.errors.EmptyDataError) as e:  # ParserError is a ValueError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ErfLabError(f"cannot read {shown} as a CSV table ({reason}); nothing shown from it") from None
