"""Training speed on this CPU, measured side by side in one run (alternating repeats, medians; not a test).

A K = 31 RepLKNet (replknet_31b at the kernel-family study's CPU size: channels (16, 32, 64, 128), layers
(1, 1, 1, 1), 10 classes) trained on cue-world at 64 px, batch 64; every variant sees the same batches: the
images the real loop's sampler picks for epoch 0, in its order, rendered once up front.
  (a) fastconv (default backend) vs ``fastconv.use(backend="native")``: img/s of a bare step (forward,
      cross-entropy with label smoothing, backward, AdamW step), the models stepping in turn on each batch:
      ``train()``'s CPU default (``speed_levers``: small depthwise convs through fastconv, channels_last), the
      default before them (NCHW, only K > 5 through fastconv), and stock PyTorch in NCHW and in channels_last;
  (b) the training loop's overhead: img/s of ``erf_lab.train.loop.train`` (1 epoch, progress bar off, checkpoints
      and outputs as usual, whole call) vs a bare fastconv loop run step by step beside it (from the loop's
      ``on_step``, timed and subtracted); goal <= 10 %. The loop's other parts are timed once after the repeats:
      setup (scenes, model, epoch-0 checkpoint), rendering the training images, the end-of-epoch evaluation,
      checkpoints + resume state, the curves figure.
Interleaving step by step makes the load of a shared machine hit both sides of each ratio alike; ratios are
medians over repeats of each repeat's ratio. Wall time is the headline, process CPU time is reported beside it.
Prints the CPU model, its ISA and its SGEMM rate measured in the same run (the roofline reference of issue 14).

    python benchmarks/bench_train.py [--steps 8] [--batch-size 64] [--repeats 2] [--threads N] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "replknet_31b"
OVERRIDES = {"channels": (16, 32, 64, 128), "layers": (1, 1, 1, 1)}


def render_seconds(train_set, batches) -> float:
    """Seconds to render this epoch's training images on the fly in one process (what a run without the cache, or
    a ``--resample`` epoch, spends drawing)."""
    from erf_lab.train.cue_world import render_scene

    n = sum(len(y) for _, y in batches)
    t0 = time.perf_counter()
    for i in range(n):
        render_scene(train_set.scene(i), train_set.input_size)
    return time.perf_counter() - t0


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


class BareTrainer:
    """A bare training step on a fresh model: forward, cross-entropy with label smoothing, backward, AdamW step,
    under ``fastconv.use(backend=backend)`` (None: fastconv's default); inputs normalized as the loop does.
    ``levers``: the loop's ``speed_levers`` (small depthwise convs through fastconv) with ``channels_last``;
    without them, the model as built (only K > 5 depthwise convs are fastconv modules)."""

    def __init__(self, backend: str | None, recipe, seed: int = 0, levers: bool = True, channels_last: bool = True,
                 compiled: bool = False):
        import fastconv
        from erf_lab.erf.images import model_mean_std
        from erf_lab.train.loop import build_model, speed_levers
        from erf_lab.train.recipe import build_optimizer

        self.backend, self.recipe, self.channels_last = backend, recipe, channels_last
        self.net = build_model(MODEL, OVERRIDES, 10, 0.0, seed).train()
        if levers:
            speed_levers(self.net, channels_last)
        elif channels_last:
            self.net.to(memory_format=torch_channels_last())
        self.opt = build_optimizer(self.net, recipe)
        self.mean, self.std = (torch_view(v) for v in model_mean_std(self.net))
        if compiled:  # torch.compile (inductor); the stock model compiled is the one with nn.Conv2d modules
            import torch

            if backend == "native":
                fastconv.revert_model(self.net)
            self.forward = torch.compile(self.net)
        else:
            self.forward = self.net

    def step(self, x, y) -> tuple[float, float]:
        """(wall, process CPU) seconds of one step on the raw batch ``x`` in [0, 1]."""
        import torch.nn.functional as F

        import fastconv

        t0, c0 = time.perf_counter(), time.process_time()
        with fastconv.use(backend=self.backend) if self.backend else contextlib.nullcontext():
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch_channels_last())
            loss = F.cross_entropy(self.forward(x), y, label_smoothing=self.recipe.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def torch_view(v):
    import torch

    return torch.tensor(v).view(1, 3, 1, 1)


def torch_channels_last():
    import torch

    return torch.channels_last


#: (a)'s variants: (fastconv backend, the loop's speed levers, channels_last)
VARIANTS = {"fastconv": (None, True, True),  # train()'s default on the CPU
            "fastconv_nchw_large_only": (None, False, False),  # train()'s default before the levers
            "native": ("native", False, False),  # stock PyTorch, NCHW
            "native_cl": ("native", False, True)}  # stock PyTorch, channels_last


def compare_backends(batches, recipe, first: int = 0) -> dict:
    """(a): the ``VARIANTS`` stepping in turn on every batch (order reversed every other step, so the load of a
    shared machine hits all alike); {variant: [wall s, CPU s]} summed over the batches."""
    trainers = {k: BareTrainer(b, recipe, levers=lev, channels_last=cl) for k, (b, lev, cl) in VARIANTS.items()}
    total = {k: [0.0, 0.0] for k in trainers}
    for i, (x, y) in enumerate(batches):
        for k in (list(trainers) if (i + first) % 2 == 0 else list(trainers)[::-1]):
            w, c = trainers[k].step(x, y)
            total[k][0] += w
            total[k][1] += c
    return total


def loop_vs_bare(out: Path, batches, recipe, train_size: int, val_size: int, input_size: int) -> dict:
    """(b): one whole ``train(...)`` call (1 epoch); after each of its steps (``on_step``) a bare fastconv step on
    the same batch, timed and subtracted from the loop's time, so both see the same moment's load.
    {"loop": [wall, CPU], "bare": [wall, CPU], "loop_train_phase_s": the loop's epoch time (its metrics.csv
    img/s) less the bare steps}."""
    from erf_lab.train.loop import train

    bare = BareTrainer(None, recipe)
    spent = [0.0, 0.0]

    def on_step(epoch, step):
        w, c = bare.step(*batches[step - 1])
        spent[0] += w
        spent[1] += c

    t0, c0 = time.perf_counter(), time.process_time()
    res = train(MODEL, "cue-world", out=out, overrides=dict(OVERRIDES), recipe=recipe, input_size=input_size,
                train_size=train_size, val_size=val_size, show_progress=False, force=True, on_step=on_step)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    epoch_s = train_size / res["rows"][-1]["img_per_s"]
    return {"loop": [wall - spent[0], cpu - spent[1]], "bare": spent, "loop_train_phase_s": epoch_s - spent[0]}


def loop_components(tmp: Path, recipe, train_size: int, val_size: int, input_size: int) -> dict:
    """Seconds of the loop's non-step parts, each timed on its own (one epoch's worth)."""
    from erf_lab.erf.images import model_mean_std
    from erf_lab.train import checkpoints as C
    from erf_lab.train.data import build_data
    from erf_lab.train.loop import build_model, evaluate, plot_curves, speed_levers
    from erf_lab.train.recipe import build_optimizer

    t0 = time.perf_counter()
    d = build_data("cue-world", input_size, train_size=train_size, val_size=val_size)
    net = speed_levers(build_model(MODEL, OVERRIDES, len(d.classes), 0.0, 0), channels_last=True)  # as train()'s
    opt = build_optimizer(net, recipe)
    C.save_weights(net.state_dict(), tmp / "checkpoints" / "epoch_000", "both")
    setup = time.perf_counter() - t0
    mean, std = (torch_view(v) for v in model_mean_std(net))
    t0 = time.perf_counter()
    evaluate(net, d.val, batch_size=max(recipe.batch_size, 64), device="cpu", mean=mean, std=std, channels_last=True)
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
    return {"setup_s": setup, "evaluation_s": ev,
            "checkpoints_and_state_s": ckpt, "curves_figure_s": curves}


def markdown(r: dict) -> str:
    from fastconv.roofline import describe

    a, b, m = r["a_fastconv_vs_native"], r["b_loop_overhead"], r["machine"]
    comp, world = b["components_s"], b["cue_world_rendering_s"]
    per_epoch = comp["evaluation_s"] + comp["checkpoints_and_state_s"]
    lines = [f"# Training throughput ({r['time']})", "",
             f"{describe(m)} (same run); load {m['loadavg_1m_before']} before / {m['loadavg_1m_after']} after.", "",
             f"{MODEL} {OVERRIDES['channels']} x {OVERRIDES['layers']}, {r['input_size']} px, batch "
             f"{r['batch_size']}, {r['steps']} steps per variant, interleaved step by step, {r['repeats']} repeats "
             f"(medians).", "",
             "| measurement | img/s | ratio |", "|---|---|---|",
             f"| (a) bare step, fastconv, `train()`'s default (small depthwise convs through fastconv, "
             f"channels_last) | {a['fastconv_img_s']:.1f} | {a['speedup']:.2f}x native "
             f"({a['speedup_cpu_time']:.2f}x in CPU time); {a['speedup_vs_best_native']:.2f}x the faster native |",
             f"| (a) bare step, fastconv, NCHW, only K > 5 through fastconv (the default before) | "
             f"{a['fastconv_nchw_large_only_img_s']:.1f} | {a['speedup_nchw_large_only']:.2f}x native |",
             f"| (a) bare step, native backend, NCHW | {a['native_img_s']:.1f} | 1 |",
             f"| (a) bare step, native backend, channels_last | {a['native_cl_img_s']:.1f} | "
             f"{a['speedup_native_cl']:.2f}x native |",
             f"| (b) bare loop (fastconv) | {b['bare_img_s']:.1f} | 1 |",
             f"| (b) `train()` train phase (its metrics.csv img/s) | {b['loop_train_phase_img_s']:.1f} | overhead "
             f"**{b['train_phase_overhead_pct']:.1f} %** (goal <= {b['goal_pct']} %) |",
             f"| (b) `train()` whole call (1 epoch: setup, train, validation, checkpoints, curves) | "
             f"{b['loop_img_s']:.1f} | overhead {b['overhead_pct']:.1f} % ({b['overhead_pct_cpu_time']:.1f} % in "
             f"CPU time) |", "",
             "Loop time beyond the bare loop, per part (timed separately): per epoch: validation "
             f"({r['val_images']} images) {comp['evaluation_s']:.2f} s, checkpoints and resume state "
             f"{comp['checkpoints_and_state_s']:.2f} s (together {per_epoch:.2f} s); once per run: setup "
             f"{comp['setup_s']:.2f} s, curves figure {comp['curves_figure_s']:.2f} s. "
             f"Whole-call extra measured: {b['extra_s']:.2f} s.", "",
             f"cue-world images come from the on-disk cache (float32, bit-identical to rendering): the first run on "
             f"a machine renders both splits once ({world['render_and_cache_both_splits_s']:.2f} s here, in worker "
             f"processes); rendering this epoch's {r['train_images']} training images on the fly in one process "
             f"would cost {world['render_train_epoch_on_the_fly_s']:.2f} s (the `--resample` case).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per variant (one epoch of the loop)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--val-size", type=int, default=128, help="the loop's end-of-epoch validation images")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (a) and (b), order alternated; medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or all CPUs)")
    ap.add_argument("--out", help="folder for bench_train.json / .md (default runs/bench_train-<time>)")
    args = ap.parse_args(argv)

    import torch

    from erf_lab.io import atomic_path, write_json
    from erf_lab.train.data import build_data
    from erf_lab.train.recipe import Recipe
    from fastconv.roofline import describe, machine_roofline

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    from erf_lab.erf.prepare import keep_freed_memory

    keep_freed_memory()  # as train() on CPU: every side of every ratio runs under the same allocator setting
    out = Path(args.out or ROOT / "runs" / f"bench_train-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    B, steps = args.batch_size, args.steps
    train_size = B * steps
    recipe = Recipe(epochs=1, batch_size=B, warmup_epochs=0.0)
    machine = {**machine_roofline(fma=True), "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    print(f"{describe(machine)}, load {machine['loadavg_1m_before']}", flush=True)

    t0 = time.perf_counter()
    d = build_data("cue-world", args.input_size, train_size=train_size, val_size=args.val_size)
    world_s = time.perf_counter() - t0  # the first run on a machine renders both splits into the cache
    batches, _ = epoch_batches(d.train, B, steps)
    render_s = render_seconds(d.train, batches)
    compare_backends(batches[:2], recipe)  # warm-up, untimed: fastconv's autotune and C++ build, first calls

    runs = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.repeats):
            for part in ("a", "b") if i % 2 == 0 else ("b", "a"):
                if part == "a":
                    r = compare_backends(batches, recipe, first=i)
                else:
                    r = loop_vs_bare(tmp / "run", batches, recipe, train_size, args.val_size, args.input_size)
                runs[part].append(r)
                print(f"repeat {i + 1} ({part}): " + ", ".join(f"{k} {v[0]:.2f} s wall / {v[1]:.2f} s CPU"
                                                             for k, v in r.items() if isinstance(v, list)), flush=True)
        comp = loop_components(tmp / "parts", recipe, train_size, args.val_size, args.input_size)
    first_run = {"render_and_cache_both_splits_s": round(world_s, 3), "render_train_epoch_on_the_fly_s":
                 round(render_s, 3)}

    def med(part, key, j=0):
        return statistics.median(r[key][j] if j is not None else r[key] for r in runs[part])

    def ratio(part, num, den, j=0):
        return statistics.median(r[num][j] / r[den][j] for r in runs[part])

    a_w = {k: med("a", k) for k in VARIANTS}
    b_w = {k: med("b", k) for k in ("loop", "bare")}
    phase = med("b", "loop_train_phase_s", None)
    result = {
        "model": MODEL, "overrides": {k: list(v) for k, v in OVERRIDES.items()}, "input_size": args.input_size,
        "batch_size": B, "steps": steps, "train_images": train_size, "val_images": args.val_size,
        "repeats": args.repeats, "machine": {**machine, "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "runs": runs,
        # ratios: median over repeats of each repeat's ratio (both sides of a repeat ran interleaved)
        "a_fastconv_vs_native": {**{f"{k}_img_s": train_size / a_w[k] for k in VARIANTS},
                                 "speedup": ratio("a", "native", "fastconv"),
                                 "speedup_cpu_time": ratio("a", "native", "fastconv", 1),
                                 "speedup_vs_best_native": statistics.median(
                                     min(r["native"][0], r["native_cl"][0]) / r["fastconv"][0] for r in runs["a"]),
                                 "speedup_nchw_large_only": ratio("a", "native", "fastconv_nchw_large_only"),
                                 "speedup_native_cl": ratio("a", "native", "native_cl")},
        "b_loop_overhead": {"bare_img_s": train_size / b_w["bare"], "loop_img_s": train_size / b_w["loop"],
                            "overhead_pct": 100 * (ratio("b", "loop", "bare") - 1),
                            "overhead_pct_cpu_time": 100 * (ratio("b", "loop", "bare", 1) - 1),
                            "extra_s": b_w["loop"] - b_w["bare"],
                            "loop_train_phase_img_s": train_size / phase,
                            "train_phase_overhead_pct": 100 * (statistics.median(
                                r["loop_train_phase_s"] / r["bare"][0] for r in runs["b"]) - 1),
                            "components_s": {k: round(v, 3) for k, v in comp.items()}, "goal_pct": 10,
                            "cue_world_rendering_s": first_run},
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
