"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs", CVPR 2022).

Architecture (paper Sec. 4.1, Fig. 4; official ``replknet.py``): a stem (3x3/2 conv, 3x3 depthwise, 1x1 conv,
3x3/2 depthwise, each conv-BN-ReLU), four stages of alternating RepLK blocks and ConvFFN blocks, transitions
(1x1 conv-BN-ReLU, 3x3/2 depthwise conv-BN-ReLU) between stages, then BN, global average pooling and a linear
head. Every conv is followed by BN. A RepLK block is ``x + DropPath(pw2(ReLU(LK(pw1(BN(x))))))`` with
``pw1`` = 1x1 conv-BN-ReLU, ``LK`` = depthwise KxK conv-BN (+ parallel small-kernel depthwise conv-BN for
structural re-parameterization, Sec. 3 guideline 3), ``pw2`` = 1x1 conv-BN. A ConvFFN block is
``x + DropPath(BN(conv1x1(GELU(BN(conv1x1(BN(x)))))))``.

State-dict key names are those of the official implementation (``stem.0.conv.weight``,
``stages.2.blocks.5.large_kernel.lkb_origin.bn.running_var``, ``transitions.0.1.conv.weight``, ``norm.*``,
``head.*``; merged form ``...large_kernel.lkb_reparam.weight/bias``), so official checkpoints load directly.

Three forms of the network:

* train-time (default): ``lkb_origin`` + ``small_conv`` branches, conv-BN pairs everywhere;
* official merged / deploy layout (``deploy=True`` or :func:`merge_large_kernels`): each large-kernel
  branch and its small kernel are merged into one biased conv ``lkb_reparam``, everything else unchanged;
* fully fused (:func:`erf_lab.models.reparameterize_model`): additionally every conv-BN pair is folded and the
  BNs that precede a 1x1 conv (``prelkb_bn``, ``preffn_bn``) are folded into it. In-memory inference form.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch.nn.modules import module as _module_hooks

from erf_lab.errors import ErfLabError
from erf_lab.models.constants import (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, IMAGENET_MEAN, IMAGENET_STD,
                                      MAX_KERNEL_SIZE)
from erf_lab.models.features import FeatureIntermediates, ResettableClassifier, feature_take_indices
from erf_lab.models.initialization import init_default_, materialize
from erf_lab.models.registry import register_model
from erf_lab.models.reparam import fold_bn, fold_bn_into_conv, fold_preceding_bn, merged_conv

__all__ = [
    "RepLKNet", "RepLKBlock", "ConvFFN", "ReparamLargeKernelConv", "ConvBN", "DropPath", "VARIANTS",
    "merge_large_kernels",
]

