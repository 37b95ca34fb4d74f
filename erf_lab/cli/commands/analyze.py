"""``erf-lab analyze``: recompute the metrics and figures of an ERF run directory or ``.npy`` file."""
from __future__ import annotations

from erf_lab.cli.options import command_line

NAME = "analyze"
HELP = "recompute ERF metrics (paper area ratios, spread, Gaussian fit) and figures of a run or .npy"
ORDER = 40
DESCRIPTION = (HELP + ". Metrics go to metrics.json and figures to erf.<fmt> next to the .npy (or in --out; in a run "
               "folder its own figures, e.g. erf.png and erf.pdf, are drawn again with them, so that they agree); "
               "the table shows RepLKNet paper Table 10 values beside the measured area ratios.")


def add_arguments(p) -> None:
    p.add_argument("path", metavar="RUN_DIR|ERF.npy", help="a run directory (with erf.npy) or an .npy map")
    p.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated: png,pdf,svg (default png,pdf)")
    p.add_argument("--out", default=None, help="write here instead of next to the .npy")
    p.add_argument("--theoretical-rf", type=int, default=None,
                   help="theoretical receptive field in pixels (default: from the run's run.json)")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    p.add_argument("--display", default="replknet", metavar="PRESET",
                   help="heatmap display: replknet = log10(A+1)/max (default, Ding et al. 2022), slak = A/max "
                        "(SLaK), power = A^0.25/max (VMamba); erf.npy and the metrics do not change")


def run(args) -> int:
    import json

    from erf_lab.erf.plotting import parse_formats
    from erf_lab.erf.analysis import analyze

    res = analyze(args.path, out=args.out, formats=parse_formats(args.formats),
                  theoretical_rf=args.theoretical_rf, argv=command_line(), display=args.display)
    if args.json:
        print(json.dumps(res["metrics"], indent=2))
    else:
        print(res["text"])
        print(f"wrote {', '.join(str(p) for p in res['files'])}")
    return 0
