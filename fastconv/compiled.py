"""fastconv's kernels inside ``torch.compile`` graphs: the forward and the backward registered as ``torch.library``
custom ops (``fastconv::depthwise_conv2d``, ``fastconv::depthwise_conv2d_backward``), with fake (meta) functions
for tracing and the autograd formula, so dynamo and AOTAutograd keep them as opaque calls in the graph and inductor
compiles what is around them. The backend is resolved when the op runs, on the real tensors
(``dispatch.resolve_in_graph``: the decision an eager call of the same signature gets, autotuned on first use; an
explicit backend as named). The eager path keeps the autograd Function of ``fastconv.backends`` (less per-call
overhead than the op dispatcher); both compute through ``backends.run_backend`` and ``backends.gradients``.
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
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).contiguous(memory_format=fmt).copy_(t)


def _stand_in_bias(weight: Tensor, has_bias: bool) -> Tensor | None:
    return weight.new_empty(weight.shape[0]) if has_bias else None


@torch.library.custom_op("fastconv::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str, grad_x: bool,
                        grad_w: bool) -> Tensor:
    """``fastconv.depthwise_conv2d``'s forward as one op; ``grad_x`` / ``grad_w``: whether the traced call needs the
    gradients (part of the backend decision)."""
    with torch.no_grad():
        name = resolve_in_graph(backend, x, weight, bias, grad_x, grad_w)
        out = _fwd("native" if x.numel() == 0 else op_backends(name)[0], x, weight, bias)
    return _canonical(out, memory_format_of(x))


@depthwise_conv2d_op.register_fake
def _(x, weight, bias, backend, grad_x, grad_w):
    return torch.empty_like(x, memory_format=memory_format_of(x))


@torch.library.custom_op("fastconv::depthwise_conv2d_backward", mutates_args=())
def depthwise_conv2d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, backend: str, grad_x: bool,
                                 grad_w: bool, has_bias: bool, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """(dL/dx, dL/dw) of ``depthwise_conv2d_op`` for the same call; an output not needed is an empty tensor."""
    with torch.no_grad():
        name = resolve_in_graph(backend, x, weight, _stand_in_bias(weight, has_bias), grad_x, grad_w)
        gx, gw = gradients(name, grad, x, weight, need_x and x.numel() > 0, need_w and x.numel() > 0)
    gx = _canonical(gx, memory_format_of(x)) if gx is not None else (
        torch.zeros_like(x, memory_format=memory_format_of(x)) if need_x else x.new_empty(0))
    gw = _canonical(gw, torch.contiguous_format) if gw is not None else (
        torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0))
    return gx, gw


@depthwise_conv2d_backward_op.register_fake
def _(grad, x, weight, backend, grad_x, grad_w, has_bias, need_x, need_w):
    gx = torch.empty_like(x, memory_format=memory_format_of(x)) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0)
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend, grad_x, grad_w = inputs
    ctx.save_for_backward(x, weight)
    ctx.call = (backend, grad_x, grad_w, bias is not None)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw = torch.ops.fastconv.depthwise_conv2d_backward(grad, x, weight, *ctx.call, need_x, need_w)
    gb = grad.sum(dim=(0, 2, 3)) if need_b else None
    return gx if need_x else None, gw if need_w else None, gb, None, None, None


depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_call(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str | None) -> Tensor:
    """The call as a compiled graph holds it (inputs already checked)."""
    grad = torch.is_grad_enabled()
    grad_w = grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
    return depthwise_conv2d_op(x, weight, bias, backend or "auto", grad and x.requires_grad, grad_w)
