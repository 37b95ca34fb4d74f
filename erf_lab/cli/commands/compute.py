"""``erf-lab compute``: measure a model's effective receptive field (RepLKNet protocol by default)."""
from __future__ import annotations

import argparse
import shlex
import sys

from erf_lab.cli.options import BATCH_SIZE_HELP, command_line, parse_overrides, seed, warnings_as_lines
from erf_lab.errors import said_here

NAME = "compute"
HELP = "measure the effective receptive field (ERF) of a model"
#: runs under torchrun (one share of the work per process)
DISTRIBUTED = True
ORDER = 20
DESCRIPTION = (
    "Measure the ERF as in RepLKNet (Ding et al., CVPR 2022, App. C): for each image, the gradient of the summed "
    "ReLU'd centre pixel of the chosen feature map w.r.t. the input, ReLU'd and summed over RGB, averaged over "
    "images (default: the built-in image set at 1024x1024). Writes erf.npy, metrics.json, erf.png/pdf and run.json; "
    "Ctrl-C keeps progress (continue with --resume). Under torchrun the images are sharded across processes."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="registered model name, timm/<name> (extra '.[timm]') or package.module:factory")
    p.add_argument("--weights", help="checkpoint (.pth/.pt state dict, or .safetensors)")
    p.add_argument("--drop-head", action="store_true", help="load a checkpoint whose classifier differs")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="model constructor option, e.g. channels=(8,8,8,8); repeatable")
    p.add_argument("--images", help="folder of images (recursive); default: the built-in image set")
    p.add_argument("--num-images", type=int, help="images to use (default: all of the set, at most 50)")
    p.add_argument("--input-size", type=int, default=1024, help="square input side in pixels (default 1024)")
    p.add_argument("--layer", help="layer name (see 'erf-lab layers'); default: forward_features")
    p.add_argument("--aggregate", choices=("relu", "abs"), default="relu", help="gradient aggregation (default relu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=BATCH_SIZE_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", help="output folder (default runs/<model>-<images>-<size>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a complete or interrupted run in --out")
    p.add_argument("--no-reparam", action="store_true", help="measure the train-time form (slower, same ERF)")
    p.add_argument("--conv-backend", choices=("fastconv", "native"), default="fastconv",
                   help="large depthwise conv implementation (default fastconv)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    p.add_argument("--seed", type=seed, default=0, help="seed for random initialization (default 0)")
    p.add_argument("--train-size", type=int, default=None,
                   help="the model's training resolution in pixels (default: from the model or checkpoint name); "
                        "a measurement more than 2x away from it is flagged")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="save resumable progress at most this often (default 30; 0 = after every batch)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--display", default="replknet", metavar="PRESET",
                   help="heatmap display: replknet = log10(A+1)/max (default, Ding et al. 2022), slak = A/max "
                        "(SLaK), power = A^0.25/max (VMamba); erf.npy and the metrics do not change")


def run(args: argparse.Namespace) -> int:
    from erf_lab.erf.distributed import checked_together
    from erf_lab.erf.runner import ErfSpec, run_erf

    # --resume without --out, with --force, a negative --checkpoint-seconds: run_erf's checks (under torchrun said
    # once per node, once the ranks have met), as the --override ones here
    with checked_together(args.device):
        overrides = parse_overrides(args.override)
    spec = ErfSpec(model=args.model, weights=args.weights, drop_head=args.drop_head,
                   overrides=overrides, images=args.images, num_images=args.num_images,
                   input_size=args.input_size, layer=args.layer, aggregate=args.aggregate, batch_size=args.batch_size,
                   device=args.device, reparameterize=not args.no_reparam, channels_last=not args.no_channels_last,
                   conv_backend=args.conv_backend, seed=args.seed, train_size=args.train_size)
    try:
        with warnings_as_lines("compute"):
            res = run_erf(spec, out=args.out, resume=args.resume, force=args.force, show_progress=not args.quiet,
                          checkpoint_seconds=args.checkpoint_seconds, argv=command_line(),
                          display=args.display)
    except KeyboardInterrupt as e:  # say where the progress is (a default --out is a folder the user never named)
        if saved := getattr(e, "erf_saved", None):
            out = shlex.quote(saved["out_dir"])
            done = (f" after {saved['measured']} of {saved['total']} images" if saved["measured"] is not None
                    else "")
            print(f"stopped{done}: progress saved in {saved['out_dir']}; continue with the same command and "
                  f"--resume --out {out}", file=sys.stderr)
        raise
    if res["already_complete"]:
        if said_here():  # under torchrun: once, by rank 0
            print(f"{res['out_dir']} already holds a complete run; nothing to resume")
        return 0
    if res["run_info"] is None:
        return 0  # non-zero rank of a distributed run: rank 0 reports
    from erf_lab.erf.metrics import GLOBAL_RF_REASON, kernels_alone

    info = res["run_info"]
    print(f"ERF of {info['model']} at {info['layer']} over {info['num_used']} image(s) "
          f"({info['num_skipped']} skipped), input {info['input_size']}px, theoretical RF "
          + (f"{info['theoretical_rf']}px" if info["theoretical_rf"] else
             f"global ({GLOBAL_RF_REASON}{kernels_alone(info)})" if info.get("rf_global") else
             "n/a (after window attention or a resampling)"))
    if info.get("size_note"):
        print(f"note: {info['size_note']}")
    if isinstance(info.get("num_images_requested"), int) and info["num_used"] < info["num_images_requested"]:
        print(f"note: {info['num_images_requested']} images asked for (--num-images), {info['num_used']} used: "
              "the image set holds no more usable ones")
    if info.get("achieved_gflops"):
        ref = (f", {100 * info['roofline_fraction']:.1f}% of the {info['sgemm_device']} SGEMM rate "
               f"{info['sgemm_gflops']:.1f} GFLOP/s ({info['cpu_model']}, {info['isa']}, {info['threads']} threads)"
               if info.get("roofline_fraction") is not None else "")
        pad = info.get("padding_flops_per_image")
        without = (f"; without the {pad / 1e9:.3g} GFLOP of depthwise products with the zero padding (avoidable: "
                   f"fastconv's C++ kernel skips them): {100 * info['roofline_fraction_without_padding']:.1f}%"
                   if pad and info.get("roofline_fraction_without_padding") is not None else "")
        print(f"speed: {info['flops_per_image'] / 1e9:.3g} GFLOP per image in {info['compute_seconds_per_image']:.3g} s "
              f"= {info['achieved_gflops']:.3g} GFLOP/s{ref}{without}")
        if info.get("roofline_note"):
            print(f"note: {info['roofline_note']}")
    from erf_lab.erf.metrics import paper_caveat
    from erf_lab.erf.tables import gauss_note, markdown_table, paper_protocol_note, square_note, table_rows, trf_note

    print(markdown_table(table_rows([(info["model"], res["metrics"])])))
    if note := paper_protocol_note([(info["model"], info)]):
        print(f"note: {note}")
    if note := gauss_note([(info["model"], res["metrics"])]):
        print(f"note: {note}")
    for note in (square_note([(info["model"], res["metrics"])]), trf_note([(info["model"], res["metrics"])])):
        if note:
            print(f"note: {note}")
    if caveat := paper_caveat():
        print(f"note: {caveat}")
    if info["random_init"] and info["weights"]:
        print(f"(random initialization: {args.weights} holds untrained weights (marked so by erf-lab); "
              "paper rows are trained, 1024px)")
    elif info["random_init"]:
        print("(random initialization: pass --weights for a trained checkpoint; paper rows are trained, 1024px)")
    print(f"wrote {res['out_dir']}")
    return 0
