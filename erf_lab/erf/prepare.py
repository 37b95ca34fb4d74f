"""The model as the ERF measurement runs it: a frozen eval-mode copy, re-parameterized, channels_last, with
fastconv for the large depthwise convolutions (the speed levers; each gives the same function)."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError

CONV_BACKENDS = ("fastconv", "native")


def check_device(device) -> torch.device:
    """``torch.device`` for ``device``; ErfLabError for unknown kinds (tpu, cuda:x) and missing CUDA devices
    (:func:`fastconv.check_device`)."""
    import fastconv

    try:
        return fastconv.check_device(device)
    except ValueError as e:
        raise ErfLabError(str(e)) from None


def conv_settings(conv_backend: str, device: torch.device):
    """How fastconv runs the depthwise convolutions during a measurement: ``native`` forces ``F.conv2d``;
    ``fastconv`` lets fastconv's dispatcher decide, on the CPU from its cost model without timing (frozen
    weights need forward + input gradient only; at 448^2 autotuning cost more than it saved)."""
    import fastconv

    if conv_backend not in CONV_BACKENDS:
        raise ErfLabError(f"unknown conv backend {conv_backend!r}; choose from {', '.join(CONV_BACKENDS)}")
    if conv_backend == "native":
        return fastconv.use(backend="native")
    return fastconv.use(autotune=False) if torch.device(device).type == "cpu" else contextlib.nullcontext()


#: from this many parameters ``prepare_model`` uses all of torch's threads
LARGE_MODEL_PARAMS = 5_000_000


def prepare_model(model: nn.Module, *, reparameterize: bool = True, channels_last: bool = True,
                  conv_backend: str = "fastconv", device: str | torch.device = "cpu",
                  inplace: bool = False) -> tuple[nn.Module, dict]:
    """A frozen eval-mode copy of ``model`` (``inplace``: the model itself) with the speed levers applied;
    returns (model, info). Run it inside :func:`conv_settings` (``compute_erf`` does)."""
    import fastconv

    from erf_lab.models import reparameterize_model

    if conv_backend not in CONV_BACKENDS:
        raise ErfLabError(f"unknown conv backend {conv_backend!r}; choose from {', '.join(CONV_BACKENDS)}")
    # a small model is ~2000 small memory-bound tensor ops, where fork/join of a 2nd OpenMP thread costs more than
    # it saves; a large one is dominated by its big tensors (RepLKNet-31B, first call in a process on the 2-core dev
    # box: 0.92 s on 2 threads against 1.28 s on one)
    with _threads_for(model):
        m = (model if inplace else copy.deepcopy(model)).eval()
        if reparameterize:
            reparameterize_model(m, inplace=True)
        m.requires_grad_(False)
        converted = fastconv.convert_model(m) if conv_backend == "fastconv" else 0
        m.to(device)
        if channels_last:
            _to_channels_last(m)
    n_fast = sum(type(mod) is fastconv.DepthwiseConv2d for mod in m.modules())
    info = {"reparameterized": bool(reparameterize), "channels_last": bool(channels_last),
            "conv_backend": conv_backend, "fastconv_modules": n_fast if conv_backend == "fastconv" else 0,
            "modules_converted": converted, "weight_grads": False, "device": str(device)}
    return m, info


def param_dtype(model: nn.Module) -> torch.dtype:
    """The model's precision: the dtype of its first floating-point parameter (float32 where it has none). Inputs
    are given in it (a float64 or bfloat16 model gets float64 or bfloat16 images)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` in eval mode; every module gets its own train / eval mode back afterwards,
    whatever happens (a frozen sub-module of a model in training stays in eval)."""
    modes = {mod: mod.training for mod in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for mod, flag in modes.items():
            mod.training = flag


@contextlib.contextmanager
def on_device(model: nn.Module, device):
    """Run the block with ``model`` on ``device``; afterwards, whatever happens, every parameter, gradient and
    buffer is the caller's own tensor again, where it was (``model.to(device)`` alone left the caller's model on the
    device: a CPU model evaluated on a GPU stayed there). The device's copies are dropped, not copied back: an
    inference does not change the weights."""
    saved = [(m, name, p, p.data, p.grad) for m in model.modules() for name, p in m._parameters.items()
             if p is not None]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    model.to(device)
    try:
        yield model
    finally:
        for m, name, p, data, grad in saved:
            if m._parameters.get(name) is p:  # moved in place (CPU <-> CUDA): its own tensors back
                p.grad = None  # first: a gradient on the device does not fit the data given back
                p.data = data
                p.grad = grad
            else:  # replaced by a new Parameter (a device of another tensor type, e.g. meta): the caller's, untouched
                m._parameters[name] = p
        for m, name, b in buffers:
            m._buffers[name] = b


def _threads_for(model: nn.Module):
    """All of torch's threads for a large model, one for a small one (see ``prepare_model``)."""
    large = sum(p.numel() for p in model.parameters()) >= LARGE_MODEL_PARAMS
    return num_threads(torch.get_num_threads() if large else 1)


def to_measured_form(model: nn.Module, layer: str | None, reparameterize: bool) -> nn.Module:
    """``model`` re-parameterized in place where the ERF is measured in the deploy form (``prepare_model`` then
    leaves it as it is), so that ``layer`` is checked against the names of the form measured: a deploy-only name
    (``lkb_reparam``) is found, and a train-time-only one (``small_conv``) gets the line naming the module it is
    folded into. ErfLabError for those, before any output folder is touched."""
    from erf_lab.erf.receptive_field import DEFAULT_LAYER, train_form_only
    from erf_lab.models import reparameterize_model

    if not reparameterize:
        return model
    train_names = {name for name, _ in model.named_modules()}
    with _threads_for(model):
        reparameterize_model(model, inplace=True)
    if layer not in (None, "", DEFAULT_LAYER) and layer in train_names and \
            layer not in dict(model.named_modules()):
        raise ErfLabError(train_form_only(model, layer))
    return model


def _to_channels_last(model: nn.Module) -> None:
    """In place, like ``model.to(memory_format=torch.channels_last)`` but without copying the 4-D tensors that
    already are channels_last-contiguous (all 1x1 and depthwise (C,1,K,K) weights: most of the parameters)."""
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is not None and t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=torch.channels_last)


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
def num_threads(n: int):
    """Temporarily run torch ops on at most ``n`` intra-op threads."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_MALLOC_KEPT: list = []  # [True] once glibc was told to keep freed memory, [False] where it cannot be


def keep_freed_memory() -> bool:
    """Tell glibc's malloc (Linux) to serve every allocation from its heap and keep freed memory there, once per
    process: ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)`` at 2 GiB. By default each tensor over
    32 MB gets fresh pages from the kernel (mmap), which are faulted in and zeroed on first touch and returned on
    free, so a measurement at 1024 px (activations of 33-134 MB) pays page faults in every layer: RepLKNet-31B,
    one image at 1024 px on the 2-core dev box, 14.1-15.4 s -> 10.4-11.8 s per image (no change at 224 px). The
    cost: the process keeps its freed memory until it exits (peak RSS 4.7 -> 5.2-5.5 GB there, flat over 10
    images). Called on CPU by ``compute_erf``, shape-bias inference (``run_set``) and the training loop: measured
    on the dev box in a phase where a page fault cost 3-4 us, EfficientNet-Lite0 inference (batch 32, 224 px)
    14-18 -> 45 img/s (646k -> 4k faults per batch), RepLKNet-31B (batch 8) 2.7-2.9 -> 3.7-3.9 img/s, a training
    step of the small K = 31 RepLKNet (batch 64, 64 px) 0.98-1.23x (median 1.18x) the img/s.
    ``ERF_LAB_KEEP_FREED_MEMORY=0`` (false, no, off) leaves malloc as it is. Returns whether the setting is in
    effect."""
    if not _MALLOC_KEPT:
        ok = False
        import sys

        from erf_lab.paths import env_flag

        if sys.platform.startswith("linux") and env_flag("ERF_LAB_KEEP_FREED_MEMORY"):
            import ctypes

            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL("libc.so.6")
                libc.gnu_get_libc_version  # glibc only (musl's mallopt does nothing)
                limit = 2**31 - 1
                ok = libc.mallopt(-3, limit) == 1 and libc.mallopt(-1, limit) == 1  # M_MMAP_ / M_TRIM_THRESHOLD
        _MALLOC_KEPT.append(ok)
    return _MALLOC_KEPT[0]
