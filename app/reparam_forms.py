"""Re-parameterization page: the kernels of every large-kernel block and, for each form of the network
(train-time, official merged layout, fully fused), its parameters, FLOPs and output error, all from
``erf_lab.models`` (``deploy.official_deploy_layout``, ``reparameterize_model``, ``deploy.max_relative_error``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from app.cache import cached, sha
from app.models import build_model, upload_random_init
from erf_lab.models import reparameterize_model
from erf_lab.models.deploy import already_deployed, already_deployed_error, max_relative_error, official_deploy_layout
from erf_lab.models.reparam import randomize_bn
from erf_lab.models.flops import count_flops, count_params

FORMS = ("train-time", "merged (official deploy layout)", "fully fused (reparameterize_model)")


def _dw(w: torch.Tensor) -> np.ndarray:
    """(C, 1, K, K) depthwise kernel -> (C, K, K) float64 array."""
    return w.detach()[:, 0].double().numpy()


@torch.no_grad()
def block_kernels(model: torch.nn.Module) -> dict[str, dict]:
    """Per large-kernel block: large / small kernels as trained, both BN-fused, and the merged kernel."""
    blocks = {}
    for name, m in model.named_modules():
        if hasattr(m, "get_equivalent_kernel_bias") and getattr(m, "lkb_origin", None) is not None:
            small = m.small_conv
            blocks[name] = {"large": _dw(m.lkb_origin.conv.weight), "large_fused": _dw(m.lkb_origin.fused_weight_bias()[0]),
                            "small": None if small is None else _dw(small.conv.weight),
                            "small_fused": None if small is None else _dw(small.fused_weight_bias()[0]),
                            "merged": _dw(m.get_equivalent_kernel_bias()[0]),
                            "kernel": int(m.kernel_size), "small_kernel": m.small_kernel}
    return blocks


def reparam_report(name: str, overrides_json: str, random_bn: bool, input_size: int, seed: int = 0,
                   weights: bytes | None = None, weights_name: str = "", on_progress=None) -> dict:
    """Block kernels and ``{form: {params, flops, error}}`` (error = max|y - y'| / max|y| of the logits on a
    seeded random batch, eval mode), with the ``weights_selection`` of an upload and its ``random_init`` mark
    (:func:`app.models.upload_random_init`); ``on_progress(fraction, text)`` before each step; cached across
    sessions."""
    key = "reparam:" + json.dumps([name, overrides_json, random_bn, input_size, seed, sha(weights), weights_name])
    return cached(key, lambda: _report(name, overrides_json, random_bn, input_size, seed, weights, weights_name,
                                       on_progress or (lambda frac, text: None)))


def _report(name, overrides_json, random_bn, input_size, seed, weights, weights_name, step) -> dict:
    step(0.0, "building the model")
    torch.manual_seed(seed)
    model = build_model(name, overrides_json, weights, weights_name)
    if weights is not None and already_deployed(model):  # its three forms would be one: say so instead
        raise already_deployed_error(Path(weights_name).name or "the uploaded checkpoint", name,
                                     json.loads(overrides_json))
    if random_bn:
        randomize_bn(model, seed + 1)
    step(0.2, "reading the kernels of every block")
    blocks = block_kernels(model)
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    forms = {}
    with torch.no_grad():
        step(0.4, "train-time forward")
        y = model(x)
        for form, convert, frac in zip(FORMS, (None, official_deploy_layout, reparameterize_model), (0.4, 0.6, 0.8)):
            if convert is not None:
                step(frac, f"{form}: convert and forward")
            m = model if convert is None else convert(model)  # both convert a copy
            forms[form] = {"params": count_params(m), "flops": count_flops(m, input_size),
                           "error": 0.0 if convert is None else max_relative_error(y, m(x))}
    step(1.0, "done")
    return {"blocks": blocks, "forms": forms, "input_size": input_size,
            "weights_selection": getattr(model, "weights_selection", None),  # which part of the upload loaded
            "random_init": upload_random_init(weights, weights_name)}  # an upload marked untrained: its {"seed"}
