"""fastconv's CPU targets, measured side by side in one run (issue 14, "speed at the roofline").

One depthwise layer, input (B, C, R, R) (default B=1, C=384, R=32), per kernel size K and input layout, forward
alone and forward + both gradients (input and weight), against the best *stock* PyTorch way for the same layout:
  NCHW input:          min(F.conv2d on NCHW, convert to channels_last -> F.conv2d -> convert back (counted));
  channels_last input: F.conv2d on channels_last.
Targets:
  never slower: the median over rounds of (fastconv's time / the best stock way's time in the same round) <= 1 +
                noise allowance (default 5%), every K, layout, mode. Typical calls, not best runs: PyTorch's own
                NCHW 3x3 depthwise call can be bimodal on CPU (B=1 C=384 R=32, in some processes: 0.35 ms in a
                few % of the calls, ~3 ms in most), and then its best run is not what a user gets; the ratio of the
                best times is reported beside it;
  roofline:     K >= 13, achieved GFLOP/s >= 85% (forward) / 80% (forward + both grads) of this machine's FMA peak,
                measured in the same run (``fastconv.roofline``), on the FLOPs of the products whose input pixel
                lies inside the map (``fastconv.roofline.depthwise_flops(...)["inside"]``; 3 passes for forward +
                both gradients). The C++ kernel skips the products with zero padding (at R=32, K=31: 43% of the
                nominal 2*B*C*R*R*K*K), so nominal GFLOP/s (also reported) can exceed the FMA peak and mean nothing
                as a roofline fraction.
Times come from round-robin rounds (every implementation sees the same machine load, in a random order each round;
at least --repeats rounds and --min-time seconds): the minimum and the median; never-slower pairs the times of each
round. At K >= 13 each round also probes the FMA peak (one short probe at a random place in the round). The verdict
is the best time over the run's best probe (two long probes at the start and every per-round one: capability
against capability; with the start probes alone, a start in a bad phase of the dev box read 94-111 %). Beside it
the paired fraction: the median over rounds of the round's GFLOP/s over the round's probe (the typical call at
that moment's peak). The header reports how the peak scales from 1 thread to all, and warns where the threads do
not get a core each. On a
shared machine a competing process makes the 2-thread times jump in scheduler ticks (4 ms multiples seen on the dev
box): --threads 1 is the steadier view. Writes
``benchmarks/results/<--name>.{json,md}`` (default fastconv_cpu).
To model an AVX2-only CPU on an AVX-512 one, hold both sides to AVX2: fastconv's kernel
(FASTCONV_CPU_MARCH=x86-64-v3 FASTCONV_CPU_LANES=8) and the stock libraries (ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2, read when they start: set them in the environment); the header says which caps were set.
Not a test: the machine is noisy.
Usage: python benchmarks/bench_fastconv.py [--batch 1] [--res 32] [--repeats 7] [--kernels 3,5,...] [--noise 0.05]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS = "3,5,7,9,13,17,21,27,31"
TARGET_FWD, TARGET_FWDBWD, ROOFLINE_MIN_K = 0.85, 0.80, 13
SCALING_WARN = 0.8  # the FMA peak of T threads below this fraction of T x one thread's: a warning
FMA_PROBE = "fma_peak_probe"  # the per-round FMA probe's slot in a round (GFLOP/s, not seconds)
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--res", default="32", help="comma-separated resolutions R")
    p.add_argument("--repeats", type=int, default=7, help="round-robin rounds at least")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of rounds at least per K and mode")
    p.add_argument("--kernels", default=KERNELS)
    p.add_argument("--noise", type=float, default=0.05, help="allowance of the never-slower check (0.05 = 5%%)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--fresh-autotune", action="store_true", help="tune in a temporary cache (this run's conditions)")
    p.add_argument("--out", default=str(RESULTS), help="directory for <name>.json / .md ('' = none)")
    p.add_argument("--name", default="fastconv_cpu", help="file stem of the results")
    a = p.parse_args(argv)
    # a folder in --name: refused before the run, not when its results are written at the end
    if a.name and (a.name != Path(a.name).name or a.name in ('.', '..')):
        p.error(f"--name {a.name!r}: a file stem, not a path")
    if a.fresh_autotune:
        os.environ["FASTCONV_CACHE"] = tempfile.mkdtemp(prefix="fastconv-bench-")
    if a.threads:
        torch.set_num_threads(a.threads)
    import fastconv
    from fastconv import cpu_kernels as ck
    from fastconv.roofline import describe, fma_peak_gflops, machine_roofline

    roof = machine_roofline(fma=True, cache=False)  # measured in this run, beside the timings
    peak = roof.get("fma_peak_gflops")
    if peak:  # a second probe: on a shared machine one probe can lose a core to another process; the peak is the max
        again = fma_peak_gflops(roof["threads"])
        roof["fma_peak_probes"] = [peak, round(again, 1)]
        roof["fma_peak_gflops"] = peak = max(peak, round(again, 1))
    if peak and roof["threads"] > 1:  # do the threads add FMA units? (not where they share a core, or a busy host)
        one = fma_peak_gflops(1)
        roof["fma_peak_one_thread_gflops"] = round(one, 1)
        roof["fma_thread_scaling"] = round(peak / (roof["threads"] * one), 3)
    machine = describe(roof)
    variant = ck.cpu_variant() if ck.cpp_available() else f"unavailable ({ck.cpp_unavailable_reason()})"
    load = _loadavg()
    print(f"machine: {machine} (FMA peak probes: {roof.get('fma_peak_probes')})")
    if roof.get("fma_thread_scaling") is not None:
        scaling = roof["fma_thread_scaling"]
        print(f"FMA peak on 1 thread {roof['fma_peak_one_thread_gflops']} GFLOP/s: {roof['threads']} threads reach "
              f"{scaling:.2f} of {roof['threads']}x that"
              + ("" if scaling >= SCALING_WARN else " -- WARNING: the threads do not get a core each (SMT siblings, "
                 "or another process or VM on the cores); fractions of the peak are unsteady: --threads 1 is the "
                 "steadier view"))
    caps = stock_isa_caps()
    print(f"stock libraries: {_describe_caps(caps)}")
    print(f"cpp kernel: {variant}; load average {load}; B={a.batch} C={a.channels}; times = min of >= {a.repeats} "
          f"round-robin rounds (>= {a.min_time:g} s); never-slower allowance {a.noise:.0%}")
    rows, probes = [], [peak] if peak else []

    def probe_fma() -> float:
        probes.append(fma_peak_gflops(roof["threads"], repeats=1))
        return probes[-1]

    for r in [int(v) for v in str(a.res).split(",")]:
        for k in [int(v) for v in a.kernels.split(",")]:
            rows += _bench(fastconv, a, r, k, peak, probe_fma)
    if peak:  # the verdicts: best times over the run's best probe
        roof["fma_peak_gflops"] = peak = round(max(probes), 1)
        roof["fma_peak_probe_count"] = len(probes) + 1
        print(f"roofline: best time over the run's best FMA probe, {peak:.1f} GFLOP/s ({len(probes) + 1} probes); "
              "paired: median over rounds of the round's GFLOP/s over its probe")
        for row in rows:
            frac = row["gflops_inside"] / peak
            target = TARGET_FWD if row["mode"] == "fwd" else TARGET_FWDBWD
            row["fraction_of_fma_peak"] = _sig(frac)
            if row["K"] >= ROOFLINE_MIN_K:
                row["roofline"] = "PASS" if frac >= target else "FAIL"
                paired = row["fraction_of_fma_peak_paired"]
                print(f"  R={row['R']:3d} K={row['K']:2d} {row['layout']:4s} {row['mode']:6s} {100 * frac:5.1f}% "
                      f"(paired {'-' if paired is None else f'{100 * paired:.1f}%'}) target {100 * target:.0f}%: "
                      f"{row['roofline']}")
    fails = [row for row in rows if row["never_slower"] == "FAIL" or row["roofline"] == "FAIL"]
    print(f"{len(rows) - len(fails)}/{len(rows)} rows pass "
          f"({sum(r_['never_slower'] == 'FAIL' for r_ in rows)} never-slower FAIL, "
          f"{sum(r_['roofline'] == 'FAIL' for r_ in rows)} roofline FAIL)")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"machine": machine, "roofline": roof, "cpp_variant": variant, "stock_isa_caps": caps,
                "load_average_start": load,
                "load_average_end": _loadavg(), "batch": a.batch, "channels": a.channels, "repeats": a.repeats,
                "noise_allowance": a.noise, "targets": {"fwd_fraction_of_fma_peak": TARGET_FWD,
                                                        "fwdbwd_fraction_of_fma_peak": TARGET_FWDBWD,
                                                        "roofline_min_k": ROOFLINE_MIN_K},
                "command": " ".join(["python", "benchmarks/bench_fastconv.py", *(argv or sys.argv[1:])])}
        (out / f"{a.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / f"{a.name}.md").write_text(_markdown(meta, rows))
        print(f"wrote {out / (a.name + '.json')} and {out / (a.name + '.md')}")
    return 0 if not fails else 1


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def _bench(fastconv, a, r, k, peak, probe_fma):
    from fastconv.roofline import depthwise_flops

    b, c = a.batch, a.channels
    g = torch.Generator().manual_seed(k)
    x_nchw = torch.randn(b, c, r, r, generator=g)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k, generator=g) / k
    pad = k // 2
    cl = torch.channels_last
    impls = {  # name -> (input, function)
        "stock_nchw": (x_nchw, lambda x, w: F.conv2d(x, w, padding=pad, groups=c)),
        "stock_nchw_via_cl": (x_nchw, lambda x, w: F.conv2d(x.contiguous(memory_format=cl), w, padding=pad,
                                                             groups=c).contiguous()),
        "fastconv_nchw": (x_nchw, lambda x, w: fastconv.depthwise_conv2d(x, w)),
        "stock_cl": (x_cl, lambda x, w: F.conv2d(x, w, padding=pad, groups=c)),
        "fastconv_cl": (x_cl, lambda x, w: fastconv.depthwise_conv2d(x, w)),
    }

    def fwd(n):
        xx, f = impls[n]
        with torch.no_grad():
            f(xx, w)

    upstream: dict[str, torch.Tensor] = {}  # per implementation: the output gradient, made in its warm-up call

    def fb(n):
        xx, f = impls[n]
        xg, wg = xx.detach().requires_grad_(True), w.detach().requires_grad_(True)
        y = f(xg, wg)
        # the output gradient is the caller's, not part of the convolution: made once, outside the timed calls
        # (a fresh torch.ones_like per call cost every implementation ~45 us at B=1 C=384 R=32)
        if n not in upstream:
            upstream[n] = torch.ones_like(y)
        y.backward(upstream[n])

    rows = []
    for mode, step, passes in (("fwd", fwd, 1), ("fwdbwd", fb, 3)):
        times = {n: [] for n in impls}
        rounds: list[dict[str, float]] = []  # per round: name -> seconds (the pairs for the per-round ratios)
        for n in impls:  # warm-up (and autotune for fastconv)
            step(n)
        t_start, i = time.perf_counter(), 0
        order = random.Random(1000 * r + k)
        # round-robin rounds (every implementation sees the same machine load): at least --repeats, and more for
        # fast calls until --min-time seconds were spent (at most 200 rounds): the minimum needs many samples
        # on a shared machine, where another process can take a core at any moment
        while i < a.repeats or (time.perf_counter() - t_start < a.min_time and i < 200):
            best = min((min(v) for v in times.values() if v), default=float("inf"))
            names = list(impls) + ([FMA_PROBE] if peak and k >= ROOFLINE_MIN_K else [])
            rounds.append({})
            # a fresh random order each round: a rotation kept the cyclic order, so one implementation always ran
            # right after the one converting to channels_last and back (its big frees), which cost it ~30% at K=3
            order.shuffle(names)
            for n in names:
                if n == FMA_PROBE:  # the peak in this round, beside the timings it divides
                    rounds[-1][n] = probe_fma()
                    continue
                if i >= 2 and min(times[n]) > 10 * best:  # 10x slower than the best: two runs are enough
                    continue
                t = time.perf_counter()
                step(n)
                times[n].append(time.perf_counter() - t)
                rounds[-1][n] = times[n][-1]
            i += 1
        t = {n: min(v) for n, v in times.items()}
        typ = {n: statistics.median(v) for n, v in times.items()}
        counted = depthwise_flops(b, c, r, r, k, k)
        flops, inside = passes * counted["nominal"], passes * counted["inside"]
        for lay, stock in (("nchw", ("stock_nchw", "stock_nchw_via_cl")), ("cl", ("stock_cl",))):
            best_stock = min(stock, key=typ.get)
            fc = t[f"fastconv_{lay}"]
            ratio = paired_ratio(rounds, f"fastconv_{lay}", stock)
            if ratio is None:  # fewer than 3 rounds with both: the ratio of the medians
                ratio = typ[f"fastconv_{lay}"] / typ[best_stock]
            ratio_best = fc / min(t[n] for n in stock)
            gf, gf_inside = flops / fc / 1e9, inside / fc / 1e9
            frac = gf_inside / peak if peak else None
            paired = paired_fraction(rounds, f"fastconv_{lay}", inside)
            target = TARGET_FWD if mode == "fwd" else TARGET_FWDBWD
            roof_check = "-" if k < ROOFLINE_MIN_K or frac is None else ("PASS" if frac >= target else "FAIL")
            xg = impls[f"fastconv_{lay}"][0].detach().requires_grad_(mode == "fwdbwd")
            wg = w.detach().requires_grad_(mode == "fwdbwd")
            with torch.enable_grad() if mode == "fwdbwd" else torch.no_grad():
                backend = fastconv.dispatch.decide(xg, wg, None)["backend"]
            rows.append({"R": r, "K": k, "layout": lay, "mode": mode, "fastconv_ms": _sig(fc * 1e3),
                         "fastconv_median_ms": _sig(typ[f"fastconv_{lay}"] * 1e3), "fastconv_backend": backend,
                         **{f"{n}_ms": _sig(t[n] * 1e3) for n in stock},
                         **{f"{n}_median_ms": _sig(typ[n] * 1e3) for n in stock}, "best_stock": best_stock,
                         "ratio_vs_best_stock": _sig(ratio), "ratio_of_best_times": _sig(ratio_best),
                         # judged on the ratio as reported (4 digits): a row never reads "1.05 FAIL" at 5 %
                         "never_slower": "PASS" if _sig(ratio) <= 1 + a.noise else "FAIL",
                         "gflops": _sig(gf), "gflops_inside": _sig(gf_inside),
                         "fraction_of_fma_peak": None if frac is None else _sig(frac),
                         "fraction_of_fma_peak_paired": None if paired is None else _sig(paired),
                         "roofline_target": target if k >= ROOFLINE_MIN_K else None, "roofline": roof_check,
                         "load_average": _loadavg()})
            row = rows[-1]
            stock_txt = " ".join(f"{n.replace('stock_', '')} {t[n] * 1e3:.2f}/{typ[n] * 1e3:.2f}" for n in stock)
            print(f"R={r:3d} K={k:2d} {lay:4s} {mode:6s} fastconv {fc * 1e3:.2f}/{typ[f'fastconv_{lay}'] * 1e3:.2f} "
                  f"ms ({backend:13s}) | stock best/median ms: {stock_txt:40s} | ratio (median per round) {ratio:5.2f} "
                  f"{row['never_slower']} (of best times {ratio_best:5.2f}) | {gf:6.1f} GFLOP/s nominal, "
                  f"{gf_inside:6.1f} inside the map"
                  + (f" = {100 * frac:4.1f}% of the start's FMA peak" if frac else "")
                  + (f", {100 * paired:4.1f}% paired per round" if paired is not None else ""), flush=True)
    return rows


#: the environment variables that hold the stock libraries (oneDNN, MKL) below the CPU's own instruction set
STOCK_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def stock_isa_caps() -> dict[str, str]:
    """The ``STOCK_ISA_CAPS`` set in this process's environment (name -> value)."""
    return {n: os.environ[n] for n in STOCK_ISA_CAPS if os.environ.get(n, "").strip()}


