"""Fixed cost of an ``erf-lab compute`` process and the roofline fraction of its measurement (not a timed test).

1. Fixed cost: ``python -m erf_lab compute --model replknet_31b --num-images 1 --input-size 64`` as a whole process,
   ``--repeats`` times; fixed cost = process wall time - the measurement (forward + input gradient of the one
   image). Each child runs through a phase timer (``--child``) that wraps the stages of a run (imports, model build,
   layer probe, preparation, the measurement, metrics, figures) so the report says where the fixed time goes.
   ``--compare PATH`` times another checkout (e.g. the code before a change) the same way, interleaved.
2. Roofline: ``erf-lab compute`` at ``--roofline-size`` for replknet_31b and a small model; their run.json
   ``flops_per_image``, ``compute_seconds_per_image``, ``achieved_gflops`` and ``roofline_fraction`` (against the
   SGEMM rate cached by ``fastconv.roofline``), and the fraction against an SGEMM rate measured in this run.

    python benchmarks/bench_process_cost.py [--repeats 3] [--size 64] [--roofline-size 224] [--roofline-images N]
        [--small-model resnet18] [--compare /path/to/old/checkout] [--out benchmarks/results]

Writes ``erf_cpu.json`` and ``erf_cpu.md`` in ``--out``. The machine is often shared: the load average is recorded
before every process, and minima are reported beside medians (a busy core inflates a run, never shortens it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- child: one erf-lab compute process with its stages timed ---------------------------------------------------
def child(argv: list[str]) -> int:
    t_start = time.perf_counter()
    stats: dict[str, float] = {}

    def timed(label, f):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                stats[label] = stats.get(label, 0.0) + time.perf_counter() - t
        return g

    def patch(mod, attr, label, also=()):
        g = timed(label, getattr(mod, attr))
        for m in (mod, *also):
            if hasattr(m, attr):
                setattr(m, attr, g)

    import erf_lab.cli.main as cli  # no torch yet

    getattr(cli, "configure_process", lambda: None)()  # what the console script does before main()
    t = time.perf_counter()
    import torch
    stats["import torch"] = time.perf_counter() - t
    t = time.perf_counter()
    import erf_lab.erf.attribution as A
    import erf_lab.erf.compute as C
    import erf_lab.erf.plotting as PL
    import erf_lab.erf.rundir as RD
    import erf_lab.erf.runner as R
    import erf_lab.models as M
    stats["import erf_lab (cli, runner)"] = time.perf_counter() - t

    patch(M, "create_model", "model build (create_model)", [R])
    patch(R, "layer_geometry", "layer probe (layer_geometry)")
    patch(C, "prepare_model", "preparation (re-parameterization, fastconv, channels_last)")
    patch(RD, "write_run_dir", "run dir (erf.npy, metrics, figures, run.json)", [R])
    patch(PL, "plot_erf", "  figures (plot_erf)", [RD])
    patch(A.TruncatedForward, "forward", "measurement: forward")
    patch(torch.autograd, "grad", "measurement: input gradient")
    t = time.perf_counter()
    code = cli.main(argv)
    stats["main()"] = time.perf_counter() - t
    stats["python (after interpreter start)"] = time.perf_counter() - t_start
    print("PHASES " + json.dumps(stats), file=sys.stderr)
    # the console script's own exit (without the interpreter's teardown); a checkout from before exit_now exits
    # the way its console script did
    getattr(cli, "exit_now", sys.exit)(code)


# --- parent --------------------------------------------------------------------------------------------------------
def run_child(tree: Path, compute_args: list[str], cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "ERF_LAB_CACHE": str(cache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an install keeps its bytecode caches (set here: 0.16 s per process)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--", *compute_args],
                       env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    phases = json.loads(next(ln for ln in p.stderr.splitlines() if ln.startswith("PHASES "))[7:])
    measure = phases.get("measurement: forward", 0.0) + phases.get("measurement: input gradient", 0.0)
    return {"wall_s": round(wall, 3), "measurement_s": round(measure, 3), "fixed_s": round(wall - measure, 3),
            "loadavg_1m_before": round(load, 2), "phases": {k: round(v, 3) for k, v in phases.items()
                                                            if not k.startswith("_")}}


def summarize(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["fixed_s"])
    return {"fixed_s_min": best["fixed_s"], "fixed_s_median": round(statistics.median(r["fixed_s"] for r in runs), 3),
            "wall_s_min": min(r["wall_s"] for r in runs), "measurement_s_of_best": best["measurement_s"],
            "loadavg_1m_before_each": [r["loadavg_1m_before"] for r in runs],
            "fixed_s_each": [r["fixed_s"] for r in runs], "phases_of_best": best["phases"]}


def roofline_images(folder: Path, size: int, images: int | None) -> tuple[Path, int]:
    """A folder of ``images`` images (default: two auto batches at ``size`` on this CPU, so that the steady second
    batch is what the roofline reports: the first is warm-up), the built-in set repeated under new names where it
    has fewer."""
    from erf_lab.erf.images import default_images_dir, list_image_files
    from erf_lab.erf.runner import AUTO_BATCH_MAX, auto_batch_size

    n = images or 2 * auto_batch_size(size, AUTO_BATCH_MAX, "cpu")
    src = list_image_files(default_images_dir())[0]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = src[i % len(src)]
        (folder / f"{i:03d}_{f.name}").write_bytes(f.read_bytes())
    return folder, n


def roofline_run(model: str, size: int, images: int | None, out: Path) -> dict:
    folder, images = roofline_images(out.parent / "roofline-images", size, images)
    cmd = [sys.executable, "-m", "erf_lab", "compute", "--model", model, "--images", str(folder), "--num-images",
           str(images), "--input-size", str(size), "--out", str(out), "--quiet", "--force"]
    load = os.getloadavg()[0]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    info = json.loads((out / "run.json").read_text())
    keys = ("flops_per_image", "compute_seconds_per_image", "achieved_gflops", "sgemm_gflops", "roofline_fraction",
            "seconds_per_image", "wall_seconds")
    return {"model": model, "input_size": size, "images": images, "loadavg_1m_before": round(load, 2),
            **{k: info.get(k) for k in keys}}


def main() -> int:
    if "--child" in sys.argv:
        return child(sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="replknet_31b")
    ap.add_argument("--size", type=int, default=64, help="input size of the fixed-cost runs (default 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", help="another checkout to time the same way (e.g. before a change)")
    ap.add_argument("--compare-label", default="compare", help="its column name in the report")
    ap.add_argument("--roofline-size", type=int, default=224)
    ap.add_argument("--roofline-images", type=int, default=None,
                    help="images of each roofline run (default: two auto batches; the first is warm-up, left out)")
    ap.add_argument("--small-model", default="resnet18")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from fastconv.roofline import describe, machine_roofline, sgemm_gflops

    machine = machine_roofline(fma=True, cache=True)  # the machine line (FMA peak included)
    used = machine_roofline(fma=False, cache=True)  # the entry erf-lab compute's run.json uses
    fresh = [round(sgemm_gflops("cpu"), 1)]
    print(describe(machine) + f" (cached); SGEMM used by erf-lab compute (cached) {used['sgemm_gflops']}, "
          f"measured now {fresh[0]} GFLOP/s", flush=True)
    trees = {"this checkout": ROOT, **({args.compare_label: Path(args.compare).resolve()} if args.compare else {})}
    runs: dict[str, list] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cargs = ["compute", "--model", args.model, "--num-images", "1", "--input-size", str(args.size),
                 "--out", str(tmp / "fixed"), "--quiet", "--force"]
        first = {}
        for i in range(-1, args.repeats):  # i = -1: the first process, with an empty erf-lab cache (no FLOP count)
            for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
                r = run_child(trees[name], cargs, tmp / f"cache-{name.replace(' ', '_')}")
                (runs[name] if i >= 0 else first.setdefault(name, [])).append(r)
                print(f"{name}{' (first, empty cache)' if i < 0 else ''}: wall {r['wall_s']} s, measurement "
                      f"{r['measurement_s']} s, fixed {r['fixed_s']} s (load {r['loadavg_1m_before']})", flush=True)
        roof = []
        if not args.no_roofline:
            for model in (args.model, args.small_model):
                roof.append(roofline_run(model, args.roofline_size, args.roofline_images, tmp / f"roof-{model}"))
                print(json.dumps(roof[-1]), flush=True)
    fresh.append(round(sgemm_gflops("cpu"), 1))
    ref = max(fresh + [machine["sgemm_gflops"], used["sgemm_gflops"]])  # load only ever lowers a measurement
    for r in roof:
        r["roofline_fraction_vs_best_sgemm"] = (round(r["achieved_gflops"] / ref, 5)
                                                if r.get("achieved_gflops") else None)
    result = {"machine": describe(machine), "machine_roofline": machine, "sgemm_gflops_measured_now": fresh,
              "sgemm_gflops_used_by_compute": used["sgemm_gflops"], "sgemm_gflops_best": ref,
              "model": args.model, "input_size": args.size, "repeats": args.repeats,
              "fixed_cost": {k: {**summarize(v), "first_process_fixed_s": first[k][0]["fixed_s"],
                                 "first_process_measurement_s": first[k][0]["measurement_s"]}
                             for k, v in runs.items()},
              "compare_tree": str(Path(args.compare).resolve()) if args.compare else None, "roofline": roof,
              "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_process_cost.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "erf_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "erf_cpu.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'erf_cpu.json'} and {out / 'erf_cpu.md'}")
    return 0


def markdown(r: dict) -> str:
    lines = [f"# erf-lab compute: fixed cost per process and roofline ({r['time']})", "",
             f"{r['machine']} (cached by fastconv.roofline); SGEMM cached for erf-lab compute: "
             f"{r['sgemm_gflops_used_by_compute']} GFLOP/s; measured in this run: "
             f"{', '.join(str(x) for x in r['sgemm_gflops_measured_now'])} GFLOP/s; best: {r['sgemm_gflops_best']} "
             "(a busy core lowers SGEMM, never raises it).", "",
             f"## Fixed cost: `erf-lab compute --model {r['model']} --num-images 1 --input-size {r['input_size']}`", "",
             f"{r['repeats']} processes per checkout after a first one (the first starts with an empty erf-lab "
             "cache: it counts the FLOPs), interleaved; fixed = process wall time - measurement (forward + input "
             "gradient of the image, in the timed code's first call). Phases of the run with the smallest fixed "
             "cost.", ""]
    names = list(r["fixed_cost"])
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for key in ("fixed_s_min", "fixed_s_median", "wall_s_min", "measurement_s_of_best", "first_process_fixed_s",
                "first_process_measurement_s"):
        lines.append(f"| {key} | " + " | ".join(str(r["fixed_cost"][n][key]) for n in names) + " |")
    lines.append("| load (1 min) before each | " + " | ".join(
        ", ".join(str(x) for x in r["fixed_cost"][n]["loadavg_1m_before_each"]) for n in names) + " |")
    phases = list(dict.fromkeys(k for n in names for k in r["fixed_cost"][n]["phases_of_best"]))
    for k in phases:
        lines.append(f"| {k} | " + " | ".join(str(r["fixed_cost"][n]["phases_of_best"].get(k, "-")) for n in names)
                     + " |")
    if r["roofline"]:
        lines += ["", "## Roofline of the measurement", "",
                  "| model | input | images | GFLOP per image | s per image | GFLOP/s | SGEMM (cached) | fraction "
                  "(run.json) | fraction vs best SGEMM | load before |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["roofline"]:
            lines.append(f"| {x['model']} | {x['input_size']} | {x['images']} | {x['flops_per_image'] / 1e9:.3f} | "
                         f"{x['compute_seconds_per_image']} | {x['achieved_gflops']} | {x['sgemm_gflops']} | "
                         f"{x['roofline_fraction']} | {x['roofline_fraction_vs_best_sgemm']} | "
                         f"{x['loadavg_1m_before']} |")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
