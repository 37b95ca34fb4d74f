"""The ERF of a model over a set of images: the mean of :class:`~erf_lab.erf.attribution.EffectiveReceptiveField`
maps, exactly what the official ``erf/visualize_erf.py`` saves (``AverageMeter.avg``); NaN / inf maps are skipped
and counted. The accumulation (:class:`Accumulator`) is the resumable state of a run.

Speed levers (recorded in ``ErfResult.info``, see :mod:`erf_lab.erf.prepare`): structural re-parameterization on
a copy (identical function), channels_last, frozen parameters, batching (samples are independent in eval mode),
and fastconv for the large depthwise kernels.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from erf_lab.erf.attribution import AGGREGATES, EffectiveReceptiveField
from erf_lab.erf.prepare import (check_device, conv_settings, full_fp32, keep_freed_memory, param_dtype,
                                 prepare_model)
from erf_lab.erf.receptive_field import input_channels, train_form_only
from erf_lab.errors import ErfLabError, out_of_memory
from erf_lab.paths import env_flag


#: ``batch_size=None`` on CUDA: the batch holds as many images as fit in this fraction of the memory free after the
#: first pass (one image, whose peak memory is the measure of an image), at most ``AUTO_BATCH_MAX_CUDA``
CUDA_BATCH_MEMORY_FRACTION = 0.6
AUTO_BATCH_MAX_CUDA = 32


def memory_batch_size(per_image_bytes: int, available_bytes: int, cap: int = AUTO_BATCH_MAX_CUDA,
                      remaining: int | None = None) -> int:
    """Images per pass that fit ``CUDA_BATCH_MEMORY_FRACTION`` of ``available_bytes`` at ``per_image_bytes`` each
    (the peak memory of a one-image pass over the memory allocated before it), 1 to ``cap``; with ``remaining``
    images known, at most half of them, so that the batch size repeats: the first pass of each size chooses kernels
    for its shapes (cuDNN's search, fastconv's autotune) and the steady rate is taken from the repeats."""
    fit = int(CUDA_BATCH_MEMORY_FRACTION * max(0, available_bytes) // max(1, int(per_image_bytes)))
    if remaining is not None:
        fit = min(fit, int(remaining) // 2)
    return max(1, min(int(cap), fit))


def _sizes_batch_by_memory(dev: torch.device) -> bool:
    """``batch_size=None`` on ``dev`` is sized by memory (CUDA, whose allocator reports its peak)."""
    return dev.type == "cuda"


def _memory_peak_start(dev: torch.device) -> int:
    """Reset the device's peak-memory count; returns the bytes allocated now (the pass's base)."""
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


def _memory_peak(dev: torch.device) -> int:
    return torch.cuda.max_memory_allocated(dev)


def _cuda_available_bytes(dev: torch.device) -> int:
    """Memory a larger batch can still take: free on the device plus what PyTorch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


@dataclass
class ErfResult:
    """Mean ERF map (float64, H x W) and how it was obtained. ``input_hw``: the images' (H, W); ``input_size``: their
    side where they are square, None where they are not (it gave H alone, which a reader took for both sides)."""

    erf: np.ndarray
    num_used: int
    num_skipped: int
    skipped: list
    layer: str
    input_size: int | None
    aggregate: str
    processed: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    input_hw: tuple[int, int] | None = None

    def __post_init__(self):
        if self.input_hw is None and self.input_size is not None:
            self.input_hw = (int(self.input_size), int(self.input_size))
        elif self.input_hw is not None:
            self.input_hw = (int(self.input_hw[0]), int(self.input_hw[1]))
            if self.input_size is None and self.input_hw[0] == self.input_hw[1]:
                self.input_size = self.input_hw[0]


