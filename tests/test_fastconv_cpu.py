"""fastconv's CPU targets (issue 14): the C++ kernel's lane widths (the 16-lane path forced on any x86 CPU equals
F.conv2d), the lane-width selection, the stock path at small kernels, ``fastconv.roofline`` and the benchmark."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import cpu_kernels as ck
from fastconv import dispatch, roofline
from tests.conftest import need_cpp

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_CACHE = fastconv.settings().cache_dir  # where builds live between runs (the tests' own cache dirs are fresh)
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@pytest.fixture(autouse=True)
def _isolated_settings(fastconv_isolated):
    yield


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _cpp_matches_conv2d_in_float64(x, w, b, g):
    """The cpp backend's forward, input, weight and bias gradients against F.conv2d in float64 (relative max error
    <= 1e-5, output gradient drawn from ``g``); returns its output and gradients."""
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = fastconv.depthwise_conv2d(*leaves, backend="cpp")
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    kh, kw = w.shape[-2:]
    ref = F.conv2d(*ref_leaves, padding=(kh // 2, kw // 2), groups=x.shape[1])
    assert _rel(y.double(), ref) <= 1e-5
    gy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, gy)
    for got, exp in zip(grads, torch.autograd.grad(ref, ref_leaves, gy.double())):
        assert got.shape == exp.shape and _rel(got.double(), exp) <= 1e-5
    return y, grads


def _map_kernel_bias(shape, kernel, layout: str, seed: int):
    """A random map of ``shape`` (channels_last where ``layout`` says so), a depthwise kernel and a bias from one
    seeded generator, which is returned too (for the output gradient)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    return x, torch.randn(c, 1, *kernel, generator=g), torch.randn(c, generator=g), g


