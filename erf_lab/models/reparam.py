"""Structural re-parameterization (the timm convention): one BN-fold primitive, per-block idempotent
``reparameterize()``, and the model-level :func:`reparameterize_model`."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module,
            dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the single conv equivalent to conv -> eval-mode BN (Ding et al., RepVGG, CVPR 2021,
    Sec. 3.3): ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``.

    Computed in float64 and rounded once into ``dtype`` (default: the weight's). Returns new tensors, or writes
    the weight into ``out`` (``dtype``; it may be ``weight`` itself) and returns it. The product is taken by
    :func:`scale_in_float64` (cache-sized float64 blocks of the weight).
    """
    dtype = dtype or weight.dtype
    if out is not None and (out.dtype != dtype or out.shape != weight.shape):
        raise ValueError(f"fold_bn: out must be {dtype} of shape {tuple(weight.shape)}")
    t = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
    b0 = bias.detach().double() if bias is not None else torch.zeros_like(t)
    w = scale_in_float64(weight.detach(), t.reshape(-1, *([1] * (weight.dim() - 1))), dtype, out=out)
    return w, (bn.bias.detach().double() + (b0 - bn.running_mean.double()) * t).to(dtype)


_BLOCK_ELEMENTS = 1 << 18  # 2 MB of float64: cache-resident between the three passes, big enough for 2 threads


