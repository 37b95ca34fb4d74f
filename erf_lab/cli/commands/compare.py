"""``erf-lab compare``: several ERFs side by side on one colour scale, with a metrics table."""
from __future__ import annotations

from erf_lab.cli.options import command_line

NAME = "compare"
HELP = "compare ERF runs: heatmaps side by side on one colour scale + metrics table (markdown, CSV)"
ORDER = 41
DESCRIPTION = (HELP + ". Maps of different sizes are compared by the size-free metrics (pixels); their area ratios "
               "are marked not comparable (fractions of each image) and heatmaps are drawn only with "
               "--allow-mixed-sizes. Paper Table 10 rows are appended for maps of one size.")


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories or .npy maps")
    p.add_argument("--labels", nargs="+", default=None, help="one title per run (default: model or folder name)")
    p.add_argument("--out", default="compare", help="output folder (default ./compare)")
    p.add_argument("--formats", default="png,pdf", help="figure formats: png,pdf,svg (default png,pdf)")
    p.add_argument("--allow-mixed-sizes", action="store_true",
                   help="maps of different sizes: draw the heatmaps too (each at its own size) and show each map's "
                        "area ratios on its own area")
    p.add_argument("--normalize", choices=("each", "joint"), default="each",
                   help="each: log10(A+1)/own max as in the paper (default); joint: one max over all maps")
    p.add_argument("--display", default="replknet", metavar="PRESET",
                   help="heatmap display: replknet = log10(A+1)/max (default, Ding et al. 2022), slak = A/max "
                        "(SLaK), power = A^0.25/max (VMamba); erf.npy and the metrics do not change")


def run(args) -> int:
    from erf_lab.erf.plotting import parse_formats
    from erf_lab.erf.analysis import compare

    labels = args.labels
    if labels is not None and len(labels) == 1 and "," in labels[0]:
        labels = [s.strip() for s in labels[0].split(",")]
    res = compare(args.paths, labels=labels, out=args.out, formats=parse_formats(args.formats),
                  allow_mixed_sizes=args.allow_mixed_sizes, normalize=args.normalize, argv=command_line(),
                  display=args.display)
    print(res["markdown"])
    print()
    print(res["note"])
    print(f"wrote {', '.join(str(p) for p in res['files'])}")
    return 0
