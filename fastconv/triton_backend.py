"""Triton GPU backend for depthwise large-kernel convolution: forward, input gradient, weight gradient.

RepLKNet (Ding et al., CVPR 2022, Sec. 3, Guideline 1) makes large depthwise kernels fast with block-wise
(inverse) implicit GEMM; the kernels in ``fastconv._triton_kernels`` follow that design (NHWC tiles, halo read
once, per-tap channel weights in registers, fp32 accumulation).  Depthwise convs have no channel reduction, so
the default kernels use no ``tl.dot``; an opt-in Toeplitz/tensor-core forward exists for fp16/bf16 large kernels
(``FASTCONV_TRITON_DOT=1``, see ``_use_tensor_cores``), off until GPU timings justify it.

Contract (used by the fastconv dispatcher for CUDA tensors): stride 1, "same" padding, odd KH/KW <= 63,
x (N,C,H,W) in NCHW or channels_last (outputs keep that memory format), weight (C,1,KH,KW),
fp32/fp16/bf16 with fp32 accumulation.  Triton is imported lazily, never at ``import fastconv``.
``TRITON_INTERPRET=1`` (set before triton is imported) runs the same kernels on CPU tensors for tests.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import torch


__all__ = ["triton_available", "dwconv_forward", "dwconv_backward_input", "dwconv_backward_weight"]

MAX_KERNEL = 63
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True if triton is installed and either a CUDA device is present or ``TRITON_INTERPRET=1`` is set."""
    if importlib.util.find_spec("triton") is None:
        return False
    if not (_interpreting() or torch.cuda.is_available()):
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # broken install (e.g. missing libs): treat as unavailable, the dispatcher falls back
        return False
    return True


def _kernels():
    from fastconv import _triton_kernels  # imports triton; deferred on purpose

    return _triton_kernels


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (multi-GPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"{what}: expected 4-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in DTYPES:
        raise ValueError(f"{what}: dtype {a.dtype} is not supported (use float32, float16 or bfloat16)")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{what}: tensors must share dtype and device, got {a.dtype}/{a.device} "
                          f"and {b.dtype}/{b.device}")
    if math.prod(a.shape[1:]) >= 2**31:
        raise ValueError(f"{what}: one image of {tuple(a.shape[1:])} has >= 2^31 elements (int32 offsets)")
    if a.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{what}: the Triton backend needs CUDA tensors, got device {a.device}")


def _check_kernel(c: int, kh: int, kw: int, what: str) -> None:
    for k in (kh, kw):
        if k < 1 or k % 2 == 0 or k > MAX_KERNEL:
            raise ValueError(f"{what}: kernel {kh}x{kw} not supported; need odd sizes from 1 to {MAX_KERNEL}")
    if c < 1:
        raise ValueError(f"{what}: need at least one channel")