@torch.no_grad()
def scale_in_float64(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``(weight.double() * scale).to(dtype)`` (``scale`` float64, broadcast against ``weight``; its first dim is
    1 or ``weight``'s), computed over blocks of output rows through one reused float64 buffer on a CPU: the
    same numbers (each element is widened, multiplied and rounded once) without the full-size float64 copies,
    whose memory traffic dominated (29M weights of RepLKNet-31B's shapes on the 2-core dev box: 23 ms against
    215 ms; the model's whole preparation 0.66 s against 0.80-1.16 s).
    The mixed-dtype ``torch.mul(w32, t64)`` gives these numbers too but is not vectorized (0.9 s).
    ``out`` (``dtype``, ``weight``'s shape; ``weight`` itself allowed: each block is read before it is written)
    receives the result instead of a new tensor: memory that is already paged in (a new 300 MB for RepLKNet-31B's
    weights cost 0.27 s of page faults on the dev box)."""
    rows = weight.shape[0] if weight.dim() else 1
    per_row = max(1, weight.numel() // max(rows, 1))
    if weight.device.type != "cpu" or weight.dim() == 0 or weight.numel() <= 2 * _BLOCK_ELEMENTS:
        res = torch.mul(weight.double(), scale).to(dtype)
        return res if out is None else out.copy_(res)
    step = max(1, _BLOCK_ELEMENTS // per_row)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype)
    buf = torch.empty((min(step, rows), *weight.shape[1:]), dtype=torch.float64)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        b = buf[: e - s]
        b.copy_(weight[s:e])
        b.mul_(scale[s:e] if scale.dim() and scale.shape[0] == rows else scale)
        out[s:e].copy_(b)
    return out


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """In place: fold the eval-mode BN that follows ``conv`` into ``conv`` (which gains a bias) with
    :func:`fold_bn`; returns the module to put in ``bn``'s place (``nn.Identity``). Idempotent: a ``bn`` that is
    not a BatchNorm (already folded, or None) is returned unchanged. Exact for any padding / stride (the BN acts
    on the conv output), e.g. TF-"SAME" convs keep their padding rule. The folded weight is written over the
    conv's old weight tensor where it can be (see ``_reusable``)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return bn
    w, b = fold_bn(conv.weight, conv.bias, bn, out=_reusable(conv.weight))
    conv.weight, conv.bias = nn.Parameter(w), nn.Parameter(b)
    return nn.Identity()


def _reusable(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight``'s own memory for its folded values, where the blocked float64 product can write it: a dense,
    floating-point CPU tensor made outside ``torch.inference_mode`` (an inference tensor cannot back a new
    Parameter). None otherwise (the fold then allocates). The folds are in place on the conv: the old weight
    tensor is overwritten, so a ``state_dict()`` taken before them shares the folded values (clone it to keep the
    unfolded ones), and an autograd graph recorded through the old weight can no longer run backward."""
    w = weight.detach()
    ok = w.device.type == "cpu" and w.is_contiguous() and w.dtype.is_floating_point and not torch.is_inference(w)
    return w if ok else None


@torch.no_grad()
def fold_preceding_bn(bn: nn.Module, conv: nn.Conv2d) -> nn.Module:
    """In place: fold an eval-mode BN that directly precedes a 1x1, groups-1, unpadded conv into it (exact):
    ``W (a x + c) + b = (W a) x + (b + W c)``, where ``(a, c)`` is the BN as a per-channel affine map, i.e.
    :func:`fold_bn` of the identity. Returns ``nn.Identity`` for ``bn``'s place; idempotent like
    :func:`fold_bn_into_conv`, and like it writes over the conv's old weight tensor (see ``_reusable``)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return bn
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding != (0, 0):
        raise ValueError("a preceding BN can only be folded exactly into a 1x1, groups=1, unpadded conv")
    a, c = fold_bn(torch.ones_like(bn.running_var, dtype=torch.float64), None, bn)
    w = conv.weight.detach()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                device=w.device)
    conv.bias = nn.Parameter((b + _matvec_in_float64(w[:, :, 0, 0], c)).to(w.dtype))
    conv.weight = nn.Parameter(scale_in_float64(w, a.reshape(1, -1, 1, 1), w.dtype, out=_reusable(w)))  # as fold_bn
    return nn.Identity()


def merged_conv(make: Callable[[], nn.Module], weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """The conv that ``make()`` builds, holding ``weight`` and ``bias`` (the merged branches of a re-parameterized
    block): built on the meta device, so no random init runs for tensors that are replaced at once."""
    with torch.device("meta"):
        conv = make()
    conv.weight, conv.bias = nn.Parameter(weight), nn.Parameter(bias)
    return conv


def _matvec_in_float64(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``m.double() @ v`` over blocks of rows of ``m`` (one reused float64 buffer, as in :func:`scale_in_float64`):
    the same products and sums per row without a full float64 copy of ``m``."""
    if m.device.type != "cpu" or m.numel() <= 2 * _BLOCK_ELEMENTS:
        return m.double() @ v
    step = max(1, _BLOCK_ELEMENTS // m.shape[1])
    out = torch.empty(m.shape[0], dtype=torch.float64)
    buf = torch.empty((min(step, m.shape[0]), m.shape[1]), dtype=torch.float64)
    for s in range(0, m.shape[0], step):
        e = min(m.shape[0], s + step)
        buf[: e - s].copy_(m[s:e])
        torch.mv(buf[: e - s], v, out=out[s:e])
    return out


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The deploy (fully fused) form of ``model``: ``reparameterize()`` is called on every sub-module that has
    it (idempotent), the model's own (stem / head conv-BN pairs held by the model) last. As in timm, the model
    is copied unless ``inplace=True``. The result is in eval mode (the fused form is only equivalent with
    running BN statistics)."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    if callable(getattr(model, "reparameterize", None)):
        model.reparameterize()
    return model


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0, input_size: int = 48, batch: int = 4) -> nn.Module:
    """Random eval-mode BN statistics and affine parameters, so that a wrong BN fold shows.

    Running statistics are first set to the real batch statistics of ``batch`` random images of ``input_size``
    (so every BN acts at O(1) on the output), then perturbed; gamma ~ U(0.5, 1.5), beta ~ N(0, 0.3^2).
    ``running_var`` gets +0.05 so that gamma/std stays moderate (near-empty channels would amplify the fp32
    rounding of both forms). Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: running stats = batch stats after one pass
    model.train()
    in_ch = int(getattr(model, "default_cfg", {}).get("input_size", (3,))[0])
    model(torch.randn(batch, in_ch, input_size, input_size, generator=g))
    for m, momentum in zip(bns, momenta):
        n = m.num_features
        m.momentum = momentum
        m.running_mean.add_(torch.randn(n, generator=g) * 0.1 * m.running_var.sqrt())
        m.running_var.mul_(torch.rand(n, generator=g) * 0.5 + 0.75).add_(0.05)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()
