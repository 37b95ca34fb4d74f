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
    import time

    from erf_lab.cli.options import command_line
    from erf_lab.io import (hold_folder, missing_folders, prepare_out_dir, read_json_or_none, refuse_other_result,
                            remove_empty_folders, write_json)
    from erf_lab.provenance import finished, now, provenance
    from fastconv.bench import format_table, run_from_args

    refuse_other_result(args.out, "bench")  # its run.json, table.csv and results.json would land in another result
    made = missing_folders(args.out)
    try:  # held while it measures and writes its rows: another benchmark into it meanwhile replaced its tables
        with hold_folder(prepare_out_dir(args.out)):
            started, start_time = time.monotonic(), now()
            result, paths = run_from_args(args, command_line())
            # fastconv's run.json says the machine and torch; erf-lab's record adds its version and commit, the CPU
            # model, the start and the duration, as every other erf-lab output folder has them
            run_json = next(p for p in paths if p.name == "run.json")
            params = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
            record = {**provenance("bench", params, device=result["meta"]["device_type"]), "time": start_time,
                      **finished(started)}
            write_json(run_json, {**(read_json_or_none(run_json) or {}), "provenance": record})
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
