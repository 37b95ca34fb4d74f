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


def reparameterize_model(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Call ``reparameterize()`` on every sub-module that has it (idempotent), giving the deploy form.

    The model is put in eval mode (the fused form is only equivalent with running BN statistics).
    """
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    model.eval()
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    return model
