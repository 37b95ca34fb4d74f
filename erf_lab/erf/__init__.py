"""Effective receptive fields (Luo et al., NeurIPS 2016; RepLKNet, Ding et al., CVPR 2022, Sec. 5.2 / App. C).

Layers, leaf to top: ``metrics`` / ``receptive_field`` / ``images`` -> ``attribution`` (one image batch ->
maps) and ``prepare`` (the model as measured) -> ``compute`` (mean over images, resumable state) -> ``rundir``
(the one run-directory writer and reader) -> ``runner`` (the one orchestrator: CLI, sweeps, app, training
timeline) -> ``sweep`` / ``analysis``.

Names are resolved lazily so that a missing or broken sibling module never breaks the others.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EffectiveReceptiveField": "attribution",
    "compute_erf": "compute", "ErfResult": "compute",
    "ErfSpec": "runner", "run_erf": "runner",
    "theoretical_rf": "receptive_field", "list_layers": "receptive_field",
    "load_images": "images", "default_images_dir": "images", "list_image_files": "images",
    "compute_metrics": "metrics", "high_contribution_area_ratio": "metrics",
    "plot_erf": "plotting", "write_run_dir": "rundir", "load_run": "rundir",
    "analyze": "analysis", "compare": "analysis", "run_sweep": "sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
