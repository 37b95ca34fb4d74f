"""Model-level structural re-parameterization (the timm ``reparameterize_model`` convention)."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fuse_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding convolution: returns (weight, bias).

    w' = w * gamma / sqrt(var + eps);  b' = beta + (b - mean) * gamma / sqrt(var + eps).
    """
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    w = weight * t.reshape(-1, *([1] * (weight.dim() - 1)))
    b0 = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return w, bn.bias + (b0 - bn.running_mean) * t


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """In place: fold the eval-mode BN that follows ``conv`` into ``conv`` (which gains a bias), computed in
    float64 and rounded once; returns the module to put in ``bn``'s place (``nn.Identity``). Idempotent: a ``bn``
    that is not a BatchNorm (already folded) is returned unchanged. Works for any padding/stride (the BN acts
    on the conv output), e.g. TF-"SAME" convs keep their padding rule."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return bn
    w = conv.weight.detach()
    b = conv.bias.detach().double() if conv.bias is not None else None
    std = (bn.running_var.double() + bn.eps).sqrt()
    t = bn.weight.detach().double() / std
    b0 = b if b is not None else torch.zeros_like(t)
    conv.weight = nn.Parameter((w.double() * t.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    conv.bias = nn.Parameter((bn.bias.detach().double() + (b0 - bn.running_mean.double()) * t).to(w.dtype))
    return nn.Identity()


def reparameterize_model(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Call ``reparameterize()`` on every sub-module that has it (idempotent), giving the deploy form; the
    model's own ``reparameterize()`` (stem / head conv-BN pairs held directly by the model) is called last.

    The model is put in eval mode (the fused form is only equivalent with running BN statistics).
    """
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    model.eval()
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    if callable(getattr(model, "reparameterize", None)):
        model.reparameterize()
    return model
