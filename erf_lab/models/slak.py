"""SLaK (Liu et al., "More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity", ICLR 2023;
official code: github VITA-Group/SLaK, ``models/SLaK.py``).

Architecture (paper Sec. 4-5): ConvNeXt (Liu et al., CVPR 2022) with 1.3x wider stages and each 7x7 depthwise
conv replaced by a *decomposed* large kernel (paper Sec. 4.2, "kernel decomposition"): two parallel depthwise
conv-BNs of shapes K x 5 and 5 x K plus a 5 x 5 conv-BN, summed. Stage kernels K = 51, 49, 47, 13 (official
``--kernel_size 51 49 47 13 5``). A block is ``x + DropPath(gamma * Linear(GELU(Linear(LN(LK(x))))))``
(LN / Linears in NHWC); stem 4x4/4 conv-LN, downsampling LN-2x2/2 conv, head: pool -> LN -> Linear.

State-dict keys are the official ones (``stages.0.0.large_kernel.LoRA1.conv.weight`` (C, 1, 51, 5),
``...LoRA1.bn.*``, ``...LoRA2.*`` (5 x 51), ``...small_conv.*`` (5 x 5), ``...norm.*``, ``...pwconv1.*``,
``...gamma``, ``downsample_layers.*``, ``norm.*``, ``head.*``); ``decompose=False`` is the official
``Decom=None`` path (``lkb_origin`` K x K + ``small_conv``), ``bn=False`` the official BN-free branches.

Kernel merge for inference (:meth:`SLaKLargeKernel.reparameterize`, ``reparameterize_model``, ``deploy=True``):
each branch's BN is folded into its kernel and the K x 5, 5 x K and 5 x 5 kernels are zero-padded to K x K and
summed into one biased depthwise conv ``lkb_reparam`` (the official merged name). The convolutions are linear and
all 'same'-padded, so the merge is exact.

Sparsity: the paper trains with dynamic sparsity (40 % of the conv / linear weights zero, SNIP init, prune-and-
grow). This implementation holds dense weights only (a sparse checkpoint loads unchanged: its zeros are ordinary
values; the official code saves no masks, ``--sparse_init resume`` reads them back from the zeros); no sparse
training. The paper's "#params" and "FLOPs" count the non-zero weights only (``count_flops(nonzero=True)`` on a
loaded checkpoint). Its parameter counts follow from the sparsity (:func:`sparse_param_count`); its FLOPs do not:
SNIP ranks the weights across all layers by ``|w * dL/dw|`` at initialisation, and the block weights' gradients pass
through the 1e-6 layer scale while the stem's, downsampling convs' and head's do not, so those stay dense and the
blocks take the zeros, unevenly (the official code keeps each layer's count through prune-and-grow). 40 % zeros in
every layer would give T 5.22 / S 9.96 / B 17.11 GMACs against the paper's 5.0 / 9.8 / 17.1.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.errors import ErfLabError
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD, MAX_KERNEL_SIZE
from erf_lab.models.registry import register_model
from erf_lab.models.reparam import merged_conv
from erf_lab.models.replknet import ConvBN, DropPath
from erf_lab.models.unireplknet import ConvNeXtLayout, LayerNorm2d

__all__ = ["SLaK", "SLaKBlock", "SLaKLargeKernel", "VARIANTS", "options_implied_by", "sparse_param_count"]

#: Paper Table 2 / official README; ``params_m`` / ``gflops``: reported counts (millions, GMACs at 224) of the
#: non-zero weights of the trained 40 %-sparse models.
VARIANTS: dict[str, dict] = {
    "slak_t": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), params_m=30, gflops=5.0),
    "slak_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), params_m=55, gflops=9.8),
    "slak_b": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), params_m=95, gflops=17.1),
}
#: The paper's sparsity (official training command ``--sparsity 0.4``).
PAPER_SPARSITY = 0.4


def _dw_conv_bn(channels: int, kernel_size: tuple[int, int], bn: bool) -> ConvBN:
    """Depthwise 'same' conv (-> BN) with official keys ``conv.weight`` / ``bn.*``; through
    ``fastconv.DepthwiseConv2d`` (rectangular kernels included), as the official code's iGEMM conv."""
    from fastconv import DepthwiseConv2d

    block = ConvBN(channels, channels, 1, groups=channels)
    block.conv = DepthwiseConv2d(channels, kernel_size, bias=False)
    if not bn:
        block.bn = None
    return block


