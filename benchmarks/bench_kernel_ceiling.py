"""fastconv's C++ kernel against this machine's FMA peak, level by level, on one thread (issue 14).

Where the time of a forward call of the C++ kernel goes between the FMA peak and what ``bench_fastconv.py``
measures, for the kernels that run on packed planes (K > DMAXK: 27 and 31 with AVX-512):
  row         the register tile's steady state (``input_row``: RO x CO accumulators, a sliding window of input
              vectors, one weight vector per output row and kernel column) on L1-resident data: loads and FMAs
              only. No whole call can beat this fraction of the peak;
  plane, all  ``corr_plane`` on one packed plane, every tap multiplied (the tiles, their edges and the rows'
              starts, the plane's data in L1 / L2): the executed multiply-adds per second;
  plane       the same skipping the products with the zero padding as the kernel does, counted on the products
              inside the map (``fastconv.roofline.depthwise_flops(...)["inside"]``, as the targets are);
  Winograd plane, executed / Winograd plane
              the same plane in Winograd F(3, 3) rows (``corr_plane_wino``, what the call runs from K = 21 on maps
              from 22 with AVX-512, from 15 on maps from 20 with 8 lanes, where the Winograd rows in direct tiles do
              not run): its executed multiply-adds (``fastconv.roofline.winograd_rows_flops``), then the products
              inside the map (so above the FMA peak where the 1.6-1.7x fewer multiply-adds outrun the transforms'
              cost);
  call        the whole forward call (``fastconv.cpu_kernels.cpp_conv``, B=1, C channels, NCHW): packing, the
              planes or (``cpp_conv_path``: on AVX-512 at K = 27 / 31 on maps from 32) the Winograd rows in direct
              tiles on packed rows, the write-back, the Python around it; inside products.
One thread (``torch.set_num_threads(1)``; the FMA probe on one thread), the probes in a random order each round;
best and median over the rounds, each level as a fraction of the run's best FMA probe. Not a test: the machine is
noisy. Writes ``benchmarks/results/<--name>.{json,md}``.
Usage: python benchmarks/bench_kernel_ceiling.py [--kernels 27,31] [--res 32,64] [--rounds 7] [--name NAME]
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastconv import cpu_kernels as ck  # noqa: E402
from fastconv import roofline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DRIVER = Path(__file__).resolve().parent / "kernel_ceiling.cpp"
KERNEL = REPO / "fastconv" / "csrc" / "dwconv.cpp"
FLAGS = ["-march=native", "-shared", "-fPIC", *ck.KERNEL_FLAGS]  # as fastconv builds it, one thread
LEVELS = ("row", "plane, all", "plane", "Winograd plane, executed", "Winograd plane", "call")


def build_driver() -> ctypes.CDLL:
    """The probes compiled with the kernel's current source (cached by both files' hash and the flags)."""
    sha = hashlib.sha256(KERNEL.read_bytes() + DRIVER.read_bytes()).hexdigest()[:16]
    flags = FLAGS + [f'-DDWCONV_SRC="{KERNEL}"', f"-DCEILING_SOURCES={sha}"]
    lib = ctypes.CDLL(str(ck.compile_shared_library(DRIVER, flags)))
    i64 = ctypes.c_int64
    lib.ceiling_tile.argtypes, lib.ceiling_tile.restype = [i64, i64], i64
    lib.ceiling_row.argtypes, lib.ceiling_row.restype = [i64] * 4, ctypes.c_double
    lib.ceiling_plane.argtypes, lib.ceiling_plane.restype = [i64] * 6, ctypes.c_double
    lib.ceiling_wino_plane.argtypes, lib.ceiling_wino_plane.restype = [i64] * 5, ctypes.c_double
    return lib


def level_flops(level: str, k: int, r: int, lanes: int, ro: int, co: int, channels: int) -> float:
    """FLOPs one call of ``level`` counts (2 per multiply-add): executed ones for the row and the plane with every
    tap, the products inside the map for the plane that skips the padding and for the whole call."""
    if level == "row":
        return 2.0 * ro * co * k * lanes
    if level == "plane, all":
        return 2.0 * r * r * k * k * lanes
    if level == "Winograd plane, executed":
        return float(roofline.winograd_rows_flops(1, lanes, r, r, k, k)["forward"])
    inside = roofline.depthwise_flops(1, channels if level == "call" else lanes, r, r, k, k)["inside"]
    return float(inside)


def measure(kernels, resolutions, rounds: int, channels: int, lanes: int, seed: int = 0) -> dict:
    """Per (K, R) and level: seconds per call in each round, with one FMA probe per round, in a shuffled order.
    ``lanes``: 8 or 16, the lane width every level runs (the probes' variant and the whole call's)."""
    lib = build_driver()
    ro, co, width = (int(lib.ceiling_tile(lanes, i)) for i in range(3))
    if width < 0:
        raise SystemExit(f"no kernel variant for lanes={lanes}")
    torch.set_num_threads(1)
    probes = []
    calls = {}
    for k in kernels:
        for r in resolutions:
            x, w = torch.randn(1, channels, r, r), torch.randn(channels, 1, k, k)
            calls[k, r] = (x, w)
            reps_plane = max(1, int(2e7 / (r * r * k * k * width)))
            probes += [((k, r, "row"), lambda k=k: lib.ceiling_row(k, max(1, int(4e7 / (ro * co * k * width))), 1,
                                                                    lanes)),
                       ((k, r, "plane, all"), lambda k=k, r=r, n=reps_plane: lib.ceiling_plane(k, r, 0, n, 1, lanes)),
                       ((k, r, "plane"), lambda k=k, r=r, n=reps_plane: lib.ceiling_plane(k, r, 1, n, 1, lanes)),
                       ((k, r, "Winograd plane"),
                        lambda k=k, r=r, n=reps_plane: lib.ceiling_wino_plane(k, r, n, 1, lanes)),
                       ((k, r, "call"), lambda k=k, r=r: _call_seconds(*calls[k, r], lanes))]
    rng = random.Random(seed)
    times = {key: [] for key, _ in probes}
    peaks = []
    for probe in probes:  # warm-up: builds, first-touch of buffers
        probe[1]()
    for _ in range(rounds):
        order = probes + [("fma", None)]
        rng.shuffle(order)
        for key, fn in order:
            if fn is None:
                peaks.append(roofline.fma_peak_gflops(threads=1, repeats=5) or float("nan"))
            else:
                times[key].append(fn())
    return {"ro": ro, "co": co, "lanes": width, "channels": channels, "times": times, "fma_probes": peaks}


def _call_seconds(x, w, lanes: int, reps: int = 5) -> float:
    """Mean seconds of ``reps`` forward calls of the C++ kernel (after one untimed call)."""
    ck.cpp_conv(x, w, None, lanes=lanes)
    t0 = time.perf_counter()
    for _ in range(reps):
        ck.cpp_conv(x, w, None, lanes=lanes)
    return (time.perf_counter() - t0) / reps


def best_probe(m: dict) -> float:
    """The run's best FMA probe (GFLOP/s, one thread)."""
    probes = [p for p in m["fma_probes"] if p == p]
    if not probes:
        raise SystemExit("the FMA peak probe (fastconv/csrc/fma_peak.c) could not be built or run here")
    return max(probes)


