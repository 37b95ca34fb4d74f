"""How close an ERF measurement runs to the machine's roofline: its FLOPs per image and the SGEMM rate.

- :func:`counting_flops`: ``torch.utils.flop_counter.FlopCounterMode`` around one real batch of the measurement
  (forward to the measured layer + input gradient; frozen weights, so no weight gradients), with fastconv's
  depthwise convolutions counted by hand, whichever backend runs them (its C++, oneDNN, FFT and Triton kernels are
  invisible to FlopCounterMode, which sees only ATen convolutions, and its autotuning trials must not count):
  ``2 * out.numel() * KH * KW`` for the forward and as much again for the input gradient, the numbers
  FlopCounterMode gives the same convolution through ``F.conv2d``.
- :func:`sgemm_reference`: the fp32 matrix-multiply rate of the device that runs the measurement
  (``fastconv.roofline``: on the CPU the better of ``torch.mm`` and a 1x1 convolution, the best rate measured for
  this CPU / threads / torch, kept in fastconv's cache dir; on CUDA ``torch.mm``, measured once per process).

``roofline_fraction = flops_per_image / compute_seconds_per_image / sgemm``: the fraction of the SGEMM rate that the
model's FLOPs reach. 1.0 would mean every FLOP ran at GEMM speed; the depthwise convolutions do not run through the
GEMM library (and the small ones are memory-bound), so a RepLKNet stays below it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

_sgemm_memo: dict = {}


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker: its per-module hooks break captum's ``autograd.grad`` on
    a leaf input, and only the global count is used here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _without_dynamo_import(mode_cls) -> None:
    """torch wraps every TorchDispatchMode's ``__torch_dispatch__`` in ``torch._disable_dynamo``, which imports
    ``torch._dynamo`` at the first call (2.7 s on a 2-core CPU, sympy included) only to make the mode opaque to
    ``torch.compile``. Nothing here is compiled, so when dynamo is not loaded yet, the mode's own function is
    cached as its "disabled" form (the slot ``_disable_dynamo`` fills on first use); other torch versions are
    left as they are."""
    import sys

    wrapper = mode_cls.__dict__.get("__torch_dispatch__")
    raw = getattr(wrapper, "__wrapped__", None)
    if "torch._dynamo" not in sys.modules and callable(raw) and getattr(raw, "__dynamo_disable", None) is None:
        raw.__dynamo_disable = raw


@contextlib.contextmanager
def counting_flops(model: nn.Module):
    """``with counting_flops(m) as total: ...run the batch...``; ``total()`` is the FLOPs counted so far (multiply-
    add = 2 FLOPs), forward and backward; ``total.padding()`` the part of them that fastconv's depthwise convs
    spend on products with the zero padding (``fastconv.roofline.depthwise_flops``: ``nominal - inside``):
    avoidable work, which fastconv's C++ kernel skips and its other backends (oneDNN, F.conv2d, Triton) do."""
    import fastconv
    from torch.utils.flop_counter import FlopCounterMode

    from torch.utils import flop_counter

    _without_dynamo_import(getattr(flop_counter, "_FlopCounterMode", type(None)))
    fc = FlopCounterMode(display=False)
    if hasattr(fc, "mod_tracker"):
        fc.mod_tracker = _NoModuleTracking()
    from fastconv import flops_counted_by_caller
    from fastconv.roofline import depthwise_flops

    extra, padding = [0], [0]
    before: dict = {}

    def pre(mod, args):
        before[id(mod)] = fc.get_total_flops()

    def post(mod, args, out):
        # whatever ATen counted inside the call (F.conv2d, or the trial runs of fastconv's autotuning) is
        # replaced by the convolution's own count; its gradient is counted here unless autograd will run it
        # through ATen's convolution_backward (the native backend), which FlopCounterMode counts itself
        extra[0] -= fc.get_total_flops() - before.pop(id(mod), 0)
        x, w = args[0], mod.weight
        macs = out.numel() * w.shape[-2] * w.shape[-1] * w.shape[1]
        aten_backward = out.grad_fn is not None and "Convolution" in type(out.grad_fn).__name__
        passes = 1 + (0 if aten_backward else bool(x.requires_grad) + bool(w.requires_grad))  # fwd, dx, dw
        extra[0] += 2 * macs * passes
        if out.grad_fn is not None and not aten_backward:
            # fastconv's own backward node, counted above: what ATen counts inside it (a backend built on F.conv2d,
            # channels_last) is taken out again
            mark = [0]
            out.grad_fn.register_prehook(lambda grad_outputs: mark.__setitem__(0, fc.get_total_flops()))
            out.grad_fn.register_hook(
                lambda grad_inputs, grad_outputs: extra.__setitem__(0, extra[0] - (fc.get_total_flops() - mark[0])))
        kh, kw = w.shape[-2:]
        if tuple(mod.stride) == (1, 1) and kh % 2 and kw % 2:  # 'same': the products with the zero padding
            f = depthwise_flops(out.shape[0], out.shape[1], out.shape[-2], out.shape[-1], kh, kw)
            padding[0] += (f["nominal"] - f["inside"]) * (1 + bool(x.requires_grad) + bool(w.requires_grad))

    handles = []
    for mod in model.modules():
        if isinstance(mod, fastconv.DepthwiseConv2d):
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        # fastconv's kernels run as in any other pass (its default under FlopCounterMode is the stock op, which the
        # mode counts): the hooks above put each call's own count in place of what the mode sees
        with fc, flops_counted_by_caller():
            def total():
                return fc.get_total_flops() + extra[0]

            total.padding = lambda: padding[0]  # of those, the depthwise products with the zero padding
            yield total
    finally:
        for h in handles:
            h.remove()


