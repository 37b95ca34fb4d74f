"""UniRepLKNet (Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point
Cloud, Time-Series and Image Recognition", CVPR 2024; official code: github AILab-CVC/UniRepLKNet).

Architecture (paper Sec. 3-4, Fig. 3; official ``unireplknet.py``): a ConvNeXt-like macro design. A stem (3x3/2
conv, LayerNorm, GELU, 3x3/2 conv, LayerNorm) and 3x3/2 conv-LayerNorm downsamplings before stages 2-4; each
block is ``x + DropPath(gamma * FFN(SE(BN(DW(x)))))`` with

* ``DW``: a depthwise KxK conv; for K >= 7 a *Dilated Reparam Block* (paper Sec. 3.2, Fig. 2): the KxK conv-BN
  plus parallel dilated small-kernel depthwise conv-BNs (kernel k, dilation r), which are merged for inference
  by turning each dilated kernel into the equivalent sparse kernel of size r(k-1)+1 (zeros between the taps)
  and adding it, zero-padded, to the large one;
* ``SE``: squeeze-and-excitation (Hu et al., CVPR 2018) with a C/4 bottleneck;
* ``FFN``: Linear(C, 4C) -> GELU -> GRN (global response norm, ConvNeXt V2, Woo et al. CVPR 2023) -> Linear(4C,
  C) -> BN, in NHWC as the official code;
* ``gamma``: layer scale.

Head: global average pool -> LayerNorm -> Linear. State-dict keys are the official ones in both layouts:

* training-time (default): ``stages.2.0.dwconv.lk_origin.weight``, ``...dwconv.origin_bn.*``,
  ``...dwconv.dil_conv_k5_1.weight``, ``...dwconv.dil_bn_k5_1.*``, ``...norm.*`` (BN), ``...se.down.*``,
  ``...pwconv1.1.*``, ``...act.1.gamma/beta``, ``...pwconv2.0.weight``, ``...pwconv2.2.*`` (BN), ``...gamma``;
* deployed (``deploy=True``, or :meth:`UniRepLKNetBlock.reparameterize` / ``reparameterize_model``): the
  dilated branches, the block BN, the FFN BN, the GRN bias and the layer scale folded into
  ``dwconv.lk_origin.weight/bias`` (``dwconv.weight/bias`` for 3x3 blocks), ``act.1.gamma`` and
  ``pwconv2.0.weight/bias``, exactly as the official ``reparameterize``.

The official OpenMMLab backbone mode (``norm0..3``) is not provided. Large 'same' depthwise convs run through
``fastconv.DepthwiseConv2d``; the dilated branches (small kernels) stay ``nn.Conv2d``.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.errors import ErfLabError
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD
from erf_lab.models.features import FeatureIntermediates, ResettableClassifier
from erf_lab.models.initialization import is_conv_or_linear, init_parallel_, materialize, trunc_normal_conv_linear
from erf_lab.models.registry import register_model
from erf_lab.models.reparam import fold_bn, fold_bn_into_conv, merged_conv
from erf_lab.models.replknet import DropPath

__all__ = ["UniRepLKNet", "UniRepLKNetBlock", "DilatedReparamBlock", "GRN", "SEBlock", "LayerNorm2d", "VARIANTS",
           "DILATED_BRANCHES", "dilated_to_dense_kernel"]

_A_F_P = (2, 2, 6, 2)
_N = (2, 2, 8, 2)
_T = (3, 3, 18, 3)
_S_B_L_XL = (3, 3, 27, 3)

#: Official per-block kernel sizes for each depth configuration (``default_depths_to_kernel_sizes``).
DEFAULT_KERNEL_SIZES: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {
    _A_F_P: ((3,) * 2, (13,) * 2, (13,) * 6, (13,) * 2),
    _N: ((3,) * 2, (13,) * 2, (13,) * 8, (13,) * 2),
    _T: ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3),
    _S_B_L_XL: ((3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3),
}

#: (kernel, dilation) of the parallel branches of a Dilated Reparam Block per large kernel size (official
#: defaults; the first branch, dilation 1, is the usual small kernel of structural re-parameterization).
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}

#: Paper / official README configurations; ``params_m``: the reported parameter count (millions, 1000 classes).
VARIANTS: dict[str, dict] = {
    "unireplknet_a": dict(depths=_A_F_P, dims=(40, 80, 160, 320), params_m=4.4),
    "unireplknet_f": dict(depths=_A_F_P, dims=(48, 96, 192, 384), params_m=6.2),
    "unireplknet_p": dict(depths=_A_F_P, dims=(64, 128, 256, 512), params_m=10.7),
    "unireplknet_n": dict(depths=_N, dims=(80, 160, 320, 640), params_m=18.3),
    "unireplknet_t": dict(depths=_T, dims=(80, 160, 320, 640), params_m=31),
    "unireplknet_s": dict(depths=_S_B_L_XL, dims=(96, 192, 384, 768), params_m=56),
    "unireplknet_b": dict(depths=_S_B_L_XL, dims=(128, 256, 512, 1024), params_m=98),
    "unireplknet_l": dict(depths=_S_B_L_XL, dims=(192, 384, 768, 1536), params_m=218),
    "unireplknet_xl": dict(depths=_S_B_L_XL, dims=(256, 512, 1024, 2048), params_m=386),
}


def _dw_conv(channels: int, kernel_size: int, bias: bool, dilation: int = 1) -> nn.Conv2d:
    """A stride-1 'same' depthwise conv: ``fastconv.DepthwiseConv2d`` when large (K > 5, undilated), as the
    official ``get_conv2d`` routes the same convs to its iGEMM kernel; else ``nn.Conv2d``."""
    if kernel_size > 5 and dilation == 1:
        from fastconv import DepthwiseConv2d

        return DepthwiseConv2d(channels, kernel_size, bias=bias)
    return nn.Conv2d(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                     groups=channels, bias=bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the official ``LayerNorm(data_format="channels_first")``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on NHWC input (ConvNeXt V2, Woo et al. CVPR 2023, Eq. 1-3):
    ``G = ||x||_2 over (H, W)``, ``N = G / (mean_C G + 1e-6)``, ``y = (gamma N + 1) x + beta``."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma)
        if self.beta is not None:
            nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        y = (self.gamma * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)) + 1) * x
        return y if self.beta is None else y + self.beta


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): ``x * sigmoid(up(ReLU(down(avgpool(x)))))``, 1x1 convs."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)
        self.nonlinear = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.up(self.nonlinear(self.down(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(s)


def dilated_to_dense_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """The undilated kernel (C, 1, r(k-1)+1, r(k-1)+1) equivalent to a depthwise kernel ``kernel`` (C, 1, k, k)
    applied with dilation ``r``: the taps at every r-th position, zeros between (paper Sec. 3.2, Fig. 2)."""
    c, _, kh, kw = kernel.shape
    dense = kernel.new_zeros(c, 1, dilation * (kh - 1) + 1, dilation * (kw - 1) + 1)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


class DilatedReparamBlock(nn.Module):
    """Depthwise KxK conv-BN plus parallel dilated depthwise conv-BNs (``DILATED_BRANCHES[K]``), paper Sec. 3.2.

    :meth:`reparameterize` merges everything into one biased KxK conv ``lk_origin`` (the official deploy layout;
    idempotent). With ``deploy=True`` the block is built merged.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ErfLabError(f"Dilated Reparam Block: kernel size {kernel_size} has no official branch setting; "
                              f"choose one of {sorted(DILATED_BRANCHES)}")
        self.channels, self.kernel_size = channels, kernel_size
        self.branches = DILATED_BRANCHES[kernel_size]
        self.lk_origin = _dw_conv(channels, kernel_size, bias=deploy)
        self.merged = deploy
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in self.branches:
                setattr(self, f"dil_conv_k{k}_{r}", _dw_conv(channels, k, bias=False, dilation=r))
                setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(KxK kernel, bias) of the merged conv, computed in ``dtype``."""
        if self.merged:
            return self.lk_origin.weight.to(dtype), self.lk_origin.bias.to(dtype)
        k_sum, b_sum = fold_bn(self.lk_origin.weight, None, self.origin_bn, dtype)
        for k, r in self.branches:
            w, b = fold_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, None, getattr(self, f"dil_bn_k{k}_{r}"),
                           dtype)
            dense = dilated_to_dense_kernel(w, r)
            pad = (self.kernel_size - dense.shape[-1]) // 2
            k_sum, b_sum = k_sum + F.pad(dense, [pad] * 4), b_sum + b
        return k_sum, b_sum

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge all branches into a biased ``lk_origin`` (official ``merge_dilated_branches``); idempotent."""
        if self.merged:
            return
        dtype, device = self.lk_origin.weight.dtype, self.lk_origin.weight.device
        k, b = (t.to(device=device, dtype=dtype) for t in self.equivalent_kernel_bias())
        self.lk_origin = merged_conv(lambda: _dw_conv(self.channels, self.kernel_size, bias=True), k, b)
        self.merged = True
        del self.origin_bn
        for k_, r in self.branches:
            delattr(self, f"dil_conv_k{k_}_{r}")
            delattr(self, f"dil_bn_k{k_}_{r}")


