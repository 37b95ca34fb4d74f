"""Small I/O helpers shared by every command: atomic writes, hashing, progress bars."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fastconv.jsonstore import plain_mode


#: :func:`atomic_path`'s temporary file: ``.<final name>.<mkstemp's 8 characters>.tmp<final suffix>``
_TMP = ".tmp"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(_TMP) + r"(?P<suffix>(\.[^.]*)?)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success rename it onto ``path``.

    A crash or Ctrl-C never leaves a half-written ``path`` behind, and a power cut after the rename keeps the new
    content: the file's data reach the disk (fsync) before the rename, and the rename itself after it (the folder's
    fsync, where the system allows one). A kill (SIGKILL) leaves the temporary file, which
    :func:`remove_write_leftovers` removes when a run takes its folder again (:func:`remove_file_leftovers` when a
    command takes the file again).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        plain_mode(tmp_path)  # mkstemp makes it owner-only: the mode a plain open() gives under the umask
        _fsync(tmp_path, os.O_RDONLY)
        os.replace(tmp_path, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), required=False)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_write_leftovers(folder: str | os.PathLike, *subfolders: str) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` and its ``subfolders`` (relative paths, or
    glob patterns such as ``probe-*px``; not deeper) and return them: a process killed while it wrote (SIGKILL, the
    second signal of a scheduler's grace period, a power cut) leaves its temporary file, a whole training state or
    checkpoint in size, which no later run would ever remove. Only while this thread holds ``folder``
    (:func:`hold_folder`, which calls this), so no other writer's file is taken; elsewhere (no lock: Windows, a file
    system without locks) it removes nothing. The temporaries of a file held by :func:`hold_file` (a reparam writing
    into this folder now) stay: that command removes its own."""
    if not holds_folder(folder):
        return []
    folder = Path(folder)
    folders = [folder, *(d for s in subfolders for d in (folder.glob(s) if "*" in s else [folder / s]))]
    return [p for d in dict.fromkeys(folders) for p in _remove_temporaries(d, _not_held_elsewhere(d))]


