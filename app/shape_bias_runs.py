"""Shape-bias page: ``erf_lab.shape_bias.evaluate.run_shape_bias`` into an app run directory."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from app.cache import sha
from app.models import build_model, check_registered, parse_overrides, upload_random_init
from app.runs import app_runs_dir
from erf_lab.shape_bias.evaluate import run_shape_bias

SHAPE_BIAS_MODELS = ("efficientnet_lite0", "resnet50", "mobilenetv2", "replknet_31b")


def shape_bias_run_dir(model_name: str, *, pretrained: bool, limit: int, overrides_json: str = "{}",
                       weights: bytes | None = None) -> Path:
    """The app's run directory of these settings (it may not exist yet)."""
    check_registered(model_name)
    # "whole": the stimulus geometry (model-vs-human's whole images); results of the earlier crop are not reused
    tag = hashlib.sha256(json.dumps([model_name, pretrained, limit, overrides_json, sha(weights), "whole"]).encode()
                         ).hexdigest()[:12]
    return app_runs_dir() / f"shape-bias-{model_name}-{tag}"


def is_complete(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a finished shape-bias run."""
    return (run_dir / "summary.json").is_file() and (run_dir / "decisions.csv").is_file()


def shape_bias_run(model_name: str, *, pretrained: bool, limit: int, overrides_json: str = "{}",
                   weights: bytes | None = None, weights_name: str = "", on_progress=None) -> Path:
    """The run directory of ``model_name`` on ``limit`` cue-conflict images (reused when it already holds the
    result); random init, and an upload marked as one, is seeded and marked as untrained in the results
    (``random_weights``).
    ``on_progress(set_name, done, total)`` after every batch."""
    out = shape_bias_run_dir(model_name, pretrained=pretrained, limit=limit, overrides_json=overrides_json,
                             weights=weights)
    if is_complete(out):
        return out
    torch.manual_seed(0)
    overrides = parse_overrides(overrides_json)
    if pretrained:
        overrides["pretrained"] = True
    model = build_model(model_name, json.dumps(overrides), weights, weights_name, drop_head=False)  # it classifies
    # an upload erf-lab marked as an untrained initialisation (a train run's epoch 0) is random init too
    marked = upload_random_init(weights, weights_name)
    run_shape_bias(model_name, out=out, model=model, pretrained=pretrained, overrides=overrides or None,
                   limit=int(limit), batch_size=16, workers=0, show_progress=False,
                   allow_random=(weights is None and not pretrained) or marked is not None,
                   seed=0 if marked is None or marked["seed"] is None else marked["seed"],
                   command=["streamlit", "app/main.py", "(shape-bias page)"], on_progress=on_progress)
    return out
