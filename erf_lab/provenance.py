"""How a result was made: versions, time and command line, recorded by every output directory."""
from __future__ import annotations

import datetime as _dt
import functools
import os
import sys
from pathlib import Path
from typing import Sequence

#: packages whose versions shape the numbers and figures; recorded when already imported or cheap to import
_PACKAGES = ("torch", "captum", "numpy", "scipy", "matplotlib", "PIL", "safetensors", "timm")


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=4)
def source_commit(root: str | None = None) -> str | None:
    """The git commit of the erf-lab source this process runs (or of the checkout at ``root``), with ``+dirty``
    when tracked files differ from it (``erf_lab.__version__`` stays 0.1.0 from commit to commit, so it alone cannot
    say which code made a result); None outside a git checkout (an installed package) or without git. Read once."""
    import subprocess

    import erf_lab

    root = Path(root) if root is not None else Path(erf_lab.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")  # no index write
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict:
    """``{"erf_lab": ..., "erf_lab_commit": ..., "python": ..., <package>: <version>}`` for the packages in use
    (never imports torch); ``erf_lab_commit``: :func:`source_commit`."""
    import erf_lab

    out = {"erf_lab": erf_lab.__version__, "erf_lab_commit": source_commit(), "python": sys.version.split()[0]}
    for name in _PACKAGES:
        mod = sys.modules.get(name)
        if mod is None and name in ("numpy", "matplotlib", "scipy"):
            try:
                mod = __import__(name)
            except ImportError:
                mod = None
        if mod is not None:  # plain str (torch's is a TorchVersion, which a weights-only state refuses to hold)
            version = getattr(mod, "__version__", None)
            out[name] = None if version is None else str(version)
    return out


def provenance(command: str, params: dict, argv: Sequence[str] | None = None) -> dict:
    """The record every output directory carries: command, parameters, argv, cwd, versions, time."""
    return {"command": command, "argv": list(argv) if argv is not None else list(sys.argv), "cwd": os.getcwd(),
            "parameters": params, "versions": versions(), "time": now()}
