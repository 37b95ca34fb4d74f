"""Every cached loader of the app, in one place.

``st.cache_resource`` holds models (shared across sessions; callers must copy before mutating them) and
``st.cache_data`` holds computed results (ERF maps, metrics, benchmark tables). Nothing here does analysis:
each function builds its inputs and calls the ``erf_lab`` / ``fastconv`` library.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from erf_lab.errors import ErfLabError
from ui import need

# Tiny RepLKNet used by every interactive default: the paper's 31B kernel schedule on a narrow, shallow
# body so that an ERF at 128 px over two images takes a few seconds on a 2-core CPU. 128 px (a multiple of
# the total stride 32) gives an even feature map whose centre pixel sits over the image centre, as at 1024 px.
TINY_CHANNELS = (16, 32, 64, 128)
TINY_LAYERS = (1, 1, 2, 1)
PAPER_31B_KERNELS = (31, 29, 27, 13)
DEFAULT_MODEL = "replknet_31b"
DEFAULT_INPUT = 128
DEFAULT_NUM_IMAGES = 2


def overrides_key(overrides: dict[str, Any] | None) -> str:
    """A stable, hashable form of model overrides (JSON with sorted keys)."""
    return json.dumps(overrides or {}, sort_keys=True, default=list)


def registered_models() -> list[str]:
    """Registered model names only: the app never imports ``module:factory`` code."""
    list_models = need("erf_lab.models", "list_models")
    return list(list_models())


def is_replknet(name: str) -> bool:
    return name.startswith("replknet")


def _check_registered(name: str) -> None:
    if ":" in name or name not in registered_models():
        raise ErfLabError(f"unknown model {name!r}; choose one of the registered models")


def build_model(name: str, overrides_json: str = "{}", weights: bytes | None = None, weights_name: str = "",
                deploy: bool = False):
    """A fresh model in eval mode (random init unless ``weights``, loaded through the safe loader)."""
    _check_registered(name)
    create_model = need("erf_lab.models", "create_model")
    overrides = json.loads(overrides_json)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    if weights is None:
        model = create_model(name, deploy=deploy, **overrides)
    else:
        suffix = ".safetensors" if weights_name.endswith(".safetensors") else ".pth"
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"upload{suffix}"
            path.write_bytes(weights)
            model = create_model(name, weights=str(path), deploy=deploy, drop_head=True, **overrides)
    return model.eval()


@st.cache_resource(max_entries=6, show_spinner=False)
def cached_model(name: str, overrides_json: str = "{}"):
    """Shared random-init model for read-only uses (layer listing); ``copy.deepcopy`` it before mutating."""
    return build_model(name, overrides_json)


def sha(data: bytes | None) -> str:
    return hashlib.sha256(data).hexdigest() if data else ""


@st.cache_data(max_entries=32, show_spinner=False)
def layer_table(name: str, overrides_json: str, input_size: int) -> list[dict]:
    """``erf_lab.erf.receptive_field.list_layers``: name, output shape and theoretical RF of each layer."""
    list_layers = need("erf_lab.erf.receptive_field", "list_layers")
    model = cached_model(name, overrides_json)
    return [dict(r) for r in list_layers(model, input_size)]


def main_layers(rows: list[dict], show_all: bool = False) -> list[dict]:
    """Stage-level layers (at most two name levels deep) plus ``forward_features``, unless ``show_all``."""
    if show_all:
        return rows
    return [r for r in rows if r["name"].count(".") <= 1 or r is rows[-1]]


# ------------------------------------------------------------------------------------------------ figures
def _plot_function(kind: str):
    """Library plotting functions the app renders (each writes ``stem.<fmt>`` files atomically)."""
    table = {
        "erf_comparison": ("erf_lab.erf.plotting", "plot_comparison"),
        "erf_grid": ("erf_lab.erf.plotting", "plot_grid"),
        "erf_growth": ("erf_lab.erf.plotting", "plot_growth"),
        "erf_single": ("erf_lab.erf.plotting", "plot_erf"),
    }
    if kind not in table:
        raise ErfLabError(f"unknown figure kind {kind!r}")
    return need(*table[kind])


@st.cache_data(max_entries=48, show_spinner=False)
def render_figure(kind: str, fmt: str, args: tuple, kwargs_json: str = "{}") -> bytes:
    """Bytes of a library figure in ``fmt`` (png/pdf/svg), rendered through the library's own function."""
    fn = _plot_function(kind)
    kwargs = json.loads(kwargs_json)
    with tempfile.TemporaryDirectory() as d:
        paths = fn(*args, stem=Path(d) / "figure", formats=(fmt,), **kwargs)
        return Path(paths[0]).read_bytes()


