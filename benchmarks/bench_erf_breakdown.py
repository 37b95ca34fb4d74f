"""Where the time of one ``erf-lab compute`` image goes, against this machine's roofline (issue 14).

The default job's work (RepLKNet-31B, random init, re-parameterized, channels_last, fastconv; forward + the input
gradient of the centre output, as ``compute_erf`` runs it, in its auto batch) per image, in four parts:
  pointwise convs  the 1x1 convolutions (oneDNN), forward and input gradient;
  other convs      the stem's and the transitions' dense and 3x3 depthwise convolutions (oneDNN);
  depthwise        fastconv's large depthwise convolutions (its C++ kernel), forward and input gradient;
  elementwise      ReLU, GELU, residual adds and their gradients: no FLOPs, memory-bound passes.
First the plain call, best of ``--repeats`` (the number ``erf-lab compute`` reports), then one call timed per
operation (a TorchDispatchMode around each aten op; fastconv's own calls timed around its backend functions), which
adds its own overhead between the operations, not inside them: each part is the sum of its operations' times, as a
share of the plain call, the rest of which is Python and autograd. FLOPs as
``erf-lab compute`` counts them (2 x output elements x input channels per group x kernel taps, per pass; the
depthwise part's % of SGEMM on these nominal FLOPs, its % of the FMA peak on the products inside the maps, which
its kernel computes); the
elementwise passes' bytes are their tensors' sizes (inputs + outputs). The SGEMM rate and FMA peak are measured in
the same run. It prints and writes ``benchmarks/results/<--name>.{json,md}``; how far the parts are from 80 % of
SGEMM over the whole call says what would have to change to reach the target. Not a test: the machine is noisy.
The depthwise part is what fastconv's backend functions run (``_fwd``, ``_grad_input``, ``_grad_weight``): the
default job's dispatch (its C++ kernel, no weight gradient); a call fastconv hands to the stock convolution would
count as "other convs".

Usage: python benchmarks/bench_erf_breakdown.py [--size 1024] [--batch-size B] [--repeats 3] [--name NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = Path(__file__).resolve().parent / "results"

import fastconv.backends as fb  # noqa: E402
from fastconv import roofline  # noqa: E402

PARTS = ("pointwise convs", "other convs", "depthwise", "elementwise", "other ops")


def _conv_flops(func, args, out) -> tuple[str, int]:
    """(part, FLOPs) of an aten convolution or convolution_backward call (only the gradients it computes)."""
    if func is torch.ops.aten.convolution.default:
        w, groups, y = args[1], args[8], out
        passes = 1
    else:  # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
        #                        output_padding, groups, output_mask)
        y, w, groups, mask = args[0], args[2], args[9], args[10]
        passes = int(bool(mask[0])) + int(bool(mask[1]))
    part = "pointwise convs" if tuple(w.shape[-2:]) == (1, 1) and groups == 1 else "other convs"
    return part, passes * 2 * y.numel() * w.shape[1] * w.shape[2] * w.shape[3]


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class PartTimer(TorchDispatchMode):
    """Seconds, FLOPs and bytes per part; aten ops run inside fastconv's backends count as depthwise."""

    def __init__(self):
        super().__init__()
        self.seconds, self.flops, self.bytes, self.calls = (defaultdict(float), defaultdict(int), defaultdict(int),
                                                             defaultdict(int))
        self.in_fastconv = 0
        self.inside = 0  # depthwise FLOPs on products inside the maps (fastconv skips the zero padding's)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        if self.in_fastconv:
            return out
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            part, flops = _conv_flops(func, args, out)
            self.flops[part] += flops
        elif torch.Tag.pointwise in func.tags:
            part = "elementwise"
            self.bytes[part] += _nbytes(args) + _nbytes(out)
        else:
            part = "other ops"
        self.seconds[part] += dt
        self.calls[part] += 1
        return out

    def around(self, fn, flops_of):
        """``fn`` (a fastconv backend function) timed as depthwise, with its FLOPs ``flops_of(*args)``."""
        def timed(*args, **kwargs):
            self.in_fastconv += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_fastconv -= 1
                if not self.in_fastconv:
                    self.seconds["depthwise"] += time.perf_counter() - t0
                    flops = flops_of(*args, **kwargs)
                    self.flops["depthwise"] += flops["nominal"]
                    self.inside += flops["inside"]
                    self.calls["depthwise"] += 1
        return timed


