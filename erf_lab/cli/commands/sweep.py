"""``erf-lab sweep``: ERF growth with kernel size and re-parameterization (RepLKNet kernel family)."""
from __future__ import annotations

from erf_lab.cli.options import BATCH_SIZE_HELP, command_line, seed, warnings_as_lines
from erf_lab.errors import ErfLabError

NAME = "sweep"
HELP = "ERF vs kernel size (RepLKNet-3/7/13/25/31 family), vs input size, and train vs re-parameterized form"
#: runs under torchrun (one share of the work per process)
DISTRIBUTED = True
ORDER = 42
DESCRIPTION = (HELP + ". Each member (K, input size, mode) becomes a run directory (reused if already complete "
               "with the same settings; one with other settings needs --force); the sweep writes a heatmap grid, "
               "growth curves, sweep.csv/.md (a weights column: random marks untrained members) and sweep.json "
               "(from the start, complete at the end: an interrupted sweep is resumed by the same command, its "
               "finished members reused). With --reparam both the train-time and deploy ERFs are compared (they "
               "should agree).")


def add_arguments(p) -> None:
    p.add_argument("--kernels", default=None,
                   help="odd kernel sizes, comma-separated, e.g. 3,7,13,25,31 (the paper's family); give --kernels, "
                        "--input-sizes or both")
    p.add_argument("--input-sizes", default=None,
                   help="input sizes, comma-separated, e.g. 224,384,640,1024: the ERF against input size "
                        "(alone: of --model; with --kernels: of each member)")
    p.add_argument("--model", default=None,
                   help="model for an --input-sizes sweep without --kernels (default replknet_31b); refused with "
                        "--kernels")
    p.add_argument("--weights", default=None,
                   help="checkpoint of --model (input-size sweep without --kernels); with --kernels use --weights-dir")
    p.add_argument("--reparam", choices=("train", "deploy", "both"), default="both",
                   help="measure the train-time form, the re-parameterized form, or both (default both)")
    p.add_argument("--init", choices=("random", "weights"), default=None,
                   help="seeded random initialization (same seed per K) or checkpoints from --weights-dir (default: "
                        "weights when --weights-dir is given, else random)")
    p.add_argument("--weights-dir", default=None,
                   help="folder with replknet_<K>.pth/.safetensors (or K<K>.pth) per K; implies --init weights")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input side of a --kernels sweep (default 1024, as the paper); --input-sizes sweeps it")
    p.add_argument("--images", default=None, help="image folder (default: the built-in image set)")
    p.add_argument("--num-images", type=int, default=None, help="images per run (default: all, at most 50)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="model option for every member, e.g. channels=(8,8,8,8); repeatable")
    p.add_argument("--layer", default=None, help="layer to measure (default forward_features)")
    p.add_argument("--seed", type=seed, default=0, help="random-init seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=BATCH_SIZE_HELP)
    p.add_argument("--out", default="sweep", help="output folder (default ./sweep)")
    p.add_argument("--force", action="store_true",
                   help="overwrite member runs in --out that were measured with other settings")
    p.add_argument("--formats", default="png,pdf", help="figure formats: png,pdf,svg (default png,pdf)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from erf_lab.cli.options import parse_overrides
    from erf_lab.erf.distributed import checked_together
    from erf_lab.erf.plotting import parse_formats
    from erf_lab.erf.sweep import run_sweep

    with checked_together(args.device):  # under torchrun: said once per node, not once per process
        if args.input_sizes is not None and args.input_size is not None:
            raise ErfLabError("--input-size and --input-sizes exclude each other: --input-sizes gives every size "
                              "measured")
        overrides, formats = parse_overrides(args.override), parse_formats(args.formats)
    args.input_size = 1024 if args.input_size is None else args.input_size
    with warnings_as_lines("sweep"):
        res = run_sweep(args.kernels, input_sizes=args.input_sizes, model=args.model, weights=args.weights,
                        reparam=args.reparam, init=args.init, weights_dir=args.weights_dir,
                        input_size=args.input_size, images=args.images, num_images=args.num_images,
                        overrides=overrides, out=args.out, force=args.force,
                        formats=formats, seed=args.seed, layer=args.layer, device=args.device,
                        batch_size=args.batch_size, show_progress=not args.quiet, argv=command_line())
    if res["main"]:  # under torchrun: rank 0 reports
        print(res["markdown"])
        print(f"wrote {res['out_dir']}/ ({', '.join(p.name for p in res['files'])})")
    return 0
