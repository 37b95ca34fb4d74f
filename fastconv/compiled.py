"""fastconv's kernels inside ``torch.compile`` graphs: the forward and the backward registered as ``torch.library``
custom ops (``fastconv::depthwise_conv2d``, ``fastconv::depthwise_conv2d_backward``), with fake (meta) functions
for tracing and the autograd formula, so dynamo and AOTAutograd keep them as opaque calls in the graph and inductor
compiles what is around them. The forward op resolves the backend when it runs, on the real tensors
(``dispatch.resolve_in_graph``: the decision an eager call of the same signature gets, autotuned on first use; an
explicit backend as named), and the backward op runs the forward's backend. The eager path keeps the autograd
Function of ``fastconv.backends`` (less per-call overhead than the op dispatcher); both compute through
``backends._fwd`` and ``backends.gradients``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastconv.backends import _fwd, gradients, memory_format_of, op_backends
from fastconv.dispatch import resolve_in_graph


def _canonical_strides(shape, fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` in ``fmt`` (what the fake functions promise the compiler)."""
    if fmt == torch.channels_last and len(shape) == 4:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def _canonical(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` with exactly the strides ``torch.empty_like(..., memory_format=fmt)`` gives (a kernel's output can be
    dense with other strides along dimensions of size 1, and compiled code asserts the strides it was promised)."""
    if t.stride() == _canonical_strides(t.shape, fmt):
        return t
    return torch.empty_like(t, memory_format=fmt).copy_(t)


#: backend names by id: the forward op returns its backend's id (``_backend_id``), which the backward op reads
_NAMES: list[str] = []


def _backend_id(name: str) -> Tensor:
    """The forward's backend for the backward, as a CPU int64 scalar (an op's outputs are tensors). On CUDA an empty
    tensor on the device instead (a CPU tensor in the graph keeps CUDA graphs out): the backward resolves again."""
    if name not in _NAMES:
        _NAMES.append(name)
    return torch.full((), _NAMES.index(name), dtype=torch.int64)


@torch.library.custom_op("fastconv::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str, grad_x: bool, grad_w: bool,
                        grad_b: bool) -> tuple[Tensor, Tensor]:
    """``fastconv.depthwise_conv2d``'s forward as one op: (output, the backend's id for the backward). ``grad_x`` /
    ``grad_w`` / ``grad_b``: whether the traced call needs each gradient (part of the backend decision)."""
    with torch.no_grad():
        name = "native" if x.numel() == 0 else resolve_in_graph(backend, x, weight, bias, grad_x, grad_w, grad_b)
        out = _fwd(op_backends(name)[0], x, weight, bias)
    used = _backend_id(name) if x.device.type == "cpu" else x.new_empty(0, dtype=torch.int64)
    return _canonical(out, memory_format_of(x)), used


@depthwise_conv2d_op.register_fake
def _(x, weight, bias, backend, grad_x, grad_w, grad_b):
    used = x.new_empty((), dtype=torch.int64, device="cpu") if x.device.type == "cpu" else x.new_empty(
        0, dtype=torch.int64)
    return torch.empty_like(x, memory_format=memory_format_of(x)), used


@torch.library.custom_op("fastconv::depthwise_conv2d_backward", mutates_args=())
def depthwise_conv2d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, used: Tensor, backend: str,
                                 grad_x: bool, grad_w: bool, grad_b: bool, has_bias: bool, need_x: bool,
                                 need_w: bool) -> tuple[Tensor, Tensor]:
    """(dL/dx, dL/dw) of ``depthwise_conv2d_op`` through the forward's backend (``used``); an output not needed is an
    empty tensor."""
    with torch.no_grad():
        if used.numel() == 1:
            name = _NAMES[int(used)]
        else:
            bias = weight.new_empty(weight.shape[0]) if has_bias else None
            name = resolve_in_graph(backend, x, weight, bias, grad_x, grad_w, grad_b)
        gx, gw = gradients(name, grad, x, weight, need_x, need_w)
    gx = _canonical(gx, memory_format_of(x)) if need_x else x.new_empty(0)
    gw = _canonical(gw, torch.contiguous_format) if need_w else weight.new_empty(0)
    return gx, gw


@depthwise_conv2d_backward_op.register_fake
def _(grad, x, weight, used, backend, grad_x, grad_w, grad_b, has_bias, need_x, need_w):
    gx = torch.empty_like(x, memory_format=memory_format_of(x)) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0)
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend, grad_x, grad_w, grad_b = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.call = (backend, grad_x, grad_w, grad_b, bias is not None)


def _backward(ctx, grad, _grad_used):
    x, weight, used = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw = torch.ops.fastconv.depthwise_conv2d_backward(grad, x, weight, used, *ctx.call, need_x, need_w)
    gb = grad.sum(dim=(0, 2, 3)) if need_b else None
    return gx if need_x else None, gw if need_w else None, gb, None, None, None, None


depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_call(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str | None) -> Tensor:
    """The call as a compiled graph holds it (inputs already checked)."""
    grad = torch.is_grad_enabled()
    grad_b = grad and bias is not None and bias.requires_grad
    return depthwise_conv2d_op(x, weight, bias, backend or "auto", grad and x.requires_grad,
                               grad and weight.requires_grad, grad_b)[0]