# ---------------------------------------------------------------------------------------------------- ERF
def builtin_image_names() -> list[str]:
    """File names of the built-in image set (data/default_images)."""
    default_images_dir, list_image_files = need("erf_lab.erf.images", "default_images_dir", "list_image_files")
    root = default_images_dir()
    files, _ = list_image_files(root)
    return [p.relative_to(root).as_posix() for p in files]


def _image_source_obj(source: tuple, input_size: int, model, tmp: Path):
    """Turn the page's hashable image choice into the library's ``ImageSource``."""
    load_images, default_images_dir, model_mean_std = need("erf_lab.erf.images", "load_images",
                                                           "default_images_dir", "model_mean_std")
    mean, std = model_mean_std(model)
    kind, payload = source
    if kind == "builtin":
        folder = default_images_dir()
        src = load_images(None, num_images=len(list(builtin_image_names())), input_size=input_size,
                          mean=mean, std=std)
        chosen = set(payload)
        src.files = [p for p in src.files if src.id_of(p) in chosen]
        if not src.files:
            raise ErfLabError(f"none of {sorted(chosen)} is in {folder}")
        return src
    if kind == "folder":
        import safety

        folder = safety.safe_directory(payload, "image folder")
        return load_images(folder, num_images=safety.MAX_IMAGES, input_size=input_size, mean=mean, std=std)
    if kind == "upload":
        import safety

        for i, (name, data) in enumerate(payload):
            img = safety.verify_image_bytes(name, data)
            img.save(tmp / f"{i:03d}_{Path(name).stem[:40]}.png")
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


class ResultStore:
    """A small thread-safe LRU of computed results shared by all sessions (``st.cache_resource``).

    Used instead of ``st.cache_data`` where the computation drives an ``st.progress`` bar: element calls
    inside a ``cache_data`` function would be recorded and replayed against a bar that no longer exists.
    """

    def __init__(self, max_entries: int = 32):
        import threading
        from collections import OrderedDict

        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, key: str):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def put(self, key: str, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)


@st.cache_resource(show_spinner=False)
def result_store() -> ResultStore:
    return ResultStore()


def _source_key(source: tuple) -> str:
    kind, payload = source
    if kind == "upload":
        payload = [(n, sha(d)) for n, d in payload]
    return json.dumps([kind, payload], default=list)


def erf_for(spec: dict, source: tuple, weights: bytes | None = None, on_progress=None) -> dict:
    """ERF map + metrics of one configuration (``erf_lab.erf.compute.compute_erf`` + ``metrics``), cached.

    Random-init models are seeded (``torch.manual_seed(0)``) so a configuration always gives the same map.
    ``on_progress(fraction)`` is called after every image.
    """
    import time

    import torch

    key = "erf:" + json.dumps(spec, sort_keys=True) + _source_key(source) + sha(weights)
    hit = result_store().get(key)
    if hit is not None:
        return hit
    compute_erf = need("erf_lab.erf.compute", "compute_erf")
    compute_metrics, summary = need("erf_lab.erf.metrics", "compute_metrics", "summary")
    torch.manual_seed(0)
    model = build_model(spec["model"], spec["overrides"], weights, spec.get("weights_name", ""))
    layer = spec.get("layer") or None
    trf = spec.get("trf")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        images = _image_source_obj(source, int(spec["input_size"]), model, Path(d))
        total = max(len(images), 1)
        callback = (lambda acc: on_progress(min(len(acc.processed) / total, 1.0))) if on_progress else None
        res = compute_erf(model, images, layer=layer, aggregate=spec.get("aggregate", "relu"),
                          reparameterize=bool(spec.get("reparameterize", True)), show_progress=False,
                          on_batch=callback)
    erf = np.asarray(res.erf, dtype=np.float64)
    metrics = compute_metrics(erf, theoretical_rf=trf)
    out = {"erf": erf, "metrics": metrics, "summary": summary(metrics), "num_used": int(res.num_used),
           "num_skipped": int(res.num_skipped), "skipped": res.skipped, "layer": str(res.layer), "trf": trf,
           "seconds": time.perf_counter() - t0, "label": spec_label(spec), "info": dict(res.info)}
    result_store().put(key, out)
    return out


def summary_table(results: list[tuple[dict, dict]]):
    """One row per configuration: label + the flat metrics summary."""
    import pandas as pd

    return pd.DataFrame([{"configuration": r["label"], "images": r["num_used"], **r["summary"]}
                         for _, r in results])


