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

It also runs both algorithms in float64 on one image (224^2): there they must agree to ~1e-7, which shows that
the float32 difference is rounding (the fused model rounds differently), not a different measurement.

    python benchmarks/bench_erf.py [--images 6] [--size 448] [--batch-size 2] [--repeats 1] [--full] [--out DIR]
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


def official(weights: str, n: int, size: int, save: str, device: str = "cpu") -> None:
    """The official algorithm (visualize_erf.py) with this repo's train-time RepLKNet (CPU, or ``--device cuda``)."""
    import torch
    import torch.nn.functional as F
    from fastconv import revert_model

    from erf_lab.erf.images import load_images
    from erf_lab.models import create_model

    model = create_model(MODEL, weights=weights).to(device)
    revert_model(model)  # train-time, plain nn.Conv2d
    model.eval()  # fix BN and droppath
    optimizer = torch.optim.SGD(model.parameters(), lr=0, weight_decay=0)
    src = load_images(None, num_images=n, input_size=size)
    total, count = None, 0
    optimizer.zero_grad()
    for path in src.files:
        samples = src.load(path).unsqueeze(0).to(device)  # bicubic resize + ImageNet normalization, NCHW, batch 1
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


def float64_agreement(weights: str, size: int = 224, device: str = "cpu") -> dict:
    """Honest agreement: the same pipeline in float64, where rounding no longer hides a real difference.

    On one image at ``size``: our measurement (re-parameterized copy, channels_last, frozen weights, fastconv,
    captum) and the official algorithm on the train-time model, both in float64, against each other (the
    algorithmic difference), and the float32 official run against its float64 self (float32's own rounding
    floor) and ours in float32 against the float64 reference: the fused weights are the float32 roundings of the
    exact fused weights (forward features agree to ~5e-7 like the official's 4e-7), but a different rounding flips
    a few ReLU gradient masks, so the float32 maps differ by ~1e-3 relative where the official float32 differs
    from float64 by ~1e-5 (measured at 224^2 with the seeded weights)."""
    import torch
    import torch.nn.functional as F
    from fastconv import revert_model

    from erf_lab.erf.compute import compute_erf
    from erf_lab.erf.images import load_images
    from erf_lab.models import create_model

    src = load_images(None, num_images=1, input_size=size)
    x = src.load(src.files[0]).unsqueeze(0).to(device)

    def official_map(model, dtype):
        xs = x.to(dtype).requires_grad_(True)
        out = model.forward_features(xs)
        h, w = out.shape[2:]
        g = torch.autograd.grad(F.relu(out[:, :, h // 2, w // 2]).sum(), xs)[0]
        return F.relu(g).sum((0, 1)).double().cpu().numpy()

    train = create_model(MODEL, weights=weights).to(device).eval()
    revert_model(train)  # train-time, plain nn.Conv2d
    off32 = official_map(train, torch.float32)
    train = train.double()
    off64 = official_map(train, torch.float64)
    def ours_map(dtype):
        return compute_erf(create_model(MODEL, weights=weights).to(dtype), x.to(dtype), device=device,
                           inplace=True, show_progress=False).erf

    ours64, ours32 = ours_map(torch.float64), ours_map(torch.float32)

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    return {"size": size, "images": 1, "ours_f64_vs_official_f64_max_rel": rel(ours64, off64),
            "official_f32_vs_official_f64_max_rel": rel(off32, off64),
            "ours_f32_vs_official_f64_max_rel": rel(ours32, off64), "ours_f32_vs_official_f32_max_rel": rel(ours32, off32)}


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
    load = round(os.getloadavg()[0], 2)  # other processes on this (shared) machine skew a single run
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed ({code}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "loadavg_1m_before": load,
            "stdout": out[-300:]}


def _median_run(rs: list[dict]) -> dict:
    rs = sorted(rs, key=lambda r: r["wall_s"])
    return rs[len(rs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights")
    ap.add_argument("--save")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="process pairs, order alternated; medians reported")
    ap.add_argument("--no-f64-check", action="store_true", help="skip the float64 agreement check (1 image, 224^2)")
    ap.add_argument("--full", action="store_true", help="also run replknet_31b at 1024^2 (1 image) for peak RSS")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--out", help="folder for bench.json (default runs/bench_erf-<time>)")
    args = ap.parse_args()
    if args.official:
        official(args.weights, args.images, args.size, args.save, args.device)
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
                    "--out", str(tmp / "ours"), "--quiet", "--force", "--device", args.device]
        off_cmd = [py, __file__, "--official", "--weights", str(weights), "--images", str(args.images),
                   "--size", str(args.size), "--save", str(tmp / "official.npy"), "--device", args.device]
        # alternate the order each repeat (the machine's load drifts); medians per side
        runs = {"ours": [], "official": []}
        for i in range(args.repeats):
            for side in (("ours", "official") if i % 2 == 0 else ("official", "ours")):
                runs[side].append(run_measured(ours_cmd if side == "ours" else off_cmd))
                print(f"{side}: {runs[side][-1]['wall_s']} s", file=sys.stderr, flush=True)
        ours, off = _median_run(runs["ours"]), _median_run(runs["official"])
        a = np.load(tmp / "ours" / "erf.npy")
        b = np.load(tmp / "official.npy").astype(np.float64)
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        rel_fro = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        result = {
            "model": MODEL, "images": args.images, "input_size": args.size, "batch_size": args.batch_size,
            "erf_lab_compute": {k: v for k, v in ours.items() if k != "stdout"},
            "official_algorithm": {k: v for k, v in off.items() if k != "stdout"},
            "speedup": round(off["wall_s"] / ours["wall_s"], 2), "repeats": args.repeats,
            "wall_s_each": {k: [r["wall_s"] for r in v] for k, v in runs.items()},
            "loadavg_1m_before_each": {k: [r["loadavg_1m_before"] for r in v] for k, v in runs.items()},
            "max_rel_err": rel, "rel_frobenius_err": rel_fro,
            "device": args.device, "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        print(json.dumps(result, indent=2))
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")  # kept even if a check fails
        # float32 through ~50 layers of a randomly initialized net: fusing BN / branches (exact in real arithmetic)
        # changes rounding, which flips a few ReLU gradient masks (measured at 224^2 on one image: ours float32 vs
        # float64 reference 2.3e-3 max-relative, official float32 1.5e-5, ours vs official in float64 2.6e-15; see
        # float64_agreement, run below); hence a float32 tolerance here.
        assert rel < 1e-2 and rel_fro < 1e-3, f"matrices differ: max rel {rel:.3g}, Frobenius rel {rel_fro:.3g}"
        if not args.no_f64_check:
            result["float64_check"] = f64 = float64_agreement(str(weights), device=args.device)
            print(json.dumps({"float64_check": f64}, indent=2))
            # in float64 the two algorithms must agree to rounding (~1e-7 through ~50 layers): a real bug would not
            assert f64["ours_f64_vs_official_f64_max_rel"] < 1e-5, f64
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
