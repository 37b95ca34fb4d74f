"""How the ERF grows with kernel size and with structural re-parameterization (``erf-lab sweep``).

The kernel family is the one of RepLKNet's kernel-size study (Ding et al., CVPR 2022, Table 5): the registered
``replknet_3/7/13/25`` and ``replknet_31b`` (kernels 31-29-27-13); any other K uses the 31B layout with kernels
(K, K, K, min(K, 13)) and a 5x5 re-param branch when K > 5. Every (K, mode) is its own run directory
(:func:`erf_lab.erf.report.write_run_dir`); the sweep adds a heatmap grid, growth curves and a table.
The train-time and deploy (re-parameterized) forms compute the same function, so their ERFs must agree
(Ding et al. 2022, Sec. 3, Guideline 2); the sweep reports the largest difference.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.erf.metrics import summary
from erf_lab.erf.report import csv_text, load_run, markdown_table, provenance, write_run_dir, write_text
from erf_lab.errors import ErfLabError
from erf_lab.io import progress, write_json

REPARAM_MODES = {"train": ("train",), "deploy": ("deploy",), "both": ("train", "deploy")}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SWEEP_COLUMNS = ("kernel", "reparam", "model", "shape", "area@20%", "area@30%", "area@50%", "area@99%", "r_rms",
                 "std_y", "std_x", "gauss_sigma_x", "gauss_r2", "trf", "erf/trf", "num_used", "run_dir")


def parse_kernels(text: str | Sequence[int]) -> list[int]:
    """'3,7,13' -> [3, 7, 13]; kernels must be odd and >= 1, no duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ks = [int(str(k).strip()) for k in items if str(k).strip()]
    except ValueError:
        raise ErfLabError(f"--kernels expects comma-separated odd integers, got {text!r}") from None
    if not ks:
        raise ErfLabError("--kernels is empty")
    bad = [k for k in ks if k < 1 or k % 2 == 0]
    if bad:
        raise ErfLabError(f"kernel sizes must be odd positive integers, got {', '.join(map(str, bad))}")
    if len(set(ks)) != len(ks):
        raise ErfLabError(f"duplicate kernel sizes in {text!r}")
    return ks


def kernel_family_member(k: int) -> tuple[str, dict]:
    """(registered model name, constructor overrides) of the RepLKNet kernel-family member with kernel K."""
    from erf_lab.models import is_model

    if k == 31:
        return "replknet_31b", {}
    if is_model(f"replknet_{k}"):
        return f"replknet_{k}", {}
    return "replknet_31b", {"large_kernel_sizes": (k, k, k, min(k, 13)), "small_kernel": 5 if k > 5 else None}


def find_weights(weights_dir: str | os.PathLike, k: int) -> Path:
    """The checkpoint for kernel K in ``weights_dir``: ``replknet_<K>.*``, ``replknet_31b.*`` (K=31), ``K<K>.*``
    or ``<K>.*`` with a .safetensors/.pth/.pt/.bin/.ckpt suffix; ErfLabError when none or several match."""
    d = Path(weights_dir).expanduser()
    if not d.is_dir():
        raise ErfLabError(f"--weights-dir not found or not a folder: {d}")
    stems = {f"replknet_{k}", f"replknet-{k}", f"k{k}", str(k)} | ({"replknet_31b", "replknet-31b"} if k == 31 else set())
    hits = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
                  and p.name[: -len(p.suffix)].lower() in stems)
    if not hits:
        raise ErfLabError(f"no checkpoint for kernel {k} in {d} (expected replknet_{k}.pth / .safetensors, "
                          f"K{k}.pth or {k}.pth)")
    if len(hits) > 1:
        raise ErfLabError(f"several checkpoints for kernel {k} in {d}: {', '.join(p.name for p in hits)}")
    return hits[0]


def _build(k: int, init: str, weights_dir, overrides: dict, seed: int):
    import torch

    from erf_lab.models import create_model

    name, fam = kernel_family_member(k)
    clash = [key for key in ("large_kernel_sizes", "kernels") if key in overrides]
    if clash:
        raise ErfLabError(f"--override {clash[0]} conflicts with the swept kernel size (set by --kernels)")
    kwargs = {**fam, **overrides}
    weights = find_weights(weights_dir, k) if init == "weights" else None
    torch.manual_seed(seed)  # same seed for every K: the only difference between members is the kernel
    model = create_model(name, weights=None if weights is None else str(weights), **kwargs)
    return name, kwargs, weights, model.eval()


