"""Multiply-accumulate count (the "FLOPs" of the RepLKNet paper's tables) of conv and linear layers."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call


_SHAPE_PRESERVING = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.GELU,
                     nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Dropout)


def _identity(x, *args, **kwargs):
    return x


def count_flops(model: nn.Module, input_size: int | tuple[int, int] = 224, in_channels: int | None = None,
                nonzero: bool = False) -> int:
    """MACs of every ``nn.Conv2d`` / ``nn.Linear`` (subclasses included) for one image of ``input_size``.

    Conv: ``H_out * W_out * C_out * (C_in / groups) * KH * KW`` (the output positions times the weights); linear:
    ``in * out`` per output row. BN, activations and pooling are not counted. ``nonzero=True`` counts only the
    non-zero weights (output positions times non-zero weights): the FLOPs of a sparse model as sparse-training papers
    count them (SLaK's Table 2; the official ``FLOPs_counter.py`` rule), which needs the model's real weights. Runs
    the forward on the ``meta`` device through forward hooks, so no real compute or memory is spent and the model
    itself is left untouched (mode restored afterwards).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if in_channels is None:
        cfg = getattr(model, "default_cfg", None) or {}
        in_channels = int(cfg.get("input_size", (3,))[0])
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if nonzero and any(m.weight.is_meta for m in layers):
        raise ValueError("count_flops(nonzero=True) needs the model's weights (built on the meta device)")

    def dense(m) -> int:  # from the layer's shape (a lazy layer's weight has none yet)
        if isinstance(m, nn.Conv2d):
            return m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        return m.out_features * m.in_features

    # weights per output position (the meta forward below sees no values): all of them, or the non-zero ones
    weights = {m: int(torch.count_nonzero(m.weight)) if nonzero else dense(m) for m in layers}
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):  # (N, C_out, H, W): H * W positions, each reads every weight once
            total += output[0, 0].numel() * weights[module]
        elif isinstance(module, nn.Linear):  # (N, ..., out): a row per position
            total += output.numel() // output.shape[0] // module.out_features * weights[module]

    handles = [m.register_forward_hook(hook) for m in layers]
    # Normalisation layers and activations keep the shape; their meta-device decompositions are slow Python
    # (the first one imports torch._dynamo, ~10 s), so they are bypassed (as instance attributes, removed again
    # below) while counting.
    norms = [m for m in model.modules() if isinstance(m, _SHAPE_PRESERVING) and "forward" not in vars(m)]
    for m in norms:
        m.forward = _identity
    meta = {name: torch.empty_like(t, device="meta") for name, t in
            list(model.named_parameters()) + list(model.named_buffers())}
    was_training = model.training
    model.eval()
    try:
        x = torch.empty(1, in_channels, h, w, device="meta")
        with torch.no_grad():
            functional_call(model, meta, (x,), strict=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        for m in norms:
            del m.forward
    return int(total)


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (buffers such as BN running statistics excluded); ``nonzero=True``: of the non-zero
    ones (a sparse model's count in sparse-training papers, SLaK's "#params"), which needs the real weights."""
    if nonzero:
        return sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())
