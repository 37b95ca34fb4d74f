"""Safe checkpoint loading: ``weights_only`` pickles and safetensors, never arbitrary code.

Accepts a raw state dict or one wrapped in ``model`` / ``state_dict`` / ``model_ema`` / ``state_dict_ema`` / ...
(raw weights before their EMA, with a warning where a file holds both), strips ``module.``
(DataParallel / DDP) and ``_orig_mod.`` (``torch.compile``) prefixes, and reports missing / unexpected /
mis-shaped keys by name. What of the file loaded (its entry, the weights passed over, the prefixes stripped, a
``backbone.`` part) is recorded with the results (:func:`weights_selection`).

The facts erf-lab records about weights it writes (a random initialisation and its seed; the training input size;
the class names of a classifier trained on a folder) travel inside the file: safetensors metadata, and in a ``.pth``
an ``erf_lab`` entry beside ``model`` (:func:`pth_record`), so a file copied alone keeps them. ``<file>.run.json``
sidecars of older files still count.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from erf_lab.errors import CheckpointError

#: entries that hold a checkpoint's weights, the raw ones first (what the official and timm scripts load), then their
#: EMA (ConvNeXt-style ``model_ema``, timm's ``state_dict_ema`` of ``ModelEmaV2/V3``, ``ema``)
_WRAPPER_KEYS = ("state_dict", "model", "module", "net", "model_ema", "state_dict_ema", "ema")
#: key prefixes of wrapped models: DataParallel / DDP (``module.``), ``torch.compile`` (``_orig_mod.``)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: ``builtin:NAME`` names a model shipped under ``data/trained/``: ``NAME.safetensors`` and ``NAME.json``
BUILTIN_PREFIX = "builtin:"
#: safetensors metadata of weights that were never trained (``erf-lab reparam`` of a random init); the
#: ``<file>.run.json`` sidecar carries the same as ``random_init`` / ``init_seed``
RANDOM_INIT_KEY, INIT_SEED_KEY = "erf_lab_random_init", "erf_lab_init_seed"
#: safetensors metadata (and ``<file>.run.json`` key ``input_size``): the input side in pixels the weights were
#: trained at, written by ``erf-lab train``
TRAIN_SIZE_KEY = "erf_lab_train_input_size"
#: safetensors metadata: the class names of the head's outputs in their order (a JSON list), written by ``erf-lab
#: train`` for a folder (ImageFolder) run, whose labels are its sorted class folders
CLASSES_KEY = "erf_lab_classes"
#: the entry of a ``.pth`` erf-lab writes (``{"model": state_dict, "erf_lab": {...}}``, the official RepLKNet layout
#: plus one entry its loaders ignore) with the same facts as the safetensors metadata: ``random_init`` (True),
#: ``init_seed``, ``input_size``, ``classes`` (a list of strings), and ``weights_sha256`` (:func:`weights_digest` of
#: ``model``): the facts speak only for the tensors they were written with, not for other weights saved into the same
#: dict later. Plain data only (bools, ints, strings, lists of strings), so it reads with
#: ``torch.load(weights_only=True)``.
PTH_RECORD_KEY = "erf_lab"
#: the resume state of an ``erf-lab train`` run still in progress (``erf_lab.train.checkpoints.STATE_FILE``)
_TRAIN_STATE_FILE = ".train_state.pt"


def resolve_weights(weights: str | os.PathLike) -> tuple[Path, dict]:
    """(file, record) of ``weights``: a path as given with ``{}``, or for ``builtin:NAME`` the shipped
    ``data/trained/NAME.safetensors`` and its ``NAME.json`` record (``model``, ``overrides``, ``num_classes``,
    ``input_size``, ...; :func:`erf_lab.models.create_model` applies its overrides)."""
    text = str(weights)
    if not text.strip():  # Path("") is the current folder: named "checkpoint . is a folder"
        raise CheckpointError("--weights is empty; name a checkpoint file (.pth/.pt/.safetensors)")
    if not text.startswith(BUILTIN_PREFIX):
        return Path(weights).expanduser(), {}
    import json

    from erf_lab.paths import data_dir

    name = text[len(BUILTIN_PREFIX):].strip("/")
    root = data_dir() / "trained"
    stem = (root / name).resolve()
    path, meta = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    if not name or root.resolve() not in stem.parents or not path.is_file() or not meta.is_file():
        shipped = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.safetensors")) \
            if root.is_dir() else []
        raise CheckpointError(f"no shipped weights {text!r}; shipped: "
                              + (", ".join(BUILTIN_PREFIX + s for s in shipped) or "none"))
    return path, json.loads(meta.read_text())


def not_a_weights_file(path: str | os.PathLike, what: str = "weights file") -> str:
    """The error line for a ``--weights`` path that is no file: missing, or a folder."""
    if Path(path).is_dir():
        return f"{what} {path} is a folder; --weights takes a checkpoint file (.pth/.pt/.safetensors)"
    return f"{what} not found: {path}"


def random_init_record(weights: str | os.PathLike) -> dict | None:
    """``{"seed": int | None}`` when ``weights`` holds a random initialisation written by erf-lab (its safetensors
    metadata, the ``erf_lab`` entry of its ``.pth``, or for a ``.pth`` written before that entry the
    ``<file>.run.json`` beside it); None otherwise."""
    import json

    from erf_lab.io import sha256_file

    path = resolve_weights(weights)[0]
    meta = _safetensors_metadata(path)
    if meta.get(RANDOM_INIT_KEY) == "true":
        seed = meta.get(INIT_SEED_KEY)
        return {"seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else None}
    record = _pth_record(path)
    if record.get("random_init") is True:
        seed = record.get("init_seed")
        return {"seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None}
    with contextlib.suppress(OSError, ValueError):
        sidecar = json.loads(path.with_name(path.name + ".run.json").read_text(encoding="utf-8"))
        # the sidecar speaks for the file it was written with, not for other weights saved there later
        if isinstance(sidecar, dict) and sidecar.get("random_init") is True and \
                sidecar.get("sha256") == sha256_file(path):
            seed = sidecar.get("init_seed")
            return {"seed": seed if isinstance(seed, int) else None}
    return None


def weights_facts(*, random_init_seed: int | None = None, random_init: bool | None = None,
                  input_size: int | None = None, classes: list[str] | None = None) -> dict:
    """The facts erf-lab records with weights it writes: ``random_init`` (True, when they are an untrained
    initialisation; ``random_init_seed`` implies it) with its ``init_seed``, the training ``input_size`` and the
    ``classes`` the head's outputs stand for; {} when there is none."""
    facts = {}
    if random_init or random_init_seed is not None:
        facts["random_init"] = True
        if random_init_seed is not None:
            facts["init_seed"] = int(random_init_seed)
    if input_size is not None:
        facts["input_size"] = int(input_size)
    if classes is not None:
        facts["classes"] = [str(c) for c in classes]
    return facts


