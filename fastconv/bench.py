"""Table 1 of RepLKNet (Ding et al., CVPR 2022): latency of a stack of 24 depthwise layers, input (B, 384, R, R).

``python -m fastconv.bench`` (or ``erf-lab bench``) times PyTorch's F.conv2d with an NCHW input, the same with a
channels_last input, and ``fastconv.depthwise_conv2d(backend="auto")``, forward and forward+backward (input and
weight gradients); reports the median latency, speedup, achieved GFLOP/s and % of this machine's measured GEMM
rate in the benchmark's precision (SGEMM for the paper's fp32; ``--dtype float16`` / ``bfloat16``), prints the
paper's 2080Ti numbers beside ours, and writes table.csv, results.json and run.json atomically (after each row).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fastconv
from fastconv.jsonstore import plain_mode
from fastconv.roofline import cpu_description, depthwise_flops, sgemm_gflops
from fastconv.bench_args import (DTYPES, FULL, GEMM_NAMES, PAPER_KERNELS, PAPER_RESOLUTIONS,  # noqa: F401
                                 QUICK, add_arguments)

#: the largest kernel the benchmark runs (a 9999 typo would run for hours)
MAX_BENCH_KERNEL = 255

# Table 1 of the paper (GTX 2080Ti, B=64, C=384, FP32, PyTorch 1.9.0 + cuDNN 7.6.5; forward only), in ms.
# Every cell checked (2026-12-05) against the paper's arXiv version as its authors uploaded it to their repository
# (DingXiaoH/RepLKNet-pytorch, replknet-arxiv.pdf, page 3); keyed by R -> (PyTorch row, Ours row) over PAPER_KERNELS.
PAPER_TABLE1_MS = {
    16: ((5.6, 11.0, 14.4, 17.6, 36.0, 57.2, 83.4, 133.5, 150.7, 171.4),
         (5.6, 6.5, 6.4, 6.9, 7.5, 8.4, 8.4, 8.4, 8.3, 8.4)),
    32: ((21.9, 34.1, 54.8, 76.1, 141.2, 230.5, 342.3, 557.8, 638.6, 734.8),
         (21.9, 28.7, 34.6, 40.6, 52.5, 64.5, 73.9, 87.9, 92.7, 96.7)),
    64: ((69.6, 141.2, 228.6, 319.8, 600.0, 977.7, 1454.4, 2371.1, 2698.4, 3090.4),
         (69.6, 112.6, 130.7, 152.6, 199.7, 251.5, 301.0, 378.2, 406.0, 431.7)),
}
IMPLS = ("pytorch_nchw", "pytorch_cl", "fastconv")


def paper_ms(r: int, k: int) -> tuple[float | None, float | None]:
    if r in PAPER_TABLE1_MS and k in PAPER_KERNELS:
        i = PAPER_KERNELS.index(k)
        return PAPER_TABLE1_MS[r][0][i], PAPER_TABLE1_MS[r][1][i]
    return None, None


class Timer:
    """Median wall time of ``fn`` after warm-up; CUDA events (synchronised) on GPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def conv_flops(b: int, c: int, r: int, k: int, layers: int) -> float:
    """Multiply-adds x2 of ``layers`` depthwise KxK same convs on (b, c, r, r)."""
    return 2.0 * b * c * r * r * k * k * layers


def _stack(impl: str, x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    for w in ws:
        if impl == "fastconv":
            x = fastconv.depthwise_conv2d(x, w)
        else:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2, groups=x.shape[1])
    return x


