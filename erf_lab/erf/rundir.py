"""The ERF run directory: the one writer, the one reader and the versioned ``run.json`` schema.

A run directory holds ``erf.npy`` (mean contribution map, float64 H x W), ``metrics.json``
(:func:`erf_lab.erf.metrics.compute_metrics`), ``erf.png`` / ``erf.pdf`` (paper-style heatmap) and ``run.json``
(how it was made, :data:`RUN_FIELDS`). Every file is written atomically and run.json last, so a directory that
has run.json is complete. ``erf-lab compute``, ``sweep``, the app and the training timeline all write through
:func:`write_run_dir`.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.erf.metrics import compute_metrics, summary, validate_erf
from erf_lab.errors import ErfLabError
from erf_lab.io import RESULT_KINDS, result_kind, save_npy, write_json
from erf_lab.provenance import now

ERF_FILE, METRICS_FILE, RUN_FILE = "erf.npy", "metrics.json", "run.json"
RUN_SCHEMA_VERSION = 1
RUN_KIND = "erf"
#: the resumable progress of an interrupted ``erf-lab compute`` (one file per process)
STATE_GLOB = ".erf_state*.npz"
#: appended to the title / label of an ERF measured with random weights (run.json ``random_init``)
RANDOM_MARK = "(random init)"

_NUM = (int, float)
_STR_OR_NONE = (str, type(None))
_INT_OR_NONE = (int, type(None))
_NUM_OR_NONE = (int, float, type(None))
#: run.json, schema version 1: field -> accepted JSON types. ``schema_version`` and ``kind`` are required; every
#: other field is optional but, when present, must have its type (the README documents each field).
RUN_FIELDS: dict[str, tuple] = {
    "schema_version": (int,), "kind": (str,), "label": _STR_OR_NONE, "config": (dict,), "tags": (dict,),
    # model
    "model": (str,), "overrides": (dict,), "weights": _STR_OR_NONE, "weights_sha256": _STR_OR_NONE,
    "random_init": (bool,), "init_seed": _INT_OR_NONE, "drop_head": (bool,), "train_size": _INT_OR_NONE,
    "train_size_source": _STR_OR_NONE,  # where train_size comes from, or why it is unknown (optional: newer files)
    # which part of the weights file loaded (erf_lab.checkpoint.weights_selection; optional: absent from older files)
    "weights_selection": (dict, type(None)),
    # measurement
    "layer": (str,), "aggregate": (str,), "input_size": (int,), "feature_shape": (list,),
    "theoretical_rf": _INT_OR_NONE, "target": _STR_OR_NONE, "map": _STR_OR_NONE, "gradient": _STR_OR_NONE,
    "reparameterized": (bool,), "channels_last": (bool,), "conv_backend": (str,), "fastconv_modules": _INT_OR_NONE,
    "weight_grads": (bool,), "tf32": (bool, type(None)), "batch_size": (int,), "seed": (int,), "device": (str,),
    "mean": (list,), "std": (list,), "resize": (str,), "model_preprocessing": (dict,), "size_note": _STR_OR_NONE,
    # images
    "images": (str,), "image_list": (list,), "num_images_requested": _INT_OR_NONE, "num_used": (int,),
    "num_skipped": (int,), "skipped": (list,),
    # execution
    "world_size": (int,), "dist_backend": _STR_OR_NONE, "resumed": (bool,), "resumed_after_images": (int,),
    "start_time": (str,), "end_time": (str,), "wall_seconds": _NUM, "seconds_per_image": (*_NUM, type(None)),
    "provenance": (dict,), "metrics_summary": (dict,), "files": (list,), "written": (str,),
    # roofline (erf_lab.erf.roofline; added within version 1: optional, absent from older files)
    "flops_per_image": _INT_OR_NONE, "compute_seconds_per_image": _NUM_OR_NONE, "achieved_gflops": _NUM_OR_NONE,
    "sgemm_gflops": _NUM_OR_NONE, "roofline_fraction": _NUM_OR_NONE, "sgemm_device": _STR_OR_NONE,
    "cpu_model": _STR_OR_NONE, "isa": _STR_OR_NONE, "threads": _INT_OR_NONE,
    "padding_flops_per_image": _INT_OR_NONE, "roofline_fraction_without_padding": _NUM_OR_NONE,
    "sgemm_reprobed": (bool, type(None)), "roofline_note": _STR_OR_NONE,
    # the auto batch: CUDA's sizing by memory (erf_lab.erf.compute.memory_batch_size) and the sizes that ran out of
    # memory (optional: absent from older files)
    "batch_memory": (dict, type(None)), "batch_halved_at": (list, type(None)),
    # the metrics' centre (erf_lab.erf.metrics.target_centre; optional: absent from older files)
    "erf_centre": (list, type(None)),
    # a global theoretical RF (theoretical_rf null: a pooling / norm over the whole map, SE or GRN) and the RF of the
    # kernels alone (erf_lab.erf.receptive_field.list_layers; optional: absent from older files)
    "rf_global": (bool, type(None)), "kernel_rf": _INT_OR_NONE,
    # the precision the gradients were taken in, the model's (optional: absent from older files, all float32)
    "dtype": _STR_OR_NONE,
    # each process that measured part of the run (a resumed run: several), its argv, versions, device, times and
    # the images measured before it (optional: absent from older files)
    "sessions": (list, type(None)),
    # each ``erf-lab analyze`` that rewrote theoretical_rf / metrics_summary (:func:`update_run_summary`): its
    # provenance and the values it replaced (optional: absent where none did)
    "analyses": (list, type(None)),
}


def _type_names(types: tuple) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "true/false", list: "list", dict: "object",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def validate_run_info(info: dict, source: str = "run.json") -> dict:
    """``info`` if it follows :data:`RUN_FIELDS`; ErfLabError naming the first wrong field otherwise.
    Files written before the schema existed (no ``schema_version``) are read with the same field types."""
    if not isinstance(info, dict):
        raise ErfLabError(f"{source}: expected a JSON object")
    version = info.get("schema_version")
    if version is not None and (type(version) is not int or version > RUN_SCHEMA_VERSION):
        raise ErfLabError(f"{source}: schema_version {version!r} is not supported (this erf-lab reads "
                          f"up to {RUN_SCHEMA_VERSION}); update erf-lab")
    for key, types in RUN_FIELDS.items():
        if key not in info:
            continue
        v = info[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            raise ErfLabError(f"{source}: field {key!r} must be {_type_names(types)}, got {json.dumps(v)[:60]}")
    for key in ("input_size", "num_used", "batch_size", "world_size"):
        if key in info and info[key] < (0 if key == "num_used" else 1):
            raise ErfLabError(f"{source}: field {key!r} must be positive, got {info[key]}")
    for key in ("flops_per_image", "compute_seconds_per_image", "achieved_gflops", "sgemm_gflops",
                "roofline_fraction", "padding_flops_per_image", "roofline_fraction_without_padding"):
        if info.get(key) is not None and info[key] < 0:
            raise ErfLabError(f"{source}: field {key!r} must not be negative, got {info[key]}")
    if info.get("theoretical_rf") is not None and info["theoretical_rf"] < 1:
        raise ErfLabError(f"{source}: field 'theoretical_rf' must be positive, got {info['theoretical_rf']}")
    c = info.get("erf_centre")
    if c is not None and (len(c) != 2 or not all(type(v) is int and v >= 0 for v in c)):
        raise ErfLabError(f"{source}: field 'erf_centre' must be two non-negative integers (y, x) or null, "
                          f"got {json.dumps(c)[:60]}")
    return info


def run_metrics(erf, run_info: dict | None, theoretical_rf: int | None = None, centre=None) -> dict:
    """A run's metrics as its metrics.json holds them: :func:`~erf_lab.erf.metrics.compute_metrics` of the map, and
    ``random_init`` where run.json says so (the file alone says so too)."""
    metrics = compute_metrics(erf, theoretical_rf=theoretical_rf, centre=centre)
    if (run_info or {}).get("random_init"):
        metrics["random_init"] = True
    return metrics


def run_caption(info: dict | None) -> str | None:
    """What an ERF figure measured, for the line under its map (the figure travels without run.json): layer, input
    size and number of images, e.g. ``'forward_features, 1024x1024 px, 50 images'``; None when the record does
    not say (a bare .npy)."""
    info = info or {}
    parts = []
    if isinstance(info.get("layer"), str) and info["layer"]:
        parts.append(info["layer"])
    if isinstance(info.get("input_size"), int) and not isinstance(info["input_size"], bool):
        parts.append(f"{info['input_size']}x{info['input_size']} px")
    if isinstance(info.get("num_used"), int) and not isinstance(info["num_used"], bool):
        parts.append(f"{info['num_used']} image{'s' if info['num_used'] != 1 else ''}")
    return ", ".join(parts) or None


def write_run_dir(out_dir: str | os.PathLike, erf, run_info: dict, theoretical_rf: int | None = None,
                  formats: Sequence[str] = ("png", "pdf"), display: str | None = None, centre=None) -> dict:
    """Write a complete run directory; returns the metrics (centred on ``centre``, the measured unit's
    receptive-field centre, where given: :func:`erf_lab.erf.metrics.compute_metrics`).

    Order: erf.npy, metrics.json, erf.<formats>, then run.json (``run_info`` + ``schema_version``, ``kind``,
    ``metrics_summary``, ``files``) last, so its presence marks the directory complete.
    """
    from erf_lab.erf.plotting import plot_erf

    info = {"schema_version": RUN_SCHEMA_VERSION, "kind": RUN_KIND, **run_info}
    if theoretical_rf is not None:
        info.setdefault("theoretical_rf", int(theoretical_rf))
    validate_run_info(info, "run_info")
    a = validate_erf(erf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / ERF_FILE, a)
    metrics = run_metrics(a, info, theoretical_rf=theoretical_rf, centre=centre)
    write_json(out / METRICS_FILE, metrics)
    title = info.get("label") or info.get("model")
    if info.get("random_init"):
        title = f"{title} {RANDOM_MARK}"
    figs = plot_erf(a, out / "erf", title=title, formats=tuple(formats), display=display, caption=run_caption(info))
    info["metrics_summary"] = summary(metrics)
    info["files"] = [ERF_FILE, METRICS_FILE] + [p.name for p in figs]
    info.setdefault("written", now())
    write_json(out / RUN_FILE, info)
    return metrics


def update_run_summary(run_dir: str | os.PathLike, metrics: dict, record: dict) -> bool:
    """Bring run.json's fields that depend on metrics.json (``theoretical_rf``, ``metrics_summary``) to ``metrics``,
    which ``erf-lab analyze`` recomputed (e.g. with ``--theoretical-rf``), so that readers of run.json (compare, a
    sweep's rows, the app) agree with metrics.json. ``record`` (the analyze command's provenance) is appended to
    ``analyses`` with the values it replaced (``before``). Atomic; the caller holds the folder. Returns whether
    run.json changed (not where it agreed already, nor where the folder has no run.json)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return False
    info = validate_run_info(read_json(path), str(path))
    new = {"theoretical_rf": metrics.get("theoretical_rf"), "metrics_summary": summary(metrics)}
    before = {k: info.get(k) for k, v in new.items()  # compared as JSON text: a NaN equals its own copy
              if json.dumps(info.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)}
    if not before:
        return False
    info.update(new)
    info["analyses"] = [*(info.get("analyses") or []), {**record, "before": before}]
    write_json(path, info)
    return True