def _describe_caps(caps: dict[str, str]) -> str:
    if not caps:
        return "the CPU's own instruction set (no ISA cap set)"
    return "capped by " + ", ".join(f"${n}={v}" for n, v in caps.items())


def paired_ratio(rounds: list[dict[str, float]], fast: str, stock: tuple[str, ...]) -> float | None:
    """The median over rounds of ``fast``'s time / the fastest of the ``stock`` ways that ran in the same round
    (a way 10x slower than the best is run only twice, so later rounds compare against the ones left): slow swings
    of the machine's load cancel within a round. None with fewer than 3 such rounds."""
    ratios = [rd[fast] / min(rd[n] for n in stock if n in rd) for rd in rounds
              if fast in rd and any(n in rd for n in stock)]
    return statistics.median(ratios) if len(ratios) >= 3 else None


def paired_fraction(rounds: list[dict[str, float]], name: str, flops: float) -> float | None:
    """The median over rounds of ``name``'s GFLOP/s (``flops`` / its time) / the FMA peak probed in the same round:
    the typical call against the peak of that moment (on a host whose speed swings, both sides of a round swing
    together). None with fewer than 3 rounds with both."""
    fr = [flops / rd[name] / 1e9 / rd[FMA_PROBE] for rd in rounds if name in rd and rd.get(FMA_PROBE)]
    return statistics.median(fr) if len(fr) >= 3 else None


