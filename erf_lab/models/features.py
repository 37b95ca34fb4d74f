"""timm's feature-extraction interface (``feature_info``, ``forward_intermediates``) and classifier interface
(``get_classifier``, ``reset_classifier``, ``pretrained_cfg``).

A model lists its forward pass as named steps (``_feature_steps()``, module names as in ``named_modules()``)
and declares ``feature_info``: one ``dict(num_chs, reduction, module)`` per feature map it exposes, ``module``
being the step whose output it is. Intermediate ``k`` is then exactly the output a forward hook on
``model.get_submodule(feature_info[k]["module"])`` would capture.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's index rule: ``None`` = all features, an int ``n`` = the last ``n``, a sequence = those indices
    (negative counted from the end). Returns (the indices made non-negative, the largest)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ErfLabError(f"indices={indices}: take 1..{num_features} last features")
        take = list(range(num_features - indices, num_features))
    else:
        take = [int(i) + num_features if int(i) < 0 else int(i) for i in indices]
        if not take or any(not 0 <= i < num_features for i in take):
            raise ErfLabError(f"indices {list(indices)} out of range for {num_features} features")
    return take, max(take)


def stage_end_feature_info(steps: Sequence[tuple[str, int, int]], start_reduction: int = 1) -> list[dict]:
    """``feature_info`` of a chain of ``(module name, stride, out channels)`` steps: the last step at each
    reduction (the end of each stage), as timm's ``feature_location='bottleneck'``."""
    info, reduction = [], start_reduction
    for i, (name, stride, chs) in enumerate(steps):
        reduction *= stride
        if i + 1 == len(steps) or steps[i + 1][1] > 1:
            info.append(dict(num_chs=chs, reduction=reduction, module=name))
    return info


class FeatureIntermediates:
    """Mixin: ``forward_intermediates`` from ``feature_info`` and ``_feature_steps()``. A model with a norm that
    applies to some intermediates overrides ``_intermediate_norm``."""

    feature_info: list[dict]

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def _intermediate_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature maps ``feature_info[indices]`` (timm semantics): ``indices`` an int = the last n, a list
        of indices (negative allowed), None = all. ``norm`` applies the model's norm to the intermediates it
        belongs to (see ``_intermediate_norm``). ``stop_early`` runs no step after the last requested feature.
        Intermediates come in forward order (as in timm). Returns ``(final features, intermediates)`` (final =
        ``forward_features(x)`` when the whole pass ran, else the last step's output) or, with
        ``intermediates_only``, the list."""
        if output_fmt != "NCHW":
            raise ErfLabError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        steps = self._feature_steps()
        names = [n for n, _ in steps]
        ends = [names.index(f["module"]) for f in self.feature_info]
        last = ends[max_index] if stop_early else len(steps) - 1
        outputs = {}
        for s, (_, module) in enumerate(steps[:last + 1]):
            x = module(x)
            for k in (k for k in take if ends[k] == s):
                outputs[k] = self._intermediate_norm(k, x) if norm else x
        intermediates = [outputs[k] for k in sorted(outputs)]
        return intermediates if intermediates_only else (x, intermediates)


class ResettableClassifier:
    """Mixin: timm's ``get_classifier`` / ``reset_classifier`` for a model whose classifier is the Linear at
    ``head_names[0]`` on ``num_features`` pooled features (None or ``nn.Identity`` when ``num_classes`` is 0)."""

    head_names: tuple[str, ...]
    num_features: int

    @property
    def pretrained_cfg(self) -> dict:
        """timm's name for ``default_cfg`` (the same dict): current timm reads only this one
        (``timm.data.resolve_data_config(model=model)``), which without it fell back to ImageNet's mean / std."""
        return self.default_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        self.default_cfg = cfg

    def get_classifier(self) -> nn.Module:
        """The classifier module (``nn.Identity`` when there is none)."""
        parent, _, name = self.head_names[0].rpartition(".")
        head = getattr(self.get_submodule(parent) if parent else self, name, None)
        return head if head is not None else nn.Identity()

    def reset_classifier(self, num_classes: int | None, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0 or None: none; ``forward`` then returns the
        pooled features). Only average pooling exists (``global_pool`` None or ``'avg'``)."""
        if global_pool not in (None, "avg"):
            raise ErfLabError(f"global_pool={global_pool!r}: this model pools by average only")
        if getattr(self, "out_indices", None) is not None:
            raise ErfLabError("a downstream backbone (out_indices) has no classifier to reset")
        num_classes = int(num_classes or 0)
        parent, _, name = self.head_names[0].rpartition(".")
        ref = next(self.parameters())
        head = nn.Linear(self.num_features, num_classes).to(ref.device, ref.dtype) if num_classes else nn.Identity()
        setattr(self.get_submodule(parent) if parent else self, name, head)
        self.num_classes = num_classes
        if isinstance(getattr(self, "default_cfg", None), dict):
            self.default_cfg["num_classes"] = num_classes
