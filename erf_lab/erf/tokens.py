"""Token and channels-last outputs as (B, C, H, W) spatial maps, so that the ERF of a transformer is measured exactly
like a CNN's (target: the centre unit of the map).

- (B, N, C) tokens (ViT, DeiT, Mixer; timm ``forward_features``): the ``model.num_prefix_tokens`` leading class /
  register / distillation tokens are dropped when present, the patch tokens reshaped row-major onto the patch
  grid (the order of timm's ``PatchEmbed``: ``flatten(2).transpose(1, 2)``).
- timm's Hiera keeps its tokens unrolled between its blocks: a block's output is rolled back by the model's own
  ``reroll``; a module inside a block is refused.
- (B, H, W, C) maps of models whose ``output_fmt`` is ``"NHWC"`` (Swin) are permuted to NCHW, except the outputs
  of convolutions and pooling layers inside them, which are NCHW already.
- (B, H, W, C) maps inside ConvNeXt-style blocks of NCHW models (UniRepLKNet's ``pwconv1`` / ``act``, SLaK's
  ``norm`` / ``pwconv1``, timm ConvNeXt's ``norm`` / ``mlp``: LayerNorm and Linear over the channels after a
  permute) are found by :func:`track_layout` during the forward and permuted back as well; so are the maps of
  timm's MaxViT / GC ViT blocks, which switch to channels-last with a ``permute`` and whose window attention
  returns its map through a function (the tags follow permutes and same-shape functions, and a map a function
  made takes the layout of its block's input when it has that shape).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from erf_lab.errors import ErfLabError

_NCHW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


_NHWC_TAG = "_erf_lab_nhwc"


def _first_tensor(args) -> torch.Tensor | None:
    """The first positional argument of a hook's ``inp`` when it is a tensor, else None."""
    return args[0] if isinstance(args, (tuple, list)) and args and isinstance(args[0], torch.Tensor) else None


def _layout_hook(module: nn.Module, inp, out, enclosing: tuple | None = None) -> None:
    """Tags a module's 4-D output tensor as NHWC (True) or NCHW (False): a Linear, a last-dim LayerNorm or a
    ``...ToNHWC`` module makes NHWC; a conv, pooling, ``...2d`` module or ``...ToNCHW`` makes NCHW; any other
    module keeps its input's layout when the shape is unchanged (activations, GRN, dropout, containers). A Linear
    or LayerNorm whose input is known to be NCHW (a map over its width), or a LayerNorm over more than the last
    dim, is not NHWC. A map of unknown layout (made by a function, not a module: a window reverse) that has the
    shape of the ``enclosing`` module's input takes that input's layout ((tag, shape), see :class:`_Enclosing`);
    else it is left untagged."""
    t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        return
    name = type(module).__name__.lower()
    src = _first_tensor(inp)
    # a Linear / LayerNorm on a map known to be NCHW (a conv's output, say) works over its width: it stays NCHW
    known_nchw = src is not None and getattr(src, _NHWC_TAG, None) is False
    if isinstance(module, _NCHW_MODULES) or name.endswith("nchw") or "2d" in name:
        nhwc = False
    elif name.endswith("nhwc") or (isinstance(module, nn.Linear) and not known_nchw):
        nhwc = True
    elif (isinstance(module, nn.LayerNorm) and getattr(module, "data_format", "") != "channels_first"
          and len(module.normalized_shape) == 1 and not known_nchw):  # over the channels only, not (C, H, W)
        nhwc = True
    elif hasattr(t, _NHWC_TAG):  # a container returning its last child's tensor: already tagged
        return
    else:  # the input's layout when the shape is kept; a map of unknown layout stays untagged (read as NCHW)
        was = getattr(src, _NHWC_TAG, None) if src is not None else None
        if was is None and enclosing is not None and enclosing[0] is not None and enclosing[1] == t.shape:
            was, src = enclosing[0], None  # made by a function inside a block whose input has this shape
        if was is None or (was and src is not None and src.shape != t.shape):
            return
        nhwc = was
    setattr(t, _NHWC_TAG, nhwc)


class _Enclosing:
    """The modules whose forward is under way, innermost last: (input layout tag or None, input shape)."""

    def __init__(self):
        self.stack: list[tuple[bool | None, torch.Size | None]] = []

    def enter(self, module, inp) -> None:
        src = _first_tensor(inp)
        self.stack.append((getattr(src, _NHWC_TAG, None), src.shape if src is not None else None))

    def leave(self, module, inp, out) -> None:
        if self.stack:
            self.stack.pop()
        _layout_hook(module, inp, out, self.stack[-1] if self.stack else None)


_PERMUTES = {(0, 2, 3, 1): True, (0, 3, 1, 2): False}  # NCHW -> NHWC, NHWC -> NCHW


