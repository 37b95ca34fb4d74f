"""Models of the app: registered names and ``timm/<name>`` architectures (when timm is installed), seeded random
init or an uploaded checkpoint read through the library's safe loader (``weights_only=True`` / safetensors), and
the layer table of the ERF explorer."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from erf_lab.errors import ErfLabError
from erf_lab.erf.receptive_field import list_layers
from erf_lab.models import create_model, list_models, reparameterize_model
from erf_lab.models.timm_models import import_timm, is_timm_name, known_timm_model

# Tiny RepLKNet used by every interactive default: the paper's 31B kernel schedule on a narrow, shallow
# body so that an ERF at 128 px over two images takes a few seconds on a 2-core CPU. 128 px (a multiple of
# the total stride 32) gives an even feature map whose centre pixel sits over the image centre, as at 1024 px.
TINY_CHANNELS = (16, 32, 64, 128)
TINY_LAYERS = (1, 1, 2, 1)
PAPER_31B_KERNELS = (31, 29, 27, 13)
DEFAULT_MODEL = "replknet_31b"


def overrides_key(overrides: dict[str, Any] | None) -> str:
    """A stable, hashable form of model overrides (JSON with sorted keys)."""
    return json.dumps(overrides or {}, sort_keys=True, default=list)


def tiny_overrides() -> str:
    """``overrides_key`` of the tiny width / depth."""
    return overrides_key({"channels": list(TINY_CHANNELS), "layers": list(TINY_LAYERS)})


def parse_overrides(overrides_json: str) -> dict[str, Any]:
    """``overrides_key`` back to keyword arguments (JSON lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(overrides_json).items()}


def parse_model_options(text: str) -> dict[str, Any]:
    """The "Model options" field: ``key=value`` items read as the command line's ``--override`` values
    (:func:`erf_lab.cli.options.parse_overrides`: Python literals, ``channels=(16,32,64,128)``), separated by spaces,
    newlines or ``;`` (the ``--override`` words and quotes of a pasted command line are ignored), or one JSON object;
    {} when empty. Lists become tuples, as in :func:`parse_overrides`."""
    import re
    import shlex

    from erf_lab.cli.options import parse_overrides as parse_cli_overrides

    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ErfLabError(f"model options: not a JSON object ({e.msg}, character {e.pos + 1})") from None
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    try:
        words = [w for w in shlex.split(text.replace(";", " ")) if w != "--override"]
    except ValueError as e:
        raise ErfLabError(f"model options: {e}") from None
    items = [i for i in re.split(r"\s+(?=[A-Za-z_]\w*\s*=)", " ".join(words)) if i]
    for item in items:
        if not item.partition("=")[0].strip().isidentifier() or "=" not in item:
            raise ErfLabError(f"model options: expected key=value items (e.g. channels=(16,32,64,128) "
                              f"layers=(1,1,1,1)), got {item!r}")
    try:
        options = parse_cli_overrides(items)
    except ErfLabError as e:
        raise ErfLabError(f"model options: {str(e).removeprefix('--override ')}") from None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def registered_models() -> list[str]:
    """Registered model names only: the app never imports ``module:factory`` code."""
    return list(list_models())


def timm_models() -> list[str]:
    """``timm/<name>`` for every timm architecture (suggestions of the model pickers); empty without timm."""
    try:
        return ["timm/" + n for n in import_timm().list_models()]
    except ErfLabError:
        return []


def fixed_input_size(name: str) -> bool:
    """True for a timm model built for one input size (ViT, Swin: ``pretrained_cfg.fixed_input_size``); the app
    then builds it at the measurement size (``img_size``)."""
    if not is_timm_name(name) or not known_timm_model(name):
        return False
    from erf_lab.models.timm_models import timm_name

    cfg = import_timm().models.get_pretrained_cfg(timm_name(name))
    return bool(getattr(cfg, "fixed_input_size", False))