class UniRepLKNetBlock(nn.Module):
    """``x + DropPath(gamma * pwconv2(act(pwconv1(se(norm(dwconv(x)))))))`` (official ``UniRepLKNetBlock``).

    ``kernel_size`` 0: no token mixer; 3 or 5: a plain depthwise conv; >= 7: a :class:`DilatedReparamBlock`.
    """

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 deploy: bool = False, ffn_factor: int = 4):
        super().__init__()
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        elif kernel_size in (3, 5):
            self.dwconv = _dw_conv(dim, kernel_size, bias=deploy)
        else:
            raise ErfLabError(f"UniRepLKNet block kernel size must be 0, 3, 5 or >= 7, got {kernel_size}")
        self.norm = nn.Identity() if deploy or kernel_size == 0 else nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(ToNHWC(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn_dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), ToNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), ToNCHW(), nn.BatchNorm2d(dim))
        use_gamma = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if use_gamma else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The block's own tensor (the layer scale); its sub-modules reset their own."""
        if self.gamma is not None:
            nn.init.constant_(self.gamma, self.layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.se(self.norm(self.dwconv(x))))))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """The official deploy form (idempotent): dilated branches merged; the BN after the depthwise conv folded
        into it; GRN bias, FFN BN and layer scale folded into ``pwconv2.0`` (``W' = gamma s W``,
        ``b' = gamma (beta_bn + s (W beta_grn - mu))``, ``s = gamma_bn / sqrt(var + eps)``)."""
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
        conv = self.dwconv.lk_origin if isinstance(self.dwconv, DilatedReparamBlock) else self.dwconv
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm (train --sync-bn) too
            self.norm = fold_bn_into_conv(conv, self.norm)
        if len(self.pwconv2) == 3:
            linear, bn, grn = self.pwconv2[0], self.pwconv2[2], self.act[1]
            w = linear.weight.double()
            b = (linear.bias.double() if linear.bias is not None else torch.zeros_like(w[:, 0]))
            if grn.beta is not None:
                b = b + w @ grn.beta.double().reshape(-1)
            w, b = fold_bn(w, b, bn)  # BN on the (N, C, H, W) output = per-output-feature affine map
            scale = self.gamma.double() if self.gamma is not None else torch.ones_like(b)
            new = nn.Linear(linear.in_features, linear.out_features, bias=True).to(linear.weight)
            new.weight.copy_(w * scale[:, None])
            new.bias.copy_(b * scale)
            self.pwconv2 = nn.Sequential(new, self.pwconv2[1])
            grn.beta = None
            self.gamma = None