@dataclass
class Accumulator:
    """Running sum of maps, count, ids processed (used or skipped): the resumable state of a run."""

    sum: np.ndarray | None = None
    count: int = 0
    processed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [id, reason]

    def add(self, ident: str, grad_map: np.ndarray | None, reason: str | None = None) -> None:
        """Count one image (or its reason for being skipped). The new state is built first and assigned in one
        statement, so a Ctrl-C inside ``add`` leaves the previous state whole (never a sum one image ahead of
        its count, nor an id marked processed without its map)."""
        if grad_map is None:
            self.processed, self.skipped = self.processed + [ident], self.skipped + [[ident, reason or "skipped"]]
            return
        total = (grad_map.astype(np.float64) if self.sum is None else self.sum + grad_map)
        self.sum, self.count, self.processed = total, self.count + 1, self.processed + [ident]

    def save(self, path, extra: dict | None = None) -> None:
        """Atomically write the state as ``.npz`` (``extra`` is stored as JSON)."""
        import json

        from erf_lab.io import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, sum=self.sum if self.sum is not None else np.zeros((0, 0)), count=self.count,
                         processed=json.dumps(self.processed), skipped=json.dumps(self.skipped),
                         extra=json.dumps(extra or {}))

    @classmethod
    def load(cls, path) -> tuple["Accumulator", dict]:
        import json

        with np.load(path, allow_pickle=False) as z:
            s = z["sum"]
            acc = cls(sum=None if s.size == 0 else s.astype(np.float64), count=int(z["count"]),
                      processed=json.loads(str(z["processed"])), skipped=json.loads(str(z["skipped"])))
            return acc, json.loads(str(z["extra"]))


def _iter_items(images):
    """Normalize the accepted inputs to (total or None, iterator of (id, loader))."""
    from erf_lab.erf.images import ImageSource

    if isinstance(images, ImageSource):
        return len(images), images.items()
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ErfLabError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        return images.shape[0], ((str(i), (lambda t=images[i]: t)) for i in range(images.shape[0]))

    def gen():
        i = 0
        for batch in images:
            if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], str):
                yield batch[0], (lambda t=batch[1]: t)
                i += 1
                continue
            if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
                batch = batch[0]  # a DataLoader's [images, labels] (or [images]): the images
            if not isinstance(batch, torch.Tensor) or batch.dim() not in (3, 4):
                got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
                raise ErfLabError(f"images: each item must be a (N, C, H, W) or (C, H, W) tensor, an (id, tensor) "
                                  f"pair or a DataLoader's [images, labels] batch, got {got}")
            b = batch if batch.dim() == 4 else batch.unsqueeze(0)
            for t in b:
                yield str(i), (lambda t=t: t)
                i += 1

    counted = hasattr(images, "__len__") and not isinstance(images, (list, tuple, torch.utils.data.DataLoader))
    return (len(images) if counted else None), gen()  # a DataLoader's len() counts batches, not images


def _counting_flops(model):
    from erf_lab.erf.roofline import counting_flops

    return counting_flops(model)