def _check_weight(x: torch.Tensor, weight: torch.Tensor, what: str) -> tuple[int, int]:
    _check_pair(x, weight, what)
    c = x.shape[1]
    if weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"{what}: depthwise weight must be ({c}, 1, KH, KW), got {tuple(weight.shape)}")
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    _check_kernel(c, kh, kw, what)
    return kh, kw


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Keep NCHW or channels_last as is; anything else (views, odd strides) becomes contiguous NCHW. A lazily
    negated view (``z.conj().imag``) is resolved first: the kernels read raw memory."""
    t = t.resolve_neg()
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


def _fwd_config(x: torch.Tensor, kh: int, kw: int) -> dict:
    """Tile sizes: channels_last vectorises over channels (>=128-byte rows), NCHW over the image width."""
    c, w = x.shape[1], x.shape[3]
    if _is_channels_last(x):
        vec = 64 if x.element_size() == 2 else 32
        block_c = min(vec, _next_pow2(c))
        block_w = min(16, _next_pow2(w))
        block_h = 8
    else:
        block_c = min(4, _next_pow2(c))
        block_w = min(64, _next_pow2(w))
        block_h = 4
    elems = block_h * block_w * block_c
    return dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=8 if elems >= 4096 else 4)


def _fwd_dot_config(x: torch.Tensor, kh: int, kw: int) -> dict:
    """Tiles of the tensor-core kernel: tl.dot needs M, N, K >= 16; 180 regs/thread, no spills on sm_90 at K=31."""
    h, w = x.shape[2], x.shape[3]
    block_w = 32 if w > 16 else 16
    return dict(BLOCK_H=min(64, max(16, _next_pow2(h))), BLOCK_W=block_w, BLOCK_C=min(4, _next_pow2(x.shape[1])),
                BLOCK_U=_next_pow2(block_w + kw - 1), num_warps=8)


def _use_tensor_cores(x: torch.Tensor, kh: int, kw: int) -> bool:
    """Opt-in (``FASTCONV_TRITON_DOT=1``) Toeplitz/tensor-core forward: fp16/bf16 and kernels >= 13 only.

    Off by default until GPU timings (benchmarks/gpu_fastconv_check.py) show where it wins.
    """
    return (os.environ.get("FASTCONV_TRITON_DOT", "0") == "1" and x.dtype in (torch.float16, torch.bfloat16)
            and min(kh, kw) >= 13)


def _fwd_launch(x: torch.Tensor, w_t: torch.Tensor, bias, kh: int, kw: int, config: dict | None = None,
                dot: bool = False):
    """Output buffer, grid, positional args and constexpr/launch kwargs of the forward kernel."""
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)
    cfg = dict(config or (_fwd_dot_config if dot else _fwd_config)(x, kh, kw))
    num_warps = cfg.pop("num_warps", 4)
    tiles_w = -(-w // cfg["BLOCK_W"])
    grid = (n * (-(-h // cfg["BLOCK_H"])) * tiles_w, -(-c // cfg["BLOCK_C"]))
    b = bias if bias is not None else w_t  # dummy pointer when HAS_BIAS is False
    args = (x, w_t, b, y, c, h, w, *x.stride(), *y.stride(), tiles_w)
    return y, grid, args, dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, num_warps=num_warps, **cfg)


def _launch_forward(x: torch.Tensor, w_t: torch.Tensor, bias, kh: int, kw: int, config: dict | None = None,
                    dot: bool = False):
    y, grid, args, kwargs = _fwd_launch(x, w_t, bias, kh, kw, config, dot)
    if y.numel():
        kernels = _kernels()
        kernel = kernels.dwconv_fwd_dot_kernel if dot else kernels.dwconv_fwd_kernel
        with _on_device(x):
            kernel[grid](*args, **kwargs)
    return y


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """(C,1,KH,KW) -> contiguous (KH,KW,C): one coalesced BLOCK_C weight vector per tap."""
    c, _, kh, kw = weight.shape
    return weight.resolve_neg().reshape(c, kh * kw).t().contiguous()


def dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise conv, stride 1, 'same' padding; returns y in x's memory format and dtype."""
    kh, kw = _check_weight(x, weight, "dwconv_forward")
    if bias is not None:
        if bias.shape != (x.shape[1],):
            raise ValueError(f"dwconv_forward: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
        bias = bias.to(device=x.device).resolve_neg().contiguous()
    x = _dense(x)
    return _launch_forward(x, _tap_major(weight), bias, kh, kw, dot=_use_tensor_cores(x, kh, kw))


def dwconv_backward_input(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dL/dx = forward conv of dL/dy with the kernel flipped in both axes (odd K, 'same' padding)."""
    kh, kw = _check_weight(grad_out, weight, "dwconv_backward_input")
    g = _dense(grad_out)
    return _launch_forward(g, _tap_major(weight.flip(-2, -1)), None, kh, kw, dot=_use_tensor_cores(g, kh, kw))


def _bwd_weight_config(x: torch.Tensor, kh: int, kw: int) -> dict:
    """Tap tile = one kernel row x BLOCK_J columns; split-K over (image, row tile) for ~4 programs per SM."""
    n, c, h, w = x.shape
    cl = _is_channels_last(x)
    block_c = min(32 if cl else 4, _next_pow2(c))   # 64 fp16 channels -> 178 regs/thread on sm_90, 32 -> 128
    block_j = min(8, _next_pow2(kw))
    block_w = min(16 if cl else 32, _next_pow2(w))
    block_h = min(2 if cl else 4, _next_pow2(h))
    if x.device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    elif x.device.type == "meta":  # ahead-of-time compile checks: an H100/H200 has 132 SMs
        target = 4 * 132
    else:  # interpreter: few programs, but still more than one split to exercise the reduction
        target = 8
    programs = -(-c // block_c) * kh * (-(-kw // block_j))
    split = max(1, min(n * (-(-h // block_h)), -(-target // programs)))
    elems = block_j * block_h * block_w * block_c
    return dict(BLOCK_J=block_j, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, split=split,
                num_warps=8 if elems >= 8192 else 4)


def _bwd_weight_launch(x: torch.Tensor, grad_out: torch.Tensor, kh: int, kw: int, config: dict | None = None):
    """fp32 partials buffer (split, KH*KW, C), grid, positional args and kwargs of ``dwconv_bwd_weight_kernel``."""
    n, c, h, w = x.shape
    cfg = dict(config or _bwd_weight_config(x, kh, kw))
    split, num_warps = cfg.pop("split"), cfg.pop("num_warps", 4)
    part = torch.empty(split, kh * kw, c, dtype=torch.float32, device=x.device)
    grid = (-(-c // cfg["BLOCK_C"]), kh * (-(-kw // cfg["BLOCK_J"])), split)
    args = (x, grad_out, part, n, c, h, w, *x.stride(), *grad_out.stride(), split)
    return part, grid, args, dict(KH=kh, KW=kw, num_warps=num_warps, **cfg)


def _launch_backward_weight(x: torch.Tensor, grad_out: torch.Tensor, kh: int, kw: int,
                            config: dict | None = None) -> torch.Tensor:
    part, grid, args, kwargs = _bwd_weight_launch(x, grad_out, kh, kw, config)
    with _on_device(x):
        _kernels().dwconv_bwd_weight_kernel[grid](*args, **kwargs)
    c = x.shape[1]
    return part.sum(0).t().reshape(c, 1, kh, kw).to(x.dtype)


def dwconv_backward_weight(x: torch.Tensor, grad_out: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """dL/dw (C,1,kh,kw) in x's dtype: fp32 split-K partials reduced in a second (deterministic) pass."""
    _check_pair(x, grad_out, "dwconv_backward_weight")
    if x.shape != grad_out.shape:
        raise ValueError(f"dwconv_backward_weight: x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)} "
                          "must have the same shape (stride 1, 'same' padding)")
    kh, kw = int(kh), int(kw)
    _check_kernel(x.shape[1], kh, kw, "dwconv_backward_weight")
    if x.numel() == 0:
        return torch.zeros(x.shape[1], 1, kh, kw, dtype=x.dtype, device=x.device)
    return _launch_backward_weight(_dense(x), _dense(grad_out), kh, kw)
