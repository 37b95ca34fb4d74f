"""This machine's own limits, measured in the run that uses them: the roofline references of erf-lab's speed goals.

- ``sgemm_gflops``: the fp32 GEMM rate, the best of the libraries torch multiplies through (on the CPU ``torch.mm``,
  i.e. the BLAS, and a 1x1 convolution, i.e. oneDNN), the reference for work that runs through them (the 1x1
  convolutions of an ERF measurement, a training step);
- ``fma_peak_gflops``: a pure-FMA loop (ten independent chains per thread on the widest vectors the compiler
  targets, ``csrc/fma_peak.c``), the reference for fastconv's own kernels;
- ``cpu_description``: CPU model name and the widest SIMD ISA it announces, to print beside every ratio.

``machine_roofline()`` gathers them once per process (and in ``<fastconv cache>/roofline.json`` per CPU, thread
count, torch version and SGEMM probes when ``cache=True``, so short runs such as ``erf-lab compute`` do not pay the
probes again).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import time
from pathlib import Path

_FMA_SRC = Path(__file__).with_name("csrc") / "fma_peak.c"
_SGEMM_PROBES = "mm+conv1x1"  # in the cache key: what the stored SGEMM rate is the best of
_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")


def cpu_description() -> dict:
    """{"cpu_model", "isa" (the widest SIMD ISA the CPU announces), "cpu_count"} from /proc/cpuinfo (Linux), else
    from ``platform``."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key == "model name" and not model:
                model = line.split(":", 1)[1].strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = next((i for i in _ISAS if i in flags), "unknown")
    return {"cpu_model": model or platform.processor() or platform.machine(), "isa": isa,
            "cpu_count": os.cpu_count()}