def remove_file_leftovers(path: str | os.PathLike, *with_files: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` left for exactly ``path`` and ``with_files`` (the files
    written with it, e.g. its ``.run.json``) and return them: a write killed before its rename leaves one, as large
    as the file, beside it for good. Only while this thread holds ``path`` (:func:`hold_file`, which calls this),
    since only its holder writes those files; any other file of the folder is left alone, and without a lock
    (Windows, a file system without locks) nothing is removed."""
    path = Path(path).expanduser()
    if not _holds(file_lock_path(path)):
        return []
    removed = []
    for f in (path, *(Path(f).expanduser() for f in with_files)):
        removed += _remove_temporaries(f.parent, lambda target, name=f.name: target == name)
    return removed


def _write_target(name: str) -> str | None:
    """The name of the file that an :func:`atomic_path` temporary called ``name`` was to become; None when ``name``
    is not one."""
    m = _LEFTOVER.fullmatch(name)
    return m["name"] if m and m["suffix"] == Path(m["name"]).suffix else None


def _not_held_elsewhere(folder: Path) -> Callable[[str | None], bool]:
    """Whether a temporary of ``folder`` writing the file named so (None: not a temporary) may go: not while the
    file, or a file it goes with (``<file>.run.json``), has a :func:`hold_file` lock beside it: that file's holder
    writes there now (or was killed, and the next one removes them). Asked after the temporary was seen, so a lock
    taken before the temporary was made is seen."""
    def unheld(target: str | None) -> bool:
        if target is None:
            return False
        parts = target.split(".")
        names = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
        return not any(file_lock_path(folder / name).exists() for name in names if name)

    return unheld


def _remove_temporaries(folder: Path, wanted: Callable[[str | None], bool]) -> list[Path]:
    """Delete the plain files of ``folder`` whose :func:`_write_target` is ``wanted``; return them."""
    removed = []
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            if wanted(_write_target(p.name)) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def _fsync(path: Path, flags: int, required: bool = True) -> None:
    """Flush ``path`` to the disk. A file system without fsync (EINVAL, ENOTSUP, ENOSYS) leaves it to the system; a
    real error (EIO: the data did not reach the disk) raises when ``required`` (a file), a folder is best effort."""
    try:
        fd = os.open(path, flags)
    except OSError:
        if required:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if required and e.errno not in _NO_FSYNC:
            raise
    finally:
        os.close(fd)


_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.ENOSYS}


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def command_record(path: str | os.PathLike, record: dict, *, write: bool = True,
                   undo_on_error: bool = True) -> Iterator[Callable[..., None]]:
    """The record of a command that writes no run.json (:data:`MARKER_FILES`), kept from the command's start:
    ``record`` (what it was asked to do) is written now with ``"complete": false``, so the folder is this command's
    result while it runs and after a Ctrl-C, crash or kill (another command refuses it; the same command run again
    resumes there). The yielded ``save(complete=False, **fields)`` rewrites it (the work done so far), and
    ``save(complete=True, ...)``, called last, once every other file is written, marks it finished and adds
    ``end_time`` and ``wall_seconds`` (this process's, from entering; :func:`erf_lab.provenance.finished`). With
    ``undo_on_error``, a bad input (ErfLabError) raised before the first ``save`` (before any work is done) puts back
    what ``path`` held before, or removes the record: an error line leaves no folder that looks like a result.
    ``write=False`` (a torchrun rank other than 0) writes nothing. Atomic writes (:func:`write_json`)."""
    import time

    from erf_lab.errors import ErfLabError
    from erf_lab.provenance import finished

    path = Path(path)
    before = path.read_bytes() if write and path.is_file() else None
    saved, started = False, time.monotonic()

    def save(complete: bool = False, **fields) -> None:
        nonlocal saved
        saved = True
        if write:
            write_json(path, {"complete": bool(complete), **record, **fields,
                              **(finished(started) if complete else {})})

    if write:
        write_json(path, {"complete": False, **record})
    try:
        yield save
    except ErfLabError:
        if write and undo_on_error and not saved:
            with contextlib.suppress(OSError):
                if before is None:
                    path.unlink(missing_ok=True)
                else:
                    with atomic_path(path) as tmp:
                        tmp.write_bytes(before)
        raise


def record_complete(info: Any) -> bool:
    """Whether a parsed record of :data:`MARKER_FILES` describes a finished result: ``complete`` is not false
    (:func:`command_record`; records from before that flag were written only at the end, so they are)."""
    return isinstance(info, dict) and info.get("complete", True) is not False


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def refuse_empty(path: str | os.PathLike | None, what: str = "--out",
                 hint: str = "name a folder (the current one is '.')") -> None:
    """ErfLabError (one line, ``<what> is empty; <hint>``) when ``path`` is an empty or blank string: ``Path("")``
    is the current folder, so a command would otherwise write there (or into its default folder, for ``x or
    default``). Every command's output option goes through this one check."""
    from erf_lab.errors import ErfLabError

    if path is not None and not str(path).strip():
        raise ErfLabError(f"{what} is empty; {hint}")


def check_out_path(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` (``~`` expanded) if it is a folder or can become one; ErfLabError (one line) when it is empty, a
    file, or lies under a file. Creates nothing."""
    from erf_lab.errors import ErfLabError

    refuse_empty(path, what)
    p = Path(path).expanduser()
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == p else f"lies under a file ({parent})"
            raise ErfLabError(f"{what} {p} {where}; choose a folder")
        if parent.is_symlink() and not parent.exists():  # mkdir would say "File exists"
            where = "is a broken symbolic link (" if parent == p else f"lies under a broken symbolic link ({parent}, "
            raise ErfLabError(f"{what} {p} {where}to {os.readlink(parent)}); remove it or choose another {what}")
    return p


#: folders this process holds (:func:`hold_folder`): path -> (open descriptor carrying the lock, holding thread)
_HELD: dict[str, tuple[int, int]] = {}
#: guards ``_HELD``; notified when a folder is let go (a thread of this process waiting for it goes on)
_HELD_CHANGED = threading.Condition()


def _forget_held_in_child() -> None:
    """In a child forked while folders are held (DataLoader and decode workers): close its copies of the lock
    descriptors. A ``flock`` lasts while any copy is open, so a worker the kill of its parent left running (SIGKILL
    gives it no stop) held the folder on, and every later run there was refused as 'in use'. The parent's lock stays."""
    global _HELD_CHANGED
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _HELD_CHANGED = threading.Condition()  # its lock may have been taken by another thread at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_in_child)


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, what: str = "--out", *, subfolders: Sequence[str] = ()) -> Iterator[None]:
    """Hold ``folder`` (which exists) for this process while the block writes a run into it: an advisory lock on
    the folder itself (``flock``; the system drops it when the process ends, a kill included). A second erf-lab
    process writing into the same folder meanwhile (a run resumed in a second shell while it still runs) gets
    ErfLabError (one line) instead of both writing the same state, checkpoints and tables. Re-entrant within the
    thread that holds it; another thread of this process (two sessions of the app measuring the same map) waits
    until it is let go instead of writing beside it (the lock is the process's: it would not stop that thread).
    A no-op where ``fcntl`` is missing (Windows). The refusal is a FolderInUseError (the app words it itself).
    Once taken (not again where this thread held it already), the temporary files that a write killed there left go
    (:func:`remove_write_leftovers`): in ``folder`` and in the ``subfolders`` (relative paths or glob patterns) that
    the command writes itself; never in those of the runs it keeps inside (a sweep's members, a study's runs), which
    their own commands hold and clean."""
    with _hold(Path(folder), folder, what, lock_file=False) as taken:
        if taken:
            remove_write_leftovers(folder, *subfolders)
        yield


