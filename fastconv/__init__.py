"""fastconv: depthwise large-kernel convolution that stays fast from 3x3 to 31x31 (RepLKNet, Table 1)."""
from fastconv.functional import depthwise_conv2d
from fastconv.module import DepthwiseConv2d

__all__ = ["depthwise_conv2d", "DepthwiseConv2d"]