class SLaKLargeKernel(nn.Module):
    """The decomposed large kernel (official ``ReparamLargeKernelConv`` with ``Decom``): ``LoRA1`` (K x s) +
    ``LoRA2`` (s x K) + ``small_conv`` (s x s), each depthwise conv-BN; ``decompose=False``: ``lkb_origin``
    (K x K) + ``small_conv``. The small conv is omitted when s >= K (as officially). The merged kernel is K x K, or
    s x s where decomposed strips are wider than they are long (s > K: a K x s strip does not fit in K x K)."""

    def __init__(self, channels: int, kernel_size: int, small_kernel: int, decompose: bool = True,
                 bn: bool = True, merged: bool = False):
        super().__init__()
        # without decomposition a small kernel >= K is no branch at all: the official ConvNeXt baseline passes a
        # sentinel (``--kernel_size 7 7 7 7 100``), so only the sizes that build a conv are checked
        used = (kernel_size, small_kernel) if decompose or small_kernel < kernel_size else (kernel_size,)
        if any(k % 2 == 0 or not 1 <= k <= MAX_KERNEL_SIZE for k in used):
            raise ErfLabError(f"SLaK kernel sizes must be odd, from 1 to {MAX_KERNEL_SIZE}, got {kernel_size}, "
                              f"{small_kernel}")
        self.channels, self.kernel_size, self.small_kernel = channels, kernel_size, small_kernel
        self.merged_size = max(kernel_size, small_kernel) if decompose else kernel_size
        self.lkb_reparam = self.LoRA1 = self.LoRA2 = self.lkb_origin = self.small_conv = None
        if merged:
            self.lkb_reparam = self._merged_conv()
            return
        k, s = kernel_size, small_kernel
        if decompose:
            self.LoRA1 = _dw_conv_bn(channels, (k, s), bn)
            self.LoRA2 = _dw_conv_bn(channels, (s, k), bn)
        else:
            self.lkb_origin = _dw_conv_bn(channels, (k, k), bn)
        if s < k:
            self.small_conv = _dw_conv_bn(channels, (s, s), bn)

    def _merged_conv(self) -> nn.Module:
        from fastconv import DepthwiseConv2d

        return DepthwiseConv2d(self.channels, self.merged_size, bias=True)

    def _branches(self) -> list[ConvBN]:
        return [b for b in (self.LoRA1, self.LoRA2, self.lkb_origin, self.small_conv) if b is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        branches = self._branches()
        out = branches[0](x)
        for b in branches[1:]:
            out = out + b(x)
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel, bias) in float64: every branch BN-fused, zero-padded to the merged size around the centre,
        summed."""
        if self.lkb_reparam is not None:
            return self.lkb_reparam.weight.double(), self.lkb_reparam.bias.double()
        k_sum = b_sum = 0
        for branch in self._branches():
            w, b = branch.fused_weight_bias(torch.float64)
            ph, pw = (self.merged_size - w.shape[-2]) // 2, (self.merged_size - w.shape[-1]) // 2
            k_sum, b_sum = k_sum + F.pad(w, [pw, pw, ph, ph]), b_sum + b
        return k_sum, b_sum

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge into ``lkb_reparam``; idempotent."""
        if self.lkb_reparam is not None:
            return
        ref = self._branches()[0].conv.weight
        k, b = (t.to(device=ref.device, dtype=ref.dtype) for t in self.equivalent_kernel_bias())
        self.lkb_reparam = merged_conv(self._merged_conv, k, b)
        self.LoRA1 = self.LoRA2 = self.lkb_origin = self.small_conv = None


