"""ERF maps of the explorer and growth pages: image sources, the measurement, metrics, kernel sweeps.

A page's image choice is a hashable ``source``: ``("builtin", names)``, ``("folder", path)`` or
``("upload", ((name, bytes), ...), ((name, reason), ...))`` (valid uploads, then the skipped ones)."""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app import safety
from app.cache import cached, sha
from app.models import TINY_CHANNELS, build_model, parse_overrides
from app.runs import app_runs_dir
from erf_lab.erf.compute import compute_erf
from erf_lab.erf.images import ImageSource, default_images_dir, list_image_files, load_images, model_mean_std
from erf_lab.erf.metrics import compute_metrics, summary
from erf_lab.erf.report import load_run
from erf_lab.erf.sweep import run_sweep
from erf_lab.errors import ErfLabError

DEFAULT_INPUT = 128
DEFAULT_NUM_IMAGES = 2


def builtin_image_names() -> list[str]:
    """File names of the built-in image set (data/default_images)."""
    root = default_images_dir()
    return [p.relative_to(root).as_posix() for p in list_image_files(root)[0]]


def _images(source: tuple, input_size: int, model, tmp: Path) -> ImageSource:
    """The library's ``ImageSource`` for a page's image choice (uploads are written to ``tmp`` as PNG)."""
    mean, std = model_mean_std(model)
    kind, payload = source[:2]
    if kind == "builtin":
        src = load_images(None, num_images=len(builtin_image_names()), input_size=input_size, mean=mean, std=std)
        src.files = [p for p in src.files if src.id_of(p) in set(payload)]
        if not src.files:
            raise ErfLabError(f"none of {sorted(payload)} is a built-in image")
        return src
    if kind == "folder":
        folder = safety.safe_directory(payload, "image folder")
        return load_images(folder, num_images=safety.MAX_IMAGES, input_size=input_size, mean=mean, std=std)
    if kind == "upload":
        for i, (name, data) in enumerate(payload):
            safety.verify_image_bytes(name, data).save(tmp / f"{i:03d}_{Path(name).stem[:40]}.png")
        return load_images(tmp, num_images=safety.MAX_IMAGES, input_size=input_size, mean=mean, std=std)
    raise ErfLabError(f"unknown image source {kind!r}")


def spec_label(spec: dict) -> str:
    """Short human label of one ERF configuration."""
    ov = json.loads(spec["overrides"])
    parts = [spec["model"]]
    if "large_kernel_sizes" in ov:
        ks = ov["large_kernel_sizes"]
        parts.append("K" + ("-".join(map(str, ks)) if len(set(ks)) > 1 else str(ks[0])))
    if ov.get("channels") == list(TINY_CHANNELS):
        parts.append("tiny")
    parts.append("re-param" if spec.get("reparameterize") else "train-time")
    if spec.get("weights_name"):
        parts.append(Path(spec["weights_name"]).stem[:20])
    elif spec.get("pretrained"):
        parts.append("pretrained")
    return " · ".join(parts)


def _source_key(source: tuple) -> str:
    if source[0] == "upload":
        return json.dumps(["upload", [(n, sha(d)) for n, d in source[1]], source[2]])
    return json.dumps(list(source), default=list)


def measure(model, images: ImageSource, spec: dict, on_progress=None):
    """The ERF measurement of one configuration (``erf_lab.erf.compute.compute_erf``)."""
    total = max(len(images), 1)
    callback = (lambda acc: on_progress(min(len(acc.processed) / total, 1.0))) if on_progress else None
    return compute_erf(model, images, layer=spec.get("layer") or None, aggregate=spec.get("aggregate", "relu"),
                       reparameterize=bool(spec.get("reparameterize", True)), show_progress=False, on_batch=callback)


def erf_for(spec: dict, source: tuple, weights: bytes | None = None, on_progress=None) -> dict:
    """ERF map, metrics and skipped images of one configuration, cached across sessions.

    Random-init models are seeded (``torch.manual_seed(0)``) so a configuration always gives the same map.
    ``on_progress(fraction)`` is called after every image. Skipped images are counted as by the CLI: the
    unusable uploads, the unreadable files of the folder, and the images whose gradient was not finite.
    """
    key = "erf:" + json.dumps(spec, sort_keys=True) + _source_key(source) + sha(weights)
    return cached(key, lambda: _erf(spec, source, weights, on_progress))


def _erf(spec: dict, source: tuple, weights: bytes | None, on_progress) -> dict:
    torch.manual_seed(0)
    model = build_model(spec["model"], spec["overrides"], weights, spec.get("weights_name", ""))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        images = _images(source, int(spec["input_size"]), model, Path(d))
        res = measure(model, images, spec, on_progress)
    skipped = [list(s) for s in (source[2] if source[0] == "upload" else ())]
    skipped += [list(s) for s in images.skipped if s[1] != "not an image file (extension)"] + list(res.skipped)
    erf = np.asarray(res.erf, dtype=np.float64)
    metrics = compute_metrics(erf, theoretical_rf=spec.get("trf"))
    return {"erf": erf, "metrics": metrics, "summary": summary(metrics), "num_used": int(res.num_used),
            "num_skipped": len(skipped), "skipped": skipped, "layer": str(res.layer), "trf": spec.get("trf"),
            "seconds": time.perf_counter() - t0, "label": spec_label(spec), "info": dict(res.info)}


def skip_message(skipped: list, num_used: int) -> str | None:
    """``"N of M images skipped: name: reason; ..."`` (the first five), or None when nothing was skipped."""
    if not skipped:
        return None
    shown = "; ".join(f"{n}: {r}" for n, r in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    return f"{len(skipped)} of {len(skipped) + num_used} images skipped: {shown}"


def summary_table(results: list[tuple[dict, dict]]):
    """One row per configuration: label + the flat metrics summary."""
    import pandas as pd

    return pd.DataFrame([{"configuration": r["label"], "images": r["num_used"], **r["summary"]}
                         for _, r in results])


def sweep_member(k: int, *, reparam: str, init: str, weights_dir: str | None, input_size: int, num_images: int,
                 overrides_json: str, layer: str | None = None) -> dict:
    """One kernel size of ``erf_lab.erf.sweep.run_sweep`` (its run directories are reused when settings match).

    Returns ``{"rows", "reparam_diff", "maps": {mode: erf}, "out_dir"}``.
    """
    tag = hashlib.sha256(json.dumps([reparam, init, weights_dir, input_size, num_images, overrides_json, layer])
                         .encode()).hexdigest()[:12]
    out = app_runs_dir() / f"sweep-{tag}" / f"K{k}"
    res = run_sweep([k], reparam=reparam, init=init, weights_dir=weights_dir, input_size=input_size,
                    num_images=num_images, overrides=parse_overrides(overrides_json), out=out, formats=("png",),
                    layer=layer, show_progress=False, argv=["streamlit", "app/main.py", "(growth page)"])
    maps = {row["reparam"]: load_run(out / row["run_dir"]).erf for row in res["rows"]}
    return {"rows": res["rows"], "reparam_diff": res["reparam_diff"], "maps": maps, "out_dir": str(out)}
