"""The ERF measurement (Luo et al., NeurIPS 2016; protocol of RepLKNet, Ding et al., CVPR 2022, App. C).

For every image x: M = output of the chosen layer (default ``forward_features``), target
t = sum_c ReLU(M[c, h//2, w//2]); map = sum_rgb ReLU(dt/dx) (option: |dt/dx|). The ERF is the mean map over
images, exactly what the official ``erf/visualize_erf.py`` saves (``AverageMeter.avg``). The gradient is
taken through captum's ``NeuronGradient``; NaN / inf maps are skipped and counted.

Speed levers (all recorded in ``ErfResult.info``): structural re-parameterization on a copy (identical
function), channels_last, frozen parameters (no weight gradients, fewer saved tensors), batching (samples
are independent in eval mode), and the fastconv depthwise kernel for large kernels.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.errors import ErfLabError
from erf_lab.erf.receptive_field import DEFAULT_LAYER, resolve_layer

AGGREGATES = ("relu", "abs")
CONV_BACKENDS = ("fastconv", "native")
FASTCONV_MIN_KERNEL = 7


@dataclass
class ErfResult:
    """Mean ERF map (float64, H x W) and how it was obtained."""

    erf: np.ndarray
    num_used: int
    num_skipped: int
    skipped: list
    layer: str
    input_size: int
    aggregate: str
    processed: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class Accumulator:
    """Running sum of maps, count, ids processed (used or skipped): the resumable state of a run."""

    sum: np.ndarray | None = None
    count: int = 0
    processed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [id, reason]

    def add(self, ident: str, grad_map: np.ndarray | None, reason: str | None = None) -> None:
        self.processed.append(ident)
        if grad_map is None:
            self.skipped.append([ident, reason or "skipped"])
            return
        if self.sum is None:
            self.sum = np.zeros(grad_map.shape, dtype=np.float64)
        self.sum += grad_map
        self.count += 1

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


class _StopForward(Exception):
    """Raised by a forward hook once the chosen layer's output is captured: the rest never runs."""


class TruncatedForward(nn.Module):
    """Runs ``model`` only up to ``layer`` and returns that layer's output (``forward_features`` if None).

    captum hooks this wrapper as its layer, so it receives exactly the chosen feature map, and the forward
    truly stops there (a private exception raised after capture is caught inside this module)."""

    def __init__(self, model: nn.Module, layer: nn.Module | None = None, layer_name: str = DEFAULT_LAYER):
        super().__init__()
        self.model = model
        self.layer_name = layer_name
        object.__setattr__(self, "_target", layer)  # not a registered child (it already is one of model's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._target is None:
            fn = self.model.forward_features if hasattr(self.model, "forward_features") else self.model
            return fn(x)
        captured = []

        def hook(module, inp, out):
            captured.append(out)
            raise _StopForward

        handle = self._target.register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ErfLabError(f"layer {self.layer_name!r} is not run by the model's forward pass")
        out = captured[0]
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


def set_conv_backend(model: nn.Module, backend: str) -> int:
    """In place: depthwise stride-1 'same' convolutions with kernel >= 7 become ``fastconv.DepthwiseConv2d``
    (``backend='fastconv'``) or plain ``nn.Conv2d`` (``'native'``), sharing the same parameters.
    Returns the number of modules swapped."""
    if backend not in CONV_BACKENDS:
        raise ErfLabError(f"unknown conv backend {backend!r}; choose from {', '.join(CONV_BACKENDS)}")
    from fastconv import DepthwiseConv2d

    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Conv2d) or type(child) not in (nn.Conv2d, DepthwiseConv2d):
                continue
            k = child.kernel_size
            eligible = (child.groups == child.in_channels == child.out_channels and child.stride == (1, 1)
                        and child.dilation == (1, 1) and child.padding == (k[0] // 2, k[1] // 2)
                        and k[0] % 2 == 1 and k[1] % 2 == 1 and max(k) >= FASTCONV_MIN_KERNEL
                        and child.padding_mode == "zeros")
            if not eligible:
                continue
            if backend == "fastconv" and type(child) is nn.Conv2d:
                new = DepthwiseConv2d(child.in_channels, k, bias=child.bias is not None)
            elif backend == "native" and type(child) is DepthwiseConv2d:
                new = nn.Conv2d(child.in_channels, child.out_channels, k, padding=child.padding,
                                groups=child.groups, bias=child.bias is not None)
            else:
                continue
            new.weight = child.weight
            new.bias = child.bias
            new.train(child.training)
            setattr(parent, child_name, new)
            swapped += 1
    return swapped


def prepare_model(model: nn.Module, *, reparameterize: bool = True, channels_last: bool = True,
                  conv_backend: str = "fastconv", device: str | torch.device = "cpu",
                  inplace: bool = False) -> tuple[nn.Module, dict]:
    """A frozen eval-mode copy of ``model`` (``inplace``: the model itself) with the speed levers applied;
    returns (model, info)."""
    from erf_lab.models.reparam import reparameterize_model

    # ~2000 small memory-bound tensor ops: fork/join of a 2nd OpenMP thread costs more than it saves (and
    # stalls for a time slice whenever that core is busy); one thread keeps this well under a second.
    with _num_threads(1):
        m = (model if inplace else copy.deepcopy(model)).eval()
        if reparameterize:
            reparameterize_model(m, inplace=True)
        m.requires_grad_(False)
        swapped = set_conv_backend(m, conv_backend)
        m.to(device)
        if channels_last:
            _to_channels_last(m)
    from fastconv import DepthwiseConv2d

    on_cpu = torch.device(device).type == "cpu"
    n_fast, chosen = 0, {}
    for mod in m.modules():
        if type(mod) is DepthwiseConv2d:
            n_fast += 1
            if on_cpu and mod.backend == "auto":
                mod.backend = cpu_depthwise_backend(channels_last, mod.kernel_size, mod.weight.dtype)
            k = "x".join(map(str, mod.kernel_size))
            chosen[k] = mod.backend
    info = {"reparameterized": bool(reparameterize), "channels_last": bool(channels_last),
            "conv_backend": conv_backend, "fastconv_modules": n_fast, "modules_swapped": swapped,
            "fastconv_backend": chosen if len(set(chosen.values())) > 1 else next(iter(chosen.values()), "auto"),
            "weight_grads": False, "device": str(device)}
    return m, info


def _to_channels_last(model: nn.Module) -> None:
    """In place, like ``model.to(memory_format=torch.channels_last)`` but without copying the 4-D tensors that
    already are channels_last-contiguous (all 1x1 and depthwise (C,1,K,K) weights: most of the parameters)."""
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is not None and t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=torch.channels_last)