def is_replknet(name: str) -> bool:
    return name.startswith("replknet")


def check_registered(name: str) -> None:
    """Registered names and timm architectures only (never ``module:factory`` code)."""
    if is_timm_name(name) and known_timm_model(name):
        return
    if ":" in name or name not in registered_models():
        raise ErfLabError(f"unknown model {name!r}; choose one of the registered models or timm/<name> (with timm "
                          "installed)")


@contextlib.contextmanager
def _upload_file(weights: bytes, weights_name: str = ""):
    """The bytes of an uploaded checkpoint as a temporary file (its suffix the user's: safetensors or pth)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("upload.safetensors" if Path(weights_name).name.endswith(".safetensors") else "upload.pth")
        path.write_bytes(weights)
        yield path


def upload_random_init(weights: bytes | None, weights_name: str = "") -> dict | None:
    """``{"seed": ...}`` when an uploaded checkpoint is marked by erf-lab as an untrained initialisation (epoch 0 of
    an ``erf-lab train`` run, ``erf-lab reparam`` of a random init: :func:`erf_lab.checkpoint.random_init_record`);
    None for any other file, or no upload."""
    from erf_lab.checkpoint import random_init_record

    if weights is None:
        return None
    with _upload_file(weights, weights_name) as path:
        return random_init_record(path)


def build_model(name: str, overrides_json: str = "{}", weights: bytes | None = None, weights_name: str = "",
                deploy: bool = False, drop_head: bool = True) -> torch.nn.Module:
    """A fresh model in eval mode (random init unless ``weights``, the bytes of an uploaded checkpoint).

    ``drop_head``: an upload whose classifier does not fit the model loads without it (the model's own, random
    head): right where the head is not used (ERF, re-param equivalence), wrong where it classifies (shape bias,
    which passes False and so shows the mismatch). Errors about the upload name the user's file ``weights_name``,
    never the server's temporary copy."""
    check_registered(name)
    overrides = parse_overrides(overrides_json)
    if weights is None:
        return create_model(name, deploy=deploy, **overrides).eval()
    shown = Path(weights_name).name or "the uploaded checkpoint"
    with _upload_file(weights, weights_name) as path:
        d = str(path.parent)
        try:
            model = create_model(name, weights=str(path), deploy=deploy, drop_head=drop_head, **overrides)
        except Exception as e:  # noqa: BLE001 - the unpickler fails with any type on a non-checkpoint
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            text = text.replace(str(path), shown).replace(d, "")
            if not isinstance(e, ErfLabError):
                text = f"cannot read checkpoint {shown} (corrupt or not a PyTorch file): {type(e).__name__}"
            elif shown not in text:
                text = f"{shown}: {text}"
            raise ErfLabError(text) from None
    return model.eval()


@st.cache_resource(max_entries=6, show_spinner=False)
def cached_model(name: str, overrides_json: str = "{}") -> torch.nn.Module:
    """Shared random-init model for read-only uses (layer listing); ``copy.deepcopy`` it before mutating."""
    return build_model(name, overrides_json)


@st.cache_data(max_entries=32, show_spinner=False)
def layer_table(name: str, overrides_json: str, input_size: int, reparameterize: bool = True) -> list[dict]:
    """``erf_lab.erf.receptive_field.list_layers``: name, output shape and theoretical RF of each layer, of the
    form the ERF is measured in (the deploy form unless ``reparameterize`` is False, as ``erf-lab layers``)."""
    model = cached_model(name, overrides_json)
    if reparameterize:
        model = reparameterize_model(model)  # a copy: the cached model stays in its train-time form
    return [dict(r) for r in list_layers(model, input_size)]


def main_layers(rows: list[dict], show_all: bool = False) -> list[dict]:
    """Stage-level layers (at most two name levels deep) plus ``forward_features``, unless ``show_all``."""
    if show_all:
        return rows
    return [r for r in rows if r["name"].count(".") <= 1 or r is rows[-1]]
