"""``depthwise_conv2d``, the public op: checks the call once per signature, asks the dispatcher which backend runs
(``fastconv.settings()`` unless the call names one) and runs it."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function

from fastconv.backends import (FLOPS_COUNTED_BY_CALLER, any_autocast_enabled, autocast_inputs, check_inputs,
                               dispatches_in_python, mode_needing_stock_op, native_conv, run_backend,
                               under_vmap_or_functionalize)
from fastconv.compiled import compiled_call
from fastconv import dispatch
from fastconv.dispatch import _fast_key, resolve

# bound once: on the fast path each lookup of a name in ``torch`` costs, and the path runs cold between layers
_is_compiling, _transforms_active = torch.compiler.is_compiling, torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state  # not None inside torch.jit.trace (and the ONNX exporter's tracing)
_Proxy = torch.fx.Proxy
#: a TorchDispatchMode is active (FakeTensorMode, FlopCounterMode, a profiler's) when this is > 0
_dispatch_modes = torch._C._len_torch_dispatch_stack
#: the types of tensors that take the fast path (any other is a subclass: ``_has_torch_function``, ``_runs_stock_op``)
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_has_torch_function = torch._C._has_torch_function_variadic


@contextlib.contextmanager
def flops_counted_by_caller():
    """``with flops_counted_by_caller():`` fastconv's calls run their kernels (as without the mode) under a
    FlopCounterMode that the caller corrects itself, counting each call's FLOPs from its shapes (as
    ``erf_lab.erf.roofline.counting_flops`` does with module hooks): the counted pass is then as fast as any other,
    where by default a call under FlopCounterMode runs the stock op so that the mode counts it."""
    token = FLOPS_COUNTED_BY_CALLER.set(True)
    try:
        yield
    finally:
        FLOPS_COUNTED_BY_CALLER.reset(token)


def _surely_empty(x: torch.Tensor) -> bool:
    """In a traced call: ``x`` has no element (False where its size is not known at trace time). The import is here:
    sympy, which it brings, costs ~0.3 s at start-up, and a traced call has it loaded already."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return guard_or_false(x.numel() == 0)


def is_unit(value) -> bool:
    """A stride or dilation of 1 as F.conv2d and nn.Conv2d take it: 1, (1, 1) or [1, 1] (a list was refused as if it
    were another stride)."""
    return value == 1 or (isinstance(value, (tuple, list)) and len(value) == 2 and all(v == 1 for v in value))


