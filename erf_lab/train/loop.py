"""One whole training run: validation of the inputs, the model, data-parallel training (DDP under torchrun),
per-epoch evaluation and checkpoints, exact resume, and the run directory.

Run directory: ``checkpoints/epoch_000`` (the initialisation) ... ``epoch_NNN`` (``.pth`` = ``{"model": sd}`` and
``.safetensors``; with ``--ema`` also ``epoch_NNN_ema.safetensors``), ``metrics.csv`` (rewritten atomically after
every epoch), ``.train_state.pt`` (the resume point, removed at the end), then ``model.pth`` /
``model.safetensors``, ``curves.png`` / ``.pdf`` and last ``run.json``: its presence marks a complete run.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.checkpoint import EPOCH_FILE, epoch_stem
from erf_lab.errors import ErfLabError, on_every_rank
from erf_lab.erf import distributed as D
from erf_lab.io import (hold_folder, is_training_record, read_json_or_none, refuse_empty, refuse_other_result,
                        refuse_out_inside)
from erf_lab.train import checkpoints as C
from erf_lab.train.data import CUE_WORLD, build_data, collate_noting_failed_loads, per_cpu_cap, unique_failed_loads
from erf_lab.train.recipe import ModelEma, Recipe, build_optimizer, lr_at, set_lr
from erf_lab.train.stop import ForcedStop, StopRequest, held, iterate

COMPLETE_FILE = "run.json"
#: the sub-folders a training run writes itself (the temporary files of its killed writes go when it takes its folder)
RUN_SUBFOLDERS = ("checkpoints",)
OUR_FILES = ("metrics.csv", "model.pth", "model.safetensors", "model_ema.safetensors", "curves.png", "curves.pdf",
             C.STATE_FILE, COMPLETE_FILE)
AMP_MODES = ("auto", "bf16", "fp16", "none")
#: consecutive non-finite losses the fp16 loss scaler may skip (backing off its scale) before a run counts as diverged
MAX_SKIPPED_SCALER_STEPS = 20


def _check_device(device: str) -> str:
    device = str(device)
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ErfLabError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise ErfLabError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ErfLabError(f"unknown --device {device!r}; choose cpu, cuda or cuda:N")


def _amp_dtype(amp: str, device: str):
    if amp not in AMP_MODES:
        raise ErfLabError(f"unknown --amp {amp!r}; choose {', '.join(AMP_MODES)}")
    if amp == "auto":
        amp = "bf16" if device.startswith("cuda") else "none"
    if amp == "fp16" and not device.startswith("cuda"):
        raise ErfLabError("--amp fp16 needs a CUDA device (on the CPU use bf16 or none)")
    return amp, {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def build_model(model: str, overrides: dict, num_classes: int, drop_path: float = 0.0, seed: int = 0) -> nn.Module:
    """``create_model(model, num_classes=..., drop_path_rate=..., **overrides)`` after ``torch.manual_seed(seed)``."""
    from erf_lab.models import create_model

    kwargs = {**overrides, "num_classes": num_classes}
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    torch.manual_seed(seed)
    try:
        return create_model(model, **kwargs)
    except ErfLabError as e:
        if drop_path > 0 and "drop_path_rate" in str(e):
            raise ErfLabError(f"model {model!r} has no drop_path_rate option: train it with --drop-path 0") from None
        raise


@torch.no_grad()
def _refuse_single_value_norms(net: nn.Module, model: str, input_size: int) -> None:
    """ErfLabError (one line) when a BatchNorm of ``net`` sees a 1x1 map at ``input_size``: with one image per
    step and process it has one value per channel, which it cannot normalise in training (PyTorch's ValueError at
    the first step, a traceback with the run folder already made). One eval-mode forward of one image (no
    statistics change, no random numbers drawn)."""
    seen = []

    def note(module, args):
        if args[0].dim() > 1 and args[0][0, 0].numel() == 1:
            seen.append(module)

    norms = {m: n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    hooks = [m.register_forward_pre_hook(note) for m in norms]
    was = net.training
    try:
        net.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        net.train(was)
        for h in hooks:
            h.remove()
    if seen:
        raise ErfLabError(f"--batch-size 1: {model}'s BatchNorm {norms[seen[0]]} sees a 1x1 map at --input-size "
                          f"{input_size}, one value per channel, which it cannot normalise in training; use "
                          f"--batch-size 2 or more (per process) or a larger --input-size")


def distributed_net(net: nn.Module, world_size: int, device: str, sync_bn: bool = False) -> nn.Module:
    """What one rank of ``world_size`` steps: ``net`` itself alone, else ``net`` in DDP, its BatchNorms first made
    SyncBatchNorms (in place: ``net``'s state dict keeps its keys) with ``sync_bn``, so that every rank normalises
    with the statistics of the global batch (CUDA only, a limit of PyTorch)."""
    if world_size <= 1:
        return net
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[torch.device(device).index or 0] if str(device).startswith("cuda") else None)


def speed_levers(net: nn.Module, channels_last: bool, device: str = "cpu") -> nn.Module:
    """In place, what makes a training step fast without changing the model. On the CPU every stride-1 'same'
    depthwise conv from 3x3 up runs through ``fastconv``, whose dispatcher picks the fastest backend per shape for
    the forward and both gradients (PyTorch's own NCHW depthwise backward made the 5x5 re-param branches and the
    3x3 stem convs the slowest ops of a step); elsewhere the model is left as built (not measured on a GPU). With
    ``channels_last``, the channels_last memory format. The state dict keeps its keys. ``benchmarks/bench_train.py``
    on the 2-core AVX2 EPYC, the kernel-family study's K = 31 model at 64 px, batch 64: 901 img/s against 653 for
    the model as built in NCHW (``benchmarks/results/train_cpu.md``)."""
    if torch.device(device).type == "cpu":
        import fastconv

        fastconv.convert_model(net, min_kernel=3)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


class _Sums:
    """Loss / correct / count sums, all-reduced over ranks."""

    def __init__(self, loss=0.0, correct=0.0, count=0.0):
        self.v = torch.tensor([loss, correct, count], dtype=torch.float64)

    def add(self, loss_sum: float, correct: float, count: int) -> None:
        self.v += torch.tensor([loss_sum, correct, count], dtype=torch.float64)

    def reduced(self, info: D.DistInfo, device) -> tuple[float, float]:
        v = self.v.clone()
        if info.enabled:
            v = v.to(device if info.backend == "nccl" else "cpu")
            dist.all_reduce(v)
            v = v.cpu()
        loss, correct, count = v.tolist()
        return loss / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, batch_size: int, device, mean, std, info: D.DistInfo = D.DistInfo(),
             amp_dtype=None, channels_last: bool = False, num_workers: int = 0,
             failed_loads: list | None = None) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` on ``dataset``; rank r takes items r::N. The loads that
    failed in DataLoader workers are added to ``failed_loads`` (see ``collate_noting_failed_loads``)."""
    was = model.training
    model.eval()
    idx = list(range(info.rank, len(dataset), info.world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size,
                                         num_workers=num_workers, generator=torch.Generator().manual_seed(0),
                                         collate_fn=collate_noting_failed_loads)
    sums = _Sums()
    for x, y, failed in iterate(loader):
        if failed_loads is not None:
            failed_loads += failed
        x, y = _prepare(x, y, device, mean, std, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        sums.add(loss.item(), (logits.argmax(1) == y).sum().item(), len(y))
    model.train(was)
    return sums.reduced(info, device)


def chance_note(val_acc: float, num_classes: int, val_size: int, majority: float | None = None) -> str | None:
    """What a final val accuracy at chance (:func:`erf_lab.shape_bias.analysis.at_chance`: within its standard errors
    of guessing, 1 / classes, or of ``majority``, always answering the largest training class, where that is higher)
    means, in one line; None above it."""
    from erf_lab.shape_bias.analysis import CHANCE_SE, at_chance

    if not at_chance(val_acc, num_classes, val_size, floor=majority):
        return None
    if majority is not None and majority > 1 / num_classes:
        floor = f"always answering the largest training class ({majority:.3f})"
        learned = "more than the class frequencies"
    else:
        floor, learned = f"chance (1/{num_classes} = {1 / num_classes:.3f})", "the task"
    return (f"val acc {val_acc:.3f} is within {CHANCE_SE:g} standard errors of {floor} on {val_size} val images: the "
            f"model has not measurably learned {learned} (train longer or on more images; more val images measure it "
            f"more finely)")


class TrainingDiverged(ErfLabError):
    """A non-finite loss: every rank raises it at the same step (agreed in the stop check's all-reduce)."""


def _diverged(where: str, epoch: int, lr: float, out: Path, hint: str) -> TrainingDiverged:
    """The one line of a run stopped at a non-finite loss (epoch ``epoch`` + 1 under way, ``epoch`` saved)."""
    kept = f"; checkpoints up to epoch {epoch} are kept in {out / 'checkpoints'}" if epoch else ""
    # raised with the same words on every rank (the stop check's all-reduce): said once per node
    return on_every_rank(TrainingDiverged(f"training diverged in epoch {epoch + 1} at {where} (lr {lr:.3g}){kept}; "
                                          f"{hint}"))


def _prepare(x, y, device, mean, std, channels_last):
    x = (x.to(device, non_blocking=True) - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    from erf_lab.io import atomic_path

    buf = io.StringIO()
    cols = list(rows[0]) if rows else ["epoch"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def plot_curves(rows: list[dict], stem, label_smoothing: float = 0.0, chance: float | None = None) -> list[Path]:
    """Training curves (loss and accuracy, train and val, against epoch) as ``stem.png`` / ``stem.pdf``; the
    train loss is the training objective (with ``label_smoothing``, above the plain val cross-entropy); ``chance``
    (1 / classes), a line on the accuracy panel: the floor a val accuracy means something above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from erf_lab.io import figure_style, save_figure

    ep = [r["epoch"] for r in rows]
    with figure_style():  # every erf-lab figure's font (erf_lab.io.FIGURE_FONT), as it is laid out
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        for key, ax in (("loss", a1), ("acc", a2)):
            smoothed = key == "loss" and label_smoothing > 0
            ax.plot(ep, [r[f"train_{key}"] for r in rows], "o-",
                    label=f"train (label smoothing {label_smoothing:g})" if smoothed else "train")
            ax.plot(ep, [r[f"val_{key}"] for r in rows], "s-", label="val")
            if rows and f"val_{key}_ema" in rows[0]:
                ax.plot(ep, [r[f"val_{key}_ema"] for r in rows], "^--", label="val (EMA)")
            if key == "acc" and chance is not None:
                ax.axhline(chance, color="0.5", linestyle=":", linewidth=1, label=f"chance ({chance:.3g})")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs (no tick at epoch 1.2)
            ax.set_ylabel("cross-entropy" if key == "loss" else "top-1 accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            return save_figure(fig, stem)
        finally:
            plt.close(fig)


def _prepare_out_dir(out: Path, resume: bool, force: bool) -> str:
    """'new', 'resume' or 'complete'; raises for a folder holding something else."""
    if out.exists() and not out.is_dir():
        raise ErfLabError(f"--out {out} exists and is not a folder")
    refuse_other_result(out, "training")  # --force too: it deletes only a training run's files, writes the rest
    complete = (out / COMPLETE_FILE).is_file()
    state = (out / C.STATE_FILE).is_file()
    if complete and not is_training_record(read_json_or_none(out / COMPLETE_FILE)):
        raise ErfLabError(f"{out} holds another erf-lab result ({COMPLETE_FILE} of no training run); choose another "
                          f"--out (--force overwrites training runs only)")
    if D.restarted() and (state or complete):  # torchrun --max-restarts: continue the failed try (not deleted)
        resume, force = True, False
    if force:
        return "new"
    if complete:
        if resume:
            return "complete"
        raise ErfLabError(f"{out} already holds a complete training run; use --force to overwrite or another --out")
    if not state and _only_initialisation(out):
        return "new"  # killed before its first resume point: nothing was trained, the run starts (again)
    if resume:
        if not state:
            raise ErfLabError(f"nothing to resume in {out}: no interrupted training run there")
        return "resume"
    if state:
        raise ErfLabError(f"{out} holds an interrupted training run; pass --resume to continue it or --force to "
                          f"start over")
    if out.is_dir() and any(out.iterdir()):
        raise ErfLabError(f"--out {out} is not empty; choose a new folder or pass --force")
    return "new"


def _only_initialisation(out: Path) -> bool:
    """Whether ``out`` holds nothing but what a new run writes before its first resume point: ``checkpoints/``
    with the initialisation (``epoch_000.*``) or less, and temporary files of atomic writes cut short. A run
    killed (SIGKILL, a crash) there leaves it; the same command again starts the run there, as in an empty folder."""
    def leftover(p: Path) -> bool:  # erf_lab.io.atomic_path's temporary file
        return p.is_file() and p.name.startswith(".") and ".tmp" in p.name

    ckpt = out / "checkpoints"
    if not ckpt.is_dir() or ckpt.is_symlink() or any(p != ckpt and not leftover(p) for p in out.iterdir()):
        return False
    return all(p.is_file() and (p.name.startswith("epoch_000.") or leftover(p)) for p in ckpt.iterdir())


def _check_writable(out: Path) -> None:
    """ErfLabError (one line) when ``out`` cannot be written (read-only filesystem, permissions); folders made for
    the check are removed again (training makes them when it starts, so a later error leaves nothing behind), but for
    those another process filled or removed meanwhile: a study's jobs check their runs' folders side by side, and the
    first one's removal of the shared ``runs/`` failed when the second had just made its own folder in it
    ("Directory not empty", the study stopped)."""
    from erf_lab.io import missing_folders, prepare_out_dir, remove_empty_folders

    made = missing_folders(out)
    prepare_out_dir(out)
    remove_empty_folders(made)


_WORLD_SIZE = "processes (torchrun --nproc_per_node)"
#: why a run's --epochs cannot change under it (formatted with its epochs and the new ones)
_EPOCHS_WHY = ("the cosine learning-rate schedule spans all the epochs: its steps so far followed the {0}-epoch "
               "curve, while a {1}-epoch run's lr differs at every step after the warm-up, so they would not make one "
               "run")


def _differences(old: dict, new: dict, keys) -> list[tuple[str, object, object]]:
    """(option, old value, new value) for each of ``keys`` whose setting differs between the settings ``old`` (of
    a saved run) and ``new``, named as the command line names it (``--lr``, not the whole recipe)."""
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a == b or (k == "data" and _same_folder(a, b)):
            continue
        if k == "recipe" and isinstance(a, dict) and isinstance(b, dict):
            out += [(f"--{r.replace('_', '-')}" if r != "betas" else "AdamW betas", a.get(r), b.get(r))
                    for r in b if a.get(r) != b.get(r)]
        else:
            name = {"overrides": "--override", "world_size": _WORLD_SIZE}.get(k, f"--{k.replace('_', '-')}")
            out.append((name, a, b))
    return out


def _same_folder(a, b) -> bool:
    """Whether the --data values ``a`` and ``b`` name the same folder spelled otherwise (``e3``, ``./e3/``, its
    absolute path, ``~/...``): a resumed run is the same run (its images are checked by their fingerprint)."""
    if not (isinstance(a, str) and isinstance(b, str)) or CUE_WORLD in (a, b):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _format_on_disk(out: Path) -> str | None:
    """The weights format of the checkpoints a run (of an erf-lab that did not record it) has saved so far:
    ``pth``, ``safetensors``, ``both``, or None before its first."""
    suffixes = {p.suffix for p in (out / "checkpoints").glob("epoch_*")
                if (m := EPOCH_FILE.match(p.name)) and m.group(2) is None}  # the weights' files, not the EMA's
    return {frozenset({".pth"}): "pth", frozenset({".safetensors"}): "safetensors"}.get(
        frozenset(suffixes), "both" if suffixes else None)


def _resumed_amp(state: dict, device: str, out: Path):
    """(amp, autocast dtype) of a run resumed with ``--amp auto``: the run's own, as its first session resolved it
    on its device (the state is device-independent: a CPU run continues on CUDA and the reverse, each session's
    device in run.json's sessions); an fp16 run on the CPU is refused naming the devices."""
    amp = state["settings"].get("amp")
    if amp not in AMP_MODES or amp == "auto":  # not a resolved dtype (a damaged state): compared as it is below
        return _amp_dtype("auto", device)
    if amp == "fp16" and not device.startswith("cuda"):
        was = next((s.get("device") for s in reversed(state.get("sessions") or []) if isinstance(s, dict)), None)
        raise ErfLabError(f"--resume: the run in {out} trained with --amp fp16"
                          + (f" on --device {was}" if was else "") + f", which --device {device} cannot continue "
                          f"(fp16 needs a CUDA device); resume it on CUDA or start over with --force")
    return _amp_dtype(amp, device)


def _nproc_hint(world_size) -> str:
    if isinstance(world_size, int) and world_size > 1:
        return f" (under torchrun --nproc_per_node={world_size})"
    return " (one process, without torchrun)" if world_size == 1 else ""


def _clear(out: Path) -> None:
    for name in OUR_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def train(model: str, data: str = "cue-world", *, out, overrides: dict | None = None, recipe: Recipe | None = None,
          input_size: int = 64, train_size: int = 2000, val_size: int = 500, num_classes: int | None = None,
          resample: bool = False, seed: int = 0,
          device: str = "cpu", amp: str = "auto", channels_last: bool | None = None, sync_bn: bool = False,
          num_workers: int = 0, resume: bool = False, force: bool = False, checkpoint_format: str | None = None,
          show_progress: bool = True, argv: list[str] | None = None, on_step=None, checkpoint_seconds: float = 600.0,
          resume_hint: str = "continue with --resume",
          diverge_hint: str = "use a lower --lr (or --clip-grad, a longer --warmup-epochs) and start over with --force",
          warmup_option: str | None = "--warmup-epochs", warmup_hint: str = "train more epochs or warm up for fewer"
          ) -> dict:
    """Train ``model`` on ``data`` (``"cue-world"`` or an ImageFolder root) into the run folder ``out``.

    ``num_classes``: cue-world's (default 10); for a folder its class count, checked when given.
    ``channels_last``: None = the resumed run's setting, else on for the CPU (see ``speed_levers``), off on CUDA.
    Under torchrun (``RANK`` / ``WORLD_SIZE`` set) this is one DDP rank (gloo on CPU, NCCL on CUDA); the batch
    size is per rank. ``on_step(epoch, step)`` is called after every optimizer step (tests use it to interrupt).
    ``checkpoint_seconds``: the training state is saved mid-epoch at most this often (0: after every step), so a
    run killed without warning (SIGKILL, a lost node or rank) resumes from there instead of its last epoch's end.
    Returns ``{"out_dir", "rows", "run_info", "already_complete"}`` (``run_info`` None on ranks > 0).
    ``resume_hint``: how the caller's user continues a stopped run (printed with the saved state's folder);
    ``diverge_hint``: what to change when the loss turns non-finite (the end of that error line).
    ``warmup_option``: the option that sets the warm-up, named in the warnings on one that spans the whole run or
    rounds to no step (None where the caller's user has none: the epochs are said); ``warmup_hint``: what to change
    when it spans the whole run (the end of that warning).
    ``amp`` "auto" resolves on ``device`` for a new run; a resumed one keeps its own, on whichever device.
    """
    # under torchrun, a check that fails on one node only (its CPU count, its data) is said once the ranks have met:
    # raised before joining, it left the other ranks waiting in init_process_group
    with D.HeldChecks(hold=False) as checks:  # held once the device is known: a node without it cannot join
        device = _check_device(device)
        checks.hold = True  # the options' checks below: said once per node when every rank meets them alike
        refuse_empty(out)  # first: Path("") is the current folder
        recipe = recipe or Recipe()
        recipe.validate()
        for key, option in (("num_classes", "--num-classes (cue-world) or the data folder's classes"),
                            ("drop_path_rate", "--drop-path")):
            if key in (overrides or {}):  # build_model sets both: the override was dropped or went unrecorded
                raise ErfLabError(f"--override {key}: training sets it from {option}, recorded in run.json; drop the "
                                  f"override")
        if resume and force:
            raise ErfLabError("--resume and --force exclude each other")
        amp_given = amp != "auto"  # auto: the run's own on --resume (resolved on its first session's device)
        amp, amp_dtype = _amp_dtype(amp, device)
        if sync_bn and not device.startswith("cuda"):
            raise ErfLabError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only)")
        if not 0 <= int(num_workers) <= per_cpu_cap():
            raise ErfLabError(f"--num-workers must be 0 to {per_cpu_cap()} (4 per CPU of this machine), "
                              f"got {num_workers}")
        if not 8 <= int(input_size) <= 4096:
            raise ErfLabError(f"--input-size must be in [8, 4096], got {input_size}")
        if not float(checkpoint_seconds) >= 0:  # NaN too: a NaN interval would never save
            raise ErfLabError(f"--checkpoint-seconds must be 0 or more, got {float(checkpoint_seconds):g}")
        if num_classes is None and str(data) == CUE_WORLD:
            num_classes = 10
        if checkpoint_format is not None and checkpoint_format not in C.WEIGHT_FORMATS:
            raise ErfLabError(f"unknown checkpoint format {checkpoint_format!r}; choose {', '.join(C.WEIGHT_FORMATS)}")
        if device == "cpu":
            from erf_lab.erf.prepare import keep_freed_memory

            keep_freed_memory()  # a step's activations and gradients are allocated and freed again every step
    info = D.init(device)
    together = False  # every rank leaves at this same point (a finished run, or a stop agreed at one step)
    try:
        D.gather_or_fail(None, checks.error, info)  # the checks above: a rank's own error stops every rank
        with StopRequest() as stop, contextlib.ExitStack() as held_folder:
            # ~ expanded, as check_out_path does for every other --out (before: the writability check made the
            # expanded folder, then failed with a traceback removing the unexpanded one, and left it there)
            result = _train(model, data, Path(out).expanduser(), dict(overrides or {}), recipe, int(input_size),
                            int(train_size), int(val_size), num_classes, bool(resample), int(seed),
                            D.device_for(device, info), amp, amp_dtype, amp_given, channels_last, sync_bn,
                            int(num_workers), resume, force, checkpoint_format, show_progress, argv, on_step, info,
                            stop, resume_hint, diverge_hint, (warmup_option, warmup_hint), held_folder,
                            float(checkpoint_seconds))
        together = True
        return result
    except BaseException as stopped:
        together = isinstance(stopped, (KeyboardInterrupt, TrainingDiverged)) and not isinstance(stopped, ForcedStop)
        if info.enabled:
            # Its traceback keeps _train's frame alive, and with it DDP's reducer, which holds the process group:
            # free them before the group is destroyed.
            chained, seen = stopped, set()
            while chained is not None and id(chained) not in seen:  # and of those it was raised from or during
                seen.add(id(chained))
                traceback.clear_frames(chained.__traceback__)
                chained = chained.__cause__ or chained.__context__
            gc.collect()
        raise
    finally:
        if together:
            # Ranks leave together: a rank that left right after its last all_gather_object (rank 0 still saving)
            # could start interpreter shutdown while a gloo worker thread was still releasing that collective's
            # tensors, which then needed the GIL and aborted the process (core dump: std::terminate in
            # ProcessGroupGloo::runLoop, 1 run in 40-60; the group's threads outlive destroy_process_group).
            D.barrier(info)
        D.shutdown(info)


def _train(model_name, data, out, overrides, recipe, input_size, train_size, val_size, num_classes, resample, seed,
           device, amp, amp_dtype, amp_given, channels_last, sync_bn, num_workers, resume, force, checkpoint_format,
           show_progress, argv, on_step, info: D.DistInfo, stop: StopRequest, resume_hint: str, diverge_hint: str,
           warmup_words: tuple, held_folder: contextlib.ExitStack, checkpoint_seconds: float) -> dict:
    from erf_lab.erf.images import model_mean_std
    from erf_lab.io import progress, write_json
    from erf_lab.models.summary import model_kernel_sizes
    from erf_lab.provenance import host, launch, now, versions

    start_time, t_start = now(), time.time()
    cue = str(data) == CUE_WORLD  # the image counts are cue-world's: a folder has its own (run.json's data)
    settings = {"model": model_name, "overrides": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in overrides.items()},
                "data": str(data), "input_size": input_size, "train_size": train_size if cue else None,
                "val_size": val_size if cue else None,
                "num_classes": num_classes, "resample": resample, "seed": seed, "recipe": recipe.as_dict(),
                "amp": amp, "channels_last": channels_last, "sync_bn": bool(sync_bn),
                "world_size": info.world_size, "checkpoint_format": checkpoint_format}
    def decide() -> str:  # on rank 0 (the other ranks would race with its first writes), told to the others
        if out.is_dir():  # no other erf-lab process writes a run there meanwhile; the temporary files of a run
            held_folder.enter_context(hold_folder(out, subfolders=RUN_SUBFOLDERS))  # killed while it wrote go
        for split in ("train", "val") if str(data) != CUE_WORLD else ():  # the folders build_data reads
            refuse_out_inside(out, Path(data) / split, "--data",
                              f"its checkpoints and figures would become {split} images of a class")
        mode = _prepare_out_dir(out, resume, force)
        if mode in ("new", "resume"):
            _check_writable(out)
        return mode

    mode = D.decided_on_rank0(decide, info)
    # the setup's checks run on every rank; a rank that fails tells the others (gather_or_fail), so none is left
    # waiting in a collective (before: a missing --data stopped rank 0 and rank 1 died of a closed connection)
    error = None
    try:
        if mode == "complete":  # --resume on a finished run: nothing to do, if it is this run
            done = read_json_or_none(out / COMPLETE_FILE)["settings"]
            if not amp_given and done.get("amp") in AMP_MODES:  # --amp auto: the run's own, on any device
                settings["amp"] = done["amp"]
            folder = str(data) != CUE_WORLD
            keys = [k for k in settings if k not in ("channels_last", "world_size") and k in done
                    and settings[k] is not None and not (folder and k == "num_classes")]
            diff = _differences(done, settings, keys)
            if diff:
                epochs = next((d for d in diff if d[0] == "--epochs"), None)
                raise ErfLabError(f"{out} already holds a complete training run with other settings "
                                  f"({', '.join(d[0] for d in diff)})"
                                  + (f"; --epochs {epochs[2]} would not extend it: {_EPOCHS_WHY.format(*epochs[1:])}"
                                     if epochs else "")
                                  + "; use --force to overwrite or choose another --out")
        state = C.load_state(out) if mode == "resume" else None
        if state is not None and not amp_given:  # a resumed run keeps its autocast dtype on any device
            amp, amp_dtype = _resumed_amp(state, device, out)
            settings["amp"] = amp
        if channels_last is None:  # a speed setting: a resumed run keeps its own
            channels_last = (bool(state["settings"].get("channels_last", False)) if state is not None
                             else torch.device(device).type == "cpu")
        settings["channels_last"] = channels_last = bool(channels_last)
        # a resumed run keeps its weights format (one format for all its epochs; an explicit other one is refused below)
        own = None if state is None else state["settings"].get("checkpoint_format") or _format_on_disk(out)
        settings["checkpoint_format"] = checkpoint_format = checkpoint_format or own or "both"
        if state is not None:  # a folder's class count is the folder's: --num-classes only checks it (below)
            folder = str(data) != CUE_WORLD
            was = {**state["settings"], "checkpoint_format": own or checkpoint_format}  # None: no weights saved yet
            # (a folder run's state of an older erf-lab recorded cue-world's default sizes, which it never used)
            diff = _differences(was, settings, [k for k in settings
                                                if not (folder and k in ("num_classes", "train_size", "val_size"))])
            if diff:  # the number of processes first: a --batch-size changed to make up for it differs too
                name, was, now = next((d for d in diff if d[0] == _WORLD_SIZE), diff[0])
                why = (f": --batch-size is per process, so each of its steps took {was} x "
                       f"{state['settings']['recipe'].get('batch_size')} images in the data order of {was} "
                       f"process(es), which another number would not continue" if name == _WORLD_SIZE else
                       f": {_EPOCHS_WHY.format(was, now)}" if name == "--epochs" else "")
                raise ErfLabError(f"--resume: the run in {out} was made with other settings ({len(diff)} differ, e.g. "
                                  f"{name}: {was!r} there, {now!r} now{why}); repeat its command"
                                  f"{_nproc_hint(was) if name == _WORLD_SIZE else ''} or start over with --force")
    except Exception as e:  # noqa: BLE001 - every rank learns of it below (one process: raised as it is)
        error = e
    D.gather_or_fail(None, error, info)
    if mode == "complete":  # after the gather: a rank that found other settings stops every rank with it (before:
        # the others returned and it was left alone in the gather, rank 0 hanging in its final barrier)
        return {"out_dir": out, "rows": [], "run_info": None, "already_complete": True}
    built = {}

    def first_build() -> None:  # rank 0 renders (and caches) a generated dataset first; the others read its cache
        built["d"] = build_data(data, input_size, train_size=train_size, val_size=val_size, num_classes=num_classes,
                                seed=seed, resample=resample, show_progress=show_progress)

    D.decided_on_rank0(first_build, info)
    d, error = built.get("d"), None
    try:
        if d is None:
            with D.said_once_per_node(info):  # every process of a node scans the same folder
                d = build_data(data, input_size, train_size=train_size, val_size=val_size, num_classes=num_classes,
                               seed=seed, resample=resample, show_progress=False)
        n_classes = len(d.classes)
        if num_classes is not None and num_classes != n_classes:
            raise ErfLabError(f"--num-classes {num_classes}, but {data} has {n_classes} classes "
                              f"({', '.join(d.classes[:6])}{', ...' if n_classes > 6 else ''}); drop --num-classes "
                              f"or use a folder with {num_classes}")  # (an ImageNet folder: not 1000 names)
        settings["num_classes"], settings["train_images"] = n_classes, len(d.train)  # recorded as trained
        if hasattr(d.train, "fingerprint"):  # a folder: its class names and image paths
            settings["train_fingerprint"] = d.train.fingerprint()
            # the validation images too: the epochs before an interruption were measured on them
            settings["val_fingerprint"] = d.val.fingerprint()
        if state is not None:  # a folder may have changed since the interruption
            for k, what in (("num_classes", "classes"), ("train_images", "training images")):
                if k in state["settings"] and state["settings"][k] != settings[k]:
                    raise ErfLabError(f"--resume: {data} now has {settings[k]} {what}, the interrupted run in {out} "
                                      f"had {state['settings'].get(k)}; restore the data or start over with --force")
            old = state["settings"].get("train_fingerprint")
            if old is not None and old != settings.get("train_fingerprint"):
                raise ErfLabError(f"--resume: the class names or training images of {data} differ from the interrupted "
                                  f"run's in {out} (same counts); restore the data or start over with --force")
            old = state["settings"].get("val_fingerprint")  # None: a state of an erf-lab that did not record it
            if old is not None and old != settings.get("val_fingerprint"):
                raise ErfLabError(f"--resume: the validation images of {data} differ from the interrupted run's in "
                                  f"{out} (its epochs so far were measured on the others, metrics.csv would mix two "
                                  f"sets); restore the data or start over with --force")
        # a folder run's labels are its sorted class folders: each weights file names them (shape-bias reads them)
        classes = d.classes if d.description.get("kind") == "folder" else None
        B, W = recipe.batch_size, info.world_size
        steps_per_epoch = len(d.train) // (B * W)
        if steps_per_epoch < 1:
            raise ErfLabError(f"--batch-size {B} x {W} process(es) is larger than the train set "
                              f"({len(d.train)} images); the incomplete last batch is dropped, so no step would run")
        net = build_model(model_name, overrides, n_classes, recipe.drop_path, seed)
        if B == 1:
            _refuse_single_value_norms(net, model_name, input_size)
        mean, std = model_mean_std(net)
        mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        net.to(device)
        speed_levers(net, channels_last, device)
        optimizer = build_optimizer(net, recipe)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        ema = ModelEma(net, recipe.ema) if recipe.ema > 0 else None
    except Exception as e:  # noqa: BLE001 - every rank learns of it below
        error = e
    # the ranks compare what they built: nodes whose --data at the same path holds other images would otherwise
    # run other numbers of steps and wait for each other in a collective forever
    everyone = D.gather_or_fail(None if error else json.loads(json.dumps(settings, default=str)), error, info)
    differing = next((r for r, s in enumerate(everyone) if s != everyone[0]), None)
    if differing is not None:
        names = {"train_images": "the number of training images", "train_fingerprint": "the training images' names",
                 "val_fingerprint": "the validation images' names",
                 "num_classes": "the classes"}
        what = [names.get(k, k) for k in dict.fromkeys([*everyone[0], *everyone[differing]])
                if everyone[0].get(k) != everyone[differing].get(k)]
        raise on_every_rank(ErfLabError(f"the ranks disagree on {', '.join(what)}: rank {differing} differs from rank "
                                        "0 (every rank must read the same data and options)"))
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))
    option, hint = warmup_words
    warmup = (f"{option} {recipe.warmup_epochs:g}" if option else
              f"{recipe.warmup_epochs:g} epoch{'' if recipe.warmup_epochs == 1 else 's'}")
    if warmup_steps >= total_steps:  # e.g. --epochs 1 with the default warm-up of 1 epoch
        warnings.warn(f"the warm-up ({warmup}) spans the whole run ({total_steps} steps): the learning rate only "
                      f"rises, to its peak at the last step, and the cosine never lowers it; {hint}")
    elif recipe.warmup_epochs > 0 and warmup_steps == 0:
        warnings.warn(f"the warm-up ({warmup}) rounds to no step "
                      f"({recipe.warmup_epochs * steps_per_epoch:g} of the {steps_per_epoch} steps per epoch): "
                      f"training starts at the peak learning rate")

    epoch, position, step, rows, sums = 0, 0, 0, [], _Sums()
    epoch_images, epoch_time = 0, 0.0  # of the epoch so far (img/s), over sessions
    # how each session of the run was started (a resumed run's earlier ones from its state: their command,
    # device and versions would otherwise be lost to the last session's); the last one's end is the save's time
    sessions = [s for s in (state or {}).get("sessions", []) if isinstance(s, dict)]
    # "launch": torchrun's part of the command ("command" is erf-lab's own argv, which alone runs one process)
    session = {"command": list(argv) if argv is not None else None, "launch": launch(), "device": str(device),
               "versions": versions(), "host": host(device), "start_time": start_time,
               "from_epoch": state["epoch"] if state is not None else 0,
               "from_step": state["step"] if state is not None else 0}

    # [file, why, epoch] of the images that failed to load after the scan (each replaced by the next one): this
    # process's (from its DataLoader workers' batches; the datasets keep their own), after a save_state every rank's
    failed_loads = list((state or {}).get("failed_loads", []))

    def failed_so_far() -> list[list]:
        return unique_failed_loads(failed_loads, getattr(d.train, "failed_loads", None),
                                   getattr(d.val, "failed_loads", None))

    def all_sessions() -> list[dict]:
        return [*sessions, {**session, "end_time": now()}]

    def save_state():
        rng, rank_sums, rank_failed = [C.rng_state()], [sums.v], [failed_so_far()]
        if W > 1:
            rng, rank_sums, rank_failed = [None] * W, [None] * W, [None] * W
            dist.all_gather_object(rng, C.rng_state())
            dist.all_gather_object(rank_sums, sums.v)
            dist.all_gather_object(rank_failed, failed_so_far())
        failed_loads[:] = unique_failed_loads(*rank_failed)  # run.json takes them after the last epoch's save
        if info.is_main:
            C.save_state(out, {"settings": settings, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict() if scaler is not None else {},
                               "ema": ema.state_dict() if ema is not None else {}, "epoch": epoch,
                               "position": position, "step": step, "rows": rows, "sums": rank_sums, "rng": rng,
                               "epoch_images": epoch_images, "epoch_time": epoch_time, "sessions": all_sessions(),
                               "failed_loads": failed_loads})

    if state is not None:
        epoch, position, step, rows = state["epoch"], state["position"], state["step"], list(state["rows"])
        if not (0 <= epoch <= recipe.epochs and 0 <= position <= steps_per_epoch
                and step == epoch * steps_per_epoch + position and len(rows) == epoch):
            raise ErfLabError(f"--resume: the training state {out / C.STATE_FILE} is damaged (epoch {epoch}, step "
                              f"{step}, position {position} do not fit this run's {recipe.epochs} epochs of "
                              f"{steps_per_epoch} steps); start again with --force")
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            saved = state["sums"]  # each rank's own partial-epoch sums (one tensor: a state of an older erf-lab)
            sums.v = (saved if isinstance(saved, torch.Tensor) else saved[info.rank]).clone()
            epoch_images, epoch_time = state.get("epoch_images", 0), state.get("epoch_time", 0.0)
            C.set_rng_state(state["rng"][info.rank])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            what = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ErfLabError(f"--resume: the training state {out / C.STATE_FILE} does not fit this run's model and "
                              f"optimizer ({type(e).__name__}: {what}); start again with --force") from None
    else:
        torch.manual_seed(seed + 1000 * (info.rank + 1))  # drop path differs per rank, not per run
        with held():  # a stop meanwhile comes after both: epoch_000 is never left without its resume point
            def take() -> None:  # a new folder: held from its making (another process may have made it meanwhile)
                out.mkdir(parents=True, exist_ok=True)
                held_folder.enter_context(hold_folder(out, subfolders=RUN_SUBFOLDERS))

            D.decided_on_rank0(take, info)  # every rank stops with a refusal, not in save_state's gather
            if info.is_main:
                if force:
                    _clear(out)
                # marked: measurements on it say "random weights"
                C.save_weights(net.state_dict(), out / "checkpoints" / "epoch_000", checkpoint_format,
                               random_init_seed=seed, train_input_size=input_size, classes=classes)
            # the resume point from the start: a run killed (SIGKILL, a crash) in its first epoch continues with
            # --resume like one killed later (before: only epoch_000 was left, which neither --resume nor the same
            # command again continued; --force had to delete it)
            save_state()

    train_net = distributed_net(net, W, device, sync_bn)
    sampler = torch.utils.data.DistributedSampler(d.train, num_replicas=W, rank=info.rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    bar = progress(total=total_steps, initial=step, desc="train", unit="step",
                   disable=not (show_progress and info.is_main))
    t0 = None  # start of the timed part of the current epoch in this session

    stop.armed = True
    bad_steps = 0  # consecutive steps with a non-finite loss
    last_save = time.monotonic()  # of the training state (the ranks agree on when to save: each gathers from all)
    try:
        while epoch < recipe.epochs:
            sampler.set_epoch(epoch)
            for split in (d.train, d.val):  # (cue-world's fixed val images do not change with it)
                if hasattr(split, "set_epoch"):
                    split.set_epoch(epoch)
            order = list(sampler)[: steps_per_epoch * B][position * B:]
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(d.train, order), batch_size=B,
                                                 num_workers=num_workers, pin_memory=device.startswith("cuda"),
                                                 # its own generator: the global RNG (drop path) stays resumable
                                                 generator=torch.Generator().manual_seed(seed + epoch),
                                                 collate_fn=collate_noting_failed_loads)
            train_net.train()
            t0 = time.time()
            for x, y, failed in iterate(loader):
                failed_loads += failed
                lr = lr_at(step, total_steps, warmup_steps, recipe.lr, recipe.min_lr)
                set_lr(optimizer, lr)
                x, y = _prepare(x, y, device, mean, std, channels_last)
                with _autocast(device, amp_dtype):
                    logits = train_net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if recipe.clip_grad > 0:
                    nn.utils.clip_grad_norm_(net.parameters(), recipe.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update(net)
                loss_value = loss.item()
                if np.isfinite(loss_value):  # a step the fp16 scaler skips leaves the epoch's sums as they are
                    sums.add(loss_value * len(y), (logits.argmax(1) == y).sum().item(), len(y))
                step, position = step + 1, position + 1
                epoch_images += len(y) * W
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{epoch_images / max(epoch_time + time.time() - t0, 1e-9):.0f}")
                if on_step is not None:
                    on_step(epoch, step)
                # a non-finite loss: the fp16 loss scaler skips such steps while it backs off, else the weights
                # are NaN from here on (every later number, checkpoint and probe would be meaningless)
                diverged, save = stop.check(info, device, diverged=not np.isfinite(loss_value),
                                            save_due=time.monotonic() - last_save >= checkpoint_seconds)
                bad_steps = bad_steps + 1 if diverged else 0
                if bad_steps > (MAX_SKIPPED_SCALER_STEPS if scaler is not None else 0):
                    bar.close()
                    # (the same words on every rank: a rank's own loss may still be finite at this step)
                    raise _diverged(f"step {step}: the training loss is not finite", epoch, lr, out, diverge_hint)
                if save and not bad_steps:  # mid-epoch: a kill without warning (SIGKILL, a rank lost) loses less
                    epoch_time, t0 = epoch_time + time.time() - t0, None  # the state's img/s: this epoch so far
                    with held():  # a forced stop meanwhile does not cut the save's collectives in half
                        save_state()
                    last_save, t0 = time.monotonic(), time.time()
            epoch_time, t0 = epoch_time + time.time() - t0, None
            train_loss, train_acc = sums.reduced(info, device)
            if W > 1:  # each rank's BN statistics saw its own batches: evaluate rank 0's, the model it saves
                for m in (net, ema.module) if ema is not None else (net,):
                    for b in m.buffers():
                        dist.broadcast(b, 0)
            ev = dict(batch_size=max(B, 64), device=device, mean=mean, std=std, info=info, amp_dtype=amp_dtype,
                      channels_last=channels_last, num_workers=num_workers, failed_loads=failed_loads)
            val_loss, val_acc = evaluate(net, d.val, **ev)
            if not np.isfinite(val_loss):  # the same on every rank (reduced): the weights are no longer finite
                bar.close()
                raise _diverged(f"its end: the validation loss is {val_loss}", epoch, lr, out, diverge_hint)
            lr = lr_at(step - 1, total_steps, warmup_steps, recipe.lr, recipe.min_lr)  # of its last step
            row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "img_per_s": epoch_images / max(epoch_time, 1e-9)}
            if ema is not None:
                row["val_loss_ema"], row["val_acc_ema"] = evaluate(ema.module, d.val, **ev)
            rows.append(row)
            epoch, position, sums, epoch_images, epoch_time = epoch + 1, 0, _Sums(), 0, 0.0
            if info.is_main:
                C.save_weights(net.state_dict(), out / "checkpoints" / epoch_stem(epoch), checkpoint_format,
                               extra={"model_ema": ema.state_dict()} if ema is not None else None,
                               train_input_size=input_size, classes=classes)
                if ema is not None:  # what the timeline measures with --weights ema (a .pth-only run too)
                    C.save_weights(ema.state_dict(), out / "checkpoints" / epoch_stem(epoch, ema=True),
                                   "safetensors", train_input_size=input_size, classes=classes)
                _write_metrics(out / "metrics.csv", rows)
                bar.write(f"epoch {epoch}/{recipe.epochs}: train loss {train_loss:.4f} acc {train_acc:.3f}, "
                          f"val loss {val_loss:.4f} acc {val_acc:.3f}"
                          + (f", EMA val loss {row['val_loss_ema']:.4f} acc {row['val_acc_ema']:.3f}"
                             if ema is not None else ""))
            save_state()
            last_save = time.monotonic()
            # a stop asked for during the evaluation and the saving stops here, at the epoch's end (after the last
            # epoch no step would check it: the run finished with exit 0, the stop unheeded)
            stop.check(info, device)
    except ForcedStop:
        bar.close()
        raise
    except KeyboardInterrupt:
        if t0 is not None:
            epoch_time += time.time() - t0
        save_state()
        bar.close()
        if info.is_main:
            where = f"after epoch {epoch}" if position == 0 and epoch > 0 else f"at epoch {epoch + 1}, step {step}"
            print(f"stopped {where}: state saved in {out}; {resume_hint}", file=sys.stderr)
        raise
    bar.close()

    if not info.is_main:
        return {"out_dir": out, "rows": rows, "run_info": None, "already_complete": False}
    files = C.save_weights(net.state_dict(), out / "model", checkpoint_format, train_input_size=input_size,
                           classes=classes)
    if ema is not None:
        files += C.save_weights(ema.state_dict(), out / "model_ema", "safetensors", train_input_size=input_size,
                                classes=classes)
    plot_curves(rows, out / "curves", recipe.label_smoothing, d.description["chance_val_acc"])
    at_chance = chance_note(rows[-1]["val_acc"], n_classes, len(d.val), d.description.get("majority_class_val_acc"))
    run_info = {
        "command": argv, "launch": launch(), "settings": settings, "device": device, "num_workers": num_workers,
        "checkpoint_format": checkpoint_format, "cwd": os.getcwd(), "versions": versions(), "host": host(device),
        "model_config": {"name": model_name, "overrides": settings["overrides"], "num_classes": n_classes,
                         "drop_path_rate": recipe.drop_path, "kernel_sizes": model_kernel_sizes(net),
                         "params": sum(p.numel() for p in net.parameters())},
        "data": {k: v for k, v in d.description.items() if not k.startswith("skipped")},
        "skipped_images": len(d.description.get("skipped_train", [])) + len(d.description.get("skipped_val", [])),
        # which files, and why: [path relative to --data, reason], as erf-lab compute lists its skipped images
        "skipped": [*d.description.get("skipped_train", []), *d.description.get("skipped_val", [])],
        # images that passed the scan but failed to load later (each replaced by the next image): [path relative to
        # --data, why, epoch], from every rank and DataLoader worker and every session of a resumed run
        "failed_loads": failed_so_far(),
        "seeds": {"init": seed, "data": seed, "sampler": seed}, "world_size": W, "dist_backend": info.backend,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "final": rows[-1],
        # a final val accuracy at chance said so (data's chance_val_acc is the guessing floor)
        "val_acc_at_chance": at_chance is not None, "chance_note": at_chance,
        "weights": [str(p.relative_to(out)) for p in files], "start_time": start_time, "end_time": now(),
        "resumed": state is not None, "wall_s_this_session": time.time() - t_start,
        # every session's command, device, versions and times (of a run resumed from an older erf-lab's state: the
        # sessions since)
        "sessions": all_sessions(),
    }
    write_json(out / COMPLETE_FILE, run_info)
    (out / C.STATE_FILE).unlink(missing_ok=True)
    return {"out_dir": out, "rows": rows, "run_info": run_info, "already_complete": False}