def _weight_grad_case(shape, kernel, layout: str):
    """``_map_kernel_bias``'s map, kernel, bias and generator, an output gradient in the map's layout and the weight
    gradient in float64 (``torch.nn.grad.conv2d_weight``)."""
    x, w, b, g = _map_kernel_bias(shape, kernel, layout, seed=kernel[0] * 100 + kernel[1])
    gy = torch.randn(x.shape, generator=g)
    if layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    pad = (kernel[0] // 2, kernel[1] // 2)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), padding=pad, groups=x.shape[1])
    return x, w, b, g, gy, ref


def _leave_nan_in_freed_memory():
    """Free NaN-filled buffers of 16-256 KB, the sizes of the C++ kernel's own buffers, which the heap hands out again:
    a read of memory the kernel never wrote then shows as NaN or garbage in its result."""
    for n in (1 << 12, 1 << 14, 1 << 16):
        torch.full((n,), float("nan"))


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("shape,kernel", [((2, 21, 9, 11), (7, 5)), ((3, 37, 8, 7), (3, 9)),
                                          ((1, 16, 12, 12), (13, 13)), ((2, 5, 6, 5), (1, 3)),
                                          ((2, 21, 9, 19), (5, 3))])  # a small kernel on packed rows (from 16 wide)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forced_lane_width_matches_conv2d_in_float64(lanes, shape, kernel, layout, monkeypatch, one_thread):
    """The cpp backend with $FASTCONV_CPU_LANES forced (16 on a CPU without AVX-512 runs the 16-lane code lowered to
    256-bit vectors): forward, input and weight gradient vs F.conv2d in float64; channel counts that are not a
    multiple of 16 (tails), non-square kernels, batch > 1, NCHW and channels_last inputs."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    assert ck.cpu_lanes() == int(lanes)
    if shape[-1] == 19:  # no whole channel blocks: the packed rows on both layouts, except in the lowered lanes
        lowered = ck.cpu_variant().startswith(ck._VARIANTS[17])
        assert ck.cpp_conv_path(torch.empty(shape), torch.empty(shape[1], 1, *kernel)) == \
            ck.CONV_PATHS[0 if lowered else 3]
    g = torch.Generator().manual_seed(sum(shape) + sum(kernel))
    x = torch.randn(*shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, 1, *kernel, generator=g)
    b = torch.randn(c, generator=g)
    y, _ = _cpp_matches_conv2d_in_float64(x, w, b, g)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("channels,rows,width,kernel", [
    *((19, 23, w, (21, kw)) for w, kw in [(10, 11), (11, 7), (12, 13), (13, 9), (14, 5)]),  # edge tiles
    *((35, 9, w, (7, kw)) for w, kw in [(16, 17), (19, 5), (35, 31)])])  # rows of 16 pixels and more
def test_edge_tiles_and_wide_rows_match_conv2d_in_float64(lanes, channels, rows, width, kernel, monkeypatch,
                                                           one_thread):
    """The kernel's edge tiles: output widths W (forward, input gradient) and KW (weight gradient) leave every
    remainder mod the tile width (0..4 of 5 columns with 8 lanes, 0..2 of 3 with 16), and 23 / 21 output rows leave
    rows below the taller tiles of the last columns (``tail_rows``: up to 10 rows). NCHW rows of 16 pixels and
    more: on an AVX-512 CPU the 16-lane variant packs and writes them back through 16 x 16 transposes (a row that 16
    does not divide ends in a block overlapping the one before it; a flipped kernel row of 17 or 31 runs backwards
    through them in the input gradient), elsewhere through 8 x 8 ones."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    g = torch.Generator().manual_seed(width * 100 + kernel[1])
    x = torch.randn(2, channels, rows, width, generator=g)
    w, b = torch.randn(channels, 1, *kernel, generator=g), torch.randn(channels)
    _cpp_matches_conv2d_in_float64(x, w, b, g)


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("kernel", [(13, 13), (21, 19), (11, 9)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_gradient_last_rows_match_conv2d_in_float64(lanes, kernel, layout, monkeypatch, one_thread):
    """The weight gradient's planes whose rows the tile height does not divide: in Winograd rows (8 lanes, maps from
    20) the products have ceil(KH / 3) rows, 5 / 7 / 4 here, whose last 2 / 1 / 1 run in tiles of their own height
    below the 3 x 3 tiles (dwconv.cpp's WREST); 16 lanes: 4-row tiles, 1 / 3 / 0 rows below them. Through the
    weight gradient's own call and through autograd (where the backward may run both gradients in one pass)."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    x, w, b, g, gy, ref = _weight_grad_case((2, 19, 20, 22), kernel, layout)
    if lanes == "8":
        assert ck.cpp_wgrad_winograd(x, w)
    assert _rel(ck.cpp_weight_grad(x, gy, *kernel).double(), ref) <= 1e-5
    _cpp_matches_conv2d_in_float64(x, w, b, g)


@pytest.mark.parametrize("kernel", [(21, 13), (11, 13), (29, 13), (13, 13), (29, 29), (19, 27), (21, 15)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_gradient_one_row_tiles_read_zeroed_padding(kernel, layout, monkeypatch, one_thread):
    """8 lanes, Winograd rows: a weight-gradient product whose triplet rows leave one at the end (KH = 11, 19, 21, 29;
    at K = 13 the fifth product's four, dwconv.cpp's wino_chunks_m4) ends in 1 x 7 tiles, which read up to six
    columns beyond the map's, where the Winograd buffers had zeroed five: what the heap had left there reached the
    gradient (relative errors 0.09 to 1e36, or NaN). NaN-filled buffers freed before each call leave such leftovers on
    purpose."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, "8")
    x, w, _, _, gy, ref = _weight_grad_case((2, 19, 28, 26), kernel, layout)
    assert ck.cpp_wgrad_winograd(x, w)
    for _ in range(3):
        _leave_nan_in_freed_memory()
        assert _rel(ck.cpp_weight_grad(x, gy, *kernel).double(), ref) <= 1e-5
        both = ck.cpp_backward(x, gy, w)  # the one-pass backward, where it applies (NCHW here)
        assert (both is None) == (layout == "channels_last")
        if both is not None:
            assert _rel(both[1].double(), ref) <= 1e-5


def _every_pass_after_nan_frees(x, w, bias, gy, lanes) -> dict:
    """The C++ kernel's forward (with ``bias``), input gradient, weight gradient and one-pass backward (where it has
    one: "one pass, input gradient" and "one pass, weight gradient") of ``x`` and the output gradient ``gy``, each
    called after ``_leave_nan_in_freed_memory``."""
    kh, kw = w.shape[-2:]
    results = {}
    for name, call in (("forward", lambda: ck.cpp_conv(x, w, bias, lanes=lanes)),
                       ("input gradient", lambda: ck.cpp_conv(gy, w, None, flip=True, lanes=lanes)),
                       ("weight gradient", lambda: ck.cpp_weight_grad(x, gy, kh, kw, lanes=lanes)),
                       ("one pass", lambda: ck.cpp_backward(x, gy, w, lanes=lanes))):
        _leave_nan_in_freed_memory()
        results[name] = call()
    one_pass = results.pop("one pass")
    if one_pass is not None:
        results["one pass, input gradient"], results["one pass, weight gradient"] = one_pass
    return results


def test_random_shapes_match_float64_after_nan_filled_frees(one_thread):
    """200 seeded random calls (B 1-2, C 3-24, maps 8-40 a side, kernels 9-31 a side, square or not, 8 and 16 lanes,
    NCHW and channels_last): forward, input gradient, weight gradient and the one-pass backward against float64,
    each after NaN-filled buffers were freed, so that a read of memory the kernel never wrote shows. The shapes of
    such a random search found the weight gradient's 1 x 7 tiles reading unzeroed padding (12 wrong of 1,594 on
    aab5ed4; ``test_weight_gradient_one_row_tiles_read_zeroed_padding``)."""
    import random

    need_cpp()
    rng = random.Random(56)
    for _ in range(200):
        kh = rng.choice(range(9, 32, 2))
        kw = kh if rng.random() < 0.5 else rng.choice(range(9, 32, 2))
        b, c, h, w = rng.choice([1, 2]), rng.choice([3, 8, 16, 19, 24]), rng.randint(8, 40), rng.randint(8, 40)
        lanes, layout = rng.choice([8, 16]), rng.choice(["nchw", "channels_last"])
        x, wt, _, _, gy, ref_gw = _weight_grad_case((b, c, h, w), (kh, kw), layout)
        pad = (kh // 2, kw // 2)
        ref_y = F.conv2d(x.double(), wt.double(), padding=pad, groups=c)
        ref_gx = torch.nn.grad.conv2d_input(x.shape, wt.double(), gy.double(), padding=pad, groups=c)
        case = f"{(b, c, h, w)} kernel {(kh, kw)} {lanes} lanes {layout}"
        for name, out in _every_pass_after_nan_frees(x, wt, None, gy, lanes).items():
            ref = ref_y if name == "forward" else ref_gx if "input" in name else ref_gw
            assert _rel(out.double(), ref) <= 1e-5, f"{name}, {case}"


def _error_over_abs_sum(got, ref, abs_sum):
    """max |got - ref| over the largest sum of the products' absolute values, the scale of a float32 sum's error
    bound: cancellation in a small result (a 1 x 1 kernel's weight gradient is one sum of B H W products of random
    sign) is not read as error."""
    return ((got.double() - ref).abs().max() / abs_sum.max().clamp_min(1e-30)).item()


def test_random_calls_of_every_path_match_float64():
    """200 seeded random calls over what the Winograd search above leaves out: kernels 1-31 a side (plain planes,
    straight and packed-row tiles too), maps 1-48 a side, C 1-128 (row groups of 2 and 4 blocks), B 1-3, an NCHW,
    channels_last or sliced (non-dense) input and output gradient, with or without a bias, 1-3 threads, 8 and 16
    lanes: forward, input gradient, weight gradient and the one-pass backward, each after NaN-filled frees, against
    float64. A random search of 121,805 such calls in both builds (-march=native and x86-64-v3) found no error over
    3e-6 of the sums' absolute values."""
    import random

    need_cpp()
    rng = random.Random(57)
    threads = torch.get_num_threads()
    try:
        done = 0
        while done < 200:
            kh = rng.choice(range(1, 32, 2))
            kw = kh if rng.random() < 0.6 else rng.choice(range(1, 32, 2))
            h = rng.randint(1, 48) if rng.random() < 0.3 else rng.randint(8, 32)
            w = h if rng.random() < 0.6 else rng.randint(1, 48)
            b, c = rng.choice([1, 2, 3]), rng.choice([1, 3, 8, 16, 17, 24, 32, 64, 128])
            if b * c * h * w * kh * kw > 2_000_000:
                continue
            n_threads, lanes = rng.choice([1, 2, 3]), rng.choice([8, 16])
            layout, with_bias = rng.choice(["nchw", "channels_last", "sliced"]), rng.random() < 0.4
            g = torch.Generator().manual_seed(done)
            x, gy = torch.randn(b, c, h, w + 3, generator=g), torch.randn(b, c + 2, h, w, generator=g)
            wt, bias = torch.randn(c, 1, kh, kw, generator=g), torch.randn(c, generator=g) if with_bias else None
            if layout == "sliced":  # a window of the last dimension and a slice of the channels: neither dense
                x, gy = x[..., 1:w + 1], gy[:, 1:c + 1]
            else:
                x, gy = x[..., :w].contiguous(), gy[:, :c].contiguous()
                if layout == "channels_last":
                    x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
            torch.set_num_threads(n_threads)
            pad, xd, gd, wd = (kh // 2, kw // 2), x.double(), gy.double(), wt.double()
            bd = None if bias is None else bias.double()
            refs = {"forward": (F.conv2d(xd, wd, bd, padding=pad, groups=c),
                                F.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(), padding=pad, groups=c)),
                    "input gradient": (torch.nn.grad.conv2d_input(x.shape, wd, gd, padding=pad, groups=c),
                                       torch.nn.grad.conv2d_input(x.shape, wd.abs(), gd.abs(), padding=pad, groups=c)),
                    "weight gradient": (torch.nn.grad.conv2d_weight(xd, wt.shape, gd, padding=pad, groups=c),
                                        torch.nn.grad.conv2d_weight(xd.abs(), wt.shape, gd.abs(), padding=pad,
                                                                    groups=c))}
            case = f"{(b, c, h, w)} kernel {(kh, kw)} {layout} bias {with_bias} {n_threads} threads {lanes} lanes"
            for name, out in _every_pass_after_nan_frees(x, wt, bias, gy, lanes).items():
                ref, abs_sum = refs[name.replace("one pass, ", "")]
                assert out.shape == ref.shape, f"{name}, {case}"
                assert _error_over_abs_sum(out, ref, abs_sum) <= 3e-6, f"{name}, {case}"
            done += 1
    finally:
        torch.set_num_threads(threads)


def test_lane_width_argument_equals_the_other_width():
    need_cpp()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, 10, 9, generator=g)
    w = torch.randn(19, 1, 5, 7, generator=g)
    for flip in (False, True):
        assert _rel(ck.cpp_conv(x, w, None, flip=flip, lanes=16), ck.cpp_conv(x, w, None, flip=flip, lanes=8)) <= 1e-6
    assert _rel(ck.cpp_weight_grad(x, x, 5, 7, lanes=16), ck.cpp_weight_grad(x, x, 5, 7, lanes=8)) <= 1e-6


def test_lane_width_selection_and_override(monkeypatch):
    need_cpp()
    lib = ck.cpp_library()
    avx512 = "avx512f" in _cpu_flags()
    if X86 and _cpu_flags():
        assert bool(lib.dw_cpu_avx512f()) == avx512
    # auto: 16 only on an avx512f CPU with the AVX-512 variant built, else the 8-lane path
    assert ck.cpu_lanes() == (16 if avx512 and lib.dw_has_avx512_build() else 8)
    if not avx512:
        assert ck.cpu_lanes() == 8 and "auto: CPU without avx512f" in ck.cpu_variant()
        assert lib.dw_variant(16) == 17 and "lowered" in ck.cpu_variant(16)  # forced 16: the generic 16-lane code
    if X86 and ck._compiler() and "g++" in os.path.basename(os.path.realpath(ck._compiler())):
        assert lib.dw_has_avx512_build() == 1  # the AVX-512 variant is compiled in (run only where the CPU has it)
    for value, want in (("8", 8), ("16", 16), (" 16 ", 16), ("auto", ck.cpu_lanes()), ("", ck.cpu_lanes())):
        monkeypatch.setenv(ck.ENV_LANES, value)
        assert ck.cpu_lanes() == want
    monkeypatch.setenv(ck.ENV_LANES, "16")
    assert "forced by $FASTCONV_CPU_LANES" in ck.cpu_variant()
    assert ck.cpu_lanes(8) == 8  # an argument beats the environment
    x, w = torch.randn(1, 3, 5, 5), torch.randn(3, 1, 3, 3)
    for bad in ("12", "avx512", "4"):
        monkeypatch.setenv(ck.ENV_LANES, bad)
        with pytest.raises(ValueError, match=r"FASTCONV_CPU_LANES=.* use 8, 16 or auto"):
            ck.cpu_lanes()
        with pytest.raises(ValueError, match="FASTCONV_CPU_LANES"):
            ck.cpp_conv(x, w, None)
    monkeypatch.delenv(ck.ENV_LANES)
    with pytest.raises(ValueError, match=r"lanes=32 is not a CPU lane width"):
        ck.cpp_conv(x, w, None, lanes=32)


def test_the_tuning_follows_the_cpu():
    """The kernel's tuning (``ck.cpu_tuning()``: the AVX-512 variant's Winograd rules, every variant's reach of the
    straight tiles) is that for cores that run a 512-bit FMA as two 256-bit halves (1) exactly on an AMD CPU of family
    19h (25) with avx512f (Zen 4; not its Zen 3), as /proc/cpuinfo says, else the others (0); ``dw_set_tuning``
    chooses either for the process, -1 (or an unknown value) gives the CPU's back; the variant's description names the
    tuning where the AVX-512 variant runs."""
    need_cpp()
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # not Linux: macOS runs on no AMD CPU
        block = ""
    fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    zen4 = (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())
    own = 1 if zen4 else 0
    lib = ck.cpp_library()
    assert ck.cpu_tuning() == own
    try:
        for forced in (1 - own, own, 1 - own):
            lib.dw_set_tuning(forced)
            assert ck.cpu_tuning() == forced
            named = ck.TUNINGS[forced] in ck.cpu_variant()
            assert named == ck.cpu_variant().startswith(ck._VARIANTS[16])
        lib.dw_set_tuning(7)
        assert ck.cpu_tuning() == own
    finally:
        lib.dw_set_tuning(-1)
    assert ck.cpu_tuning() == own


@pytest.mark.parametrize("lanes", ["8", "16"])
def test_the_tuning_sets_where_7x7_runs_straight_with_the_same_numbers(lanes, monkeypatch, one_thread):
    """A 7 x 7 kernel on a channels_last input of whole channel blocks runs the straight tiles with the Zen 4 tuning
    (1) and the packed rows with the other (0), 5 x 5 straight and 9 x 7 packed rows with both; an NCHW input runs
    the packed rows (where the variant has them on any layout). The two tunings' forward, input and weight gradient
    match F.conv2d in float64, and each other (the same sums in the same order, up to a multiply-add left unfused).
    A wrong reach of the straight tiles makes the path assertions fail."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, 11, 20, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 1, 7, 7, generator=g), torch.randn(32, generator=g)
    lowered = ck.cpu_variant().startswith(ck._VARIANTS[17])
    results = []
    try:
        for tuning in (0, 1):
            ck.set_tuning(tuning)
            assert ck.cpp_conv_path(x, w) == ck.CONV_PATHS[1 if tuning == 1 else 3]
            assert ck.cpp_conv_path(x, w[..., 1:-1, 1:-1]) == ck.CONV_PATHS[1]
            assert ck.cpp_conv_path(x, torch.empty(32, 1, 9, 7)) == ck.CONV_PATHS[3]
            assert ck.cpp_conv_path(x.contiguous(), w) == ck.CONV_PATHS[0 if lowered else 3]
            results.append(_cpp_matches_conv2d_in_float64(x, w, b, torch.Generator().manual_seed(70)))
    finally:
        ck.set_tuning(None)
    (y0, grads0), (y1, grads1) = results
    for a, c in zip((y0, *grads0), (y1, *grads1)):
        assert _rel(a.double(), c.double()) <= 1e-6


def test_the_build_target_follows_the_environment(monkeypatch):
    """``$FASTCONV_CPU_MARCH`` names the compiler's -march (unset or blank: native) in the flags the kernel is built
    with and in the kernel id of the autotune key (decisions timed on another build are not reused: the id takes the
    loaded library's target, "baseline" for the compiler's default, else the one it will be built for); the variant's
    description names the target the loaded library was built for, where it is not native; a named target that the
    compiler refuses fails the build with the compiler's words, where an unnamed -march=native falls back to the
    compiler's baseline."""
    need_cpp()  # (loaded before the builds below are made to fail: the process keeps this library)
    tried = []

    def refuse(cxx, flags):
        tried.append(flags[0])
        raise RuntimeError(f"refused {flags[0]}")

    monkeypatch.setattr(ck, "_compiler", lambda: "c++")
    monkeypatch.setattr(ck, "_build_with", refuse)
    for unset in (None, " "):
        if unset is None:
            monkeypatch.delenv(ck.ENV_MARCH, raising=False)
        else:
            monkeypatch.setenv(ck.ENV_MARCH, unset)
        tried.clear()
        with pytest.raises(RuntimeError, match="refused -shared"):
            ck._build()
        assert tried == ["-march=native", "-march=native", "-shared", "-shared"] and ck.build_target() == "native"
    monkeypatch.setattr(ck, "_built_target", "native")  # (the loaded library's, whatever the environment says now)
    source_id = ck.kernel_id()
    assert len(source_id) == 10
    monkeypatch.setenv(ck.ENV_MARCH, "x86-64-v3")
    tried.clear()
    with pytest.raises(RuntimeError, match="refused -march=x86-64-v3"):
        ck._build()
    assert tried == ["-march=x86-64-v3"] * 2
    assert "built for" not in ck.cpu_variant() and ck.kernel_id() == source_id  # the loaded library's target
    monkeypatch.setattr(ck, "_built_target", "x86-64-v3")
    assert ck.cpu_variant().endswith(f"; built for -march=x86-64-v3 (${ck.ENV_MARCH})")
    monkeypatch.delenv(ck.ENV_MARCH)
    assert ck.kernel_id() == f"{source_id}-x86-64-v3"
    monkeypatch.setattr(ck, "_built_target", None)  # -march=native refused: the compiler's default target
    assert ck.kernel_id() == f"{source_id}-baseline"
    monkeypatch.setattr(ck, "_lib", None)  # not built yet: the target it will be built for
    assert ck.kernel_id() == source_id
    monkeypatch.setenv(ck.ENV_MARCH, "x86-64-v3")
    assert ck.kernel_id() == f"{source_id}-x86-64-v3"


_AVX2_BUILD_CHECK = """
import torch, torch.nn.functional as F
from fastconv import cpu_kernels as ck
assert ck.cpp_available(), ck.cpp_unavailable_reason()
print(ck.cpu_variant())
paths, wgrad_winograd = set(), False
for shape, k in [((2, 16, 12, 12), 3), ((1, 16, 6, 6), 13), ((2, 24, 12, 13), 7), ((1, 16, 24, 27), 31),
                 ((2, 16, 18, 20), 9), ((1, 24, 20, 22), 9), ((1, 24, 10, 17), 7)]:
    for cl in (False, True):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            g = torch.Generator().manual_seed(sum(shape) + k)
            x, gy = (torch.randn(*shape, generator=g) for _ in range(2))
            if cl:
                x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
            w, b = torch.randn(shape[1], 1, k, k, generator=g), torch.randn(shape[1], generator=g)
            paths.add(ck.cpp_conv_path(x, w))
            wgrad_winograd |= ck.cpp_wgrad_winograd(x, w)
            c, pad = shape[1], k // 2
            got = [ck.cpp_conv(x, w, b), ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, k, k)]
            ref = [F.conv2d(x.double(), w.double(), b.double(), padding=pad, groups=c),
                   F.conv2d(gy.double(), w.double().flip(-2, -1), padding=pad, groups=c),
                   torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), padding=pad, groups=c)]
            for a, r in zip(got, ref):
                err = ((a.double() - r).abs().max() / r.abs().max()).item()
                assert err <= 1e-5, (shape, k, cl, threads, err)
print(sorted(paths), wgrad_winograd)
assert len(paths) == len(ck.CONV_PATHS) and wgrad_winograd
"""


def _cpu_runs_x86_64_v3() -> bool:
    """Whether this is an x86-64 CPU that runs x86-64-v3 code (AVX2, FMA, BMI2, MOVBE, as /proc/cpuinfo says)."""
    info = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not info.exists():
        return False
    flags = next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "").split()
    return {"avx2", "fma", "bmi2", "movbe"} <= set(flags)


@pytest.mark.skipif(not _cpu_runs_x86_64_v3(), reason="x86-64-v3 code needs an x86-64 CPU with AVX2 (and Linux)")
def test_the_avx2_build_matches_conv2d_in_every_path():
    """What an AVX2-only CPU runs: the kernel built for ``-march=x86-64-v3`` (AVX2 and FMA, 16 vector registers,
    ``$FASTCONV_CPU_MARCH``; the native build's 8-lane code on an AVX-512 machine may use AVX-512VL's 32 registers
    and other instructions), its 8-lane variant, in a fresh process: forward, input gradient (flipped kernel) and
    weight gradient against F.conv2d in float64, on NCHW and channels_last input, 1 and 2 threads, in every forward
    path of ``ck.CONV_PATHS`` (packed planes plain, swapped and in Winograd rows, the direct tiles straight, on packed
    rows and in Winograd rows) and the weight gradient's Winograd rows."""
    need_cpp()
    env = {**os.environ, ck.ENV_MARCH: "x86-64-v3", ck.ENV_LANES: "8"}
    proc = subprocess.run([sys.executable, "-c", _AVX2_BUILD_CHECK], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(f"{ck._VARIANTS[8]}, forced by ${ck.ENV_LANES}; built for "
                                                  f"-march=x86-64-v3")


def test_explain_names_the_lane_width(monkeypatch):
    need_cpp()
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 9, 9)
    assert f"cpp kernel variant: {ck.cpu_variant()}" in fastconv.explain(x, w)
    monkeypatch.setenv(ck.ENV_LANES, "16")
    assert "cpp kernel variant: 16-lane" in fastconv.explain(x, w)
    assert f"cpu{torch.get_num_threads()}t16l" in dispatch.cache_key(x, w, None)  # timings are per lane width
    # the work split: packed rows (9x9 on channels_last, 16 lanes: 3 blocks of 2 images, 6 units) in bands (one band
    # on one thread; halved to 2 for 12 units on two), and with the weight's gradient the batch's slices (3 channel
    # groups -> 2 slices of the 2 images)
    xc = torch.randn(2, 48, 48, 48).contiguous(memory_format=torch.channels_last)
    wc = torch.randn(48, 1, 9, 9, requires_grad=True)
    assert [ck.cpp_work_split(xc, wc, threads=t)["row_bands"] for t in (1, 2)] == [1, 2]
    split = ck.cpp_work_split(xc, wc)
    threads, bands = split["threads"], split["row_bands"]
    text = fastconv.explain(xc, wc)
    path = _expected_path(xc.shape, (9, 9), channels_last=True)  # (in Winograd rows where the AVX-512 tuning says)
    assert path in (ck.CONV_PATHS[3], ck.CONV_PATHS[5])
    assert f"{path} ({bands} band(s) of output rows per image and channel block over {threads} " in text
    rows = " in Winograd F(3, 3) rows" if _winograd(None, 48, 48, 9, 9, weight_grad=True) else ""
    assert f"weight gradient{rows} in 2 slice(s) of the batch per channel group" in text
    assert "slice(s)" not in fastconv.explain(xc, wc.detach())
    # large kernels on large maps: the Winograd rows, named for the forward and for the weight gradient
    xw, ww = torch.randn(1, 32, 32, 32), torch.randn(32, 1, 31, 31, requires_grad=True)
    text = fastconv.explain(xw, ww)
    path = _expected_path(xw.shape, (31, 31), channels_last=False)  # Winograd rows: in direct tiles, or on planes
    assert (f"through {ck.CONV_PATHS[4]} (units of one plane" in text) == (path == ck.CONV_PATHS[4])
    bands = ck.cpp_work_split(xw, ww)["row_bands"]
    assert (f"through {ck.CONV_PATHS[5]} ({bands} band(s) of output rows" in text) == (path == ck.CONV_PATHS[5])
    assert ("weight gradient in Winograd F(3, 3) rows in 1 slice(s)" in text) == _winograd(None, 32, 32, 31, 31,
                                                                                              weight_grad=True)
    # with both gradients: one pass, each plane of the output gradient packed once (2 blocks: whole rounds of units on
    # one or two threads), or its packed rows read by both where the map is one band (on one thread)
    xg = xw.clone().requires_grad_()
    plan = ck.cpp_backward_plan(xg, ww)
    assert plan == (2 if path == ck.CONV_PATHS[4] else 1 if bands == 1 else 0) or torch.get_num_threads() > 2
    assert (f"both gradients in one pass ({ck.BACKWARD_PLANS[plan]})" in fastconv.explain(xg, ww)) == (plan != 0)


def test_small_kernels_run_the_stock_call_without_timing_on_channels_last(monkeypatch, backend_spy):
    """channels_last input: K=3 (any grads) and K<=5 without weight gradient run plain F.conv2d, never timed, where
    the C++ kernel would go through packed planes (12 channels: not whole vectors of 8 or 16); K=5 with the weight
    gradient is timed as before. Where the C++ kernel computes straight on the channels_last tensors (32 channels,
    rows of 16), K<=5 without weight gradient is timed (the direct tiles beat the stock call there) against the
    native call only; K=3 with the weight gradient stays the stock call."""
    timed = []
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: timed.append(name) or 1.0)
    x = torch.randn(2, 12, 12, 12).contiguous(memory_format=torch.channels_last)
    ran = backend_spy
    for k, grad_w in ((3, True), (3, False), (5, False), (1, True)):
        w = torch.randn(12, 1, k, k, requires_grad=grad_w)
        xg = x.clone().requires_grad_()
        d = dispatch.decide(xg, w, None)
        assert d["backend"] == "native" and "stock F.conv2d" in d["why"], d
        y = fastconv.depthwise_conv2d(xg, w)
        assert y.grad_fn is not None and "DepthwiseConv2dFn" not in type(y.grad_fn).__name__  # PyTorch's autograd
        assert torch.allclose(y, F.conv2d(x, w, padding=k // 2, groups=12), atol=1e-5)
    assert timed == [] and set(ran) == {"native"}
    w5 = torch.randn(12, 1, 5, 5, requires_grad=True)
    assert "stock" not in dispatch.decide(x.clone().requires_grad_(), w5, None)["why"] and timed
    if not ck.cpp_multithreaded():  # (without OpenMP on several threads the C++ kernel is no candidate to time)
        return
    xd = torch.randn(1, 32, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert ck.cpp_conv_path(xd, w5) in ck.DIRECT_CONV_PATHS
    for k in (3, 5):
        d = dispatch.decide(xd, torch.randn(32, 1, k, k), None)
        # "channels_last" on a channels_last input without weight gradient is the native call behind more Python
        assert "stock F.conv2d" not in d["why"] and set(d["times_ms"]) == {"cpp", "native"}, d
    assert "channels_last" in dispatch.candidates(xd, torch.randn(32, 1, 5, 5, requires_grad=True), None)[0]
    d = dispatch.decide(xd, torch.randn(32, 1, 3, 3, requires_grad=True), None)
    assert d["backend"] == "native" and "stock F.conv2d" in d["why"], d


def _expected_path(shape, kernel, channels_last: bool) -> str:
    """The path dw_conv_path should name for a map of at least one tile's width and whole channel blocks (the rule
    in dwconv.cpp's conv_path): Winograd rows in direct tiles (``_winograd_direct``), else on packed planes
    (``_winograd``); direct tiles up to 21 (AVX-512) or 13, from packed rows past 48 taps (49 with the Zen 4 tuning,
    ``ck.cpu_tuning()``: 7x7 runs straight there; on any layout, but on channels_last only in the 16 lanes lowered to
    256-bit vectors), else straight from a channels_last tensor of whole blocks, else
    from packed rows on maps from 16 wide (not in the lowered lanes), else packed planes."""
    variant = ck.cpu_variant()
    avx512, lowered = variant.startswith(ck._VARIANTS[16]), variant.startswith(ck._VARIANTS[17])
    tile = 4 if lowered else 8
    kh, kw = kernel
    if _winograd_direct(None, *shape[-2:], kh, kw, channels_last):
        return ck.CONV_PATHS[5]
    if _winograd(None, *shape[-2:], kh, kw):
        return ck.CONV_PATHS[4]
    if max(kernel) > (21 if avx512 else 13) or shape[-1] < (16 if avx512 else tile):  # (a row narrower than a tile)
        return ck.CONV_PATHS[0]
    if kh * kw > (49 if ck.cpu_tuning() == 1 else 48) and (channels_last or not lowered):
        return ck.CONV_PATHS[3]
    if channels_last and shape[1] % ck.cpu_lanes() == 0:
        return ck.CONV_PATHS[1]
    return ck.CONV_PATHS[3] if not lowered and shape[-1] >= 16 else ck.CONV_PATHS[0]  # (packed rows from 16 wide)


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("shape,kernel", [
    ((2, 32, 9, 16), (3, 3)),  # rows of exactly one 16-pixel tile (two 8-pixel ones)
    ((1, 48, 5, 20), (5, 5)),  # the last tile of a row overlaps the one before
    ((2, 16, 11, 37), (7, 3)),  # KH != KW, several tiles, edge tiles on both sides
    ((1, 32, 6, 19), (3, 13)),  # a kernel row in chunks (13 columns; 6 + 6 + 1 with 8 lanes) reaching both edges
    ((1, 16, 4, 24), (13, 9)),  # a kernel taller than the map: the kernel rows outside it are skipped
    ((2, 16, 7, 16), (11, 11)),
    ((1, 32, 23, 17), (17, 21)),  # AVX-512: packed rows up to 21 (the bands' halos cut by both map edges); else planes
])
def test_direct_channels_last_tiles_match_conv2d_in_float64(lanes, shape, kernel, monkeypatch, one_thread):
    """The C++ forward and input gradient in direct tiles on channels_last tensors (packed planes for the 17 x 21
    kernel without AVX-512): forward, input and weight gradient vs F.conv2d in float64 (the autograd check, whose
    output gradient is NCHW), the input gradient on a channels_last output gradient (the direct tiles with the
    flipped kernel) vs F.conv2d with the flipped kernel, and the forward against the same call on its NCHW copy
    (packed planes, or from 7x7 with AVX-512 packed rows; the same sums in the same order, up to a multiply-add left
    unfused); a channels_last view (every second column) runs the direct tiles as well, and
    two threads give the one thread's numbers exactly. From 49 taps (7x7) the tiles read a compact copy of each
    channel block's rows, in bands of output rows (at least 4 bands per thread: here bands of 1-12 rows, their halos
    cut by the map's edges; a different banding on two threads)."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    g = torch.Generator().manual_seed(sum(shape) * 100 + sum(kernel))
    x = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, 1, *kernel, generator=g), torch.randn(c, generator=g)
    kh, kw = kernel
    expected = _expected_path(shape, kernel, channels_last=True)
    assert ck.cpp_conv_path(x, w) == expected
    y, _ = _cpp_matches_conv2d_in_float64(x, w, b, g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    nchw_path = _expected_path(shape, kernel, channels_last=False)
    assert ck.cpp_conv_path(x.contiguous(), w) == nchw_path
    winograd = {expected, nchw_path} & {ck.CONV_PATHS[4], ck.CONV_PATHS[5]}  # other sums: within float32's rounding
    assert _rel(y.detach(), ck.cpp_conv(x.contiguous(), w, b)) <= (1e-5 if winograd else 1e-6)
    wide = torch.randn(shape[0], c, shape[2], 2 * shape[3], generator=g).contiguous(memory_format=torch.channels_last)
    view = wide[..., ::2]
    assert ck.cpp_conv_path(view, w) == expected
    ref = F.conv2d(view.double(), w.double(), b.double(), padding=(kh // 2, kw // 2), groups=c)
    one, flipped = ck.cpp_conv(view, w, b), ck.cpp_conv(x, w, None, flip=True)
    assert _rel(one.double(), ref) <= 1e-5
    ref_flipped = F.conv2d(x.double(), w.flip(-1, -2).double(), padding=(kh // 2, kw // 2), groups=c)
    assert _rel(flipped.double(), ref_flipped) <= 1e-5
    torch.set_num_threads(2)
    assert torch.equal(ck.cpp_conv(view, w, b), one) and torch.equal(ck.cpp_conv(x, w, None, flip=True), flipped)


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_packed_rows_read_and_write_any_layout_in_float64(lanes, layout, monkeypatch, one_thread):
    """The direct tiles from packed rows read any layout through pack_row (transposes on NCHW rows, copies on
    channels_last, scalar for other strides and the last, partial channel block) and write any layout (straight into
    a channels_last output of whole blocks, else through one row buffer and unpack_row). C = 24: a block and a half
    with 16 lanes, three blocks with 8; a 9 x 7 kernel. Forward, input and weight gradient vs F.conv2d in float64
    (through autograd, on a dense copy of the input: the strided view's own forward must equal it bit for bit), the
    flipped kernel of the input gradient, and two threads bit-equal to one."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    g = torch.Generator().manual_seed(24)
    x = torch.randn(2, 24, 19, 18, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 24, 19, 36, generator=g)[..., ::2]  # pixel stride 2
    w, b = torch.randn(24, 1, 9, 7, generator=g), torch.randn(24, generator=g)
    assert ck.cpp_conv_path(x, w) == _expected_path(x.shape, (9, 7), channels_last=layout == "channels_last")
    y, _ = _cpp_matches_conv2d_in_float64(x, w, b, g)
    ref_flipped = F.conv2d(x.double(), w.flip(-1, -2).double(), padding=(4, 3), groups=24)
    one, flipped = ck.cpp_conv(x, w, b), ck.cpp_conv(x, w, None, flip=True)
    assert torch.equal(one, y.detach()) and _rel(flipped.double(), ref_flipped) <= 1e-5
    torch.set_num_threads(2)
    assert torch.equal(ck.cpp_conv(x, w, b), one) and torch.equal(ck.cpp_conv(x, w, None, flip=True), flipped)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_packed_row_bands_give_every_thread_the_same_number_of_units(layout, monkeypatch, one_thread):
    """C = 48 (three 16-lane blocks), 90 x 90, 7 x 7: bands of up to 85 rows fit the band buffer, 2 bands -> 6 units,
    halved to 3 bands -> 9 units (on 2 threads one of them ran 5), so 4 bands (23, 23, 23 and a short 21 rows) -> 12
    units; on one thread the 2 bands. The numbers do not depend on the banding: forward, input and weight gradient
    vs F.conv2d in float64, and two threads (4 bands) bit-equal to one (2 bands). NCHW runs packed rows with AVX-512
    only (16 lanes lowered to AVX2 run it on the planes)."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, "16")
    g = torch.Generator().manual_seed(48)
    x = torch.randn(1, 48, 90, 90, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, b = torch.randn(48, 1, 7, 7, generator=g), torch.randn(48, generator=g)
    assert ck.cpp_work_split(x, w, threads=2)["row_bands"] == 4 and ck.cpp_work_split(x, w, threads=1)["row_bands"] == 2
    assert ck.cpp_work_split(torch.empty(1, 384, 32, 32), torch.empty(384, 1, 13, 13), threads=2)["row_bands"] == 1
    assert ck.cpp_conv_path(x, w) == _expected_path(x.shape, (7, 7), channels_last=layout == "channels_last")
    y, _ = _cpp_matches_conv2d_in_float64(x, w, b, g)
    one, flipped = ck.cpp_conv(x, w, b), ck.cpp_conv(x, w, None, flip=True)
    assert torch.equal(one, y.detach())
    torch.set_num_threads(2)
    assert torch.equal(ck.cpp_conv(x, w, b), one) and torch.equal(ck.cpp_conv(x, w, None, flip=True), flipped)


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("n,c,threads,groups", [(4, 64, 1, (4, 4)), (4, 64, 2, (2, 4)), (8, 128, 2, (4, 4)),
                                                 (4, 48, 2, (1, 2))])
def test_packed_rows_of_neighbouring_channel_blocks_give_the_same_sums(n, c, threads, groups, lanes, monkeypatch,
                                                                       one_thread):
    """On a channels_last input of whole blocks a unit of the packed rows holds 4 or 2 neighbouring channel blocks
    (their rows copied side by side), where the units stay at least 4 per thread in whole rounds; C = 48 (3 blocks
    of 16 lanes) keeps one (``groups``: with 16 lanes, with 8). The sums do not depend on it: forward and flipped
    forward (the input gradient) bit-equal to the same call one image at a time (1 block per unit there with 2
    threads, 2 with 8 lanes at C = 128), and forward, input and weight gradient vs F.conv2d in float64."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(c + n)
    x = torch.randn(n, c, 13, 21, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, 1, 7, 9, generator=g), torch.randn(c, generator=g)
    assert ck.cpp_conv_path(x, w) == ck.CONV_PATHS[3]
    assert ck.cpp_work_split(x, w)["row_groups"] == groups[lanes == "8"]
    assert ck.cpp_work_split(x.contiguous(), w)["row_groups"] == 1  # NCHW: one block per unit
    y, _ = _cpp_matches_conv2d_in_float64(x, w, b, g)
    assert torch.equal(y.detach(), ck.cpp_conv(x, w, b))
    flipped = ck.cpp_conv(x, w, None, flip=True)
    torch.set_num_threads(2)
    assert ck.cpp_work_split(x[:1], w)["row_groups"] == (2 if lanes == "8" and c == 128 else 1)
    for i in range(n):
        assert torch.equal(ck.cpp_conv(x[i:i + 1], w, b), y[i:i + 1].detach())
        assert torch.equal(ck.cpp_conv(x[i:i + 1], w, None, flip=True), flipped[i:i + 1])


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("channels", [16, 24])
def test_weight_gradient_slices_the_images_of_few_channel_blocks(channels, lanes, layout, monkeypatch, one_thread):
    """Few channel groups (a group: one block, or with 8 lanes on a channels-innermost tensor the two blocks of a cache
    line): the weight gradient cuts the N = 5 images into min(N, ceil(4 / groups)) slices, summed in order. C = 16:
    one 16-lane block, two 8-lane blocks (one group on channels_last, two on NCHW); C = 24: a block and a half, or
    three 8-lane blocks (two groups, the last of one block, on channels_last). "mixed": NCHW input, channels_last
    output gradient (the kernel groups blocks when either is channels-innermost). vs float64, and the same numbers on
    1 and 2 threads; C = 64 keeps one slice."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    g = torch.Generator().manual_seed(channels)
    x, gy = (torch.randn(5, channels, 12, 14, generator=g) for _ in range(2))
    cl = torch.channels_last
    if layout != "nchw":
        gy = gy.contiguous(memory_format=cl)
        x = x.contiguous(memory_format=cl) if layout == "channels_last" else x
    blocks = -(-channels // int(lanes))
    groups = -(-blocks // 2) if lanes == "8" and layout != "nchw" else blocks
    slices = min(5, -(-4 // groups))
    assert ck.cpp_work_split(x, torch.empty(channels, 1, 9, 7), gy)["wgrad_slices"] == slices > 1
    assert ck.cpp_work_split(torch.empty(5, 64, 12, 14), torch.empty(64, 1, 9, 7))["wgrad_slices"] == 1
    exp = torch.nn.grad.conv2d_weight(x.double(), (channels, 1, 9, 7), gy.double(), padding=(4, 3), groups=channels)
    one = ck.cpp_weight_grad(x, gy, 9, 7)
    assert _rel(one.double(), exp) <= 1e-5
    torch.set_num_threads(2)
    assert torch.equal(ck.cpp_weight_grad(x, gy, 9, 7), one)


def _one_pass_gives_the_separate_gradients(x, gy, w, got, separate, monkeypatch) -> None:
    """cpp_backward's one pass (``got``, computed on one thread) equals the separate gradients bit for bit, with their
    strides, and so does it on two threads; the autograd backward of depthwise_conv2d takes it (once)."""
    gx_sep, gw_sep = separate
    assert torch.equal(got[0], gx_sep) and got[0].stride() == gx_sep.stride() and torch.equal(got[1], gw_sep)
    torch.set_num_threads(2)
    two = ck.cpp_backward(x, gy, w)
    assert two is not None and torch.equal(two[0], gx_sep) and torch.equal(two[1], gw_sep)
    calls, real = [], ck.cpp_backward
    monkeypatch.setattr(ck, "cpp_backward", lambda *a: calls.append(1) or real(*a))
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    grads = torch.autograd.grad(fastconv.depthwise_conv2d(*leaves, backend="cpp"), leaves, gy)
    assert calls == [1] and torch.equal(grads[0], gx_sep) and torch.equal(grads[1], gw_sep)
    monkeypatch.setattr(ck, "cpp_backward", real)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("n,c,slices", [(8, 16, 4), (2, 64, 1), (8, 24, 2)])
def test_fused_backward_gives_the_separate_gradients_bit_for_bit(n, c, slices, layout, monkeypatch, one_thread):
    """cpp_backward: input and weight gradient in one pass where the input gradient runs packed rows with one band
    per plane (16 lanes; NCHW with AVX-512 only), 16 x 16 maps, 7 x 7: N = 8, C = 16 (one block, 4 slices of 2
    images), N = 2, C = 64 (4 blocks, one slice: gw written per unit), N = 8, C = 24 (a block and a half, 2 slices).
    The same numbers as cpp_conv(g, w, flip) and cpp_weight_grad (which match float64), on 1 and 2 threads, and the
    autograd backward of depthwise_conv2d takes it (and a 5 x 5 kernel where it runs packed rows too: NCHW, or a
    partial block). Where it does not apply (a 5 x 5 kernel on channels_last tensors of whole blocks, which runs
    straight tiles; a map cut into bands) it computes nothing and returns None."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, "16")
    g = torch.Generator().manual_seed(n * c)
    x, gy = (torch.randn(n, c, 16, 16, generator=g) for _ in range(2))
    cl = torch.channels_last
    if layout != "nchw":
        gy = gy.contiguous(memory_format=cl)
        x = x.contiguous(memory_format=cl) if layout == "channels_last" else x
    w = torch.randn(c, 1, 7, 7, generator=g)
    fused = _expected_path(gy.shape, (7, 7), channels_last=gy.stride(1) == 1) in ck.ROW_CONV_PATHS
    assert ck.cpp_work_split(gy, w, threads=2) == {"threads": 2, "row_bands": 1, "row_groups": 1, "wgrad_slices": slices}
    gx_sep, gw_sep = ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, 7, 7)
    exp = torch.nn.grad.conv2d_weight(x.double(), (c, 1, 7, 7), gy.double(), padding=3, groups=c)
    assert _rel(gw_sep.double(), exp) <= 1e-5
    got = ck.cpp_backward(x, gy, w)
    assert (got is not None) == fused
    assert ck.cpp_backward_plan(x, w, gy) == (1 if fused else 0)
    five = torch.randn(c, 1, 5, 5)  # straight tiles of whole blocks, else (C = 24 or NCHW) packed rows: one pass
    straight = ck.cpp_conv_path(gy, five) == ck.CONV_PATHS[1]
    assert straight == (layout != "nchw" and c % 16 == 0)
    assert (ck.cpp_backward(x, gy, five) is None) == straight
    if fused:
        _one_pass_gives_the_separate_gradients(x, gy, w, got, (gx_sep, gw_sep), monkeypatch)
    torch.set_num_threads(2)
    big = torch.randn(1, c, 96, 96)
    assert ck.cpp_work_split(big, w, threads=2)["row_bands"] > 1 and ck.cpp_backward(big, big, w) is None


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("n,c,hw,kernel", [
    (1, 32, (32, 32), (31, 31)),  # RepLKNet's 31 x 31: Winograd rows (in direct tiles on packed rows, read by both
                                  # gradients; plain planes in the 16 lanes lowered to 256-bit vectors)
    (8, 16, (24, 26), (23, 21)),  # 8 lanes: Winograd rows over 4 slices of 2 images of one block: partial sums
    (8, 16, (26, 28), (25, 23)),  # the same on AVX-512 (a map too small for the direct tiles in Winograd rows)
    (2, 20, (14, 14), (13, 13)),  # plain planes (AVX-512: a map narrower than a direct tile), a lane tail
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
def test_fused_backward_on_planes_gives_the_separate_gradients_bit_for_bit(lanes, n, c, hw, kernel, layout,
                                                                           monkeypatch, one_thread):
    """cpp_backward where the input gradient runs packed planes (plain, or Winograd F(3, 3) rows): each plane of the
    output gradient is packed once, for the input gradient's padded input and, its interior, the weight gradient's
    "kernel" (dwconv.cpp's backward_planes). The same numbers as cpp_conv(g, w, flip) and cpp_weight_grad, which
    match float64, on 1 and 2 threads, and the autograd backward of depthwise_conv2d takes it; with too few units to
    keep two threads busy (3 blocks of 16 channels, one image) it computes nothing and returns None."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    g = torch.Generator().manual_seed(n * c + kernel[0])
    x, gy = (torch.randn(n, c, *hw, generator=g) for _ in range(2))
    if layout != "nchw":
        gy = gy.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w = torch.randn(c, 1, *kernel, generator=g)
    (kh, kw), path = kernel, ck.cpp_conv_path(gy, w)
    planes = path in (ck.CONV_PATHS[0], ck.CONV_PATHS[4])
    assert path == _expected_path(gy.shape, kernel, channels_last=layout != "nchw")
    gx_sep, gw_sep = ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, kh, kw)
    pad = (kh // 2, kw // 2)
    assert _rel(gx_sep.double(), F.conv2d(gy.double(), w.double().flip(-2, -1), padding=pad, groups=c)) <= 1e-5
    assert _rel(gw_sep.double(), torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), padding=pad,
                                                            groups=c)) <= 1e-5
    got = ck.cpp_backward(x, gy, w)
    if not planes:  # direct tiles on packed rows (plain: the test above; or in Winograd rows), read by both gradients
        assert path in ck.ROW_CONV_PATHS
        if ck.cpp_backward_plan(x, w, gy) == 1 and ck.cpp_backward_plan(x, w, gy, threads=2) == 1:
            _one_pass_gives_the_separate_gradients(x, gy, w, got, (gx_sep, gw_sep), monkeypatch)
        elif got is not None:  # one pass on one thread only (two threads cut the planes into bands: 8 lanes, C = 32)
            assert torch.equal(got[0], gx_sep) and torch.equal(got[1], gw_sep)
        return
    assert got is not None and ck.cpp_backward_plan(x, w, gy) == 2
    _one_pass_gives_the_separate_gradients(x, gy, w, got, (gx_sep, gw_sep), monkeypatch)
    if lanes == "16" and kernel == (31, 31):
        few = x[:, :16].repeat(1, 3, 1, 1)  # 3 blocks of 16 channels, one image: 3 units on 2 threads
        assert ck.cpp_backward_plan(few, w[:16].repeat(3, 1, 1, 1)) == 0
        assert ck.cpp_backward(few, few, w[:16].repeat(3, 1, 1, 1)) is None


def test_small_kernels_on_nchw_are_timed_by_their_typical_time(monkeypatch):
    """NCHW input: PyTorch's own call is bimodal there (K=3: a fast run in a few % of the calls), so small kernels
    are timed like any other, and a candidate's time in a round is the median of its repeats, not its best run."""
    seq = {"native": [0.010, 0.010, 0.001] + [0.010] * 20, "channels_last": [0.004] * 21, "cpp": [0.003] * 21}
    clock = {"t": 0.0}

    def fake_run(name, x, w, b):  # each call advances a fake clock by this backend's next duration
        clock["t"] += seq[name].pop(0) if len(seq[name]) > 1 else seq[name][0]
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1])

    monkeypatch.setattr(dispatch, "run_backend", fake_run)
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: clock["t"])
    x, w = torch.randn(1, 8, 12, 12), torch.randn(8, 1, 3, 3)
    times = {b: dispatch._time_backend(b, x, w, None, False, False, budget_s=1.0) for b in seq}
    # native's one fast run (a warm-up and one timed call come before it) is not its time
    assert times == pytest.approx({"native": 0.010, "channels_last": 0.004, "cpp": 0.003})
    d = dispatch.decide(x, w, None)
    assert d["backend"] in dispatch.candidates(x, w, None)[0] and "stock F.conv2d" not in d["why"]
    assert "autotuned" in d["why"] and "native" in d["times_ms"]
    assert ("cpp" in d["times_ms"]) == ck.cpp_available()
    assert dispatch._ESTIMATOR in dispatch.cache_key(x, w, None)  # decisions of an older estimator are re-timed


@pytest.mark.parametrize("call_s,expected", [(0.0001, {2: 15, 3: 15}), (0.0012, {2: 7, 3: 5}), (0.01, {2: 3, 3: 3})])
def test_cheap_calls_get_more_autotune_rounds(call_s, expected, monkeypatch):
    """The autotuner's CPU rounds: at least 3, up to 15 while the timing took under 0.15 s (each candidate's timing
    here takes 10 x ``call_s`` of a fake clock; ``expected``: rounds by the number of candidates, 3 with the C++
    kernel, 2 without a compiler). The first round repeats each candidate, the later ones time one call each; each
    round runs the candidates in a fresh order."""
    clock, timed, repeats = {"t": 0.0}, [], []

    def fake_time(name, *a, repeat=True, **k):
        clock["t"] += 10 * call_s
        timed.append(name)
        repeats.append(repeat)
        return call_s

    monkeypatch.setattr(dispatch, "_time_backend", fake_time)
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: clock["t"])
    x, w = torch.randn(1, 8, 12, 12), torch.randn(8, 1, 7, 7)  # forward on NCHW: timed
    dispatch.decide(x, w, None)
    n = len(set(timed))
    rounds = [timed[i:i + n] for i in range(0, len(timed), n)]
    assert n in expected and len(rounds) == expected[n] and all(sorted(r) == sorted(set(timed)) for r in rounds)
    if len(rounds) >= 5:  # a fresh order each round (no candidate always after the same one)
        assert len({tuple(r) for r in rounds}) > 1
    assert repeats == [True] * n + [False] * (len(timed) - n)


def test_later_autotune_rounds_time_one_call(monkeypatch):
    """A first round warms up and repeats (``_time_backend``'s default); a later round (``repeat=False``) times one
    call of the candidate, without warm-up, so that the candidates alternate call by call."""
    calls, real = [], dispatch.run_backend
    monkeypatch.setattr(dispatch, "run_backend", lambda *a: calls.append(a[0]) or real(*a))
    x, w = torch.randn(1, 8, 12, 12), torch.randn(8, 1, 7, 7)
    t = dispatch._time_backend("native", x, w, None, False, False, budget_s=1.0, repeat=False)
    assert calls == ["native"] and 0 < t < 1
    calls.clear()
    dispatch._time_backend("native", x, w, None, False, False, budget_s=1.0)
    assert len(calls) >= 5  # warm-up, first call, at least 3 repeats


def test_autotune_judges_the_stock_tie_on_the_typical_round(monkeypatch):
    """The stock tie is judged on the median per-round ratio, not on each candidate's best round: here the C++
    kernel's best round is 13 % under the stock call's best (the best times alone pick it), but in two rounds of
    three it is only 3 % faster, so the stock call keeps the call; where it is 15 % faster in every round it wins."""
    def run(cpp_rounds):
        native_rounds, calls = (0.30, 0.35, 0.35), {}

        def fake_time(name, *a, **k):
            i = calls.get(name, 0)  # this candidate's round (its calls so far)
            calls[name] = i + 1
            seq = {"native": native_rounds, "cpp": cpp_rounds}.get(name, (1.0,))
            return seq[i % len(seq)]

        monkeypatch.setattr(dispatch, "_time_backend", fake_time)
        monkeypatch.setattr(dispatch, "CPU_TIMING_MAX_ROUNDS", 3)  # three rounds, whatever the real clock says
        dispatch.clear_cache()
        x, w = torch.randn(1, 8, 12, 12), torch.randn(8, 1, 7, 7)  # forward on NCHW: timed
        return dispatch.decide(x, w, None), calls

    d, calls = run((0.26, 0.34, 0.34))
    assert calls["cpp"] == 3 and d["backend"] == "native" and "less than 10% faster" in d["why"]
    assert d["times_ms"]["native"] == pytest.approx(300.0)
    assert d["times_ms"]["cpp"] == pytest.approx(300 * 0.34 / 0.35, abs=1e-4)
    d, _ = run((0.255, 0.2975, 0.2975))
    assert d["backend"] == "cpp" and d["times_ms"]["cpp"] == pytest.approx(255.0, abs=1e-4)


def test_cpu_timing_starts_from_a_settled_allocator(monkeypatch):
    """The allocator is settled (one 30 MB block allocated and freed, ``_settle_allocator``) once per process,
    before the first CPU timing; a second decision does not repeat it."""
    monkeypatch.setattr(dispatch, "_SETTLED", [])
    blocks, real_empty = [], torch.empty

    def empty(*a, **k):
        t = real_empty(*a, **k)
        blocks.append(t.numel() * t.element_size())
        return t

    seen = []
    monkeypatch.setattr(dispatch.torch, "empty", empty)
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: seen.append(list(blocks)) or 1e-3)
    for k in (7, 9):
        dispatch.decide(torch.randn(1, 8, 12, 12), torch.randn(8, 1, k, k), None)
    assert len(seen) >= 6 and all(s == [30 * 2**20] for s in seen)


def test_cpu_description_and_probes():
    d = roofline.cpu_description()
    assert {"cpu_model", "isa", "cpu_count"} <= set(d) and d["cpu_model"] and d["isa"]
    assert roofline.sgemm_gflops("cpu", n=64, repeats=1) > 0
    peak = roofline.fma_peak_gflops(threads=1, flops_per_thread=2e7, repeats=1)
    assert peak is None or peak > 0
    lanes = roofline.fma_lanes()
    assert lanes is None or lanes in (8, 16)


def test_sgemm_rate_is_the_best_gemm_library(monkeypatch):
    """The SGEMM reference is the faster of torch.mm (the BLAS) and a 1x1 convolution (oneDNN): on an AMD EPYC with
    AVX-512 MKL's torch.mm ran at less than half oneDNN's rate, and fractions of it came out above 1. Each rate is the
    FLOPs its probe runs (counted by torch's flop counter; 2 n^3 for both where 4 n is a square) over its time (a
    fake clock: every call takes 0.5 s)."""
    import itertools
    import types

    from torch.utils.flop_counter import FlopCounterMode

    for n in (64, 30):  # 30: the convolution's map (11 x 11) does not make 2 n^3 FLOPs
        monkeypatch.setattr(roofline, "time", types.SimpleNamespace(perf_counter=itertools.count(0.0, 0.5).__next__))
        with FlopCounterMode(display=False) as counter:
            rates = roofline.sgemm_probes("cpu", n=n, repeats=1)
        per_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        assert set(per_op) == {"aten.mm", "aten.convolution"} and per_op["aten.mm"] == 3 * 2 * n ** 3  # 2 warm-ups
        assert (per_op["aten.convolution"] == 3 * 2 * n ** 3) == (n == 64)
        assert rates == pytest.approx({"mm": per_op["aten.mm"] / 3 / 0.5 / 1e9,
                                       "conv1x1": per_op["aten.convolution"] / 3 / 0.5 / 1e9})
    monkeypatch.setattr(roofline, "sgemm_probes", lambda *a, **k: {"mm": 180.0, "conv1x1": 450.0})
    assert roofline.sgemm_gflops("cpu") == 450.0
    monkeypatch.setattr(roofline, "sgemm_probes", lambda *a, **k: {"mm": 500.0, "conv1x1": 450.0})
    assert roofline.sgemm_gflops("cpu") == 500.0


def test_cached_rates_of_the_mm_only_probe_are_not_read(tmp_path, monkeypatch):
    """A cache entry written before the 1x1-convolution probe (key without the probes) would keep the BLAS-only
    rate as the reference: it is neither read nor merged into the new entry."""
    cache = tmp_path / "rc"
    monkeypatch.setenv("FASTCONV_CACHE", str(cache))
    fastconv.configure(cache_dir=cache)
    monkeypatch.setattr(roofline, "_memo", {})
    desc, threads, key = roofline._machine_key()
    old_key = key.rsplit("|", 1)[0]
    assert key.endswith("|mm+conv1x1") and old_key.count("|") == 3
    cache.mkdir(parents=True)
    (cache / "roofline.json").write_text(json.dumps({old_key: {**desc, "threads": threads, "torch": torch.__version__,
                                                               "sgemm_gflops": 1e6, "fma_peak_gflops": None}}))
    monkeypatch.setattr(roofline, "sgemm_gflops", lambda *a, **k: 42.0)
    assert roofline.machine_roofline(fma=False, cache=True)["sgemm_gflops"] == 42.0
    assert json.loads((cache / "roofline.json").read_text())[key]["sgemm_gflops"] == 42.0


def test_machine_roofline_cache_file(tmp_path, monkeypatch):
    cache = tmp_path / "rc"
    monkeypatch.setenv("FASTCONV_CACHE", str(cache))
    fastconv.configure(cache_dir=cache)
    monkeypatch.setattr(roofline, "_memo", {})
    monkeypatch.setattr(roofline, "sgemm_gflops", lambda *a, **k: 12.3)
    r = roofline.machine_roofline(fma=False, cache=True)
    assert r["sgemm_gflops"] == 12.3 and r["fma_peak_gflops"] is None and r["threads"] == torch.get_num_threads()
    stored = json.loads((cache / "roofline.json").read_text())
    assert list(stored.values()) == [r]
    # a new process (memo cleared) reads the file instead of measuring again
    monkeypatch.setattr(roofline, "_memo", {})
    monkeypatch.setattr(roofline, "sgemm_gflops", lambda *a, **k: pytest.fail("measured again"))
    assert roofline.machine_roofline(fma=False, cache=True) == r
    assert "SGEMM 12.3 GFLOP/s" in roofline.describe(r)


def test_benchmark_reports_ratio_and_roofline(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_fastconv", REPO_ROOT / "benchmarks" / "bench_fastconv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(roofline, "_memo", {})
    monkeypatch.setattr(roofline, "sgemm_gflops", lambda *a, **k: 10.0)
    calls = []  # the start's probes (2 threads, again, 1 thread) read 20; the per-round ones 25: the run's best

    def probe(*a, **k):
        calls.append(1)
        return 20.0 if len(calls) <= 3 else 25.0

    monkeypatch.setattr(roofline, "fma_peak_gflops", probe)
    for name in bench.STOCK_ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    bench.main(["--kernels", "3,13", "--res", "8", "--channels", "4", "--repeats", "3", "--min-time", "0",
                "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "SGEMM 10.0 GFLOP/s, FMA peak 20.0 GFLOP/s" in text and "load average" in text
    assert "roofline: best time over the run's best FMA probe, 25.0 GFLOP/s" in text
    threads = torch.get_num_threads()
    if threads > 1:  # 20 GFLOP/s on 1 thread and on all: the threads share a core, which the header says
        assert f"reach {1 / threads:.2f} of {threads}x that" in text and "WARNING: the threads do not get" in text
    res = json.loads((tmp_path / "fastconv_cpu.json").read_text())
    assert res["roofline"]["fma_peak_gflops"] == 25.0 and res["roofline"]["fma_peak_probes"] == [20.0, 20.0]
    assert "FMA peak 20.0 GFLOP/s" in res["machine"]  # the header, as printed at the start
    rows = res["rows"]
    assert {(r["K"], r["layout"], r["mode"]) for r in rows} == {
        (k, lay, m) for k in (3, 13) for lay in ("nchw", "cl") for m in ("fwd", "fwdbwd")}
    for r in rows:
        stock = ("stock_nchw", "stock_nchw_via_cl") if r["layout"] == "nchw" else ("stock_cl",)
        assert r["best_stock"] in stock
        assert 0 < r["ratio_vs_best_stock"] < float("inf")  # median of per-round ratios (pairs in one round)
        assert r["ratio_of_best_times"] == pytest.approx(r["fastconv_ms"] / min(r[n + "_ms"] for n in stock), rel=0.02)
        best, median = r[r["best_stock"] + "_ms"], r[r["best_stock"] + "_median_ms"]
        assert r["fastconv_ms"] <= r["fastconv_median_ms"] and best <= median
        assert r["never_slower"] == ("PASS" if r["ratio_vs_best_stock"] <= 1.05 else "FAIL")
        passes = 3 if r["mode"] == "fwdbwd" else 1
        assert r["gflops"] == pytest.approx(passes * 2 * 4 * 64 * r["K"] ** 2 / r["fastconv_ms"] / 1e6, rel=0.02)
        inside = passes * roofline.depthwise_flops(1, 4, 8, 8, r["K"], r["K"])["inside"]
        assert r["gflops_inside"] == pytest.approx(inside / r["fastconv_ms"] / 1e6, rel=0.02)
        assert r["gflops_inside"] < r["gflops"]  # some taps always meet the padding
        assert r["fraction_of_fma_peak"] == pytest.approx(r["gflops_inside"] / 25.0, abs=1e-3)
        paired = r["fraction_of_fma_peak_paired"]
        if r["K"] < 13:  # no roofline verdict, no per-round probe
            assert paired is None and r["roofline"] == "-"
        else:  # the median of per-round GFLOP/s over the round's probe (25): at most the best time's fraction
            assert 0 < paired <= r["fraction_of_fma_peak"] * 1.001
            target = 0.85 if r["mode"] == "fwd" else 0.80
            assert r["roofline"] == ("PASS" if r["fraction_of_fma_peak"] >= target else "FAIL")
        if r["K"] == 3 and r["layout"] == "cl":
            assert r["fastconv_backend"] == "native"
    md = (tmp_path / "fastconv_cpu.md").read_text()
    assert "fastconv / best stock" in md and "% FMA peak (paired per round)" in md
    assert len(md.splitlines()) == 10 + len(rows)
    # the stock libraries' instruction-set caps, as the environment set them (none here); an AVX2 model names them
    assert res["stock_isa_caps"] == {} and "- stock libraries: the CPU's own instruction set (no ISA cap set)" in md
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", " ")
    assert bench.stock_isa_caps() == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert bench._describe_caps(bench.stock_isa_caps()) == "capped by $ONEDNN_MAX_CPU_ISA=AVX2"


def test_kernel_ceiling_benchmark_counts_each_level(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_kernel_ceiling.py: the register tile's steady state, one packed plane with every tap and
    skipping the padding, the same plane in Winograd rows (where the variant has them: its executed multiply-adds
    and the direct products, from one time), the whole call; each level's GFLOP/s from its own count of FLOPs and
    its time, over the run's best one-thread FMA probe."""
    need_cpp()
    spec = importlib.util.spec_from_file_location("bench_kernel_ceiling",
                                                  REPO_ROOT / "benchmarks" / "bench_kernel_ceiling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probes = iter([40.0, 50.0])
    monkeypatch.setattr(roofline, "fma_peak_gflops", lambda *a, **k: next(probes))
    fastconv.configure(cache_dir=USER_CACHE)  # the driver's build (the kernel's three variants, ~10 s) is kept
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--kernels", "27", "--res", "12", "--channels", "32", "--rounds", "2",
                           "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "kernel_ceiling_cpu.json").read_text())
    assert res["fma_probes"] == [40.0, 50.0] and "FMA peak 50.0 GFLOP/s" in res["machine"]
    ro, co = res["register_tile"]
    lanes = res["lanes"]
    assert lanes == ck.cpu_lanes() and ro * co >= 2
    rows = {r["level"]: r for r in res["rows"]}
    winograd = not ck.cpu_variant().startswith(ck._VARIANTS[17])  # the lowered 16 lanes have no Winograd rows
    assert set(rows) == {"row", "plane, all", "plane", "call"} | (
        {"Winograd plane, executed", "Winograd plane"} if winograd else set())
    flops = {"row": 2 * ro * co * 27 * lanes, "plane, all": 2 * 12 * 12 * 27 * 27 * lanes,
             "plane": roofline.depthwise_flops(1, lanes, 12, 12, 27, 27)["inside"],
             "Winograd plane": roofline.depthwise_flops(1, lanes, 12, 12, 27, 27)["inside"],
             "Winograd plane, executed": roofline.winograd_rows_flops(1, lanes, 12, 12, 27, 27)["forward"],
             "call": roofline.depthwise_flops(1, 32, 12, 12, 27, 27)["inside"]}
    for level, r in rows.items():
        assert r["gflops_best"] == pytest.approx(flops[level] / r["us_best"] / 1e3, rel=1e-6)
        assert r["fraction_of_fma_peak"] == pytest.approx(r["gflops_best"] / 50.0, rel=1e-6)
        assert 0 < r["us_best"] <= r["us_median"]
    # 12 x 12 with K = 27: most taps meet the padding, which the kernel skips
    assert rows["plane"]["us_best"] < rows["plane, all"]["us_best"]
    if winograd:  # one time, two counts: fewer multiply-adds executed than the direct products
        assert rows["Winograd plane"]["us_best"] == rows["Winograd plane, executed"]["us_best"]
        assert rows["Winograd plane, executed"]["gflops_best"] < rows["Winograd plane"]["gflops_best"]
    assert "| 27 | 12 | plane, all |" in (tmp_path / "kernel_ceiling_cpu.md").read_text()
    assert "register tile" in capsys.readouterr().out


def test_benchmark_pairs_the_roofline_fraction_with_the_round_peak():
    """A round whose peak probe saw half the machine also ran the kernel at half speed: the paired fraction stays
    at the kernel's true 0.8 where the best time over the best probe would read 1.6."""
    spec = importlib.util.spec_from_file_location("bench_fastconv", REPO_ROOT / "benchmarks" / "bench_fastconv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    flops = 8e9  # 0.8 of a 100 GFLOP/s peak takes 0.1 s; rounds 2-4 run on half the machine
    rounds = [{"fastconv_nchw": 0.1 * s, bench.FMA_PROBE: 100.0 / s} for s in (1, 2, 2, 2, 1)]
    assert bench.paired_fraction(rounds, "fastconv_nchw", flops) == pytest.approx(0.8)
    rounds[1][bench.FMA_PROBE] = 100.0  # a probe that caught a good moment of a slow round: one outlier
    assert bench.paired_fraction(rounds, "fastconv_nchw", flops) == pytest.approx(0.8)
    assert bench.paired_fraction(rounds[:2], "fastconv_nchw", flops) is None  # fewer than 3 rounds
    assert bench.paired_fraction([{"fastconv_nchw": 0.1}] * 4, "fastconv_nchw", flops) is None  # never probed


def test_benchmark_judges_the_per_round_ratio():
    """Never-slower compares fastconv with the fastest stock way of the same round, then takes the median: a
    machine that slows down for a few rounds slows both sides of those rounds and leaves the verdict alone, where
    the ratio of the two medians would not; a stock way skipped after two rounds drops out of the later rounds."""
    spec = importlib.util.spec_from_file_location("bench_fastconv", REPO_ROOT / "benchmarks" / "bench_fastconv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stock = ("stock_nchw", "stock_nchw_via_cl")
    # fastconv is 0.9x the best stock way in every round; rounds 3-5 run 4x slower (machine load)
    rounds = [{"fastconv_nchw": 0.9 * s, "stock_nchw": 1.0 * s, "stock_nchw_via_cl": 9.0 * s}
              for s in (1, 1, 4, 4, 4)]
    for rd in rounds[2:]:
        del rd["stock_nchw_via_cl"]  # 9x slower: run only in the first two rounds
    rounds[3]["fastconv_nchw"] = 0.9  # fastconv's one fast round: the ratio of medians would say 0.9 / 4
    assert bench.paired_ratio(rounds, "fastconv_nchw", stock) == pytest.approx(0.9)
    assert bench.paired_ratio(rounds[:2], "fastconv_nchw", stock) is None  # fewer than 3 rounds


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("shape,kernel", [
    ((2, 19, 5, 6), (13, 15)), ((1, 8, 3, 3), (9, 7)), ((3, 24, 14, 14), (27, 27)), ((2, 10, 7, 8), (13, 13)),
    ((2, 9, 4, 4), (7, 31)), ((1, 5, 1, 2), (3, 3)), ((1, 35, 16, 17), (31, 33))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_padding_skip_keeps_the_sums_when_the_kernel_outgrows_the_input(lanes, shape, kernel, layout, monkeypatch,
                                                                        one_thread):
    """Kernels larger than the feature map (RepLKNet-31B's 27x27 on a 14x14 map at 224 px, 31x31 on cue-world's
    small images): the cpp kernel skips the taps that fall wholly in the zero padding, so most products are never
    formed; where K >= 2H - 1 on both axes (all but the (7, 8) / 13x13 case here) the forward and the input
    gradient swap the roles of map and kernel (``swap_roles`` in dwconv.cpp: nothing padded). Forward, input and
    weight gradient still equal F.conv2d in float64, including weight taps that see only padding (K > 2H: their
    gradient is exactly 0)."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    x, w, b, g = _map_kernel_bias(shape, kernel, layout, seed=sum(shape) * 7 + sum(kernel))
    _, grads = _cpp_matches_conv2d_in_float64(x, w, b, g)
    kh, kw = kernel
    h, wd = shape[-2:]
    outside_rows = [i for i in range(kh) if abs(i - kh // 2) >= h]  # taps that only ever meet padding
    outside_cols = [j for j in range(kw) if abs(j - kw // 2) >= wd]
    if outside_rows:
        assert grads[1][:, :, outside_rows, :].abs().max().item() == 0.0
    if outside_cols:
        assert grads[1][:, :, :, outside_cols].abs().max().item() == 0.0


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("shape,kernel", [
    ((1, 16, 23, 26), (31, 31)), ((2, 20, 15, 23), (27, 11)), ((1, 16, 12, 300), (11, 31)), ((1, 9, 15, 18), (31, 11)),
    ((1, 16, 13, 14), (25, 11)), ((1, 16, 22, 26), (23, 27))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_padding_skip_is_bit_exact(lanes, shape, kernel, layout, monkeypatch, one_thread):
    """The packed planes' tiles leave out the products with the zero padding (the input rows and kernel-column
    windows of a tile that lie wholly in it). Only exact zeros are left out, and the sums keep their order: the
    forward and the input gradient equal, bit for bit, the same kernel run on the map with its zero border written
    out (where nothing of the border is known to be padding), cropped: in plain planes (a kernel under 13 wide on a
    map under 16 high or wide: no Winograd rows, whose choice depends on the map's size; the 12 x 300 map's bordered
    rows, 540 pixels, too long for the band buffer of the Winograd rows in direct tiles) and, on maps of 22-23 by 26
    (large enough both ways for the Winograd rows on packed planes of the 8-lane and AVX-512 variants; too small for
    those in direct tiles, and rows of 26 and 266 pixels end in 10 that fit no narrow tile), in the Winograd rows on
    planes. Borders of a multiple of every tile width (5 columns, 3 lowered) keep each output's columns in tiles of
    the same width, and a border of a multiple of 3 rows keeps the Winograd rows' output triplets; a tail row or
    column may still fall in a tile of another shape, where a build could leave one multiply-add unfused (dwconv.cpp's
    corr_plane): a last-bit difference is allowed there, 2^-20 of the sum of the products' magnitudes, far below one
    product left out or counted twice."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    kh, kw = kernel
    ph, pw = 30 * (-(-(kh // 2) // 30)), 120 * (-(-(kw // 2) // 120))  # >= the kernel's own padding
    g = torch.Generator().manual_seed(sum(shape) + 3 * kh + kw)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[1], 1, kh, kw, generator=g)
    padded = F.pad(x, (pw, pw, ph, ph))
    if layout == "channels_last":
        x, padded = (t.contiguous(memory_format=torch.channels_last) for t in (x, padded))
    h, wd = shape[-2:]
    assert ck.cpp_conv_path(x, w) in (ck.CONV_PATHS[0], ck.CONV_PATHS[4])  # the packed planes
    assert ck.cpp_conv_path(padded, w) == ck.cpp_conv_path(x, w)
    for flip in (False, True):
        one = ck.cpp_conv(x, w, None, flip=flip)
        bordered = ck.cpp_conv(padded, w, None, flip=flip)[:, :, ph:ph + h, pw:pw + wd]
        wk = w.flip(-2, -1) if flip else w
        magnitude = F.conv2d(x.double().abs(), wk.double().abs(), padding=(kh // 2, kw // 2), groups=shape[1])
        assert ((one - bordered).double().abs() <= 2.0 ** -20 * magnitude).all(), (flip, (one - bordered).abs().max())
        assert (one == bordered).double().mean().item() >= 0.99  # bit for bit, but for a tail tile's last bits


def _winograd_direct(lanes, h: int, w: int, kh: int, kw: int, channels_last: bool) -> bool:
    """Whether the variant that ``lanes`` selects runs the direct tiles in Winograd rows (dwconv.cpp's wino_direct,
    conv_path 5), on any layout: kernels up to 31 where a band of two kernels' height fits the band buffer (128 Ki
    floats under K = 15, 512 Ki from 15) and a row is at least one tile wide; with AVX-512 tuned for two 512-bit FMA
    units per core (``ck.cpu_tuning()`` 0): K = 13 on maps from 36, 15-21 from 17, for 512-bit FMAs in two halves
    (tuning 1): K = 9-21 on maps from 16, then (both) 23-31 from K - 3 (and 20) where a row's last W mod 16 pixels are
    none or fit a tile of 8; with 8 lanes K = 9-21 on maps from 16, 23-31 on maps from K - 3 (and 24) up to 32; never
    in the 16 lanes lowered to 256-bit vectors."""
    variant = ck.cpu_variant(None if lanes is None else int(lanes))
    if variant.startswith(ck._VARIANTS[17]):
        return False
    avx512 = variant.startswith(ck._VARIANTS[16])
    split_fma = avx512 and ck.cpu_tuning() == 1
    tile = 16 if avx512 else 8  # (and the lanes)
    k, r = min(kh, kw), min(h, w)
    if k < (13 if avx512 and not split_fma else 9) or max(kh, kw) > 31 or w < tile:
        return False
    if (512 if k >= 15 else 128) * 1024 // (w * tile) - (kh - 1) < 2 * kh:
        return False
    if avx512:
        if k <= 21:
            return r >= (16 if split_fma else 36 if k < 15 else 17)
        return r >= max(20, k - 3) and w % 16 in range(9)
    return r >= 16 if k <= 21 else max(24, k - 3) <= r <= 32


def _winograd(lanes, h: int, w: int, kh: int, kw: int, weight_grad: bool = False) -> bool:
    """Whether the kernel variant that ``lanes`` selects runs Winograd rows (dwconv.cpp's wino_rows / wino_wgrad):
    with AVX-512 kernels from 21 on maps from 22, with 8 lanes kernels from 15 on maps from 20 (the weight gradient:
    kernels from 13 on maps from 20, with 8 lanes from 9 on maps from 20, with AVX-512 tuned for cores that split
    512-bit FMAs, ``ck.cpu_tuning()`` 1, from 9 on maps from 16); never in the 16 lanes lowered to 256-bit vectors (that
    variant only tests the 16-lane blocking without AVX-512)."""
    variant = ck.cpu_variant(None if lanes is None else int(lanes))
    if variant.startswith(ck._VARIANTS[17]):
        return False
    if weight_grad:
        avx512 = variant.startswith(ck._VARIANTS[16])
        split_fma = avx512 and ck.cpu_tuning() == 1
        return min(h, w) >= (16 if split_fma else 20) and min(kh, kw) >= (13 if avx512 and not split_fma else 9)
    min_map, min_kernel = (22, 21) if variant.startswith(ck._VARIANTS[16]) else (20, 15)
    return min(h, w) >= min_map and min(kh, kw) >= min_kernel


@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("shape,kernel", [
    ((1, 16, 32, 32), (31, 31)),  # RepLKNet's 31 x 31: 11 chunks (the last with one zero row), 11 triplets
    ((2, 20, 25, 23), (23, 23)),  # the last triplet's last two rows past the map, tail columns, a lane tail
    ((2, 16, 26, 30), (27, 25)),  # KH a multiple of 3, KH != KW; 26 rows = 8 triplets + 2
    ((1, 9, 40, 24), (29, 23)),   # 29 = 9 chunks + 2 zero rows; 14 triplets (tiles of 4 and a tail); 9 channels
    ((2, 16, 24, 26), (21, 19)),  # AVX-512: the weight gradient in Winograd rows, the forward in direct tiles
    ((2, 16, 22, 25), (21, 23)),  # AVX-512: Winograd rows up to the direct tiles' limit
    ((2, 16, 20, 24), (27, 27)),  # AVX-512: plain planes, the weight gradient in Winograd rows; 8 lanes: both
    ((1, 16, 21, 20), (13, 15)),  # the weight gradient of a 13 x 15 kernel in Winograd rows (7 chunks of the map)
    ((2, 16, 18, 24), (27, 27)),  # a map too small for them: plain planes
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_winograd_rows_match_conv2d_in_float64(lanes, shape, kernel, layout, monkeypatch, one_thread):
    """Large kernels on packed planes run Winograd F(3, 3) along the rows (dwconv.cpp's corr_plane_wino: three output
    rows of three kernel rows from five products instead of nine): forward, input and weight gradient (also the
    weight gradient of large maps, whose "kernel" is the map) vs F.conv2d in float64, with bias, rows past the last
    whole triplet, tails of columns and channels, kernels that are and are not a multiple of 3 tall. The paths are the
    ones named: the Winograd rows wherever the variant has them and the kernel and the map are large enough; two
    threads give one thread's numbers bit for bit."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    x, w, b, g = _map_kernel_bias(shape, kernel, layout, seed=sum(shape) * 13 + sum(kernel))
    (h, wd), (kh, kw) = shape[-2:], kernel
    assert ck.cpp_conv_path(x, w) == _expected_path(shape, kernel, channels_last=layout == "channels_last")
    assert ck.cpp_wgrad_winograd(x, w) == _winograd(lanes, h, wd, kh, kw, weight_grad=True)
    _cpp_matches_conv2d_in_float64(x, w, b, g)
    gy = torch.randn(x.shape, generator=g)
    one = (ck.cpp_conv(x, w, b), ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, kh, kw))
    torch.set_num_threads(2)
    two = (ck.cpp_conv(x, w, b), ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, kh, kw))
    for a, t in zip(one, two):
        assert torch.equal(a, t)


@pytest.fixture
def avx512_tuning(request):
    """The AVX-512 variant's tuning (a ``ck.TUNINGS`` key) that the test's ``avx512_tuning`` parameter names, set on
    any CPU (None: the CPU's own); the CPU's own again after the test."""
    tuning = request.param
    if tuning is not None:
        ck.set_tuning(tuning)
    yield tuning
    ck.set_tuning(None)


@pytest.mark.parametrize("lanes,avx512_tuning", [("8", None), ("16", 0), ("16", 1)], indirect=["avx512_tuning"])
@pytest.mark.parametrize("shape,kernel,bands,groups", [
    ((1, 16, 40, 40), (13, 13), 4, 1),  # AVX-512 from maps of 36; 4 bands (4 units) of 12 rows (a multiple of 3: the
                                        # map's triplets), the last one of 4 rows: a triplet of one row
    ((2, 24, 20, 23), (17, 15), 1, 1),  # KH = 17: 6 chunks, the last with one zero row; KW != KH; a lane tail (24
                                        # channels), the last 7 pixels of a row in a narrow tile (AVX-512)
    ((1, 16, 32, 34), (31, 31), 2, 1),  # RepLKNet's 31 x 31: 11 chunks, kernel rows in chunks of 13, 13 and 5 columns;
                                        # bands of 18 and 14 rows
    ((1, 32, 33, 35), (21, 19), 2, 1),  # 33 rows = 11 whole triplets: bands of 18 and 15 rows
    ((8, 64, 18, 20), (15, 15), 1, 4),  # channels_last: units of 4 neighbouring blocks side by side
    ((1, 16, 24, 26), (11, 9), 3, 1),  # 8 lanes and AVX-512 tuned for split FMAs: from K = 9; 4 chunks, the last
                                       # with one zero row; bands halved to no fewer rows than KH = 11: 3; else the
                                       # direct tiles
    ((1, 16, 16, 16), (9, 9), 2, 1),  # the same at the least map (16) and kernel (9): 2 bands (of at least 9 rows)
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_winograd_direct_tiles_match_conv2d_in_float64(lanes, avx512_tuning, shape, kernel, bands, groups, layout,
                                                       monkeypatch, one_thread):
    """Large enough kernels on large enough maps run the direct tiles on packed rows in Winograd F(3, 3) rows
    (dwconv.cpp's conv_direct with wino_direct: each band's rows transformed once, each of the five products a direct
    tile over the transformed rows with a transformed kernel of ceil(KH / 3) rows, then three output rows per
    triplet): forward, input and weight gradient vs F.conv2d in float64 with bias, where the variant runs them
    (on any layout; AVX-512 from K = 13 or, tuned for cores that split 512-bit FMAs, from 9; 8 lanes from 9), under
    both AVX-512 tunings on any AVX-512 CPU (and so the weight gradient's Winograd rows from K = 9 under the second);
    the bands and channel groups named; two threads (other bands) give one thread's numbers bit for
    bit, and so does the backward's one pass where it applies."""
    need_cpp()
    monkeypatch.setenv(ck.ENV_LANES, lanes)
    cl = layout == "channels_last"
    x, w, b, g = _map_kernel_bias(shape, kernel, layout, seed=sum(shape) * 7 + sum(kernel))
    (h, wd), (kh, kw) = shape[-2:], kernel
    path = ck.cpp_conv_path(x, w)
    assert path == _expected_path(shape, kernel, channels_last=cl)
    assert (path == ck.CONV_PATHS[5]) == _winograd_direct(lanes, h, wd, kh, kw, cl)
    assert ck.cpp_wgrad_winograd(x, w) == _winograd(lanes, h, wd, kh, kw, weight_grad=True)
    avx512 = ck.cpu_variant().startswith(ck._VARIANTS[16])
    if (avx512 and (min(kernel) >= 13 or avx512_tuning == 1)) or lanes == "8":
        assert path == ck.CONV_PATHS[5]  # every case here, where the variant has them
    if path == ck.CONV_PATHS[5] and lanes == "16":
        split = ck.cpp_work_split(x, w, threads=1)
        assert (split["row_bands"], split["row_groups"]) == (bands, groups if cl else 1)
    _cpp_matches_conv2d_in_float64(x, w, b, g)
    gy = torch.randn(x.shape, generator=g)
    gy = gy.contiguous(memory_format=torch.channels_last) if cl else gy
    one = (ck.cpp_conv(x, w, b), ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, kh, kw))
    fused = ck.cpp_backward(x, gy, w)
    if fused is not None:
        assert torch.equal(fused[0], one[1]) and torch.equal(fused[1], one[2])
    torch.set_num_threads(2)
    two = (ck.cpp_conv(x, w, b), ck.cpp_conv(gy, w, None, flip=True), ck.cpp_weight_grad(x, gy, kh, kw))
    for a, t in zip(one, two):
        assert torch.equal(a, t)


@pytest.mark.parametrize("h,kh", [(32, 31), (25, 23), (14, 27), (40, 29), (7, 9), (26, 3), (20, 13), (23, 21)])
def test_winograd_rows_flops_by_brute_force(h, kh):
    """``roofline.winograd_rows_flops`` counts, per output triplet and product, the chunks of three kernel rows whose
    transformed row (B^T of the padded map's rows 3j .. 3j + 4, Lavin & Gray's F(3, 3) with points 0, 1, -1, 2 and
    infinity) and transformed kernel row (G of the chunk's rows, zeros past KH) are not all zeros, where an output row
    of the triplet reads the product (A^T: the fifth only by the third row): the same count from the transforms of a
    random column (float64) of the padded map and of the kernel. At most five products per triplet and chunk: 5/9 of
    the direct multiply-adds away from the borders."""
    from fastconv import roofline

    pad, chunks, triplets = kh // 2, -(-kh // 3), -(-h // 3)
    rows = triplets + chunks - 1
    d = torch.zeros(3 * rows + 5, dtype=torch.float64)
    d[pad:pad + h] = torch.rand(h, dtype=torch.float64) + 0.5  # no exact zeros (nor, almost surely, cancellations)
    bt = torch.tensor([[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]],
                      dtype=torch.float64)
    u = torch.stack([bt @ d[3 * j:3 * j + 5] for j in range(rows)])  # (row j, product)
    g = torch.zeros(3 * chunks, dtype=torch.float64)
    g[:kh] = torch.rand(kh, dtype=torch.float64) + 0.5
    gm = torch.tensor([[1 / 2, 0, 0], [-1 / 2, -1 / 2, -1 / 2], [-1 / 6, 1 / 6, -1 / 6], [1 / 6, 1 / 3, 2 / 3],
                       [0, 0, 1]], dtype=torch.float64)
    gt = torch.stack([gm @ g[3 * t:3 * t + 3] for t in range(chunks)])  # (chunk t, product)
    # A^T: (output row, product)
    at = torch.tensor([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]], dtype=torch.float64)
    read = [[any(at[i, k] != 0 for i in range(min(3, h - 3 * q))) for k in range(5)] for q in range(triplets)]
    brute = sum(int(u[q + t, k] != 0 and gt[t, k] != 0 and read[q][k])
                for q in range(triplets) for t in range(chunks) for k in range(5))
    counted = roofline.winograd_rows_flops(1, 1, h, 1, kh, 1)
    assert counted["forward"] == 2 * brute
    assert brute <= 5 * chunks * triplets


def test_depthwise_flops_inside_the_map_by_brute_force():
    """fastconv.roofline.depthwise_flops: nominal = the flop counter's 2*B*C*H*W*KH*KW; inside = the products
    whose input pixel is in the map (the rest meet zero padding), counted one by one."""
    from fastconv.roofline import depthwise_flops

    for b, c, h, w, kh, kw in ((2, 3, 14, 14, 27, 27), (1, 5, 7, 9, 13, 3), (1, 1, 32, 32, 31, 31), (1, 2, 4, 4, 1, 1)):
        f = depthwise_flops(b, c, h, w, kh, kw)
        brute = sum(1 for p in range(h) for q in range(w) for i in range(kh) for j in range(kw)
                    if 0 <= p + i - kh // 2 < h and 0 <= q + j - kw // 2 < w)
        assert f == {"nominal": 2 * b * c * h * w * kh * kw, "inside": 2 * b * c * brute}
    assert depthwise_flops(1, 1, 14, 14, 27, 27)["inside"] / depthwise_flops(1, 1, 14, 14, 27, 27)["nominal"] == \
        pytest.approx(196 ** 2 / (196 * 729))


def _lazily_negated(t):
    """A view equal to ``t`` whose memory holds ``-t`` (the negative bit set): as ``z.conj().imag`` of a complex
    ``z`` gives, in public API."""
    v = torch.complex(torch.zeros_like(t), -t).conj().imag
    assert v.is_neg() and torch.equal(v, t)
    return v


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpp_kernel_reads_lazily_negated_views_as_their_values(layout):
    """The C++ kernel reads raw memory: a negated view (``z.conj().imag``) as x or weight gave the output of -x / -w
    before (max error ~50 at K=9 without a gradient), and a negated output gradient the gradients of -g."""
    need_cpp()
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=layout)
    w, b, g = torch.randn(8, 1, 9, 9), torch.randn(8), torch.randn(2, 8, 12, 12)
    ref = F.conv2d(x, w, b, padding=4, groups=8)
    for args in ((_lazily_negated(x), w, b), (x, _lazily_negated(w), b), (x, w, _lazily_negated(b))):
        torch.testing.assert_close(fastconv.depthwise_conv2d(*args, backend="cpp"), ref, rtol=1e-5, atol=1e-4)
    gn = _lazily_negated(g)
    torch.testing.assert_close(ck.cpp_weight_grad(x, gn, 9, 9), ck.cpp_weight_grad(x, g, 9, 9))
    torch.testing.assert_close(ck.cpp_conv(gn, w, None, flip=True), ck.cpp_conv(g, w, None, flip=True))
    both, ref_both = ck.cpp_backward(_lazily_negated(x), gn, _lazily_negated(w)), ck.cpp_backward(x, g, w)
    if ref_both is not None:
        torch.testing.assert_close(both[0], ref_both[0])
        torch.testing.assert_close(both[1], ref_both[1])
