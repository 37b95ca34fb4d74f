"""Any timm model by name: ``timm/<name>`` or ``timm:<name>`` (timm is the optional extra ``.[timm]``).

The model is built by ``timm.create_model(name, pretrained=..., **overrides)``; weights from a file go through
:mod:`erf_lab.checkpoint` like every other model (strict, never unpickled). Preprocessing comes from the model's
own ``pretrained_cfg`` (:func:`erf_lab.erf.images.model_data_config`).
"""
from __future__ import annotations

import functools
import os

import torch.nn as nn

from erf_lab.errors import ErfLabError

PREFIXES = ("timm/", "timm:")
INSTALL_HINT = "pip install -e '.[timm]'"


def is_timm_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES) and len(name) > len(PREFIXES[0])


def timm_name(name: str) -> str:
    """``timm/resnet50`` / ``timm:resnet50`` -> ``resnet50``."""
    return name[len(PREFIXES[0]):]


def import_timm():
    """The ``timm`` module, or an ErfLabError saying how to install it."""
    try:
        import timm
    except ImportError as e:
        raise ErfLabError(f"timm models need the optional extra: {INSTALL_HINT} ({e})") from None
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision built for another torch fails with RuntimeError
        raise ErfLabError(f"timm is installed but cannot be imported ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); reinstall it: {INSTALL_HINT}") from None
    return timm


def known_timm_model(name: str) -> bool:
    """True when timm is importable and ``name`` (with or without the prefix) is one of its architectures."""
    try:
        timm = import_timm()
    except ErfLabError:
        return False
    base = timm_name(name) if is_timm_name(name) else name
    return bool(timm.is_model(base.split(".", 1)[0]))


def timm_factory(name: str):
    """A constructor ``(**overrides) -> nn.Module`` for ``timm/<name>`` (the registry's factory interface)."""
    timm = import_timm()
    base = timm_name(name)
    if not timm.is_model(base.split(".", 1)[0]):  # 'resnet50.a1_in1k': architecture.pretrained-tag
        import difflib

        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ErfLabError(f"unknown timm model {base!r}{hint}")
    return functools.partial(build_timm_model, base)


#: the weight files timm asks the Hugging Face Hub for (its default, the safetensors alternative, open_clip's)
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")


def check_hub_weights(timm, base: str, cache_dir=None) -> None:
    """One ErfLabError line where timm would fetch ``base``'s published weights from the Hugging Face Hub, they are
    not in the local Hugging Face cache, and the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set): offline,
    huggingface_hub retried for about 50 s, printing some 20 'Retrying' lines, before the error. One HEAD request
    without retries decides; weights in the cache are left to timm, which reads them offline without retrying, and
    any answer of the hub (a missing file, a gated repository) to timm's own download and error."""
    try:
        import huggingface_hub as hub
        import huggingface_hub.constants as hub_constants
        from huggingface_hub.utils import HfHubHTTPError

        cfg = timm.models.get_pretrained_cfg(base)
    except Exception:  # noqa: BLE001 - another timm / huggingface_hub: timm's own download decides
        return
    hub_id = getattr(cfg, "hf_hub_id", None)
    if (not hub_id or cfg.file or cfg.state_dict or (cfg.source or "hf-hub") != "hf-hub"
            or os.environ.get("TIMM_USE_OLD_CACHE", "0") not in ("", "0")):
        return
    repo_id, _, revision = hub_id.partition("@")
    names = dict.fromkeys(n for n in (cfg.hf_hub_filename, *HUB_WEIGHT_FILES) if n)
    if any(isinstance(hub.try_to_load_from_cache(repo_id, n, cache_dir=cache_dir, revision=revision or None), str)
           for n in names):
        return
    if getattr(hub_constants, "HF_HUB_OFFLINE", False):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            hub.get_hf_file_metadata(hub.hf_hub_url(repo_id, next(iter(names)), revision=revision or None),
                                     timeout=hub_constants.HF_HUB_ETAG_TIMEOUT)
            return
        except HfHubHTTPError:
            return
        except Exception as e:  # noqa: BLE001 - no answer at all: DNS, refused, timed out, a proxy's error
            first = str(e).splitlines()[0] if str(e) else ""
            reason = f"the hub cannot be reached ({type(e).__name__}: {first})"
    raise ErfLabError(f"cannot get the pretrained weights of timm/{base}: {hub_id} is not in the local Hugging Face "
                      f"cache ({cache_dir or hub_constants.HF_HUB_CACHE}) and {reason}; download them once on a "
                      f"network, or pass --weights FILE instead")


def build_timm_model(base: str, *, pretrained: bool = False, **overrides) -> nn.Module:
    """``timm.create_model(base, pretrained=pretrained, **overrides)``, with the classifier prefix recorded as
    ``head_names`` (for ``drop_head`` loading); a failed weight download is an ErfLabError. Published weights
    with another ``num_classes`` than theirs keep a new, random classifier (timm's fine-tuning start): its keys
    are listed in ``model.random_init_keys``, as :func:`~erf_lab.models.create_model` lists those ``drop_head``
    leaves."""
    timm = import_timm()
    if pretrained and not {"pretrained_cfg", "pretrained_cfg_overlay"} & overrides.keys():
        check_hub_weights(timm, base, overrides.get("cache_dir"))
    try:
        model = timm.create_model(base, pretrained=bool(pretrained), **overrides)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise ErfLabError(f"cannot get the pretrained weights of timm/{base} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pass --weights FILE instead") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if classifier:
        model.head_names = tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier,)
    if pretrained and classifier and overrides.get("num_classes", cfg.get("num_classes")) != cfg.get("num_classes"):
        from erf_lab.checkpoint import _head_prefixes

        model.random_init_keys = sorted(k for k in model.state_dict() if k.startswith(_head_prefixes(model)))
    return model
