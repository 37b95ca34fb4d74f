"""Options and parsers shared by several ``erf-lab`` commands."""
from __future__ import annotations

import ast
import contextlib
import sys
import warnings

from erf_lab.errors import ErfLabError, said_here

#: ``--batch-size`` of the commands that measure ERFs (the rules: ``erf_lab.erf.runner.auto_batch_size`` on a CPU,
#: ``erf_lab.erf.compute.memory_batch_size`` on CUDA)
BATCH_SIZE_HELP = ("images per forward/backward (default: auto; on a CPU up to 8 while a batch holds at most 448x448 "
                   "pixels, twice the pixels with AVX-512: 4 (8) at 224 px, 1 (2) at 448 px; on CUDA as many as fit "
                   "in 60%% of the free memory after a one-image pass, at most 32 and half the images left; the "
                   "result does not depend on it)")


def command_line() -> list[str]:
    """The command as the user runs it, for the records (``provenance``'s ``argv``): ``erf-lab`` and its arguments.
    ``sys.argv[0]`` is the console script's path, or ``.../erf_lab/__main__.py`` under ``python -m erf_lab``."""
    return ["erf-lab", *sys.argv[1:]]


def parse_overrides(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are Python literals when they parse as one (``channels=(8,8,8,8)``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ErfLabError(f"--override expects key=value (a Python identifier as key), got {item!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            if value.strip()[:1] in "([{":  # meant as a tuple / list / dict: kept as text it becomes its characters
                raise ErfLabError(f"--override {item!r}: not a Python literal (plain numbers, strings, tuples, e.g. "
                                  f"channels=(64,128,256,512); no arithmetic)") from None
            out[key] = value.strip()
    return out


def seed(text: str) -> int:
    """``--seed``: an integer torch can seed with (0 .. 2**63 - 1); argparse reports anything else in one line."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer") from None
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"seed {v} out of range: expected 0 .. 2**63 - 1")
    return v


@contextlib.contextmanager
def warnings_as_lines(command: str):
    """Python warnings said as one line ``erf-lab COMMAND: warning: <message>`` while the block runs (not Python's
    file, line number, category and source line); under torchrun once per job, not once per process
    (:func:`erf_lab.errors.said_here`: rank 0's, a node's folder by each node's first process)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if said_here(category):
            print(f"erf-lab {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
