"""The backends of ``depthwise_conv2d``: input checks, what each backend supports, the autograd Function and the
per-backend kernels (no dispatch: ``fastconv.dispatch`` chooses, ``fastconv.functional`` is the public op).

A depthwise "same" convolution y = x * w (cross-correlation, stride 1, padding K//2) has the gradients
(RepLKNet, Ding et al. CVPR 2022, Sec. 3 "Guideline 1" discusses why they are memory-bound on GPU/CPU):
  dL/dx = dL/dy correlated with the kernel flipped in both axes (same padding, odd K),
  dL/dw[c,i,j] = sum_{n,h,w} x_pad[n,c,h+i,w+j] * dL/dy[n,c,h,w]  -- itself a depthwise correlation,
  dL/db[c] = sum_{n,h,w} dL/dy[n,c,h,w].
"""
from __future__ import annotations

import contextvars
import os

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from fastconv import cpu_kernels as ck
from fastconv import triton_backend
from fastconv.config import BACKENDS, OP_BACKENDS, OPS, split_backend

#: what F.conv2d computes on CPU and CUDA alike (half precision on CPU: "native" and "channels_last" only)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``ValueError`` with one clear line for anything this op does not compute exactly."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("depthwise_conv2d: x and weight must be torch.Tensors")
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv2d: x must be (N, C, H, W) or unbatched (C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: weight must be (C, 1, KH, KW), got shape {tuple(weight.shape)}")
    c = x.shape[1]
    if weight.shape[0] != c:
        raise ValueError(f"depthwise_conv2d: weight has {weight.shape[0]} channels but x has {c}")
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"depthwise_conv2d: kernel {kh}x{kw} unsupported; each side must be odd"
                         " ('same' padding K//2 is only symmetric for odd K)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)):
        raise ValueError(f"depthwise_conv2d: bias must have shape ({c},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if any(t.layout != torch.strided for t in tensors):
        raise ValueError("depthwise_conv2d: x, weight and bias must be dense (strided) tensors, got layouts "
                         + ", ".join(str(t.layout) for t in tensors) + "; call .to_dense() first")
    if any(t.device != x.device for t in tensors):
        raise ValueError("depthwise_conv2d: x, weight and bias must be on the same device")
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"depthwise_conv2d: dtypes differ (x {x.dtype}, weight {weight.dtype}"
                         f"{', bias ' + str(bias.dtype) if bias is not None else ''})")
    if x.dtype not in DTYPES:
        raise ValueError(f"depthwise_conv2d: dtype {x.dtype} unsupported; use one of {', '.join(map(str, DTYPES))}")


#: ``any_autocast_enabled()``: True when autocast is on for any device: one call, without building ``x.device`` (a
#: private torch function, checked for; without it this is always True and every call takes the per-device check).
#: Measured per call on the 2-core dev box between 0.3 ms convolutions (caches cold): ~2 us against ~10 us for
#: ``torch.is_autocast_enabled(x.device.type)``.
any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_inputs(x, weight, bias):
    """``(x, weight, bias)`` cast as autocast casts F.conv2d's inputs (on the lower-precision list on CPU and CUDA:
    floating tensors but float64 go to the autocast dtype), unchanged outside autocast (and on the meta device)."""
    if not any_autocast_enabled():  # the usual case, in ~2 us instead of ~10 us per call
        return x, weight, bias
    if (not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda")
            or not torch.is_autocast_enabled(x.device.type)):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is stored NHWC (and not also plainly contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__
_transforms_active = torch._C._are_functorch_transforms_active
#: private to torch (what its ``unwrap_dead_wrappers`` calls per argument): where it moves, torch's own Function.apply
#: runs, with its per-call signature binding
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)


def dispatches_in_python(t) -> bool:
    """Whether ``t`` is a tensor subclass that dispatches in Python (FakeTensor, DTensor): it has no data where the
    kernels read raw pointers (the C++ kernel wrote through a fake tensor's pointer and crashed the process), so its
    calls run the stock op."""
    return getattr(type(t), "__torch_dispatch__", _PLAIN_DISPATCH) is not _PLAIN_DISPATCH


#: set by ``fastconv.flops_counted_by_caller``: FlopCounterMode is on, but the caller counts each call's FLOPs itself
FLOPS_COUNTED_BY_CALLER = contextvars.ContextVar("fastconv_flops_counted_by_caller", default=False)
#: dispatch modes (and their subclasses) under which a call runs the stock op: FakeTensorMode gives every op a fake
#: output, also on real input tensors (``allow_non_fake_inputs=True``), and the C++ kernel wrote through the pointer of
#: such an output and crashed the process; make_fx's ProxyTorchDispatchMode and FunctionalTensorMode record the ATen
#: ops, and a graph traced through the C++ kernel held only its output's ``empty_like`` (uninitialised memory)
_STOCK_OP_MODES = frozenset(("FakeTensorMode", "ProxyTorchDispatchMode", "FunctionalTensorMode"))
_FLOP_COUNTER_MODES = frozenset(("FlopCounterMode", "_FlopCounterMode"))


def mode_needing_stock_op() -> str | None:
    """The name of a dispatch mode on this thread's stack under which a call runs the stock op, else None: one of
    ``_STOCK_OP_MODES``, or torch's FlopCounterMode where the caller does not count the calls itself
    (``FLOPS_COUNTED_BY_CALLER``): it counts ATen ops only, and the kernels of fastconv are none (it counted 0 FLOPs for
    the C++ kernel and the FFT, and the autotuner's timing runs of a first call, 14-50x the conv's). Other modes (a
    logging one) see fastconv's kernels run."""
    from torch.utils import _python_dispatch

    stack = getattr(_python_dispatch, "_get_current_dispatch_mode_stack", list)()  # (private: where it moves, None)
    for mode in stack:
        names = {c.__name__ for c in type(mode).__mro__}
        if names & _STOCK_OP_MODES or (names & _FLOP_COUNTER_MODES and not FLOPS_COUNTED_BY_CALLER.get()):
            return type(mode).__name__
    return None


_FUNCTORCH = getattr(torch._C, "_functorch", None)
_dispatch_modes = torch._C._len_torch_dispatch_stack


def under_vmap_or_functionalize() -> bool:
    """Whether a ``torch.func.vmap`` level (vmap itself, and inside ``jacfwd``, ``hessian``, ``vmap(grad(...))``
    per-sample gradients, ``vmap(jacrev(...))``; an input's outer wrapper may be another transform's) or a
    ``torch.func.functionalize`` level is on functorch's stack: the C++ and Triton kernels read raw pointers, which
    batched tensors do not have, and the custom Function has no vmap rule and no functionalize rule (functionalize
    failed with torch's "NYI: Functionalize rule for custom_function_call"), so such calls take the stock op, which
    both transform."""
    if _FUNCTORCH is None or not hasattr(_FUNCTORCH, "get_interpreter_stack"):
        return False
    kinds = (_FUNCTORCH.TransformType.Vmap, _FUNCTORCH.TransformType.Functionalize)
    return any(level.key() in kinds for level in (_FUNCTORCH.get_interpreter_stack() or ()))


def without_storage(*tensors) -> bool:
    """Whether any of ``tensors`` has no data pointer: batched by ``torch.func.vmap`` or by the older vmap of
    ``torch.autograd.functional.jacobian(..., vectorize=True)`` and ``torch.autograd.grad(...,
    is_grads_batched=True)``."""
    for t in tensors:
        try:
            t.data_ptr()
        except RuntimeError:
            return True
    return False


def _triton():
    """``fastconv.triton_backend`` when Triton can run here (it imports triton itself only on first launch)."""
    try:
        return triton_backend if triton_backend.triton_available() else None
    except Exception:  # noqa: BLE001 - a broken Triton install must not break the CPU paths
        return None


def op_backends(backend: str) -> tuple[str, str, str]:
    """The backends of the forward, the input gradient and the weight gradient: a per-op name
    ("native/channels_last/cpp", ``config.split_backend``) split, any other name three times."""
    parts = _op_backends.get(backend)
    if parts is None:
        parts = _op_backends[backend] = split_backend(backend) or (backend, backend, backend)
    return parts


_op_backends: dict[str, tuple[str, str, str]] = {}  # op_backends' answers, per backend name (a few)


def supports(backend: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether ``backend`` computes this call exactly, and if not why (a per-op name: each of its backends)."""
    parts = split_backend(backend)
    if parts is not None:
        for op, b in zip(OPS, parts):
            ok, reason = supports(b, x, weight)
            if not ok:
                return False, f"{op} {b!r}: {reason}"
        return True, ""
    dev, dt = x.device.type, x.dtype
    if backend in BACKENDS and dt not in DTYPES:  # as check_inputs: no backend computes it
        return False, f"dtype {dt} unsupported; use one of {', '.join(map(str, DTYPES))}"
    if backend in ("native", "channels_last"):
        return True, ""
    if backend == "cpp":
        if dev != "cpu" or dt != torch.float32:
            return False, "cpp handles float32 CPU tensors only"
        if not ck.cpp_available():
            return False, f"cpp kernel unavailable: {ck.cpp_unavailable_reason()}"
        return True, ""
    if backend == "fft":
        if dt not in (torch.float32, torch.float64):
            return False, "fft needs float32/float64 (half-precision FFTs need power-of-two sizes)"
        return True, ""
    if backend == "triton":
        interp = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
        if dev != "cuda" and not interp:
            return False, "triton needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)"
        if dt not in triton_backend.DTYPES:
            return False, f"the Triton kernels handle {', '.join(map(str, triton_backend.DTYPES))} only"
        if max(weight.shape[-2:]) > triton_backend.MAX_KERNEL:
            return False, f"the Triton kernels handle kernel sides up to {triton_backend.MAX_KERNEL}"
        if _triton() is None:
            return False, "triton backend unavailable (fastconv.triton_backend missing or triton_available() False)"
        return True, ""
    return False, (f"unknown backend {backend!r}; choose auto, one of {', '.join(BACKENDS)}, or one per operation as "
                   f"forward/input_grad/weight_grad from {', '.join(OP_BACKENDS)}")


# ------------------------------------------------------------------------------------ kernels per backend
# "native" computes each operation as PyTorch does in the input's own layout (the per-op backends use it beside the
# others; the backend "native" itself is plain F.conv2d with PyTorch's autograd, see ``backend_runner``).
@ck.float32_for_cpu_half
def native_conv(x, w, b):
    """The stock call: ``F.conv2d`` with 'same' padding, groups = channels (float16 on the CPU in float32)."""
    kh, kw = w.shape[-2:]
    return F.conv2d(x, w, b, 1, (kh // 2, kw // 2), 1, x.shape[1])


def _fwd(backend, x, w, b):
    if backend == "native":
        return native_conv(x, w, b)
    if backend == "channels_last":
        return ck.onednn_conv_cl(x, w, b)
    if backend == "cpp":
        return ck.cpp_conv(x, w, b)
    if backend == "triton":
        return _triton().dwconv_forward(_nhwc_on_gpu(x), w, b)
    if backend == "fft":
        return ck.fft_conv(x, w, b)
    raise AssertionError(backend)


def _grad_input(backend, g, w):
    if backend == "native":
        return native_conv(g, w.flip(-1, -2), None)
    if backend == "channels_last":
        return ck.onednn_conv_cl(g, w.flip(-1, -2), None)
    if backend == "cpp":
        return ck.cpp_conv(g, w, None, flip=True)
    if backend == "triton":
        return _triton().dwconv_backward_input(_nhwc_on_gpu(g), w)
    raise AssertionError(backend)


def _grad_weight(backend, x, g, kh, kw):
    if backend == "native":
        return _native_weight_grad(x, g.contiguous(memory_format=memory_format_of(x)), kh, kw)
    if backend == "channels_last":
        return ck.onednn_weight_grad(x, g, kh, kw)
    if backend == "cpp":
        return ck.cpp_weight_grad(x, g, kh, kw)
    if backend == "triton":
        if x.is_cuda:  # cuDNN channels_last: measured faster than the Triton dL/dw kernel at every H200 config
            return _cudnn_weight_grad_nhwc(x, g, kh, kw)
        return _triton().dwconv_backward_weight(x, g, kh, kw).reshape(-1, 1, kh, kw)
    raise AssertionError(backend)


def _nhwc_on_gpu(t: torch.Tensor) -> torch.Tensor:
    """On CUDA the Triton kernels run NHWC: measured on an H200 (B=64, C=384, K=31, fp32) the NCHW Triton forward
    takes 12.4 ms at R=32 against 4.4 ms NHWC, and the layout change costs ~0.1 ms; the output layout is restored
    by the caller."""
    return t.contiguous(memory_format=torch.channels_last) if t.is_cuda else t


@ck.float32_for_cpu_half
def _native_weight_grad(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """dL/dw as PyTorch's autograd computes it for F.conv2d (``convolution_backward``), in the layout of x and g."""
    w_shape = torch.empty((x.shape[1], 1, kh, kw), device=x.device, dtype=x.dtype)
    if memory_format_of(x) == torch.channels_last:
        w_shape = w_shape.contiguous(memory_format=torch.channels_last)
    return torch.ops.aten.convolution_backward(g, x, w_shape, None, [1, 1], [kh // 2, kw // 2], [1, 1], False,
                                               [0, 0], x.shape[1], [False, True, False])[1]


def _cudnn_weight_grad_nhwc(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """dL/dw through cuDNN on channels_last tensors.  H200, B=64, C=384, fp32: R=32 K=31 19.3 ms (Triton 22.0,
    native NCHW 31.9); R=64 K=31 29.1 ms (Triton 89.3, NCHW 124); K=3 0.11-0.25 ms (Triton 0.40-1.42); fp16 K=31
    R=32 31.5 ms (Triton 61.8)."""
    cl = torch.channels_last
    return _native_weight_grad(x.contiguous(memory_format=cl), g.contiguous(memory_format=cl), kh, kw)


_WILL_EXECUTE = getattr(torch._C, "_will_engine_execute_node", None)


def _gradients_needed(ctx) -> tuple[bool, bool, bool]:
    """Whether this backward pass uses the gradient of each of the Function's three tensor inputs:
    ``ctx.needs_input_grad`` (the input requires grad), narrowed as PyTorch's own convolution narrows its output mask:
    False where the autograd engine will not run that input's gradient node in the current pass
    (``torch.autograd.grad`` with respect to some inputs only, ``backward(inputs=...)``). So captum's gradients with
    respect to the image skip dL/dw of trainable weights (the C++ kernel's weight gradient costs as much as its input
    gradient). True where the engine cannot tell. ``ctx.needs_input_grad`` and ``ctx.next_functions`` (a tuple built on
    each access) are read once."""
    needs = ctx.needs_input_grad
    if not any(needs[:3]):
        return False, False, False
    if _WILL_EXECUTE is None:
        return needs[0], needs[1], needs[2]
    nodes = ctx.next_functions
    return tuple(needs[i] and _will_execute(nodes[i][0]) for i in range(3))


def _will_execute(node) -> bool:
    """Whether the engine runs ``node`` (a gradient node of an input) in the current pass; True where it cannot tell."""
    if node is None:
        return True
    try:
        return bool(_WILL_EXECUTE(node))
    except RuntimeError:  # the engine refuses to answer for a leaf that torch.autograd.grad was asked for: needed
        return True


class _DepthwiseConv2dFn(torch.autograd.Function):
    """Custom autograd: each gradient is computed only when this backward pass needs it (``_gradients_needed``: frozen
    weights, or captum's gradient w.r.t. the image with trainable ones, skip dL/dw). The forward and its context are
    separate (``setup_context``), as ``torch.func.grad`` / ``vjp`` need."""

    @classmethod
    def apply(cls, x, w, b, backend):
        """``torch.autograd.Function.apply`` without its per-call ``inspect.signature`` binding (which it does for
        every Function with a ``setup_context``; here four positional arguments without defaults, so binding changes
        nothing). Measured between calls of the C++ kernel (2-core AVX-512 Xeon, B=1 C=384 R=32 K=13 forward, 0.38
        ms in the kernel): 0.45 ms per call through torch's ``apply``, 0.41 ms through this one. Under functorch
        transforms (``torch.func.grad``, ``vmap``) torch's own ``apply`` runs."""
        if _unwrap_if_dead is None or _transforms_active():
            return super().apply(x, w, b, backend)
        # torch's unwrap_dead_wrappers without its generator over the arguments, then torch's C++ apply
        return super(torch.autograd.Function, cls).apply(_unwrap_if_dead(x), _unwrap_if_dead(w),
                                                         None if b is None else _unwrap_if_dead(b), backend)

    @staticmethod
    def forward(x, w, b, backend):
        return _fwd(op_backends(backend)[0], x, w, b).contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, backend = inputs
        ctx.backend = backend
        ctx.fmt = memory_format_of(x)
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _backend):
        """Forward-mode AD (dual numbers, ``torch.func.jvp``): the op is bilinear in (x, w), so the output's tangent is
        conv(x_t, w) + conv(x, w_t) + b_t, here through F.conv2d in the input's layout."""
        x, w = ctx.saved_tensors
        out = torch.zeros_like(x) if x_t is None else native_conv(x_t, w, None)
        if w_t is not None:
            out = out + native_conv(x, w_t, None)
        if b_t is not None:
            out = out + b_t.view(1, -1, 1, 1)
        if without_storage(out):  # batched tangents (a vmapped jvp) cannot be laid out channels_last
            return out
        return out.contiguous(memory_format=ctx.fmt)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        need_x, need_w, need_b = _gradients_needed(ctx)
        if dispatches_in_python(g) or (_dispatch_modes() and mode_needing_stock_op()) or without_storage(g, x, w) \
                or (torch.is_grad_enabled() and getattr(forward_ad, "_current_level", -1) >= 0
                    and any(forward_ad.unpack_dual(t).tangent is not None for t in (g, x, w))):
            # a vmapped backward (jacrev, jacobian(vectorize=True)), or a double backward under forward-mode AD
            # (hessian's forward-mode outer jacobian: batched tangents): PyTorch's formulas in the tensors' own
            # layout (vmap cannot make a channels_last copy); so too a backward of an eager forward run under
            # FakeTensorMode or make_fx, or on a fake gradient (the C++ kernel wrote through a fake output's pointer
            # and crashed the process; make_fx's graph held only its outputs' empty_like)
            gx = _grad_input("native", g, w) if need_x else None
            gw = _native_weight_grad(x, g, *w.shape[-2:]) if need_w else None
            gb = g.sum(dim=(0, 2, 3)) if ctx.has_bias and need_b else None
            return gx, gw, gb, None
        # create_graph (double backward: gradient penalties, Hessian-vector products): the C++ and Triton kernels
        # are opaque to autograd, so the gradients come from F.conv2d ("channels_last"), which autograd differentiates
        gx, gw = gradients("channels_last" if torch.is_grad_enabled() else ctx.backend, g, x, w, need_x, need_w)
        if ctx.has_bias and need_b:
            gb = g.sum(dim=(0, 2, 3))
        return gx, _with_strides_of(gw, w), gb, None


def _with_strides_of(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed with ``like``'s strides where they differ only in the strides of size-1 dimensions: a
    (C, 1, KH, KW) depthwise weight is the same memory in NCHW and channels_last, but DDP's gradient buckets take
    the parameter's strides, and a gradient with other strides was copied into them every step, with PyTorch's
    warning "Grad strides do not match bucket view strides" (the backends return either layout)."""
    if t is None or t.shape != like.shape or t.stride() == like.stride():
        return t
    if all(a == b for n, a, b in zip(t.shape, t.stride(), like.stride()) if n > 1):
        return t.as_strided(like.shape, like.stride())
    return t


def gradients(backend: str, g, x, w, need_x: bool, need_w: bool):
    """(dL/dx in the layout of ``x``, dL/dw contiguous), each None where not needed, through ``backend``'s kernels
    (a per-op name: its input-gradient and weight-gradient backends; "native" and "fft": PyTorch's formulas), in one
    pass where the C++ kernel has one for both."""
    _, b_in, b_w = ("native",) * 3 if backend == "fft" else op_backends(backend)
    fmt = memory_format_of(x)
    gx = gw = None
    if b_in == b_w == "cpp" and need_x and need_w:
        both = ck.cpp_backward(x, g, w)  # one pass where the C++ kernel has one (None elsewhere)
        if both is not None:
            gx, gw = both[0].contiguous(memory_format=fmt), both[1].to(w.dtype).contiguous()
    if need_x and gx is None:
        gx = _grad_input(b_in, g, w).contiguous(memory_format=fmt)
    if need_w and gw is None:
        gw = _grad_weight(b_w, x, g, *w.shape[-2:]).to(w.dtype).contiguous()
    return gx, gw


def backend_runner(backend: str, x, weight, bias=None):
    """A function ``(x, weight, bias) -> output`` that runs one named backend for calls shaped like ``(x, weight,
    bias)`` (no checks, no dispatch; the dispatcher memoizes it per call signature, whose key holds whether a
    gradient is needed). An empty input runs plain F.conv2d (the FFT of an empty batch fails in MKL). A call that
    needs no gradient runs the kernel without the autograd Function around it: measured (2-core AVX-512 Xeon, B=1
    C=384 R=32 K=3 forward on channels_last, the C++ kernel called alone 74 us) 75 us per call, 92 through the
    Function."""
    if backend == "native" or x.numel() == 0:
        # F.conv2d's output is channels_last where x is or the weight is (a (C, 1, KH, KW) weight of a model moved to
        # channels_last, strides (KH*KW, 1, KW, 1)): on an NCHW x it is made NCHW again, as every other backend's
        nchw = memory_format_of(x) == torch.contiguous_format
        if x.dtype == torch.float16 and x.device.type == "cpu":  # in float32 (ck.float32_for_cpu_half), autograd
            return (lambda x, w, b: native_conv(x, w, b).contiguous()) if nchw else native_conv  # through the casts
        # positional arguments, the padding and groups computed once: the stock call with the least Python around it
        pad, groups = (weight.shape[-2] // 2, weight.shape[-1] // 2), x.shape[1]
        if nchw:
            return lambda x, w, b: F.conv2d(x, w, b, 1, pad, 1, groups).contiguous()
        return lambda x, w, b: F.conv2d(x, w, b, 1, pad, 1, groups)
    if backend == "fft":
        return lambda x, w, b: _in_layout(ck.fft_conv(x, w, b), memory_format_of(x))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        fmt = memory_format_of(x)

        fwd = op_backends(backend)[0]
        if fwd == "cpp" and x.dtype == torch.float32 and \
                torch.empty_like(x, device="meta").is_contiguous(memory_format=fmt):
            # the C++ kernel's output is in x's layout already: no layout call (between the layers of a network
            # each call costs ~1-3 us of a 75-300 us conv)
            def cpp_forward_only(x, w, b):
                if getattr(forward_ad, "_current_level", 0) >= 0 or _transforms_active():
                    return _DepthwiseConv2dFn.apply(x, w, b, backend)
                return _fwd("cpp", x, w, b)
            return cpp_forward_only

        def forward_only(x, w, b):
            if getattr(forward_ad, "_current_level", 0) >= 0 or torch._C._are_functorch_transforms_active():
                return _DepthwiseConv2dFn.apply(x, w, b, backend)  # dual numbers, torch.func: the Function's rules
            return _fwd(fwd, x, w, b).contiguous(memory_format=fmt)
        return forward_only
    return lambda x, w, b: _DepthwiseConv2dFn.apply(x, w, b, backend)


def _in_layout(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``y`` laid out in ``fmt``, or as it is where ``fmt`` is channels_last and ``y`` carries batched forward-mode
    tangents (``torch.autograd.functional.jacobian(..., vectorize=True, strategy="forward-mode")``, gradcheck's batched
    forward gradients): vmap cannot lay them out channels_last, and the call failed with torch's "NYI:
    Tensor.clone(memory_format) inside vmap"."""
    if fmt == torch.channels_last and getattr(forward_ad, "_current_level", -1) >= 0:
        tangent = forward_ad.unpack_dual(y).tangent
        if tangent is not None and without_storage(tangent):
            return y
    return y.contiguous(memory_format=fmt)


def run_backend(backend: str, x, weight, bias):
    """Compute with one named backend (no checks, no dispatch)."""
    return backend_runner(backend, x, weight, bias)(x, weight, bias)
