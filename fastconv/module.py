"""``DepthwiseConv2d``: drop-in for ``nn.Conv2d(C, C, K, padding=K//2, groups=C)``."""
from __future__ import annotations

import torch.nn as nn

from fastconv.functional import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """Same parameters (``weight`` (C,1,KH,KW), ``bias``) and state-dict keys as the ``nn.Conv2d`` it replaces,
    so checkpoints load unchanged; the forward runs ``fastconv.depthwise_conv2d`` with ``backend``."""

    def __init__(self, channels: int, kernel_size, bias: bool = True, backend: str = "auto", stride=1,
                 device=None, dtype=None):
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if stride not in (1, (1, 1)):
            raise ValueError(f"DepthwiseConv2d: only stride 1 is supported, got {stride}; use nn.Conv2d")
        if len(k) != 2 or any(not isinstance(v, int) or v % 2 == 0 or v < 1 for v in k):
            raise ValueError(f"DepthwiseConv2d: kernel_size must be odd positive ints, got {kernel_size}")
        super().__init__(channels, channels, k, stride=1, padding=(k[0] // 2, k[1] // 2), groups=channels,
                         bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x):
        k = self.kernel_size
        if (self.stride != (1, 1) or self.dilation != (1, 1) or self.padding != (k[0] // 2, k[1] // 2)
                or self.padding_mode != "zeros" or self.groups != self.in_channels):
            raise ValueError("DepthwiseConv2d: stride, dilation, padding or groups were changed after construction;"
                             " only stride 1, dilation 1, 'same' zero padding, groups=C are supported")
        return depthwise_conv2d(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