FLOPS_CACHE = "erf_flops.json"


def flops_key(model: nn.Module, layer: str, input_hw) -> str:
    """What the FLOPs of a measurement depend on: the prepared model's structure
    (:func:`erf_lab.erf.structure_cache.structure_key`: weights do not count), the layer and the input size."""
    from erf_lab.erf.structure_cache import structure_key

    return structure_key(model, "flops", layer, list(input_hw))


def cached_flops(key: str) -> tuple[int, int] | None:
    """(FLOPs, padding FLOPs) per image counted by an earlier run for ``key`` (``<erf-lab cache>/erf_flops.json``),
    else None."""
    from erf_lab.erf.structure_cache import cached

    v = cached(FLOPS_CACHE, key)
    if isinstance(v, dict) and all(type(v.get(k)) is int and v[k] >= 0 for k in ("flops", "padding")):
        return v["flops"], v["padding"]
    return None


def store_flops(key: str, flops: int, padding: int) -> None:
    """Remember the FLOPs and padding FLOPs per image for ``key`` (one atomic rewrite of the table; a cache that
    cannot be written is skipped)."""
    from erf_lab.erf.structure_cache import store

    store(FLOPS_CACHE, key, {"flops": int(flops), "padding": int(padding)})


def sgemm_reference(device) -> dict:
    """{"sgemm_gflops", "sgemm_device", "cpu_model", "isa", "threads"} for ``device`` (the fp32 GEMM rate the
    roofline fraction is taken against)."""
    from fastconv.roofline import cpu_description, machine_roofline, sgemm_gflops

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index not in _sgemm_memo:
            _sgemm_memo[index] = round(sgemm_gflops(torch.device("cuda", index)), 1)
        cpu = cpu_description()
        return {"sgemm_gflops": _sgemm_memo[index], "sgemm_device": torch.cuda.get_device_name(index),
                "cpu_model": cpu["cpu_model"], "isa": cpu["isa"], "threads": torch.get_num_threads()}
    r = machine_roofline(fma=False, cache=True)  # the best rate known for this CPU, threads and torch
    return {"sgemm_gflops": r["sgemm_gflops"], "sgemm_device": "cpu",
            "cpu_model": r["cpu_model"], "isa": r["isa"], "threads": r["threads"]}