def sgemm_probes(device="cpu", n: int | None = None, repeats: int = 5, dtype=None) -> dict:
    """Measured GEMM rates in GFLOP/s (fp32; ``dtype`` another precision, e.g. torch.bfloat16 for the rate that a
    half-precision benchmark is taken against), best of ``repeats`` after two warm-ups (n = 1024 on the CPU, 8192 on
    CUDA): ``"mm"``, ``torch.mm`` of two n x n matrices (the BLAS: MKL or OpenBLAS; cuBLAS; 2 n^3 FLOPs), and on the
    CPU ``"conv1x1"``, a 1x1 convolution of n // 2 channels on a square channels_last map of about 4 n pixels (oneDNN,
    the library that runs the convolutions of a model; its own FLOPs, 2 n^3 where 4 n is a square such as 4096).
    The two differ by 2.5x on an AMD EPYC with AVX-512 (2 threads, torch 2.13.0+cpu with MKL 2024: torch.mm 180-206,
    the 1x1 conv 392-488, FMA peak 519 GFLOP/s), where MKL does not run its AVX-512 kernels."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    n = int(n or (8192 if device.type == "cuda" else 1024))
    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    probes = {"mm": (lambda: a @ b, 2.0 * n ** 3)}
    if device.type == "cpu":
        side, channels = max(1, round((4 * n) ** 0.5)), max(1, n // 2)
        x = torch.randn(1, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 1, 1, dtype=dtype)
        probes["conv1x1"] = (lambda: F.conv2d(x, w), 2.0 * side * side * channels * channels)
    rates = {}
    for name, (call, flops) in probes.items():
        best = float("inf")
        with torch.no_grad():
            for i in range(repeats + 2):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 2:
                    best = min(best, time.perf_counter() - t)
        rates[name] = flops / best / 1e9
    return rates


def sgemm_gflops(device="cpu", n: int | None = None, repeats: int = 5, dtype=None) -> float:
    """This device's fp32 GEMM rate in GFLOP/s (``dtype``: in that precision): the best of :func:`sgemm_probes` (a
    roofline fraction against the BLAS alone would exceed 1 where oneDNN multiplies faster)."""
    return max(sgemm_probes(device, n, repeats, dtype).values())


def fma_peak_gflops(threads: int | None = None, flops_per_thread: float = 2e8, repeats: int = 30) -> float | None:
    """Measured fp32 FMA peak in GFLOP/s on ``threads`` threads (default torch's), or None where the probe cannot
    be built (no compiler, no FMA unit). Many short runs (best of 30 x ~2 ms): on a shared machine a run that loses
    a core to another process only counts when none was quiet (2-core dev box under load average 3: 3 x 20 ms gave
    190, 30 x 2 ms 203 GFLOP/s; at other moments 3 x 20 ms read 88-97, one core's worth)."""
    lib = _fma_library()
    if lib is None:
        return None
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return float(lib.fma_peak_gflops(int(threads), float(flops_per_thread), int(repeats)))


def fma_lanes() -> int | None:
    """fp32 lanes of the vectors the FMA probe (and so fastconv's C++ kernels) was built for: 16 (AVX-512), 8."""
    lib = _fma_library()
    return None if lib is None else int(lib.fma_lanes())


_fma_lib: ctypes.CDLL | None | bool = False


def _fma_library():
    global _fma_lib
    if _fma_lib is False:
        from fastconv.cpu_kernels import load_shared_library

        _fma_lib = None
        for flags in (["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"],
                      ["-O3", "-march=native", "-shared", "-fPIC"]):
            try:
                lib = load_shared_library(_FMA_SRC, flags)
            except (RuntimeError, OSError):
                continue
            lib.fma_peak_gflops.argtypes = [ctypes.c_int, ctypes.c_double, ctypes.c_int]
            lib.fma_peak_gflops.restype = ctypes.c_double
            lib.fma_lanes.argtypes = []
            lib.fma_lanes.restype = ctypes.c_int
            _fma_lib = lib
            break
    return _fma_lib


_memo: dict = {}


def machine_roofline(fma: bool = True, cache: bool = False) -> dict:
    """{"cpu_model", "isa", "cpu_count", "threads", "torch", "sgemm_gflops", "fma_peak_gflops" (None when not
    measured or not measurable), "measured_at"}. Measured once per process. ``<fastconv cache>/roofline.json`` keeps,
    per CPU, thread count, torch version and SGEMM probes, the **best** rates ever measured there (other processes on
    the machine can only lower a measurement, never raise it): every measurement updates it, and with ``cache=True``
    a known entry is returned without measuring (short runs such as ``erf-lab compute`` do not pay the probes)."""
    import torch

    desc, threads, key = _machine_key()
    memo = _memo.get(key)
    if memo is not None and (memo.get("fma_peak_gflops") is not None or not fma):
        return dict(memo)
    if cache:
        stored = _read_table().get(key)
        if isinstance(stored, dict) and _plausible_rate(stored.get("sgemm_gflops")) and \
                (not fma or _plausible_rate(stored.get("fma_peak_gflops"))):
            _memo[key] = stored
            return dict(stored)
    out = {**desc, "threads": threads, "torch": torch.__version__,
           "sgemm_gflops": round(sgemm_gflops("cpu"), 1),
           "fma_peak_gflops": None, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if fma:
        peak = fma_peak_gflops(threads)
        out["fma_peak_gflops"] = None if peak is None else round(peak, 1)
    _memo[key] = out
    best = _remember_best(key, out)
    return dict(best if cache else out)


def _machine_key() -> tuple[dict, int, str]:
    """(CPU description, torch's thread count, the cache key of this CPU, thread count, torch version and the SGEMM
    probes: entries of the torch.mm-only probe are not read)."""
    import torch

    desc = cpu_description()
    threads = torch.get_num_threads()
    return desc, threads, f"{desc['cpu_model']}|{desc['isa']}|{threads}|{torch.__version__}|{_SGEMM_PROBES}"


def remeasure_sgemm() -> dict:
    """Probe the CPU's SGEMM rate again now (~0.2 s) and merge it into the cache entry, which keeps the best rate
    ever measured; returns the entry. For a cached rate found below one that a run just achieved: it was probed
    while the machine was busier, and would otherwise stay the reference of every later run."""
    import torch

    desc, threads, key = _machine_key()
    measured = {**desc, "threads": threads, "torch": torch.__version__, "sgemm_gflops": round(sgemm_gflops("cpu"), 1),
                "fma_peak_gflops": None, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    best = _remember_best(key, measured)
    if key in _memo:  # this process's own measurement (what a benchmark reports), not the cache's best
        _memo[key] = {**_memo[key], "sgemm_gflops": max(_memo[key]["sgemm_gflops"], measured["sgemm_gflops"])}
    return dict(best)


def _table_path():
    from fastconv.config import settings

    return settings().cache_dir / "roofline.json"


def _read_table() -> dict:
    from fastconv.jsonstore import read_table

    return read_table(_table_path())


#: no CPU's fp32 rate reaches this (GFLOP/s): a cached rate above it is a damaged or hand-edited entry
_MAX_PLAUSIBLE_GFLOPS = 1e6


def _plausible_rate(v) -> bool:
    """A rate a probe can have measured: a finite positive number below ``_MAX_PLAUSIBLE_GFLOPS``. A cache entry
    outside that (NaN, 0, negative, 1e300, a bool) is never kept as the best: it would stay every later run's
    reference, and fractions against it would mean nothing."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        0 < v < _MAX_PLAUSIBLE_GFLOPS


def _best(old, measured: dict) -> dict:
    """``measured`` with each rate raised to ``old``'s where that is larger (implausible old rates are dropped)."""
    entry = dict(measured)
    if isinstance(old, dict):
        for rate in ("sgemm_gflops", "fma_peak_gflops"):
            if _plausible_rate(old.get(rate)) and (entry.get(rate) is None or old[rate] > entry[rate]):
                entry[rate] = old[rate]
    return entry


def _remember_best(key: str, measured: dict) -> dict:
    """Merge ``measured`` into the cache entry ``key`` keeping the larger of each rate (under the table's lock: a
    process measuring at the same time never lowers it); returns the entry (unstored where the cache cannot be
    written)."""
    from fastconv.jsonstore import update_table

    try:
        return update_table(_table_path(), lambda t: {**t, key: _best(t.get(key), measured)})[key]
    except (OSError, ValueError, TypeError):
        return _best(_read_table().get(key), measured)


def describe(r: dict) -> str:
    """One line for a benchmark header: CPU, ISA, threads, SGEMM and FMA peak."""
    fma = f", FMA peak {r['fma_peak_gflops']:.1f} GFLOP/s" if r.get("fma_peak_gflops") else ""
    return (f"{r['cpu_model']} ({r['isa']}), {r['threads']} threads, torch {r['torch']}: "
            f"SGEMM {r['sgemm_gflops']:.1f} GFLOP/s{fma}")


def _inside(n: int, k: int) -> int:
    """Sum over the n outputs of a 'same' 1-D correlation (kernel k, padding k // 2) of the taps that meet the
    input rather than its zero padding."""
    pad = k // 2
    return sum(min(k, n + pad - p) - max(0, pad - p) for p in range(n))


def depthwise_flops(batch: int, channels: int, h: int, w: int, kh: int, kw: int) -> dict:
    """FLOPs of one pass (forward, input gradient or weight gradient) of a stride-1 'same' depthwise conv:
    ``nominal`` = 2 * B * C * H * W * KH * KW (what ``torch.utils.flop_counter`` counts, and the paper's
    convention) and ``inside`` = the products whose input pixel lies inside the map (the rest multiply zero
    padding; fastconv's C++ kernel skips them, so a kernel larger than the map does far less than ``nominal``:
    27x27 on 14x14, 27 %). ``inside`` is the honest numerator of a roofline fraction of that kernel."""
    nominal = 2 * batch * channels * h * w * kh * kw
    inside = 2 * batch * channels * _inside(h, kh) * _inside(w, kw)
    return {"nominal": nominal, "inside": inside}


def _winograd_rows(out_rows: int, kernel_rows: int, row_lo: int, row_hi: int) -> int:
    """Row products that fastconv's Winograd F(3, 3) rows multiply (dwconv.cpp's corr_plane_wino): per triplet of
    output rows q (rows 3q .. 3q + 2) and each of its five products, the chunks t of three kernel rows whose
    transformed row q + t (the padded plane's rows 3(q + t) + a that the product combines: a from 0 to 3, 1 to 3 or 1
    to 4) meets its nonzero rows [row_lo, row_hi). The fifth product (the chunk's third kernel row, read by the
    triplet's third output row only) skips a last chunk or triplet that lacks that row (wino_chunks_m4)."""
    triplets, chunks, total = -(-out_rows // 3), -(-kernel_rows // 3), 0
    for k, (a_lo, a_hi) in enumerate(((0, 3), (1, 3), (1, 3), (1, 3), (1, 4))):  # the input rows 3j + a it combines
        j_lo = max(0, -(-(row_lo - a_hi) // 3))
        j_hi = min(triplets + chunks - 1, (row_hi - 1 - a_lo) // 3 + 1)
        t_n, q_n = (kernel_rows // 3, out_rows // 3) if k == 4 else (chunks, triplets)
        total += sum(max(0, min(t_n, j_hi - q) - max(0, j_lo - q)) for q in range(q_n))
    return total


def winograd_rows_flops(batch: int, channels: int, h: int, w: int, kh: int, kw: int) -> dict:
    """Multiply-adds (as FLOPs, 2 per multiply-add) that fastconv's C++ kernel runs in Winograd F(3, 3) rows (Lavin &
    Gray, CVPR 2016) where ``cpu_kernels.cpp_conv_path`` / ``cpp_wgrad_winograd`` say so: ``forward`` (also the
    input gradient) and ``weight_grad``, against ``depthwise_flops``'s ``inside`` (the direct products). Three output
    rows of a chunk of three kernel rows take five products instead of nine, so a roofline fraction counted on
    ``inside`` can pass what the FMA units execute: ``forward / inside`` is the executed share (0.62 at 32 x 32,
    K = 31; 0.65 at K = 13). Columns as the direct tiles (inside the map); rows as the C++ kernel chooses them."""
    pad = kh // 2
    cols = _inside(w, kw)
    fwd = 2 * batch * channels * _winograd_rows(h, kh, pad, pad + h) * cols
    wgrad = 2 * batch * channels * _winograd_rows(kh, h, pad, pad + h) * cols
    return {"forward": fwd, "weight_grad": wgrad, "inside": depthwise_flops(batch, channels, h, w, kh, kw)["inside"]}
