"""Shape-bias probes on the cue-conflict stimuli of Geirhos et al. (ICLR 2019), model-vs-human style.

Names load on first use (PEP 562): importing a light submodule (e.g. ``download`` for ``erf-lab --help``) does not
pull in torch or matplotlib.
"""
from __future__ import annotations

import importlib

_ATTRS = {"shape_bias_from_csv": "analysis", "shape_bias_from_decisions": "analysis", "write_mvh_csv": "analysis",
          "CATEGORIES": "categories", "imagenet_to_16": "categories", "parse_name": "stimuli",
          "run_shape_bias": "evaluate", "compare_runs": "plotting"}

__all__ = ["CATEGORIES", "imagenet_to_16", "parse_name", "shape_bias_from_csv", "shape_bias_from_decisions",
           "write_mvh_csv", "run_shape_bias", "compare_runs"]


def __getattr__(name: str):
    if name in _ATTRS:
        value = getattr(importlib.import_module(f"erf_lab.shape_bias.{_ATTRS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'erf_lab.shape_bias' has no attribute {name!r}")
