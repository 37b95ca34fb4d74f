"""Theoretical receptive field from the executed module graph, and the layer listing behind ``--layer``.

Along each axis, a convolution / pooling with kernel k, stride s, dilation d and padding p (before the first
pixel) maps (rf, jump, start) to (rf + (k - 1) * d * jump, jump * s, start + ((k - 1) d / 2 - p) * jump), starting
from (1, 1, 0) at the input (Araujo et al., Distill 2019): ``start`` is the input coordinate (pixel centres at
0, 1, ...) of the centre of unit 0's receptive field, so unit i's is centred at ``start + i * jump`` (RepLKNet's
"same" padding: 32 i; a 4 x 4 stride-4 patchify stem: 4 i + 1.5).
Every torch op is intercepted while the model runs once, so parallel branches (RepLKNet's large- and small-kernel
branches, residual shortcuts) merge by the union of their receptive fields over the op's inputs. Besides
convolutions and poolings, ops that move or regroup the units are followed: ``F.unfold`` / ``Tensor.unfold``,
``F.fold`` (stride 1), pixel unshuffle (or a space to depth by view and permute), ``F.pad``, crops and strided
slices, ``torch.roll`` (exact for the centre unit, whose rolled source lies within half the map). An adaptive
pooling pools bins that depend on its map's size (exact at the probed size only: rows after it are
``size_dependent``); bins of two widths or steps, resamplings, flips, a swap of y and x and a concatenation along a
spatial axis leave the units on no grid of the input, and every layer after them has no theoretical RF (``None``, as
after attention) rather than a wrong one.

Attention has no kernel: a product of two input-dependent tensors (``q @ k^T``, ``attn @ v``,
``scaled_dot_product_attention``) mixes tokens. Where every query attends to every token of the map (a ViT's,
DeiT's, PVT's self-attention: as many keys as a convolution's map at the keys' stride has units), every
input pixel reaches the layers after it: their RF is global, as after a pooling over the whole map (below), and the
kernels still place the tokens (a ViT's patch grid). After attention within windows (Swin, MaxViT) or one whose
keys cannot be told (a product of two tensors not after a softmax) the layers have no theoretical RF in this sense
(``None``): a Swin's patch sees a window that the shifts grow; its tokens keep their places (:func:`_token_grid`).
A Linear over the units of a flattened map (MLP-Mixer's / ResMLP's / gMLP's token mixing over the token axis, a
Linear over a map flattened to (B, C H W)) mixes them all: the RF after it is global, as after a pooling (below).
Token and NHWC outputs are listed as (C, H, W) maps (:func:`erf_lab.erf.tokens.to_spatial`); the stride of a
layer after window attention is read off its map (input side / map side).

A reduction over the whole map (global pooling: squeeze-and-excitation's squeeze; a norm over H and W: GRN;
GroupNorm's statistics, a LayerNorm over (C, H, W)) or a Linear over a flattened map makes every input pixel reach
every later unit: such a layer's theoretical RF is the whole image, "global" (``None``, ``rf_global`` True), whatever
its kernels reach (``kernel_rf``; None after window attention or a resampling, where it is global all the same:
MaxViT's attention after its MBConv's SE); the kernels still place its units (``rf_start``), except in the pooled
values themselves (SE's squeeze: one per channel, no unit grid). Over a 1 x 1 map such a reduction reduces nothing:
``run_erf``'s geometry is probed at a size where every map is larger (``erf_lab.erf.runner._probe_geometry``).
"""
from __future__ import annotations

import contextlib
import difflib
import math

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from erf_lab.erf.tokens import to_spatial, track_layout
from erf_lab.errors import ErfLabError

DEFAULT_LAYER = "forward_features"
_ATTR = "_erf_lab_rf"
# the axis of a flattened map (2-D (B, C H W), 3-D tokens (B, C, H W) or (B, H W, C)) that runs over its units: a
# Linear over it (a flattened map's classifier-style layer, MLP-Mixer's / ResMLP's token mixing) mixes them all
_UNITS_AXIS = "_erf_lab_units_axis"
# a product of two input-dependent tensors (attention's q k^T, attn v: (B, heads, N, d)) or a view of it of the same
# rank (transpose, permute): a 4-D tensor that is no map, so flattening its last axes makes no units axis
_PER_HEAD = "_erf_lab_per_head"
# a map viewed as (N, C, H / by, by, W / bx, bx): the axes of (block row, row in its block, block column, column in
# its block) and (by, bx), followed through permutes to the view back to a map (a space-to-depth: TResNet's)
_BLOCKS = "_erf_lab_blocks"
#: the start of units that lie on no grid of input pixels (after a resampling, a flip, a gather ...): unlike the
#: tokens after window attention, which keep their places (:func:`_token_grid`), they are not placed
_OFF_GRID = (math.nan, math.nan)
_TOKEN_MIXING = ("matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention")
# ops that resample the map: after them the units lie on no integer grid of the input, so the theoretical RF is
# not tracked (None, as after window attention) rather than given wrong (an upsampled map kept its coarse stride and RF)
_RESAMPLING = ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle", "grid_sample",
               "max_unpool2d", "fractional_max_pool2d", "fractional_max_pool2d_with_indices")
_ADAPTIVE_POOLS = ("adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices")
# reductions that, taken over both spatial axes of a map (_reduces_space), give every output all the input's pixels
_REDUCTIONS = ("mean", "sum", "nansum", "nanmean", "norm", "vector_norm", "linalg_vector_norm", "amax", "amin", "max",
               "min", "std", "var", "std_mean", "var_mean", "logsumexp", "prod", "adaptive_avg_pool2d",
               "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices")