def file_lock_path(path: str | os.PathLike) -> Path:
    """The lock file of :func:`hold_file` for ``path``: ``.<name>.lock`` beside it."""
    path = Path(path).expanduser()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def hold_file(path: str | os.PathLike, what: str = "--out", with_files: Sequence[str | os.PathLike] = ()
              ) -> Iterator[None]:
    """Hold the output file ``path`` (whose folder exists; the file need not) while the block writes it and the
    files that go with it, ``with_files`` (``erf-lab reparam``: the checkpoint and its ``.run.json``), as
    :func:`hold_folder` holds a folder: a second erf-lab process writing the same file meanwhile gets the same
    one-line FolderInUseError, a thread of this process waits; other files of the folder are not held. The lock is
    :func:`file_lock_path`, made for the hold and removed when it ends (one a kill left is taken over). Once held,
    the temporary files of earlier writes of these files that a kill left go (:func:`remove_file_leftovers`)."""
    with _hold(file_lock_path(path), path, what, lock_file=True) as taken:
        if taken:
            remove_file_leftovers(path, *with_files)
        yield


@contextlib.contextmanager
def _hold(lock: Path, shown, what: str, lock_file: bool) -> Iterator[None]:
    """:func:`hold_folder` (``lock`` the folder itself) and :func:`hold_file` (``lock_file``: ``lock`` a file made
    for the hold, removed after it); ``shown`` is what the refusal names. Yields whether this call took the lock
    (False where this thread held it already, or nothing can be locked)."""
    from erf_lab.errors import FolderInUseError

    try:
        import fcntl
    except ImportError:  # no flock: unguarded, as before
        yield False
        return
    key = str(lock.expanduser().resolve())
    me = threading.get_ident()
    with _HELD_CHANGED:
        while key in _HELD and _HELD[key][1] != me:  # another thread of this process writes there: after it
            _HELD_CHANGED.wait()
        if key in _HELD:  # this thread holds it already
            nested = True
        else:
            try:
                fd = _take_lock(fcntl, key, lock_file)
            except BlockingIOError:
                raise FolderInUseError(f"{what} {shown} is in use: another erf-lab process is writing a run "
                                       f"there now; wait for it to end (or stop it) and run the command again, or "
                                       f"choose another {what}", shown) from None
            nested = fd is None  # a filesystem without locks: unguarded
            if not nested:
                _HELD[key] = (fd, me)
    if nested:
        yield False
        return
    try:
        yield True
    finally:
        with _HELD_CHANGED:
            del _HELD[key]
            if lock_file:  # removed while still locked: a process waiting on this file sees it gone and retries
                with contextlib.suppress(OSError):
                    os.unlink(key)
            os.close(fd)  # releases the lock
            _HELD_CHANGED.notify_all()


