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


#: what a launcher's argv names itself by: torchrun's console script, or ``python -m torch.distributed.run``
_TORCHRUN_NAMES = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


def _parent_argv() -> list[str] | None:
    """The command line of this process's parent (Linux ``/proc``), else None."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw.endswith(b"\0") else []
    return args or None


def launch() -> dict | None:
    """How several processes of this job were started, which the command line (``erf-lab train ...``) alone does
    not say: None for one process (no ``WORLD_SIZE`` above 1, no torchrun). Under torchrun (``TORCHELASTIC_RUN_ID``
    set): ``launcher`` "torchrun", ``world_size``, ``local_world_size`` (processes per node), ``nnodes`` and the
    agent's ``restart_count``, and ``argv``, torchrun's own command line (the process's parent: the command that
    reruns the job), or None where it cannot be read (then ``note`` says how to rerun)."""
    env = os.environ
    world = env.get("WORLD_SIZE", "").strip()
    world = int(world) if world.isdigit() else 1
    torchrun = bool(env.get("TORCHELASTIC_RUN_ID"))
    if world <= 1 and not torchrun:
        return None

    def number(name, default=None):
        text = env.get(name, "").strip()
        return int(text) if text.isdigit() else default

    local = number("LOCAL_WORLD_SIZE", world)
    out = {"launcher": "torchrun" if torchrun else "unknown (RANK / WORLD_SIZE set by another launcher)",
           "world_size": world, "local_world_size": local,
           "nnodes": number("GROUP_WORLD_SIZE", world // local if local else None),
           "restart_count": number("TORCHELASTIC_RESTART_COUNT", 0), "argv": None}
    parent = _parent_argv() if torchrun else None
    if parent and any(Path(a).name in _TORCHRUN_NAMES for a in parent[:3]):
        out["argv"] = parent
    else:
        out["note"] = (f"started as {world} processes ({local} per node); rerun with torchrun --nnodes "
                       f"{out['nnodes']} --nproc_per_node {local} -m erf_lab <the command>")
    return out


def provenance(command: str, params: dict, argv: Sequence[str] | None = None) -> dict:
    """The record every output directory carries: command, parameters, argv, cwd, versions, time, and ``launch``
    (:func:`launch`: torchrun's part of the command, None for one process)."""
    return {"command": command, "argv": list(argv) if argv is not None else list(sys.argv), "cwd": os.getcwd(),
            "launch": launch(), "parameters": params, "versions": versions(), "time": now()}
