"""Small JSON tables that several processes update (fastconv's autotune and roofline caches, erf-lab's structure
caches): read, merge, rewrite atomically, all under an advisory lock on a ``<table>.lock`` file beside the table,
so two processes that update at once (the ranks of one ``torchrun``, a sweep's workers) both keep their entries.

Readers take no lock: the table is only ever replaced whole (``os.replace``), never seen half written. Where
``fcntl`` is missing (Windows), the lock file cannot be created (a read-only cache) or the file system refuses the
lock (some NFS / FUSE mounts), updates run unlocked, as before: the last writer wins, and what it lost is measured
again later. No torch import here.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def read_table(path: str | os.PathLike) -> dict:
    """The table in ``path``; {} when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of table ``path`` (blocking) for the ``with`` block."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    try:  # read-only: flock needs no write access (another user's lock file in a shared cache folder still locks)
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks (some NFS / FUSE mounts): unlocked
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def plain_mode(path: str | os.PathLike, executable: bool = False) -> None:
    """Give ``path`` (a file made by ``tempfile.mkstemp``, which is owner-only) the mode a plain ``open()`` (or, with
    ``executable``, a compiler) would give it under the process's umask: 0644 / 0755 under the usual 022. Another
    user of a shared cache folder must be able to read what this process wrote there: an owner-only table read as
    empty, and was then replaced with that user's entries alone; an owner-only kernel library could not be loaded."""
    os.chmod(path, (0o777 if executable else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask: from /proc where Linux has it (setting the umask to read it leaves it 0 for a moment,
    and a file another thread creates then is world-writable), else set and restored."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: a temporary file this old has no live writer (a kernel build takes ~15 s, a table rewrite milliseconds): it was
#: left by a process killed mid-write (SIGKILL, power loss), and nothing else would ever remove it
STALE_TEMPORARY_S = 3600.0
#: the random part of a ``tempfile.mkstemp`` name
MKSTEMP_RANDOM = r"[a-z0-9_]{8}"


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str, older_than_s: float = STALE_TEMPORARY_S
                             ) -> list[Path]:
    """Remove the regular files in ``folder`` whose whole name matches the regular expression ``pattern`` (the
    ``tempfile.mkstemp`` names of a writer that renames its file away when it finishes) and that were last modified
    more than ``older_than_s`` ago; returns those removed. Never raises: a file another process removed first, one
    this user may not remove or an unreadable folder is left as it is (the leftovers are harmless, only clutter)."""
    removed = []
    name = re.compile(pattern)
    cutoff = time.time() - older_than_s
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if (name.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _temporary_pattern(path: Path) -> str:
    """The names of ``update_table``'s temporary files for table ``path`` (``.<table>.<random>.tmp``)."""
    return re.escape(f".{path.name}.") + MKSTEMP_RANDOM + re.escape(".tmp")


def update_table(path: str | os.PathLike, merge: Callable[[dict], dict]) -> dict:
    """Under the table's lock: read it, ``merge(table)`` -> the new table, write that atomically; returns it.
    Raises ``OSError`` when the folder cannot be written and ``TypeError`` for a value JSON cannot hold (callers
    that treat the table as a cache skip it; the table on disk is then unchanged). Removes the temporary files of
    this table's writers killed over an hour ago (``remove_stale_temporaries``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, _temporary_pattern(path))  # an earlier writer's, killed mid-write
    with locked(path):
        table = merge(read_table(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(table, fh, indent=1, sort_keys=True)  # TypeError for what JSON cannot hold
            plain_mode(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return table


def store(path: str | os.PathLike, key: str, value: Any) -> None:
    """``table[key] = value`` in table ``path`` (see ``update_table``)."""
    update_table(path, lambda table: {**table, key: value})
