"""fastconv: depthwise large-kernel convolution that stays fast from 3x3 to 31x31 (RepLKNet, Table 1).

``depthwise_conv2d(x, w, b)`` runs the backend the dispatcher picks per call (``explain`` says which and why);
``DepthwiseConv2d`` is a drop-in ``nn.Conv2d`` subclass and ``convert_model`` swaps a model's eligible convs for it;
``use`` / ``configure`` / ``settings`` are the one place that says how they run; ``python -m fastconv.bench`` is
Table 1. Attributes load on first use (PEP 562), so ``import fastconv`` does not import torch until one is needed.
"""
from __future__ import annotations

import importlib

_ATTRS = {"clear_cache": "dispatch", "explain": "dispatch", "supports": "backends", "BACKENDS": "config",
          "Settings": "config", "configure": "config", "settings": "config", "use": "config",
          "depthwise_conv2d": "functional", "flops_counted_by_caller": "functional",
          "DepthwiseConv2d": "module", "convert_model": "module",
          "revert_model": "module"}
_SUBMODULES = ("backends", "bench", "bench_args", "compiled", "config", "cpu_kernels", "dispatch", "functional",
               "jsonstore", "module", "roofline", "triton_backend")


def __getattr__(name: str):
    if name in _ATTRS:
        value = getattr(importlib.import_module(f"fastconv.{_ATTRS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastconv.{name}")
    raise AttributeError(f"module 'fastconv' has no attribute {name!r}")


def check_device(device):
    """``torch.device`` for ``device``; ValueError (one line) for an unknown kind (tpu, cuda:x) or a CUDA device
    that is not there."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation that failed asked for ("602.1 GB requested", "on the GPU"), or None for any other
    error. torch's CPU allocator raises a RuntimeError, CUDA's an OutOfMemoryError (a RuntimeError)."""
    import re

    text = str(e)
    if isinstance(e, MemoryError):
        return "Python could not allocate"
    if not isinstance(e, RuntimeError):
        return None
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text or "MPS backend out of memory" in text:
        return "on the GPU"
    if "DefaultCPUAllocator" not in text and "can't allocate memory" not in text:
        return None
    n = re.search(r"allocate (\d+) bytes", text)
    return f"{int(n.group(1)) / 1e9:.1f} GB requested" if n else "the CPU allocator failed"


def available_backends(device: str = "cpu", dtype=None) -> list[str]:
    """Backends that can run float32 (or ``dtype``) tensors on ``device`` in this installation; ValueError (one
    line, as ``check_device``) for a device that is not there."""
    import torch

    from fastconv.backends import supports
    from fastconv.config import BACKENDS

    x = torch.empty(1, 1, 1, 1, device=check_device(device), dtype=dtype or torch.float32)
    w = torch.empty(1, 1, 1, 1, device=device, dtype=x.dtype)
    return [b for b in BACKENDS if supports(b, x, w)[0]]


__all__ = ["BACKENDS", "DepthwiseConv2d", "Settings", "available_backends", "check_device", "clear_cache",
           "configure", "convert_model", "depthwise_conv2d", "explain", "flops_counted_by_caller", "out_of_memory",
           "revert_model", "settings", "use"]
