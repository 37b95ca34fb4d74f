"""Shape-bias pipeline throughput vs. the model's pure inference time on the same batches.

Side by side in one process, alternating, so machine load hits all alike:
  pure     — the preprocessed batches already in memory, only ``model(x)`` under ``torch.inference_mode``;
  pipeline — ``erf_lab.shape_bias.evaluate.run_set`` as a run after the first on the same images: pixels from the
             decoded-stimulus cache (filled by the warm-up run, in a temporary cache folder), normalization,
             inference, 16-class mapping, bookkeeping;
  decoding — the same with ``cache=False`` (a first run): every PNG decoded and resized first, in worker
             processes (``decode_all``), then inference.
Target: pipeline time within 15% of pure inference (overhead <= 1.15x); the decoding overhead is reported beside.

    python benchmarks/bench_shape_bias.py [--model efficientnet_lite0] [--images 256] [--batch-size 32]
                                          [--workers W] [--repeats 3] [--out runs/bench_shape_bias]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erf_lab.erf.prepare import keep_freed_memory  # noqa: E402
from fastconv.roofline import cpu_description  # noqa: E402
from erf_lab.io import write_json  # noqa: E402
from erf_lab.models import create_model  # noqa: E402
from erf_lab.provenance import versions  # noqa: E402
from erf_lab.shape_bias.evaluate import decode_workers, run_set  # noqa: E402
from erf_lab.shape_bias.stimuli import Preprocess, StimulusDataset, find_stimuli_root, list_stimuli  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--pretrained", action="store_true", default=True)
    ap.add_argument("--stimuli", default=None)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench_shape_bias")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as run_set on CPU, so that "pure" runs under the pipeline's allocator setting

    kwargs = {"pretrained": True} if args.model == "efficientnet_lite0" else {}
    model = create_model(args.model, **kwargs).eval()
    stim, _ = list_stimuli(find_stimuli_root(args.stimuli), args.images)
    pp = Preprocess.from_model(model)
    ds = StimulusDataset(stim, pp)
    xs = pp.normalize(torch.stack([ds[i][0] for i in range(len(ds))]))
    batches = list(xs.split(args.batch_size))
    workers = decode_workers() if args.workers is None else args.workers

    def pure() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(b)
        return time.perf_counter() - t

    def pipeline(cache: bool = True) -> float:
        t = time.perf_counter()
        run_set(model, "bench", stim, pp, batch_size=args.batch_size, workers=workers, show_progress=False,
                cache=cache)
        return time.perf_counter() - t

    user_cache, bench_cache = os.environ.get("ERF_LAB_CACHE"), tempfile.mkdtemp(prefix="bench_shape_bias_")
    os.environ["ERF_LAB_CACHE"] = bench_cache  # the user's cache stays as it was
    try:
        pure(); pipeline(); pipeline(cache=False)  # warm-up (allocator, worker start-up, oneDNN; fills the cache)
        t_pure, t_pipe, t_decode = [], [], []
        for _ in range(args.repeats):
            t_pure.append(pure())
            t_pipe.append(pipeline())
            t_decode.append(pipeline(cache=False))
    finally:
        shutil.rmtree(bench_cache, ignore_errors=True)
        if user_cache is None:
            os.environ.pop("ERF_LAB_CACHE", None)
        else:
            os.environ["ERF_LAB_CACHE"] = user_cache
    best_pure, best_pipe = min(t_pure), min(t_pipe)
    res = {"model": args.model, "images": len(stim), "batch_size": args.batch_size, "workers": workers,
           "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
           "pure_inference_s": t_pure, "pipeline_s": t_pipe,
           "pure_images_per_s": len(stim) / best_pure, "pipeline_images_per_s": len(stim) / best_pipe,
           "overhead_ratio_best": best_pipe / best_pure,
           "overhead_ratio_median": sorted(t_pipe)[len(t_pipe) // 2] / sorted(t_pure)[len(t_pure) // 2],
           "decoding_s": t_decode, "decoding_overhead_ratio_best": min(t_decode) / best_pure,
           "target_ratio": 1.15, "machine": cpu_description(), "versions": versions(), "command": sys.argv}
    cpu = res["machine"]
    print(f"{cpu['cpu_model']} ({cpu['isa']}, {cpu['cpu_count']} CPUs): "
          f"{args.model}: {len(stim)} images, batch {args.batch_size}, {workers} decode workers, "
          f"{torch.get_num_threads()} threads")
    print(f"  pure inference : {res['pure_images_per_s']:.1f} img/s  (runs {', '.join(f'{t:.2f}' for t in t_pure)} s)")
    print(f"  pipeline       : {res['pipeline_images_per_s']:.1f} img/s  (runs {', '.join(f'{t:.2f}' for t in t_pipe)} s)")
    print(f"  overhead       : {res['overhead_ratio_best']:.3f}x best, {res['overhead_ratio_median']:.3f}x median "
          f"(target <= 1.15x)")
    print(f"  first run (decoding, no cache): {len(stim) / min(t_decode):.1f} img/s, overhead "
          f"{res['decoding_overhead_ratio_best']:.3f}x best (runs {', '.join(f'{t:.2f}' for t in t_decode)} s)")
    out = Path(args.out)
    write_json(out / "results.json", res)
    write_json(out / "run.json", {"what": "benchmarks/bench_shape_bias.py", "command": sys.argv,
                                  "versions": res["versions"]})
    return res


if __name__ == "__main__":
    main()