def _sgemm_reference(dev) -> dict | None:
    """The device's SGEMM rate for the roofline; None (and the run goes on) if it cannot be measured."""
    from erf_lab.erf.roofline import sgemm_reference

    try:
        return sgemm_reference(dev)
    except (RuntimeError, OSError) as e:
        import warnings

        warnings.warn(f"SGEMM rate not measured ({type(e).__name__}: {e}); no roofline fraction", stacklevel=2)
        return None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (run.json's ``dtype``)."""
    return str(dtype).removeprefix("torch.")


def low_precision_warning(dtype: torch.dtype) -> str | None:
    """Warn (and return the line) when the gradients would be taken below float32: a half-precision model (a
    ``package.module:factory`` or a Python caller's ``.half()`` / ``.bfloat16()``) is measured in its own precision,
    ~3 significant digits (a small RepLKNet at 64 px: the map moved by 20 % of its maximum in bfloat16, 20 % in
    float16, against float32's 1e-7 to float64)."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return None
    import warnings

    line = (f"the ERF is measured in {dtype_name(dtype)}, the model's parameter precision (~3 significant digits: "
            f"a small RepLKNet's map moved by 20 % of its maximum against float32); convert the model with .float() "
            f"for a float32 measurement")
    warnings.warn(line, stacklevel=3)
    return line


def compute_erf(model: nn.Module, images, *, layer: str | None = None, aggregate: str = "relu",
                batch_size: int | None = 1, device: str = "cpu", reparameterize: bool = True,
                channels_last: bool = True, conv_backend: str = "fastconv", show_progress: bool = True,
                state: Accumulator | None = None, on_batch: Callable[[Accumulator], None] | None = None,
                reducer: Callable[[Accumulator], Accumulator] | None = None,
                prepared: bool = False, inplace: bool = False, allow_tf32: bool | None = None,
                roofline: bool = False, shrink_on_oom: bool | None = None, progress_note: str = "") -> ErfResult:
    """Measure the ERF of ``model`` at ``layer`` over ``images``.

    ``images``: an (N, C, H, W) tensor (C: the model's input channels, 3 for RGB), an iterable of batches (or of
    ``(id, tensor)`` pairs; a DataLoader's ``[images, labels]`` batches give their images), or an
    :class:`~erf_lab.erf.images.ImageSource`. ``state`` resumes an interrupted accumulation (ids already in
    ``state.processed`` are not used again); ``on_batch(state)`` runs after every batch (checkpointing);
    ``reducer`` merges the per-process states (distributed runs) before the mean is taken. ``batch_size=None``: on
    CUDA the first pass holds one image and its peak memory sizes the batch of the rest (:func:`memory_batch_size`;
    ``info["batch_memory"]``), elsewhere one image per pass. ``shrink_on_oom`` (default: ``batch_size is None``; a
    caller that chose an automatic size itself says True): a pass that runs out of memory is split in two and the
    later passes keep the halved size (``info["batch_halved_at"]``: the sizes that did not fit); otherwise the
    batch size is never changed. ``info["batch_size"]`` is the size in force at the end; ``info["dtype"]`` the
    precision the gradients were taken in (the model's; below float32 a warning says so). The model is
    copied before it is re-parameterized / frozen unless ``inplace`` (or ``prepared``: already done).
    On CUDA the gradients are computed in full fp32: TF32 convolutions and matmuls are switched off for the
    measurement (``allow_tf32=True`` or ``$ERF_LAB_ALLOW_TF32=1`` (true, yes, on) keeps them; measured on an H200 for
    replknet_31b at 448^2, TF32 moved the ERF matrix by 4.4% max-relative, full fp32 by 5e-4).

    Every batch's compute time (forward + input gradient + copy of the maps to the host; not the image loading,
    not ``on_batch``) is in ``info["batch_seconds"]`` as ``[images, seconds]``. ``roofline``: also count the FLOPs
    of the first batch (:func:`erf_lab.erf.roofline.counting_flops`, ``info["flops_per_image"]``; kept in the
    erf-lab cache per model structure, layer and input size, so a repeated run does not count again), measure the
    device's SGEMM rate (``info["roofline"]``) and show GFLOP/s and the % of SGEMM in the progress bar.
    ``progress_note`` follows the bar's name (a torchrun rank's share of the images).
    """
    if aggregate not in AGGREGATES:
        raise ErfLabError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATES)}")
    if allow_tf32 is None:
        allow_tf32 = env_flag("ERF_LAB_ALLOW_TF32")
    if batch_size is not None and int(batch_size) < 1:
        raise ErfLabError(f"--batch-size must be at least 1, got {batch_size}")
    dev = check_device(device)
    size_by_memory = batch_size is None and _sizes_batch_by_memory(dev)
    shrink = batch_size is None if shrink_on_oom is None else bool(shrink_on_oom)
    limit = 1 if batch_size is None else int(batch_size)
    if dev.type == "cpu":
        keep_freed_memory()  # no page faults on the large activations of big inputs
    if prepared:
        m, info = model, {"prepared_by_caller": True}
    else:
        train_names = {name for name, _ in model.named_modules()}  # before an in-place re-parameterization
        m, info = prepare_model(model, reparameterize=reparameterize, channels_last=channels_last,
                                conv_backend=conv_backend, device=dev, inplace=inplace)
    try:
        attribution = EffectiveReceptiveField(m, layer, aggregate)
    except ErfLabError:
        if prepared or layer not in train_names:
            raise  # unknown in the measured form and in the given one: the close names of the measured form
        raise ErfLabError(train_form_only(m, layer)) from None
    layer_name = attribution.layer
    acc = state if state is not None else Accumulator()
    done = set(acc.processed)
    total, items = _iter_items(images)

    from erf_lab.io import progress

    dtype = param_dtype(m)
    low_precision_warning(dtype)
    chans = input_channels(m)
    bar = progress(total=total, desc=f"ERF {layer_name}{progress_note}", unit="img", disable=not show_progress,
                   initial=len(done) if total else 0)
    input_hw = None
    batches: list = []  # [images, compute seconds] of every batch run here
    rl: dict = {"flops_per_image": None, "padding_flops_per_image": None, "roofline": None}
    try:
        pending: list = []

        def flush():
            batch = pending[:]
            pending.clear()
            if batch:
                run_batch(batch)

        def run_batch(batch):
            nonlocal input_hw, limit
            input_hw = tuple(batch[0][1].shape[-2:])
            count = roofline and not batches
            if count:  # the same structure, layer and size were counted before: no FlopCounterMode pass
                from erf_lab.erf.roofline import cached_flops, flops_key

                rl["key"] = flops_key(m, layer_name, input_hw)
                hit = cached_flops(rl["key"])
                if hit is not None:
                    rl["flops_per_image"], rl["padding_flops_per_image"] = hit
                count = hit is None
            probe = size_by_memory and not batches
            halve, x = False, None
            try:
                x = torch.stack([t for _, t in batch]).to(dev, dtype)  # images in the model's precision
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if probe:
                    base = _memory_peak_start(dev)
                t0 = time.perf_counter()
                with full_fp32(dev, allow_tf32), conv_settings(conv_backend, dev), \
                        (_counting_flops(m) if count else contextlib.nullcontext()) as counter:
                    maps = attribution.attribute(x).double().cpu().numpy()  # .cpu() waits for the device
            except Exception as e:
                if not (shrink and len(batch) > 1 and out_of_memory(e) is not None):
                    raise
                halve = True  # retried below, once the exception (whose frames hold the pass's tensors) is gone
            if halve:
                # an automatic batch did not fit after all (another process on the GPU, fragmentation, a small
                # machine): halve it, for this pass and every later one
                del x
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                limit = len(batch) // 2
                info.setdefault("batch_halved_at", []).append(len(batch))
                rest = batch
                while rest:  # at the size in force, which a failing part halves again
                    part, rest = rest[:limit], rest[limit:]
                    run_batch(part)
                return
            batches.append([len(batch), time.perf_counter() - t0])
            if probe:
                per_image = (_memory_peak(dev) - base) // len(batch)
                available = _cuda_available_bytes(dev)
                limit = memory_batch_size(per_image, available,
                                          remaining=None if total is None else total - len(done) - len(batch))
                info["batch_memory"] = {"per_image_bytes": int(per_image), "available_bytes": available,
                                        "fraction": CUDA_BATCH_MEMORY_FRACTION, "batch_size": limit}
            if count:
                from erf_lab.erf.roofline import store_flops

                rl["flops_per_image"] = int(counter() // len(batch))
                rl["padding_flops_per_image"] = int(counter.padding() // len(batch))
                store_flops(rl["key"], rl["flops_per_image"], rl["padding_flops_per_image"])
            if roofline and len(batches) == 1:
                rl["roofline"] = _sgemm_reference(dev)
            if roofline and len(batches) == 2:  # the first steady batch: a rate above the reference probes again
                from erf_lab.erf.roofline import recheck_reference

                rl["roofline"] = recheck_reference(rl["roofline"], rl["flops_per_image"],
                                                   rl["padding_flops_per_image"], batches)
            if roofline:
                from erf_lab.erf.roofline import postfix, steady_seconds_per_image

                bar.set_postfix_str(postfix(rl["flops_per_image"], steady_seconds_per_image(batches),
                                            (rl["roofline"] or {}).get("sgemm_gflops")), refresh=False)
            for (ident, _), gm in zip(batch, maps):
                if np.isfinite(gm).all():
                    acc.add(ident, gm)
                else:
                    acc.add(ident, None, "non-finite gradient (NaN/inf)")
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(acc)

        for ident, loader in items:
            if ident in done:
                continue
            try:
                t = loader()
            except (OSError, ValueError, SyntaxError) as e:
                acc.add(ident, None, f"unreadable: {type(e).__name__}")
                bar.update(1)
                continue
            if t.dim() != 3 or t.shape[0] != chans:
                raise ErfLabError(f"image {ident} must be ({chans}, H, W) for this model, got {tuple(t.shape)}")
            size = tuple(pending[0][1].shape[-2:]) if pending else input_hw or (
                tuple(acc.sum.shape) if acc.sum is not None else None)
            if size is not None and tuple(t.shape[-2:]) != size:  # torch.stack's / numpy's broadcast error before
                raise ErfLabError(f"image {ident} is {t.shape[-2]} x {t.shape[-1]} px where the images before it are "
                                  f"{size[0]} x {size[1]}: the ERF is the mean of maps of one size; resize the "
                                  "images to one size")
            pending.append((ident, t.to(dtype) if t.is_floating_point() else t.float()))  # never rounded
            if len(pending) >= limit:
                flush()
        flush()
    finally:
        bar.close()
    if reducer is not None:
        acc = reducer(acc)
    if acc.count == 0:
        from erf_lab.erf.images import ImageSource, skip_summary

        # the files skipped while the images were selected count too (as run.json's "skipped" lists them)
        before = [list(s) for s in images.skipped] if isinstance(images, ImageSource) else []
        raise ErfLabError(f"no usable image: {skip_summary(acc.skipped + before)}")
    erf = acc.sum / acc.count
    hw = (int(input_hw[0]), int(input_hw[1])) if input_hw else (int(erf.shape[0]), int(erf.shape[1]))
    info.update({"tf32": bool(allow_tf32) if dev.type == "cuda" else None, "batch_seconds": batches})
    if roofline:
        from erf_lab.erf.roofline import recheck_reference

        info.update({"flops_per_image": rl["flops_per_image"], "padding_flops_per_image": rl["padding_flops_per_image"],
                     "roofline": recheck_reference(rl["roofline"], rl["flops_per_image"],
                                                   rl["padding_flops_per_image"], batches)})
    if attribution.feature_hw is not None:  # the measured map's own size (the metrics' centre is its unit's)
        info["feature_hw"] = list(attribution.feature_hw)
    info.update({"batch_size": limit, "dtype": dtype_name(dtype), "captum": "NeuronGradient", "target":
                 "sum_c ReLU(M[:, c, h//2, w//2])", "map": f"sum_rgb {aggregate.upper()}(d target / d input)"})
    return ErfResult(erf=erf, num_used=acc.count, num_skipped=len(acc.skipped), skipped=[list(s) for s in acc.skipped],
                     layer=layer_name, input_size=hw[0] if hw[0] == hw[1] else None, aggregate=aggregate,
                     processed=list(acc.processed), info=info, input_hw=hw)
