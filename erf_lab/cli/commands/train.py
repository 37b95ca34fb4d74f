"""``erf-lab train``: train a registered model on cue-world or an ImageFolder dataset (DDP under torchrun)."""
from __future__ import annotations

import argparse

from erf_lab.cli.options import command_line, parse_overrides, seed, warnings_as_lines
from erf_lab.errors import ErfLabError, said_here
from erf_lab.io import refuse_empty

NAME = "train"
HELP = "train a model (cue-world or a train/ val/ image folder); resumable, DDP under torchrun"
#: runs under torchrun (one share of the work per process)
DISTRIBUTED = True
ORDER = 60
DESCRIPTION = (
    "Train a registered model for image classification with RepLKNet's recipe scaled down (AdamW, cosine schedule "
    "with warm-up, label smoothing, drop path, optional EMA and gradient clipping). --data cue-world uses the "
    "built-in shape/texture world; --data DIR reads DIR/train/<class>/* and DIR/val/<class>/*. Writes checkpoints "
    "every epoch ({'model': state_dict} .pth and .safetensors), metrics.csv, curves.png/pdf and run.json; Ctrl-C "
    "or kill keeps the state (continue with --resume). Under 'torchrun --nproc_per_node=N -m erf_lab train' it "
    "runs DistributedDataParallel (gloo on CPU, NCCL on CUDA); --batch-size is per process."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registered model name or package.module:factory")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="model constructor option, e.g. channels=(16,32,64,128); repeatable")
    p.add_argument("--data", default="cue-world", help="'cue-world' (default) or a folder with train/ and val/")
    p.add_argument("--train-size", type=int, default=None, help="cue-world training images (default 2000)")
    p.add_argument("--val-size", type=int, default=None, help="cue-world validation images (default 500)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="cue-world classes, 2-12 (default 10); with --data FOLDER: checked against its classes")
    p.add_argument("--resample", action="store_true",
                   help="cue-world: new training images every epoch (--train-size per epoch, an endless stream)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step and process (default 64)")
    p.add_argument("--input-size", type=int, default=64, help="square input side in pixels (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine (default 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay, not on norms / biases (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs (default 1)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="default 0.1")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (default 0)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay per step, e.g. 0.999 (default off)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (default off)")
    p.add_argument("--seed", type=seed, default=0, help="seed of initialization, data order and cue-world (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype (default auto: bf16 on CUDA, none on CPU; a resumed run keeps its own, on "
                        "either device)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on for the CPU, see benchmarks/results/train_cpu.md; off "
                        "on CUDA; a resumed run keeps its own)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--checkpoint-format", choices=("pth", "safetensors", "both"), default=None,
                   help="weights file format (default both; a resumed run keeps its own)")
    p.add_argument("--checkpoint-seconds", type=float, default=600.0,
                   help="save the training state mid-epoch at most this often, for a run killed without warning "
                        "(default 600; 0 = after every step; each epoch's end is always saved)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--force", action="store_true", help="start over in --out, deleting its run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


#: the option of each cue-world setting (CueWorldSettingError.setting) this command sets
CUE_WORLD_OPTIONS = {"train_size": "--train-size", "val_size": "--val-size", "num_classes": "--num-classes",
                     "input_size": "--input-size"}


def run(args: argparse.Namespace) -> int:
    from erf_lab.erf.distributed import checked_together
    from erf_lab.train.cue_world import CueWorldSettingError
    from erf_lab.train.loop import train
    from erf_lab.train.recipe import Recipe

    with checked_together(args.device):  # under torchrun: said once per node, not once per process
        refuse_empty(args.data, "--data", "name a folder with train/ and val/, or 'cue-world'")  # Path("") is "."
        given = [flag for flag, v in (("--train-size", args.train_size), ("--val-size", args.val_size))
                 if v is not None]
        if given and args.data != "cue-world":
            raise ErfLabError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} cue-world's image counts; "
                              f"--data {args.data} trains on every image of its train/ and validates on its val/")
        recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                        label_smoothing=args.label_smoothing, drop_path=args.drop_path, ema=args.ema,
                        clip_grad=args.clip_grad)
        overrides = parse_overrides(args.override)
    try:
        with warnings_as_lines("train"):
            res = train(args.model, args.data, out=args.out, overrides=overrides, recipe=recipe,
                        input_size=args.input_size, train_size=2000 if args.train_size is None else args.train_size,
                        val_size=500 if args.val_size is None else args.val_size,
                        num_classes=args.num_classes, resample=args.resample, seed=args.seed, device=args.device,
                        amp=args.amp, channels_last=args.channels_last, sync_bn=args.sync_bn,
                        num_workers=args.num_workers, resume=args.resume, force=args.force,
                        checkpoint_format=args.checkpoint_format, checkpoint_seconds=args.checkpoint_seconds,
                        show_progress=not args.quiet, argv=command_line())
    except CueWorldSettingError as e:  # cue-world's limits are its own; the option that set the value is ours
        flag = CUE_WORLD_OPTIONS.get(e.setting)
        if flag is None:
            raise
        named = ErfLabError(f"{flag}: {e}")
        named.every_rank = e.every_rank  # under torchrun: said once per node when every rank met it
        raise named from None
    if res["already_complete"]:
        if said_here():  # under torchrun: once, by rank 0
            print(f"{res['out_dir']} already holds a complete run; nothing to resume")
        return 0
    info = res["run_info"]
    if info is None:
        return 0  # rank > 0 of a distributed run
    f = info["final"]
    # a folder's classes may be very uneven: the accuracy of answering its largest class alone, beside the model's
    floor = info["data"].get("majority_class_val_acc")
    print(f"trained {info['model_config']['name']} for {len(res['rows'])} epoch(s): val acc {f['val_acc']:.3f} "
          f"(chance {info['data']['chance_val_acc']:.3f}"
          + (f"; always answering the largest training class: {floor:.3f}" if floor is not None else "")
          + f"), val loss {f['val_loss']:.4f}"
          # --ema: model_ema.safetensors, what shape-bias and the timeline's --ema measure
          + (f", EMA val acc {f['val_acc_ema']:.3f}" if "val_acc_ema" in f else "")
          + f", {f['img_per_s']:.0f} img/s (last epoch)")
    if info["chance_note"]:
        print(f"note: {info['chance_note']}")
    print(f"wrote {res['out_dir']}")
    return 0