def summarize(m: dict) -> list[dict]:
    """One row per (K, R, level): GFLOP/s from the best and the median time, the fraction of the best FMA probe."""
    peak = best_probe(m)
    rows = []
    for (k, r, measured), ts in m["times"].items():
        if min(ts) < 0:  # a level this variant does not have (no Winograd rows)
            continue
        best, med = min(ts), statistics.median(ts)
        counts = ("Winograd plane, executed", measured) if measured == "Winograd plane" else (measured,)
        for level in counts:
            f = level_flops(level, k, r, m["lanes"], m["ro"], m["co"], m["channels"])
            rows.append({"K": k, "R": r, "level": level, "us_best": best * 1e6, "us_median": med * 1e6,
                         "gflops_best": f / best / 1e9, "gflops_median": f / med / 1e9,
                         "fraction_of_fma_peak": f / best / 1e9 / peak})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default="27,31", help="kernel sizes (comma-separated; planes: K > DMAXK)")
    p.add_argument("--res", default="32,64", help="map sizes R (comma-separated)")
    p.add_argument("--channels", type=int, default=384, help="channels of the whole call")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--lanes", type=int, default=0,
                   help="8 or 16 forces a lane width (default: fastconv's, $FASTCONV_CPU_LANES or the CPU's); the "
                        "FMA probe runs the CPU's widest vectors, so 8 lanes on an AVX-512 CPU read at most ~50 %%")
    p.add_argument("--out", default=str(RESULTS), help="directory for <name>.json / .md ('' = none)")
    p.add_argument("--name", default="kernel_ceiling_cpu")
    a = p.parse_args(argv)
    # a folder in --name: refused before the run, not when its results are written at the end
    if a.name and (a.name != Path(a.name).name or a.name in ('.', '..')):
        p.error(f"--name {a.name!r}: a file stem, not a path")
    if not ck.cpp_available():
        print(f"the C++ kernel is not available here: {ck.cpp_unavailable_reason()}")
        return 2
    kernels = [int(v) for v in a.kernels.split(",")]
    resolutions = [int(v) for v in a.res.split(",")]
    cpu = roofline.cpu_description()
    m = measure(kernels, resolutions, a.rounds, a.channels, ck.cpu_lanes(a.lanes or None))
    rows = summarize(m)
    peak = best_probe(m)
    head = (f"{cpu['cpu_model']} ({cpu['isa']}), 1 thread, torch {torch.__version__}: FMA peak "
            f"{peak:.1f} GFLOP/s (best of {len(m['fma_probes'])} probes, one per round: "
            f"{min(m['fma_probes']):.1f}-{peak:.1f}); kernel variant {m['lanes']} lanes, register tile "
            f"{m['ro']} x {m['co']}")
    lines = [f"# fastconv C++ kernel, level by level (`python benchmarks/bench_kernel_ceiling.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`)", "", f"- machine: {head}",
             f"- {a.rounds} rounds, the probes in a random order each round; row, `plane, all` and `Winograd plane, "
             "executed`: executed multiply-adds; plane, `Winograd plane` and call: the products inside the map (the "
             "targets' count; the Winograd rows run 1.6-1.7x fewer multiply-adds than these, so their fraction can "
             "pass 100 %)", "",
             "| K | R | level | us best / median | GFLOP/s best / median | % FMA peak (best) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['R']} | {r['level']} | {r['us_best']:.2f} / {r['us_median']:.2f} | "
                     f"{r['gflops_best']:.1f} / {r['gflops_median']:.1f} | {100 * r['fraction_of_fma_peak']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"machine": head, "cpu": cpu, "fma_probes": m["fma_probes"], "register_tile": [m["ro"], m["co"]],
                "lanes": m["lanes"], "channels": m["channels"], "rows": rows}
        for suffix, content in ((".json", json.dumps(data, indent=1) + "\n"), (".md", text)):
            fd, tmp = tempfile.mkstemp(prefix=f".{a.name}", suffix=suffix, dir=out)
            with os.fdopen(fd, "w") as f:
                f.write(content)
            os.replace(tmp, out / f"{a.name}{suffix}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
