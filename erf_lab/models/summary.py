"""Describe registered models: parameters, FLOPs at 224 (multiply-accumulates, as in the RepLKNet paper's
tables), kernel sizes and the parameter and FLOP counts of the deploy (re-parameterized) form, the form the
RepLKNet and UniRepLKNet papers' tables count.

Models are built on the ``meta`` device (no memory, no initialisation cost), so even RepLKNet-XL is
described in well under a second; results are cached per process.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

from erf_lab.models.registry import create_model, list_models

FIELDS = ("name", "family", "params", "flops_224", "kernel_sizes", "deploy_params", "deploy_flops_224")


def model_kernel_sizes(model: nn.Module) -> list[int]:
    """The kernel sizes that characterise ``model``: RepLKNet's per-stage ``large_kernel_sizes``, else the
    model's ``kernel_sizes`` attribute, else the distinct spatial sizes (> 1) of its convolutions."""
    for attr in ("large_kernel_sizes", "kernel_sizes"):
        ks = getattr(model, attr, None)
        if ks is not None:
            return [int(k) for k in ks]
    sizes = {max(m.kernel_size) for m in model.modules() if isinstance(m, nn.Conv2d)}
    return sorted(k for k in sizes if k > 1)


def model_family(model: nn.Module) -> str:
    """Architecture family: the model module's file name (``resnet``, ``mobilenetv2``, ``replknet``, ...)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def _build_meta(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **overrides)


def describe_model(name: str) -> dict:
    """``dict(name, family, params, flops_224, kernel_sizes, deploy_params, deploy_flops_224)`` of a registered
    model.

    ``flops_224`` counts the conv / linear multiply-accumulates for one 224x224 image (what the papers' tables call
    FLOPs). ``deploy_params`` / ``deploy_flops_224`` are the counts of the ``deploy=True`` form (RepLKNet: small
    kernels merged into the large ones, Ding et al. 2022 Sec. 3), the form the RepLKNet and UniRepLKNet tables count
    (UniRepLKNet-A: 0.64 G deployed, printed 0.6 G, 0.67 G in training form); equal to ``params`` / ``flops_224``
    for models without re-parameterizable branches. Unknown names raise ``ErfLabError``. Cached per process (a
    fresh copy is returned).
    """
    return copy.deepcopy(_describe(name))


@functools.lru_cache(maxsize=None)
def _describe(name: str) -> dict:
    from erf_lab.models.flops import count_flops, count_params  # imported on use: torch.func is slow to import

    model = _build_meta(name)
    params, flops = count_params(model), count_flops(model, 224)
    if any(hasattr(m, "reparameterize") for m in model.modules()):
        deployed = _build_meta(name, deploy=True)
        deploy_params, deploy_flops = count_params(deployed), count_flops(deployed, 224)
    else:
        deploy_params, deploy_flops = params, flops
    return dict(name=name, family=model_family(model), params=params, flops_224=flops,
                kernel_sizes=model_kernel_sizes(model), deploy_params=deploy_params, deploy_flops_224=deploy_flops)


def describe_models(names: list[str] | None = None, family: str | None = None,
                    show_progress: bool = False) -> list[dict]:
    """Descriptions of ``names`` (default: every registered model), optionally of one ``family`` only."""
    named = bool(names)
    names = list(dict.fromkeys(names)) if names else list_models()  # a name given twice: one row
    if show_progress:
        from erf_lab.io import progress

        names_iter = progress(names, desc="describing models", unit="model")
    else:
        names_iter = names
    rows = [describe_model(n) for n in names_iter]
    if family is not None:
        families = sorted({r["family"] for r in rows})
        rows = [r for r in rows if r["family"] == family]
        if not rows:
            from erf_lab.errors import ErfLabError

            which = "of the models named" if named else "registered"
            raise ErfLabError(f"no model of family {family!r}; families {which}: {', '.join(families)}")
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table: name, family, params (M), GFLOPs at 224, kernel sizes, deploy params (M), deploy GFLOPs
    at 224."""
    header = ("model", "family", "params (M)", "GFLOPs@224", "kernel sizes", "deploy params (M)", "deploy GFLOPs@224")
    body = [(r["name"], r["family"], f"{r['params'] / 1e6:.2f}", f"{r['flops_224'] / 1e9:.2f}",
             ",".join(str(k) for k in r["kernel_sizes"]), f"{r['deploy_params'] / 1e6:.2f}",
             f"{r['deploy_flops_224'] / 1e9:.2f}") for r in rows]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    right = {2, 3, 5, 6}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)]
    if slak := slak_paper_counting(rows):  # the paper's "#params" and "FLOPs" are not what the table counts
        lines += ["", *slak]
    return "\n".join(lines)


def slak_paper_counting(rows: list[dict]) -> list[str]:
    """Lines for the SLaK variants among ``rows`` (none without them): the paper's counts of the non-zero weights of
    its trained sparse models beside those of 40 % zeros in every conv and linear layer, and why the FLOPs differ
    (:mod:`erf_lab.models.slak`)."""
    from erf_lab.models.slak import PAPER_SPARSITY, VARIANTS, sparse_param_count

    rows = [r for r in rows if r["family"] == "slak" and r["name"] in VARIANTS]
    if not rows:
        return []
    sparsity = f"{PAPER_SPARSITY:.0%}"
    lines = [f"slak: params and GFLOPs of the dense weights; the paper counts only the non-zero weights of its "
             f"trained {sparsity}-sparse models"]
    for r in rows:
        paper = VARIANTS[r["name"]]
        params = sparse_param_count(_build_meta(r["name"]), PAPER_SPARSITY)
        flops = (1 - PAPER_SPARSITY) * r["flops_224"]
        lines.append(f"  {r['name']}: paper {paper['params_m']}M / {paper['gflops']}G; {sparsity} of every conv and "
                     f"linear weight zero: {params / 1e6:.2f}M / {flops / 1e9:.2f}G")
    lines += ["  (the parameters follow from the sparsity, the FLOPs from where SNIP put the zeros: the stem, "
              "downsampling and", "  head stayed dense, the blocks sparser; only a trained checkpoint's zeros fix "
              "them: erf-lab reparam --weights FILE prints its counts)"]
    return lines
