"""Per-machine memo of what a model's *structure* determines, so a repeated run does not compute it again: its
FLOPs per image (``erf_lab.erf.roofline``) and its layer geometry (``erf_lab.erf.runner.layer_geometry``).

Keys: :func:`structure_key` (weights never count). Tables: small JSON files in the erf-lab cache folder, rewritten
atomically; an unreadable or unwritable table is treated as empty (the value is then computed, as without it).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from typing import Any

import torch.nn as nn


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def _class_source(cls: type) -> str | None:
    """A digest of the file that defines ``cls``; for a class without one (defined in a notebook, ``python -c``
    or stdin) a digest of its functions' bytecode and constants, so an edited class still gets a new key."""
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # a built-in class, or one defined in a __main__ without a file
        path = None
    digest = _file_digest(path) if path else None
    if digest is not None:
        return digest
    h = hashlib.sha256()
    for name, v in sorted(vars(cls).items()):
        code = getattr(getattr(v, "__func__", v), "__code__", None)
        if code is not None:
            h.update(name.encode() + code.co_code + repr(code.co_consts).encode())
    return "code:" + h.hexdigest()[:16]


_PRIMITIVE = (bool, int, float, str, type(None))


def _settings(m: nn.Module) -> list:
    """A module's plain settings that ``forward`` may read beyond its ``repr`` (e.g. a container's pooling mode or
    a flag), as (name, value) pairs: attributes holding numbers, strings, None or tuples / lists of them; the
    train / eval flag is left out (it changes neither FLOPs nor geometry)."""
    out = []
    for k, v in sorted(vars(m).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PRIMITIVE) or (isinstance(v, (tuple, list)) and all(isinstance(e, _PRIMITIVE) for e in v)):
            out.append((k, v))
    return out


def structure_key(model: nn.Module, *parts: Any) -> str:
    """A digest of everything a model's FLOPs and layer geometry depend on, weights aside: the erf-lab and torch
    versions, every module's name, class, ``extra_repr`` (kernel sizes, strides, padding, dilation, groups) and
    plain settings (:func:`_settings`), every tensor's name and shape, the source of the modules' classes (a
    custom model whose ``forward`` changed gets a new key), and ``parts`` (layer, input size ...). Code outside
    the modules' own classes (a helper function in another file) is not covered: erf-lab's version is."""
    import torch

    import erf_lab

    classes = sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__))
    key = [erf_lab.__version__, torch.__version__, [json.dumps(p, default=str) for p in parts],
           [(n, type(m).__qualname__, m.extra_repr(), _settings(m)) for n, m in model.named_modules()],
           [(n, list(t.shape)) for n, t in (*model.named_parameters(), *model.named_buffers())],
           [(c.__module__, c.__qualname__, _class_source(c)) for c in classes]]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:32]


def cached(table: str, key: str) -> Any:
    """The value stored under ``key`` in the cache table ``table`` (a file name), else None."""
    from erf_lab.paths import cache_dir

    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return json.loads((cache_dir() / table).read_text()).get(key)
    return None


def store(table: str, key: str, value: Any) -> None:
    """Remember ``value`` under ``key`` in ``table`` (merged under the table's lock with what other processes
    stored, atomic rewrite: ``fastconv.jsonstore``; a cache that cannot be written is skipped)."""
    from fastconv import jsonstore

    from erf_lab.paths import cache_dir

    with contextlib.suppress(OSError, ValueError, TypeError):
        jsonstore.store(cache_dir() / table, key, value)
