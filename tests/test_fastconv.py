"""fastconv: exactness of every CPU backend vs F.conv2d, autograd, dispatch/explain/cache, errors, drop-in module."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastconv
from fastconv import cpu_kernels as ck
from fastconv import dispatch

CPU_BACKENDS = fastconv.available_backends("cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCONV_CACHE", str(tmp_path / "fc"))
    monkeypatch.delenv("ERF_LAB_CONV_BACKEND", raising=False)
    monkeypatch.delenv("FASTCONV_AUTOTUNE", raising=False)
    dispatch.clear_cache(memory_only=True)
    yield
    dispatch.clear_cache(memory_only=True)


# one_thread (tests/conftest.py): the cpp kernel's multi-threaded split is covered by
# test_cpp_weight_grad_accumulates_in_fp32_accurately.


def _ref(x, w, b):
    kh, kw = w.shape[-2:]
    return F.conv2d(x, w, b, padding=(kh // 2, kw // 2), groups=x.shape[1])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_cpu_backends_present():
    # the pure-PyTorch paths always exist; cpp whenever a compiler is there (this CI image has g++)
    assert {"native", "channels_last", "fft"} <= set(CPU_BACKENDS)
    assert ("cpp" in CPU_BACKENDS) == (ck.cpp_unavailable_reason() is None)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("kernel,shape", [((1, 1), (2, 5, 6, 7)), ((3, 3), (2, 17, 9, 8)), ((7, 5), (1, 20, 11, 13)),
                                          ((31, 31), (2, 16, 12, 12)), ((63, 63), (1, 3, 9, 10)),
                                          ((1, 9), (1, 18, 7, 12))])
@pytest.mark.parametrize("layout,with_bias", [("nchw", True), ("channels_last", False)])
def test_forward_and_grads_match_conv2d(backend, kernel, shape, layout, with_bias, one_thread):
    g = torch.Generator().manual_seed(hash((kernel, shape)) % 1000)
    x = torch.randn(*shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, 1, *kernel, generator=g)
    b = torch.randn(c, generator=g) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fastconv.depthwise_conv2d(*leaves[:2], leaves[2] if b is not None else None, backend=backend)
    ref = _ref(*ref_leaves[:2], ref_leaves[2] if b is not None else None)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert _rel(y, ref) <= 1e-5
    want = torch.channels_last if layout == "channels_last" and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=want)
    gy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, gy)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gy)
    for got, exp in zip(grads, ref_grads):
        assert got.shape == exp.shape
        assert _rel(got, exp) <= 1e-4
    if layout == "channels_last" and backend != "native":
        assert grads[0].is_contiguous(memory_format=torch.channels_last) or backend == "fft"


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "cpp"] + ["auto"])
def test_gradcheck_float64(backend, one_thread):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 1, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: fastconv.depthwise_conv2d(*t, backend=backend), (x, w, b))


def test_cpp_weight_grad_accumulates_in_fp32_accurately():
    # long reduction (N*H*W = 2*24*24 terms) vs a float64 reference
    if "cpp" not in CPU_BACKENDS:
        pytest.fail("cpp backend expected on this machine: " + str(ck.cpp_unavailable_reason()))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 24, 24, generator=g)
    gy = torch.randn(2, 24, 24, 24, generator=g)
    got = ck.cpp_weight_grad(x, gy, 13, 11)
    exp = torch.nn.grad.conv2d_weight(x.double(), (24, 1, 13, 11), gy.double(), padding=(6, 5), groups=24)
    assert _rel(got.double(), exp) <= 1e-5
    assert _rel(ck.onednn_weight_grad(x, gy, 13, 11).double(), exp) <= 1e-5


@pytest.mark.parametrize("backend", ["channels_last", "cpp", "auto"])
def test_input_only_gradient_skips_weight_gradient(backend, monkeypatch, one_thread):
    """captum / torch.autograd.grad w.r.t. the input with frozen weights never computes dL/dw."""
    def boom(*a, **k):
        raise AssertionError("weight gradient computed for frozen weights")

    monkeypatch.setattr(ck, "onednn_weight_grad", boom)
    monkeypatch.setattr(ck, "cpp_weight_grad", boom)
    conv = fastconv.DepthwiseConv2d(6, 9, backend=backend).requires_grad_(False)
    ref = nn.Conv2d(6, 6, 9, padding=4, groups=6)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 10, 10, requires_grad=True)
    (gx,) = torch.autograd.grad(conv(x).square().sum(), x)
    (rx,) = torch.autograd.grad(ref(x).square().sum(), x)
    assert _rel(gx, rx) <= 1e-4


def test_captum_saliency_with_frozen_model():
    from captum.attr import Saliency

    model = nn.Sequential(fastconv.DepthwiseConv2d(4, 13), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    model.requires_grad_(False)
    ref = nn.Sequential(nn.Conv2d(4, 4, 13, padding=6, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 8, 8)
    a = Saliency(model).attribute(x, target=1, abs=False)
    r = Saliency(ref).attribute(x, target=1, abs=False)
    assert _rel(a, r) <= 1e-4 and a.abs().sum() > 0


def test_module_is_drop_in_for_conv2d_state_dict():
    conv = nn.Conv2d(12, 12, (7, 5), padding=(3, 2), groups=12)
    dw = fastconv.DepthwiseConv2d(12, (7, 5))
    assert isinstance(dw, nn.Conv2d)
    assert list(dw.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    assert dw.weight.shape == conv.weight.shape == (12, 1, 7, 5)
    dw.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(2, 12, 9, 9)
    assert _rel(dw(x), conv(x)) <= 1e-5
    back = nn.Conv2d(12, 12, (7, 5), padding=(3, 2), groups=12, bias=True)
    back.load_state_dict(fastconv.DepthwiseConv2d(12, (7, 5)).state_dict(), strict=True)
    assert fastconv.DepthwiseConv2d(3, 5, bias=False).bias is None


@pytest.mark.parametrize("call,msg", [
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4)), "odd"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 65, 65)), "1..63"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(5, 1, 3, 3)), "channels"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(4, 8, 8), torch.randn(4, 1, 3, 3)), "4-D"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3)), "(C, 1, KH, KW)"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8).half(), torch.randn(4, 1, 3, 3).half()), "dtype"),
    (lambda: fastconv.depthwise_conv2d(torch.ones(1, 4, 8, 8, dtype=torch.int32),
                                       torch.ones(4, 1, 3, 3, dtype=torch.int32)), "dtype"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3).double()), "dtypes differ"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(3)), "bias"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), stride=2), "stride"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), backend="cuda"),
     "unknown backend"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), backend="triton"), "CUDA"),
    (lambda: fastconv.DepthwiseConv2d(4, 3, stride=2), "stride"),
    (lambda: fastconv.DepthwiseConv2d(4, 4), "odd"),
])
def test_bad_input_raises_clear_value_error(call, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


def test_module_with_stride_changed_after_construction_raises():
    m = fastconv.DepthwiseConv2d(4, 3)
    m.stride = (2, 2)
    with pytest.raises(ValueError, match="stride"):
        m(torch.randn(1, 4, 8, 8))


def test_auto_autotunes_once_and_persists_cache(monkeypatch, tmp_path):
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 1, 17, 17, requires_grad=True)
    fake = {"native": 9.0, "channels_last": 2.0, "cpp": 1.0, "fft": 3.0}
    calls = []

    def fake_time(name, *a, **k):
        calls.append(name)
        return fake[name] + (0 if name != "cpp" or "cpp" in CPU_BACKENDS else 99)

    monkeypatch.setattr(dispatch, "_time_backend", fake_time)
    y = fastconv.depthwise_conv2d(x, w)
    # the cost model never times NCHW native at padding 8 (oneDNN im2col cliff)
    assert "native" not in calls and set(calls) == set(CPU_BACKENDS) - {"native", "fft"}
    assert _rel(y, _ref(x, w, None)) <= 1e-5
    cache = json.loads((tmp_path / "fc" / "autotune.json").read_text())
    (key,) = cache
    winner = "cpp" if "cpp" in CPU_BACKENDS else "channels_last"
    assert cache[key]["backend"] == winner and "17x17" in key and "grad_x1w1" in key
    # a new process (memory cleared) reads the file instead of timing again
    dispatch.clear_cache(memory_only=True)
    calls.clear()
    text = fastconv.explain(x, w)
    assert calls == [] and f"backend {winner!r}" in text and "from cache" in text and "not native" in text
    # inference (no grad) is a different decision
    with torch.no_grad():
        fastconv.depthwise_conv2d(x, w)
    assert calls and len(json.loads((tmp_path / "fc" / "autotune.json").read_text())) == 2


def test_real_autotune_times_and_explain_reports_them():
    x = torch.randn(1, 8, 8, 8)
    w = torch.randn(8, 1, 3, 3)
    text = fastconv.explain(x, w)
    d = dispatch.decide(x, w, None)
    assert d["backend"] in CPU_BACKENDS and d["cached"] is True
    assert "autotuned" in text and "best-of-repeats ms" in text
    assert set(d["times_ms"]) == set(CPU_BACKENDS) - {"fft"}  # native is a candidate at K=3 (no cliff)
    assert "not fft: explicit only" in text
    assert min(d["times_ms"], key=d["times_ms"].get) == d["backend"]


def test_env_var_forces_backend_and_cost_model(monkeypatch):
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 1, 5, 5)
    monkeypatch.setenv("ERF_LAB_CONV_BACKEND", "fft")
    assert "forced by $ERF_LAB_CONV_BACKEND=fft" in fastconv.explain(x, w)
    assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5
    monkeypatch.setenv("ERF_LAB_CONV_BACKEND", "triton")
    with pytest.raises(ValueError, match="ERF_LAB_CONV_BACKEND=triton"):
        fastconv.depthwise_conv2d(x, w)
    monkeypatch.delenv("ERF_LAB_CONV_BACKEND")
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    assert dispatch.decide(x, w, None)["backend"] == "channels_last"
    assert not (dispatch.cache_file()).exists()


def test_weight_grad_cost_model_excludes_native_at_large_k():
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 21, 21, requires_grad=True)
    cands, why = dispatch.candidates(x, w, None)
    assert "native" not in cands and "slow GEMM" in why["native"]
    with torch.no_grad():
        assert "native" in dispatch.candidates(x, w, None)[0]  # channels_last forward has no cliff


def test_bench_cli_writes_table_and_reports_paper_numbers(tmp_path, capsys, one_thread, monkeypatch):
    from erf_lab.cli.main import main
    import fastconv.bench as fb

    real_run = fb.run
    monkeypatch.setattr(fb, "run", lambda **kw: real_run(sgemm_size=256, **kw))  # small SGEMM probe in tests
    from fastconv.bench import PAPER_TABLE1_MS, conv_flops

    assert PAPER_TABLE1_MS[16][0][-1] == 171.4 and PAPER_TABLE1_MS[64][1][0] == 69.6  # Table 1 transcription
    assert conv_flops(64, 384, 16, 31, 24) == 2 * 64 * 384 * 256 * 961 * 24
    out = tmp_path / "bench"
    rc = main(["bench", "--kernels", "3,31", "--resolutions", "16", "--batch", "1", "--channels", "4",
               "--layers", "2", "--repeats", "1", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "paper 2080Ti PyTorch" in text and "171.4" in text and "8.4" in text and "% of SGEMM" in text
    res = json.loads((out / "results.json").read_text())
    (row_3, row_31) = res["rows"]
    assert (row_3["K"], row_31["K"], row_31["paper_pytorch_ms"], row_31["paper_ours_ms"]) == (3, 31, 171.4, 8.4)
    for m in ("fwd", "fwdbwd"):
        for impl in ("pytorch_nchw", "pytorch_cl", "fastconv"):
            assert row_31[f"{m}_{impl}_ms"] > 0
        assert row_31[f"{m}_fastconv_backend"] in CPU_BACKENDS
        assert row_31[f"{m}_speedup_vs_nchw"] == pytest.approx(
            row_31[f"{m}_pytorch_nchw_ms"] / row_31[f"{m}_fastconv_ms"], rel=0.02)
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("R,K,")
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "fastconv.bench" and run["sgemm_gflops"] > 0 and run["batch"] == 1


def test_bench_cli_bad_kernel_exits_2(tmp_path, capsys):
    from erf_lab.cli.main import main

    assert main(["bench", "--kernels", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kernel 4 unsupported" in err and "Traceback" not in err


def test_autotune_skips_a_candidate_that_fails(monkeypatch):
    real = dispatch._time_backend

    def flaky(name, *a, **k):
        if name == "channels_last":
            raise RuntimeError("kernel build failed")
        return real(name, *a, **k)

    monkeypatch.setattr(dispatch, "_time_backend", flaky)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    text = fastconv.explain(x, w)
    assert "not channels_last: failed while autotuning: RuntimeError: kernel build failed" in text
    assert dispatch.decide(x, w, None)["backend"] != "channels_last"
    assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5


def test_cudnn_weight_grad_helper_matches_autograd():
    """The CUDA Triton backend takes dL/dw from ``_cudnn_weight_grad_nhwc``; its math is device independent."""
    from fastconv.functional import _cudnn_weight_grad_nhwc, _nhwc_on_gpu

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64, generator=g)
    gy = torch.randn(2, 6, 9, 7, dtype=torch.float64, generator=g)
    w = torch.randn(6, 1, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    exp = torch.autograd.grad(F.conv2d(x, w, padding=(2, 1), groups=6), w, gy)[0]
    got = _cudnn_weight_grad_nhwc(x, gy, 5, 3)
    assert got.shape == exp.shape and _rel(got, exp) <= 1e-12
    assert _nhwc_on_gpu(x) is x  # CPU tensors keep their layout


@pytest.mark.parametrize("c", [5, 16, 21])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_cpp_kernels_read_any_layout(c, layout):
    """The fused C++ passes pack each plane from the tensor's own strides (NCHW, channels_last, a strided view),
    handle channel tails (C % 8) and the negative-stride flipped weight, and write the input's layout."""
    if "cpp" not in CPU_BACKENDS:
        pytest.fail("cpp backend expected on this machine: " + str(ck.cpp_unavailable_reason()))
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, 7, 9, generator=g)
    gy = torch.randn(2, c, 7, 9, generator=g)
    if layout == "channels_last":
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    elif layout == "strided":
        x, gy = (torch.randn(2, c, 14, 9, generator=g)[:, :, ::2] for _ in range(2))
    exp_gw = torch.nn.grad.conv2d_weight(x.double(), (c, 1, 5, 3), gy.double(), padding=(2, 1), groups=c)
    assert _rel(ck.cpp_weight_grad(x, gy, 5, 3).double(), exp_gw) <= 1e-5
    w = torch.randn(c, 1, 5, 3, generator=g)
    bias = torch.randn(c, generator=g)
    for flip in (False, True):  # the fused forward reads any strides and writes x's layout
        got = ck.cpp_conv(x, w, bias, flip=flip)
        exp = F.conv2d(x, w.flip(-1, -2) if flip else w, bias, padding=(2, 1), groups=c)
        assert _rel(got, exp) <= 1e-5
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)


def test_autotune_never_counts_a_one_time_build_of_a_candidate(monkeypatch, tmp_path):
    """A candidate whose first call pays a one-time cost (a JIT build) still wins when its steady state is the
    fastest: the warm-up call is not timed."""
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 1, 17, 17)
    seen = set()

    def fake_run(name, xs, ws, bs):
        if name == "channels_last" and name not in seen:
            time.sleep(0.3)  # "compiling"
        seen.add(name)
        time.sleep({"channels_last": 0.001, "cpp": 0.02}.get(name, 0.01))
        return _ref(xs, ws, bs)

    monkeypatch.setattr(dispatch, "run_backend", fake_run)
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["cpp", "channels_last"], {}))
    with torch.no_grad():
        d = dispatch.decide(x, w, None)
    assert d["backend"] == "channels_last" and d["times_ms"]["channels_last"] < 10, d