class _LayoutMode(TorchFunctionMode):
    """Carries the layout tags through functions (not modules) during a forward: ``permute(0, 2, 3, 1)`` makes an
    NHWC map of an NCHW (or untagged) one and ``permute(0, 3, 1, 2)`` the reverse (timm's MaxViT / GC ViT blocks
    switch to channels-last this way); a function whose 4-D output has the shape of a tagged 4-D input (add,
    multiply, contiguous, ...) keeps that input's layout."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or hasattr(out, _NHWC_TAG):
            return out
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src.dim() == 4 and func in (torch.Tensor.permute, torch.permute):
            dims = args[1:] if len(args) > 2 else (args[1] if len(args) == 2 else (kwargs or {}).get("dims", ()))
            dims = tuple(int(d) % 4 for d in dims)
            to_nhwc = _PERMUTES.get(dims)
            if to_nhwc is not None and getattr(src, _NHWC_TAG, None) is not to_nhwc:
                setattr(out, _NHWC_TAG, to_nhwc)
            return out
        flat = [a for arg in args for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
        for a in flat:
            if isinstance(a, torch.Tensor) and a.shape == out.shape and hasattr(a, _NHWC_TAG):
                setattr(out, _NHWC_TAG, getattr(a, _NHWC_TAG))
                break
        return out


@contextlib.contextmanager
def track_layout(model: nn.Module):
    """During a forward of ``model`` inside this context, tags every 4-D map that a module returns as NHWC or
    NCHW (:func:`_layout_hook`; enter it before registering other forward hooks that read the tag), and carries
    the tags through functions (:class:`_LayoutMode`) where the model may have channels-last maps: it has a
    LayerNorm or more than one Linear. Others (RepLKNet, ResNet, MobileNetV2: BN and a classifier head) do not pay
    the mode's cost, about 4 us per torch call (6231 calls in a RepLKNet-31B forward: 27 ms, 1 thread)."""
    enclosing = _Enclosing()
    handles = []
    mods = list(model.modules())
    channels_last_blocks = (any(isinstance(m, nn.LayerNorm) for m in mods)
                            or sum(isinstance(m, nn.Linear) for m in mods) > 1)
    try:
        for mod in mods:
            handles.append(mod.register_forward_pre_hook(enclosing.enter))
            handles.append(mod.register_forward_hook(enclosing.leave))
        with _LayoutMode() if channels_last_blocks else contextlib.nullcontext():
            yield
    finally:
        for h in handles:
            h.remove()


def channels_last_output(model: nn.Module, module: nn.Module | None = None) -> bool:
    """True when ``module``'s 4-D output (``forward_features`` if None) is NHWC: the model declares
    ``output_fmt = "NHWC"`` (timm's Swin) and the module is not a convolution or pooling."""
    return str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC" and not isinstance(module, _NCHW_MODULES)


def patch_grid(model: nn.Module, num_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The (rows, cols) grid of ``num_tokens`` patch tokens for an ``input_hw`` input, or None when no candidate
    fits: the grid for this input size from the patch size, the model's fixed ``patch_embed.grid_size``, a
    square."""
    embed = getattr(model, "patch_embed", None)
    candidates = []
    patch = getattr(embed, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[:2]
        h, w = input_hw
        candidates += [(h // ph, w // pw), (-(-h // ph), -(-w // pw))]
    grid = getattr(embed, "grid_size", None)
    if grid is not None:
        candidates.append(tuple(int(g) for g in grid)[:2])
    side = math.isqrt(num_tokens)
    candidates.append((side, side))
    return next((g for g in candidates if len(g) == 2 and g[0] * g[1] == num_tokens), None)


def _rerolled(out: torch.Tensor, model: nn.Module, module: nn.Module) -> torch.Tensor | None:
    """timm's Hiera keeps its tokens unrolled (mask-unit order, not row-major) from its ``unroll`` on: block i's
    output as (B, C, H, W) through the model's own ``reroll`` (as its ``forward_intermediates``); None before the
    unroll (the patch embedding: row-major); ErfLabError inside a block or at the unroll itself, whose order no
    reroll undoes."""
    blocks = list(getattr(model, "blocks", []))
    for i, block in enumerate(blocks):
        if module is block:
            return model.reroll.forward(out, i).permute(0, 3, 1, 2)  # not __call__: no hooks (layer listing)
    inner = [block for block in blocks if any(module is m for m in block.modules())]
    if inner or module is getattr(model, "unroll", None):
        raise ErfLabError(f"{type(model).__name__} keeps its tokens unrolled (mask-unit order) up to the end of each "
                          "block: measure a whole block (blocks.i) or forward_features")
    return None


def to_spatial(out: torch.Tensor, model: nn.Module, input_hw: tuple[int, int],
               module: nn.Module | None = None) -> torch.Tensor:
    """``out`` (the output of ``module`` of ``model``, or of ``forward_features`` if None) as (B, C, H, W);
    NCHW maps and anything that is not a 3-D / 4-D tensor are returned unchanged."""
    if not isinstance(out, torch.Tensor):
        return out
    if out.dim() == 4:
        nhwc = channels_last_output(model, module) or getattr(out, _NHWC_TAG, False)
        return out.permute(0, 3, 1, 2) if nhwc else out
    if out.dim() != 3:
        return out
    if module is not None and hasattr(getattr(model, "reroll", None), "schedule"):
        rolled = _rerolled(out, model, module)
        if rolled is not None:
            return rolled
    n = int(out.shape[1])
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    for drop in dict.fromkeys((prefix, 0)):  # with the prefix tokens; without (e.g. the patch_embed output)
        grid = patch_grid(model, n - drop, input_hw) if n > drop else None
        if grid is not None:
            tokens = out[:, drop:, :]
            return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], *grid)
    raise ErfLabError(f"cannot arrange the {n} tokens of {type(model).__name__} ({prefix} prefix tokens) on a patch "
                      f"grid for a {input_hw[0]}x{input_hw[1]} input")
