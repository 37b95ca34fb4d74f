"""Command-line options of the Table 1 benchmark (no torch import: ``erf-lab --help`` stays fast)."""
from __future__ import annotations

import argparse

PAPER_KERNELS = (3, 5, 7, 9, 13, 17, 21, 27, 29, 31)
PAPER_RESOLUTIONS = (16, 32, 64)
DTYPES = ("float32", "float16", "bfloat16")
#: the table's name of the GEMM rate a precision is compared against
GEMM_NAMES = {"float32": "SGEMM", "float16": "HGEMM", "bfloat16": "bf16 GEMM"}


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


#: the table's size (the paper's Table 1) and ``--quick``'s; an explicit option wins over either
FULL = {"kernels": PAPER_KERNELS, "resolutions": PAPER_RESOLUTIONS, "layers": 24, "repeats": 3}
QUICK = {"kernels": (3, 13, 31), "resolutions": (16, 32), "layers": 4, "repeats": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", type=_ints, default=None,
                   help="comma-separated odd kernel sizes (default: the paper's 3..31)")
    p.add_argument("--resolutions", type=_ints, default=None, help="comma-separated R (default 16,32,64)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on GPU, 2 on CPU)")
    p.add_argument("--channels", type=int, default=384, help="channels of each depthwise layer (default 384)")
    p.add_argument("--layers", type=int, default=None, help="stacked depthwise layers (default 24)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="precision of inputs and weights (default float32, the paper's; %% of GEMM is then taken "
                        "against the GEMM rate in this precision)")
    p.add_argument("--impls", type=_names, default=("pytorch_nchw", "pytorch_cl", "fastconv"),
                   help="comma-separated sides to time (default pytorch_nchw,pytorch_cl,fastconv)")
    p.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both",
                   help="time the forward (fwd), forward + both gradients (fwdbwd) or both (default both)")
    p.add_argument("--quick", action="store_true", help="defaults K 3,13,31; R 16,32; 4 layers; 2 repeats; batch 1 "
                                                        "on CPU (explicit options win)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted benchmark in --out: keep its measured (R, K) rows and measure the "
                        "rest (its settings must be this run's; without it every row is measured anew, and the "
                        "earlier run's files move to --out's earlier/<when they were written>/)")
    p.add_argument("--out", default="runs/fastconv-bench",
                   help="output directory for table.csv, table.txt, results.json and run.json "
                        "(default runs/fastconv-bench)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
