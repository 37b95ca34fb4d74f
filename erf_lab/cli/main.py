"""Entry point of the ``erf-lab`` console script."""
from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import logging
import os
import pkgutil
import sys
import time

from erf_lab import __version__
from erf_lab.errors import (OUT_OF_MEMORY_HINT, ErfLabError, on_every_rank, out_of_memory, printed_here,
                            world_size_from_env)

EXIT_USAGE = 2
#: the reader of the output left (`erf-lab models --json | head`): the status a shell gives a process that
#: SIGPIPE ended (128 + 13), as `cat` or `grep` end there
EXIT_BROKEN_PIPE = 141
#: a torchrun process that leaves an error to its node's first process waits this long before exiting
SILENT_EXIT_DELAY_S = 1.0
#: the console script's generation-0 collection threshold (Python's default: 700). A command imports torch and
#: builds a model: ~10^6 long-lived objects, which the default scans in four full collections (0.3 s of an
#: ``erf-lab compute`` process on the dev box, issue 14); at 20000 there are none, and cyclic garbage is still
#: collected, after 20000 allocations instead of 700
GC_THRESHOLD = 20_000
#: a file that cannot be read or written (permissions, read-only, full disk, a name longer than the file system
#: allows: Path.exists() and the like raise that one): one error line, not a traceback
_CANNOT_ACCESS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def _command_modules():
    import erf_lab.cli.commands as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


def _distributed_commands() -> dict[str, bool]:
    """{command: whether it runs under torchrun}, in the help's order."""
    return {m.NAME: getattr(m, "DISTRIBUTED", False) for m in _command_modules()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erf-lab",
        description="Effective receptive fields and shape bias of large-kernel CNNs (RepLKNet, CVPR 2022).",
    )
    parser.add_argument("--version", action="version", version=f"erf-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _distributed=getattr(mod, "DISTRIBUTED", False))
    return parser


def _check_environment() -> None:
    """ErfLabError (one line, exit 2, before any work) for a ``$FASTCONV_BACKEND`` / ``$FASTCONV_AUTOTUNE`` /
    ``$FASTCONV_CACHE`` / ``$FASTCONV_CPU_LANES`` that fastconv refuses: it raised its ValueError from a command's
    first convolution, after the model was built, as a traceback (``fastconv.config`` imports no torch); and for an
    erf-lab yes / no setting (``erf_lab.paths.ENV_FLAGS``) that is neither."""
    from fastconv import config

    try:
        config.settings()
        config.requested_lanes()
    except ValueError as e:
        raise ErfLabError(str(e)) from None
    from erf_lab.paths import ENV_FLAGS, env_flag

    for name in ENV_FLAGS:  # erf-lab's own yes / no settings, read later deep in a run: a bad value before any work
        env_flag(name)


def _checked_together(args: argparse.Namespace):
    """The context of the checks every command makes first: under torchrun
    :func:`erf_lab.erf.distributed.checked_together` (an error every rank meets alike said once per node, after the
    ranks have met: a command that runs under torchrun with its ``--device``, one refused there on the CPU), else
    none (torch is not imported for them)."""
    if world_size_from_env() <= 1:
        return contextlib.nullcontext()
    from erf_lab.erf.distributed import checked_together

    return checked_together(getattr(args, "device", "cpu") if args._distributed else "cpu")


def _end_progress_bars() -> None:
    """Close the progress bars still open, so that the one line that follows stands on its own line, not after a
    bar's text. A stop can come while a bar is being created (shown once, its ``__init__`` cut short): such a bar
    cannot close, and a newline ends its text instead."""
    std = sys.modules.get("tqdm.std")
    cut_short = False
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error being reported
            cut_short = True
    if cut_short:
        sys.stderr.write("\n")


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone (a pipe to ``head`` that has its lines): a traceback from the
    command's ``print`` before. Then the rest of the output goes to the null device, so that the flush at exit says
    nothing either; a broken pipe elsewhere (a socket, a worker's pipe) is no such case."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()  # a pipe or socket whose reader has gone polls as an error / hang-up
        poller.register(fd, select.POLLOUT)
        if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return False
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor
        return False
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _checked_together(args):  # under torchrun: said once per node, once the ranks have met
            _check_environment()
            if world_size_from_env() > 1 and not args._distributed:
                # every process would run the whole job and write the same outputs
                shared = ", ".join(n for n, d in _distributed_commands().items() if d)
                raise ErfLabError(f"{args.command} runs in one process; start it without torchrun (under torchrun: "
                                  f"{shared})")
        return int(args._run(args) or 0)
    except ErfLabError as e:
        _end_progress_bars()
        if printed_here(e):  # under torchrun, an error every rank raised alike: once per node
            print(f"erf-lab {args.command}: error: {e}", file=sys.stderr)
        else:  # the node's first process says it: torchrun ends it once this one has exited, so leave it time
            time.sleep(SILENT_EXIT_DELAY_S)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        _end_progress_bars()
        # a stop reaches every process of a torchrun job alike (Ctrl-C, torchrun's SIGTERM, the step the ranks agree
        # on): said once per node, as an error the ranks raise alike; the node's other processes wait a moment, so
        # that torchrun does not end the first one before it has said it
        if printed_here(on_every_rank(e)):
            print(f"erf-lab {args.command}: interrupted", file=sys.stderr)
        else:
            time.sleep(SILENT_EXIT_DELAY_S)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises RuntimeError, CUDA's OutOfMemoryError
        what = out_of_memory(e)
        if what is None:
            lost = None
            if "torch.distributed" in sys.modules:  # gloo / NCCL in a collective whose other processes are gone
                from erf_lab.erf.distributed import peers_lost

                lost = peers_lost(e)
            if lost is None:
                raise
            _end_progress_bars()
            print(f"erf-lab {args.command}: error: {lost}", file=sys.stderr)
            return 1
        _end_progress_bars()
        print(f"erf-lab {args.command}: error: out of memory ({what}); {OUT_OF_MEMORY_HINT} (outputs it had "
              f"finished are kept)", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _end_progress_bars()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # a file that cannot be read or written (commands check their outputs first)
        if e.errno not in _CANNOT_ACCESS:
            raise
        _end_progress_bars()
        where = f": {e.filename}" if e.filename else ""
        print(f"erf-lab {args.command}: error: {e.strerror}{where}; the command stopped there (outputs it had "
              f"finished are kept)", file=sys.stderr)
        return EXIT_USAGE


def run(argv: list[str] | None = None):
    """The ``erf-lab`` console script and ``python -m erf_lab``: :func:`main`, then :func:`exit_now`."""
    configure_process()
    exit_now(main(argv))


def configure_process() -> None:
    """What the console script sets up before :func:`main`: the garbage collector's threshold (``GC_THRESHOLD``)."""
    gc.set_threshold(max(GC_THRESHOLD, gc.get_threshold()[0]))


def exit_now(code: int):
    """End the process with ``code`` without the interpreter's teardown. A process that loaded torch and a model
    spends ~0.8 s at exit tearing its modules down (RepLKNet-31B on the 2-core dev box: 0.8-0.9 s against 0.08 s
    here; issue 14's fixed cost). Nothing is lost: results are written atomically before a command returns, the
    streams and logging are flushed here, and helper threads are joined by their owners. A process that never
    imported torch, or still holds a torch.distributed process group (a torchrun job that failed before its own
    clean-up), exits the normal way."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if torch is None or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, or None (pythonw)
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
