"""The ERF as a captum-style attribution (Luo et al., NeurIPS 2016; protocol of RepLKNet, Ding et al., CVPR 2022,
App. C and the official ``erf/visualize_erf.py``).

For an input x and a layer with output M: target t = sum_c ReLU(M[c, h//2, w//2]); the contribution map is
sum_rgb ReLU(dt/dx) (``aggregate="abs"``: |dt/dx|). :class:`EffectiveReceptiveField` returns one map per image,
``(B, H, W)``, through captum's ``NeuronGradient``; the ERF of a model is the mean map over images
(:func:`erf_lab.erf.compute.compute_erf`).

The forward stops at the layer: ``forward_features`` by default; for a layer named in ``model.feature_info``
the model's own ``forward_intermediates(..., stop_early=True)`` (timm's interface); for any other module a
forward hook that ends the pass once the output is captured. Token and NHWC outputs (ViT, Swin) are arranged as
(B, C, H, W) maps first (:func:`erf_lab.erf.tokens.to_spatial`), so a transformer is measured like a CNN.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.erf.receptive_field import DEFAULT_LAYER, resolve_layer
from erf_lab.erf.tokens import to_spatial, track_layout
from erf_lab.errors import ErfLabError

AGGREGATES = ("relu", "abs")


class _StopForward(Exception):
    """Raised by a forward hook once the chosen layer's output is captured: the rest never runs."""


def intermediate_index(model: nn.Module, layer_name: str) -> int | None:
    """Index of ``layer_name`` among the model's ``feature_info`` modules (timm convention), if it has them."""
    info = getattr(model, "feature_info", None)
    if not callable(getattr(model, "forward_intermediates", None)) or not isinstance(info, (list, tuple)):
        return None
    names = [f.get("module") for f in info if isinstance(f, dict)]
    return names.index(layer_name) if layer_name in names else None


class TruncatedForward(nn.Module):
    """Runs ``model`` only up to ``layer`` and returns that layer's output (``forward_features`` if None) as a
    spatial map (tokens / NHWC arranged as NCHW).

    captum hooks this wrapper as its layer, so it receives exactly the chosen feature map, and the forward truly
    stops there: through ``forward_intermediates(stop_early=True)`` for a feature_info layer, else through a
    private exception raised by a forward hook after capture and caught inside this module."""

    def __init__(self, model: nn.Module, layer: nn.Module | None = None, layer_name: str = DEFAULT_LAYER):
        super().__init__()
        self.model = model
        self.layer_name = layer_name
        object.__setattr__(self, "_target", layer)  # not a registered child (it already is one of model's)
        self._index = None if layer is None else intermediate_index(model, layer_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._forward(x)
        if not isinstance(out, torch.Tensor):  # captum would fail on it with an AttributeError (a dict's .clone)
            raise ErfLabError(f"layer {self.layer_name!r} output is not a (N, C, H, W) feature map (got "
                              f"{type(out).__name__}); pass a layer (a module name) that outputs one")
        return out

    def _forward(self, x: torch.Tensor):
        if self._target is None:
            fn = self.model.forward_features if hasattr(self.model, "forward_features") else self.model
            return to_spatial(fn(x), self.model, tuple(x.shape[-2:]))
        if self._index is not None:  # timm's forward_intermediates returns NCHW maps for every family
            return self.model.forward_intermediates(x, indices=[self._index], stop_early=True,
                                                    intermediates_only=True)[0]
        captured = []

        def hook(module, inp, out):
            captured.append(out)
            raise _StopForward

        with track_layout(self.model):  # tags NHWC maps inside channels-last blocks, before the capture
            handle = self._target.register_forward_hook(hook)
            try:
                self.model(x)
            except _StopForward:
                pass
            finally:
                handle.remove()
        if not captured:
            raise ErfLabError(f"layer {self.layer_name!r} is not run by the model's forward pass")
        out = captured[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] != x.shape[0]:
            raise ErfLabError(f"layer {self.layer_name!r} does not output one map per image (batch {out.shape[0]} "
                              f"for {x.shape[0]} images, e.g. a Swin's attention windows); choose its block")
        return to_spatial(out, self.model, tuple(x.shape[-2:]), self._target)


class EffectiveReceptiveField:
    """Gradient ERF maps of ``model`` at ``layer`` (captum-style: one :meth:`attribute` call per batch).

    >>> erf = EffectiveReceptiveField(model, layer="stages.2").attribute(images)   # (B, H, W)

    The model is used as given (eval mode and frozen weights are up to the caller; ``compute_erf`` prepares a
    re-parameterized copy). ``layer``: a module name or None / ``"forward_features"``.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, aggregate: str = "relu"):
        if aggregate not in AGGREGATES:
            raise ErfLabError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATES)}")
        self.model = model
        self.layer, module = resolve_layer(model, layer)
        self.aggregate = aggregate
        self.forward_func = TruncatedForward(model, module, self.layer)
        self.feature_hw: tuple[int, int] | None = None

    def _selector(self, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ErfLabError(f"layer {self.layer!r} output is not a (N, C, H, W) feature map (got {got})"
                              f"{self._no_features_hint()}")
        h, w = out.shape[-2:]
        self.feature_hw = (int(h), int(w))
        return F.relu(out[:, :, h // 2, w // 2]).sum(1)

    def _no_features_hint(self) -> str:
        """Why the default layer was the model's whole output: no ``forward_features`` (a wrapper's inner model has
        one: ``nn.DataParallel`` / DDP's ``module``)."""
        if self.layer != DEFAULT_LAYER or hasattr(self.model, "forward_features"):
            return ""
        inner = next((a for a in ("module", "_orig_mod") if isinstance(getattr(self.model, a, None), nn.Module)), None)
        if inner is not None and hasattr(getattr(self.model, inner), "forward_features"):
            return f"; {type(self.model).__name__} wraps the model: pass model.{inner}"
        return "; the model has no forward_features, so its forward() output was taken: pass layer= (a module name)"

    def attribute(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, H, W) contribution maps for a (B, C, H, W) batch (summed over its C channels: RGB, or a grayscale /
        RGBA model's own), in the inputs' dtype and device. Gradients are taken even where the caller runs under
        ``torch.no_grad()`` or ``torch.inference_mode()`` (inference tensors as inputs too)."""
        from captum.attr import NeuronGradient

        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ErfLabError(f"inputs must be a (B, C, H, W) batch of images, got {got} (one image: "
                              "inputs.unsqueeze(0))")
        fwd = self.forward_func
        try:
            with torch.inference_mode(False):  # autograd needs normal tensors: an inference tensor is copied
                x = (inputs.clone() if inputs.is_inference() else inputs).detach().requires_grad_(True)
                grad = NeuronGradient(fwd, fwd).attribute(x, neuron_selector=self._selector)
        except RuntimeError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            size_words = ("too small", "Kernel size", "output size", "non-positive", "greater than input")
            if any(w in msg for w in size_words):
                raise ErfLabError(f"input size {inputs.shape[-1]} is too small for this model at layer "
                                  f"{self.layer!r} (the feature map would vanish): {msg}") from None
            raise
        if self.feature_hw is not None and min(self.feature_hw) < 1:
            raise ErfLabError(f"input size {inputs.shape[-1]} is too small: layer {self.layer!r} has an empty "
                              "feature map")
        g = F.relu(grad) if self.aggregate == "relu" else grad.abs()
        return g.sum(1)