def _take_lock(fcntl, key: str, lock_file: bool) -> int | None:
    """The descriptor of ``key`` locked for this process; BlockingIOError when another process holds it, None on
    a file system without locks. A lock file is made where missing, and taken again when the holder before
    removed it between this process's open and its lock (the one locked would be no longer anyone's)."""
    while True:
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644) if lock_file else os.open(key, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise BlockingIOError(e.errno, e.strerror) from None
            return None
        try:
            if not lock_file or os.path.samestat(os.fstat(fd), os.stat(key)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def holds_folder(folder: str | os.PathLike) -> bool:
    """Whether this thread holds ``folder`` (:func:`hold_folder`)."""
    return _holds(Path(folder))


def _holds(lock: Path) -> bool:
    """Whether this thread holds the lock ``lock`` (a held folder, or the :func:`file_lock_path` of a held file)."""
    with _HELD_CHANGED:
        held = _HELD.get(str(lock.expanduser().resolve()))
    return held is not None and held[1] == threading.get_ident()


def prepare_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create the output folder ``path`` (parents too) and check that files can be written there, before any
    work starts; ErfLabError (one line) when ``path`` or one of its parents is a file, or the folder is not
    writable (read-only filesystem, permissions)."""
    from erf_lab.errors import ErfLabError

    p = check_out_path(path, what)
    made = missing_folders(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_empty_folders(made)
        raise ErfLabError(f"{what} {p} is not writable: {e.strerror or type(e).__name__}") from None
    return p


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what creating it will make, for
    :func:`remove_empty_folders` after a failure."""
    p = Path(path).expanduser()
    return [d for d in [p, *p.parents] if not d.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first, :func:`missing_folders`) that is empty: a failed command leaves
    no empty folder behind; one that holds anything stays."""
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()


#: the kinds of erf-lab result a folder can hold (:func:`result_kind`), as error lines name them
RESULT_KINDS = {"erf": "an ERF run", "training": "a training run", "shape-bias": "a shape-bias run",
                "shape-bias --compare": "a shape-bias comparison", "shape-bias --from-csv": "shape-bias CSV results",
                "bench": "a fastconv benchmark", "sweep": "an ERF sweep", "study": "a study",
                "compare": "an ERF comparison", "timeline": "a training timeline"}

#: the kinds without a run.json: the file each command writes into its folder (its record), and what tells that
#: file from another program's of the same name (sweep and compare: their provenance record's command; study:
#: its settings and model list; timeline: the training run it measured and its rows). sweep, compare and timeline
#: write theirs when they start (:func:`command_record`, ``"complete": false`` until they finish), the study its
#: settings: an interrupted one is recognised too (:func:`record_complete` tells a finished one)
MARKER_FILES = {
    "sweep": ("sweep.json", lambda d: d.get("command") == "sweep"),
    "compare": ("compare.json", lambda d: d.get("command") == "compare"),
    "study": ("study.json", lambda d: isinstance(d.get("settings"), dict) and isinstance(d.get("models"), list)),
    "timeline": ("timeline.json", lambda d: isinstance(d.get("run"), str) and isinstance(d.get("rows"), list)),
}


def is_training_record(info) -> bool:
    """Whether a parsed run.json is what ``erf-lab train`` writes (its settings and model), not another command's."""
    return isinstance(info, dict) and isinstance(info.get("settings"), dict) and \
        isinstance(info.get("model_config"), dict)


def result_kind(folder: str | os.PathLike) -> str | None:
    """Which erf-lab result ``folder`` holds (a key of :data:`RESULT_KINDS`), or None for none. From its run.json
    first ("unknown" for a run.json of no kind erf-lab writes, or one that cannot be read): ERF runs carry
    ``kind`` (files from before the schema: ``layer`` and ``aggregate``), training runs ``settings`` and
    ``model_config``, shape-bias results their command in ``what``, fastconv benchmarks ``command``. Without one,
    from the record of a command that writes none (:data:`MARKER_FILES`: sweep.json, compare.json, study.json,
    timeline.json)."""
    folder = Path(folder).expanduser()  # as prepare_out_dir expands it
    run_json = folder / "run.json"
    if run_json.is_file():
        return _run_json_kind(read_json_or_none(run_json))
    for kind, (name, is_ours) in MARKER_FILES.items():
        info = read_json_or_none(folder / name) if (folder / name).is_file() else None
        if isinstance(info, dict) and is_ours(info):
            return kind
    return None


def _run_json_kind(info) -> str:
    if not isinstance(info, dict):
        return "unknown"
    if info.get("kind") == "erf" or ("kind" not in info and "layer" in info and "aggregate" in info):
        return "erf"
    if is_training_record(info):
        return "training"
    what = info.get("what")
    if isinstance(what, str) and what.startswith("erf-lab shape-bias"):
        return next((f"shape-bias {flag}" for flag in ("--compare", "--from-csv") if flag in what), "shape-bias")
    if info.get("command") == "fastconv.bench":
        return "bench"
    return "unknown"


def refuse_out_inside(out_dir: str | os.PathLike, folder: str | os.PathLike, option: str, harm: str) -> None:
    """ErfLabError (one line) when ``out_dir`` is the input ``folder`` (``option``, read recursively) or inside it:
    the command's outputs would be read as inputs by its next run (``harm`` says how). A hidden sub-folder is not
    listed by the readers (the app's ~/.cache runs below a folder ~): no harm, allowed."""
    from erf_lab.errors import ErfLabError

    root, out = Path(os.path.realpath(Path(folder).expanduser())), Path(os.path.realpath(Path(out_dir).expanduser()))
    if out == root or (root in out.parents and not any(p.startswith(".") for p in out.relative_to(root).parts)):
        raise ErfLabError(f"--out {out_dir} is inside the {option} folder {folder} (read recursively: {harm}); "
                          "choose an --out outside it")


def refuse_other_result(folder: str | os.PathLike, kind: str, what: str = "--out") -> None:
    """The one check of every command that writes a result folder, before it writes: ErfLabError (one line) when
    ``folder`` is empty, a file or under one (:func:`check_out_path`), or holds an erf-lab result of a kind other
    than ``kind`` (its run.json, record and figures would be replaced by another command's). A run.json of no
    kind erf-lab knows is left to the command."""
    from erf_lab.errors import ErfLabError

    check_out_path(folder, what)
    found = result_kind(folder)
    if found not in (None, "unknown", kind):
        raise ErfLabError(f"{what} {folder} holds another erf-lab result ({RESULT_KINDS[found]}); choose another "
                          f"{what}")


def remove_earlier_outputs(folder: str | os.PathLike, keep, names=None) -> None:
    """Delete the files that an earlier run in ``folder`` listed in its run.json ``outputs`` (or ``names``, read
    from its record before this run replaced it) and this run did not write again (``keep``: the names it wrote),
    so that the folder holds one run's results only (a shape-bias run with ``--no-humans`` after one with humans
    had kept the other's error-consistency figure, another model's run its model-vs-human CSVs; a compare
    without figures the earlier comparison's). Only plain file names in ``folder`` itself are touched."""
    if names is None:
        old = read_json_or_none(Path(folder) / "run.json")
        names = old.get("outputs") if isinstance(old, dict) else None
    for name in names if isinstance(names, list) else ():
        if (isinstance(name, str) and name not in keep and name not in ("", ".", "..")
                and Path(name).name == name and (Path(folder) / name).is_file()):
            (Path(folder) / name).unlink()


def read_json_or_none(path: str | os.PathLike) -> Any:
    """The parsed JSON of ``path``, or None when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def as_array(values) -> np.ndarray:
    """``values`` as a numpy array; a torch tensor on any device, requiring grad or not, and a floating one in any
    dtype (bfloat16 / float16, which numpy cannot hold, included) becomes a float64 array."""
    if callable(getattr(values, "detach", None)) and callable(getattr(values, "cpu", None)):  # a torch tensor
        values = values.detach().cpu()
        values = values.double() if values.is_floating_point() else values
    return np.asarray(values)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def load_cached_array(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """A cache file written by :func:`save_cached_array`, memory-mapped read-only; None when it is missing,
    unreadable, truncated or not of ``shape`` and ``dtype`` (the caller then builds it again)."""
    try:
        arr = np.load(Path(path), mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - missing, unreadable, empty or not an .npy file: built again
        return None
    return arr if arr.shape == tuple(shape) and arr.dtype == np.dtype(dtype) else None


def save_cached_array(path: str | os.PathLike, array: np.ndarray) -> np.ndarray:
    """Write ``array`` as a cache file (atomically) and return it memory-mapped read-only; where the cache
    cannot be written, ``array`` itself (the process keeps it in memory)."""
    try:
        save_npy(path, array)
    except OSError:
        return array
    return np.load(path, mmap_mode="r", allow_pickle=False)


#: how every erf-lab figure file is written, whoever drew it (ERF heatmaps, shape-bias and training figures): the
#: PDF's text as embedded TrueType (42), not Type 3 glyph procedures, which journals' PDF checks reject and editors
#: cannot edit; the SVG's text as text. And the same figure gives the same bytes in every run: no creation date in
#: the PDF / SVG (FIGURE_METADATA) and a fixed salt for the SVG's element ids (random by default), so a re-run study
#: or a shipped figure shows no change where none was made
#: One font for every figure, the ERF heatmaps' paper style (Times, as in Ding et al.; DejaVu Serif where no Times
#: is installed): the shape-bias, training and app figures were drawn in pyplot's DejaVu Sans beside them
FIGURE_FONT = {"font.family": "serif",
               "font.serif": ["Times New Roman", "Times", "Nimbus Roman", "Liberation Serif", "DejaVu Serif"]}
FIGURE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "erf-lab", **FIGURE_FONT}
FIGURE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
#: the resolution of every PNG figure, the library's files and the app's downloads alike (the app's were 200)
FIGURE_DPI = 300


def figure_style():
    """``with figure_style():`` around drawing a figure: :data:`FIGURE_RC` (the font is taken when a text is made)."""
    import matplotlib

    return matplotlib.rc_context(FIGURE_RC)


def write_figure(fig, file, fmt: str) -> None:
    """``fig.savefig`` to ``file`` (a path or a binary stream) in ``fmt`` as every erf-lab figure is written: the
    settings :data:`FIGURE_RC`, :data:`FIGURE_DPI` for PNG, no dates; a text drawn outside :func:`figure_style` (in
    pyplot's default sans-serif) takes :data:`FIGURE_FONT` (a monospace text keeps its own)."""
    import matplotlib
    from matplotlib.text import Text

    family = FIGURE_FONT["font.family"]
    with matplotlib.rc_context(FIGURE_RC):
        for text in fig.findobj(Text):
            if text.get_fontfamily() != [family] and "monospace" not in text.get_fontfamily():
                text.set_fontfamily(family)
        fig.savefig(file, format=fmt, dpi=FIGURE_DPI if fmt == "png" else None, bbox_inches="tight",
                    metadata=FIGURE_METADATA.get(fmt))


def save_figure(fig, stem: str | os.PathLike, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Save a matplotlib figure as ``stem.<fmt>`` for each format, atomically (:func:`write_figure`); returns the
    paths."""
    stem = Path(stem)
    out = []
    for fmt in formats:
        target = stem.with_name(stem.name + "." + fmt)
        with atomic_path(target) as tmp:
            try:
                write_figure(fig, tmp, fmt)
            except Exception as e:  # noqa: BLE001 - re-raised, or the OSError it hides
                cause = _os_error_behind(e)
                if cause is None:
                    raise
                # matplotlib's PDF writer, cleaning up after a failed write (a full disk), raises an AttributeError
                # that hides it: the OSError itself, naming the figure (the CLI says it in one line)
                raise OSError(cause.errno, cause.strerror, str(target)) from None
        out.append(target)
    return out


def _os_error_behind(e: BaseException | None) -> OSError | None:
    """The first OSError with an errno in ``e`` and the exceptions it was raised from or while handling."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_list_digest(files: Sequence[str | os.PathLike], root: str | os.PathLike) -> str:
    """SHA-256 of each of ``files``' path relative to ``root``, size and modification time (ns), in their order:
    which files a folder held, told apart without reading them (one added, removed, renamed, rewritten or touched
    changes it; a copy that keeps the times does not). A file gone since it was listed is left out."""
    entries = []
    for p in files:
        try:
            st = Path(p).stat()
        except OSError:  # gone or unreadable since the listing
            continue
        entries.append((Path(p).relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def file_identity(path: str | os.PathLike) -> dict:
    """``{"path": <absolute>, "sha256": ...}`` of an input file (a CSV, a map, weights): which bytes a result was
    made from, whatever the file is called or wherever it moves later (:func:`erf_lab.provenance.provenance`)."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def progress(iterable=None, *, total=None, desc=None, unit="it", disable=None, **kwargs):
    """A tqdm progress bar (rate and ETA) on stderr; silent when stderr is not a terminal unless forced."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
