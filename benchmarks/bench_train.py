"""Training speed on this CPU, measured side by side in one run (alternating repeats, medians; not a test).

A K = 31 RepLKNet (replknet_31b at the kernel-family study's CPU size: channels (16, 32, 64, 128), layers
(1, 1, 1, 1), 10 classes) trained on cue-world at 64 px, batch 64; every variant sees the same batches: the
images the real loop's sampler picks for epoch 0, in its order, rendered once up front.
  (a) fastconv (default backend) vs ``fastconv.use(backend="native")``: img/s of a bare step (forward,
      cross-entropy with label smoothing, backward, AdamW step);
  (b) the training loop's overhead: img/s of ``erf_lab.train.loop.train`` (1 epoch, progress bar off, checkpoints
      and outputs as usual, whole call) vs the bare fastconv loop; goal <= 10 %. Its parts are timed once
      after the repeats: setup (scenes, model, epoch-0 checkpoint), rendering the training images, the
      end-of-epoch evaluation, checkpoints + resume state, the curves figure.
Wall time is the headline; process CPU time is reported beside it (on a shared machine other processes stretch
wall time but hardly this process's CPU time). Prints the CPU model, its ISA and its SGEMM rate measured in the
same run (the roofline reference of issue 14).

    python benchmarks/bench_train.py [--steps 8] [--batch-size 64] [--repeats 3] [--threads N] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "replknet_31b"
OVERRIDES = {"channels": (16, 32, 64, 128), "layers": (1, 1, 1, 1)}


def cpu_description() -> dict:
    """CPU model name and the widest SIMD ISA its flags announce (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = next((i for i in ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd") if i in flags), "unknown")
    return {"cpu_model": model, "isa": isa, "cpu_count": os.cpu_count()}


def epoch_batches(train_set, batch_size: int, steps: int, seed: int = 0):
    """The loop's epoch-0 batches: DistributedSampler(shuffle, seed, one replica) order, rendered once.
    Returns (raw batches [(x in [0, 1], y)], seconds spent rendering)."""
    import torch

    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=seed,
                                                  drop_last=True)
    sampler.set_epoch(0)
    order = list(sampler)[: steps * batch_size]
    t0 = time.perf_counter()
    items = [train_set[i] for i in order]
    render_s = time.perf_counter() - t0
    batches = [(torch.stack([x for x, _ in items[s:s + batch_size]]),
                torch.tensor([y for _, y in items[s:s + batch_size]]))
               for s in range(0, len(items), batch_size)]
    return batches, render_s


def bare_loop(batches, backend: str | None, recipe, seed: int = 0, warmup: int = 0) -> tuple[float, float]:
    """(wall, process CPU) seconds of forward / backward / AdamW step over ``batches`` (normalized, as the loop feeds them) on a
    fresh model; ``warmup`` extra steps first, untimed (fastconv's autotune, first-call allocations)."""
    import torch.nn.functional as F

    import fastconv
    from erf_lab.erf.images import model_mean_std
    from erf_lab.train.loop import build_model
    from erf_lab.train.recipe import build_optimizer

    net = build_model(MODEL, OVERRIDES, 10, 0.0, seed)
    opt = build_optimizer(net, recipe)
    mean, std = (torch_view(v) for v in model_mean_std(net))
    data = [((x - mean) / std, y) for x, y in batches]
    net.train()
    with fastconv.use(backend=backend) if backend else contextlib.nullcontext():
        def step(x, y):
            loss = F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for x, y in data[:warmup]:
            step(x, y)
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in data:
            step(x, y)
        return time.perf_counter() - t0, time.process_time() - c0


def torch_view(v):
    import torch

    return torch.tensor(v).view(1, 3, 1, 1)


def real_loop(out: Path, recipe, train_size: int, val_size: int, input_size: int) -> tuple[float, float, dict]:
    """(wall, process CPU) seconds of one whole ``train(...)`` call (1 epoch) and its metrics row."""
    from erf_lab.train.loop import train

    t0, c0 = time.perf_counter(), time.process_time()
    res = train(MODEL, "cue-world", out=out, overrides=dict(OVERRIDES), recipe=recipe, input_size=input_size,
                train_size=train_size, val_size=val_size, show_progress=False, force=True)
    return time.perf_counter() - t0, time.process_time() - c0, res["rows"][-1]


def loop_components(tmp: Path, recipe, train_size: int, val_size: int, input_size: int, render_s: float) -> dict:
    """Seconds of the loop's non-step parts, each timed on its own (one epoch's worth)."""
    import torch

    from erf_lab.erf.images import model_mean_std
    from erf_lab.train import checkpoints as C
    from erf_lab.train.data import build_data
    from erf_lab.train.loop import build_model, evaluate, plot_curves
    from erf_lab.train.recipe import build_optimizer

    t0 = time.perf_counter()
    d = build_data("cue-world", input_size, train_size=train_size, val_size=val_size)
    net = build_model(MODEL, OVERRIDES, len(d.classes), 0.0, 0)
    opt = build_optimizer(net, recipe)
    C.save_weights(net.state_dict(), tmp / "checkpoints" / "epoch_000", "both")
    setup = time.perf_counter() - t0
    mean, std = (torch_view(v) for v in model_mean_std(net))
    t0 = time.perf_counter()
    evaluate(net, d.val, batch_size=max(recipe.batch_size, 64), device="cpu", mean=mean, std=std)
    ev = time.perf_counter() - t0
    t0 = time.perf_counter()
    for stem in ("checkpoints/epoch_001", "model"):
        C.save_weights(net.state_dict(), tmp / stem, "both")
    C.save_state(tmp, {"model": net.state_dict(), "optimizer": opt.state_dict(), "rng": [C.rng_state()]})
    ckpt = time.perf_counter() - t0
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5}
    t0 = time.perf_counter()
    plot_curves([row], tmp / "curves")
    curves = time.perf_counter() - t0
    return {"setup_s": setup, "render_train_images_s": render_s, "evaluation_s": ev,
            "checkpoints_and_state_s": ckpt, "curves_figure_s": curves}


def markdown(r: dict) -> str:
    a, b, m = r["a_fastconv_vs_native"], r["b_loop_overhead"], r["machine"]
    comp = b["components_s"]
    lines = [f"# Training throughput ({r['time']})", "",
             f"{m['cpu_model']} ({m['isa']}), {m['threads']} threads, SGEMM {m['sgemm_gflops']:.1f} GFLOP/s "
             f"(same run), load {m['loadavg_1m_before']} before / {m['loadavg_1m_after']} after; torch {m['torch']}.", "",
             f"{MODEL} {OVERRIDES['channels']} x {OVERRIDES['layers']}, {r['input_size']} px, batch "
             f"{r['batch_size']}, {r['steps']} steps per variant, {r['repeats']} alternating repeats (medians).", "",
             "| measurement | img/s | ratio |", "|---|---|---|",
             f"| (a) bare step, fastconv (default) | {a['fastconv_img_s']:.1f} | {a['speedup']:.2f}x native "
             f"({a['speedup_cpu_time']:.2f}x in CPU time) |",
             f"| (a) bare step, native backend | {a['native_img_s']:.1f} | 1 |",
             f"| (b) bare loop (fastconv) | {b['bare_img_s']:.1f} | 1 |",
             f"| (b) `train()` whole call (1 epoch) | {b['loop_img_s']:.1f} | overhead {b['overhead_pct']:.1f} % "
             f"({b['overhead_pct_cpu_time']:.1f} % in CPU time) |",
             f"| (b) `train()` train phase (its metrics.csv img/s) | {b['loop_train_phase_img_s']:.1f} | overhead "
             f"{b['train_phase_overhead_pct']:.1f} % |", "",
             "Loop time beyond the bare loop, per part (timed separately): " +
             ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f} s" for k, v in comp.items()) +
             f"; sum {sum(comp.values()):.2f} s vs measured extra {b['extra_s']:.2f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per variant (one epoch of the loop)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--val-size", type=int, default=128, help="the loop's end-of-epoch validation images")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the variants, order rotated; medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or all CPUs)")
    ap.add_argument("--out", help="folder for bench_train.json / .md (default runs/bench_train-<time>)")
    args = ap.parse_args(argv)

    import torch

    from erf_lab.io import atomic_path, write_json
    from erf_lab.train.data import build_data
    from erf_lab.train.recipe import Recipe
    from fastconv.bench import sgemm_gflops

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    out = Path(args.out or ROOT / "runs" / f"bench_train-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    B, steps = args.batch_size, args.steps
    train_size = B * steps
    recipe = Recipe(epochs=1, batch_size=B, warmup_epochs=0.0)
    machine = {**cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "loadavg_1m_before": round(os.getloadavg()[0], 2), "sgemm_gflops": sgemm_gflops(torch.device("cpu"))}
    print(f"{machine['cpu_model']} ({machine['isa']}), {threads} threads, SGEMM {machine['sgemm_gflops']:.1f} "
          f"GFLOP/s, load {machine['loadavg_1m_before']}", flush=True)

    d = build_data("cue-world", args.input_size, train_size=train_size, val_size=args.val_size)
    batches, render_s = epoch_batches(d.train, B, steps)
    for backend in (None, "native"):  # fastconv's autotune and the C++ build happen here, untimed
        bare_loop(batches[:1], backend, recipe, warmup=1)

    wall = {"fastconv": [], "native": [], "loop": []}
    cpu = {k: [] for k in wall}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants = list(wall)
        for i in range(args.repeats):
            for v in variants[i % 3:] + variants[:i % 3]:  # each variant in each position across 3 repeats
                if v == "loop":
                    s, c, row = real_loop(tmp / "run", recipe, train_size, args.val_size, args.input_size)
                    rows.append(row)
                else:
                    s, c = bare_loop(batches, None if v == "fastconv" else "native", recipe)
                wall[v].append(s)
                cpu[v].append(c)
                print(f"repeat {i + 1}: {v} {s:.2f} s wall, {c:.2f} s CPU ({train_size / s:.1f} img/s)", flush=True)
        comp = loop_components(tmp / "parts", recipe, train_size, args.val_size, args.input_size, render_s)

    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    ips = {k: train_size / v for k, v in med.items()}
    phase_ips = statistics.median(r["img_per_s"] for r in rows)
    result = {
        "model": MODEL, "overrides": {k: list(v) for k, v in OVERRIDES.items()}, "input_size": args.input_size,
        "batch_size": B, "steps": steps, "train_images": train_size, "val_images": args.val_size,
        "repeats": args.repeats, "machine": {**machine, "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "wall_s_each": {k: [round(s, 3) for s in v] for k, v in wall.items()},
        "cpu_s_each": {k: [round(s, 3) for s in v] for k, v in cpu.items()},
        "a_fastconv_vs_native": {"fastconv_img_s": ips["fastconv"], "native_img_s": ips["native"],
                                 "speedup": med["native"] / med["fastconv"],
                                 "speedup_cpu_time": cmed["native"] / cmed["fastconv"]},
        "b_loop_overhead": {"bare_img_s": ips["fastconv"], "loop_img_s": ips["loop"],
                            "overhead_pct": 100 * (med["loop"] / med["fastconv"] - 1),
                            "overhead_pct_cpu_time": 100 * (cmed["loop"] / cmed["fastconv"] - 1),
                            "extra_s": med["loop"] - med["fastconv"],
                            "loop_train_phase_img_s": phase_ips,
                            "train_phase_overhead_pct": 100 * (ips["fastconv"] / phase_ips - 1),
                            "components_s": {k: round(v, 3) for k, v in comp.items()}, "goal_pct": 10},
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    write_json(out / "bench_train.json", result)
    with atomic_path(out / "bench_train.md") as tmp:
        tmp.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'bench_train.json'}, {out / 'bench_train.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