class SLaKBlock(nn.Module):
    """``x + DropPath(gamma * pwconv2(GELU(pwconv1(norm(large_kernel(x))))))`` (official ``Block``; NHWC MLP)."""

    def __init__(self, dim: int, kernel_size: int, small_kernel: int, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, decompose: bool = True, bn: bool = True,
                 merged: bool = False):
        super().__init__()
        self.large_kernel = SLaKLargeKernel(dim, kernel_size, small_kernel, decompose, bn, merged)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The block's own tensor (the layer scale); its sub-modules reset their own."""
        if self.gamma is not None:
            nn.init.constant_(self.gamma, self.layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.large_kernel(x).permute(0, 2, 3, 1)))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class SLaK(ConvNeXtLayout):
    """SLaK; arguments keep the official constructor's names (``depths``, ``dims`` before ``width_factor``,
    ``kernel_size`` = the four stage kernels + the small kernel, ``Decom`` as ``decompose``) plus ``deploy``
    (build merged). ``forward_features`` returns the last stage's map (N, C, H/32, W/32) before pooling (the
    official ``forward_features`` pools and norms it); ``feature_info[i]`` = ``stages.i``.
    """

    def __init__(self, in_chans: int = 3, num_classes: int | None = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 kernel_size: Sequence[int] = (51, 49, 47, 13, 5), width_factor: float = 1.3,
                 decompose: bool = True, bn: bool = True, deploy: bool = False):
        super().__init__()
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (*depths, *dims)):
            raise ErfLabError(f"SLaK depths and dims must be whole numbers, got depths={tuple(depths)}, "
                              f"dims={tuple(dims)}")
        depths, kernel_size = tuple(int(d) for d in depths), tuple(int(k) for k in kernel_size)
        dims = tuple(int(c * width_factor) for c in dims)
        if len(depths) != 4 or len(dims) != 4 or min(depths) < 1 or min(dims) < 1:
            raise ErfLabError(f"SLaK needs 4 positive depths and widths, got depths={depths}, dims={dims}")
        if len(kernel_size) != 5:
            raise ErfLabError(f"kernel_size: four stage kernels and the small kernel, got {kernel_size}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ErfLabError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.depths, self.dims, self.kernel_size = depths, dims, kernel_size
        self.large_kernel_sizes = kernel_size[:4]  # per stage, as RepLKNet's
        self.num_classes = int(num_classes or 0)
        self.num_features = dims[-1]
        self.default_cfg = dict(input_size=(in_chans, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                interpolation="bicubic", num_classes=self.num_classes)
        device = torch.get_default_device()
        with torch.device("meta"):  # drawn once, on all threads, by _initialize
            self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4),
                                                                  LayerNorm2d(dims[0]))])
            for i in range(3):
                self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i]),
                                                            nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
            total = sum(depths)
            dpr = [float(drop_path_rate) * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
            self.stages = nn.ModuleList()
            for i in range(4):
                start = sum(depths[:i])
                self.stages.append(nn.Sequential(*[
                    SLaKBlock(dims[i], kernel_size[i], kernel_size[-1], dpr[start + j], layer_scale_init_value,
                              decompose, bn, merged=deploy) for j in range(depths[i])]))
            self._add_head(dims)
        self._initialize(device, head_init_scale)


def sparse_param_count(model: nn.Module, sparsity: float = PAPER_SPARSITY) -> int:
    """Parameters left non-zero when ``sparsity`` of the weights the official ``Masking`` sparsifies (every 2-D
    and 4-D parameter: conv kernels and linear weights, head included) is zero: the paper's "#params"."""
    masked = sum(p.numel() for p in model.parameters() if p.dim() in (2, 4))
    total = sum(p.numel() for p in model.parameters())
    return round(total - sparsity * masked)


def options_implied_by(state_dict) -> dict:
    """The constructor options a training-time checkpoint's key names fix: ``decompose=False`` for the official
    ``Decom=None`` layout (``large_kernel.lkb_origin``, no ``LoRA1``), ``bn=False`` for its ``--bn False`` one (branch
    convs without ``.bn.`` tensors); {} for the default layout and for a merged (``lkb_reparam``) file."""
    branches = [k for k in state_dict if ".large_kernel." in "." + k and ".lkb_reparam." not in "." + k]
    if not branches:
        return {}
    options = {}
    if any(".large_kernel.lkb_origin." in "." + k for k in branches) and \
            not any(".large_kernel.LoRA1." in "." + k for k in branches):
        options["decompose"] = False
    if not any(".bn." in k for k in branches):
        options["bn"] = False
    return options


def kernel_size_of(state_dict) -> tuple[int, ...] | None:
    """The ``kernel_size`` (four stage kernels, then the small kernel) a training-time checkpoint's branch shapes fix
    (each stage's first block: ``LoRA1`` K x s, or ``lkb_origin`` K x K beside ``small_conv`` s x s), e.g. the
    official 31x31 / 61x61 SLaK-T files; None where they do not (a merged file, no small branch, another model)."""
    def shape(suffix: str):
        t = next((v for k, v in state_dict.items() if k == suffix or k.endswith("." + suffix)), None)
        return tuple(t.shape[-2:]) if isinstance(t, torch.Tensor) and t.dim() == 4 else None

    stages, small = [], set()
    for i in range(4):
        prefix = f"stages.{i}.0.large_kernel."
        lora, origin, conv = (shape(prefix + b + ".conv.weight") for b in ("LoRA1", "lkb_origin", "small_conv"))
        if lora is not None:
            k, s = lora
        elif origin is not None and conv is not None:
            k, s = origin[0], conv[0]
        else:
            return None
        stages.append(k)
        small.add(s)
    return (*stages, small.pop()) if len(small) == 1 else None


def options_hint(state_dict, overrides) -> str:
    """The end of the error line of a checkpoint that does not load: the ``kernel_size`` its shapes fix where it is
    not the one asked for (the ``--override`` that loads it); "" otherwise."""
    import inspect

    from erf_lab.checkpoint import override_options

    kernel_size = kernel_size_of(state_dict)
    asked = tuple(overrides.get("kernel_size", inspect.signature(SLaK).parameters["kernel_size"].default))
    if kernel_size is None or asked == kernel_size:
        return ""
    return (f"; its kernels are {', '.join(map(str, kernel_size[:4]))} with small kernel {kernel_size[4]}: "
            f"{override_options({'kernel_size': kernel_size})}")


# ------------------------------------------------------------------------------------------ registered variants
def _register(variant: str, label: str):
    cfg = {k: v for k, v in VARIANTS[variant].items() if k not in ("params_m", "gflops")}

    def factory(**kwargs) -> SLaK:
        model = SLaK(**{**cfg, **kwargs})
        model.default_cfg["architecture"] = variant
        return model

    factory.__name__ = factory.__qualname__ = variant
    factory.options_implied_by = options_implied_by  # a checkpoint's layout (create_model)
    factory.options_hint = options_hint  # the kernel sizes of one that does not load
    factory.__doc__ = (f"SLaK-{label}: depths {cfg['depths']}, widths 1.3 x {cfg['dims']}, kernels 51-49-47-13 "
                       f"decomposed into Kx5 + 5xK + 5x5 ({VARIANTS[variant]['params_m']}M at 40% sparsity).")
    return register_model(factory)


slak_t = _register("slak_t", "T")
slak_s = _register("slak_s", "S")
slak_b = _register("slak_b", "B")
