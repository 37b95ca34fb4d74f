"""timm-style model registry: ``register_model``, ``create_model``, ``list_models``."""
from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Callable

import torch.nn as nn

from erf_lab.errors import ErfLabError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


#: turns a model built as trained into its family's official deploy layout in place where it has one (else leaves
#: it): :mod:`erf_lab.models.deploy` registers it when the package is imported (:func:`register_deploy_layout`);
#: the registry does not import it, as deploy builds its models through the registry
_deploy_layout: Callable[[nn.Module], None] | None = None


def register_deploy_layout(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Set the function :func:`create_model` merges a training-time checkpoint with when ``deploy=True``."""
    global _deploy_layout
    _deploy_layout = fn
    return fn


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a constructor ``fn(**overrides) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models(filter: str | Sequence[str] = "", pretrained: bool = False,
                exclude_filters: str | Sequence[str] = "") -> list[str]:
    """Names of the registered models, sorted; as timm's ``list_models``: ``filter`` a wildcard pattern (or a
    list of them, any may match; ``"unireplknet_*"``), ``exclude_filters`` patterns that drop a name,
    ``pretrained=True`` only the models that load published weights (:func:`pretrained_models`)."""
    def patterns(p) -> list[str]:
        return [p] if isinstance(p, str) else list(p)

    names = sorted(_MODELS)
    include, exclude = [p for p in patterns(filter) if p], [p for p in patterns(exclude_filters) if p]
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return [n for n in names if _has_weights(n)] if pretrained else names


def _has_weights(name: str) -> bool:
    return "pretrained" in inspect.signature(_MODELS[name]).parameters


def pretrained_models() -> list[str]:
    """Registered models that can load published weights (``pretrained=True``), sorted."""
    return list_models(pretrained=True)


def is_model(name: str) -> bool:
    return name in _MODELS


def _import_user_module(module_name: str):
    """``module_name`` from the installed packages, else from the current folder, as ``python -m erf_lab`` finds it:
    the ``erf-lab`` console script's ``sys.path`` lacks the current folder, so ``--model mymodels:net`` beside the
    user's ``mymodels.py`` was "No module named 'mymodels'" there. The folder is appended, so that it never shadows
    an installed package, and kept, for the modules the factory imports later."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != module_name.partition(".")[0] or {"", ".", here} & set(sys.path):
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def _resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in _MODELS:
        return _MODELS[name]
    from erf_lab.models.timm_models import is_timm_name, timm_factory

    if is_timm_name(name):  # timm/<name> or timm:<name>
        return timm_factory(name)
    if ":" in name:  # user model: package.module:factory
        module_name, _, attr = name.partition(":")
        if not all(part.isidentifier() for part in module_name.split(".")):  # importlib: TypeError / ValueError
            raise ErfLabError(f"model {name!r}: {module_name!r} is not a module name (package.module:factory, "
                              "importable from the current folder or the installed packages; not a file path)")
        try:
            module = _import_user_module(module_name)
        except ImportError as e:
            raise ErfLabError(f"cannot import module {module_name!r} for model {name!r}: {e}") from None
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ErfLabError(f"module {module_name!r} has no callable {attr!r} (model {name!r})")
        return factory
    # the names are lower case with '_': 'RepLKNet-31B' is replknet_31b (difflib alone ranked replknet_31l first)
    key = name.strip().lower().replace("-", "_")
    close = [m for m in list_models() if m == key] or difflib.get_close_matches(key, list_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run 'erf-lab models' for the list"
    raise ErfLabError(f"unknown model {name!r}{hint}")


def create_model(name: str, *, weights: str | None = None, deploy: bool = False,
                 drop_head: bool = False, **overrides) -> nn.Module:
    """Build a registered model (or ``timm/<name>``, ``timm:<name>``, ``package.module:factory``), optionally
    load ``weights``.

    ``deploy=True`` builds re-parameterizable models in their merged (inference) form. A checkpoint in a
    merged layout (``lkb_reparam`` keys; UniRepLKNet's ``lk_origin.bias``) implies ``deploy=True``, a factory's
    ``options_implied_by(state_dict)`` the options its key names imply (SLaK: ``decompose``, ``bn``); a training-time
    checkpoint with ``deploy=True`` loads as trained and is then merged into the official deploy layout.
    ``drop_head=True`` loads a checkpoint whose classifier has a different class count (or is absent on one
    side), keeping the model's own head; a classifier that fits is loaded.
    ``weights="builtin:NAME"`` loads a model shipped under ``data/trained/`` with the options it was trained with
    (its JSON record; explicit ``overrides`` win). Which part of the file loaded (its entry, a ``backbone.`` part):
    ``model.weights_selection`` (:func:`erf_lab.checkpoint.weights_selection`).
    """
    from erf_lab.models.timm_models import is_timm_name

    factory = _resolve_factory(name)
    state_dict = selection = None
    if weights is not None:
        from erf_lab.checkpoint import read_weights

        overrides = build_options(name, weights, overrides)  # a builtin: model brings the options it was trained with
        state_dict, selection = read_weights(weights)  # and which part of the file they are (model.weights_selection)
        if _implies_deploy(state_dict):
            deploy = True
        implied = getattr(factory, "options_implied_by", None)  # the layout the file's key names fix (SLaK's bn)
        if implied is not None:
            overrides = {**implied(state_dict), **overrides}  # what is passed explicitly wins
    kwargs = dict(overrides)
    if "num_classes" in kwargs:
        n = kwargs["num_classes"]
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ErfLabError(f"num_classes must be a whole number >= 0 (0 or None: no classifier head), got {n!r}")
    if "pretrained" in kwargs and not kwargs["pretrained"] and name in _MODELS and not _has_weights(name):
        del kwargs["pretrained"]  # timm's default, passed explicitly (create_model(name, pretrained=False)): no-op
    if kwargs.get("pretrained") and name in _MODELS and not _has_weights(name):
        raise ErfLabError(f"model {name!r} has no published weights in erf-lab; pass a file (--weights) or use a "
                          f"model that ships them: {', '.join(pretrained_models())} (timm/<name> downloads its own)")
    if deploy and not is_timm_name(name):  # timm models have no deploy flag (re-parameterized when measured)
        kwargs["deploy"] = True
    # deploy asked for with a training-time file (RepLKNet's official scripts build the model as trained, load, then
    # merge): loaded as trained, then merged into the official deploy layout (as a deploy file builds it)
    merge = state_dict is not None and name in _MODELS and bool(kwargs.get("deploy")) \
        and not _implies_deploy(state_dict)
    if merge:
        kwargs["deploy"] = False
    known = name in _MODELS or is_timm_name(name)
    model = None
    if state_dict is not None and known and not drop_head and not kwargs.get("pretrained"):
        model = _build_uninitialized(name, factory, kwargs)
        if model is not None:
            _load_named(model, state_dict, weights, name, overrides, selection=selection)  # strict: all overwritten
    if model is None:
        model = _build(name, factory, kwargs)
        if state_dict is not None:
            # the dropped classifier's keys keep their random init: recorded, so what writes the weights can say so
            model.random_init_keys = _load_named(model, state_dict, weights, name, overrides, drop_head=drop_head,
                                                 selection=selection)
    if merge and _deploy_layout is not None:
        _deploy_layout(model)
    return model


def build_options(name: str, weights: str | None, overrides: dict) -> dict:
    """The constructor options that :func:`create_model` builds ``name`` with for ``weights``: a ``builtin:`` model's
    recorded options and class count under the explicit ``overrides``; ``overrides`` as given for any other file.
    ErfLabError when the shipped weights belong to another model."""
    from erf_lab.checkpoint import resolve_weights

    record = resolve_weights(weights)[1] if weights is not None else {}
    if not record:
        return dict(overrides)
    if record.get("model") not in (None, name):
        raise ErfLabError(f"{weights} are weights of {record['model']!r}, not of {name!r}")
    return {**record.get("overrides", {}), "num_classes": record["num_classes"], **overrides}


def _load_named(model: nn.Module, state_dict, weights, name: str, overrides: dict, drop_head: bool = False,
                selection: dict | None = None) -> list:
    """:func:`erf_lab.checkpoint.load_weights`; a file that does not fit the model asked for names, in its error,
    the registered model its tensors are of (:func:`models_matching`), and for a file of an ``erf-lab train`` run the
    model and options the run trained (its checkpoints hold tensors only)."""
    from erf_lab.checkpoint import load_weights, trained_options_hint
    from erf_lab.errors import CheckpointError

    try:
        return load_weights(model, state_dict, drop_head=drop_head, source=str(weights), selection=selection)
    except CheckpointError as e:
        saved = ""
        if (tensors := getattr(e, "file_tensors", None)) is not None and (match := models_matching(tensors)):
            saved = (f"; the file's tensors are those of {' / '.join(match)} with its default options (--model "
                     f"{match[0]}, no --override)")
        elif (options := getattr(_MODELS.get(name), "options_hint", None)) is not None:
            saved = options(state_dict, overrides)  # the options its tensors' shapes fix (SLaK: its kernel sizes)
        hint = trained_options_hint(weights, name, overrides)
        if not (saved or hint):
            raise
        raise CheckpointError(f"{e}{saved}{hint}") from None


def _build(name: str, factory, kwargs: dict) -> nn.Module:
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as e:  # an unknown option, or a value it cannot take (num_classes=abc)
        raise ErfLabError(f"model {name!r} does not accept these options: {e}") from None
    if not isinstance(model, nn.Module):  # a package.module:factory that builds something else
        raise ErfLabError(f"model {name!r}: its factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_uninitialized(name: str, factory, kwargs: dict) -> nn.Module | None:
    """The model with allocated but uninitialized tensors, when a strict checkpoint load will overwrite all of
    them (skips the random initialization: 0.5 s for replknet_31b, 1.4 s for XL on the 2-core dev box). None when the
    model holds a tensor outside its state dict (a non-persistent buffer), which the load would not set."""
    import torch

    with torch.device("meta"):
        model = _build(name, factory, kwargs)
    persistent = set(model.state_dict(keep_vars=True))
    everything = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    everything |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    if not everything <= persistent:
        return None
    from erf_lab.models.initialization import materialize

    return materialize(model)


def _implies_deploy(state_dict) -> bool:
    """A merged layout: RepLKNet / SLaK ``lkb_reparam``, UniRepLKNet's biased ``dwconv.lk_origin``."""
    return any(".lkb_reparam." in "." + k or k.endswith(".dwconv.lk_origin.bias") for k in state_dict)


def models_matching(state_dict) -> list[str]:
    """The registered models whose tensors, the classifier aside, have the names and shapes of ``state_dict``'s when
    built with their default options (in the merged form for a merged checkpoint): what a checkpoint that fits no
    asked-for model was saved from. Built on the meta device (no memory, ~0.1 s each), once per process."""
    import erf_lab.models  # noqa: F401  (registers every architecture)

    deploy = _implies_deploy(state_dict)
    found = []
    for name in list_models():
        heads, own = _default_tensor_shapes(name, deploy)
        if own and own == {k: tuple(v.shape) for k, v in state_dict.items()
                           if not k.startswith(heads) and k.rpartition(".")[2] != "num_batches_tracked"}:
            found.append(name)
    return found


@functools.lru_cache(maxsize=None)
def _default_tensor_shapes(name: str, deploy: bool) -> tuple[tuple[str, ...], dict]:
    """(classifier prefixes, {name: shape} of every other tensor) of ``name`` built with its default options
    (``deploy=True``: merged); ((), {}) for a model without that form."""
    import torch

    from erf_lab.checkpoint import _head_prefixes

    try:
        with torch.device("meta"):
            model = _MODELS[name](**({"deploy": True} if deploy else {}))
    except Exception:  # noqa: BLE001  (no merged form, or a model that cannot be built here)
        return (), {}
    heads = _head_prefixes(model)
    return heads, {k: tuple(v.shape) for k, v in model.state_dict().items()
                   if not k.startswith(heads) and k.rpartition(".")[2] != "num_batches_tracked"}
