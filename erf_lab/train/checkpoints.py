"""Checkpoints of a training run.

* Weights, in the official RepLKNet layout: ``{"model": state_dict}`` saved with ``torch.save`` (``.pth``, plus
  an ``erf_lab`` entry with the training size / random-init mark that official loaders ignore) and the same tensors
  as ``.safetensors`` (the facts in its metadata); both load with ``create_model(name, weights=path, **overrides)``.
* With an EMA of the weights (``--ema``), each epoch's EMA too: ``epoch_NNN_ema.safetensors`` (from epoch 1: at
  epoch 0 the EMA is the initialisation, ``epoch_000``), as the run's final ``model_ema.safetensors``.
* The training state (``.train_state.pt``): weights, optimizer, AMP scaler, EMA, epoch, step, position in the
  epoch, partial-epoch sums (loss, accuracy per rank; images, seconds), metrics rows and the RNG states of torch /
  numpy / python, all as tensors, lists and numbers, so it loads with ``torch.load(weights_only=True)``. Saved
  atomically: the file is the commit point of ``--resume``.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from erf_lab.checkpoint import blocked_global, load_failure
from erf_lab.errors import ErfLabError
from erf_lab.io import atomic_path

STATE_FILE = ".train_state.pt"
#: what a training state holds (besides the AMP scaler, EMA and img/s counters, which may be empty or absent)
STATE_KEYS = ("settings", "model", "optimizer", "epoch", "position", "step", "rows", "sums", "rng")
WEIGHT_FORMATS = ("pth", "safetensors", "both")


def save_weights(state_dict: dict, stem: str | os.PathLike, fmt: str = "both",
                 extra: dict | None = None, random_init_seed: int | None = None,
                 train_input_size: int | None = None, classes: list[str] | None = None) -> list[Path]:
    """Write ``stem.pth`` (``{"model": sd, **extra}``) and / or ``stem.safetensors`` atomically. With
    ``random_init_seed`` (the weights are the untrained initialisation, epoch 0) each file is marked as a random
    init, as ``erf-lab reparam`` marks one (:func:`erf_lab.checkpoint.random_init_record`); measurements on it then
    say so. ``train_input_size`` (the training resolution) is recorded too, so a file copied out of its run folder
    still says what it was trained at (:func:`erf_lab.checkpoint.training_input_size`), and ``classes`` (a folder
    run's class names, the head's outputs in order; :func:`erf_lab.checkpoint.training_classes`). The facts live in
    the file itself: the safetensors metadata, and the .pth's ``erf_lab`` entry beside ``model``
    (:func:`erf_lab.checkpoint.pth_record`), which loaders of the official layout ignore."""
    from erf_lab.checkpoint import PTH_RECORD_KEY, pth_record, safetensors_facts, weights_facts

    if fmt not in WEIGHT_FORMATS:
        raise ErfLabError(f"unknown checkpoint format {fmt!r}; choose {', '.join(WEIGHT_FORMATS)}")
    stem = Path(stem)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    facts = weights_facts(random_init_seed=random_init_seed, input_size=train_input_size, classes=classes)
    out = []
    if fmt in ("pth", "both"):
        path = stem.with_name(stem.name + ".pth")
        record = pth_record(sd, facts)
        with atomic_path(path) as tmp:
            torch.save({"model": sd, **(extra or {}), **({PTH_RECORD_KEY: record} if record else {})}, tmp)
        out.append(path)
    if fmt in ("safetensors", "both"):
        from safetensors.torch import save_file

        path = stem.with_name(stem.name + ".safetensors")
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=safetensors_facts(facts))
        out.append(path)
    return out


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors / lists / numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                    "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
          "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(out_dir: str | os.PathLike, state: dict) -> Path:
    path = Path(out_dir) / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_state(out_dir: str | os.PathLike) -> dict:
    """The training state of the run in ``out_dir`` (weights-only unpickling: no code runs)."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        raise ErfLabError(f"nothing to resume in {out_dir}: no interrupted training run there ({STATE_FILE} missing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        what = "refusing to load the training state" if blocked_global(e) else "cannot read the training state"
        raise ErfLabError(f"{what} {path}: {load_failure(e)}; start again with --force") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ErfLabError(f"{path} is not an erf-lab training state (no {missing[0]!r}); start again with --force")
    kinds = {"settings": dict, "model": dict, "optimizer": dict, "epoch": int, "position": int, "step": int,
             "rows": list, "sums": (list, torch.Tensor), "rng": list}
    wrong = [k for k, kind in kinds.items() if not isinstance(state[k], kind) or isinstance(state[k], bool)]
    if wrong:
        raise ErfLabError(f"{path} is a damaged training state ({wrong[0]!r} is a {type(state[wrong[0]]).__name__}); "
                          f"start again with --force")
    return state
