"""``DepthwiseConv2d``: drop-in for ``nn.Conv2d(C, C, K, padding=K//2, groups=C)``; ``convert_model`` /
``revert_model`` swap between the two in place, sharing parameters."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastconv.config import _backend, settings
from fastconv.functional import depthwise_conv2d, is_same_padding, is_unit


class DepthwiseConv2d(nn.Conv2d):
    """Same parameters (``weight`` (C,1,KH,KW), ``bias``) and state-dict keys as the ``nn.Conv2d`` it replaces,
    so checkpoints load unchanged; the forward runs ``fastconv.depthwise_conv2d``. ``backend`` None (default)
    follows ``fastconv.settings()`` (``fastconv.use`` / ``configure``); a named backend on the module wins.
    ``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode`` take nn.Conv2d's names and only the values
    this conv computes (1, 'same' or K//2, 1, C, 'zeros'); anything else is a ValueError."""

    def __init__(self, channels: int, kernel_size, bias: bool = True, backend: str | None = None, stride=1,
                 device=None, dtype=None, *, padding="same", dilation=1, groups: int | None = None,
                 padding_mode: str = "zeros"):
        if isinstance(bias, int) and not isinstance(bias, bool):
            # DepthwiseConv2d(C, C, 7) written as nn.Conv2d(C, C, 7) built a CxC kernel with bias "7", silently
            raise ValueError(f"DepthwiseConv2d: bias={bias!r} is not a bool; it takes (channels, kernel_size), not "
                             "nn.Conv2d's (in_channels, out_channels, kernel_size)")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if not is_unit(stride) or not is_unit(dilation):
            raise ValueError(f"DepthwiseConv2d: only stride 1 and dilation 1 are supported, got stride={stride}, "
                             f"dilation={dilation}; use nn.Conv2d")
        if len(k) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v % 2 == 0 or v < 1 for v in k):
            raise ValueError(f"DepthwiseConv2d: kernel_size must be odd positive ints, got {kernel_size}")
        if not is_same_padding(padding, *k) or padding_mode != "zeros":
            raise ValueError(f"DepthwiseConv2d: only 'same' zero padding is supported (padding='same' or "
                             f"{k[0] // 2 if k[0] == k[1] else (k[0] // 2, k[1] // 2)}, padding_mode='zeros'), got "
                             f"padding={padding!r}, padding_mode={padding_mode!r}; use nn.Conv2d")
        if groups is not None and groups != channels:
            raise ValueError(f"DepthwiseConv2d: groups must equal channels ({channels}, a depthwise conv), got "
                             f"groups={groups!r}; use nn.Conv2d")
        if backend is not None:
            _backend(backend)  # a misspelt name fails here, not at the first forward
        super().__init__(channels, channels, k, stride=1, padding=(k[0] // 2, k[1] // 2), groups=channels,
                         bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x):
        if torch.jit.is_scripting():
            # torch.jit.script compiles this branch alone: the stock op (as torch.export and torch.jit.trace get),
            # where TorchScript could not compile fastconv's Python dispatch and a converted model could not be
            # scripted at all (NotSupportedError)
            return self._conv_forward(x, self.weight, self.bias)
        return self._fastconv_forward(x)

    @torch.jit.unused
    def _fastconv_forward(self, x):
        k = self.kernel_size
        if (self.stride != (1, 1) or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or self.groups != self.in_channels
                or (self.padding != (k[0] // 2, k[1] // 2) and self.padding != "same")):
            raise ValueError("DepthwiseConv2d: stride, dilation, padding or groups were changed after construction;"
                             " only stride 1, dilation 1, 'same' zero padding, groups=C are supported")
        return conv_forward(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        """nn.Conv2d's, and the backend that runs: the module's own, else the one ``fastconv.settings()`` forces, else
        'auto' (it printed ``backend=None`` for every module that follows the settings)."""
        try:
            backend = repr(self.backend or settings().backend)
        except ValueError:  # a misspelt $FASTCONV_BACKEND: the forward says so, the model still prints
            backend = "?"
        return super().extra_repr() + f", backend={backend}"


def conv_forward(x, weight, bias, backend: str | None = None):
    """``DepthwiseConv2d``'s forward on its parameters: ``depthwise_conv2d`` (which takes an unbatched (C, H, W)
    input, as nn.Conv2d does). Under ``torch.fx.symbolic_trace`` (and a GraphModule's pickling, which traces again) it
    is one node, as an nn.Conv2d (a leaf module) is one."""
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", conv_forward, (x, weight, bias, backend), {})
    return depthwise_conv2d(x, weight, bias, backend=backend)


def _swap(model: nn.Module, old: type, make) -> int:
    """Replace each child of exact type ``old`` for which ``make(child)`` returns a module by it, sharing the
    parameters and the train/eval flag; returns the count. A child with hooks of its own (which would be lost) or
    with a weight that is not a parameter of its own (``weight_norm``, ``spectral_norm``: computed in a hook)
    stays as it is."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child) if type(child) is old and _swappable(child) else None
            if new is not None:
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new.train(child.training))
                swapped += 1
    return swapped


def _swappable(m: nn.Module) -> bool:
    hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, getattr(m, "_backward_pre_hooks", None))
    return (not any(hooks) and isinstance(m.weight, nn.Parameter)
            and (m.bias is None or isinstance(m.bias, nn.Parameter)))


def convert_model(model: nn.Module, min_kernel: int = 7) -> int:
    """In place: every plain ``nn.Conv2d`` that is depthwise (groups = in = out channels), stride 1, dilation 1,
    'same' zero padding (``padding="same"`` or K//2), with odd kernel sides and ``max(K) >= min_kernel``, becomes a
    ``DepthwiseConv2d`` (backend None: following ``fastconv.settings()``) sharing its parameters and train/eval flag
    (a conv with hooks or a computed weight stays, see ``_swap``). Returns the number of modules swapped."""
    def make(m: nn.Conv2d):
        k = m.kernel_size
        if (m.groups == m.in_channels == m.out_channels and m.stride == (1, 1) and m.dilation == (1, 1)
                and is_same_padding(m.padding, *k) and m.padding_mode == "zeros" and k[0] % 2 == 1
                and k[1] % 2 == 1 and max(k) >= min_kernel):
            return DepthwiseConv2d(m.in_channels, k, bias=m.bias is not None, device="meta")
        return None

    return _swap(model, nn.Conv2d, make)


def revert_model(model: nn.Module) -> int:
    """In place: every ``DepthwiseConv2d`` becomes the plain ``nn.Conv2d`` it stands for, sharing its parameters.
    Returns the number of modules swapped."""
    return _swap(model, DepthwiseConv2d, lambda m: nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, groups=m.groups,
        bias=m.bias is not None, device="meta"))
