"""Data-parallel ERF runs under ``torchrun``: rank r takes images r::N, sums and counts are all-reduced
(gloo on CPU, NCCL on CUDA) and rank 0 writes the outputs. Detected from the RANK / WORLD_SIZE variables."""
from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from erf_lab.errors import ErfLabError, int_from_env, on_every_rank, world_size_from_env


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    local_world_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank / world size from the torchrun environment (1 process when absent). What torchrun never sets (a value
    that is no integer, WORLD_SIZE below 1, RANK outside 0 to WORLD_SIZE - 1: variables set by hand) is an
    :class:`ErfLabError`, one line (before: a traceback; RANK=1 alone a process that measured and wrote nothing;
    RANK beyond WORLD_SIZE one that waited 30 minutes for a job it is no part of)."""
    world = world_size_from_env()
    rank = int_from_env("RANK", 0, "the process's number, 0 to WORLD_SIZE - 1")
    local = int_from_env("LOCAL_RANK", 0 if "LOCAL_RANK" in os.environ else rank, "the process's number on its node")
    local_world = int_from_env("LOCAL_WORLD_SIZE", world, "the number of processes on the node")
    if world < 1:
        raise ErfLabError(f"WORLD_SIZE={world} is below 1: torchrun sets it to the number of processes; unset it to "
                          f"run in one process")
    if not 0 <= rank < world:
        if world == 1 and not os.environ.get("WORLD_SIZE", "").strip():
            raise ErfLabError(f"RANK={rank} is set but WORLD_SIZE is not: torchrun sets both (RANK from 0 to "
                              f"WORLD_SIZE - 1); unset RANK to run in one process, or start the job with torchrun")
        raise ErfLabError(f"RANK={rank} is outside 0 to {world - 1} (WORLD_SIZE={world}): torchrun numbers the "
                          f"processes from 0 to WORLD_SIZE - 1; start the job with torchrun, or set RANK and "
                          f"WORLD_SIZE to match")
    return DistInfo(rank=rank, world_size=world, local_rank=local, local_world_size=local_world)


def restarted() -> bool:
    """Whether torchrun started this job again after a failure (``--max-restarts``: ``TORCHELASTIC_RESTART_COUNT``
    above 0). The restart runs the same command line: a run folder holding what the failed try saved (or finished)
    is continued, as with ``--resume`` (before, the command refused it, so ``--max-restarts`` could never help)."""
    text = os.environ.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    return text.isdigit() and int(text) > 0


def job_started() -> float | None:
    """When the torchrun agent that started this process began (seconds since the epoch): the same for every try
    of a job that torchrun restarts, and for every rank of a node. None outside torchrun (no
    ``TORCHELASTIC_RUN_ID``) or where ``/proc`` cannot tell (not Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:  # the agent is the parent of each worker it starts
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


#: how long a rank of a multi-process job waits for the others (joining, each collective), in seconds
RANK_TIMEOUT_VAR = "ERF_LAB_RANK_TIMEOUT"


def rank_timeout() -> timedelta | None:
    """The process group's timeout from ``ERF_LAB_RANK_TIMEOUT`` (seconds): how long a rank waits for the others
    before it stops, where one hangs rather than dies. None when unset: torch's default (30 minutes; NCCL's 10).
    Anything but a positive number is an :class:`ErfLabError`, one line."""
    text = os.environ.get(RANK_TIMEOUT_VAR, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ErfLabError(f"{RANK_TIMEOUT_VAR}={text!r} is not a positive number of seconds: it is how long a rank "
                          f"of a multi-process job waits for the others (e.g. 600); unset it for torch's default "
                          f"(30 minutes, NCCL's 10)")
    return timedelta(seconds=seconds)


def init(device: str = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun (idempotent), with :func:`rank_timeout`; returns this
    process's place."""
    info = env_info()
    if info.world_size <= 1:
        return info
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    timeout = rank_timeout()  # a bad value: refused on every rank, before any joins the group
    own = device_for(device, info)  # an unusable --device fails here, on every rank, before any joins the group
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(torch.device(own))
        join(backend, info, timeout)
        if backend == "nccl":
            group = dist.new_group(backend="gloo", timeout=timeout)  # the check itself must not need distinct GPUs
            try:
                refuse_shared_gpus(gpu_identity(own), info, group)
            except ErfLabError as e:  # the same line on every rank (the identities met in one all-gather)
                dist.destroy_process_group()
                raise on_every_rank(e)
            dist.destroy_process_group(group)
    return DistInfo(info.rank, info.world_size, info.local_rank, dist.get_backend(), info.local_world_size)


def join(backend: str, info: DistInfo, timeout: timedelta | None = None) -> None:
    """``init_process_group`` at torchrun's MASTER_ADDR:MASTER_PORT, waiting ``timeout`` for the others (None:
    torch's default); a job this process cannot join is an :class:`ErfLabError`, one line naming the variables
    (before: a ValueError or DistNetworkError traceback): MASTER_ADDR / MASTER_PORT unset or no port (set by hand,
    without torchrun), the port in use on rank 0 (another job's), the other ranks not met in time."""
    addr = os.environ.get("MASTER_ADDR", "").strip()
    port = int_from_env("MASTER_PORT", 0, "the port of rank 0's rendezvous")
    who = f"rank {info.rank} of {info.world_size} cannot join its torchrun job"
    if not addr or not port:
        unset = " and ".join(k for k, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not v)
        raise ErfLabError(f"{who}: {unset} {'is' if ' and ' not in unset else 'are'} not set (torchrun sets "
                          f"MASTER_ADDR and MASTER_PORT); start the job with torchrun, or set both in every process")
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except (ValueError, RuntimeError) as e:  # RuntimeError: dist.DistError, gloo's "connectFullMesh failed"
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise ErfLabError(f"{who}: port {port} of {addr} (MASTER_PORT) is in use, by another job or program; "
                              f"choose a free one (torchrun --master_port)") from None
        if _TIMED_OUT.search(text):
            raise ErfLabError(f"{who} at {addr}:{port} (MASTER_ADDR:MASTER_PORT): no answer from the other ranks "
                              f"within {_timeout_said()}") from None
        raise ErfLabError(f"{who} at {addr}:{port} (MASTER_ADDR:MASTER_PORT): {text}") from None


def gpu_identity(device: str) -> str:
    """The GPU's UUID (unique across machines), as ``nvidia-smi -L`` prints it; without one, its PCI address on this
    host."""
    import socket

    props = torch.cuda.get_device_properties(torch.device(device))
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    pci = ":".join(str(getattr(props, f"pci_{k}_id", "?")) for k in ("domain", "bus", "device"))
    return f"{props.name} at PCI {pci} of {socket.gethostname()}"


def refuse_shared_gpus(gpu: str, info: DistInfo, group=None) -> None:
    """All-gather every rank's (host, GPU identity) and raise one :class:`ErfLabError`, the same on every rank,
    where two ranks hold one GPU. A whole torchrun job under ``CUDA_VISIBLE_DEVICES=0`` (each process sees one GPU,
    which the ``device_for`` check must take for a per-process choice) otherwise fails at the first collective with
    NCCL's "Duplicate GPU detected"."""
    import socket

    items = [None] * info.world_size
    dist.all_gather_object(items, (socket.gethostname(), gpu), group=group)
    first: dict = {}
    for rank, (host, ident) in enumerate(items):
        if ident in first:
            other, other_host = first[ident]
            where = host if host == other_host else f"{other_host} and {host}"
            raise ErfLabError(f"ranks {other} and {rank} run on the same GPU ({ident} on {where}): NCCL runs one "
                              f"process per GPU; give each its own (leave CUDA_VISIBLE_DEVICES unset for the whole "
                              f"job, or set it per process) or start fewer (--nproc_per_node)")
        first[ident] = (rank, host)


def device_for(device: str, info: DistInfo) -> str:
    """This process's device in a multi-process run: ``cuda`` -> ``cuda:<local_rank>`` (``cuda:0`` where the
    launcher gave the process a GPU of its own: one GPU seen, and ``CUDA_VISIBLE_DEVICES`` set or a launcher other
    than torchrun). ``cuda:N`` is kept
    where torchrun started one process on this node or the process has its own GPU, and refused where it started
    several: they would all share GPU N. More processes on a node than it has GPUs are refused too (NCCL runs one
    process per GPU; two on one fail with "Duplicate GPU detected"). Refusals are :class:`ErfLabError`, the same on
    every rank, before any joins the group. Without ``LOCAL_WORLD_SIZE`` (a launcher other than torchrun) every
    process counts as on this node."""
    if not info.enabled or not str(device).startswith("cuda"):
        return device
    try:
        index = torch.device(device).index
    except RuntimeError:
        raise ErfLabError(f"--device {device!r} is no device name; use cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count()
    # one GPU seen is the process's own where a launcher chose it per process (CUDA_VISIBLE_DEVICES), or where the
    # launcher is not torchrun (no LOCAL_WORLD_SIZE; e.g. a container per process); torchrun's processes on a node
    # share the node's GPUs
    torchrun = "LOCAL_WORLD_SIZE" in os.environ
    own_gpu_only = count == 1 and (bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or not torchrun)
    if torchrun and info.local_world_size > 1 and 0 < count < info.local_world_size and not own_gpu_only:
        raise ErfLabError(f"torchrun started {info.local_world_size} processes on this node, which has {count} "
                          f"GPU{'s' if count > 1 else ''}: NCCL runs one process per GPU; start at most {count} "
                          f"(--nproc_per_node) or use --device cpu")
    if index is None:
        return "cuda:0" if own_gpu_only else f"cuda:{info.local_rank}"
    if info.local_world_size > 1 and not own_gpu_only:
        raise ErfLabError(f"--device {device} names one GPU, but torchrun started {info.local_world_size} processes "
                          f"on this node: pass --device cuda (process i takes cuda:<LOCAL_RANK>) and choose the GPUs "
                          f"with CUDA_VISIBLE_DEVICES")
    return device


def shard(items: list, info: DistInfo) -> list:
    """This rank's share: ``items[rank::world_size]``."""
    return list(items)[info.rank::info.world_size]


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class HeldChecks:
    """``with HeldChecks() as checks:`` around the checks a process makes before joining its torchrun job: an
    :class:`ErfLabError` raised inside is kept in ``checks.error`` (the rest of the block skipped) to be said once the
    ranks have met (:func:`gather_or_fail`), so a check that fails on one node only (its files, its CPU count) does
    not leave the others waiting in ``init_process_group``. Outside torchrun, or while ``hold`` is False (a check
    whose failure keeps this process from joining at all), it is raised at once."""

    def __init__(self, hold: bool = True):
        self.hold, self.error = hold, None

    def __enter__(self) -> "HeldChecks":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, ErfLabError) and self.hold and env_info().enabled:
            self.error = error
            return True
        return False


@contextlib.contextmanager
def checked_together(device: str = "cpu"):
    """``with checked_together(device):`` around a command's checks of its own options, made before the call that
    joins the torchrun job: an :class:`ErfLabError` raised inside is held (:class:`HeldChecks`), the ranks join the
    job (``device``: the command's, so the backend is the one the others join with) and meet in
    :func:`gather_or_fail`, so that the error every rank raises alike (they run the same command line) is said once
    per node, not once per process. Outside torchrun, or where this process cannot join (an unusable ``device``),
    it is raised at once."""
    with HeldChecks() as checks:
        yield
    if checks.error is not None:
        try:
            info = init(device)
        except Exception:  # noqa: BLE001 - the option's error is the one to say (by this process, as before)
            raise checks.error from None
        try:
            gather_or_fail(None, checks.error, info)
        finally:
            shutdown(info)


@contextlib.contextmanager
def said_once_per_node(info: DistInfo):
    """The warnings of the block said by the node's first process alone (``LOCAL_RANK`` 0), the others silent: for
    what every process of a node meets alike (its image folder's unreadable and foreign files), which was said once
    per process. Outside torchrun, or in the node's first process, the block's warnings are as they are."""
    if info.local_rank == 0 or not info.enabled:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


#: what gloo and NCCL raise (a RuntimeError) in a collective whose other processes are gone (crashed, killed) or
#: stopped answering (the process group's timeout: :func:`rank_timeout`)
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting|timeout caused pair "
                        r"closure|NCCL communicator was aborted", re.IGNORECASE)
#: the timeout's own (gloo's "Timed out waiting 10000ms for recv", the store's "wait timeout after 10000ms",
#: gloo's "Connect timeout", "Application timeout caused pair closure" in the collectives after it)
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def _timeout_said() -> str:
    """The process group's timeout as the error lines say it, naming the setting."""
    try:
        timeout = rank_timeout()
    except ErfLabError:  # not joined with it: the default
        timeout = None
    if timeout is None:
        return f"torch's default timeout (30 minutes, NCCL's 10; {RANK_TIMEOUT_VAR} sets it, in seconds)"
    return f"{timeout.total_seconds():g} s ({RANK_TIMEOUT_VAR})"


def peers_lost(error: BaseException) -> str | None:
    """The line the CLI says for ``error`` when it is a collective of a torchrun job (or one another launcher
    started with RANK / WORLD_SIZE) that failed because another process is gone or stopped answering (before:
    gloo's RuntimeError traceback), else None."""
    try:
        if world_size_from_env() <= 1 or not isinstance(error, RuntimeError):
            return None
    except ErfLabError:
        return None
    text = str(error).strip()
    if not _PEER_LOST.search(text):
        return None
    if _TIMED_OUT.search(text):  # a rank that hangs (or is that slow): nothing of its own output says so
        return (f"another process of this multi-process job stopped answering: no answer from the other ranks "
                f"within {_timeout_said()}; what was saved is kept (compute and train continue with --resume, a "
                f"sweep with the same command)")
    # gloo's: "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23432. This is typically..."
    said = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0]
    return (f"another process of this multi-process job is gone or stopped answering ({said}): its own output says "
            f"why; what was saved is kept (compute and train continue with --resume, a sweep with the same command)")


def error_text(error: BaseException) -> str:
    """How another rank names ``error``: an :class:`ErfLabError`'s line, else its type and message."""
    return str(error) if isinstance(error, ErfLabError) else f"{type(error).__name__}: {error}"


def decided_on_rank0(decide, info: DistInfo):
    """``decide()`` run on rank 0 alone (a decision the ranks would race on: what a folder holds, its first
    writes), its result given to every rank (it must pickle; None where nothing is to be shared). When it raises,
    every rank stops: an :class:`ErfLabError` with the same line on every rank (said once per node), any other
    error as it is on rank 0 and as "rank 0 stopped: ..." elsewhere, so no rank is left waiting in a collective."""
    result, error = None, None
    if info.is_main:
        try:
            result = decide()
        except Exception as e:  # noqa: BLE001 - every rank learns of it below
            error = e
    if not info.enabled:
        if error is not None:
            raise error
        return result
    said = broadcast_object(("ok", result) if error is None else
                            ("error", error_text(error), isinstance(error, ErfLabError)), info)
    if said[0] == "ok":
        return said[1]
    if error is not None:
        raise on_every_rank(error) if isinstance(error, ErfLabError) else error
    raise on_every_rank(ErfLabError(said[1] if said[2] else f"rank 0 stopped: {said[1]}"))


def gather_or_fail(obj, error: BaseException | None, info: DistInfo) -> list:
    """Every rank's ``obj`` (one all-gather), in rank order. A rank that failed before this point passes its
    ``error`` instead: then it raises that error and every other rank one line naming it, so no rank is left waiting
    in a later collective or dying of a closed connection without saying why."""
    if not info.enabled:
        if error is not None:
            raise error
        return [obj]

    mine = ("ok", obj) if error is None else ("error", error_text(error))
    items = [None] * info.world_size
    dist.all_gather_object(items, mine)
    if error is not None:
        if isinstance(error, ErfLabError) and all(item == mine for item in items):
            on_every_rank(error)  # every rank failed alike (the same bad option): said once per node
        raise error
    failed = next(((r, msg) for r, (kind, msg) in enumerate(items) if kind == "error"), None)
    if failed:  # the failed rank says why; the others' one line naming it: once per node
        raise on_every_rank(ErfLabError(f"rank {failed[0]} stopped: {failed[1]}"))
    return [o for _, o in items]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def make_reducer(info: DistInfo, shape: tuple[int, int], device: str = "cpu"):
    """A ``compute_erf`` reducer: all-reduce (sum, count) in float64 and gather processed / skipped ids."""
    def reduce(acc):
        from erf_lab.erf.compute import Accumulator

        if not info.enabled:
            return acc
        dev = torch.device(device if info.backend == "nccl" else "cpu")
        s = torch.from_numpy(acc.sum if acc.sum is not None else np.zeros(shape)).to(dev, torch.float64)
        c = torch.tensor([float(acc.count)], dtype=torch.float64, device=dev)
        dist.all_reduce(s)
        dist.all_reduce(c)
        lists = [None] * info.world_size
        dist.all_gather_object(lists, (acc.processed, acc.skipped))
        processed = [p for pr, _ in lists for p in pr]
        skipped = [s_ for _, sk in lists for s_ in sk]
        return Accumulator(sum=s.cpu().numpy(), count=int(round(c.item())), processed=processed, skipped=skipped)

    return reduce


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