def _tuple_text(v) -> str:
    return "(" + ",".join(map(str, v)) + ")"


def erf_cli_args(spec: dict, source: tuple, full: bool = True) -> list[str]:
    """The ``erf-lab compute`` arguments for ``spec`` (``full``: the paper protocol, 1024 px, 50 images)."""
    ov = json.loads(spec["overrides"])
    args = ["compute", "--model", spec["model"]]
    if "large_kernel_sizes" in ov:
        args += ["--override", f"large_kernel_sizes={_tuple_text(ov['large_kernel_sizes'])}",
                 "--override", f"small_kernel={ov.get('small_kernel')}"]
    if not full and "channels" in ov:
        args += ["--override", f"channels={_tuple_text(ov['channels'])}",
                 "--override", f"layers={_tuple_text(ov['layers'])}"]
    if spec.get("layer") and spec["layer"] != "forward_features":
        args += ["--layer", spec["layer"]]
    if not spec.get("reparameterize", True):
        args += ["--no-reparam"]
    if spec.get("aggregate", "relu") != "relu":
        args += ["--aggregate", spec["aggregate"]]
    if full:
        args += ["--weights", "CHECKPOINT.pth", "--images", "IMAGENET_VAL_DIR", "--num-images", "50",
                 "--input-size", "1024"]
    else:
        args += ["--input-size", str(spec["input_size"])]
        if source[0] == "folder":
            args += ["--images", source[1]]
        elif source[0] == "builtin":
            args += ["--num-images", str(len(source[1]))]
    args += ["--out", "runs/erf"]
    return args


# ------------------------------------------------------------------------------------------------- growth
def app_runs_dir() -> Path:
    """Where the app writes its own run directories: ``$ERF_LAB_APP_RUNS`` or ``<cache>/app-runs``.

    The Results page opens them like any CLI run directory."""
    import os

    from erf_lab.paths import cache_dir

    d = Path(os.environ.get("ERF_LAB_APP_RUNS") or cache_dir() / "app-runs").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def sweep_member(k: int, *, reparam: str, init: str, weights_dir: str | None, input_size: int, num_images: int,
                 overrides_json: str, layer: str | None = None) -> dict:
    """One kernel size of ``erf_lab.erf.sweep.run_sweep`` (its run directories are reused when settings match).

    Returns ``{"rows", "reparam_diff", "maps": {mode: erf}, "out_dir"}``.
    """
    run_sweep = need("erf_lab.erf.sweep", "run_sweep")
    load_run = need("erf_lab.erf.report", "load_run")
    overrides = {k2: tuple(v) if isinstance(v, list) else v for k2, v in json.loads(overrides_json).items()}
    tag = hashlib.sha256(json.dumps([reparam, init, weights_dir, input_size, num_images, overrides_json, layer])
                         .encode()).hexdigest()[:12]
    out = app_runs_dir() / f"sweep-{tag}" / f"K{k}"
    res = run_sweep([k], reparam=reparam, init=init, weights_dir=weights_dir, input_size=input_size,
                    num_images=num_images, overrides=overrides, out=out, formats=("png",), layer=layer,
                    show_progress=False, argv=["streamlit", "app/main.py", "(growth page)"])
    maps = {row["reparam"]: load_run(out / row["run_dir"]).erf for row in res["rows"]}
    return {"rows": res["rows"], "reparam_diff": res["reparam_diff"], "maps": maps, "out_dir": str(out)}


