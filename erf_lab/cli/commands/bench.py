"""``erf-lab bench``: RepLKNet Table 1 (24 stacked depthwise layers) for PyTorch vs fastconv; see fastconv.bench."""
from __future__ import annotations

import sys
from pathlib import Path

from erf_lab.errors import ErfLabError

NAME = "bench"
HELP = "benchmark depthwise large-kernel convs (RepLKNet Table 1): PyTorch vs fastconv"
DESCRIPTION = ("Latency of a stack of 24 depthwise KxK layers on (B, 384, R, R), PyTorch NCHW and channels_last vs "
               "fastconv, forward and forward+backward, with GFLOP/s, % of SGEMM and the paper's 2080Ti numbers; "
               "writes table.csv, table.txt, results.json, run.json.")
ORDER = 90


def add_arguments(parser) -> None:
    from fastconv.bench_args import add_arguments as add

    add(parser)


def run(args) -> int:
    from erf_lab.cli.options import command_line
    from erf_lab.io import hold_folder, missing_folders, prepare_out_dir, refuse_other_result, remove_empty_folders
    from fastconv.bench import format_table, run_from_args

    refuse_other_result(args.out, "bench")  # its run.json, table.csv and results.json would land in another result
    made = missing_folders(args.out)
    try:  # held while it measures and writes its rows: another benchmark into it meanwhile replaced its tables
        with hold_folder(prepare_out_dir(args.out)):
            result, paths = run_from_args(args, command_line())
    except ValueError as e:
        raise ErfLabError(str(e)) from None
    except KeyboardInterrupt:  # each row is written when done: say where they are and how to continue
        if (Path(args.out).expanduser() / "results.json").is_file():
            print(f"stopped: the rows measured so far are in {args.out}; continue with the same command and --resume",
                  file=sys.stderr)
        raise
    finally:
        remove_empty_folders(made)  # refused, or stopped before its first row: no empty folder left behind
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