_MAP_STATISTICS = ("group_norm", "instance_norm")  # normalizations by a mean and variance over an NCHW map's H x W


def _normalizes_by_map(name: str, src, args=(), kwargs=None) -> bool:
    """Whether op ``name`` normalized the 4-D map ``src`` by statistics over its whole H x W: GroupNorm, InstanceNorm
    (NCHW), a LayerNorm over its last three axes ((C, H, W) of an NCHW map, (H, W, C) of an NHWC one)."""
    if not isinstance(src, torch.Tensor) or src.dim() != 4:
        return False
    if name in _MAP_STATISTICS:
        return src.shape[2] > 1 and src.shape[3] > 1
    if name != "layer_norm":
        return False
    shape = args[1] if len(args) > 1 else (kwargs or {}).get("normalized_shape", ())
    axes = 1 if isinstance(shape, int) else len(tuple(shape))
    return axes >= 3 and ((src.shape[2] > 1 and src.shape[3] > 1) or (src.shape[1] > 1 and src.shape[2] > 1))


def _reduces_space(name: str, src, out) -> bool:
    """Whether op ``name`` reduced the 4-D map ``src`` (NCHW or NHWC) over both spatial axes into ``out`` (one value
    per image and channel, size-1 axes aside): a global pooling or a norm over the map, not a per-pixel op."""
    out = out[0] if isinstance(out, (tuple, list)) and out else out
    if name not in _REDUCTIONS or not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) \
            or src.dim() != 4:
        return False
    b = src.shape[0]
    # both sides over 1: a (B, C, 1, 1) map read as NHWC would take a sum over its channels for a spatial one
    for c, (h, w) in ((src.shape[1], src.shape[2:]), (src.shape[3], src.shape[1:3])):  # NCHW, NHWC
        one_per_channel = [d for d in (b, c) if d != 1]
        if h > 1 and w > 1 and out.numel() == b * c and [d for d in out.shape if d != 1] == one_per_channel:
            return True
    return False


