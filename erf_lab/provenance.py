"""How a result was made: versions, time and command line, recorded by every output directory."""
from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
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
    """``{"erf_lab": ..., "erf_lab_commit": ..., "python": ..., "platform": ..., <package>: <version>}`` for the
    packages in use (never imports torch); ``erf_lab_commit``: :func:`source_commit`, ``platform``: the OS
    (``platform.platform()``)."""
    import erf_lab

    out = {"erf_lab": erf_lab.__version__, "erf_lab_commit": source_commit(), "python": sys.version.split()[0],
           "platform": platform.platform()}
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


def host(device=None) -> dict:
    """The machine a result was made on: ``cpu_model`` and ``isa`` (fastconv.roofline.cpu_description),
    ``cpu_count``, ``threads`` (torch's intra-op threads; None where torch is not loaded: nothing ran on it) and
    ``device`` (``str(device)``, None for a command that runs no model), with ``gpu``, the CUDA device's name, for a
    CUDA device."""
    from fastconv.roofline import cpu_description

    torch = sys.modules.get("torch")
    out = {**cpu_description(), "threads": torch.get_num_threads() if torch is not None else None,
           "device": None if device is None else str(device)}
    if torch is not None and device is not None and str(device).startswith("cuda"):
        try:
            out["gpu"] = torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):  # no CUDA here: the record says the device asked for
            out["gpu"] = None
    return out


def source_identity(folder: str | os.PathLike, record: dict | None, files: Sequence[dict] = ()) -> dict:
    """Which earlier result a derived one (analyze, compare, timeline, shape-bias --compare) was made from:
    ``path``, the source's own record of when and by what it was made (``command``, ``time`` / ``start_time``,
    ``erf_lab_commit``, ``model``, ``kernel_sizes``, ``seed``, ``random_init``, each where that record says it; of a
    training run's record, its ``settings`` and ``model_config``) and ``files``, the digests of the files read from
    it (:func:`erf_lab.io.file_identity`; a training run's run.json itself), so a rerun source is told from the one
    used."""
    rec = record if isinstance(record, dict) else {}
    prov = rec.get("provenance") if isinstance(rec.get("provenance"), dict) else rec
    made = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    trained = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    config = rec.get("model_config") if isinstance(rec.get("model_config"), dict) else {}
    out = {"path": str(Path(folder).resolve()), "command": prov.get("command") or rec.get("what"),
           "time": rec.get("start_time") or prov.get("time") or rec.get("time_utc"),
           "erf_lab_commit": made.get("erf_lab_commit"), "model": rec.get("model") or trained.get("model"),
           "kernel_sizes": rec.get("kernel_sizes") or config.get("kernel_sizes"),
           "seed": rec.get("seed", trained.get("seed")),
           "random_init": rec.get("random_init", rec.get("random_weights"))}
    out = {k: v for k, v in out.items() if v is not None}
    if files:
        out["files"] = list(files)
    return out


def provenance(command: str, params: dict, argv: Sequence[str] | None = None, *, device=None,
               inputs: Sequence[dict] | None = None, derived_from: Sequence[dict] | None = None) -> dict:
    """The record every output directory carries: command, parameters, argv, cwd, versions, ``host``
    (:func:`host`: CPU, threads, device), time (the start), and ``launch`` (:func:`launch`: torchrun's part of the
    command, None for one process); where given, ``inputs`` (:func:`erf_lab.io.file_identity` of the files read) and
    ``derived_from`` (:func:`source_identity` of the results it was made from). :func:`erf_lab.io.command_record`
    adds ``end_time`` and ``wall_seconds`` when the command completes."""
    out = {"command": command, "argv": list(argv) if argv is not None else list(sys.argv), "cwd": os.getcwd(),
           "launch": launch(), "parameters": params, "versions": versions(), "host": host(device), "time": now()}
    if inputs is not None:
        out["inputs"] = list(inputs)
    if derived_from is not None:
        out["derived_from"] = list(derived_from)
    return out


def finished(started: float) -> dict:
    """``{"end_time": now(), "wall_seconds": <since started>}`` for a record, ``started`` a ``time.monotonic()``."""
    import time

    return {"end_time": now(), "wall_seconds": round(time.monotonic() - started, 2)}
