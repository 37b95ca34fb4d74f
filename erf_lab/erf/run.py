"""One whole ``erf-lab compute`` run: model, images, resumable accumulation, distributed shards, outputs.

The accumulator (sum, count, processed ids) is saved atomically to ``<out>/.erf_state*.npz`` every few images
and on Ctrl-C / crash, so ``--resume`` continues with no image counted twice. Final files (erf.npy,
metrics.json, erf.png/pdf, run.json) are written only at the end, by rank 0.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from erf_lab.errors import ErfLabError
from erf_lab.erf import distributed as D
from erf_lab.erf.compute import Accumulator, compute_erf
from erf_lab.erf.images import load_images, model_mean_std
from erf_lab.erf.receptive_field import list_layers, resolve_layer
from erf_lab.erf.report import write_run_dir

COMPLETE_FILE = "run.json"  # written last by report.write_run_dir: its presence marks a complete run
OUTPUT_FILES = ("erf.npy", "metrics.json", "erf.png", "erf.pdf", COMPLETE_FILE)
STATE_GLOB = ".erf_state*.npz"
DEFAULT_CHECKPOINT_EVERY = 5


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def state_path(out_dir: Path, info: D.DistInfo) -> Path:
    name = ".erf_state.npz" if not info.enabled else f".erf_state.rank{info.rank}of{info.world_size}.npz"
    return Path(out_dir) / name


def versions() -> dict:
    import captum
    import erf_lab

    return {"erf-lab": erf_lab.__version__, "torch": torch.__version__, "captum": captum.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "model"


def default_out_dir(model: str, images_name: str, input_size: int, root: str | os.PathLike = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{_safe(model)}-{_safe(images_name)}-{input_size}-{stamp}"


@contextlib.contextmanager
def _plain_depthwise(model):
    """fastconv modules run plain F.conv2d meanwhile: the tiny geometry probe must not autotune (time candidate
    backends, build the C++ kernel) for shapes the measurement never uses."""
    mods = [m for m in model.modules() if getattr(m, "backend", None) == "auto" and type(m).__name__ == "DepthwiseConv2d"]
    for m in mods:
        m.backend = "native"
    try:
        yield
    finally:
        for m in mods:
            m.backend = "auto"


def layer_geometry(model, layer: str | None, input_size: int) -> dict:
    """Feature-map shape and theoretical RF of ``layer``; ErfLabError if ``input_size`` is too small."""
    name, _ = resolve_layer(model, layer)
    probe = int(min(input_size, 32))  # RF and stride do not depend on the input size: probe small and fast
    with _plain_depthwise(model):
        try:
            rows = {r["name"]: r for r in list_layers(model, probe)}
        except ErfLabError:
            if probe == input_size:
                raise
            probe = input_size
            rows = {r["name"]: r for r in list_layers(model, probe)}
    row = rows.get(name)
    if row is None:
        raise ErfLabError(f"layer {name!r} does not produce a (N, C, H, W) feature map in the forward pass")
    stride = int(row.get("stride") or 1)
    if input_size < stride or row["shape"][-1] < 1 or row["shape"][-2] < 1:
        raise ErfLabError(f"input size {input_size} is too small for layer {name!r} (total stride {stride}: "
                          f"the feature map would be under 1 pixel); use --input-size >= {stride}")
    return {"layer": name, "theoretical_rf": row["theoretical_rf"], "stride": stride,
            "feature_shape": [row["shape"][0], -(-input_size // stride), -(-input_size // stride)]}


def run_compute(model: str, *, weights: str | None = None, drop_head: bool = False, overrides: dict | None = None,
                images: str | None = None, num_images: int | None = None, input_size: int = 1024,
                layer: str | None = None, aggregate: str = "relu", batch_size: int = 1, device: str = "cpu",
                out: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
                reparameterize: bool = True, channels_last: bool = True, conv_backend: str = "fastconv",
                seed: int = 0, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, show_progress: bool = True,
                on_batch=None, argv: list[str] | None = None, runs_root: str | os.PathLike = "runs") -> dict:
    """Run a whole ERF measurement and write its result directory; returns
    ``{"out_dir", "metrics", "run_info", "result", "already_complete"}`` (metrics / result on rank 0 only)."""
    start = _now()
    t0 = time.time()
    dinfo = D.init(device)
    dev = D.device_for(device, dinfo)
    try:
        return _run(model, weights, drop_head, overrides or {}, images, num_images, int(input_size), layer,
                    aggregate, int(batch_size), dev, out, resume, force, reparameterize, channels_last,
                    conv_backend, seed, checkpoint_every, show_progress, on_batch, argv, runs_root, dinfo,
                    start, t0)
    finally:
        D.shutdown(dinfo)


def _run(model_name, weights, drop_head, overrides, images, num_images, input_size, layer, aggregate, batch_size,
         device, out, resume, force, reparameterize, channels_last, conv_backend, seed, checkpoint_every,
         show_progress, on_batch, argv, runs_root, dinfo, start, t0) -> dict:
    from erf_lab.io import sha256_file
    from erf_lab.models import create_model

    if aggregate not in ("relu", "abs"):
        raise ErfLabError(f"unknown aggregate {aggregate!r}; choose relu or abs")
    if batch_size < 1:
        raise ErfLabError(f"--batch-size must be at least 1, got {batch_size}")
    if input_size < 1:
        raise ErfLabError(f"--input-size must be a positive integer, got {input_size}")
    if images is not None and str(images) != "default" and not Path(images).expanduser().is_dir():
        raise ErfLabError(f"image folder not found: {images}" if not Path(images).exists()
                          else f"--images must be a folder of images, got a file: {images}")
    torch.manual_seed(seed)
    model = create_model(model_name, weights=weights, drop_head=drop_head, **overrides)
    mean, std = model_mean_std(model)
    source = load_images(images, num_images=num_images, input_size=input_size, mean=mean, std=std)
    geom = layer_geometry(model, layer, input_size)
    layer_name = geom["layer"]

    out_dir = Path(out) if out is not None else default_out_dir(model_name, source.name, input_size, runs_root)
    out_dir = Path(D.broadcast_object(str(out_dir), dinfo))
    outputs = [out_dir / f for f in OUTPUT_FILES if (out_dir / f).exists()]
    states = sorted(out_dir.glob(STATE_GLOB)) if out_dir.is_dir() else []
    if (out_dir / COMPLETE_FILE).exists() and not force:
        if resume:
            return {"out_dir": out_dir, "already_complete": True, "metrics": None, "run_info": None, "result": None}
        raise ErfLabError(f"{out_dir} already holds a complete run; use --force to overwrite or choose another --out")
    if states and not (resume or force):
        raise ErfLabError(f"{out_dir} holds an interrupted run; pass --resume to continue it or --force to start over")
    if outputs and not states and not force:
        raise ErfLabError(f"{out_dir} holds incomplete output files ({outputs[0].name}); use --force to overwrite")
    D.barrier(dinfo)
    if force and dinfo.is_main:
        for f in [*outputs, *states]:
            f.unlink(missing_ok=True)
    D.barrier(dinfo)

    weights_sha = sha256_file(weights) if weights else None
    config = {"model": model_name, "weights_sha256": weights_sha, "overrides": {k: repr(v) for k, v in overrides.items()},
              "drop_head": bool(drop_head), "layer": layer_name, "aggregate": aggregate, "input_size": input_size,
              "images": source.ids, "reparameterize": bool(reparameterize), "seed": int(seed),
              "world_size": dinfo.world_size, "mean": list(mean), "std": list(std)}
    spath = state_path(out_dir, dinfo)
    acc, resumed_from = Accumulator(), 0
    if resume and spath.exists():
        try:
            acc, extra = Accumulator.load(spath)
        except Exception as e:
            raise ErfLabError(f"cannot read the saved state {spath}: {e}; use --force to start over") from None
        old = extra.get("config", {})
        diff = [k for k in config if old.get(k) != config[k]]
        if diff:
            raise ErfLabError(f"cannot resume {out_dir}: settings differ from the interrupted run ({', '.join(diff)}); "
                              f"use the same options or --force to start over")
        start = extra.get("start_time", start)
        resumed_from = len(acc.processed)
    elif resume and dinfo.is_main:
        print(f"no interrupted run in {out_dir}; starting a new one", file=sys.stderr)

    source.files = D.shard(source.files, dinfo)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"config": config, "start_time": start}
    since = [0]

    def checkpoint(a: Accumulator):
        since[0] += 1
        if since[0] >= max(1, checkpoint_every // batch_size):
            a.save(spath, extra)
            since[0] = 0
        if on_batch is not None:
            on_batch(a)

    try:
        result = compute_erf(model, source, layer=layer_name, aggregate=aggregate, batch_size=batch_size,
                             device=device, reparameterize=reparameterize, channels_last=channels_last,
                             conv_backend=conv_backend, show_progress=show_progress and dinfo.is_main,
                             state=acc, on_batch=checkpoint, inplace=True,
                             reducer=D.make_reducer(dinfo, (input_size, input_size), device))
    except BaseException:
        if acc.processed:
            acc.save(spath, extra)  # Ctrl-C or crash: keep every image already accumulated
        raise

    run_info = None
    metrics = None
    if dinfo.is_main:
        order = {i: n for n, i in enumerate(config["images"])}
        skipped_ids = {s[0] for s in result.skipped}
        used = sorted((p for p in result.processed if p not in skipped_ids), key=lambda p: order.get(p, 1 << 30))
        skipped = [list(s) for s in source.skipped] + result.skipped
        run_info = {
            "model": model_name, "overrides": {k: v for k, v in overrides.items()},
            "weights": str(Path(weights).resolve()) if weights else None, "weights_sha256": weights_sha,
            "drop_head": bool(drop_head), "layer": layer_name, "aggregate": aggregate, "input_size": input_size,
            "feature_shape": geom["feature_shape"], "theoretical_rf": geom["theoretical_rf"],
            "images": "default" if source.name == "default" else str(Path(source.root).resolve()),
            "image_list": used, "num_images_requested": num_images, "num_used": result.num_used,
            "num_skipped": len(skipped), "skipped": skipped, "mean": list(mean), "std": list(std),
            "resize": "bicubic, square", "target": result.info.get("target"), "map": result.info.get("map"),
            "gradient": "captum.attr.NeuronGradient", "reparameterized": bool(reparameterize),
            "channels_last": bool(channels_last), "conv_backend": conv_backend,
            "fastconv_modules": result.info.get("fastconv_modules"), "weight_grads": False,
            "tf32": result.info.get("tf32"),
            "batch_size": batch_size, "seed": int(seed), "device": str(device), "world_size": dinfo.world_size,
            "dist_backend": dinfo.backend, "resumed": resumed_from > 0, "resumed_after_images": resumed_from,
            "start_time": start, "end_time": _now(), "wall_seconds_this_session": round(time.time() - t0, 2),
            "command": argv if argv is not None else sys.argv, "versions": versions(),
        }
        metrics = write_run_dir(out_dir, result.erf, run_info, theoretical_rf=geom["theoretical_rf"])
    D.barrier(dinfo)
    spath.unlink(missing_ok=True)
    return {"out_dir": out_dir, "metrics": metrics, "run_info": run_info, "result": result if dinfo.is_main else None,
            "already_complete": False}