def cpu_depthwise_backend(channels_last: bool, kernel_size: tuple[int, int] = (1, 1),
                          dtype: torch.dtype = torch.float32) -> str:
    """The fixed CPU choice for the ERF path (frozen weights: forward + input gradient only), instead of timing
    candidates per new shape (at 448^2 autotuning cost more than it saved): from ``fastconv.dispatch.CPP_MIN_K``
    up the C++ kernel (1.4-2.3x oneDNN's forward throughput there), else oneDNN's direct channels_last depthwise
    kernel, which has no large-padding cliff: plain ``F.conv2d`` ("native") on a channels_last model, with no
    per-layer layout copy, and "channels_last" (a copy per call) on an NCHW model. The C++ kernel is float32
    only: other dtypes (e.g. a float64 reference run) take the oneDNN path."""
    from fastconv import cpu_kernels
    from fastconv.dispatch import CPP_MIN_K

    if max(kernel_size) >= CPP_MIN_K and dtype == torch.float32 and cpu_kernels.cpp_multithreaded():
        return "cpp"
    return "native" if channels_last else "channels_last"


@contextlib.contextmanager
def full_fp32(device: torch.device, allow_tf32: bool = False):
    """On CUDA, run the block without TF32 (cuDNN convolutions and cuBLAS matmuls); restores the settings."""
    if device.type != "cuda" or allow_tf32:
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _num_threads(n: int):
    """Temporarily run torch ops on ``n`` intra-op threads."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ErfLabError("--device cuda requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ErfLabError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def _iter_items(images):
    """Normalize the accepted inputs to (total or None, iterator of (id, loader))."""
    from erf_lab.erf.images import ImageSource

    if isinstance(images, ImageSource):
        return len(images), images.items()
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ErfLabError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        return images.shape[0], ((str(i), (lambda t=images[i]: t)) for i in range(images.shape[0]))

    def gen():
        i = 0
        for batch in images:
            if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], str):
                yield batch[0], (lambda t=batch[1]: t)
                i += 1
                continue
            b = batch if batch.dim() == 4 else batch.unsqueeze(0)
            for t in b:
                yield str(i), (lambda t=t: t)
                i += 1

    return (len(images) if hasattr(images, "__len__") and not isinstance(images, (list, tuple)) else None), gen()


def _grad_maps(model: nn.Module, layer_module, layer_name: str, x: torch.Tensor, aggregate: str) -> np.ndarray:
    """(B, H, W) float64 contribution maps for a batch, through captum's NeuronGradient."""
    from captum.attr import NeuronGradient

    fwd = TruncatedForward(model, layer_module, layer_name)
    shape = {}

    def selector(out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ErfLabError(f"layer {layer_name!r} output is not a (N, C, H, W) feature map "
                              f"(got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__})")
        h, w = out.shape[-2:]
        shape["hw"] = (int(h), int(w))
        return F.relu(out[:, :, h // 2, w // 2]).sum(1)

    try:
        x = x.detach().requires_grad_(True)
        grad = NeuronGradient(fwd, fwd).attribute(x, neuron_selector=selector)
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        size_words = ("too small", "Kernel size", "output size", "non-positive", "greater than input")
        if any(w in msg for w in size_words):
            raise ErfLabError(f"input size {x.shape[-1]} is too small for this model at layer {layer_name!r} "
                              f"(the feature map would vanish): {msg}") from None
        raise
    if min(shape.get("hw", (1, 1))) < 1:
        raise ErfLabError(f"input size {x.shape[-1]} is too small: layer {layer_name!r} has an empty feature map")
    g = F.relu(grad) if aggregate == "relu" else grad.abs()
    return g.sum(1).double().cpu().numpy()


def compute_erf(model: nn.Module, images, *, layer: str | None = None, aggregate: str = "relu",
                batch_size: int = 1, device: str = "cpu", reparameterize: bool = True,
                channels_last: bool = True, conv_backend: str = "fastconv", show_progress: bool = True,
                state: Accumulator | None = None, on_batch: Callable[[Accumulator], None] | None = None,
                reducer: Callable[[Accumulator], Accumulator] | None = None,
                prepared: bool = False, inplace: bool = False, allow_tf32: bool | None = None) -> ErfResult:
    """Measure the ERF of ``model`` at ``layer`` over ``images``.

    ``images``: an (N, 3, H, W) tensor, an iterable of batches (or of ``(id, tensor)`` pairs), or an
    :class:`~erf_lab.erf.images.ImageSource`. ``state`` resumes an interrupted accumulation (ids already in
    ``state.processed`` are not used again); ``on_batch(state)`` runs after every batch (checkpointing);
    ``reducer`` merges the per-process states (distributed runs) before the mean is taken. The model is
    copied before it is re-parameterized / frozen unless ``inplace`` (or ``prepared``: already done).
    On CUDA the gradients are computed in full fp32: TF32 convolutions and matmuls are switched off for the
    measurement (``allow_tf32=True`` or ``$ERF_LAB_ALLOW_TF32=1`` keeps them; measured on an H200 for
    replknet_31b at 448^2, TF32 moved the ERF matrix by 4.4% max-relative, full fp32 by 5e-4).
    """
    if aggregate not in AGGREGATES:
        raise ErfLabError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATES)}")
    if allow_tf32 is None:
        allow_tf32 = os.environ.get("ERF_LAB_ALLOW_TF32", "0") == "1"
    if int(batch_size) < 1:
        raise ErfLabError(f"--batch-size must be at least 1, got {batch_size}")
    dev = _check_device(device)
    layer_name, _ = resolve_layer(model, layer)
    if prepared:
        m, info = model, {"prepared_by_caller": True}
    else:
        m, info = prepare_model(model, reparameterize=reparameterize, channels_last=channels_last,
                                conv_backend=conv_backend, device=dev, inplace=inplace)
    try:
        _, layer_module = resolve_layer(m, layer_name)
    except ErfLabError:
        raise ErfLabError(f"layer {layer_name!r} no longer exists after structural re-parameterization; "
                          f"pass --no-reparam (reparameterize=False) to measure it") from None
    acc = state if state is not None else Accumulator()
    done = set(acc.processed)
    total, items = _iter_items(images)

    from erf_lab.io import progress

    param_dtype = next((p.dtype for p in m.parameters() if p.is_floating_point()), torch.float32)
    bar = progress(total=total, desc=f"ERF {layer_name}", unit="img", disable=not show_progress,
                   initial=len(done) if total else 0)
    input_hw = None
    try:
        pending: list = []

        def flush():
            nonlocal input_hw
            if not pending:
                return
            x = torch.stack([t for _, t in pending]).to(dev, param_dtype)  # images in the model's precision
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            input_hw = tuple(x.shape[-2:])
            with full_fp32(dev, allow_tf32):
                maps = _grad_maps(m, layer_module, layer_name, x, aggregate)
            for (ident, _), gm in zip(pending, maps):
                if np.isfinite(gm).all():
                    acc.add(ident, gm)
                else:
                    acc.add(ident, None, "non-finite gradient (NaN/inf)")
            bar.update(len(pending))
            pending.clear()
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
            if t.dim() != 3 or t.shape[0] != 3:
                raise ErfLabError(f"image {ident} must be (3, H, W), got {tuple(t.shape)}")
            pending.append((ident, t.float()))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()
    if reducer is not None:
        acc = reducer(acc)
    if acc.count == 0:
        raise ErfLabError(f"no usable image: {len(acc.skipped)} skipped ("
                          + "; ".join(f"{i}: {r}" for i, r in acc.skipped[:3]) + ")")
    erf = acc.sum / acc.count
    input_size = int(input_hw[0]) if input_hw else int(erf.shape[0])
    info.update({"tf32": bool(allow_tf32) if dev.type == "cuda" else None})
    info.update({"batch_size": int(batch_size), "captum": "NeuronGradient", "target":
                 "sum_c ReLU(M[:, c, h//2, w//2])", "map": f"sum_rgb {aggregate.upper()}(d target / d input)"})
    return ErfResult(erf=erf, num_used=acc.count, num_skipped=len(acc.skipped), skipped=[list(s) for s in acc.skipped],
                     layer=layer_name, input_size=input_size, aggregate=aggregate, processed=list(acc.processed),
                     info=info)
