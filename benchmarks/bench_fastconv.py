"""CPU targets for fastconv, measured side by side in one run (round-robin repeats, medians).

Single depthwise layer, input (B, 384, R, R) for R in 16, 32, 64 (default B=1: the CPU-sized batch),
forward+backward including the weight gradient:
  T1  K=31: fastconv >= 20x faster than F.conv2d on an NCHW input;
  T2  every K: fastconv never slower than the faster of F.conv2d NCHW / channels_last (10% noise allowance);
  T3  forward, K>=13: fastconv >= 60% of this machine's SGEMM GFLOP/s measured in the same run.
fastconv is timed on both layouts (NCHW input and channels_last input). Not a test: the machine is noisy.
Usage: python benchmarks/bench_fastconv.py [--batch 1] [--res 16,32,64] [--repeats 5] [--kernels 3,5,...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--res", default="16,32,64", help="comma-separated resolutions R")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", default="3,5,7,9,13,17,21,27,29,31")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--fresh-autotune", action="store_true", help="tune in a temporary cache (this run's conditions)")
    a = p.parse_args(argv)
    if a.fresh_autotune:
        os.environ["FASTCONV_CACHE"] = tempfile.mkdtemp(prefix="fastconv-bench-")
    import fastconv
    from fastconv.bench import sgemm_gflops

    if a.threads:
        torch.set_num_threads(a.threads)
    kernels = [int(k) for k in a.kernels.split(",")]
    b, c = a.batch, a.channels
    g = torch.Generator().manual_seed(0)
    results, fails = [], 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={b} C={c}; "
          f"cpp backend: {'yes' if 'cpp' in fastconv.available_backends() else 'no'}")
    for r in [int(v) for v in str(a.res).split(",")]:
        print(f"--- input ({b},{c},{r},{r})", flush=True)
        f, n = _bench_res(a, fastconv, sgemm_gflops, kernels, b, c, r, g)
        fails += f
        results += n
    print(f"{'ALL PASS' if not fails else f'{fails} FAIL'}")
    return 0 if not fails else 1


def _bench_res(a, fastconv, sgemm_gflops, kernels, b, c, r, g):
    x_nchw = torch.randn(b, c, r, r, generator=g)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    results, fails = [], 0
    for k in kernels:
        w = torch.randn(c, 1, k, k, generator=g) / k
        impls = {
            "torch_nchw": lambda x, w: F.conv2d(x, w, padding=w.shape[-1] // 2, groups=c),
            "torch_cl": lambda x, w: F.conv2d(x, w, padding=w.shape[-1] // 2, groups=c),
            "fc_nchw": lambda x, w: fastconv.depthwise_conv2d(x, w),
            "fc_cl": lambda x, w: fastconv.depthwise_conv2d(x, w),
        }
        inputs = {"torch_nchw": x_nchw, "torch_cl": x_cl, "fc_nchw": x_nchw, "fc_cl": x_cl}
        t_fwd = {n: [] for n in impls}
        t_fb = {n: [] for n in impls}

        def fwd(n):
            with torch.no_grad():
                impls[n](inputs[n], w)

        def fb(n):
            xg = inputs[n].detach().requires_grad_(True)
            wg = w.detach().requires_grad_(True)
            y = impls[n](xg, wg)
            y.backward(torch.ones_like(y))

        for n in impls:  # warm-up (and autotune for fastconv)
            fwd(n)
            fb(n)
        for _ in range(a.repeats):  # round-robin: every impl sees the same machine load
            for n in impls:
                t = time.perf_counter(); fwd(n); t_fwd[n].append(time.perf_counter() - t)  # noqa: E702
                t = time.perf_counter(); fb(n); t_fb[n].append(time.perf_counter() - t)  # noqa: E702
        peak = sgemm_gflops(torch.device("cpu"), repeats=3)
        med_f = {n: statistics.median(v) for n, v in t_fwd.items()}
        med_b = {n: statistics.median(v) for n, v in t_fb.items()}
        flops = 2.0 * b * c * r * r * k * k
        best_torch = min(med_b["torch_nchw"], med_b["torch_cl"])
        fc_fb = min(med_b["fc_nchw"], med_b["fc_cl"])
        line = (f"R={r} K={k:2d} fwd ms: torch nchw {med_f['torch_nchw']*1e3:8.2f} cl {med_f['torch_cl']*1e3:7.2f} | "
                f"fastconv nchw {med_f['fc_nchw']*1e3:7.2f} cl {med_f['fc_cl']*1e3:7.2f}   "
                f"fwd+bwd ms: torch nchw {med_b['torch_nchw']*1e3:9.1f} cl {med_b['torch_cl']*1e3:8.1f} | "
                f"fastconv nchw {med_b['fc_nchw']*1e3:7.1f} cl {med_b['fc_cl']*1e3:7.1f}")
        print(line, flush=True)
        checks = []
        for lay in ("nchw", "cl"):
            ratio = best_torch / med_b[f"fc_{lay}"]
            checks.append((f"T2 R={r} K={k} fwd+bwd fastconv({lay}) vs best torch: {ratio:.2f}x", ratio >= 1 / 1.10))
        if k == 31:
            for lay in ("nchw", "cl"):
                sp = med_b["torch_nchw"] / med_b[f"fc_{lay}"]
                checks.append((f"T1 R={r} K=31 fwd+bwd speedup fastconv({lay}) vs torch NCHW: {sp:.1f}x (>= 20x)",
                               sp >= 20))
        if k >= 13:
            for lay in ("nchw", "cl"):
                gf = flops / med_f[f"fc_{lay}"] / 1e9
                checks.append((f"T3 R={r} K={k} fwd fastconv({lay}) {gf:.1f} GFLOP/s = {100*gf/peak:.0f}% of SGEMM "
                               f"{peak:.1f} (>= 60%)", gf >= 0.6 * peak))
        for msg, ok in checks:
            print(f"   {'PASS' if ok else 'FAIL'}  {msg}")
            fails += not ok
        results.append((r, k, med_f, med_b, fc_fb))
        x = torch.empty(b, c, r, r, requires_grad=True)
        print("   auto (fwd+bwd, NCHW input): " + fastconv.explain(x, w.requires_grad_(True)).splitlines()[1].strip())
    return fails, results


if __name__ == "__main__":
    sys.exit(main())
