"""``DepthwiseConv2d``: drop-in for ``nn.Conv2d(C, C, K, padding=K//2, groups=C)``."""
from __future__ import annotations

import torch.nn as nn

from fastconv.functional import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """Same parameters (``weight`` (C,1,KH,KW), ``bias``) as the ``nn.Conv2d`` it replaces."""

    def __init__(self, channels: int, kernel_size, bias: bool = True, backend: str = "auto"):
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(channels, channels, k, stride=1, padding=(k[0] // 2, k[1] // 2), groups=channels, bias=bias)
        self.backend = backend

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.bias, backend=self.backend)