def safetensors_facts(facts: Mapping) -> dict[str, str] | None:
    """:func:`weights_facts` as safetensors metadata (:data:`RANDOM_INIT_KEY`, :data:`INIT_SEED_KEY`,
    :data:`TRAIN_SIZE_KEY`, :data:`CLASSES_KEY`); None when there is none."""
    meta = {}
    if facts.get("random_init"):
        meta[RANDOM_INIT_KEY] = "true"
        if facts.get("init_seed") is not None:
            meta[INIT_SEED_KEY] = str(int(facts["init_seed"]))
    if facts.get("input_size") is not None:
        meta[TRAIN_SIZE_KEY] = str(int(facts["input_size"]))
    if facts.get("classes") is not None:
        import json

        meta[CLASSES_KEY] = json.dumps(list(facts["classes"]), ensure_ascii=False)
    return meta or None


def pth_record(state_dict: Mapping, facts: Mapping) -> dict | None:
    """The :data:`PTH_RECORD_KEY` entry to save beside ``state_dict`` in a ``.pth`` (``{"model": state_dict,
    "erf_lab": pth_record(...)}``): ``facts`` (:func:`weights_facts`) bound to those tensors by their digest;
    None when there are no facts."""
    if not facts:
        return None
    return {**{k: facts[k] for k in ("random_init", "init_seed", "input_size", "classes") if facts.get(k) is not None},
            "weights_sha256": weights_digest(state_dict)}


def weights_digest(state_dict: Mapping) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order): the same for the same
    weights however the file around them is written."""
    h = hashlib.sha256()
    for k in sorted(k for k, v in state_dict.items() if isinstance(v, torch.Tensor)):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _pth_record(path: Path) -> dict:
    """The verified :data:`PTH_RECORD_KEY` entry of a ``.pth`` erf-lab wrote (its ``weights_sha256`` is the
    digest of the ``model`` beside it, and ``model`` is the state dict that loads from the file: not one beside a
    ``state_dict`` entry, which loaders take first); {} for anything else: another file, a record whose weights
    were replaced, unreadable. Read weights-only, the tensors memory-mapped; cached per file version."""
    if _format_by_bytes(path) != "PyTorch zip":
        return {}
    try:
        st = path.stat()
    except OSError:
        return {}
    # ctime too: a rewrite in place that keeps the size and the mtime (cp -p, touch -r) still changes it
    return dict(_pth_record_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))


@functools.lru_cache(maxsize=16)
def _pth_record_cached(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> dict:
    """:func:`_pth_record` of one version of a file (its size, mtime, inode and ctime are the cache key)."""
    if _torchscript_archive(Path(path)):
        return {}
    with contextlib.suppress(Exception), _allow_metadata(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.endswith(".safetensors"):  # torch.load would hand the path to safetensors by its name
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        record, sd = (obj.get(PTH_RECORD_KEY), obj.get("model")) if isinstance(obj, Mapping) else (None, None)
        if isinstance(record, Mapping) and isinstance(sd, Mapping) and _find_state_dict(obj) is sd and \
                record.get("weights_sha256") == weights_digest(sd):
            return dict(record)
    return {}


def _safetensors_metadata(path: Path) -> dict:
    """The metadata of a safetensors file (by its bytes, whatever its name); {} for anything else or unreadable."""
    if _format_by_bytes(path) != "safetensors":
        return {}
    with contextlib.suppress(Exception):  # unreadable files are reported when the weights are loaded
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    return {}


def _size(v) -> int | None:
    """A training input size from a record: a positive whole number (an int, or its digits as a string)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    return v if isinstance(v, int) and v > 0 else None


