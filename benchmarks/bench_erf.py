"""Speed benchmark of ``erf-lab compute`` against the official ERF algorithm (not a timed test).

Both sides run as whole processes on the same images and the same weights file (replknet_31b, seeded random
init, non-trivial BN statistics):
  * ``erf-lab compute`` (re-parameterized, channels_last, frozen weights, batching, fastconv);
  * ``--official``: a faithful re-implementation of DingXiaoH/RepLKNet-pytorch ``erf/visualize_erf.py``:
    train-time model (large + small kernel branches, BN), NCHW, batch 1, parameters requiring grad (an SGD
    optimizer over them, zero_grad per image), ``torch.autograd.grad`` of the ReLU'd centre sum, ReLU, sum over
    (batch, RGB), NaN check, AverageMeter mean, ``np.save``.
It asserts the same matrix (relative error), reports the wall-time ratio and each process's peak RSS, and
(``--full``) checks that full-size replknet_31b at 1024^2 fits in 24 GB.

    python benchmarks/bench_erf.py [--images 6] [--size 448] [--batch-size 2] [--full] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "replknet_31b"


def official(weights: str, n: int, size: int, save: str) -> None:
    """The official algorithm (visualize_erf.py), on CPU, with this repo's train-time RepLKNet."""
    import torch
    import torch.nn.functional as F

    from erf_lab.erf.images import load_images
    from erf_lab.models import create_model

    model = create_model(MODEL, weights=weights, conv_backend="native")  # train-time form, plain nn.Conv2d
    model.eval()  # fix BN and droppath
    optimizer = torch.optim.SGD(model.parameters(), lr=0, weight_decay=0)
    src = load_images(None, num_images=n, input_size=size)
    total, count = None, 0
    optimizer.zero_grad()
    for path in src.files:
        samples = src.load(path).unsqueeze(0)  # bicubic resize + ImageNet normalization, NCHW, batch 1
        samples.requires_grad = True
        optimizer.zero_grad()
        outputs = model.forward_features(samples)
        h, w = outputs.shape[2:]
        central_point = F.relu(outputs[:, :, h // 2, w // 2]).sum()
        grad = torch.autograd.grad(central_point, samples)[0]
        grad = F.relu(grad)
        grad_map = grad.sum((0, 1)).cpu().numpy()
        if np.isnan(np.sum(grad_map)):
            continue
        total = grad_map if total is None else total + grad_map  # AverageMeter: sum += val * 1
        count += 1
    np.save(save, total / count)


def make_weights(path: Path) -> None:
    import torch

    from erf_lab.models import create_model

    torch.manual_seed(0)
    m = create_model(MODEL)
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    torch.save(m.state_dict(), path)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed ({code}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "stdout": out[-300:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights")
    ap.add_argument("--save")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also run replknet_31b at 1024^2 (1 image) for peak RSS")
    ap.add_argument("--out", help="folder for bench.json (default runs/bench_erf-<time>)")
    args = ap.parse_args()
    if args.official:
        official(args.weights, args.images, args.size, args.save)
        return 0

    out = Path(args.out or ROOT / "runs" / f"bench_erf-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "replknet_31b_seed0.pth"
        make_weights(weights)
        ours_cmd = [py, "-m", "erf_lab", "compute", "--model", MODEL, "--weights", str(weights), "--num-images",
                    str(args.images), "--input-size", str(args.size), "--batch-size", str(args.batch_size),
                    "--out", str(tmp / "ours"), "--quiet"]
        off_cmd = [py, __file__, "--official", "--weights", str(weights), "--images", str(args.images),
                   "--size", str(args.size), "--save", str(tmp / "official.npy")]
        ours = run_measured(ours_cmd)
        off = run_measured(off_cmd)
        a = np.load(tmp / "ours" / "erf.npy")
        b = np.load(tmp / "official.npy").astype(np.float64)
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        rel_fro = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        result = {
            "model": MODEL, "images": args.images, "input_size": args.size, "batch_size": args.batch_size,
            "erf_lab_compute": {k: v for k, v in ours.items() if k != "stdout"},
            "official_algorithm": {k: v for k, v in off.items() if k != "stdout"},
            "speedup": round(off["wall_s"] / ours["wall_s"], 2), "max_rel_err": rel, "rel_frobenius_err": rel_fro,
            "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        print(json.dumps(result, indent=2))
        # float32 through ~50 layers of a randomly initialized net: fusing BN / branches (exact in real arithmetic)
        # changes rounding (measured: 2.3e-3 max-relative in float32, 7.6e-8 in float64, at 224^2 on one image);
        # hence a float32 tolerance here.
        assert rel < 1e-2 and rel_fro < 1e-3, f"matrices differ: max rel {rel:.3g}, Frobenius rel {rel_fro:.3g}"
        if args.full:
            full = run_measured([py, "-m", "erf_lab", "compute", "--model", MODEL, "--weights", str(weights),
                                 "--num-images", "1", "--input-size", "1024", "--out", str(tmp / "full"), "--quiet"])
            result["full_1024"] = {k: v for k, v in full.items() if k != "stdout"}
            print(json.dumps(result["full_1024"]))
            assert full["peak_rss_gib"] < 24, "replknet_31b at 1024^2 exceeds 24 GB"
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