#: Paper configurations (Table 5: kernel-size family at 31B widths; Table 6: 31B / 31L / XL). ``params_m`` is
#: the parameter count (millions) the paper reports for the 1000-class model (Table 6, else Table 5, which gives
#: 79.3 for 31B); ``mean`` / ``std``: the input normalization of the official weights where it is not ImageNet's
#: (``default_cfg``).
VARIANTS: dict[str, dict] = {
    "replknet_31b": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                         small_kernel=5, dw_ratio=1.0, params_m=79, paper="Table 6"),
    "replknet_31l": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(192, 384, 768, 1536),
                         small_kernel=5, dw_ratio=1.0, params_m=172, paper="Table 6"),
    "replknet_xl": dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2), channels=(256, 512, 1024, 2048),
                        small_kernel=None, dw_ratio=1.5, params_m=335, paper="Table 6",
                        mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    "replknet_3": dict(large_kernel_sizes=(3, 3, 3, 3), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                       small_kernel=None, dw_ratio=1.0, params_m=71.8, paper="Table 5"),
    "replknet_7": dict(large_kernel_sizes=(7, 7, 7, 7), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                       small_kernel=5, dw_ratio=1.0, params_m=72.2, paper="Table 5"),
    "replknet_13": dict(large_kernel_sizes=(13, 13, 13, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                        small_kernel=5, dw_ratio=1.0, params_m=73.7, paper="Table 5"),
    "replknet_25": dict(large_kernel_sizes=(25, 25, 25, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                        small_kernel=5, dw_ratio=1.0, params_m=78.2, paper="Table 5"),
}


# --------------------------------------------------------------------------------------------- building blocks
def _conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, groups: int,
            bias: bool) -> nn.Conv2d:
    """A conv; large (K > 5) stride-1 'same' depthwise convs are ``fastconv.DepthwiseConv2d`` (the official code
    routes the same convs to its implicit-GEMM kernel), run as ``fastconv.use`` / ``configure`` say."""
    is_large_dw = (in_channels == out_channels == groups and kernel_size > 5 and stride == 1
                   and padding == kernel_size // 2)
    if is_large_dw:
        from fastconv import DepthwiseConv2d

        return DepthwiseConv2d(in_channels, kernel_size, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), survivors rescaled by 1/keep."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _unobserved(*modules: nn.Module | None) -> bool:
    """True where no hook (forward or backward, pre or post), on these modules, their submodules or globally, can
    see a tensor they make or take, or expects the module to be called: the block may then apply its ReLU and
    residual add in place on that tensor (same values, one memory pass less: a ReLU or add over a fresh tensor
    reads its input and also fetches and writes the new one) without calling its ``nn.ReLU``. A hook that kept the
    tensor would see it changed afterwards; one on the ``nn.ReLU`` (guided backprop, say) would never run."""
    if any(getattr(_module_hooks, f"_global{name}") for name in _HOOK_DICTS):
        return False
    return not any(getattr(m, name) for module in modules if module is not None for m in module.modules()
                   for name in _HOOK_DICTS)


def _residual(x: torch.Tensor, out: torch.Tensor, producer: nn.Module, drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(out)``; added into ``out`` in place where no drop path and no hook can see it
    (``_unobserved``). ``out + x`` equals ``x + out`` bit for bit."""
    if isinstance(drop_path, nn.Identity) and _unobserved(producer, drop_path):
        return out.add_(x)
    return x + drop_path(out)


class ConvBN(nn.Module):
    """conv -> BN (-> ReLU): the official ``conv_bn`` / ``conv_bn_relu`` (keys ``conv.weight``, ``bn.*``).

    ``reparameterize()`` folds the BN into a biased conv and sets ``bn`` to None (idempotent).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, groups: int = 1, relu: bool = False):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = _conv2d(in_channels, out_channels, kernel_size, stride, padding, groups, False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.nonlinear = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.nonlinear is not None:
            x = torch.relu_(x) if _unobserved(self) else self.nonlinear(x)
        return x

    def fused_weight_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The single conv equivalent to conv-BN (eval mode), in ``dtype`` (default: the conv's); see
        :func:`~erf_lab.models.reparam.fold_bn`."""
        w, b = self.conv.weight.detach(), self.conv.bias
        if self.bn is not None:
            return fold_bn(w, b, self.bn, dtype)
        b = b.detach() if b is not None else torch.zeros_like(w[:, 0, 0, 0])
        return w.to(dtype or w.dtype, copy=True), b.to(dtype or w.dtype, copy=True)

    def reparameterize(self) -> None:
        """Fold the BN into a biased conv; ``bn`` becomes None (idempotent)."""
        fold_bn_into_conv(self.conv, self.bn)
        self.bn = None


class ReparamLargeKernelConv(nn.Module):
    """Depthwise KxK conv-BN with a parallel small-kernel depthwise conv-BN (paper Sec. 3, guideline 3).

    After :meth:`reparameterize` the two branches are one biased conv ``lkb_reparam``: both BNs are fused and the
    small kernel is zero-padded to KxK and added to the large one (convolution is linear; equal 'same' padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int | None, small_kernel_merged: bool = False):
        super().__init__()
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= MAX_KERNEL_SIZE:
            raise ErfLabError(f"large kernel sizes must be odd, from 1 to {MAX_KERNEL_SIZE}, got {kernel_size}")
        if small_kernel is not None and (small_kernel % 2 == 0 or small_kernel < 1):
            raise ErfLabError(f"small_kernel must be odd and positive, got {small_kernel}")
        if small_kernel is not None and small_kernel > kernel_size:
            small_kernel = None  # nothing to re-parameterize into a smaller kernel (e.g. 3x3 stages)
        self.in_channels, self.out_channels, self.groups, self.stride = in_channels, out_channels, groups, stride
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.lkb_origin = self.small_conv = self.lkb_reparam = None
        if small_kernel_merged:
            self.lkb_reparam = self._merged_conv()
        else:
            self.lkb_origin = ConvBN(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups)
            if small_kernel is not None:
                self.small_conv = ConvBN(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups)

    def _merged_conv(self) -> nn.Conv2d:
        return _conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.kernel_size // 2,
                       self.groups, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged (KxK kernel, bias): both branches BN-fused, the small kernel zero-padded to the centre."""
        dtype = self.lkb_origin.conv.weight.dtype
        k, b = self.lkb_origin.fused_weight_bias(torch.float64)
        if self.small_conv is not None:
            sk, sb = self.small_conv.fused_weight_bias(torch.float64)
            pad = (self.kernel_size - self.small_kernel) // 2
            k = k + F.pad(sk, [pad] * 4)
            b = b + sb
        return k.to(dtype), b.to(dtype)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge into ``lkb_reparam`` (official deploy layout); idempotent."""
        if self.lkb_reparam is not None:
            return
        self.lkb_reparam = merged_conv(self._merged_conv, *self.get_equivalent_kernel_bias())
        self.lkb_origin = None
        self.small_conv = None


class RepLKBlock(nn.Module):
    """``x + DropPath(pw2(ReLU(LK(pw1(BN(x))))))`` (paper Fig. 4; official ``RepLKBlock``)."""

    def __init__(self, in_channels: int, dw_channels: int, block_lk_size: int, small_kernel: int | None,
                 drop_path: float, small_kernel_merged: bool = False):
        super().__init__()
        self.pw1 = ConvBN(in_channels, dw_channels, 1, 1, 0, relu=True)
        self.pw2 = ConvBN(dw_channels, in_channels, 1, 1, 0)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, 1, dw_channels,
                                                   small_kernel, small_kernel_merged)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.large_kernel(self.pw1(self.prelkb_bn(x)))
        out = torch.relu_(out) if _unobserved(self.large_kernel, self.lk_nonlinear) else self.lk_nonlinear(out)
        return _residual(x, self.pw2(out), self.pw2, self.drop_path)

    def reparameterize(self) -> None:
        """Fully fused form: LK merge, conv-BN folds, ``prelkb_bn`` folded into ``pw1`` (idempotent)."""
        self.large_kernel.reparameterize()
        self.pw1.reparameterize()
        self.pw2.reparameterize()
        self.prelkb_bn = fold_preceding_bn(self.prelkb_bn, self.pw1.conv)


class ConvFFN(nn.Module):
    """``x + DropPath(pw2(GELU(pw1(BN(x)))))`` with 1x1 conv-BN ``pw1``/``pw2`` (official ``ConvFFN``)."""

    def __init__(self, in_channels: int, internal_channels: int, out_channels: int, drop_path: float):
        super().__init__()
        self.drop_path = _drop_path(drop_path)
        self.preffn_bn = nn.BatchNorm2d(in_channels)
        self.pw1 = ConvBN(in_channels, internal_channels, 1, 1, 0)
        self.pw2 = ConvBN(internal_channels, out_channels, 1, 1, 0)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return _residual(x, out, self.pw2, self.drop_path)

    def reparameterize(self) -> None:
        self.pw1.reparameterize()
        self.pw2.reparameterize()
        self.preffn_bn = fold_preceding_bn(self.preffn_bn, self.pw1.conv)


class RepLKNetStage(nn.Module):
    """``num_blocks`` x (RepLK block, ConvFFN) sharing one large kernel size (keys ``blocks.{2i,2i+1}``)."""

    def __init__(self, channels: int, num_blocks: int, stage_lk_size: int, drop_path: Sequence[float],
                 small_kernel: int | None, dw_ratio: float = 1.0, ffn_ratio: float = 4.0,
                 use_checkpoint: bool = False, small_kernel_merged: bool = False,
                 norm_intermediate_features: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        blocks = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel, drop_path[i],
                                     small_kernel_merged))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, drop_path[i]))
        self.blocks = nn.ModuleList(blocks)
        # official downstream option (RepLKNet-XL on COCO / ADE20K): a BN on the stage output fed to the heads
        self.norm = nn.BatchNorm2d(channels) if norm_intermediate_features else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