def training_run_of(weights: str | os.PathLike) -> tuple[Path, dict] | None:
    """(folder, run.json) of the complete ``erf-lab train`` run whose folder holds the weights file
    (``RUN/model.*`` or ``RUN/checkpoints/epoch_*.*``); None when there is none."""
    from erf_lab.io import is_training_record, read_json_or_none

    p = Path(weights).expanduser().resolve()
    for run in (p.parent, p.parent.parent):
        info = read_json_or_none(run / "run.json")
        if is_training_record(info):
            return run, info
    return None


#: a checkpoint file of an ``erf-lab train`` run (``RUN/checkpoints``): ``epoch_NNN.pth`` / ``.safetensors`` (the
#: weights), ``epoch_NNN_ema.safetensors`` (their EMA); groups: the epoch, "_ema" or None, the suffix
EPOCH_FILE = re.compile(r"^epoch_(\d{3,})(_ema)?\.(safetensors|pth)$")


def epoch_stem(epoch: int, ema: bool = False) -> str:
    """The file stem of epoch ``epoch``'s checkpoint (``ema``: of its EMA weights) in ``RUN/checkpoints``."""
    return f"epoch_{int(epoch):03d}" + ("_ema" if ema else "")


def trained_options_hint(weights: str | os.PathLike | None, model: str, overrides: Mapping) -> str:
    """For weights of an ``erf-lab train`` run (:func:`training_run_of`) that do not load into ``model`` built with
    ``overrides``: the end of the error line, naming the model and options that run trained (its run.json), as the
    CLI options that load the file; "" for any other file, or when those options are the ones asked for."""
    found = None if weights is None or str(weights).startswith("builtin:") else training_run_of(weights)
    if found is None:
        return ""
    run, info = found
    cfg = info["model_config"]
    trained = {**(cfg.get("overrides") or {}), "num_classes": cfg.get("num_classes")}
    asked = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    if cfg.get("name") == model and all(asked.get(k) == v for k, v in trained.items()):
        return ""
    return f"; the erf-lab train run {run} trained it as --model {cfg.get('name')} {override_options(trained)}: pass " \
           "the same"


def override_options(overrides: Mapping) -> str:
    """``overrides`` as the CLI options that build the model with them, quoted for a shell:
    ``--override 'channels=(8,8,16,16)' --override num_classes=3``."""
    import shlex

    def text(v) -> str:  # as --override reads it back (erf_lab.cli.options.parse_overrides)
        if isinstance(v, (list, tuple)):
            items = ",".join(repr(x) if isinstance(x, str) else str(x) for x in v)
            return f"({items}{',' if len(v) == 1 else ''})"
        return str(v)

    return " ".join(f"--override {shlex.quote(f'{k}={text(v)}')}" for k, v in overrides.items())


def ema_decay_of(settings: dict | None) -> float | None:
    """The EMA decay of an ``erf-lab train`` run's settings (``recipe.ema``), None when it kept no EMA."""
    decay = ((settings or {}).get("recipe") or {}).get("ema") if isinstance(settings, dict) else None
    return float(decay) if isinstance(decay, (int, float)) and not isinstance(decay, bool) and decay > 0 else None


def training_weights(weights: str | os.PathLike | None) -> dict:
    """Which weights of an ``erf-lab train`` run the file ``weights`` holds: ``{"weights_kind", "ema_decay",
    "weights_note"}``. ``weights_kind``: "ema" for the run's ``model_ema.*`` and an epoch's ``epoch_NNN_ema.*``,
    "raw" for ``model.*`` and the epochs' ``epoch_NNN.*`` (an epoch's ``.pth`` also holds the EMA, under ``model_ema``,
    but loads as its ``model``), None for a file outside a complete training run; ``weights_note``: where raw weights
    of a run that kept an EMA were measured, one line saying so and naming the EMA file (else None)."""
    found = None if weights is None else training_run_of(weights)
    if found is None:
        return {"weights_kind": None, "ema_decay": None, "weights_note": None}
    run, info = found
    decay = ema_decay_of(info.get("settings"))
    name = Path(weights).name
    epoch_file = EPOCH_FILE.match(name)
    kind = "ema" if name.startswith("model_ema.") or (epoch_file and epoch_file.group(2)) else "raw"
    note = None
    if kind == "raw" and decay is not None:
        note = (f"{name} holds the raw training weights; the run also kept an EMA of them (decay {decay:g}), not "
                f"measured here: --weights {run / 'model_ema.safetensors'} measures those")
    return {"weights_kind": kind, "ema_decay": decay, "weights_note": note}