def is_same_padding(padding, kh: int, kw: int) -> bool:
    """A padding as F.conv2d and nn.Conv2d take it that is this op's 'same' padding for an odd KHxKW kernel: "same",
    (KH//2, KW//2) as a tuple or list, or KH//2 where KH = KW."""
    if isinstance(padding, str):
        return padding == "same"
    if isinstance(padding, (tuple, list)):
        return len(padding) == 2 and tuple(padding) == (kh // 2, kw // 2)
    return kh == kw and padding == kh // 2 and not isinstance(padding, bool)


def _check_conv2d_args(x, weight, padding, groups) -> None:
    """ValueError (one line) for an F.conv2d ``padding`` / ``groups`` that this op does not compute: padding other
    than 'same' (K//2 on each side), groups other than the channels of ``x`` (a depthwise conv)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.dim() not in (3, 4) \
            or weight.dim() != 4:
        return  # check_inputs says what is wrong
    kh, kw = weight.shape[-2:]
    if not is_same_padding(padding, kh, kw):
        raise ValueError(f"depthwise_conv2d: only 'same' padding is supported (padding='same' or "
                         f"{kh // 2 if kh == kw else (kh // 2, kw // 2)} for a {kh}x{kw} kernel), got "
                         f"padding={padding!r}; use F.conv2d")
    if groups is not None and groups != x.shape[-3]:
        raise ValueError(f"depthwise_conv2d: groups must equal the {x.shape[-3]} channels of x (a depthwise conv), "
                         f"got groups={groups!r}; use F.conv2d")


def _decide_outside_modes(backend, x, weight, bias) -> None:
    """Under a dispatch mode (the call then runs the stock op): the decision that a plain call of this signature
    takes, made (timed, memoized) with the modes set aside, as a first call makes it, so that the first call after
    the mode (FlopCounterMode around a model's first batch) does not time candidates; nothing for fake or other
    subclass tensors, whose data the autotuner cannot run."""
    if (backend is None or backend == "auto") and type(x) in (torch.Tensor, torch.nn.Parameter) \
            and type(weight) in (torch.Tensor, torch.nn.Parameter) and not _transforms_active():
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            resolve(backend, x, weight, bias)


def _runs_stock_op(x, weight) -> bool:
    """Whether this call runs outside fastconv's kernels (``_stock_call``): compiled, traced, on tensors that dispatch
    in Python, under a dispatch mode that needs the stock op (``mode_needing_stock_op``: FakeTensorMode, make_fx,
    FlopCounterMode), under vmap or functionalize."""
    return (_is_compiling() or _tracing_state() is not None or dispatches_in_python(x) or dispatches_in_python(weight)
            or (_dispatch_modes() and mode_needing_stock_op())
            or (_transforms_active() and under_vmap_or_functionalize()))


def _stock_call(x, weight, bias, backend):
    """A call that ``_runs_stock_op``: fastconv's custom ops in a compiled graph, else the stock op."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return _unbatched_call(x, weight, bias, backend)
    check_inputs(x, weight, bias)
    if (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and backend != "native"
            and not _surely_empty(x) and not torch._C._are_functorch_transforms_active()
            and getattr(forward_ad, "_current_level", -1) < 0):
        return compiled_call(x, weight, bias, backend)  # the graph holds fastconv's custom ops
    # torch.export and torch.jit.trace keep a portable graph (the stock op, which ONNX and other runtimes know; a
    # traced C++ kernel call recorded only its output's torch.empty_like, and the graph returned uninitialised
    # memory, and the custom Function was a Python op that torch.jit.save refuses); functorch
    # transforms batch the stock op, and dual numbers carry their tangents through it; backend "native" and
    # an empty input are the stock op, which the compiler then sees. Tensors that dispatch in Python (FakeTensor,
    # DTensor) have no data where the kernels read raw pointers (under FakeTensorMode the C++ kernel wrote through
    # a fake tensor's pointer and crashed the process; so did a real tensor's call under FakeTensorMode), make_fx
    # records the stock op, and FlopCounterMode counts the stock op only; other
    # dispatch modes (a profiler's) still see fastconv's kernels run
    if not _is_compiling() and _tracing_state() is None and _dispatch_modes():
        _decide_outside_modes(backend, x, weight, bias)
    return native_conv(x, weight, bias)


def _unbatched_call(x, weight, bias, backend):
    """An unbatched (C, H, W) ``x``, as F.conv2d takes it: the call on a batch of one, returning (C, H, W)."""
    return depthwise_conv2d(x.unsqueeze(0), weight, bias, backend=backend).squeeze(0)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     backend: str | None = None, stride: int = 1, dilation: int = 1, padding="same",
                     groups: int | None = None) -> torch.Tensor:
    """Depthwise 2-D cross-correlation, stride 1, 'same' padding (KH//2, KW//2), as
    ``F.conv2d(x, weight, bias, padding=(KH//2, KW//2), groups=C)``, of an (N, C, H, W) ``x`` or an unbatched
    (C, H, W) one (then returning (C, H, W)).

    ``weight`` is (C, 1, KH, KW) with odd KH, KW (the Triton kernels stop at 63; the dispatcher then picks another
    backend). The output keeps the memory format of ``x``. ``backend``: None or "auto" follows
    ``fastconv.settings()`` (see ``fastconv.use``; "auto" there = fastest measured for this device/dtype/layout/
    shape, unless it is less than 10 % faster than the stock F.conv2d call; see ``fastconv.explain``); one of
    ``fastconv.BACKENDS`` runs that one, a per-op name "forward/input_grad/weight_grad" (e.g. "native/native/cpp") runs
    each operation with its own. Under ``torch.autocast`` the tensors are cast as autocast casts
    F.conv2d's (float32 ones to the autocast dtype). Under ``torch.compile`` the graph holds fastconv's custom ops
    (``fastconv.compiled``); ``torch.export``, ``torch.jit.trace``, ``torch.jit.script``
    (``_scripted_depthwise_conv2d``) and vmap / functionalize get the stock op, and so do calls under
    FlopCounterMode, FakeTensorMode and make_fx and on tensors that dispatch in Python (FakeTensor, DTensor); a tensor
    subclass with a ``__torch_function__`` of its own sees this op as it sees F.conv2d; ``torch.fx.symbolic_trace``
    records one node of this op. ``stride``, ``dilation``, ``padding`` and ``groups`` let an ``F.conv2d(x, w, b,
    padding=K//2, groups=C)`` call switch by its name alone: each takes only what this op computes (1, 1, 'same' or
    K//2, C), else ValueError.
    """
    if (stride != 1 and not is_unit(stride)) or (dilation != 1 and not is_unit(dilation)):
        raise ValueError(f"depthwise_conv2d: only stride 1 and dilation 1 are supported (got stride={stride}, "
                         f"dilation={dilation}); use F.conv2d")
    if padding != "same" or groups is not None:
        _check_conv2d_args(x, weight, padding, groups)  # (returns at once where x or weight is no tensor)
    if (type(x) not in _PLAIN_TYPES or type(weight) not in _PLAIN_TYPES
            or (bias is not None and type(bias) not in _PLAIN_TYPES) or _is_compiling() or _tracing_state() is not None
            or (_dispatch_modes() and mode_needing_stock_op())
            or (_transforms_active() and under_vmap_or_functionalize())):
        if isinstance(x, _Proxy) or isinstance(weight, _Proxy):
            # torch.fx.symbolic_trace (FX tools: quantize_fx, feature extractors): one node of this op, as F.conv2d is
            # one (tracing into it failed: "x and weight must be torch.Tensors"); the node's call checks its tensors
            given = {"padding": padding, "groups": groups} if padding != "same" or groups is not None else {}
            return (x if isinstance(x, _Proxy) else weight).tracer.create_proxy(
                "call_function", depthwise_conv2d, (x, weight, bias), {"backend": backend, **given})
        if not _is_compiling() and _has_torch_function(x, weight, bias):
            # a tensor subclass with a __torch_function__ of its own sees this op (and runs it, as its default
            # __torch_function__ does, with that switched off inside), and the output is of its type, as F.conv2d's
            # is (the C++ kernel returned a plain Tensor for a subclass weight or bias)
            return handle_torch_function(depthwise_conv2d, (x, weight, bias), x, weight, bias, backend=backend,
                                         stride=stride, dilation=dilation, padding=padding, groups=groups)
        if _runs_stock_op(x, weight):
            return _stock_call(x, weight, bias, backend)
    if (backend is None or backend == "auto") and not any_autocast_enabled():
        # a signature already checked and decided: one dict lookup, then its memoized runner. Inline, with the
        # names of torch bound once: between two layers this path runs cold (caches refilled by the layer before),
        # where each Python frame and global lookup costs. Measured (Intel Xeon with AVX-512, 2 threads, B=1 C=384
        # R=32 K=3 channels_last forward, whose decision is the stock call; calls in a shuffled order beside an
        # NCHW one, median of the per-round ratio to F.conv2d called directly): 1.10x through a helper function
        # with its own try and key frames, 1.05x inline
        try:
            hit = dispatch._fast.get(_fast_key(x, weight, bias))
        except AttributeError:  # not tensors: the checked path below says what is wrong
            hit = None
        if hit is not None:
            return hit[1](x, weight, bias)
    x, weight, bias = autocast_inputs(x, weight, bias)
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return _unbatched_call(x, weight, bias, backend)
    check_inputs(x, weight, bias)
    return run_backend(resolve(backend, x, weight, bias), x, weight, bias)


def _scripted_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                               backend: Optional[str] = None, stride: int = 1, dilation: int = 1,
                               padding: Union[str, int, List[int], Tuple[int, int]] = "same",
                               groups: Optional[int] = None):
    """``depthwise_conv2d`` as ``torch.jit.script`` compiles it (a scripted model or function that calls it): the
    stock op, F.conv2d with 'same' padding (as torch.jit.trace and torch.export record it; ``backend`` is not used),
    with the eager op's checks. Scripting such a caller failed with TorchScript's NotSupportedError ("Compiled
    functions can't take variable number of arguments or use keyword-only arguments with defaults")."""
    if stride != 1 or dilation != 1:
        raise ValueError("depthwise_conv2d: only stride 1 and dilation 1 are supported; use F.conv2d")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError("depthwise_conv2d: weight must be (C, 1, KH, KW) with odd KH and KW")
    kh, kw = weight.shape[2], weight.shape[3]
    if isinstance(padding, str):
        same = padding == "same"
    elif isinstance(padding, int):
        same = kh == kw and padding == kh // 2
    elif isinstance(padding, list):
        same = padding == [kh // 2, kw // 2]
    else:
        same = padding == (kh // 2, kw // 2)
    if not same:
        raise ValueError("depthwise_conv2d: only 'same' padding is supported (padding='same' or KH//2, KW//2); use "
                         "F.conv2d")
    if groups is not None and groups != x.shape[-3]:
        raise ValueError("depthwise_conv2d: groups must equal the channels of x (a depthwise conv); use F.conv2d")
    return F.conv2d(x, weight, bias, 1, [kh // 2, kw // 2], 1, x.shape[-3])


# torch.jit.script compiles the twin above where a scripted caller (or torch.jit.script itself) meets this op
depthwise_conv2d.__prepare_scriptable__ = lambda: _scripted_depthwise_conv2d
