"""ResNet (He et al., CVPR 2016), the small-kernel baseline of RepLKNet (Ding et al., CVPR 2022, Table 10).

Parameter names and shapes are exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0/1``, ``fc``), so a torchvision ImageNet checkpoint loads strictly. Bottleneck
blocks put the stride on the 3x3 conv ("ResNet v1.5", as torchvision does).

``reparameterize()`` (blocks and model; idempotent, in place) folds every conv-BN pair into a biased conv and
replaces the BN by ``nn.Identity``: the in-memory inference form (``erf_lab.models.reparameterize_model``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD
from erf_lab.models.features import FeatureIntermediates, ResettableClassifier
from erf_lab.models.registry import register_model
from erf_lab.models.reparam import fold_bn_into_conv


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def reparameterize(self) -> None:
        """Fold bn1/bn2 (and the downsample BN) into their convs (idempotent)."""
        self.bn1 = fold_bn_into_conv(self.conv1, self.bn1)
        self.bn2 = fold_bn_into_conv(self.conv2, self.bn2)
        _reparameterize_downsample(self.downsample)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand x4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def reparameterize(self) -> None:
        """Fold bn1/bn2/bn3 (and the downsample BN) into their convs (idempotent)."""
        self.bn1 = fold_bn_into_conv(self.conv1, self.bn1)
        self.bn2 = fold_bn_into_conv(self.conv2, self.bn2)
        self.bn3 = fold_bn_into_conv(self.conv3, self.bn3)
        _reparameterize_downsample(self.downsample)


def _reparameterize_downsample(downsample: nn.Sequential | None) -> None:
    if downsample is not None:  # torchvision layout: Sequential(conv1x1, BN)
        downsample[1] = fold_bn_into_conv(downsample[0], downsample[1])


class ResNet(FeatureIntermediates, ResettableClassifier, nn.Module):
    """ResNet with torchvision's layout. ``width`` is the base channel count (64 in the paper).

    ``num_classes=0`` (or None) has no classifier: ``forward`` returns the pooled features (timm convention).
    ``feature_info`` (timm): the stem activation ``relu`` (stride 2), then ``layer1`` .. ``layer4`` (4 .. 32).
    """

    head_names = ("fc",)

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int | None = 1000, width: int = 64, in_chans: int = 3, drop_rate: float = 0.0,
                 zero_init_residual: bool = False):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ErfLabError(f"width (the first stage's channels) must be a whole number >= 1, got {width!r}")
        self.num_classes = num_classes = int(num_classes or 0)
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else None
        self.num_features = width * 8 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.kernel_sizes = [7, 3]
        self.feature_info = [dict(num_chs=width, reduction=2, module="relu")] + [
            dict(num_chs=width * 2 ** i * block.expansion, reduction=4 * 2 ** i, module=f"layer{i + 1}")
            for i in range(4)]
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                interpolation="bilinear", crop_pct=0.875, num_classes=num_classes)
        # Meta-device builds (erf_lab.models.summary) need no values; normal_ on meta imports torch._dynamo.
        for m in (() if self.conv1.weight.is_meta else self.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():  # each residual branch starts as zero (Goyal et al. 2017)
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``layer4`` (N, 8*width*expansion, H/32, W/32), before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return [(n, getattr(self, n)) for n in names]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(1)
        if self.drop is not None:
            x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reparameterize(self) -> None:
        """Inference form: every conv-BN pair (stem and all blocks) folded into a biased conv (idempotent)."""
        self.bn1 = fold_bn_into_conv(self.conv1, self.bn1)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.reparameterize()


def _resnet(block, layers, deploy: bool = False, **kwargs) -> ResNet:
    # ``deploy`` is accepted for interface uniformity: ResNet has no multi-branch blocks to merge at build time
    # (conv-BN folding is done on a built model by ``reparameterize()``).
    return ResNet(block, layers, **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18, 11,689,512 parameters."""
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34, 21,797,672 parameters."""
    return _resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50, 25,557,032 parameters."""
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101, 44,549,160 parameters."""
    return _resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152, 60,192,808 parameters."""
    return _resnet(Bottleneck, (3, 8, 36, 3), **kwargs)