def _markdown(meta, rows) -> str:
    lines = [f"# fastconv CPU targets ({meta['command']})", "",
             f"- machine: {meta['machine']}", f"- cpp kernel: {meta['cpp_variant']}",
             f"- stock libraries: {_describe_caps(meta['stock_isa_caps'])}",
             f"- load average at start / end: {meta['load_average_start']} / {meta['load_average_end']}",
             f"- B={meta['batch']} C={meta['channels']}; >= {meta['repeats']} round-robin rounds; times = best / "
             "median over the rounds; never slower is judged on the median of the per-round ratios (the typical "
             "call), with allowance "
             f"{meta['noise_allowance']:.0%}; roofline targets at K >= "
             f"{meta['targets']['roofline_min_k']}: fwd {meta['targets']['fwd_fraction_of_fma_peak']:.0%}, "
             f"fwd+both grads {meta['targets']['fwdbwd_fraction_of_fma_peak']:.0%} of the FMA peak, judged on the "
             "best time over the run's best FMA probe; paired: the median over rounds of the round's GFLOP/s over "
             "the FMA peak probed in that round", "",
             "| R | K | layout | mode | fastconv ms best / median | backend | best stock | stock ms best / median | "
             "fastconv / best stock (median per round) | never slower | ratio of best times | GFLOP/s nominal | "
             "GFLOP/s inside the map | % FMA peak (inside, best time) | % FMA peak (paired per round) | roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = "" if r["fraction_of_fma_peak"] is None else f"{100 * r['fraction_of_fma_peak']:.1f}"
        paired = "" if r["fraction_of_fma_peak_paired"] is None else f"{100 * r['fraction_of_fma_peak_paired']:.1f}"
        lines.append(f"| {r['R']} | {r['K']} | {r['layout']} | {r['mode']} | {r['fastconv_ms']:.3f} / "
                     f"{r['fastconv_median_ms']:.3f} | {r['fastconv_backend']} | {r['best_stock']} | "
                     f"{r[r['best_stock'] + '_ms']:.3f} / {r[r['best_stock'] + '_median_ms']:.3f} | "
                     f"{r['ratio_vs_best_stock']:.2f} | {r['never_slower']} | {r['ratio_of_best_times']:.2f} | "
                     f"{r['gflops']:.1f} | "
                     f"{r['gflops_inside']:.1f} | {frac} | {paired} | "
                     f"{r['roofline']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