def _adaptive_bins(n: int, m: int) -> tuple[int, int] | None:
    """(kernel, stride) of an adaptive pooling from ``n`` to ``m`` units along one axis (unit i pools input units
    floor(i n / m) .. ceil((i + 1) n / m) - 1: bins of ceil(n / m) or more, overlapping where m does not divide n),
    where its bins are one kernel on a grid; None where their widths or steps differ."""
    starts = [i * n // m for i in range(m)]
    widths = {-(-(i + 1) * n // m) - starts[i] for i in range(m)}
    steps = {b - a for a, b in zip(starts, starts[1:])}
    if len(widths) != 1 or len(steps) > 1:
        return None
    width = widths.pop()
    return width, steps.pop() if steps else width


def _resampled_jump(jump, src, out) -> tuple:
    """The map's step in input pixels after a resampling of ``src`` into ``out``: scaled by their sides' ratio."""
    out = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and out.dim() == src.dim() == 4 \
            and min(out.shape[-2:]) > 0:
        return tuple(jump[a] * src.shape[2 + a] / out.shape[2 + a] for a in range(2))
    return jump


def _spatial_dims(t: torch.Tensor) -> tuple[int, int]:
    """The (y, x) axes of a map: (1, 2) where :func:`erf_lab.erf.tokens.track_layout` tagged it NHWC, else (2, 3)."""
    return (1, 2) if getattr(t, "_erf_lab_nhwc", False) else (2, 3)


def _sliced(src: torch.Tensor, index, start, jump):
    """(start, jump) of the map ``src[index]``: a slice of a spatial axis moves unit 0 to its first unit (a crop,
    U-Net's skip connections) and multiplies the step by its own; None where a spatial axis is indexed by a tensor
    or list (a gather: no grid); unchanged where ``index`` inserts axes (None)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in index):
        return start, jump
    if any(i is Ellipsis for i in index):
        k = next(n for n, i in enumerate(index) if i is Ellipsis)
        index = index[:k] + (slice(None),) * (src.dim() - len(index) + 1) + index[k + 1:]
    start, jump = list(start), list(jump)
    for a, dim in enumerate(_spatial_dims(src)):
        if dim < len(index) and isinstance(index[dim], (torch.Tensor, list, tuple, bool)):
            return None
        if dim < len(index) and isinstance(index[dim], slice):
            first, _, step = index[dim].indices(src.shape[dim])
            start[a] += first * jump[a]
            jump[a] *= step
    return tuple(start), tuple(jump)


def _breaks_grid(name: str, src, args, kwargs) -> bool:
    """Whether op ``name`` leaves its map's units on no grid of the input: a flip of a spatial axis (its step turns
    negative), a swap of y and x (the map's y runs along the input's x), a concatenation along a spatial axis (two
    grids side by side)."""
    if name in ("flip", "fliplr", "flipud") and isinstance(src, torch.Tensor) and src.dim() == 4:
        dims = {"fliplr": [1], "flipud": [0]}.get(name) or (args[1] if len(args) > 1 else kwargs.get("dims", ()))
        dims = dims if isinstance(dims, (tuple, list)) else [dims]
        return bool({int(d) % 4 for d in dims} & set(_spatial_dims(src)))
    if name in ("transpose", "swapaxes", "swapdims") and isinstance(src, torch.Tensor) and src.dim() == 4:
        return len(args) > 2 and {int(args[1]) % 4, int(args[2]) % 4} == set(_spatial_dims(src))
    if name == "permute" and isinstance(src, torch.Tensor) and src.dim() == 4:
        # only the swap that keeps the layout: a function's permute to or from NHWC may leave a map untagged
        return _permutation(args, kwargs, 4) == ([0, 2, 1, 3] if _spatial_dims(src) == (1, 2) else [0, 1, 3, 2])
    if name in ("cat", "concat", "concatenate") and isinstance(src, (tuple, list)) and src \
            and isinstance(src[0], torch.Tensor) and src[0].dim() == 4:
        dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % 4
        return dim in _spatial_dims(src[0]) and sum(isinstance(t, torch.Tensor) and t.numel() > 0 for t in src) > 1
    return False


def _permutation(args, kwargs, ndim: int) -> list[int]:
    """The dims of a ``permute`` call (``x.permute(0, 2, 1)``, ``x.permute((0, 2, 1))``, ``torch.permute(x,
    dims=...)``), each in [0, ndim)."""
    dims = args[1:] if len(args) > 2 else args[1] if len(args) > 1 else kwargs.get("dims", ())
    return [int(d) % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]


def _units_axis(name: str, args, kwargs, out) -> int | None:
    """The axis of ``out`` that runs over a map's units (see ``_UNITS_AXIS``): made by flattening a map's spatial
    axes (``flatten``, ``reshape``, ``view``), moved by ``transpose`` / ``permute``, kept by ops that keep the shape
    (a norm, an activation, a residual sum) and by a Linear over another axis; None otherwise."""
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
        return None
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if src is None:
        return None
    if src.dim() == 4 and name in ("flatten", "reshape", "view"):
        if getattr(src, _PER_HEAD, False):  # (B, N, heads, d) -> (B, N, C): a Linear over C mixes channels
            return None
        y, x = _spatial_dims(src)
        units = src.shape[y] * src.shape[x]
        if units <= 1:
            return None
        if out.dim() == 2 and out.shape[0] == src.shape[0]:
            return 1  # (B, C H W): units and channels in one axis
        if (y, x) == (2, 3) and tuple(out.shape) == (src.shape[0], src.shape[1], units):
            return 2  # NCHW.flatten(2)
        if (y, x) == (1, 2) and tuple(out.shape) == (src.shape[0], units, src.shape[3]):
            return 1  # NHWC.flatten(1, 2)
        return None
    axis = next((getattr(a, _UNITS_AXIS) for a in args if isinstance(a, torch.Tensor) and hasattr(a, _UNITS_AXIS)),
                None)
    if axis is None or out.dim() != src.dim():
        return None
    if name in ("transpose", "swapaxes", "swapdims") and len(args) > 2:
        d0, d1 = int(args[1]) % src.dim(), int(args[2]) % src.dim()
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if name == "permute":
        return _permutation(args, kwargs, src.dim()).index(axis)
    if out.shape == src.shape or (name == "linear" and axis != src.dim() - 1):
        return axis
    return None


def _blocks(name: str, args, kwargs, out):
    """``out``'s ``_BLOCKS``: made by viewing an NCHW map as (N, C, H / by, by, W / bx, bx), moved by ``permute`` /
    ``transpose``, kept by ops that keep the shape (``contiguous``); None otherwise."""
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if src is None or not isinstance(out, torch.Tensor):
        return None
    if src.dim() == 4 and out.dim() == 6 and name in ("view", "reshape") and _spatial_dims(src) == (2, 3):
        n, c, h, w = src.shape
        if tuple(out.shape[:2]) == (n, c) and out.shape[2] * out.shape[3] == h and out.shape[4] * out.shape[5] == w:
            return (2, 3, 4, 5), (int(out.shape[3]), int(out.shape[5]))
        return None
    held = getattr(src, _BLOCKS, None)
    if held is None or out.dim() != src.dim():
        return None
    axes, sizes = held
    if name == "permute":
        dims = _permutation(args, kwargs, src.dim())
        return tuple(dims.index(a) for a in axes), sizes
    if name in ("transpose", "swapaxes", "swapdims") and len(args) > 2:
        d0, d1 = int(args[1]) % src.dim(), int(args[2]) % src.dim()
        return tuple(d1 if a == d0 else d0 if a == d1 else a for a in axes), sizes
    return held if out.shape == src.shape else None


def _unblocked(src: torch.Tensor, out: torch.Tensor):
    """How the view of a blocked map ``src`` (``_BLOCKS``) back into the map ``out`` regroups its units: "same"
    (the blocks joined again), "depth" (the blocks' pixels moved to the channels: a space to depth of (by, bx)) or
    None (any other regrouping: no grid)."""
    (by_, y, bx_, x), _ = getattr(src, _BLOCKS)
    d = src.dim()
    if (by_, y, bx_, x) == (d - 4, d - 3, d - 2, d - 1) and tuple(out.shape[-2:]) == (
            src.shape[by_] * src.shape[y], src.shape[bx_] * src.shape[x]):
        return "same"
    if (by_, bx_) == (d - 2, d - 1) and tuple(out.shape[-2:]) == (src.shape[by_], src.shape[bx_]):
        return "depth"
    return None


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _padding(padding, kernel, dilation) -> tuple[int, int]:
    """Zeros before the first pixel per axis: an int / pair, or F.conv2d's "valid" (0) / "same" (PyTorch puts
    the smaller half of d (k - 1) first)."""
    if isinstance(padding, str):
        return (0, 0) if padding == "valid" else tuple(dilation[a] * (kernel[a] - 1) // 2 for a in range(2))
    return _pair(padding)


def _start(start, jump, kernel, dilation, padding) -> tuple[float, float]:
    """The input coordinate of the centre of output unit 0's receptive field (see the module docstring)."""
    return tuple(start[a] + ((kernel[a] - 1) * dilation[a] / 2 - padding[a]) * jump[a] for a in range(2))


def _infos(obj, out):
    if isinstance(obj, torch.Tensor):
        info = getattr(obj, _ATTR, None)
        if info is not None:
            out.append(info)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _infos(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _infos(o, out)
    return out


def _tag(obj, info):
    if isinstance(obj, torch.Tensor):
        try:
            setattr(obj, _ATTR, info)
        except Exception:  # some tensor subclasses refuse attributes
            pass
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tag(o, info)


class _RFMode(TorchFunctionMode):
    """Propagates ((rf_h, rf_w), (jump_h, jump_w), (start_h, start_w), global, pooled) through every torch op
    (global: the value depends on every input pixel through a reduction over a whole map, :func:`_reduces_space`,
    or a Linear over a flattened map, or an attention over every token of the map; pooled: it is such a reduction's
    values, or made of them alone: no grid of units). ``size_dependent``: an op ran whose geometry depends on its
    map's size (an adaptive pooling to more than one unit), so what follows it holds at this input size only.
    ``input_hw``: the probe input's (H, W), for the number of units a map has at a stride."""

    size_dependent = False

    def __init__(self, input_hw: tuple[int, int] | None = None):
        super().__init__()
        self.input_hw = input_hw
        self.units: dict[tuple, int] = {}  # stride (y, x) -> the most units of a convolution's map at that stride

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        infos = _infos(args, []) + _infos(kwargs, [])
        if not infos:
            return out
        jump = (max(i[1][0] for i in infos), max(i[1][1] for i in infos))
        # branches merged by an op: unit 0 sees the union of their intervals (the same where they are aligned, as
        # same-padded branches are; a shift by torch.roll or a one-sided F.pad in one branch widens it); a branch off
        # any grid (its start NaN: after a resampling) leaves the merged units off it too
        lo = tuple(min(i[2][a] - (i[0][a] - 1) / 2 if math.isfinite(i[2][a]) else -math.inf for i in infos)
                   for a in range(2))
        hi = tuple(max(i[2][a] + (i[0][a] - 1) / 2 if math.isfinite(i[2][a]) else math.inf for i in infos)
                   for a in range(2))
        rf = tuple(hi[a] - lo[a] + 1 for a in range(2))
        start = tuple((lo[a] + hi[a]) / 2 if math.isfinite(rf[a]) else
                      math.nan if any(math.isnan(i[2][a]) for i in infos) else infos[0][2][a] for a in range(2))
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        pooled = _reduces_space(name, src, out)
        whole = pooled or any(i[3] for i in infos) or _normalizes_by_map(name, src, args, kwargs)
        pooled = pooled or all(i[4] for i in infos)
        kernel = stride = dilation = None
        if name in _TOKEN_MIXING and len(infos) >= 2:
            query = getattr(args[0], _ATTR, None) if args and isinstance(args[0], torch.Tensor) else None
            if query is not None:  # one output row per query (q @ k^T, attn @ v): the queries' grid, not the keys'
                jump, start = query[1], query[2]  # (PVT's keys come from a strided conv: their stride is larger)
            keys = self._keys(name, args, kwargs)
            if keys is not None and self._whole_map(*keys):
                whole = True  # every query saw every token: the kernels' RF (v's, keys') and placement stay
                rf = tuple(max((i[0][a] for i in infos if math.isfinite(i[0][a])), default=math.inf)
                           for a in range(2))
            else:
                rf = (math.inf, math.inf)
        elif name == "softmax" and isinstance(out, torch.Tensor) and out.dim() >= 2 and self._last_dim(
                out, args[1] if len(args) > 1 else kwargs.get("dim")):
            _mark_attention(out)
        elif name in _RESAMPLING or (name == "conv_transpose2d" and _pair(
                args[3] if len(args) > 3 else kwargs.get("stride", 1)) != (1, 1)):
            rf, jump = (math.inf, math.inf), _resampled_jump(jump, src, out)
            start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
        elif name in _ADAPTIVE_POOLS and not pooled and isinstance(src, torch.Tensor) and src.dim() == 4:
            # its bins depend on the map's size: exact at this input size only (list_layers' "size_dependent"); a
            # 1 x 1 map's are itself
            self.size_dependent = self.size_dependent or src.shape[2] * src.shape[3] > 1
            sized = out[0] if isinstance(out, (tuple, list)) else out
            bins = [_adaptive_bins(src.shape[2 + a], sized.shape[2 + a]) for a in range(2)]
            if None in bins:  # bins of two widths or steps: the units lie on no grid of the input
                rf, jump = (math.inf, math.inf), _resampled_jump(jump, src, out)
                start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
            else:
                kernel, stride = tuple(b[0] for b in bins), tuple(b[1] for b in bins)
                dilation, padding = (1, 1), (0, 0)
        elif name in ("conv2d", "conv_transpose2d") and len(args) >= 2:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            kernel = tuple(weight.shape[-2:])
            stride = _pair(args[3] if len(args) > 3 else kwargs.get("stride", 1))
            if name == "conv2d":
                dilation = _pair(args[5] if len(args) > 5 else kwargs.get("dilation", 1))
                padding = _padding(args[4] if len(args) > 4 else kwargs.get("padding", 0), kernel, dilation)
            else:  # (input, weight, bias, stride, padding, output_padding, groups, dilation), stride 1 here: the
                # convolution with the flipped kernel and padding d (k - 1) - p
                dilation = _pair(args[7] if len(args) > 7 else kwargs.get("dilation", 1))
                p = _pair(args[4] if len(args) > 4 else kwargs.get("padding", 0))
                padding = tuple(dilation[a] * (kernel[a] - 1) - p[a] for a in range(2))
        elif name == "lp_pool2d":  # (input, norm_type, kernel_size, stride, ceil_mode)
            kernel = _pair(args[2] if len(args) > 2 else kwargs["kernel_size"])
            s = args[3] if len(args) > 3 else kwargs.get("stride")
            stride, dilation, padding = _pair(s) if s not in (None, [], ()) else kernel, (1, 1), (0, 0)
        elif name == "pixel_unshuffle":  # space to depth: an r x r kernel of stride r
            r = int(args[1] if len(args) > 1 else kwargs["downscale_factor"])
            kernel = stride = (r, r)
            dilation, padding = (1, 1), (0, 0)
        elif func is torch.nn.functional.unfold:  # im2col: (input, kernel_size, dilation, padding, stride)
            kernel = _pair(args[1] if len(args) > 1 else kwargs["kernel_size"])
            dilation = _pair(args[2] if len(args) > 2 else kwargs.get("dilation", 1))
            padding = _pair(args[3] if len(args) > 3 else kwargs.get("padding", 0))
            stride = _pair(args[4] if len(args) > 4 else kwargs.get("stride", 1))
        elif func is torch.nn.functional.fold:  # col2im: (input, output_size, kernel_size, dilation, padding, stride)
            kernel = _pair(args[2] if len(args) > 2 else kwargs["kernel_size"])
            dilation = _pair(args[3] if len(args) > 3 else kwargs.get("dilation", 1))
            p = _pair(args[4] if len(args) > 4 else kwargs.get("padding", 0))
            stride = _pair(args[5] if len(args) > 5 else kwargs.get("stride", 1))
            if stride != (1, 1):  # overlap-add of strided windows: a strided transposed conv, no grid
                rf, jump, kernel = (math.inf, math.inf), tuple(jump[a] / stride[a] for a in range(2)), None
                start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
            else:  # overlap-add of the windows: a stride-1 transposed conv
                padding = tuple(dilation[a] * (kernel[a] - 1) - p[a] for a in range(2))
        elif name == "unfold" and isinstance(src, torch.Tensor) and src.dim() >= 4:  # Tensor.unfold(dim, size, step)
            axis = _spatial_dims(src).index(int(args[1]) % src.dim()) if int(args[1]) % src.dim() in \
                _spatial_dims(src) else None
            if axis is not None:  # sliding windows along y or x: a kernel of ``size`` and stride ``step``
                size, step = int(args[2]), int(args[3])
                kernel = tuple(size if a == axis else 1 for a in range(2))
                stride = tuple(step if a == axis else 1 for a in range(2))
                dilation, padding = (1, 1), (0, 0)
        elif name == "roll" and isinstance(src, torch.Tensor) and src.dim() == 4:  # (input, shifts, dims)
            shifts = args[1] if len(args) > 1 else kwargs["shifts"]
            dims = args[2] if len(args) > 2 else kwargs.get("dims")
            if dims is None or (isinstance(dims, (tuple, list)) and not dims):
                rf = (math.inf, math.inf)  # rolled flattened: the units lie on no grid
                start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
            else:
                shifts = [int(v) for v in (shifts if isinstance(shifts, (tuple, list)) else [shifts])]
                dims = [int(v) % 4 for v in (dims if isinstance(dims, (tuple, list)) else [dims])]
                start = list(start)
                for shift, dim in zip(shifts, dims):
                    if dim in _spatial_dims(src):
                        a, n = _spatial_dims(src).index(dim), src.shape[dim]
                        shift %= n  # unit i comes from unit i - shift; taken in (-n/2, n/2] the centre's is exact
                        start[a] -= (shift - n if shift > n / 2 else shift) * jump[a]
                start = tuple(start)
        elif name == "__getitem__" and isinstance(src, torch.Tensor) and src.dim() == 4 and len(args) > 1:
            sliced = _sliced(src, args[1], start, jump)
            if sliced is None:
                rf = (math.inf, math.inf)
                start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
            else:
                start, jump = sliced
        elif name == "narrow" and isinstance(src, torch.Tensor) and src.dim() == 4:  # (input, dim, start, length)
            start, jump = _sliced(src, (slice(None),) * (int(args[1]) % 4) + (slice(int(args[2]), None),), start,
                                  jump)
        elif _breaks_grid(name, src, args, kwargs):
            rf = (math.inf, math.inf)
            start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
        elif name in ("view", "reshape") and isinstance(src, torch.Tensor) and hasattr(src, _BLOCKS) \
                and isinstance(out, torch.Tensor) and out.dim() == 4:
            regrouped = _unblocked(src, out)
            if regrouped == "depth":  # each unit gathers one by x bx block: that kernel, of that stride
                kernel = stride = getattr(src, _BLOCKS)[1]
                dilation, padding = (1, 1), (0, 0)
            elif regrouped is None:
                rf = (math.inf, math.inf)
                start = _OFF_GRID  # no unit centred on a pixel grid (unlike window attention's tokens)
        elif name == "linear" and isinstance(src, torch.Tensor) and getattr(src, _UNITS_AXIS, None) == src.dim() - 1:
            whole = True  # a Linear over a flattened map's units: every output depends on every pixel
        elif "pool2d" in name and "adaptive" not in name:
            kernel = _pair(args[1] if len(args) > 1 else kwargs["kernel_size"])
            s = args[2] if len(args) > 2 else kwargs.get("stride")
            stride = _pair(s) if s not in (None, [], ()) else kernel
            dilation = _pair(args[4] if len(args) > 4 and "max" in name else kwargs.get("dilation", 1))
            padding = _pair(args[3] if len(args) > 3 else kwargs.get("padding", 0))
        elif name == "pad" and isinstance(src, torch.Tensor) and src.dim() == 4 and len(args) > 1:
            # F.pad: (before, after) pairs from the last axis back: an NCHW map's x, y; an NHWC one's C, x, y
            pad = [int(p) for p in args[1]] + [0] * 8
            start = tuple(start[a] - pad[2 * (3 - dim)] * jump[a] for a, dim in enumerate(_spatial_dims(src)))
        if kernel is not None:
            start = _start(start, jump, kernel, dilation, padding)
            rf = tuple(rf[a] + (kernel[a] - 1) * dilation[a] * jump[a] for a in range(2))
            jump = tuple(jump[a] * stride[a] for a in range(2))
            if name == "conv2d" and isinstance(out, torch.Tensor) and out.dim() == 4:
                self.units[jump] = max(self.units.get(jump, 0), int(out.shape[-2]) * int(out.shape[-1]))
        if isinstance(out, torch.Tensor) and args and getattr(args[0], _ATTENTION, False) \
                and name not in _TOKEN_MIXING and out.shape == args[0].shape:
            _mark_attention(out)  # attention weights through a dropout, a mask, a copy
        if isinstance(out, torch.Tensor) and ((name in _TOKEN_MIXING and len(infos) >= 2) or (
                args and getattr(args[0], _PER_HEAD, False) and out.dim() == args[0].dim())):
            with contextlib.suppress(Exception):  # some tensor subclasses refuse attributes
                setattr(out, _PER_HEAD, True)
        _tag(out, (rf, jump, start, whole, pooled))
        for attr, value in ((_UNITS_AXIS, None if pooled else _units_axis(name, args, kwargs, out)),
                            (_BLOCKS, _blocks(name, args, kwargs, out))):
            if value is not None:
                with contextlib.suppress(Exception):  # some tensor subclasses refuse attributes
                    setattr(out, attr, value)
        return out

    @staticmethod
    def _last_dim(t: torch.Tensor, dim) -> bool:
        return isinstance(dim, int) and dim % t.dim() == t.dim() - 1

    @staticmethod
    def _keys(name: str, args, kwargs) -> tuple[int, tuple] | None:
        """(number of keys each query attends to, the keys' (rf, jump, ...) info) of an attention op, or None where
        the op is no attention over a known key axis: ``scaled_dot_product_attention(q, k, v)`` (k's tokens) or a
        product ``attn @ v`` of softmax weights over their last axis (v's tokens); ``q @ k^T`` is not (its
        contracted axis holds channels)."""
        if name == "scaled_dot_product_attention":
            key = args[1] if len(args) > 1 else kwargs.get("key")
            if isinstance(key, torch.Tensor) and key.dim() >= 2 and getattr(key, _ATTR, None) is not None:
                return int(key.shape[-2]), getattr(key, _ATTR)
        elif len(args) >= 2 and isinstance(args[0], torch.Tensor) and getattr(args[0], _ATTENTION, False):
            value = args[-1]
            info = getattr(value, _ATTR, None) if isinstance(value, torch.Tensor) else None
            if info is not None:
                return int(args[0].shape[-1]), info
        return None

    def _whole_map(self, n_keys: int, info: tuple) -> bool:
        """Whether ``n_keys`` keys cover every unit of the whole map at the keys' stride (class / register tokens
        aside: there may be more): as many as the largest map a convolution made at that stride (a ViT's patch
        embedding), else ceil(H / stride_y) x ceil(W / stride_x). A Swin's window never covers its patch embedding's
        map: its patch merging reshapes, no kernel doubles the stride."""
        jump = tuple(info[1])
        units = self.units.get(jump)
        if units is None:
            if self.input_hw is None or not all(math.isfinite(j) and j >= 1 for j in jump):
                return False
            units = math.prod(math.ceil(side / step) for side, step in zip(self.input_hw, jump))
        return n_keys >= units


_ATTENTION = "_erf_lab_attention"  # a tensor of attention weights: a softmax over its last axis (keys)


def _mark_attention(t: torch.Tensor) -> None:
    try:
        setattr(t, _ATTENTION, True)
    except Exception:  # some tensor subclasses refuse attributes
        pass


def _module_hook(module, inp, out):
    """Set the output's (rf, jump) from the module's own geometry: exact whatever kernel implementation the
    module uses (e.g. fastconv's custom kernels, which the op interceptor may not see as a convolution)."""
    info = getattr(inp[0], _ATTR, None) if inp and isinstance(inp[0], torch.Tensor) else None
    if info is None or not isinstance(out, torch.Tensor):
        return
    if isinstance(module, nn.Conv2d):
        k, s, d = module.kernel_size, module.stride, module.dilation
        p = _padding(module.padding, k, d)
    else:
        k = _pair(module.kernel_size)
        s = _pair(module.stride if module.stride is not None else module.kernel_size)
        d = _pair(getattr(module, "dilation", 1))
        p = _pair(module.padding)
    rf = tuple(info[0][a] + (k[a] - 1) * d[a] * info[1][a] for a in range(2))
    jump = tuple(info[1][a] * s[a] for a in range(2))
    seen = getattr(out, _ATTR, None)
    if seen is not None and tuple(seen[0]) == rf and tuple(seen[1]) == jump:
        # the interceptor saw this very kernel, and with it any padding done inside the module's forward (TF
        # 'SAME': an F.pad before a padding-0 conv), which the module's own ``padding`` does not show
        return
    _tag(out, (rf, jump, _start(info[2], info[1], k, d, p), info[3], info[4]))


class _FirstConv(Exception):
    """Raised by a forward pre-hook on the first convolution a forward calls (its input channels found)."""


def input_channels(model: nn.Module) -> int:
    """The number of input channels ``model`` takes: its ``in_chans`` (timm's convention), else the ``in_channels``
    of the first convolution (a grayscale model: 1, RGBA: 4), else 3. Where the first one registered does not take
    3, the first one the forward calls decides (a model may register its head before its stem): a forward of a
    3-channel input, stopped before that convolution runs, without gradients."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int) and not isinstance(chans, bool) and chans > 0:
        return chans
    convs = [mod for mod in model.modules() if isinstance(mod, nn.Conv2d)]
    if not convs or convs[0].in_channels == 3:
        return 3
    found: list[int] = []

    def first(module, inputs):
        found.append(module.in_channels)
        raise _FirstConv

    handles = [c.register_forward_pre_hook(first) for c in convs]
    try:
        with torch.no_grad():
            model(_probe_input(model, 3, 32))
    except Exception:  # _FirstConv; or the forward failed before any convolution ran: the registered order decides
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else convs[0].in_channels


def _probe_input(model: nn.Module, channels: int, size: int) -> torch.Tensor:
    """A (1, channels, size, size) zero input in the model's dtype and on its device (float32 on the CPU without
    floating parameters or buffers)."""
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    return torch.zeros(1, channels, size, size, dtype=None if ref is None else ref.dtype,
                       device=None if ref is None else ref.device)


def _features_fn(model: nn.Module):
    return model.forward_features if hasattr(model, "forward_features") else model


def _token_grid(info, t: torch.Tensor, input_size: int) -> tuple[tuple, tuple] | None:
    """(rf_start, stride_hw) of the units of map ``t`` after window attention: the tokens keep their places (window
    partition and reverse, a Swin's shift and its reverse are permutations), on the kernels' grid, or on a k times
    coarser one where a reshape merged k x k neighbouring tokens into one unit (a Swin's patch merging, which no
    kernel tracks), centred on them; None where the map's stride (input side / map side) is no whole multiple of
    the kernels'."""
    if t.dim() != 4:
        return None
    start, jump = [], []
    for a in range(2):
        side = int(t.shape[2 + a])
        if side < 1 or input_size % side or not math.isfinite(info[1][a]) or info[1][a] < 1:
            return None
        k = input_size // side / info[1][a]
        if k < 1 or k != int(k):
            return None
        start.append(info[2][a] + info[1][a] * (k - 1) / 2)
        jump.append(input_size // side)
    return tuple(start), tuple(jump)


def _row(name: str, t: torch.Tensor, input_size: int, size_dependent: bool = False) -> dict:
    info = getattr(t, _ATTR, None)
    rf = max(info[0]) if info else None
    stride = int(max(info[1])) if info else None
    grid = (info[2], info[1]) if info else None  # (rf_start, stride_hw)
    if rf is not None and math.isinf(rf):  # after window attention, resampling: no kernel RF; stride from the map
        rf = None
        if t.dim() == 4 and min(t.shape[-2:]) > 0:
            stride = max(stride, input_size // max(t.shape[-2:]), 1)
        grid = _token_grid(info, t, input_size)
    # pooled values (SE's squeeze) lie on no grid of units, nor do the units after a resampling (start NaN)
    placed = bool(info) and grid is not None and not info[4] and all(math.isfinite(v) for v in grid[0])
    start = [float(v) for v in grid[0]] if placed else None
    stride_hw = [int(v) for v in grid[1]] if placed else None
    # every pixel reaches it (also where the kernels' RF is untracked: an SE after window attention, a ViTDet's
    # global block after windowed ones); the kernels still place its units
    whole = bool(info and info[3])
    return {"name": name, "shape": list(t.shape[1:]), "theoretical_rf": None if rf is None or whole else int(rf),
            "stride": stride, "rf_start": start, "stride_hw": stride_hw, "rf_global": whole,
            "kernel_rf": None if rf is None else int(rf), "size_dependent": bool(size_dependent)}


def list_layers(model: nn.Module, input_size: int = 224, *, include_all: bool = False) -> list[dict]:
    """Every module that runs on a (1, C, S, S) input (C: :func:`input_channels`) with a spatial output (token and
    NHWC outputs arranged as
    (C, H, W)): ``name``, output ``shape`` (C, H, W), ``theoretical_rf`` (pixels, max of both axes; None after
    window attention and where ``rf_global``: after a reduction or attention over a whole map, every pixel reaches
    the layer, whatever follows), ``kernel_rf`` (the RF of the kernels alone; None after window attention or a
    resampling), total ``stride`` (max of
    both axes), ``rf_start`` and ``stride_hw`` (per axis, y then x; None after a resampling or another op that
    leaves no grid, and for pooled values, SE's squeeze: unit (i, j) is centred at ``rf_start + stride_hw * (i,
    j)``), ``size_dependent`` (it runs after an op whose geometry depends on its map's size, an adaptive pooling to
    more than one unit: exact at ``input_size`` only), in execution order; the default layer ``forward_features``
    comes last.
    ``include_all`` also lists modules with other outputs."""
    m = model
    rows: dict[str, dict] = {}
    hooks: list = []
    training = {mod: mod.training for mod in m.modules()}
    undo = contextlib.ExitStack()  # whatever fails, the model is left as it came: no hooks, its train/eval modes
    undo.callback(lambda: [setattr(mod, "training", flag) for mod, flag in training.items()])
    undo.enter_context(track_layout(m))  # first: the listing hooks below read its NHWC tags
    undo.callback(lambda: [h.remove() for h in hooks])
    with undo:
        hooks += [mod.register_forward_hook(_module_hook) for mod in m.modules()
                  if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
        m.eval()  # never update BN statistics while probing

        def make_hook(name):
            def hook(module, inp, out):
                t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
                if not isinstance(t, torch.Tensor) or name in rows:
                    return
                heads = _heads(name, module, t)
                t = _spatial_or_none(t, module)
                if t is not None and (include_all or (t.dim() == 4 and t.shape[0] == 1 and not heads)):
                    rows[name] = _row(name, t, input_size, mode.size_dependent)
            return hook

        def _heads(name, module, t):
            """A ViT's 4-D output past its patch embedding that no conv made: per-head (B, heads, N, d)
            attention."""
            return (hasattr(m, "num_prefix_tokens") and t.dim() == 4 and not name.startswith("patch_embed")
                    and not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)))

        def _spatial_or_none(t, module):
            if t.dim() not in (3, 4):
                return t
            try:
                return to_spatial(t, m, (int(input_size), int(input_size)), module)
            except ErfLabError:  # tokens that form no patch grid (e.g. attention logits)
                return t if include_all else None

        for name, module in m.named_modules():
            if name:
                hooks.append(module.register_forward_hook(make_hook(name)))
        x = _probe_input(m, input_channels(m), int(input_size))
        mode = _RFMode((int(input_size), int(input_size)))
        setattr(x, _ATTR, ((1, 1), (1, 1), (0.0, 0.0), False, False))
        try:
            with torch.no_grad(), mode:
                feats = _features_fn(m)(x)
                feats = _spatial_or_none(feats, None) if isinstance(feats, torch.Tensor) else feats
        except (RuntimeError, AssertionError) as e:  # timm's fixed-size patch embeddings assert the input size
            hint = ("; a timm ViT / Swin takes other sizes with --override img_size=N or dynamic_img_size=True"
                    if isinstance(e, AssertionError) else "")
            if isinstance(e, AssertionError) and "divisible by patch size" in str(e):  # dynamic_img_size=True already
                hint = "; a timm ViT pads it to whole patches with --override dynamic_img_pad=True"
            raise ErfLabError(f"input size {input_size} does not fit {type(model).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}") from None
    out = list(rows.values())
    if isinstance(feats, torch.Tensor) and (include_all or feats.dim() == 4):  # logits only: no map to measure
        out.append(_row(DEFAULT_LAYER, feats, input_size, mode.size_dependent))
    return out


def theoretical_rf(model: nn.Module, layer: str | None = None, input_size: int = 64) -> int:
    """Theoretical receptive field (pixels, larger axis) of ``layer`` (default: ``forward_features``)."""
    name = layer or DEFAULT_LAYER
    rows = list_layers(model, input_size, include_all=True)
    for r in rows:
        if r["name"] == name:
            if r.get("rf_global"):
                from erf_lab.erf.metrics import GLOBAL_RF_REASON, kernels_alone

                raise ErfLabError(f"layer {name!r} has a global theoretical receptive field: {GLOBAL_RF_REASON}"
                                  f"{kernels_alone(r)}")
            if r["theoretical_rf"] is None:
                raise ErfLabError(f"layer {name!r} has no theoretical receptive field from kernels (it follows "
                                  "window attention or a resampling, after which its units lie on no grid of input "
                                  "pixels, or does not depend spatially on the input)")
            return r["theoretical_rf"]
    resolve_layer(model, name)  # raises with close names if unknown
    raise ErfLabError(f"layer {name!r} does not run in the forward pass at input size {input_size}")


def resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module | None]:
    """``(name, module)``; ``None``/``forward_features`` gives ``(forward_features, None)``.

    An unknown name raises ``ErfLabError`` listing the closest module names."""
    if layer in (None, "", DEFAULT_LAYER):
        return DEFAULT_LAYER, None
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return layer, modules[layer]
    names = [n for n in modules if n] + [DEFAULT_LAYER]
    lowered = {n.lower(): n for n in reversed(names)}  # 'Stages.3', 'FORWARD_FEATURES': their names, first
    close = [lowered[n] for n in difflib.get_close_matches(layer.strip().lower(), list(lowered), n=5, cutoff=0.5)]
    if not close:
        close = [n for n in names if n.startswith(layer.split(".")[0])][:5]
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ErfLabError(f"unknown layer {layer!r}{hint} (run 'erf-lab layers --model ...' for the list)")


def train_form_only(deployed: nn.Module, layer: str) -> str:
    """The error line for a layer of the train-time form that re-parameterization folded away (RepLKNet's
    ``large_kernel.small_conv``, a ConvBN's ``.bn``): it names the deploy-form module that now holds it."""
    parts = layer.split(".")
    modules = dict(deployed.named_modules())
    holder = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules),
                  None)
    into = f" (it is folded into {holder!r})" if holder else ""
    return (f"layer {layer!r} exists only in the train-time form: structural re-parameterization removes it"
            f"{into}; pass --no-reparam to measure it, or pick a name from 'erf-lab layers --model ...'")