# --------------------------------------------------------------------------------------------------- the model
class RepLKNet(FeatureIntermediates, ResettableClassifier, nn.Module):
    """RepLKNet; arguments keep the official constructor's names and meaning.

    ``forward_features`` returns the last stage's feature map (N, C, H/32, W/32), before the final BN: the
    tensor the official ERF script measures on. ``forward_head`` = BN -> global average pool -> linear.
    ``num_classes=0`` (or None) drops the classifier (``forward`` then returns pooled features).
    ``out_indices`` (official downstream option, exclusive with a classifier: pass ``num_classes=None``) makes
    ``forward_features`` and ``forward`` return the listed stages' outputs, each through its stage's BN when
    ``norm_intermediate_features`` (the layout of the official XL detection / segmentation backbones).

    ``feature_info[i]`` is stage ``i``'s output (``module='stages.i'``, stride 4 * 2^i), before the transition:
    ``forward_intermediates(x, indices=[i], stop_early=True)`` runs nothing after stage ``i``. With ``norm=True``
    a stage output goes through its stage BN (downstream option) or, for the last stage, the final BN ``norm``
    (``forward_head``'s first step); the final features are ``forward_features(x)`` (before that BN).
    """

    #: the classifier for checkpoint loading: the linear ``head`` and the final BN ``norm`` before the pooling, which
    #: a downstream backbone (``out_indices``) has neither of: ``--drop-head`` loads an ImageNet checkpoint into one,
    #: and a backbone's state dict into a classifier (``norm`` and ``head`` then keep their init)
    head_names = ("head", "norm")

    def __init__(self, large_kernel_sizes: Sequence[int], layers: Sequence[int], channels: Sequence[int],
                 drop_path_rate: float = 0.0, small_kernel: int | None = 5, dw_ratio: float = 1.0,
                 ffn_ratio: float = 4.0, in_channels: int = 3, num_classes: int | None = 1000,
                 use_checkpoint: bool = False, small_kernel_merged: bool = False,
                 out_indices: Sequence[int] | None = None, norm_intermediate_features: bool = False):
        super().__init__()
        large_kernel_sizes, layers, channels = tuple(large_kernel_sizes), tuple(layers), tuple(channels)
        if not (len(large_kernel_sizes) == len(layers) == len(channels)) or not layers:
            raise ErfLabError(f"RepLKNet needs one kernel size, block count and width per stage; got "
                              f"kernels={large_kernel_sizes}, layers={layers}, channels={channels}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in layers + channels):
            raise ErfLabError(f"layers and channels must be whole numbers, got layers={layers}, channels={channels}")
        if any(int(n) < 1 for n in layers) or any(int(c) < 1 for c in channels):
            raise ErfLabError(f"layers and channels must be positive, got layers={layers}, channels={channels}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ErfLabError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if dw_ratio <= 0 or ffn_ratio <= 0:
            raise ErfLabError(f"dw_ratio and ffn_ratio must be positive, got {dw_ratio}, {ffn_ratio}")
        if min(int(int(c) * r) for c in channels for r in (dw_ratio, ffn_ratio)) < 1:
            raise ErfLabError(f"dw_ratio={dw_ratio} and ffn_ratio={ffn_ratio} leave a block with no channels at "
                              f"widths {tuple(channels)} (each width times each ratio must be >= 1)")
        if out_indices is not None:
            out_indices = tuple(int(i) for i in out_indices)
            if num_classes:
                raise ErfLabError("out_indices (a downstream backbone) and a classifier are exclusive; "
                                  "pass num_classes=None with out_indices")
            if not out_indices or any(not 0 <= i < len(layers) for i in out_indices):
                raise ErfLabError(f"out_indices must name stages 0..{len(layers) - 1}, got {out_indices}")
        elif norm_intermediate_features:
            raise ErfLabError("norm_intermediate_features is a downstream option: it needs out_indices")
        self.out_indices = out_indices
        self.large_kernel_sizes = tuple(int(k) for k in large_kernel_sizes)
        self.layers = tuple(int(n) for n in layers)
        self.channels = tuple(int(c) for c in channels)
        self.small_kernel = small_kernel
        self.dw_ratio, self.ffn_ratio = dw_ratio, ffn_ratio
        self.num_classes = int(num_classes or 0)
        self.num_features = self.channels[-1]
        self.num_stages = len(layers)
        self.default_cfg = dict(input_size=(in_channels, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                interpolation="bicubic", num_classes=self.num_classes)

        # built on the meta device, then drawn once, on all threads (initialization.py; issue 14's fixed cost)
        device = torch.get_default_device()
        with torch.device("meta"):
            c0 = self.channels[0]
            self.stem = nn.ModuleList([
                ConvBN(in_channels, c0, 3, 2, 1, groups=1, relu=True),
                ConvBN(c0, c0, 3, 1, 1, groups=c0, relu=True),
                ConvBN(c0, c0, 1, 1, 0, groups=1, relu=True),
                ConvBN(c0, c0, 3, 2, 1, groups=c0, relu=True),
            ])
            # Block-wise stochastic depth, linearly increasing over all blocks (as in Swin / the official code).
            total = sum(self.layers)
            dpr = [float(drop_path_rate) * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
            self.stages = nn.ModuleList()
            self.transitions = nn.ModuleList()
            for i in range(self.num_stages):
                start = sum(self.layers[:i])
                self.stages.append(RepLKNetStage(
                    self.channels[i], self.layers[i], self.large_kernel_sizes[i], dpr[start:start + self.layers[i]],
                    small_kernel, dw_ratio, ffn_ratio, use_checkpoint, small_kernel_merged,
                    norm_intermediate_features=norm_intermediate_features))
                if i < self.num_stages - 1:
                    c_next = self.channels[i + 1]
                    self.transitions.append(nn.Sequential(
                        ConvBN(self.channels[i], c_next, 1, 1, 0, groups=1, relu=True),
                        ConvBN(c_next, c_next, 3, 2, 1, groups=c_next, relu=True),
                    ))
            classifier = out_indices is None  # a downstream backbone has no final BN / pool / head (official keys)
            self.norm = nn.BatchNorm2d(self.channels[-1]) if classifier else None
            self.avgpool = nn.AdaptiveAvgPool2d(1) if classifier else None
            self.head = nn.Linear(self.channels[-1], self.num_classes) if classifier and self.num_classes > 0 else None
        if device.type != "meta":
            init_default_(materialize(self, device))
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i, c in enumerate(self.channels)]

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        steps = [(f"stem.{i}", m) for i, m in enumerate(self.stem)]
        for i, stage in enumerate(self.stages):
            steps.append((f"stages.{i}", stage))
            if i < len(self.transitions):
                steps.append((f"transitions.{i}", self.transitions[i]))
        return steps

    def _intermediate_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.stages[index].norm is not None:
            return self.stages[index].norm(x)
        return self.norm(x) if index == self.num_stages - 1 and self.norm is not None else x

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm: drop the stages after the last of ``indices`` (and their transitions); ``prune_norm`` drops
        the final BN, ``prune_head`` the classifier (``forward_head`` then returns pooled features). Returns
        the indices kept."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        self.stages, self.transitions = self.stages[:max_index + 1], self.transitions[:max_index]
        self.num_stages, self.feature_info = max_index + 1, self.feature_info[:max_index + 1]
        if self.out_indices is not None:
            self.out_indices = tuple(i for i in self.out_indices if i <= max_index)
        if prune_norm and self.norm is not None:
            self.norm = nn.Identity()
        if prune_head:
            self.head, self.num_classes = None, 0
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        for layer in self.stem:
            x = layer(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.out_indices is not None and i in self.out_indices:
                outs.append(stage.norm(x) if stage.norm is not None else x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x if self.out_indices is None else outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.out_indices is not None:
            raise ErfLabError("this RepLKNet is a downstream backbone (out_indices): it has no classifier head")
        x = torch.flatten(self.avgpool(self.norm(x)), 1)
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.out_indices is not None:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))

    @property
    def is_merged(self) -> bool:
        """True when every large-kernel conv is in the merged ``lkb_reparam`` form."""
        return all(m.lkb_reparam is not None for m in self.modules() if isinstance(m, ReparamLargeKernelConv))


def merge_large_kernels(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The official merged / deploy layout of ``model`` (the layout of the official deploy checkpoints): every
    :class:`ReparamLargeKernelConv` merged into ``lkb_reparam``, every other conv-BN pair kept. Copies the model
    unless ``inplace=True`` (as :func:`~erf_lab.models.reparameterize_model`); idempotent; eval mode."""
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    model.eval()
    for m in list(model.modules()):
        if isinstance(m, ReparamLargeKernelConv):
            m.reparameterize()
    return model


# ------------------------------------------------------------------------------------------ registered variants
_ALIASES = {"kernels": "large_kernel_sizes", "blocks": "layers", "deploy": "small_kernel_merged"}


def _create(variant: str, **kwargs) -> RepLKNet:
    cfg = {k: v for k, v in VARIANTS[variant].items() if k not in ("params_m", "paper", "mean", "std")}
    for alias, official in _ALIASES.items():
        if alias in kwargs:
            value = kwargs.pop(alias)
            if official in kwargs and kwargs[official] != value:
                raise ErfLabError(f"both {alias!r} and {official!r} given with different values")
            kwargs[official] = value
    cfg.update(kwargs)
    model = RepLKNet(**cfg)
    model.default_cfg["architecture"] = variant
    model.default_cfg.update({k: v for k, v in VARIANTS[variant].items() if k in ("mean", "std")})
    return model


@register_model
def replknet_31b(**kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels 31-29-27-13, blocks 2-2-18-2, widths 128-256-512-1024, small kernel 5 (79M)."""
    return _create("replknet_31b", **kwargs)


@register_model
def replknet_31l(**kwargs) -> RepLKNet:
    """RepLKNet-31L: as 31B with widths 192-384-768-1536 (172M)."""
    return _create("replknet_31l", **kwargs)


@register_model
def replknet_xl(**kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels 27-27-27-13, widths 256-512-1024-2048, dw ratio 1.5, no small kernel (335M)."""
    return _create("replknet_xl", **kwargs)


@register_model
def replknet_3(**kwargs) -> RepLKNet:
    """Table 5 kernel family at 31B widths: 3-3-3-3 (no re-param branch: the small kernel would not be smaller)."""
    return _create("replknet_3", **kwargs)


@register_model
def replknet_7(**kwargs) -> RepLKNet:
    """Table 5 kernel family at 31B widths: 7-7-7-7."""
    return _create("replknet_7", **kwargs)


@register_model
def replknet_13(**kwargs) -> RepLKNet:
    """Table 5 kernel family at 31B widths: 13-13-13-13."""
    return _create("replknet_13", **kwargs)


@register_model
def replknet_25(**kwargs) -> RepLKNet:
    """Table 5 kernel family at 31B widths: 25-25-25-13."""
    return _create("replknet_25", **kwargs)
