"""Triton depthwise-conv kernels (fastconv.triton_backend) against F.conv2d and its autograd gradients.

The kernels run on CPU through Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before triton is imported,
so all interpreter cases run in ONE subprocess (this file with ``--interpret-worker``) and report JSON.  A second,
concurrent subprocess (``--compile-worker``) compiles the kernels ahead of time for sm_90 (no GPU needed) and checks
registers/spills/vector loads.  The pytest process itself never imports triton.  CUDA checks are marked ``gpu`` and
skip only without a CUDA device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tile configs: "whole" = one program per (image, all channels) -> few interpreter steps; None = the GPU heuristics;
# explicit dicts force several tiles with ragged tails in H, W, C and kernel-column tiles / split-K in dL/dw.
CASES = [
    dict(id="k1_nchw_bias", n=2, c=8, h=9, w=9, kh=1, kw=1, cl=False, bias=True, fwd="whole", bwd="whole"),
    dict(id="k3_cl", n=2, c=8, h=9, w=10, kh=3, kw=3, cl=True, bias=False, fwd="whole", bwd="whole"),
    dict(id="k5x3_cl_bias", n=2, c=8, h=10, w=9, kh=5, kw=3, cl=True, bias=True, fwd="whole", bwd="whole"),
    dict(id="k7_nchw_bias", n=1, c=16, h=12, w=11, kh=7, kw=7, cl=False, bias=True, fwd="whole", bwd="whole"),
    dict(id="k13_cl_kernel_gt_image", n=1, c=8, h=9, w=12, kh=13, kw=13, cl=True, bias=False,
         fwd="whole", bwd="whole"),
    dict(id="k3_cl_public_api", n=2, c=16, h=12, w=12, kh=3, kw=3, cl=True, bias=True, fwd=None, bwd=None),
    dict(id="k3_nchw_public_api", n=1, c=6, h=11, w=12, kh=3, kw=3, cl=False, bias=True, fwd=None, bwd=None),
    dict(id="k3x5_nchw_ragged_tiles", n=1, c=6, h=10, w=11, kh=3, kw=5, cl=False, bias=True,
         fwd=dict(BLOCK_H=8, BLOCK_W=8, BLOCK_C=4),
         bwd=dict(BLOCK_J=2, BLOCK_H=4, BLOCK_W=8, BLOCK_C=4, split=2)),
    dict(id="k5_noncontig_view", n=2, c=8, h=9, w=9, kh=5, kw=5, cl=False, bias=True, fwd="whole", bwd="whole",
         view=True),
    dict(id="k5_cl_fp16", n=2, c=8, h=9, w=9, kh=5, kw=5, cl=True, bias=True, fwd="whole", bwd="whole",
         dtype="float16"),
    dict(id="k13_cl_fp16_tensorcore_public_api", n=1, c=4, h=16, w=18, kh=13, kw=13, cl=True, bias=True, fwd=None,
         bwd="whole", dtype="float16", env={"FASTCONV_TRITON_DOT": "1"}),
    dict(id="k7x5_nchw_fp32_tensorcore_math", n=1, c=3, h=17, w=9, kh=7, kw=5, cl=False, bias=False, fwd="dot",
         bwd="whole"),
    dict(id="k3_nchw_bf16", n=2, c=8, h=9, w=9, kh=3, kw=3, cl=False, bias=True, fwd="whole", bwd="whole",
         dtype="bfloat16"),
]
# fp32: <= 1e-4 relative (brief); fp16: output rounding (2^-11) plus summation order; bf16: the interpreter
# truncates fp32->bf16 instead of rounding to nearest, so allow 2 ulp (2 * 2^-8).
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 8e-3}


def _p2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _run_case(case: dict) -> dict:
    """Forward, dL/dx and dL/dw of one case against F.conv2d in fp32 on the same (rounded) inputs."""
    from fastconv import triton_backend as tb

    g = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    dtype = getattr(torch, case.get("dtype", "float32"))
    n, c, h, w, kh, kw = (case[k] for k in ("n", "c", "h", "w", "kh", "kw"))
    x = torch.randn(n, c, h, w + (3 if case.get("view") else 0), generator=g).to(dtype)
    if case.get("view"):
        x = x[..., 1:1 + w]                      # non-dense view: exercises the contiguity fallback
    if case["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, kh, kw, generator=g).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype) if case["bias"] else None
    gy = torch.randn(n, c, h, w, generator=g).to(dtype)
    if case["cl"]:
        gy = gy.contiguous(memory_format=torch.channels_last)

    xr, wr = x.float().requires_grad_(), weight.float().requires_grad_()
    yr = F.conv2d(xr, wr, None if bias is None else bias.float(), padding=(kh // 2, kw // 2), groups=c)
    gx_ref, gw_ref = torch.autograd.grad(yr, (xr, wr), gy.float())

    fwd, bwd = case["fwd"], case["bwd"]
    dot = fwd == "dot"                            # Toeplitz/tensor-core kernel with its own tiles
    if fwd == "whole":
        fwd = dict(BLOCK_H=_p2(h), BLOCK_W=_p2(w), BLOCK_C=_p2(c))
    if bwd == "whole":
        bwd = dict(BLOCK_J=_p2(kw), BLOCK_H=_p2(h) // 2, BLOCK_W=_p2(w), BLOCK_C=_p2(c), split=2)
    os.environ.update(case.get("env", {}))
    try:
        if fwd is None:                           # the public entry points, exactly as the dispatcher calls them
            y = tb.dwconv_forward(x, weight, bias)
            gx = tb.dwconv_backward_input(gy, weight)
        else:
            cfg = None if dot else fwd
            y = tb._launch_forward(tb._dense(x), tb._tap_major(weight), bias, kh, kw, cfg, dot=dot)
            gx = tb._launch_forward(tb._dense(gy), tb._tap_major(weight.flip(-2, -1)), None, kh, kw, cfg, dot=dot)
        gw = (tb.dwconv_backward_weight(x, gy, kh, kw) if bwd is None
              else tb._launch_backward_weight(tb._dense(x), tb._dense(gy), kh, kw, bwd))
    finally:
        for key in case.get("env", {}):
            os.environ.pop(key)
    fmt = torch.channels_last if case["cl"] else torch.contiguous_format
    return dict(
        fwd=_rel(y, yr.detach()), grad_x=_rel(gx, gx_ref), grad_w=_rel(gw, gw_ref),
        shapes_ok=(y.shape == yr.shape and gx.shape == x.shape and gw.shape == weight.shape),
        dtypes_ok=(y.dtype == gx.dtype == gw.dtype == dtype),
        format_ok=(y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)),
    )


# Ahead-of-time compile for sm_90 (no GPU needed: Triton ships ptxas/cuobjdump) with the GPU heuristics at the
# benchmark shape B=64, C=384, R=64, K=31: catches GPU-only lowering errors, register spills, lost vectorization.
AOT_CASES = [
    dict(id="fwd_fp16_cl", kind="fwd", dtype="float16", cl=True),
    dict(id="fwd_fp32_nchw", kind="fwd", dtype="float32", cl=False),
    dict(id="wgrad_bf16_cl", kind="wgrad", dtype="bfloat16", cl=True),
    dict(id="fwd_tensorcore_fp16_cl", kind="dot", dtype="float16", cl=True),
    dict(id="wgrad_fp32_nchw", kind="wgrad", dtype="float32", cl=False),
]


def _aot_compile(case: dict) -> dict:
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastconv import triton_backend as tb

    dtype = getattr(torch, case["dtype"])
    fmt = torch.channels_last if case["cl"] else torch.contiguous_format
    x = torch.empty(64, 384, 64, 64, device="meta", dtype=dtype).contiguous(memory_format=fmt)
    w_t = torch.empty(31 * 31, 384, device="meta", dtype=dtype)
    if case["kind"] in ("fwd", "dot"):
        dot = case["kind"] == "dot"
        kernel = tb._kernels().dwconv_fwd_dot_kernel if dot else tb._kernels().dwconv_fwd_kernel
        _, _, args, kwargs = tb._fwd_launch(x, w_t, w_t[0], 31, 31, dot=dot)
    else:
        kernel = tb._kernels().dwconv_bwd_weight_kernel
        _, _, args, kwargs = tb._bwd_weight_launch(x, x, 31, 31)
    num_warps = kwargs.pop("num_warps")
    names = kernel.arg_names
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    sig, consts, attrs = {}, dict(kwargs), {}
    for idx, (name, val) in enumerate(zip(names, args)):     # mimic the JIT's specialisation of launch args
        if isinstance(val, torch.Tensor):
            sig[name] = ptr[val.dtype]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif val == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if val % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    for name in kwargs:
        sig[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
    ptx = compiled.asm["ptx"]
    return dict(regs=int(m.group(1)), local_bytes=int(m.group(2)), num_warps=num_warps,
                vector_loads=bool(re.search(r"ld\.global\.v[248]", ptx)),
                tensor_cores=bool(re.search(r"\b(mma\.sync|wgmma)", ptx)))


def _compile_worker() -> None:
    print("RESULTS " + json.dumps({c["id"]: _aot_compile(c) for c in AOT_CASES}))


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import time

    out = {}
    for case in CASES:
        t0 = time.perf_counter()
        out[case["id"]] = _run_case(case)
        out[case["id"]]["seconds"] = round(time.perf_counter() - t0, 2)
    print("RESULTS " + json.dumps(out))


def _start_worker(flag: str, **env_extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **env_extra)
    return subprocess.Popen([sys.executable, __file__, flag], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def workers():
    """Both workers run concurrently (each is single-threaded Python): about halves the wall time on 2 cores."""
    procs = {"interpret": _start_worker("--interpret-worker", TRITON_INTERPRET="1"),
             "compile": _start_worker("--compile-worker", TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def interpreted(workers) -> dict:
    return _collect(workers["interpret"])


@pytest.fixture(scope="module")
def compiled_sm90(workers) -> dict:
    return _collect(workers["compile"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreted_kernels_match_conv2d(interpreted, case):
    r = interpreted[case["id"]]
    tol = TOL[case.get("dtype", "float32")]
    assert r["shapes_ok"] and r["dtypes_ok"], r
    assert r["format_ok"], "outputs must keep the input's memory format"
    assert r["fwd"] <= tol, r
    assert r["grad_x"] <= tol, r
    assert r["grad_w"] <= tol, r


@pytest.mark.parametrize("case", AOT_CASES, ids=[c["id"] for c in AOT_CASES])
def test_kernels_compile_for_sm90_without_spills(compiled_sm90, case):
    r = compiled_sm90[case["id"]]
    assert r["local_bytes"] == 0, f"register spills to local memory: {r}"
    assert r["regs"] * 32 * r["num_warps"] <= 65536, r          # one CTA must fit the SM register file
    if case["cl"]:                                               # NHWC: vector loads along channels
        assert r["vector_loads"], r
    assert r["tensor_cores"] == (case["kind"] == "dot"), r       # mma only in the opt-in Toeplitz kernel


def test_import_fastconv_does_not_import_triton():
    code = ("import sys, fastconv, fastconv.triton_backend as tb; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
            "print(tb.triton_available())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"        # no CUDA device and no interpreter -> unavailable


def test_triton_available_under_interpreter():
    code = "import fastconv.triton_backend as tb; print(tb.triton_available())"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


@pytest.mark.parametrize("kernel", [(4, 4), (3, 2), (65, 3), (0, 1)])
def test_rejects_unsupported_kernels(monkeypatch, kernel):
    from fastconv import triton_backend as tb

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # pass the device check; validation fails before any launch
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="odd sizes"):
        tb.dwconv_forward(x, torch.zeros(4, 1, *kernel))
    with pytest.raises(ValueError, match="odd sizes"):
        tb.dwconv_backward_weight(x, x, *kernel)


def test_rejects_bad_inputs(monkeypatch):
    from fastconv import triton_backend as tb

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 4, 8, 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            tb.dwconv_forward(x, torch.zeros(4, 1, 3, 3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"\(4, 1, KH, KW\)"):
        tb.dwconv_forward(x, torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match="dtype"):
        tb.dwconv_forward(x.double(), torch.zeros(4, 1, 3, 3).double())
    with pytest.raises(ValueError, match="share dtype"):
        tb.dwconv_forward(x, torch.zeros(4, 1, 3, 3).half())
    with pytest.raises(ValueError, match="bias"):
        tb.dwconv_forward(x, torch.zeros(4, 1, 3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        tb.dwconv_backward_weight(x, torch.zeros(1, 4, 8, 7), 3, 3)


def _cuda_case(dtype, k, channels_last, shape):
    """(memory format, x, weight, bias, dL/dy) on CUDA, seeded by k."""
    g = torch.Generator(device="cuda").manual_seed(k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c = shape[1]
    x = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(c, 1, k, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(c, device="cuda", generator=g).to(dtype)
    gy = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    return fmt, x, w, b, gy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 13, 31])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cudnn(dtype, k, channels_last):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastconv import triton_backend as tb

    assert tb.triton_available()
    fmt, x, w, b, gy = _cuda_case(dtype, k, channels_last, (4, 48, 40, 36))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()   # fp64: no TF32 in the reference
    yr = F.conv2d(xr, wr, b.double(), padding=k // 2, groups=48)
    gx_ref, gw_ref = torch.autograd.grad(yr, (xr, wr), gy.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    y = tb.dwconv_forward(x, w, b)
    assert y.is_contiguous(memory_format=fmt) and y.dtype == dtype
    assert _rel(y, yr.detach()) <= tol
    assert _rel(tb.dwconv_backward_input(gy, w), gx_ref) <= tol
    assert _rel(tb.dwconv_backward_weight(x, gy, k, k), gw_ref) <= tol
    if dtype != torch.float32:                   # opt-in Toeplitz / tensor-core forward (bf16 untestable on CPU)
        assert _rel(tb._launch_forward(x, tb._tap_major(w), b, k, k, dot=True), yr.detach()) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [3, 31])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_autograd_through_the_public_op(dtype, k, channels_last):
    """depthwise_conv2d(backend="triton") end to end on CUDA: NCHW inputs run the NHWC Triton kernels, dL/dw comes
    from cuDNN; values, gradients and the input's memory format all match the fp64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import fastconv

    fmt, x, w, b, gy = _cuda_case(dtype, k, channels_last, (2, 40, 24, 20))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = fastconv.depthwise_conv2d(*leaves, backend="triton")
    gx, gw, gb = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    yr = F.conv2d(*ref_leaves, padding=k // 2, groups=40)
    rx, rw, rb = torch.autograd.grad(yr, ref_leaves, gy.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    assert y.dtype == gx.dtype == gw.dtype == dtype
    for got, ref in ((y, yr), (gx, rx), (gw, rw), (gb, rb)):
        assert _rel(got.detach(), ref.detach()) <= tol


if __name__ == "__main__" and "--interpret-worker" in sys.argv:
    _worker()
elif __name__ == "__main__" and "--compile-worker" in sys.argv:
    _compile_worker()
