"""Functional entry point. Placeholder backend: ``F.conv2d`` (the fastconv issue adds fast backends)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     backend: str = "auto") -> torch.Tensor:
    """Depthwise 2-D convolution, stride 1, 'same' padding: ``weight`` is (C, 1, KH, KW) with odd KH, KW."""
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