def recheck_reference(ref: dict | None, flops_per_image: int | None, padding_flops_per_image: int | None,
                      batches: list) -> dict | None:
    """``ref`` (from :func:`sgemm_reference`), probed again on the CPU when this run's steady rate of work done
    (the FLOPs without the padding products that fastconv's C++ kernel skips) came out above it: that only says
    the cached SGEMM rate was measured while the machine was busier (a shared host's speed changes by 2x within an
    hour). The new probe is merged into the cache, which keeps the best rate, so the reference can only rise;
    ``reprobed`` marks it. At most one probe per run (the caller asks after the first steady batch and at the end);
    a probe that fails keeps ``ref`` with a warning. A fraction still above 1 is reported as measured."""
    sec = steady_seconds_per_image(batches)
    if (not ref or ref.get("sgemm_device") != "cpu" or ref.get("reprobed") or not flops_per_image or not sec
            or not ref.get("sgemm_gflops")):
        return ref
    if (flops_per_image - (padding_flops_per_image or 0)) / sec / 1e9 <= ref["sgemm_gflops"]:
        return ref
    from fastconv.roofline import remeasure_sgemm

    try:
        fresh = remeasure_sgemm()["sgemm_gflops"]
    except (RuntimeError, OSError) as e:
        import warnings

        warnings.warn(f"SGEMM rate not probed again ({type(e).__name__}: {e})", stacklevel=2)
        return {**ref, "reprobed": True}
    return {**ref, "sgemm_gflops": max(ref["sgemm_gflops"], fresh), "reprobed": True}


def fraction_note(fields: dict, tf32: bool | None = None) -> str | None:
    """What a roofline fraction above 1 means (it is no bound then), from run.json's roofline ``fields``; None when
    both fractions are at most 1 (or missing)."""
    nominal, done = fields.get("roofline_fraction"), fields.get("roofline_fraction_without_padding")
    if done is None:
        done = nominal
    if done is not None and done > 1:
        if fields.get("sgemm_device") == "cpu":
            why = ("the rate was probed while the machine ran slower than during this measurement (probed again "
                   "after the first steady batch: a shared machine's speed changes)")
        elif tf32:
            why = "TF32 was allowed in this run, and the probe multiplies in full fp32"
        else:
            why = "the probe ran while the GPU was slower than during this measurement"
        return f"above 100 % of the SGEMM rate, which is no bound here: {why}"
    if nominal is not None and nominal > 1:
        return (f"above 100 % only in the nominal count, which includes the depthwise products with the zero padding "
                f"that fastconv's C++ kernel skips; the work done reaches {100 * done:.1f} % of the SGEMM rate")
    return None


def steady_seconds_per_image(batches: list) -> float | None:
    """Compute seconds per image from ``[(images, seconds), ...]`` of the batches run in this process. The first
    batch of each size is warm-up (first calls, the kernel choice for its shapes, FLOP counting) and is left out
    where a later batch repeats a size (CUDA's auto batch runs 1, then B, B, ..., and a shorter last one); with no
    size repeated, the first batch alone is left out when later ones exist."""
    seen: set = set()
    use = []
    for images, seconds in batches:
        if images in seen:
            use.append((images, seconds))
        seen.add(images)
    if not use:
        use = batches[1:] if len(batches) > 1 else batches
    n = sum(b[0] for b in use)
    return sum(b[1] for b in use) / n if n else None


def roofline_numbers(flops_per_image: int | None, seconds_per_image: float | None,
                     sgemm_gflops: float | None) -> dict:
    """{"achieved_gflops", "roofline_fraction"} (None where an input is missing)."""
    if not flops_per_image or not seconds_per_image or seconds_per_image <= 0:
        return {"achieved_gflops": None, "roofline_fraction": None}
    achieved = flops_per_image / seconds_per_image / 1e9
    return {"achieved_gflops": float(f"{achieved:.4g}"),
            "roofline_fraction": float(f"{achieved / sgemm_gflops:.4g}") if sgemm_gflops else None}


def postfix(flops_per_image: int | None, seconds_per_image: float | None, sgemm_gflops: float | None) -> str:
    """The progress-bar text: ``"12.3 GFLOP/s, 4.5% of SGEMM"``."""
    r = roofline_numbers(flops_per_image, seconds_per_image, sgemm_gflops)
    if r["achieved_gflops"] is None:
        return ""
    pct = f", {100 * r['roofline_fraction']:.1f}% of SGEMM" if r["roofline_fraction"] is not None else ""
    return f"{r['achieved_gflops']:.3g} GFLOP/s{pct}"
