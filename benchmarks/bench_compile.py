"""fastconv under torch.compile, measured side by side in one run (interleaved rounds, medians; not a test).

  (a) one layer, forward + both gradients (B=1, C=384, R=32 by default, the issue-14 configuration), per kernel
      size: fastconv eager, fastconv compiled (inductor; the graph holds fastconv's custom ops), and the stock
      nn.Conv2d compiled by inductor on the NCHW input and on a channels_last copy (conversion inside the compiled
      function, counted). GFLOP/s inside the map and the fraction of the FMA peak measured in the same run;
  (b) a training step (the model of ``bench_train.py``: a K = 31 RepLKNet at the kernel-family study's CPU size, 64 px,
      batch 64, cross-entropy, backward, AdamW): fastconv eager (``train()``'s CPU default), fastconv compiled, and
      the stock model (nn.Conv2d, channels_last) eager and compiled. The first step of each compiled variant
      (compilation) is reported apart.
Prints the CPU model, its ISA, its SGEMM rate and FMA peak measured in the same run (issue 14's roofline references).

    python benchmarks/bench_compile.py [--kernels 13 31] [--rounds 15] [--steps 6] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

LAYER_VARIANTS = ("fastconv_eager", "fastconv_compiled", "stock_compiled_nchw", "stock_compiled_cl")
#: (b)'s variants: (fastconv backend, the loop's speed levers, channels_last, compiled)
STEP_VARIANTS = {"fastconv_eager": (None, True, True, False), "fastconv_compiled": (None, True, True, True),
                 "stock_cl_eager": ("native", False, True, False), "stock_cl_compiled": ("native", False, True, True)}


def layer_steps(channels: int, k: int, device: str = "cpu"):
    """{variant: step()} for one depthwise layer, fwd + both gradients; each step returns its output."""
    import torch
    import torch.nn as nn

    import fastconv

    torch.manual_seed(0)
    fc = fastconv.DepthwiseConv2d(channels, k).to(device)
    stock = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels).to(device)
    stock.load_state_dict(fc.state_dict())
    stock_cl = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels).to(device)
    stock_cl.load_state_dict(fc.state_dict())
    fc_compiled = fastconv.DepthwiseConv2d(channels, k).to(device)
    fc_compiled.load_state_dict(fc.state_dict())
    cl = torch.channels_last
    fns = {"fastconv_eager": fc, "fastconv_compiled": torch.compile(fc_compiled, fullgraph=True),
           "stock_compiled_nchw": torch.compile(stock, fullgraph=True),
           "stock_compiled_cl": torch.compile(lambda t: stock_cl(t.contiguous(memory_format=cl)).contiguous(),
                                              fullgraph=True)}

    def step(fn, x):
        x = x.detach().requires_grad_()
        y = fn(x)
        y.backward(torch.ones_like(y))
        return y

    return {name: (lambda x, fn=fn: step(fn, x)) for name, fn in fns.items()}


def bench_layer(batch: int, channels: int, res: int, k: int, rounds: int, fma_peak: float | None,
                device: str = "cpu") -> dict:
    import torch

    from fastconv.roofline import depthwise_flops

    steps = layer_steps(channels, k, device)
    x = torch.randn(batch, channels, res, res, device=device)

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    ref = None
    first_s = {}
    for name, step in steps.items():  # compilation and autotuning, untimed; outputs checked against each other
        t0 = time.perf_counter()
        y = step(x)
        first_s[name] = round(time.perf_counter() - t0, 3)
        ref = y if ref is None else ref
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e} against fastconv eager"
        step(x)
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            # one untimed call first: each timed call follows a call of its own variant, not a stock call of 40-190
            # ms whose data evicted the caches (the variant timed after one measured 1.3-1.7x its time otherwise)
            steps[name](x)
            sync()
            t0 = time.perf_counter()
            steps[name](x)
            sync()
            times[name].append(time.perf_counter() - t0)
    inside = 3 * depthwise_flops(batch, channels, res, res, k, k)["inside"]  # forward, input and weight gradient
    out = {"k": k, "first_call_s": first_s, "ms_best": {}, "ms_median": {}, "ratio_to_fastconv_eager": {},
           "rounds_ms": {name: [round(t * 1e3, 6) for t in ts] for name, ts in times.items()}}
    base = times["fastconv_eager"]
    for name, ts in times.items():
        out["ms_best"][name] = round(min(ts) * 1e3, 3)
        out["ms_median"][name] = round(statistics.median(ts) * 1e3, 3)
        out["ratio_to_fastconv_eager"][name] = round(statistics.median(t / b for t, b in zip(ts, base)), 3)
    out["gflops_inside"] = {name: round(inside / min(ts) / 1e9, 1) for name, ts in times.items()}  # best times
    if fma_peak:
        out["fraction_of_fma_peak"] = {name: round(inside / min(ts) / 1e9 / fma_peak, 3) for name, ts in times.items()}
    return out


def bench_training(steps: int, batch_size: int, input_size: int) -> dict:
    from bench_train import BareTrainer, epoch_batches

    from erf_lab.train.data import build_data
    from erf_lab.train.recipe import Recipe

    recipe = Recipe(epochs=1, batch_size=batch_size, warmup_epochs=0.0)
    d = build_data("cue-world", input_size, train_size=batch_size * (steps + 1), val_size=16)
    batches, _ = epoch_batches(d.train, batch_size, steps + 1)
    trainers = {name: BareTrainer(b, recipe, levers=lev, channels_last=cl, compiled=comp)
                for name, (b, lev, cl, comp) in STEP_VARIANTS.items()}
    first_s = {name: round(t.step(*batches[0])[0], 2) for name, t in trainers.items()}  # compilation, autotune
    wall = {name: [] for name in trainers}
    for i, (x, y) in enumerate(batches[1:]):
        for name in (list(trainers) if i % 2 == 0 else list(trainers)[::-1]):
            wall[name].append(trainers[name].step(x, y)[0])
    base = wall["fastconv_eager"]
    return {"steps": steps, "batch_size": batch_size, "input_size": input_size, "first_step_s": first_s,
            "img_s": {n: round(batch_size / statistics.median(w), 1) for n, w in wall.items()},
            "ratio_to_fastconv_eager": {n: round(statistics.median(t / b for t, b in zip(w, base)), 3)
                                        for n, w in wall.items()}}


def markdown(r: dict) -> str:
    from fastconv.roofline import describe

    lines = [f"# fastconv under torch.compile ({r['time']})", "", f"{describe(r['machine'])} (same run).", "",
             f"## (a) one layer, forward + both gradients: B={r['batch']} C={r['channels']} R={r['res']}, "
             f"{r['rounds']} interleaved rounds (in each, every variant timed on its second call)", "",
             "| K | variant | ms best / median | time / fastconv eager (median per round) | GFLOP/s inside the map "
             "(best) | % FMA peak | first call s |",
             "|---|---|---|---|---|---|---|"]
    for row in r["layers"]:
        for name in LAYER_VARIANTS:
            frac = row.get("fraction_of_fma_peak", {}).get(name)
            lines.append(f"| {row['k']} | {name} | {row['ms_best'][name]} / {row['ms_median'][name]} | "
                         f"{row['ratio_to_fastconv_eager'][name]} | {row['gflops_inside'][name]} | "
                         f"{'-' if frac is None else f'{frac:.1%}'} | {row['first_call_s'][name]} |")
    t = r.get("training")
    if t:
        lines += ["", f"## (b) training step: the bench_train model, {t['input_size']} px, batch {t['batch_size']}, "
                  f"{t['steps']} steps per variant, interleaved", "",
                  "| variant | img/s | time / fastconv eager (median per step) | first step s (compile) |",
                  "|---|---|---|---|"]
        for name in STEP_VARIANTS:
            lines.append(f"| {name} | {t['img_s'][name]} | {t['ratio_to_fastconv_eager'][name]} | "
                         f"{t['first_step_s'][name]} |")
    lines += ["", "stock_compiled: what a compiled model with fastconv modules ran before fastconv's ops were "
              "registered (dynamo traced the stock F.conv2d). First call / step: compilation (inductor's on-disk "
              "cache may hold it from an earlier run) and, for fastconv, the autotuning of a new call signature.", "",
              f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, nargs="+", default=[13, 31])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=6, help="(b) timed training steps per variant; 0 skips (b)")
    ap.add_argument("--device", default="cpu", help="(a)'s device: cpu or cuda ((b) runs on the CPU)")
    ap.add_argument("--out", help="folder for compile_cpu.json / .md (default runs/bench_compile-<time>)")
    ap.add_argument("--name", default="compile_cpu")
    args = ap.parse_args(argv)
    # a folder in --name: refused before the run, not when its results are written at the end
    if args.name and (args.name != Path(args.name).name or args.name in ('.', '..')):
        ap.error(f"--name {args.name!r}: a file stem, not a path")

    from erf_lab.io import write_json, write_text
    import torch

    from fastconv.roofline import describe, machine_roofline, sgemm_gflops

    machine = machine_roofline(fma=True) if args.device == "cpu" else {
        "cpu_model": torch.cuda.get_device_name(args.device), "isa": "cuda", "threads": 1, "torch": torch.__version__,
        "sgemm_gflops": round(sgemm_gflops(args.device), 1), "fma_peak_gflops": None}
    print(describe(machine), flush=True)
    out = Path(args.out or ROOT / "runs" / f"bench_compile-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    r = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
         "batch": args.batch, "channels": args.channels, "res": args.res, "rounds": args.rounds, "layers": [],
         "command": "python benchmarks/bench_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for k in args.kernels:
        row = bench_layer(args.batch, args.channels, args.res, k, args.rounds, machine.get("fma_peak_gflops"),
                          args.device)
        r["layers"].append(row)
        print(f"K={k}: " + ", ".join(f"{n} {row['ms_median'][n]} ms" for n in LAYER_VARIANTS), flush=True)
    if args.steps > 0:
        r["training"] = bench_training(args.steps, 64, 64)
        print("training img/s: " + ", ".join(f"{n} {v}" for n, v in r["training"]["img_s"].items()), flush=True)
    write_json(out / f"{args.name}.json", r)
    write_text(out / f"{args.name}.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