def bench_one(impl: str, mode: str, b: int, c: int, r: int, k: int, layers: int, timer: Timer,
              device: torch.device, dtype: torch.dtype) -> float:
    """Seconds for one pass of the stack; ``mode`` "fwd" (no grad) or "fwdbwd" (input + weight gradients)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, c, r, r, generator=g).to(device, dtype)
    if impl == "pytorch_cl" or (impl == "fastconv" and device.type == "cpu"):
        # fastconv's CPU paths are NHWC internally: feed the layout a CPU model would use (same as 'pytorch_cl')
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(c, 1, k, k, generator=g) / k).to(device, dtype).requires_grad_(mode == "fwdbwd")
          for _ in range(layers)]
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                _stack(impl, x, ws)
    else:
        xg = x.detach().requires_grad_(True)

        def fn():
            y = _stack(impl, xg, ws)
            y.backward(torch.ones_like(y))
            xg.grad = None
            for w in ws:
                w.grad = None
    return timer(fn)


def bench_device(device: str | None) -> torch.device:
    """The benchmark's device (default: cuda when available); ValueError (one line) for an unknown one or a
    missing CUDA device (:func:`fastconv.check_device`)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else \
        fastconv.check_device(device)


def _check_fastconv_settings(dev: torch.device, dtype: torch.dtype, k: int) -> None:
    """ValueError (one line) before any measurement for settings the fastconv side would fail on after the PyTorch
    sides of the first row: a bad ``$FASTCONV_BACKEND`` / ``$FASTCONV_AUTOTUNE`` / ``$FASTCONV_CPU_LANES``, or a
    forced backend that cannot run this device, precision or kernel size (``dispatch.decide``'s own check)."""
    s = fastconv.settings()
    if dev.type == "cpu" and fastconv.cpu_kernels.cpp_available():
        fastconv.cpu_kernels.cpu_lanes()
    if s.backend != "auto":
        x = torch.empty(1, 1, 1, 1, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        fastconv.dispatch.decide(x, torch.empty(1, 1, k, k, device=dev, dtype=dtype), None)


def run(kernels=PAPER_KERNELS, resolutions=PAPER_RESOLUTIONS, batch: int | None = None, channels: int = 384,
        layers: int = 24, repeats: int = 3, warmup: int = 1, device: str | None = None, modes=("fwd", "fwdbwd"),
        impls=IMPLS, show_progress: bool = True, sgemm_size: int | None = None, dtype: str = "float32",
        on_row=None, previous: dict | None = None) -> dict:
    """Measure the table in ``dtype`` (inputs and weights); returns {"meta": ..., "rows": [...]} (prints and
    writes nothing itself; ``on_row(result so far)`` after each (R, K) row, so a caller can keep partial results).
    ``previous``: the results of an interrupted run with the same settings (``--resume``), whose rows are kept."""
    dev = bench_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} unsupported: choose from {', '.join(DTYPES)}")
    tdtype = getattr(torch, dtype)
    batch = (64 if dev.type == "cuda" else 2) if batch is None else batch
    if not kernels or not resolutions:
        raise ValueError("--kernels and --resolutions need at least one value")
    kernels, resolutions = tuple(dict.fromkeys(kernels)), tuple(dict.fromkeys(resolutions))  # '3,3': measured once
    for k in kernels:
        if k % 2 == 0 or k < 1:
            raise ValueError(f"kernel {k} unsupported: {'odd sizes only' if k >= 1 else 'sizes from 1 up'}")
        if k > MAX_BENCH_KERNEL:
            raise ValueError(f"kernel {k} unsupported: at most {MAX_BENCH_KERNEL} (the paper's Table 1 stops at 31)")
    for name, v in (("resolutions", min(resolutions)), ("batch", batch), ("channels", channels), ("layers", layers),
                    ("repeats", repeats)):
        if v < 1:
            raise ValueError(f"--{name} must be positive, got {v}")
    if warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {warmup}")
    if not impls or any(i not in IMPLS for i in impls):
        raise ValueError(f"--impls {','.join(impls)!r} unsupported: choose from {', '.join(IMPLS)}")
    if "fastconv" in impls:
        _check_fastconv_settings(dev, tdtype, max(kernels))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN at its best (the comparison the paper's Table 1 makes)
    timer = Timer(dev, warmup, repeats)
    peak = sgemm_gflops(dev, sgemm_size, dtype=tdtype)
    # the CPU's model name (/proc/cpuinfo), not platform.processor(), which is '' or 'x86_64' on Linux
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_description()["cpu_model"],
            "device_type": dev.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "batch": batch, "channels": channels, "layers": layers, "repeats": repeats, "warmup": warmup,
            "dtype": dtype, "gemm_gflops": round(peak, 2), **({"sgemm_gflops": round(peak, 2)} if dtype == "float32"
                                                               else {}), "modes": list(modes), "impls": list(impls),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if dev.type == "cuda" else None,
            "tf32": bool(torch.backends.cudnn.allow_tf32) if dev.type == "cuda" else None,
            "paper": "RepLKNet Table 1: GTX 2080Ti, B=64, FP32, forward only (PyTorch 1.9.0 + cuDNN 7.6.5)",
            "rows_planned": len(resolutions) * len(kernels)}
    if dev.type == "cpu" and "fastconv" in impls:  # which C++ kernel the "cpp" cells ran, or why there are none
        ck = fastconv.cpu_kernels
        meta["cpp_kernel"] = ck.cpu_variant() if ck.cpp_available() else f"unavailable ({ck.cpp_unavailable_reason()})"
    kept = {} if previous is None else kept_rows(previous, meta, peak)
    dropped = sorted(set(kept) - {(r, k) for r in resolutions for k in kernels})
    if dropped:  # results.json is rewritten with this run's rows: those would be lost
        raise ValueError(f"--resume: the run in --out also measured (R, K) = {', '.join(map(str, dropped))}; resume "
                         f"with --kernels and --resolutions that include them")
    if previous is not None:
        meta["rows_kept"] = sum((r, k) in kept for r in resolutions for k in kernels)
    rows = []
    # the bar advances by each case's nominal FLOPs, not by 1: R=64, K=31 takes ~100x R=64, K=3, and a count of
    # cases gave an ETA that the cheap first rows made far too short
    work = {(r, k, m): conv_flops(batch, channels, r, k, layers) * (3 if m == "fwdbwd" else 1)
            for r in resolutions for k in kernels for m in modes}
    cases, done = len(work) * len(impls), 0
    kept_work = sum(w for (r, k, _), w in work.items() if (r, k) in kept) * len(impls)  # not in the rate: initial
    bar = tqdm(total=sum(work.values()) * len(impls), initial=kept_work, desc="fastconv bench",
               disable=not show_progress, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    for r in resolutions:
        for k in kernels:
            if (r, k) in kept:
                rows.append(kept[r, k])
                done += len(modes) * len(impls)
                if on_row is not None:
                    on_row({"meta": meta, "rows": rows})
                continue
            row = {"R": r, "K": k, "batch": batch, "channels": channels, "layers": layers}
            row["paper_pytorch_ms"], row["paper_ours_ms"] = paper_ms(r, k)
            for m in modes:
                flops = work[r, k, m]
                for impl in impls:
                    bar.set_postfix_str(f"case {done + 1}/{cases}: R={r} K={k} {m} {impl}")
                    t = bench_one(impl, m, batch, channels, r, k, layers, timer, dev, tdtype)
                    row[f"{m}_{impl}_ms"] = keep_digits(t * 1e3, 3)
                    row[f"{m}_{impl}_gflops"] = keep_digits(flops / t / 1e9, 2)
                    bar.update(work[r, k, m])
                    done += 1
                if "fastconv" in impls:
                    fc = row[f"{m}_fastconv_ms"]
                    row[f"{m}_fastconv_pct_gemm"] = keep_digits(100 * row[f"{m}_fastconv_gflops"] / peak, 1)
                    for base in ("pytorch_nchw", "pytorch_cl"):
                        if base in impls:
                            row[f"{m}_speedup_vs_{base.split('_')[1]}"] = round(row[f"{m}_{base}_ms"] / fc, 2)
                    x = torch.empty(batch, channels, r, r, device=dev, dtype=tdtype)
                    if dev.type == "cpu":
                        x = x.contiguous(memory_format=torch.channels_last)
                    w = torch.empty(channels, 1, k, k, device=dev, dtype=tdtype, requires_grad=m == "fwdbwd")
                    with torch.set_grad_enabled(m == "fwdbwd"):
                        row[f"{m}_fastconv_backend"] = fastconv.dispatch.decide(x.requires_grad_(m == "fwdbwd"),
                                                                                w, None)["backend"]
            rows.append(row)
            if on_row is not None:
                on_row({"meta": meta, "rows": rows})
    bar.close()
    return {"meta": meta, "rows": rows}


def keep_digits(x: float, decimals: int, significant: int = 3) -> float:
    """``x`` rounded to ``decimals`` places, or to ``significant`` digits where those are more: the GFLOP/s of a small
    stack (0.0034) stays 0.0034, where round(x, 2) stored 0.0."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(decimals, significant - 1 - math.floor(math.log10(abs(x)))))


def table_cell(v, fmt: str) -> str:
    """``fmt.format(v)``; a number that one decimal would show as 0.0 in two significant digits instead."""
    if isinstance(v, float) and 0 < abs(v) < 0.05 and ".1f" in fmt:
        fmt = fmt.replace(".1f", ".2g")
    return fmt.format(v)


#: what a measured row depends on: ``--resume`` keeps the rows of a run that shares all of them with the new one
RESUME_SETTINGS = ("device", "device_type", "threads", "torch", "batch", "channels", "layers", "repeats", "warmup",
                   "dtype", "modes", "impls", "cudnn_benchmark", "tf32", "cpp_kernel")


def kept_rows(previous: dict, meta: dict, peak: float) -> dict:
    """The rows of an interrupted run's results ``previous``, by (R, K), that ``--resume`` keeps instead of measuring
    them again; ValueError naming the first setting in which that run differs from this one (``meta``). Their % of
    GEMM is taken against ``peak``, this run's GEMM rate, as the new rows' are."""
    old = previous.get("meta") if isinstance(previous, dict) else None
    if not isinstance(old, dict) or not isinstance(previous.get("rows"), list):
        raise ValueError("--resume: the results.json in --out is no benchmark's result")
    for key in RESUME_SETTINGS:
        if old.get(key) != meta.get(key):
            raise ValueError(f"--resume: the rows in --out were measured with {key} {old.get(key)!r}, this run has "
                             f"{meta.get(key)!r}; rerun with that setting, or without --resume to measure them anew")
    kept = {}
    for row in previous["rows"]:
        row = dict(row)
        for m in meta["modes"]:
            if f"{m}_fastconv_gflops" in row:
                row[f"{m}_fastconv_pct_gemm"] = keep_digits(100 * row[f"{m}_fastconv_gflops"] / peak, 1)
        kept[row["R"], row["K"]] = row
    return kept


def read_previous(out_dir: str | os.PathLike) -> dict:
    """The results.json of the interrupted benchmark in ``out_dir`` (``--resume``); ValueError when there is none."""
    path = Path(out_dir).expanduser() / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--resume: {path.parent} holds no results.json to continue; run without --resume") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"--resume: {path} cannot be read ({e}); run without --resume") from None


def padding_note(rows) -> str:
    """A line where the GFLOP/s and % of GEMM of some cells mostly count products with the zero padding: they take
    the nominal 2 B C R^2 K^2 (the paper's convention), and a kernel near or above the map's side multiplies zeros in
    most of its taps (R = 3, K = 31: (3 * 3 / (3 * 31))^2 = 0.9 % of them meet the map)."""
    if not rows:
        return ""
    share = {(r["R"], r["K"]): (lambda f: f["inside"] / f["nominal"])(depthwise_flops(1, 1, r["R"], r["R"], r["K"],
                                                                                        r["K"])) for r in rows}
    (res, k), low = min(share.items(), key=lambda kv: kv[1])
    if low >= 0.5:
        return ""
    return (f"(GFLOP/s and % count the nominal 2*B*C*R^2*K^2 FLOPs, the paper's convention, zero padding included: "
            f"at R={res}, K={k} only {100 * low:.1f} % of them meet the map, so such cells are no measure of "
            f"arithmetic speed)\n")


def format_table(result: dict) -> str:
    """The paper's layout (rows per resolution, one column per kernel size), ours beside the paper's."""
    meta, rows = result["meta"], result["rows"]
    if "dtype" not in meta:  # a results.json from before --dtype: fp32, its rate and fractions under SGEMM names
        meta = {**meta, "dtype": "float32", "gemm_gflops": meta.get("sgemm_gflops")}
        rows = [{**r, **{k.replace("_pct_sgemm", "_pct_gemm"): v for k, v in r.items() if k.endswith("_pct_sgemm")}}
                for r in rows]
    out = io.StringIO()
    kernels = sorted({r["K"] for r in rows})
    out.write(f"Stack of {meta['layers']} depthwise layers, input ({meta['batch']}, {meta['channels']}, R, R), "
              f"{meta['device']} ({meta['device_type']}, {meta['threads']} threads), torch {meta['torch']}, "
              f"{meta['dtype']}, median of {meta['repeats']}; {GEMM_NAMES[meta['dtype']]} {meta['gemm_gflops']} "
              f"GFLOP/s\n")
    out.write(f"Paper: {meta['paper']}\n")
    if meta["dtype"] != "float32":
        out.write(f"(the paper's rows are its FP32 times; ours are {meta['dtype']})\n")
    if len(rows) < meta.get("rows_planned", len(rows)):
        out.write(f"(cut short: {len(rows)} of {meta['rows_planned']} rows measured)\n")
    if meta.get("rows_kept"):
        out.write(f"(resumed: {meta['rows_kept']} of {meta['rows_planned']} rows kept from the interrupted run in this "
                  f"folder, measured with the same settings)\n")
    if meta["device_type"] == "cpu":
        out.write("fastconv is fed a channels_last input on CPU (its NHWC kernels' native layout)\n")
    if meta.get("cpp_kernel"):
        out.write(f"fastconv's C++ kernel: {meta['cpp_kernel']}\n")
    out.write(padding_note(rows))
    labels = {"pytorch_nchw": "PyTorch NCHW", "pytorch_cl": "PyTorch ch_last", "fastconv": "fastconv"}
    for m in meta["modes"]:
        out.write(f"\n== {'forward' if m == 'fwd' else 'forward + backward (input and weight gradients)'}:"
                  f" latency (ms) @ kernel size ==\n")
        head = f"{'R':>5} {'impl':<24}" + "".join(f"{k:>9}" for k in kernels) + "\n"
        out.write(head)
        for res in sorted({r["R"] for r in rows}):
            got = {r["K"]: r for r in rows if r["R"] == res}
            rr = {k: got.get(k, {}) for k in kernels}  # a cut-short run lacks some cells: shown as "-"
            lines = []
            if m == "fwd" and any(rr[k].get("paper_pytorch_ms") for k in kernels):
                lines.append(("paper 2080Ti PyTorch", [rr[k].get("paper_pytorch_ms") for k in kernels], "{:>9.1f}"))
                lines.append(("paper 2080Ti Ours", [rr[k].get("paper_ours_ms") for k in kernels], "{:>9.1f}"))
            for impl in meta["impls"]:
                lines.append((labels[impl], [rr[k].get(f"{m}_{impl}_ms") for k in kernels], "{:>9.1f}"))
            if "fastconv" in meta["impls"]:
                for base in ("nchw", "cl"):
                    if any(f"{m}_speedup_vs_{base}" in rr[k] for k in kernels):
                        lines.append((f"speedup vs {base}", [rr[k].get(f"{m}_speedup_vs_{base}") for k in kernels],
                                      "{:>8.2f}x"))
                lines.append(("fastconv GFLOP/s", [rr[k].get(f"{m}_fastconv_gflops") for k in kernels], "{:>9.1f}"))
                lines.append((f"fastconv % of {GEMM_NAMES[meta['dtype']]}",
                              [rr[k].get(f"{m}_fastconv_pct_gemm") for k in kernels],
                              "{:>8.1f}%"))
                short = {"channels_last": "ch_last"}
                backends = [rr[k].get(f"{m}_fastconv_backend") for k in kernels]
                lines.append(("fastconv backend", [short.get(b, b) for b in backends], "{:>9.8}"))
            for i, (label, vals, fmt) in enumerate(lines):
                cells = "".join("{:>9}".format("-") if v is None else table_cell(v, fmt) for v in vals)
                out.write(f"{(str(res) + 'x' + str(res)) if i == 0 else '':>5} {label:<24}{cells}\n")
    return out.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary named as erf-lab's ``atomic_path`` names its own
    (``.<name>.<random>.tmp<suffix>``): the one a kill leaves goes when ``erf-lab bench`` takes the folder again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        plain_mode(tmp)  # mkstemp makes the file owner-only: the mode a plain open() would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(result: dict, out_dir: str | os.PathLike, argv: list[str] | None = None) -> list[Path]:
    """table.csv, results.json, table.txt and run.json (how it was made) in ``out_dir``, each atomically; ``argv``:
    the command line that made them (default ``sys.argv[1:]``), in run.json and at the foot of table.txt."""
    out = Path(out_dir)
    argv = [str(a) for a in argv] if argv is not None else sys.argv[1:]
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    paths = [out / "table.csv", out / "results.json", out / "table.txt", out / "run.json"]
    _atomic_write(paths[0], buf.getvalue())
    _atomic_write(paths[1], json.dumps(result, indent=2) + "\n")
    _atomic_write(paths[2], format_table(result) + f"\ncommand: {shlex.join(argv)}\n")
    run_info = {"command": "fastconv.bench", "argv": argv,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result["meta"],
                "python": platform.python_version(), "platform": platform.platform(),
                "autotune_cache": str(fastconv.dispatch.cache_file()),
                "settings": {k: str(v) for k, v in vars(fastconv.settings()).items()},
                "env": {k: os.environ[k] for k in ("FASTCONV_BACKEND", "FASTCONV_AUTOTUNE", "FASTCONV_CACHE",
                                                   "OMP_NUM_THREADS") if k in os.environ}}
    _atomic_write(paths[3], json.dumps(run_info, indent=2) + "\n")
    return paths


#: the files :func:`write_results` writes; the sub-folder of ``--out`` where a new run keeps an earlier run's
RESULT_FILES = ("table.csv", "results.json", "table.txt", "run.json")
EARLIER = "earlier"


def keep_earlier(out_dir: str | os.PathLike) -> Path | None:
    """Move the results of an earlier benchmark in ``out_dir`` (results.json and the files written with it,
    :data:`RESULT_FILES`) into ``out_dir/earlier/<when it last wrote them, UTC>/``, which a new run without
    ``--resume`` would replace; return that folder, None when there were none. Atomic: the files are copied into a
    hidden folder renamed into place in one step, then removed from ``out_dir`` (a kill meanwhile leaves them in both
    places, never in neither). ValueError (one line) when the folder cannot be made."""
    out = Path(out_dir).expanduser()
    if not (out / "results.json").is_file():
        return None
    files = [out / name for name in RESULT_FILES if (out / name).is_file()]
    try:
        made = datetime.fromisoformat(json.loads((out / "run.json").read_text(encoding="utf-8"))["created"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):  # no record of its own: its last write
        made = datetime.fromtimestamp((out / "results.json").stat().st_mtime, timezone.utc)
    stamp = made.astimezone(timezone.utc).strftime("%Y-%m-%d_%H%M%SZ")
    earlier = out / EARLIER
    try:
        earlier.mkdir(exist_ok=True)
        dest, n = earlier / stamp, 1
        while dest.exists():  # two runs written in one second
            n += 1
            dest = earlier / f"{stamp}-{n}"
        tmp = earlier / f".{dest.name}.{os.getpid()}.tmp"  # made as a plain mkdir makes it (mkdtemp: owner-only)
        shutil.rmtree(tmp, ignore_errors=True)  # one a killed run of this process id left
        tmp.mkdir()
        try:
            for f in files:
                shutil.copy2(f, tmp / f.name)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed copy's half
        for f in files:
            f.unlink()
    except OSError as e:
        raise ValueError(f"cannot keep the earlier results of {out} in {earlier}: {e.strerror or type(e).__name__}; "
                         f"continue them with --resume, or choose another --out") from None
    return dest


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """ValueError, before any measurement, when ``out_dir`` cannot take the results: a file or under one, a folder
    that cannot be made or written (read-only file system, permissions), or a folder whose run.json is another
    command's (this one replaces run.json). Folders made for the check are removed again."""
    if not str(out_dir).strip():
        raise ValueError("--out is empty; name a folder (the current one is '.')")
    out = Path(out_dir).expanduser()
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies under a file ({parent})"
            raise ValueError(f"--out {out} {where}; choose a folder")
    made = [d for d in [out, *out.parents] if not d.exists()]
    try:  # the results are written after the measurement: a folder that cannot take them would lose it all
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out} is not writable: {e.strerror or type(e).__name__}") from None
    finally:
        for d in made:  # deepest first: leave no empty folder behind
            with contextlib.suppress(OSError):
                d.rmdir()
    if (out / "run.json").is_file():
        try:
            info = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            info = None
        if not (isinstance(info, dict) and info.get("command") == "fastconv.bench"):
            raise ValueError(f"--out {out} holds another result (its run.json is no fastconv benchmark's); "
                             f"choose another --out")


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> tuple[dict, list[Path]]:
    """Check ``--out``, measure and write the results there after each row; ``argv``: the command line to record."""
    check_out_dir(args.out)
    sizes = QUICK if args.quick else FULL
    kw = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()}
    dev = bench_device(args.device)
    batch = 1 if args.batch is None and args.quick and dev.type == "cpu" else args.batch
    previous = read_previous(args.out) if args.resume else None
    keep = previous is None  # a new run: the tables of an earlier one are kept before its first row replaces them

    def on_row(partial: dict) -> None:  # each row written when done: a cut-short run keeps its rows
        nonlocal keep
        if keep:
            keep = False
            kept = keep_earlier(args.out)
            if kept is not None:
                tqdm.write(f"the earlier results in {args.out} were moved to {kept} (--resume continues a run "
                           f"instead)", file=sys.stderr)
        write_results(partial, args.out, argv)

    try:
        result = run(**kw, batch=batch, channels=args.channels, warmup=args.warmup, device=str(dev),
                     dtype=args.dtype, modes=("fwd", "fwdbwd") if args.mode == "both" else (args.mode,),
                     impls=args.impls, on_row=on_row, previous=previous, show_progress=not args.quiet)
    except RuntimeError as e:  # a dtype this PyTorch has no kernel for on the device ("not implemented for 'Half'")
        if "not implemented for" not in str(e) or args.dtype == "float32":
            raise
        raise ValueError(f"--dtype {args.dtype} on {dev}: this PyTorch cannot run it ({str(e).splitlines()[0]})"
                         ) from None
    return result, write_results(result, args.out, argv)


def _close_bars() -> None:
    """Close the progress bar left open by an error, so that its message stands on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastconv.bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        result, paths = run_from_args(args, ["python", "-m", "fastconv.bench", *(sys.argv[1:] if argv is None else
                                                                                argv)])
    except ValueError as e:
        _close_bars()
        print(f"fastconv.bench: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # a size this machine cannot hold: one line, as 'erf-lab bench' says it
        what = fastconv.out_of_memory(e)
        if what is None:
            raise
        _close_bars()
        print(f"fastconv.bench: error: out of memory ({what}); choose a smaller --batch, --channels, --resolutions or "
              f"--layers (the rows measured so far are in {args.out})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # one line, as 'erf-lab bench' says it; the rows measured so far are on disk
        _close_bars()
        print(f"fastconv.bench: interrupted (the rows measured so far are in {args.out}; continue with the same "
              f"command and --resume)" if args.out else "fastconv.bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(result))
    print("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
