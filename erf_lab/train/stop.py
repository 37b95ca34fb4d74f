"""Stopping a training run: Ctrl-C (SIGINT) or ``kill`` (SIGTERM).

The first signal asks the run to stop after the current step, so the saved state is always a consistent step
boundary; a second one stops at once. Before the training loop is armed (building the model and the data,
rendering the cue-world cache) there is nothing to save, and the first signal stops at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from erf_lab.erf import distributed as D


class ForcedStop(KeyboardInterrupt):
    """Stop at once, without saving (the last saved state stays the resume point). ``args[0]``: the signal."""


class _Held:
    """Stops held back by :func:`held` in the main thread: how deep, and the one that came meanwhile."""

    depth = 0
    pending: ForcedStop | None = None


def held():
    """Context in which a forced stop waits until the block has finished, then is raised: for library code that a
    stop must not cut in half. Only in the main thread, where handlers run."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return _hold()


@contextlib.contextmanager
def _hold():
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if _Held.depth == 0 and _Held.pending is not None:
            stop, _Held.pending = _Held.pending, None
            raise stop


_END = object()


def iterate(loader):
    """The batches of a DataLoader; a forced stop comes between two batches, never inside the DataLoader. Cut in
    half, starting the worker processes left an iterator whose ``__del__`` failed ("no attribute '_workers'"), and
    receiving a batch left the sending worker printing a ConnectionResetError. On a stop the workers are shut
    down before the stop goes on, explicitly: a stop that came while they started is raised once ``iter`` has
    returned, and the traceback then keeps the iterator alive past the process's end (``exit_now``), which left the
    workers running on with the process's pipes open (a shape-bias run interrupted while its decode workers
    started)."""
    batches = None
    try:
        with held():
            batches = iter(loader)
        while True:
            with held():
                batch = next(batches, _END)
            if batch is _END:
                return
            yield batch
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # worker processes: joined (or ended) here
        if shutdown is not None:
            shutdown()
        del batches


def die_with_parent(parent: int, worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn`` (``functools.partial(die_with_parent, os.getpid())``): on Linux the worker is
    killed when ``parent``, the process that started it, ends. A worker outlived a parent killed with SIGKILL
    (no stop reaches it then) for good when its results filled the pipe to the dead parent: its exit waited on
    writing them (a shape-bias run killed while decoding left two such processes per kill)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # no prctl: the worker's own watchdog is all there is
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(0)


def stop_handling():
    """:class:`StopRequest` where Python's default Ctrl-C handling is in place (main thread), else a no-op context:
    library code that iterates DataLoaders with :func:`iterate` outside a training run (shape-bias decoding and
    inference) gets the handling that keeps worker start-up and batch transfer whole, and inside a run that has
    its own (the training lab's), that run's stays. SIGTERM is taken over only where it has the default action (a
    caller's own handler stays); a stop by it then ends the command as Ctrl-C does, as in a training run."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        term = (signal.SIGTERM,) if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else ()
        return StopRequest((signal.SIGINT, *term))
    return contextlib.nullcontext()


class StopRequest:
    """The run's signal handlers for ``signals`` (SIGINT and SIGTERM) while in the ``with`` block (main thread only).

    Python runs a signal handler in whatever Python code the main thread is executing; where that is a finaliser
    or a callback (``__del__``; a fork hook: logging's runs each time a DataLoader starts a worker) the handler's
    exception is printed as "Exception ignored" and lost, and the run would go on. A stop lost that way is sent
    again (``REDELIVER_S`` later, from a timer thread) until it lands in ordinary code."""

    REDELIVER_S = 0.02

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.requested = False
        self.armed = False
        self._old = {}
        self._old_hook = None
        self._timer = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handler)
            self._old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _handler(self, signum, frame):
        if self.armed and not self.requested:
            self.requested = True
            return
        stop = ForcedStop(signum)
        if _Held.depth:
            _Held.pending = _Held.pending or stop
            return
        raise stop

    def _unraisable(self, unraisable):
        """``sys.unraisablehook`` while installed: a swallowed :class:`ForcedStop` is delivered again, silently."""
        stop = unraisable.exc_value
        if not isinstance(stop, ForcedStop):
            return self._old_hook(unraisable)
        signum = stop.args[0] if stop.args else signal.SIGTERM
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Timer(self.REDELIVER_S, signal.pthread_kill,
                                          (threading.main_thread().ident, signum))
            self._timer.daemon = True
            self._timer.start()

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._old_hook is not None:
            sys.unraisablehook = self._old_hook

    def check(self, info: D.DistInfo, device="cpu", diverged: bool = False, save_due: bool = False
              ) -> tuple[bool, bool]:
        """Raise KeyboardInterrupt when any rank was asked to stop (all ranks stop at the same step); else whether
        any rank reported ``diverged`` (a non-finite loss) and whether any rank's periodic save is ``save_due``, in
        the same all-reduce, so all ranks act on them alike (a save gathers from every rank)."""
        flags = [float(self.requested), float(diverged), float(save_due)]
        if info.enabled:
            t = torch.tensor(flags, device=device if info.backend == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        if flags[0]:
            raise KeyboardInterrupt
        return bool(flags[1]), bool(flags[2])
