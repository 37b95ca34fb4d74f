"""``erf-lab study kernel-family``: train the RepLKNet kernel family on cue-world and measure ERF and shape bias."""
from __future__ import annotations

NAME = "study"
HELP = "reproducible studies: 'kernel-family' trains RepLKNet K=3/7/13/31 on cue-world, ERF + shape-bias table"
ORDER = 62
DESCRIPTION = (
    "kernel-family: train RepLKNet with kernels 3, 7, 13 and 31 (Table 5 of Ding et al., CVPR 2022, at a CPU "
    "width and depth; same recipe, seed and data for every K; K = 3 and 31 also with a second seed), then measure "
    "each model's ERF on cue-world val images (area ratios at t = 20/30/50/99 %, effective radius) and its "
    "cue-world shape bias, and write results.md, family.csv and family.png/pdf. With guidelines (default), also "
    "MobileNetV2 13x13 with / without shortcuts (Table 2) and RepLKNet-31 with / without the small-kernel "
    "re-parameterization (Table 4) into guidelines.csv. Every step is cached in --out: re-running continues. "
    "--ship DIR copies the weights with their records (for --weights builtin:...) and the results there."
)


def add_arguments(p) -> None:
    from erf_lab.train.study import StudySettings

    d = StudySettings()
    p.add_argument("study", choices=["kernel-family"], help="which study")
    p.add_argument("--out", required=True, help="study folder (runs, ERFs, probes, tables, figure)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per model (default {d.epochs})")
    p.add_argument("--train-size", type=int, default=d.train_size,
                   help=f"new cue-world training images per epoch (default {d.train_size})")
    p.add_argument("--input-size", type=int, default=d.input_size, help=f"training size in px (default {d.input_size})")
    p.add_argument("--erf-input-size", type=int, default=d.erf_input_size,
                   help=f"ERF measurement size in px (default {d.erf_input_size})")
    channels, layers = ",".join(map(str, d.channels)), ",".join(map(str, d.layers))
    p.add_argument("--channels", default=channels,
                   help=f"RepLKNet stage widths, 4 comma-separated (default {channels})")
    p.add_argument("--layers", default=layers, help=f"RepLKNet blocks per stage, 4 comma-separated (default {layers})")
    p.add_argument("--no-guidelines", action="store_true", help="the kernel family only")
    p.add_argument("--jobs", type=int, default=1, help="models trained at once, each in its own process (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default torch's)")
    p.add_argument("--ship", default=None, metavar="DIR", help="then copy weights, records and results to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _ints(text: str, what: str) -> tuple:
    from erf_lab.errors import ErfLabError

    try:
        v = tuple(int(x) for x in text.replace("(", "").replace(")", "").split(",") if x.strip())
    except ValueError:
        raise ErfLabError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if len(v) != 4 or min(v) < 1:
        raise ErfLabError(f"--{what} needs 4 positive integers (one per stage), got {text!r}")
    return v


def run(args) -> int:
    import contextlib

    from erf_lab.cli.options import warnings_as_lines
    from erf_lab.io import hold_folder, missing_folders, remove_empty_folders
    from erf_lab.train.study import StudySettings, check_ship, markdown_table, run_study, ship, table_notes

    made = missing_folders(args.ship) if args.ship else []  # ("": check_ship's one line)
    try:
        with contextlib.ExitStack() as held:
            if args.ship is not None:  # "" too: one line, not a study that runs for hours and then ships nowhere
                # checked before the training (a file there fails now, not hours later) and held from then on:
                # another study shipping there is refused now, not after this one trained for hours
                held.enter_context(hold_folder(check_ship(args.out, args.ship), what="--ship"))
            s = StudySettings(channels=_ints(args.channels, "channels"), layers=_ints(args.layers, "layers"),
                              input_size=args.input_size, train_size=args.train_size, epochs=args.epochs,
                              erf_input_size=args.erf_input_size)
            with warnings_as_lines("study"):  # e.g. a warm-up as long as the run (--epochs 1)
                res = run_study(args.out, s, jobs=args.jobs, threads=args.threads,
                                guidelines=not args.no_guidelines, show_progress=not args.quiet,
                                warnings_as="study")  # its --jobs processes' warnings too
            print(markdown_table(res["rows"], ["name", "val_acc", "area@20%", "area@50%", "area@99%", "r_rms",
                                               "shape_bias", "img_per_s"]) + table_notes(res["rows"]))
            print(f"wrote {res['out_dir']}/results.md, family.csv, family.png/pdf")
            if args.ship:
                files = ship(args.out, args.ship)
                print(f"shipped {len(files)} file(s) to {args.ship}")
    finally:
        remove_empty_folders(made)  # a refused (or stopped) study leaves no empty --ship folder behind
    return 0