def training_input_size(weights: str | os.PathLike) -> tuple[int | None, str | None]:
    """(side in pixels, where it was read) of the resolution ``weights`` were trained at, from a training record:
    a ``builtin:`` model's JSON, the safetensors metadata ``erf-lab train`` writes (:data:`TRAIN_SIZE_KEY`), the
    ``erf_lab`` entry of a ``.pth`` erf-lab wrote (``input_size``), the ``<file>.run.json`` beside an older one
    (``input_size``, when its SHA-256 is the file's), or the ``run.json`` (a run
    in progress: its resume state) of the ``erf-lab train`` run whose folder holds the file (``RUN/model.*``,
    ``RUN/checkpoints/epoch_*.*``). (None, None) when there is none: the training resolution is unknown."""
    import json

    path, record = resolve_weights(weights)
    if _size(record.get("input_size")):
        return _size(record["input_size"]), f"the training record of {weights}"
    if n := _size(_safetensors_metadata(path).get(TRAIN_SIZE_KEY)):
        return n, f"the safetensors metadata of {path.name}"
    if n := _size(_pth_record(path).get("input_size")):
        return n, f"the erf-lab record in {path.name}"
    with contextlib.suppress(OSError, ValueError):
        from erf_lab.io import sha256_file

        sidecar = json.loads(path.with_name(path.name + ".run.json").read_text(encoding="utf-8"))
        if isinstance(sidecar, dict) and _size(sidecar.get("input_size")) and \
                sidecar.get("sha256") == sha256_file(path):
            return _size(sidecar["input_size"]), f"{path.name}.run.json"
    found = training_run_of(path)
    if found is not None:
        run, info = found
        n = _size(info["settings"].get("input_size"))
        return (n, f"the erf-lab train run {run}/run.json") if n else (None, None)
    p = path.expanduser().resolve()
    for run in (p.parent, p.parent.parent):
        if (run / _TRAIN_STATE_FILE).is_file():  # a training run in progress: its resume point holds the settings
            with contextlib.suppress(Exception):
                state = torch.load(run / _TRAIN_STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
                n = _size(state["settings"].get("input_size"))
                if n:
                    return n, f"the erf-lab train run in progress {run}"
    return None, None


def training_classes(weights: str | os.PathLike) -> tuple[list[str] | None, str | None]:
    """(class names of the head's outputs in their order, where they were read) of weights ``erf-lab train`` wrote
    for a folder run: the safetensors metadata (:data:`CLASSES_KEY`), the ``erf_lab`` entry of a ``.pth``, or for a
    file of an older erf-lab the ``run.json`` of the complete run whose folder holds it. (None, None) for any other
    file (a cue-world run's, ImageNet weights): the classes are not known."""
    import json

    def names(v) -> list[str] | None:
        return list(v) if isinstance(v, list) and v and all(isinstance(c, str) for c in v) else None

    path = resolve_weights(weights)[0]
    with contextlib.suppress(ValueError):
        if n := names(json.loads(_safetensors_metadata(path).get(CLASSES_KEY, "null"))):
            return n, f"the safetensors metadata of {path.name}"
    if n := names(_pth_record(path).get("classes")):
        return n, f"the erf-lab record in {path.name}"
    found = training_run_of(path)
    if found is not None and (found[1].get("data") or {}).get("kind") == "folder":
        n = names(found[1]["data"].get("classes"))
        return (n, f"the erf-lab train run {found[0]}/run.json") if n else (None, None)
    return None, None


def random_init_of(weights: str | os.PathLike | None, *, pretrained: bool = False,
                   seed: int | None = None) -> dict | None:
    """``{"seed": ...}`` when a model built with ``weights`` is untrained: no weights and not ``pretrained`` (then
    ``seed`` is its init's), or a file marked as a random initialisation (:func:`random_init_record`); None for
    trained weights."""
    if weights is None:
        return None if pretrained else {"seed": seed}
    return random_init_record(weights)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict without running any code in it.

    Any failure to read the file (not a checkpoint, truncated, a pickle of disallowed objects) is a
    :class:`CheckpointError` with one line; other exception types never escape (issue #13).
    """
    return _unwrap(*_read_file(path))[0]


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """:func:`load_state_dict_file`, and which part of the file the tensors are (:func:`weights_selection`; pass
    it to :func:`load_weights`, which adds the prefix part it loads)."""
    return _unwrap(*_read_file(path))


def _read_file(path: str | os.PathLike) -> tuple[object, str]:
    """(contents, path) of a checkpoint file, read weights-only; one-line CheckpointErrors
    (:func:`load_state_dict_file`)."""
    path = resolve_weights(path)[0]
    if not path.is_file():
        raise CheckpointError(not_a_weights_file(path, "checkpoint"))
    try:
        obj = _read_checkpoint(path)
    except CheckpointError:
        raise
    except Exception as e:  # torch's weights-only unpickler raises anything (IndexError, KeyError, ...) on non-pickles
        if _NUMPY_ARRAY_GLOBAL.fullmatch(blocked_global(e) or ""):  # old checkpoints' data: said so, still refused
            raise CheckpointError(
                f"refusing to load {path}: a checkpoint that stores numpy arrays ({blocked_global(e)}), which "
                "weights-only loading does not accept (erf-lab unpickles tensors and plain data only); to convert it, "
                "load it yourself with torch.load where you trust the file and save its weights with safetensors: "
                "safetensors.torch.save_file({k: torch.as_tensor(v).contiguous() for k, v in weights.items()}, "
                "'weights.safetensors')") from None
        if blocked_global(e):
            raise CheckpointError(f"refusing to load {path}: {load_failure(e)}; save a plain state dict or "
                                  ".safetensors instead") from None
        if path.stat().st_size == 0:  # torch named it "EOFError: unreadable"
            raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes: an interrupted "
                                  "download or copy?)") from None
        damaged = _format_by_bytes(path)
        members = _zip_members(path) if damaged == "PyTorch zip" else None
        if members is not None and not any(m.endswith("data.pkl") for m in members):  # a whole zip of other files
            raise CheckpointError(f"cannot read checkpoint {path}: a zip archive of {len(members)} other file(s) "
                                  f"({_first(members)}), not a PyTorch checkpoint") from None
        if damaged:
            what = f"a {damaged} checkpoint that is truncated or damaged (an interrupted download or copy?)"
        else:
            what = "not a PyTorch checkpoint or safetensors file"
        raise CheckpointError(f"cannot read checkpoint {path}: {what} ({load_failure(e)})") from None
    return obj, str(path)


#: the start of a legacy (pre-1.6, ``_use_new_zipfile_serialization=False``) ``torch.save`` file at its default
#: pickle protocol 2 (the one weights-only loads read): PROTO 2, then the magic number 0x1950a86a20f9469cfc6c as
#: LONG1; e.g. torchvision's older ImageNet weights
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _format_by_bytes(path: Path) -> str | None:
    """The format a file starts like ('PyTorch zip': the zip magic of ``torch.save``; 'PyTorch legacy-format': the
    pickled magic number of a pre-1.6 ``torch.save``; 'safetensors': an 8-byte header length then JSON): what to
    read it as, and for an unreadable file a checkpoint cut short or damaged; None for anything else."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
        if head.startswith(b"PK\x03\x04"):
            return "PyTorch zip"
        if head == _LEGACY_TORCH_MAGIC:
            return "PyTorch legacy-format"
        if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30:
            return "safetensors"
    return None


def _zip_members(path: Path) -> list[str] | None:
    """The names in a zip archive whose directory reads (a zip cut short has none); None for anything else."""
    import zipfile

    with contextlib.suppress(OSError, zipfile.BadZipFile, ValueError), zipfile.ZipFile(path) as z:
        return z.namelist()
    return None


def _torchscript_archive(path: Path) -> bool:
    """A ``torch.jit.save`` archive (a zip with ``code/`` and ``constants.pkl``): a program, not a state dict."""
    import zipfile

    with contextlib.suppress(OSError, zipfile.BadZipFile), zipfile.ZipFile(path) as z:
        names = z.namelist()
        return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)
    return False


#: what a pickled numpy array needs (``numpy._core`` since numpy 2): a global weights-only loading refuses
_NUMPY_ARRAY_GLOBAL = re.compile(r"numpy\.(_?core\.multiarray\._reconstruct|ndarray)")


def blocked_global(e: BaseException) -> str | None:
    """The Python object a weights-only load refused (a pickle that could run code), else None."""
    blocked = re.search(r"(?:unsupported GLOBAL|Unsupported global:\s*GLOBAL)\s+([\w.]+)\s+(?:was not|whose)",
                        str(e), re.IGNORECASE)
    return blocked.group(1) if blocked else None


def load_failure(e: BaseException) -> str:
    """Why a weights-only ``torch.load`` / safetensors read failed, in one line, without torch's advice to load
    with ``weights_only=False`` (which would run the code in the file)."""
    name = blocked_global(e)
    if name:
        return f"it references the Python object {name} (loading it could run code)"
    return f"{type(e).__name__}: {_last_reason(str(e))}"


def _read_checkpoint(path: Path):
    """The file's contents, read by what its first bytes say it is (a safetensors file named ``.pth`` or a
    ``torch.save`` file named ``.safetensors`` load too); the suffix decides only for bytes of neither kind."""
    fmt = _format_by_bytes(path)
    if fmt == "safetensors" or (fmt is None and path.suffix == ".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if fmt == "PyTorch zip" and _torchscript_archive(path):
        raise CheckpointError(f"cannot read checkpoint {path}: a TorchScript archive (torch.jit.save), not a state "
                              "dict; save model.state_dict() with torch.save, or as .safetensors")
    # a file object, not the path: torch.load hands any path named .safetensors to safetensors by its suffix
    with _allow_metadata(), warnings.catch_warnings(), open(path, "rb") as f:
        warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 104" for bytes that are no pickle
        return torch.load(f, map_location="cpu", weights_only=True)


def _allow_metadata():
    """Context allowing :func:`_metadata_globals` in weights-only loads (torch >= 2.5; no-op before)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(_metadata_globals()) if safe_globals is not None else contextlib.nullcontext()


def _metadata_globals() -> list:
    """Harmless classes that training checkpoints carry beside the weights (``args`` namespaces, numpy scalars
    such as ``best_acc``), allowed in addition to torch's weights-only set. Nothing here can run code."""
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed = [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


#: torch's boilerplate around a refused weights-only load (it suggests ``weights_only=False``)
_TORCH_ADVICE = re.compile(r"weights.only|Check the documentation of torch\.load", re.IGNORECASE)
#: the request for feedback torch appends to its C++ errors
_TORCH_APPEAL = re.compile(r"\s*\(Could this error message be improved\?.*?\)\s*$")


def _last_reason(msg: str) -> str:
    """The informative line of a (long, multi-line) reading error, e.g. 'Unsupported operand 79'."""
    lines = [_TORCH_APPEAL.sub("", ln.strip()) for ln in msg.splitlines()
             if ln.strip() and not _TORCH_ADVICE.search(ln)]
    for ln in lines:
        if ln.startswith(("Unsupported", "Expected", "Invalid", "invalid", "Trying")):
            return ln
    return lines[-1].split(". ", 1)[0][:200] if lines else "unreadable"  # its first sentence


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint object and strip ``module.`` / ``_orig_mod.`` prefixes. A wrapper
    (``model``, ``state_dict``, ...) wins over tensors beside it (e.g. the ``best_acc1`` tensor of PyTorch's
    ImageNet example); of several (raw weights and their EMA) the first in ``_WRAPPER_KEYS`` loads, with a warning
    that names the others."""
    return _unwrap(obj, source)[0]


def _unwrap(obj, source: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """:func:`unwrap_state_dict`, and the :func:`weights_selection` of what it found (its warning names the line
    that called its caller)."""
    found = _locate_state_dict(obj)
    if found is None:
        entries = f" (its entries: {_first([str(k) for k in obj], 8)})" if isinstance(obj, Mapping) and obj else ""
        raise CheckpointError(f"{source}: no state dict found{entries}; expected tensors, or a dict with one of "
                              + ", ".join(repr(k) for k in _WRAPPER_KEYS))
    # a .pth of erf-lab train says nothing: its "model" is what the run's measurements take, its EMA has a file
    # of its own (epoch_NNN_ema.safetensors), and the timeline and summaries say which they measure
    own_file = isinstance(obj, Mapping) and PTH_RECORD_KEY in obj
    keys, obj, others = found
    if others and not own_file:
        where = "".join(f"[{k!r}]" for k in keys)
        held = ", ".join(map(repr, [keys[-1], *others]))
        warnings.warn(f"{source} holds {len(others) + 1} sets of weights ({held}): loaded checkpoint{where}; to use "
                      f"another, save it alone (e.g. torch.save(checkpoint[{others[0]!r}], FILE))", stacklevel=3)
    out, stripped = {}, set()
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = k
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.partition(".")[2]
        if name != k:
            stripped.add(k[:len(k) - len(name)])
        out[name] = v
    return out, weights_selection(keys, others, sorted(stripped))


def weights_selection(entry=None, passed_over=(), prefix_stripped=(), part: str | None = None,
                      left_out: int = 0) -> dict | None:
    """Which part of a checkpoint file was loaded, as run.json / summary.json / ``.run.json`` record it
    (``weights_selection``): ``entry``, the keys leading to the state dict (``["state_dict_ema"]``; None: the file is
    one); ``passed_over``, the other weight sets beside it (its EMA); ``prefix_stripped``, the wrapper prefixes taken
    off its keys (``module.``, ``_orig_mod.``); ``part``, the prefix whose tensors were loaded (an mmseg / mmdet
    checkpoint's ``backbone.``) and ``left_out``, how many tensors beside them were not. None when the file was
    loaded whole, as it is."""
    if not (entry or prefix_stripped or part):
        return None
    return {"entry": list(entry or ()) or None, "passed_over": list(passed_over),
            "prefix_stripped": list(prefix_stripped), "part": part, "left_out": int(left_out)}


def selection_text(selection) -> str | None:
    """A :func:`weights_selection` record (run.json / summary.json ``weights_selection``) in words, e.g.
    ``"checkpoint['model'] (passed over: 'model_ema'), prefix module. stripped"``: which weights a result is of, where
    a file held more than one set (raw and EMA) or more than the model (an mmseg ``backbone.``). None when the file
    loaded whole (no record) or the record is none of :func:`weights_selection`'s."""
    if not isinstance(selection, Mapping):
        return None

    def names(key: str) -> list[str]:
        value = selection.get(key)
        return [str(v) for v in value] if isinstance(value, list) else []

    parts = []
    if entry := names("entry"):
        passed = names("passed_over")
        parts.append("checkpoint" + "".join(f"[{k!r}]" for k in entry)
                     + (f" (passed over: {', '.join(map(repr, passed))})" if passed else ""))
    if stripped := names("prefix_stripped"):
        parts.append(f"prefix {', '.join(stripped)} stripped")
    if isinstance(part := selection.get("part"), str) and part:
        left = selection.get("left_out")
        left = left if isinstance(left, int) and not isinstance(left, bool) and left > 0 else 0
        parts.append(f"only the tensors under {part}" + (f" ({left} other tensor{'s' * (left != 1)} left out)"
                                                          if left else ""))
    return ", ".join(parts) or None


def _find_state_dict(obj) -> Mapping | None:
    """The state dict :func:`_locate_state_dict` finds, else None."""
    found = _locate_state_dict(obj)
    return found[1] if found else None


def _locate_state_dict(obj, depth: int = 0) -> tuple[tuple[str, ...], Mapping, list[str]] | None:
    """The first state dict under the wrapper keys (in ``_WRAPPER_KEYS`` order, up to 3 levels), else ``obj``
    itself when it is one, else None; as (the keys leading to it, the state dict, the other wrapper keys beside the
    last of them that hold a state dict too)."""
    if not isinstance(obj, Mapping):
        return None
    if depth < 3:
        for i, key in enumerate(_WRAPPER_KEYS):
            inner = obj.get(key)
            found = _locate_state_dict(inner, depth + 1) if isinstance(inner, Mapping) else None
            if found is not None:
                path, sd, others = found
                if not path:  # ``inner`` is the state dict: which wrappers beside it hold one too
                    others = [k for k in _WRAPPER_KEYS[i + 1:] if isinstance(obj.get(k), Mapping)
                              and _locate_state_dict(obj[k], depth + 1) is not None]
                return (key, *path), sd, others
    return ((), obj, []) if _is_state_dict(obj) else None


def _is_state_dict(obj: Mapping) -> bool:
    return (len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and any(isinstance(v, torch.Tensor) for v in obj.values()))


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier (``model.head_names`` if the model declares them)."""
    names = getattr(model, "head_names", None)
    if names:
        return tuple(n.rstrip(".") + "." for n in names)
    return ("head.", "fc.", "classifier.", "_fc.")


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, drop_head: bool = False,
                 source: str = "checkpoint", selection: dict | None = None) -> list[str]:
    """Load ``state_dict`` strictly into ``model``; errors name the first offending keys. Returns the keys that kept
    the model's own (random) initialisation: the dropped classifier's, else none. Which part of the file loaded
    (``selection``, from :func:`read_weights`, with the prefix part loaded here) goes to ``model.weights_selection``.

    The model may define ``adapt_state_dict(sd) -> sd`` to map other key layouts onto its own. BatchNorm
    ``num_batches_tracked`` counters the file lacks (checkpoints of old PyTorch versions or conversions; PyTorch's
    own strict load accepts them too) start at 0.
    A classifier that differs while every other tensor matches (another class count at the same input width, or a
    classifier in only one of file and model, e.g. ``num_classes=0``) raises unless ``drop_head=True``, which
    then keeps the model's own tensors for the head keys that differ (or none) and loads the rest of the head (a
    pre-logits norm); a classifier that fits is loaded either way. Any other mismatch
    names the checkpoint as another architecture or size.
    """
    if hasattr(model, "adapt_state_dict"):
        state_dict = model.adapt_state_dict(dict(state_dict))
    own = model.state_dict()
    heads = _head_prefixes(model)
    part = _part_for(state_dict, own, heads)
    choice = {k: v for k, v in (selection or {}).items() if k in ("entry", "passed_over", "prefix_stripped")}
    if part is not None:  # e.g. the backbone of an official mmseg / mmdet (ADE20K, COCO) checkpoint
        prefix, state_dict, left = part
        choice.update(part=prefix, left_out=len(left))
        others = f"; left out its {len(left)} other tensor(s): {_first(left)}" if left else ""
        warnings.warn(f"{source}: loaded the tensors under {prefix}* as the model's{others}", stacklevel=2)
    counters = {k: torch.zeros(own[k].shape, dtype=own[k].dtype) for k in own
                if k.rpartition(".")[2] == "num_batches_tracked" and k not in state_dict}
    state_dict = {**state_dict, **counters}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    head_problems = [k for k in missing + unexpected + mismatched if k.startswith(heads)]
    body_ok = len(head_problems) == len(missing + unexpected + mismatched)
    other_width = [k for k in mismatched if k.startswith(heads) and state_dict[k].shape[1:] != own[k].shape[1:]]
    if head_problems and not drop_head and body_ok and not other_width:
        # name the classifier's weight matrix (the file's, else the model's), not a pre-logits norm's vector
        k = next((k for k in head_problems if (state_dict[k] if k in state_dict else own[k]).dim() == 2),
                 head_problems[0])
        keep = ""
        if k in missing:
            what = f"the model has a classifier ({k}), the file none"
        elif k in unexpected:
            what = f"the file has a classifier ({k}), the model none"
        else:
            what = f"classifier has {state_dict[k].shape[0]} classes, the model {own[k].shape[0]} (key {k})"
        if k in state_dict and state_dict[k].dim() and getattr(model, "out_indices", None) is None:
            n = state_dict[k].shape[0]  # (a downstream backbone, out_indices, takes no classifier)
            keep = f"build the model with num_classes={n} (CLI: --override num_classes={n}) to keep it, or "
        raise CheckpointError(f"{source}: {what}; {keep}pass drop_head=True (CLI: --drop-head) to load everything "
                              "but the head")
    drop_head = drop_head and bool(head_problems)  # a classifier that fits is loaded (app uploads pass drop_head)
    dropped = set(head_problems) if drop_head else set()  # only the keys that differ: a pre-logits norm is kept
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
        missing, unexpected, mismatched = ([k for k in keys if k not in dropped]
                                           for keys in (missing, unexpected, mismatched))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatch(es): {k} is {tuple(state_dict[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} in the model")
    if mismatched and not missing and not unexpected and all(k.rpartition(".")[2] == "pos_embed" for k in mismatched):
        problems.append("the position embedding is built for the model's input size (img_size): for a timm ViT "
                        "build it at the file's size with dynamic_img_size=True (CLI: --override "
                        "dynamic_img_size=True, not img_size), which interpolates it to each input size")
    if problems:
        error = CheckpointError(f"{source} does not match {type(model).__name__} (a checkpoint of another "
                                "architecture or size: check the model name and its options): " + "; ".join(problems))
        error.file_tensors = state_dict  # as compared: the registry names the model they are of (models_matching)
        raise error
    # a float tensor of the model from integer / bool / complex values: load_state_dict would cast them silently
    # (an int8-quantized or converted file: weights rounded to integers, 0/1, or the imaginary part dropped)
    not_float = [k for k in own if k not in dropped and own[k].is_floating_point()
                 and not state_dict[k].is_floating_point()]
    if not_float:
        k = not_float[0]
        raise CheckpointError(f"{source}: {len(not_float)} floating-point tensor(s) of the model are stored as "
                              f"{str(state_dict[k].dtype).removeprefix('torch.')} in the file (first: {k}; a "
                              "quantized or converted checkpoint?); save float weights (float32, float16 or bfloat16)")
    if drop_head:
        state_dict = {**state_dict, **{k: own[k] for k in dropped if k in own}}
    model.load_state_dict(state_dict, strict=True)
    model.weights_selection = weights_selection(**choice)
    return sorted(k for k in dropped if k in own)


def _part_for(state_dict: Mapping, own: Mapping, heads: tuple[str, ...]) -> tuple[str, dict, list[str]] | None:
    """(prefix, the tensors under it with the prefix stripped, the file's other keys) when the file holds the model,
    its classifier aside, under one prefix beside other tensors (an mmseg / mmdet checkpoint's ``backbone.``, with
    ``decode_head.`` / ``neck.`` beside it) and none of the model's keys at the top; else None."""
    body = [k for k in own if not k.startswith(heads) and k.rpartition(".")[2] != "num_batches_tracked"]
    if not body or any(k in state_dict for k in body):
        return None
    for prefix in dict.fromkeys(k[:-len(body[0])] for k in state_dict if k.endswith("." + body[0])):
        part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if all(k in part for k in body):
            return prefix, part, [k for k in state_dict if not k.startswith(prefix)]
    return None


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