@dataclass
class Run:
    """A loaded ERF: the map, where it came from, and run.json / metrics.json when present."""

    erf: np.ndarray
    npy: Path
    run_dir: Path | None
    run_info: dict | None = None
    metrics: dict | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def theoretical_rf(self) -> int | None:
        for src in (self.run_info or {}, self.metrics or {}):
            if src.get("theoretical_rf") is not None:
                return int(src["theoretical_rf"])
        return None

    @property
    def input_size(self) -> int | None:
        return (self.run_info or {}).get("input_size")

    @property
    def centre(self) -> list[int] | None:
        """The metrics' centre (y, x): the measured unit's receptive-field centre recorded by the run (None: the
        map's middle, as for runs written before erf-lab recorded it and for a bare ``.npy``)."""
        c = (self.run_info or {}).get("erf_centre")  # validated when run.json was read (validate_run_info)
        return [int(v) for v in c] if c is not None else None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ErfLabError (one line) for unreadable or corrupt files."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ErfLabError(f"cannot read {path}: corrupt JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise ErfLabError(f"cannot read {path}: expected a JSON object")
    return obj


def load_erf_npy(path: str | os.PathLike) -> np.ndarray:
    """np.load with allow_pickle=False; ErfLabError for missing, corrupt or non-2-D files."""
    path = Path(path)
    if not path.is_file():
        raise ErfLabError(f"ERF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ErfLabError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if magic[:2] == b"PK":
        raise ErfLabError(f"{path} is an .npz archive; expected a single 2-D array saved with np.save")
    if magic != b"\x93NUMPY":
        raise ErfLabError(f"cannot read {path}: corrupt or not a .npy file (no NumPy header)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else "unreadable"
        if "pickle" in msg.lower():
            raise ErfLabError(f"refusing to load {path}: it holds Python objects (pickle), not a numeric map") from None
        raise ErfLabError(f"cannot read {path}: corrupt or not a .npy file ({msg})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ErfLabError(f"cannot read {path}: corrupt or not a .npy file ({type(e).__name__})") from None
    try:
        return validate_erf(arr)
    except ErfLabError as e:
        raise ErfLabError(f"{path}: {e}") from None


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory (needs erf.npy; run.json / metrics.json optional) or a bare ``.npy`` file.

    run.json is checked against :data:`RUN_FIELDS` (ErfLabError naming the wrong field). A corrupt metrics.json
    is not an error: ``metrics`` is None and ``extra["metrics_error"]`` says why (``analyze`` recomputes it)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ErfLabError(f"no such run directory or ERF file: {p}")
    if p.is_dir():
        npy = p / ERF_FILE
        if not npy.is_file():
            hint = ""
            if any(p.glob(STATE_GLOB)):
                hint = f" (an interrupted run: continue it with 'erf-lab compute --resume --out {p}' and its options)"
            elif (kind := result_kind(p)) not in (None, "unknown", "erf"):  # a sweep, comparison, training run...
                runs = sorted(p.rglob(ERF_FILE))
                hint = f" (it holds {RESULT_KINDS[kind]}" + (
                    f"; its ERF runs are its sub-folders, e.g. {runs[0].parent})" if runs else ")")
            elif not (p / RUN_FILE).exists():
                hint = " (incomplete run? it has no run.json either)"
            raise ErfLabError(f"{p} is not a run directory: no {ERF_FILE}{hint}")
        run_dir = p
    else:
        if p.suffix != ".npy":
            raise ErfLabError(f"expected a run directory or a .npy file, got {p}")
        npy, run_dir = p, (p.parent if p.name == ERF_FILE else None)
    erf = load_erf_npy(npy)
    run_info = metrics = None
    extra = {}
    if run_dir is not None:
        if (run_dir / RUN_FILE).is_file():
            run_info = validate_run_info(read_json(run_dir / RUN_FILE), str(run_dir / RUN_FILE))
            size = run_info.get("input_size")
            if isinstance(size, int) and tuple(erf.shape) != (size, size):  # its centre and label are another map's
                raise ErfLabError(f"{npy}: a {erf.shape[0]}x{erf.shape[1]} map, but {run_dir / RUN_FILE} records "
                                  f"input_size {size}: the run directory is inconsistent (erf.npy replaced?); "
                                  "measure it again, or copy the .npy out of the folder to read it alone")
        if (run_dir / METRICS_FILE).is_file():
            try:
                metrics = read_json(run_dir / METRICS_FILE)
                if not isinstance(metrics.get("high_contribution"), list) or "shape" not in metrics:
                    raise ErfLabError(f"{run_dir / METRICS_FILE}: not an erf-lab metrics file")
            except ErfLabError as e:
                metrics, extra["metrics_error"] = None, str(e)
    label = (run_info or {}).get("label") or (run_info or {}).get("model") or (
        run_dir.name if run_dir is not None else npy.stem)
    return Run(erf=erf, npy=npy, run_dir=run_dir, run_info=run_info, metrics=metrics, label=str(label), extra=extra)