# ------------------------------------------------------------------------------------------ re-parameterization
@st.cache_data(max_entries=16, show_spinner=False)
def reparam_report(name: str, overrides_json: str, random_bn: bool, input_size: int, seed: int = 0,
                   _weights: bytes | None = None, weights_sha: str = "", weights_name: str = "") -> dict:
    """Kernels of every large-kernel block, the equivalence error and params/FLOPs of each form.

    Forms: train-time; official merged layout (``merge_large_kernels``); fully fused
    (``reparameterize_model``). Error = max|y - y'| / max|y| on a seeded random batch (eval mode).
    """
    import torch

    from erf_lab.models import reparameterize_model

    max_relative_error = need("erf_lab.models.deploy", "max_relative_error")
    count_flops, count_params = need("erf_lab.models.flops", "count_flops", "count_params")
    merge_large_kernels = need("erf_lab.models.replknet", "merge_large_kernels")
    torch.manual_seed(seed)
    model = build_model(name, overrides_json, _weights, weights_name)
    if random_bn:
        from erf_lab.models.reparam import randomize_bn

        randomize_bn(model, seed + 1)
    model.eval()
    blocks = {}
    for mod_name, m in model.named_modules():
        if hasattr(m, "get_equivalent_kernel_bias") and getattr(m, "lkb_origin", None) is not None:
            large = m.lkb_origin.conv.weight.detach()[:, 0].double().numpy()
            large_fused, _ = m.lkb_origin.fused_weight_bias()
            small = small_fused = None
            if m.small_conv is not None:
                small = m.small_conv.conv.weight.detach()[:, 0].double().numpy()
                small_fused = m.small_conv.fused_weight_bias()[0].detach()[:, 0].double().numpy()
            merged, merged_bias = m.get_equivalent_kernel_bias()
            blocks[mod_name] = {"large": large, "small": small,
                                "large_fused": large_fused.detach()[:, 0].double().numpy(),
                                "small_fused": small_fused, "merged": merged.detach()[:, 0].double().numpy(),
                                "kernel": int(m.kernel_size), "small_kernel": m.small_kernel}
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    forms = {}
    with torch.no_grad():
        y = model(x)
        forms["train-time"] = {"params": count_params(model), "flops": count_flops(model, input_size), "error": 0.0}
        merged_model = merge_large_kernels(model)
        forms["merged (official deploy layout)"] = {
            "params": count_params(merged_model), "flops": count_flops(merged_model, input_size),
            "error": max_relative_error(y, merged_model(x))}
        fused = reparameterize_model(model)
        forms["fully fused (reparameterize_model)"] = {
            "params": count_params(fused), "flops": count_flops(fused, input_size),
            "error": max_relative_error(y, fused(x))}
    return {"blocks": blocks, "forms": forms, "input_size": input_size}


# ------------------------------------------------------------------------------------------------ results
DOWNLOAD_SUFFIXES = {".png": "image/png", ".pdf": "application/pdf", ".svg": "image/svg+xml",
                     ".npy": "application/octet-stream", ".csv": "text/csv", ".json": "application/json",
                     ".md": "text/markdown"}
MAX_DOWNLOAD_MB = 200


def run_kind(d: Path) -> str | None:
    """What a directory holds: erf / sweep / shape-bias / benchmark / run (has run.json), else None."""
    if (d / "erf.npy").is_file():
        return "erf"
    if (d / "sweep.json").is_file():
        return "sweep"
    if (d / "summary.json").is_file() and (d / "decisions.csv").is_file():
        return "shape-bias"
    if (d / "results.json").is_file() and (d / "table.csv").is_file():
        return "benchmark"
    if (d / "run.json").is_file():
        return "run"
    return None


def find_runs(root: Path, max_depth: int = 4, limit: int = 300) -> list[dict]:
    """Result directories under ``root`` (itself included), breadth first, symlinks not followed."""
    out, frontier = [], [(root, 0)]
    while frontier and len(out) < limit:
        d, depth = frontier.pop(0)
        kind = run_kind(d)
        if kind:
            out.append({"path": d, "name": "." if d == root else d.relative_to(root).as_posix(), "kind": kind})
        if depth < max_depth:
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
            except OSError:
                continue
            frontier += [(p, depth + 1) for p in subs]
    return out


def downloadable_files(d: Path) -> list[Path]:
    """Figure and data files directly inside a result directory (size-limited, no symlinks)."""
    return [p for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink() and p.suffix.lower() in
            DOWNLOAD_SUFFIXES and not p.name.startswith(".") and p.stat().st_size <= MAX_DOWNLOAD_MB * 2**20]


def load_erf_run(path: str):
    """``erf_lab.erf.report.load_run`` (erf.npy + run.json + metrics.json)."""
    load_run = need("erf_lab.erf.report", "load_run")
    return load_run(path)


# --------------------------------------------------------------------------------------------- shape bias
SHAPE_BIAS_MODELS = ("efficientnet_lite0", "resnet50", "mobilenetv2", "replknet_31b")


def shape_bias_run(model_name: str, *, pretrained: bool, limit: int, overrides_json: str = "{}",
                   weights: bytes | None = None, weights_name: str = "") -> Path:
    """``erf_lab.shape_bias.run_shape_bias`` into an app run directory (reused when it already holds the result)."""
    run_shape_bias = need("erf_lab.shape_bias.evaluate", "run_shape_bias")
    _check_registered(model_name)
    tag = hashlib.sha256(json.dumps([model_name, pretrained, limit, overrides_json, sha(weights)]).encode()
                         ).hexdigest()[:12]
    out = app_runs_dir() / f"shape-bias-{model_name}-{tag}"
    if (out / "summary.json").is_file() and (out / "decisions.csv").is_file():
        return out
    import torch

    torch.manual_seed(0)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(overrides_json).items()}
    if pretrained:
        overrides["pretrained"] = True
    model = build_model(model_name, json.dumps(overrides), weights, weights_name)
    run_shape_bias(model_name, out=out, model=model, pretrained=pretrained, overrides=overrides or None,
                   limit=int(limit), batch_size=16, workers=0, show_progress=False,
                   command=["streamlit", "app/main.py", "(shape-bias page)"])
    return out