def _dw_flops(x, w) -> dict:
    """{"nominal", "inside"} FLOPs of one depthwise pass over ``x`` with kernel ``w`` (a tensor, or its (KH, KW))."""
    return roofline.depthwise_flops(*x.shape, *(w.shape[-2:] if isinstance(w, torch.Tensor) else w))


def time_parts(erf, x) -> tuple[float, PartTimer]:
    """(seconds, its PartTimer) of one ``erf.attribute(x)`` with every aten op and fastconv backend call timed."""
    timer = PartTimer()
    saved = fb._fwd, fb._grad_input, fb._grad_weight
    fb._fwd = timer.around(saved[0], lambda backend, x, w, b: _dw_flops(x, w))
    fb._grad_input = timer.around(saved[1], lambda backend, g, w: _dw_flops(g, w))
    fb._grad_weight = timer.around(saved[2], lambda backend, x, g, kh, kw: _dw_flops(x, (kh, kw)))
    try:
        t0 = time.perf_counter()
        with timer:
            erf.attribute(x)
        return time.perf_counter() - t0, timer
    finally:
        fb._fwd, fb._grad_input, fb._grad_weight = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="input size (default 1024, the default job's)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per pass (default: erf-lab compute's auto batch for 8 images at --size)")
    ap.add_argument("--repeats", type=int, default=3, help="plain calls after two warm-up calls (best reported)")
    ap.add_argument("--name", default="", help="write benchmarks/results/<name>.{json,md} ('' = print only)")
    args = ap.parse_args()
    # a folder in --name: refused before the run, not when its results are written at the end
    if args.name and (args.name != Path(args.name).name or args.name in ('.', '..')):
        ap.error(f"--name {args.name!r}: a file stem, not a path")

    from erf_lab.erf.attribution import EffectiveReceptiveField
    from erf_lab.erf.prepare import conv_settings, keep_freed_memory, prepare_model
    from erf_lab.erf.runner import auto_batch_size
    from erf_lab.models import create_model

    keep_freed_memory()
    torch.manual_seed(0)
    model, _ = prepare_model(create_model("replknet_31b"), channels_last=True, conv_backend="fastconv")
    erf = EffectiveReceptiveField(model)
    batch = args.batch_size or auto_batch_size(args.size, 8)
    x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    # the best SGEMM rate known for this CPU, threads and torch (what erf-lab compute divides by), then this run's
    # probes at its start and end: a slow phase of the host lowers a probe, so the rates are the better of the two
    machine = roofline.machine_roofline(fma=False, cache=True)
    best_known = machine["sgemm_gflops"]
    threads = torch.get_num_threads()
    probes = {"sgemm": [roofline.sgemm_gflops("cpu")], "fma": [roofline.fma_peak_gflops(threads)]}
    with conv_settings("fastconv", torch.device("cpu")):
        for _ in range(2):
            erf.attribute(x)
        plain = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            erf.attribute(x)
            plain.append(time.perf_counter() - t0)
        time_parts(erf, x)  # the first call under the mode pays one-time costs: the second is reported
        instrumented, timer = time_parts(erf, x)
    probes["sgemm"].append(roofline.sgemm_gflops("cpu"))
    probes["fma"].append(roofline.fma_peak_gflops(threads))
    plain = [t / batch for t in plain]  # per image from here on
    instrumented /= batch
    best = min(plain)
    # each part's time is measured around its own calls; the rest of the plain call (Python, autograd, the
    # selector and the maps' copy) is what is left of it
    timer.seconds["rest of the call"] = max(0.0, best * batch - sum(timer.seconds.values()))
    sgemm = round(max(probes["sgemm"]), 1)
    fma = round(max(probes["fma"]), 1) if None not in probes["fma"] else None
    total_flops = sum(timer.flops.values()) / batch
    rows = []
    for part in (*PARTS, "rest of the call"):
        s = timer.seconds.get(part, 0.0) / batch
        f, b = timer.flops.get(part, 0) / batch, timer.bytes.get(part, 0) / batch
        fi = timer.inside / batch if part == "depthwise" else f  # the kernel's own work: products inside the maps
        rows.append({"part": part, "calls": timer.calls.get(part, 0), "seconds": round(s, 4),
                     "share": round(s / best, 4), "gflop": round(f / 1e9, 2),
                     "gflops_per_s": round(f / s / 1e9, 1) if f and s else None,
                     "pct_of_sgemm": round(100 * f / s / 1e9 / sgemm, 1) if f and s else None,
                     "pct_of_fma_peak": round(100 * fi / s / 1e9 / fma, 1) if fi and s and fma else None,
                     "gb_per_s": round(b / s / 1e9, 1) if b and s else None})
    budget = total_flops / (0.8 * sgemm * 1e9)
    flop_parts = sum(r["seconds"] for r in rows if r["gflop"])
    data = {
        "machine": {k: machine[k] for k in ("cpu_model", "isa", "cpu_count", "threads", "torch")},
        "sgemm_gflops": sgemm, "fma_peak_gflops": fma,
        "probes": {k: [None if v is None else round(v, 1) for v in vs] for k, vs in probes.items()},
        "size": args.size, "batch_size": batch,
        "model": "replknet_31b (random init, re-parameterized, channels_last, fastconv)",
        "plain_seconds": [round(t, 3) for t in plain], "best_seconds": round(best, 3),
        "instrumented_seconds": round(instrumented, 3), "gflop_per_image": round(total_flops / 1e9, 1),
        "pct_of_sgemm": round(100 * total_flops / best / 1e9 / sgemm, 1), "best_known_sgemm_gflops": best_known,
        "pct_of_best_known_sgemm": round(100 * total_flops / best / 1e9 / best_known, 1),
        "seconds_for_80pct": round(budget, 3), "seconds_of_the_flop_parts": round(flop_parts, 3), "parts": rows,
    }
    lines = [f"# Where an `erf-lab compute` image goes (`python benchmarks/bench_erf_breakdown.py --size {args.size}"
             + (f" --name {args.name}`)" if args.name else "`)"), "",
             f"- machine: {machine['cpu_model']} ({machine['isa']}), {machine['threads']} threads, torch "
             f"{machine['torch']}: SGEMM {sgemm} GFLOP/s, FMA peak {fma} GFLOP/s (the better of this run's probes at "
             f"its start and end: SGEMM {', '.join(f'{v:.0f}' for v in probes['sgemm'])}, FMA "
             f"{', '.join('-' if v is None else f'{v:.0f}' for v in probes['fma'])})",
             f"- RepLKNet-31B (random init, re-parameterized, channels_last, fastconv) at {args.size} px, {batch} "
             f"image(s) per pass, per image: {data['gflop_per_image']} GFLOP (forward + input gradient); plain calls "
             f"{', '.join(f'{t:.2f}' for t in plain)} s, best {best:.2f} s = **{data['pct_of_sgemm']} % of SGEMM** "
             f"({data['pct_of_best_known_sgemm']} % of the best rate known on this machine, {best_known} GFLOP/s, "
             f"which `erf-lab compute` divides by)",
             f"- 80 % of SGEMM needs <= {budget:.2f} s; the parts with FLOPs alone take {flop_parts:.2f} s",
             f"- parts: each timed around its own operations in a second, instrumented call ({instrumented:.2f} s "
             f"with the timing's overhead); shares of the best plain call, whose rest is Python, autograd and the "
             f"maps' copy; depthwise: % SGEMM on its nominal FLOPs (the zero padding's products included, as "
             f"`erf-lab compute` counts them), % FMA peak on the products inside the maps (what its kernel computes)",
             "",
             "| part | calls | s per image | share | GFLOP | GFLOP/s | % SGEMM | % FMA peak | GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["part"], r["calls"], f"{r['seconds']:.3f}", f"{100 * r['share']:.1f} %", r["gflop"] or "",
                 r["gflops_per_s"] or "", r["pct_of_sgemm"] or "", r["pct_of_fma_peak"] or "", r["gb_per_s"] or ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.name:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
        (RESULTS / f"{args.name}.md").write_text(text)
        print(f"wrote {RESULTS / args.name}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
