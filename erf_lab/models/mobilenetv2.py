"""MobileNetV2 (Sandler et al., CVPR 2018) with the kernel / shortcut variants of RepLKNet
(Ding et al., CVPR 2022): Table 2 (depthwise kernel 3x3 -> 13x13 in all stages or the last stage) and
Table 4 (shortcut removed).

Parameter names follow torchvision (``features.N.conv.M...``, ``classifier.1``), so a torchvision
checkpoint of the standard 3x3 model loads. Depthwise convs use "same" padding k//2; as in RepLKNet, stride-1
depthwise convs with K > 5 are ``fastconv.DepthwiseConv2d`` (same parameter names as ``nn.Conv2d``, so state
dicts are unchanged), run as ``fastconv.use`` / ``configure`` say.

``reparameterize()`` (idempotent, in place) folds every conv-BN pair into a biased conv, the BN becoming
``nn.Identity``: the in-memory inference form (``erf_lab.models.reparameterize_model``).

``feature_info`` / ``forward_intermediates`` (timm): the last block of each stride (``features.1``, ``.3``,
``.6``, ``.13``, ``.17`` in the standard layout: strides 2 .. 32); the final 1x1 conv ``features.18`` follows.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD
from erf_lab.models.features import FeatureIntermediates, ResettableClassifier, stage_end_feature_info
from erf_lab.models.registry import register_model
from erf_lab.models.reparam import fold_bn_into_conv

# (expansion t, output channels c, repeats n, first stride s) of Sandler et al. 2018, Table 2.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without going more than 10% below ``v`` (TF MobileNet)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv(cin: int, cout: int, kernel_size: int, stride: int, groups: int) -> nn.Conv2d:
    """Bias-free 'same' conv; a stride-1 depthwise conv with K > 5 is ``fastconv.DepthwiseConv2d`` (as
    ``replknet._conv2d`` does for RepLKNet's large kernels)."""
    if cin == cout == groups and kernel_size > 5 and stride == 1:
        from fastconv import DepthwiseConv2d

        return DepthwiseConv2d(cin, kernel_size, bias=False)
    return nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class ConvBNReLU(nn.Sequential):
    """conv -> BN -> ReLU6, indexed 0/1/2 like torchvision's ``Conv2dNormActivation``."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        conv = _conv(cin, cout, kernel_size, stride, groups)
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    def reparameterize(self) -> None:
        """Fold the BN (index 1) into the conv (index 0); index 1 becomes ``nn.Identity`` (idempotent)."""
        self[1] = fold_bn_into_conv(self[0], self[1])


class InvertedResidual(nn.Module):
    """1x1 expand -> kxk depthwise -> 1x1 linear projection, identity shortcut when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, kernel_size: int = 3,
                 shortcut: bool = True):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = shortcut and stride == 1 and inp == oup
        self.kernel_size, self.stride, self.out_channels = kernel_size, stride, oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, 1))
        layers += [ConvBNReLU(hidden, hidden, kernel_size, stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)

    def reparameterize(self) -> None:
        """Fold every conv-BN pair (expand, depthwise, projection) into a biased conv (idempotent)."""
        for m in self.conv:
            if isinstance(m, ConvBNReLU):
                m.reparameterize()
        self.conv[-1] = fold_bn_into_conv(self.conv[-2], self.conv[-1])


class MobileNetV2(FeatureIntermediates, ResettableClassifier, nn.Module):
    """MobileNetV2. ``kernel_size`` is the depthwise kernel of the stages chosen by ``kernel_stages``:
    ``'all'`` (every stage), ``'last'`` (the last stride-32 stages: 160 and 320 channels, RepLKNet Table 2)
    or a sequence of stage indices 0..6; other stages keep 3x3. ``shortcut=False`` removes every identity
    shortcut (RepLKNet Table 4)."""

    head_names = ("classifier.1",)

    def __init__(self, num_classes: int | None = 1000, width_mult: float = 1.0, kernel_size: int = 3,
                 kernel_stages="all", shortcut: bool = True, in_chans: int = 3, drop_rate: float = 0.2,
                 round_nearest: int = 8):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ErfLabError(f"kernel_size must be odd and positive, got {kernel_size}")
        if width_mult <= 0:
            raise ErfLabError(f"width_mult must be > 0, got {width_mult}")
        if isinstance(round_nearest, bool) or not isinstance(round_nearest, int) or round_nearest < 1:
            raise ErfLabError(f"round_nearest (channels are rounded to its multiples) must be a whole number >= 1, "
                              f"got {round_nearest!r}")
        stages = _stage_indices(kernel_stages)
        self.num_classes = num_classes = int(num_classes or 0)
        cin = make_divisible(32 * width_mult, round_nearest)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(in_chans, cin, 3, stride=2)]
        kernels = []
        for si, (t, c, n, s) in enumerate(_SETTINGS):
            k = kernel_size if si in stages else 3
            kernels.append(k)
            cout = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, k, shortcut))
                cin = cout
        features.append(ConvBNReLU(cin, self.num_features, 1))
        self.features = nn.Sequential(*features)
        blocks = [(f"features.{i}", b.stride, b.out_channels) for i, b in enumerate(features[1:-1], 1)]
        self.feature_info = stage_end_feature_info(blocks, start_reduction=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(  # num_classes=0: no classifier, forward gives pooled features (timm)
            nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())
        self.stage_kernel_sizes = kernels
        self.kernel_sizes = sorted(set(kernels))
        self.shortcut = shortcut
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                interpolation="bilinear", crop_pct=0.875, num_classes=num_classes)
        # Meta-device builds (erf_lab.models.summary) need no values; normal_ on meta imports torch._dynamo.
        for m in (() if self.features[0][0].weight.is_meta else self.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the final 1x1 conv (N, 1280, H/32, W/32), before pooling."""
        return self.features(x)

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        return [(f"features.{i}", m) for i, m in enumerate(self.features)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reparameterize(self) -> None:
        """Inference form: every conv-BN pair folded into a biased conv (idempotent)."""
        for m in self.features:
            if isinstance(m, (ConvBNReLU, InvertedResidual)):
                m.reparameterize()


def _stage_indices(kernel_stages) -> set[int]:
    if kernel_stages == "all":
        return set(range(len(_SETTINGS)))
    if kernel_stages == "last":
        return {5, 6}
    try:
        idx = {int(i) for i in kernel_stages}
    except (TypeError, ValueError):
        raise ErfLabError(f"kernel_stages must be 'all', 'last' or stage indices 0..6, got {kernel_stages!r}") from None
    if not idx <= set(range(len(_SETTINGS))):
        raise ErfLabError(f"kernel_stages indices must lie in 0..6, got {sorted(idx)}")
    return idx


def _mnv2(deploy: bool = False, **kwargs) -> MobileNetV2:
    # ``deploy`` is accepted for interface uniformity: MobileNetV2 has no multi-branch blocks to merge at build
    # time (conv-BN folding is done on a built model by ``reparameterize()``).
    return MobileNetV2(**kwargs)


@register_model
def mobilenetv2(**kwargs) -> MobileNetV2:
    """Standard MobileNetV2 1.0 (3x3 depthwise), 3,504,872 parameters."""
    return _mnv2(**kwargs)


@register_model
def mobilenetv2_k7(**kwargs) -> MobileNetV2:
    """MobileNetV2 with 7x7 depthwise kernels in all stages."""
    return _mnv2(**{"kernel_size": 7, **kwargs})


@register_model
def mobilenetv2_k13(**kwargs) -> MobileNetV2:
    """MobileNetV2 with 13x13 depthwise kernels in all stages (RepLKNet Table 2)."""
    return _mnv2(**{"kernel_size": 13, **kwargs})


@register_model
def mobilenetv2_k13_last(**kwargs) -> MobileNetV2:
    """MobileNetV2 with 13x13 depthwise kernels in the last (stride-32) stages only (RepLKNet Table 2)."""
    return _mnv2(**{"kernel_size": 13, "kernel_stages": "last", **kwargs})


@register_model
def mobilenetv2_k13_noshortcut(**kwargs) -> MobileNetV2:
    """MobileNetV2 13x13 without identity shortcuts (RepLKNet Table 4)."""
    return _mnv2(**{"kernel_size": 13, "shortcut": False, **kwargs})


@register_model
def mobilenetv2_noshortcut(**kwargs) -> MobileNetV2:
    """MobileNetV2 3x3 without identity shortcuts (RepLKNet Table 4)."""
    return _mnv2(**{"shortcut": False, **kwargs})