def shape_bias_summary(run_dir: str) -> dict:
    load_run = need("erf_lab.shape_bias.plotting", "load_run")
    return load_run(run_dir)


def shape_bias_decisions(run_dir: str) -> list[dict]:
    read_decisions_csv = need("erf_lab.shape_bias.analysis", "read_decisions_csv")
    return read_decisions_csv(Path(run_dir) / "decisions.csv")


# ------------------------------------------------------------------------------------------------ kernels
@st.cache_data(max_entries=64, show_spinner=False)
def fastconv_explain(res: int, k: int, ch: int, channels_last: bool, grads: bool) -> str:
    """``fastconv.explain`` for a (1, C, H, W) input and a (C, 1, K, K) depthwise weight."""
    import torch

    explain = need("fastconv", "explain")
    x = torch.randn(1, ch, res, res, requires_grad=grads)
    w = torch.randn(ch, 1, k, k, requires_grad=grads)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(grads)
    return explain(x, w)


def fastconv_bench(kernels, resolutions, channels: int, layers: int = 2, on_progress=None) -> dict:
    """A small Table-1 benchmark (``fastconv.bench.run``, forward only), one resolution at a time; cached."""
    run = need("fastconv.bench", "run")
    key = "bench:" + json.dumps([list(kernels), list(resolutions), channels, layers])
    hit = result_store().get(key)
    if hit is not None:
        return hit
    rows, meta = [], None
    for i, r in enumerate(resolutions):
        if on_progress:
            on_progress(i / len(resolutions), f"resolution {r} ({i + 1}/{len(resolutions)})")
        res = run(kernels=tuple(kernels), resolutions=(int(r),), channels=int(channels), layers=int(layers),
                  repeats=3, warmup=1, modes=("fwd",), show_progress=False)
        rows += res["rows"]
        meta = res["meta"]
    out = {"meta": meta, "rows": rows}
    result_store().put(key, out)
    return out


def load_bench_results(folder: Path) -> dict:
    """``results.json`` written by ``fastconv.bench.write_results``."""
    p = Path(folder) / "results.json"
    if not p.is_file():
        raise ErfLabError(f"{folder} has no results.json (not a fastconv benchmark folder)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ErfLabError(f"cannot read {p}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ErfLabError(f"{p} does not hold benchmark rows")
    return data


def bench_table(result: dict):
    import pandas as pd

    return pd.DataFrame(result["rows"])


def bench_figure(result: dict):
    """Latency (ms, log scale) against kernel size, one panel per resolution, one line per implementation;
    the paper's Table 1 (GTX 2080Ti, B=64) dashed for its shape, not its absolute scale."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    res = sorted({r["R"] for r in rows})
    impls = [i for i in ("pytorch_nchw", "pytorch_cl", "fastconv") if any(f"fwd_{i}_ms" in r for r in rows)]
    fig = Figure(figsize=(3.6 * len(res), 3.2), layout="constrained")
    axes = fig.subplots(1, len(res), squeeze=False)[0]
    for ax, r in zip(axes, res):
        sub = sorted((x for x in rows if x["R"] == r), key=lambda x: x["K"])
        ks = [x["K"] for x in sub]
        for impl, marker in zip(impls, "osD"):
            ax.plot(ks, [x.get(f"fwd_{impl}_ms") for x in sub], marker=marker, label=impl, linewidth=1.4, markersize=4)
        for key, lab in (("paper_pytorch_ms", "paper: PyTorch"), ("paper_ours_ms", "paper: block-wise")):
            pts = [(x["K"], x[key]) for x in sub if x.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), linestyle="--", color="0.6" if "pytorch" in key else "0.3", linewidth=1, label=lab)
        ax.set_yscale("log")
        ax.set_xlabel("kernel size K")
        ax.set_title(f"{r} x {r}")
        ax.set_xticks(ks)
        ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    axes[0].set_ylabel("forward latency (ms)")
    axes[-1].legend(fontsize=7, frameon=False)
    return fig
