"""erf-lab: effective receptive fields and shape bias of large-kernel CNNs (RepLKNet, Ding et al., CVPR 2022)."""

__version__ = "0.1.0"
