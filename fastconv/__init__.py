"""fastconv: depthwise large-kernel convolution that stays fast from 3x3 to 31x31 (RepLKNet, Table 1).

``depthwise_conv2d(x, w, b, backend="auto")`` picks the fastest exact backend per call (``explain`` says which
and why); ``DepthwiseConv2d`` is a drop-in ``nn.Conv2d`` subclass; ``python -m fastconv.bench`` is Table 1.
Attributes load on first use (PEP 562), so ``import fastconv`` does not import torch until one is needed.
"""
from __future__ import annotations

import importlib

_ATTRS = {"clear_cache": "dispatch", "explain": "dispatch", "supports": "dispatch", "BACKENDS": "functional",
          "depthwise_conv2d": "functional", "DepthwiseConv2d": "module"}
_SUBMODULES = ("bench", "bench_args", "cpu_kernels", "dispatch", "functional", "module", "triton_backend")


def __getattr__(name: str):
    if name in _ATTRS:
        value = getattr(importlib.import_module(f"fastconv.{_ATTRS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastconv.{name}")
    raise AttributeError(f"module 'fastconv' has no attribute {name!r}")


def available_backends(device: str = "cpu", dtype=None) -> list[str]:
    """Backends that can run float32 (or ``dtype``) tensors on ``device`` in this installation."""
    import torch

    from fastconv.dispatch import supports
    from fastconv.functional import BACKENDS

    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype or torch.float32)
    w = torch.empty(1, 1, 1, 1, device=device, dtype=x.dtype)
    return [b for b in BACKENDS if supports(b, x, w)[0]]


__all__ = ["BACKENDS", "DepthwiseConv2d", "available_backends", "clear_cache", "depthwise_conv2d", "explain"]