def run_sweep(kernels: Sequence[int], *, reparam: str = "both", init: str = "random",
              weights_dir: str | os.PathLike | None = None, input_size: int = 1024, images: str | None = None,
              num_images: int | None = None, overrides: dict | None = None, out: str | os.PathLike = "sweep",
              formats: Sequence[str] = ("png", "pdf"), seed: int = 0, layer: str | None = None,
              aggregate: str = "relu", batch_size: int = 1, device: str = "cpu", show_progress: bool = True,
              argv: Sequence[str] | None = None) -> dict:
    """Measure the ERF of each kernel-family member (train-time and/or deploy form) and summarise.

    Writes ``out/K<k>-<mode>/`` run directories (reused when their run.json records the same settings),
    ``grid.<fmt>`` (rows: mode, columns: K, one colour scale), ``growth.<fmt>`` (metrics vs K, a line per
    mode), ``sweep.csv`` / ``sweep.md`` and ``sweep.json`` last (provenance, rows, train-vs-deploy
    differences). Returns ``{"rows", "reparam_diff", "files", "out_dir"}``.
    """
    from erf_lab.erf.compute import compute_erf
    from erf_lab.erf.images import load_images, model_mean_std
    from erf_lab.erf.plotting import plot_grid, plot_growth
    from erf_lab.erf.receptive_field import theoretical_rf

    ks = parse_kernels(kernels)
    if reparam not in REPARAM_MODES:
        raise ErfLabError(f"--reparam must be train, deploy or both, got {reparam!r}")
    if init not in ("random", "weights"):
        raise ErfLabError(f"--init must be random or weights, got {init!r}")
    if init == "weights" and weights_dir is None:
        raise ErfLabError("--init weights needs --weights-dir (one checkpoint per kernel size)")
    if int(input_size) < 1:
        raise ErfLabError(f"--input-size must be a positive integer, got {input_size}")
    overrides = dict(overrides or {})
    modes = REPARAM_MODES[reparam]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"kernels": ks, "reparam": reparam, "init": init, "weights_dir": None if weights_dir is None else
              str(Path(weights_dir).resolve()), "input_size": int(input_size), "images": images or "default",
              "num_images": num_images, "overrides": overrides, "seed": int(seed), "layer": layer or "forward_features",
              "aggregate": aggregate, "batch_size": int(batch_size), "device": device, "formats": list(formats)}

    rows, maps, diffs = [], {}, []
    bar = progress(total=len(ks) * len(modes), desc="sweep", unit="run", disable=not show_progress)
    try:
        for k in ks:
            name, kwargs, weights, model = _build(k, init, weights_dir, overrides, seed)
            mean, std = model_mean_std(model)
            source = load_images(images, num_images=num_images, input_size=int(input_size), mean=mean, std=std)
            trf = theoretical_rf(model, layer)
            for mode in modes:
                sub = out_dir / f"K{k}-{mode}"
                key = {"kernel": k, "mode": mode, "model": name, "model_kwargs": _jsonable(kwargs),
                       "weights": None if weights is None else str(weights.resolve()), **{
                           p: params[p] for p in ("init", "input_size", "images", "num_images", "seed", "layer",
                                                  "aggregate")}}
                run = _reuse(sub, key)
                if run is None:
                    res = compute_erf(model, source, layer=layer, aggregate=aggregate, batch_size=batch_size,
                                      device=device, reparameterize=(mode == "deploy"), show_progress=False)
                    info = {"label": f"K={k} {mode}", "model": name, "sweep_key": key, "kernel": k,
                            "reparam": mode, "theoretical_rf": trf, "layer": res.layer, "input_size": res.input_size,
                            "num_used": res.num_used, "num_skipped": res.num_skipped, "skipped": res.skipped,
                            "image_list": [p for p in res.processed if p not in {s[0] for s in res.skipped}],
                            **provenance("sweep", params, argv)}
                    metrics = write_run_dir(sub, res.erf, info, theoretical_rf=trf, formats=formats)
                    erf, num_used = res.erf, res.num_used
                else:
                    erf, metrics, num_used = run.erf, run.metrics, (run.run_info or {}).get("num_used")
                maps[(k, mode)] = erf
                rows.append({"kernel": k, "reparam": mode, "model": name, "num_used": num_used,
                             "run_dir": sub.name, **summary(metrics)})
                bar.update(1)
            if len(modes) == 2:
                a, b = maps[(k, "train")], maps[(k, "deploy")]
                scale = float(np.abs(a).max()) or 1.0
                diffs.append({"kernel": k, "max_abs_diff": float(np.abs(a - b).max()),
                              "max_rel_diff": float(np.abs(a - b).max()) / scale})
    finally:
        bar.close()

    files = plot_grid([[maps[(k, m)] for k in ks] for m in modes], [f"{m}" for m in modes],
                      [f"K = {k}" for k in ks], out_dir / "grid", formats=formats)
    files += plot_growth(rows, out_dir / "growth", x="kernel", group="reparam", formats=formats)
    write_text(out_dir / "sweep.csv", csv_text(rows, SWEEP_COLUMNS))
    md = markdown_table(rows, SWEEP_COLUMNS)
    if diffs:
        md += "\n\ntrain vs deploy (re-parameterized) ERF, largest difference:\n\n" + markdown_table(
            diffs, ("kernel", "max_abs_diff", "max_rel_diff"))
    write_text(out_dir / "sweep.md", md + "\n")
    files += [out_dir / "sweep.csv", out_dir / "sweep.md"]
    record = provenance("sweep", params, argv)
    record.update({"rows": rows, "reparam_diff": diffs, "files": [p.name for p in files]})
    write_json(out_dir / "sweep.json", record)
    files.append(out_dir / "sweep.json")
    return {"rows": rows, "reparam_diff": diffs, "files": files, "out_dir": out_dir, "markdown": md}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _reuse(sub: Path, key: dict):
    """The finished run in ``sub`` when its run.json records exactly ``key`` (else None: recompute)."""
    if not (sub / "run.json").is_file():
        return None
    try:
        run = load_run(sub)
    except ErfLabError:
        return None
    stored = (run.run_info or {}).get("sweep_key")
    if stored is None or _norm(stored) != _norm(key) or run.metrics is None:
        return None
    return run


def _norm(obj):
    import json

    return json.loads(json.dumps(obj, default=str))