class ConvNeXtLayout(FeatureIntermediates, ResettableClassifier, nn.Module):
    """The ConvNeXt-style body that UniRepLKNet and SLaK share (official key names): ``downsample_layers[i]`` then
    ``stages[i]``; ``forward_head`` = global average pool -> LayerNorm -> linear ``head``; truncated-normal init."""

    head_names = ("head",)

    def _add_head(self, dims: Sequence[int]) -> None:
        """The final norm, head and ``feature_info`` (stage ``i`` = ``stages.i``)."""
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], self.num_classes) if self.num_classes > 0 else None
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}") for i, c in enumerate(dims)]

    @torch.no_grad()
    def _initialize(self, device: torch.device, head_init_scale: float) -> None:
        """The model was built on the meta device: real tensors on ``device`` (none when it is meta: a checkpoint
        fills them), drawn as the official ``_init_weights`` (convs and linear layers truncated normal, std 0.02,
        zero bias) on all threads (initialization.py; issue 14's fixed cost: unireplknet_l's serial draws took
        4.3 s), other modules their own ``reset_parameters``; the head scaled by ``head_init_scale``."""
        if device.type == "meta":
            return
        init_parallel_(materialize(self, device), trunc_normal_conv_linear, is_conv_or_linear)
        if self.head is not None:
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        steps = []
        for i in range(len(self.stages)):
            steps += [(f"downsample_layers.{i}", self.downsample_layers[i]), (f"stages.{i}", self.stages[i])]
        return steps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for _, module in self._feature_steps():
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((-2, -1)))
        return x if pre_logits or self.head is None else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class UniRepLKNet(ConvNeXtLayout):
    """UniRepLKNet; arguments keep the official constructor's names (``in_chans``, ``depths``, ``dims``,
    ``kernel_sizes`` (None: the official defaults for ``depths``), ``deploy``).

    ``forward_features`` returns the last stage's map (N, C, H/32, W/32), before pooling and the final
    LayerNorm (which acts on the pooled vector). ``forward_head`` = average pool -> LayerNorm -> linear;
    ``num_classes=0`` drops the classifier. ``feature_info[i]`` is stage ``i`` (``module='stages.i'``).
    """

    def __init__(self, in_chans: int = 3, num_classes: int | None = 1000, depths: Sequence[int] = _S_B_L_XL,
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 kernel_sizes: Sequence[Sequence[int]] | None = None, deploy: bool = False):
        super().__init__()
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (*depths, *dims)):
            raise ErfLabError(f"UniRepLKNet depths and dims must be whole numbers, got depths={tuple(depths)}, "
                              f"dims={tuple(dims)}")
        depths, dims = tuple(int(d) for d in depths), tuple(int(c) for c in dims)
        if len(depths) != 4 or len(dims) != 4 or min(depths) < 1 or min(dims) < 1:
            raise ErfLabError(f"UniRepLKNet needs 4 positive depths and widths, got depths={depths}, dims={dims}")
        if min(dims) < 4:  # the SE bottleneck has dim // 4 channels (and the stem's first conv dims[0] // 2)
            raise ErfLabError(f"UniRepLKNet widths must be >= 4 (each block's squeeze-and-excitation has width // 4 "
                              f"channels), got dims={dims}")
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ErfLabError(f"no official kernel sizes for depths {depths}; pass kernel_sizes (one tuple "
                                  f"per stage, one size per block)")
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        kernel_sizes = tuple(tuple(int(k) for k in ks) for ks in kernel_sizes)
        if len(kernel_sizes) != 4 or any(len(ks) != d for ks, d in zip(kernel_sizes, depths)):
            raise ErfLabError(f"kernel_sizes {kernel_sizes} do not match depths {depths}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ErfLabError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.depths, self.dims, self.kernel_sizes = depths, dims, kernel_sizes
        self.large_kernel_sizes = tuple(max(ks) for ks in kernel_sizes)  # per stage, as RepLKNet's
        self.num_classes = int(num_classes or 0)
        self.num_features = dims[-1]
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                interpolation="bicubic", num_classes=self.num_classes)
        device = torch.get_default_device()
        with torch.device("meta"):  # drawn once, on all threads, by _initialize
            self.downsample_layers = nn.ModuleList([nn.Sequential(
                nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1), LayerNorm2d(dims[0] // 2), nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1), LayerNorm2d(dims[0]))])
            for i in range(3):
                self.downsample_layers.append(nn.Sequential(
                    nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1])))
            total = sum(depths)  # stochastic depth rising linearly over all blocks
            dpr = [float(drop_path_rate) * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
            self.stages = nn.ModuleList()
            for i in range(4):
                start = sum(depths[:i])
                self.stages.append(nn.Sequential(*[
                    UniRepLKNetBlock(dims[i], kernel_sizes[i][j], dpr[start + j], layer_scale_init_value, deploy)
                    for j in range(depths[i])]))
            self._add_head(dims)
        self._initialize(device, head_init_scale)


# ------------------------------------------------------------------------------------------ registered variants
def _create(variant: str, **kwargs) -> UniRepLKNet:
    cfg = {k: v for k, v in VARIANTS[variant].items() if k != "params_m"}
    cfg.update(kwargs)
    model = UniRepLKNet(**cfg)
    model.default_cfg["architecture"] = variant
    return model


def _register(variant: str):
    cfg = VARIANTS[variant]

    def factory(**kwargs) -> UniRepLKNet:
        return _create(variant, **kwargs)

    factory.__name__ = factory.__qualname__ = variant
    factory.__doc__ = (f"UniRepLKNet-{variant.split('_')[1].upper()}: depths {cfg['depths']}, widths "
                       f"{cfg['dims']}, 13x13 Dilated Reparam Blocks ({cfg['params_m']}M).")
    return register_model(factory)


for _variant in VARIANTS:
    globals()[_variant] = _register(_variant)
