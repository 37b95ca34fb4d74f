"""fastconv: depthwise large-kernel convolution that stays fast from 3x3 to 31x31 (RepLKNet, Table 1).

``depthwise_conv2d(x, w, b, backend="auto")`` picks the fastest exact backend per call (``explain`` says which
and why); ``DepthwiseConv2d`` is a drop-in ``nn.Conv2d`` subclass; ``python -m fastconv.bench`` is Table 1.
"""
from fastconv.dispatch import clear_cache, explain, supports
from fastconv.functional import BACKENDS, depthwise_conv2d
from fastconv.module import DepthwiseConv2d


def available_backends(device: str = "cpu", dtype=None) -> list[str]:
    """Backends that can run float32 (or ``dtype``) tensors on ``device`` in this installation."""
    import torch

    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype or torch.float32)
    w = torch.empty(1, 1, 1, 1, device=device, dtype=x.dtype)
    return [b for b in BACKENDS if supports(b, x, w)[0]]


__all__ = ["BACKENDS", "DepthwiseConv2d", "available_backends", "clear_cache", "depthwise_conv2d", "explain"]
