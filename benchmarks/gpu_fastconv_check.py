"""GPU check of the Triton depthwise kernels (fastconv.triton_backend): correctness and speed vs PyTorch/cuDNN.

RepLKNet (Ding et al., CVPR 2022, Table 1) shows that a proper depthwise implementation keeps 31x31 kernels
nearly as fast as 3x3.  For every (resolution R, kernel K, dtype, memory format) this script

* checks forward, dL/dx and dL/dw of the Triton kernels against an fp64 F.conv2d reference (batch slice of 2);
* checks/times the opt-in Toeplitz tensor-core forward (``dwconv_fwd_dot_kernel``) for fp16/bf16;
* times Triton vs ``F.conv2d`` / ``aten.convolution_backward`` (cuDNN or PyTorch's native depthwise kernels,
  ``torch.backends.cudnn.benchmark = True``) in native NCHW and channels_last, with CUDA events (median).

Defaults: B=64, C=384, R in {64, 32}, K in {3, 31, 13, 7, 21, 27}, fp32/fp16/bf16; a time budget (default 270 s)
keeps the run under 5 minutes: configs left over are recorded as skipped.  Results go to
``<out>/gpu_fastconv_check.json`` (rewritten atomically after every config, so a killed run keeps its data),
``<out>`` = ``--out`` or ``$OUT`` or ``./gpu_fastconv_results``.

    python benchmarks/gpu_fastconv_check.py                  # full sweep, < 5 min on an H100/H200
    python benchmarks/gpu_fastconv_check.py --ks 3 31 --resolutions 32 --dtypes float16 --budget-s 60
    python benchmarks/gpu_fastconv_check.py --tune --ks 31 --dtypes float16 float32   # tile-size sweep instead

``--tune`` times candidate tile configs of both Triton kernels (first R, given K/dtypes, both layouts) against
the built-in heuristics and writes ``<out>/gpu_fastconv_tune.json``; use it to retune ``_fwd_config`` /
``_bwd_weight_config`` in fastconv/triton_backend.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erf_lab.io import write_json  # noqa: E402
from fastconv import triton_backend as tb  # noqa: E402

TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 8e-3}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_fastconv_results")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 32])
    p.add_argument("--ks", type=int, nargs="+", default=[3, 31, 13, 7, 21, 27],
                   help="run in this order (extremes first, so a budget cut keeps the 3-vs-31 comparison)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"], choices=list(TOL))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new configs after this many s")
    p.add_argument("--tune", action="store_true", help="sweep tile configs instead of the correctness/speed check")
    return p.parse_args(argv)


# Candidate tiles for --tune: forward (BLOCK_H, BLOCK_W, BLOCK_C, num_warps), weight grad
# (BLOCK_J, BLOCK_H, BLOCK_W, BLOCK_C, num_warps); split-K is derived as in _bwd_weight_config.
FWD_TILES = {"channels_last": [(8, 16, 32, 4), (8, 16, 32, 8), (8, 8, 64, 4), (4, 16, 64, 8), (8, 16, 64, 8),
                               (16, 16, 32, 8), (4, 8, 32, 4)],
             "nchw": [(4, 64, 4, 4), (8, 32, 4, 4), (4, 32, 8, 4), (8, 64, 2, 8), (2, 64, 8, 4), (16, 32, 1, 4)]}
DOT_TILES = [(64, 32, 4, 8), (32, 32, 4, 4), (64, 32, 2, 4), (16, 32, 8, 4), (32, 16, 8, 4), (64, 16, 4, 4)]
WGRAD_TILES = {"channels_last": [(8, 2, 16, 32, 8), (4, 2, 16, 64, 4), (8, 4, 8, 32, 8), (16, 1, 16, 32, 8),
                                 (8, 2, 16, 16, 4)],
               "nchw": [(8, 4, 32, 4, 4), (8, 2, 64, 4, 8), (4, 4, 32, 8, 4), (8, 8, 16, 4, 8)]}


def tune(args, measure, device, report, out_file) -> None:
    """Time candidate tiles of both kernels; every row records the ms and whether the result still matches."""
    b, c, r = args.batch, args.channels, args.resolutions[0]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    t0 = time.perf_counter()
    for k in args.ks:
        for dt in args.dtypes:
            for fmt in ("channels_last", "nchw"):
                memfmt = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                dtype = getattr(torch, dt)
                x = torch.randn(b, c, r, r, device=device).to(dtype).contiguous(memory_format=memfmt)
                gy = torch.randn(b, c, r, r, device=device).to(dtype).contiguous(memory_format=memfmt)
                w = (torch.randn(c, 1, k, k, device=device) / k).to(dtype)
                w_t = tb._tap_major(w)
                y_ref = tb.dwconv_forward(x, w)
                gw_ref = tb.dwconv_backward_weight(x, gy, k, k).float()
                rows = [dict(kernel="fwd", tiles="heuristic", ms=measure(lambda: tb.dwconv_forward(x, w), 1, 5))]
                rows.append(dict(kernel="wgrad", tiles="heuristic",
                                 ms=measure(lambda: tb.dwconv_backward_weight(x, gy, k, k), 1, 5)))
                for bh, bw, bc, nw in FWD_TILES[fmt]:
                    if time.perf_counter() - t0 > args.budget_s:
                        break
                    cfg = dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw)
                    try:
                        y = tb._launch_forward(x, w_t, None, k, k, cfg)
                        ms = measure(lambda: tb._launch_forward(x, w_t, None, k, k, cfg), 1, 5)
                        rows.append(dict(kernel="fwd", tiles=cfg, ms=ms, matches=bool(torch.equal(y, y_ref))))
                    except Exception as e:  # noqa: BLE001 - e.g. out of registers/shared memory
                        rows.append(dict(kernel="fwd", tiles=cfg, error=f"{type(e).__name__}: {e}"[:500]))
                for bh, bw, bc, nw in (DOT_TILES if dtype != torch.float32 else []):
                    if time.perf_counter() - t0 > args.budget_s:
                        break
                    cfg = dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, BLOCK_U=tb._next_pow2(bw + k - 1), num_warps=nw)
                    try:
                        y = tb._launch_forward(x, w_t, None, k, k, cfg, dot=True)
                        ms = measure(lambda: tb._launch_forward(x, w_t, None, k, k, cfg, dot=True), 1, 5)
                        rows.append(dict(kernel="fwd_tensorcore", tiles=cfg, ms=ms, rel_diff=_rel(y, y_ref)))
                    except Exception as e:  # noqa: BLE001
                        rows.append(dict(kernel="fwd_tensorcore", tiles=cfg, error=f"{type(e).__name__}: {e}"[:500]))
                for bj, bh, bw, bc, nw in WGRAD_TILES[fmt]:
                    if time.perf_counter() - t0 > args.budget_s:
                        break
                    programs = -(-c // bc) * k * (-(-k // bj))
                    split = max(1, min(b * (-(-r // bh)), -(-4 * sms // programs)))
                    cfg = dict(BLOCK_J=bj, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw, split=split)
                    try:
                        gw = tb._launch_backward_weight(x, gy, k, k, cfg).float()
                        ms = measure(lambda: tb._launch_backward_weight(x, gy, k, k, cfg), 1, 5)
                        rows.append(dict(kernel="wgrad", tiles=cfg, ms=ms, rel_diff=_rel(gw, gw_ref)))
                    except Exception as e:  # noqa: BLE001
                        rows.append(dict(kernel="wgrad", tiles=cfg, error=f"{type(e).__name__}: {e}"[:500]))
                report["results"].append(dict(R=r, K=k, dtype=dt, format=fmt, B=b, C=c, rows=rows))
                for row in rows:
                    print(f"K={k:2d} {dt:9s} {fmt:13s} {row['kernel']:5s} {row.get('ms', float('nan')):9.3f} ms "
                          f"{row['tiles']} {row.get('error', '')[:120]}", flush=True)
                report["elapsed_s"] = round(time.perf_counter() - t0, 1)
                write_json(out_file, report)


def _timer(device: torch.device):
    """Median milliseconds of ``fn`` with CUDA events (perf_counter on CPU, interpreter smoke runs only)."""
    def measure(fn, warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return measure


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _torch_bwd(gy, x, w, k, mask):
    return torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0],
                                               x.shape[1], mask)


def check_correctness(x, w, b, gy, k) -> dict:
    """Triton vs fp64 F.conv2d on the first two images (the fp64 reference is slow at full batch)."""
    xs, gs = x[:2], gy[:2]
    xr, wr = xs.double().requires_grad_(), w.double().requires_grad_()
    yr = F.conv2d(xr, wr, b.double(), padding=k // 2, groups=x.shape[1])
    gx_ref, gw_ref = torch.autograd.grad(yr, (xr, wr), gs.double())
    y = tb.dwconv_forward(xs, w, b)
    gx = tb.dwconv_backward_input(gs, w)
    gw = tb.dwconv_backward_weight(xs, gs, k, k)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = dict(fwd=_rel(y, yr.detach()), grad_x=_rel(gx, gx_ref), grad_w=_rel(gw, gw_ref),
               format_kept=bool(y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)))
    errs = [out["fwd"], out["grad_x"], out["grad_w"]]
    if x.dtype in (torch.float16, torch.bfloat16):   # opt-in Toeplitz / tensor-core forward
        out["fwd_tensorcore"] = _rel(tb._launch_forward(xs, tb._tap_major(w), b, k, k, dot=True), yr.detach())
        errs.append(out["fwd_tensorcore"])
    tol = TOL[str(x.dtype).removeprefix("torch.")]
    out["ok"] = bool(out["format_kept"] and max(errs) <= tol)
    return out


def bench_config(measure, device, dtype, b, c, r, k, fmt, warmup, reps) -> dict:
    g = torch.Generator(device=device).manual_seed(1000 * k + r)
    x = torch.randn(b, c, r, r, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
    gy = torch.randn(b, c, r, r, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(c, 1, k, k, device=device, generator=g) / k).to(dtype)
    bias = torch.randn(c, device=device, generator=g).to(dtype)
    res = {"correctness": check_correctness(x, w, bias, gy, k)}
    ops = {
        "torch_fwd": lambda: F.conv2d(x, w, bias, padding=k // 2, groups=c),
        "torch_grad_x": lambda: _torch_bwd(gy, x, w, k, [True, False, False]),
        "torch_grad_w": lambda: _torch_bwd(gy, x, w, k, [False, True, False]),
        "triton_fwd": lambda: tb.dwconv_forward(x, w, bias),
        "triton_grad_x": lambda: tb.dwconv_backward_input(gy, w),
        "triton_grad_w": lambda: tb.dwconv_backward_weight(x, gy, k, k),
    }
    if dtype in (torch.float16, torch.bfloat16):
        w_t = tb._tap_major(w)
        ops["tensorcore_fwd"] = lambda: tb._launch_forward(x, w_t, bias, k, k, dot=True)
    ms = {name: measure(fn, warmup, reps) for name, fn in ops.items()}
    res["ms"] = ms
    res["speedup_vs_torch"] = {op: ms[f"torch_{op}"] / ms[f"triton_{op}"] for op in ("fwd", "grad_x", "grad_w")}
    # 2*K^2 flops per output element; reads x once, writes y once (ideal traffic)
    res["triton_fwd_tflops"] = 2 * b * c * r * r * k * k / (ms["triton_fwd"] * 1e-3) / 1e12
    return res


def main(argv=None) -> int:
    args = _parse(argv)
    if not tb.triton_available():
        print("error: needs triton and a CUDA device (or TRITON_INTERPRET=1 for a CPU smoke run)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    import triton

    out_dir = Path(args.out)
    out_file = out_dir / ("gpu_fastconv_tune.json" if args.tune else "gpu_fastconv_check.json")
    report = {
        "run": {
            "script": "benchmarks/gpu_fastconv_check.py", "argv": sys.argv[1:], "args": vars(args),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cudnn_benchmark": True, "timing": "median of CUDA-event times" if device.type == "cuda" else "cpu",
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        },
        "results": [], "skipped": [],
    }
    measure = _timer(device)
    if args.tune:
        tune(args, measure, device, report, out_file)
        print(f"wrote {out_file}")
        return 0
    configs = [(r, k, dt, fmt) for k in args.ks for r in args.resolutions for dt in args.dtypes
               for fmt in ("channels_last", "nchw")]
    t0 = time.perf_counter()
    for i, (r, k, dt, fmt) in enumerate(configs):
        if time.perf_counter() - t0 > args.budget_s:
            report["skipped"] = [dict(R=r_, K=k_, dtype=d_, format=f_) for r_, k_, d_, f_ in configs[i:]]
            print(f"time budget reached: {len(configs) - i} configs skipped", flush=True)
            break
        memfmt = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        try:
            res = bench_config(measure, device, getattr(torch, dt), args.batch, args.channels, r, k, memfmt,
                               args.warmup, args.reps)
        except Exception as e:  # record and continue: one failing config must not lose the rest
            res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        row = dict(R=r, K=k, dtype=dt, format=fmt, B=args.batch, C=args.channels, **res)
        report["results"].append(row)
        if "error" in res:
            print(f"R={r:3d} K={k:2d} {dt:9s} {fmt:13s} ERROR {res['error'][:200]}", flush=True)
        else:
            ms, c = res["ms"], res["correctness"]
            print(f"R={r:3d} K={k:2d} {dt:9s} {fmt:13s} ok={c['ok']} "
                  f"fwd {ms['triton_fwd']:8.3f}/{ms['torch_fwd']:8.3f} ms  "
                  f"dx {ms['triton_grad_x']:8.3f}/{ms['torch_grad_x']:8.3f}  "
                  f"dw {ms['triton_grad_w']:8.3f}/{ms['torch_grad_w']:8.3f}  (triton/torch)"
                  + (f"  tensorcore fwd {ms['tensorcore_fwd']:8.3f}" if "tensorcore_fwd" in ms else ""), flush=True)
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_json(out_file, report)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["all_correct"] = all(r_.get("correctness", {}).get("ok", False) for r_ in report["results"])
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_json(out_file, report)
    print(f"wrote {out_file}  all_correct={report['all_correct']}  {report['elapsed_s']} s")
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
