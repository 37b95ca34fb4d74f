"""fastconv: exactness of every CPU backend vs F.conv2d, autograd, dispatch/explain/cache, settings, errors,
drop-in module and model conversion, and fastconv on its own (erf_lab not importable)."""
from __future__ import annotations

import copy
import ctypes
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastconv
from fastconv import cpu_kernels as ck
from fastconv import dispatch
from tests.conftest import need_compiler, need_cpp

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the C++ kernel is tested wherever the suite runs: a failed build (or no compiler) fails every test that names
#: "cpp" (depthwise_conv2d(backend="cpp") raises with the reason) instead of dropping "cpp" from them
CPU_BACKENDS = [b for b in fastconv.BACKENDS if b != "triton"]
USER_CACHE = fastconv.settings().cache_dir  # holds the C++ build: the tests' own cache dirs only get autotune files
ck.cpp_library()  # built (or loaded) once per process, here, before any test moves the cache dir


@pytest.fixture(autouse=True)
def _isolated_settings(fastconv_isolated):
    yield


# one_thread (tests/conftest.py): the cpp kernel's multi-threaded split is covered by
# test_cpp_weight_grad_accumulates_in_fp32_accurately.


def _ref(x, w, b):
    kh, kw = w.shape[-2:]
    return F.conv2d(x, w, b, padding=(kh // 2, kw // 2), groups=x.shape[1])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_cpp_kernel_builds_here():
    need_cpp()
    assert {"native", "channels_last", "cpp", "fft"} <= set(fastconv.available_backends("cpu"))


def test_available_backends_per_dtype_and_missing_device():
    """bfloat16 on CPU runs the two F.conv2d backends; a CUDA request without CUDA is one clear ValueError (it was
    torch's AssertionError 'Torch not compiled with CUDA enabled')."""
    assert fastconv.available_backends("cpu", torch.bfloat16) == ["native", "channels_last"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            fastconv.available_backends("cuda")


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_no_backend_claims_a_dtype_depthwise_conv2d_refuses(dtype):
    """``available_backends`` / ``supports`` name no backend for a dtype that ``depthwise_conv2d`` refuses (they named
    "native" and "channels_last" for any dtype, integer and complex too)."""
    assert fastconv.available_backends("cpu", dtype) == []
    x = torch.zeros(1, 2, 5, 5, dtype=dtype)
    for b in fastconv.BACKENDS:
        ok, reason = fastconv.supports(b, x, x[0, :, None, :3, :3])
        assert not ok and reason.startswith(f"dtype {dtype} unsupported")
    ok, reason = fastconv.supports("native/native/native", x, x[0, :, None, :3, :3])
    assert not ok and reason.startswith(f"forward 'native': dtype {dtype} unsupported")
    with pytest.raises(ValueError, match=f"dtype {dtype} unsupported"):
        fastconv.depthwise_conv2d(x, x[0, :, None, :3, :3], backend="native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_output_keeps_the_nchw_layout_of_x_with_a_channels_last_weight(dtype):
    """The output keeps x's memory format (the docstring's promise) also for "native" with the weight of a module
    moved to channels_last ((C, 1, K, K) strides (K*K, 1, K, 1)): F.conv2d made that output channels_last, so "auto"
    gave one layout or the other by which backend won the timing."""
    conv = fastconv.DepthwiseConv2d(8, 5, backend="native").to(dtype=dtype, memory_format=torch.channels_last)
    assert conv.weight.stride() == (25, 1, 5, 1)
    x = torch.randn(2, 8, 6, 7, dtype=dtype)
    ref = _ref(x.double(), conv.weight.double(), conv.bias.double())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = conv(x)
        assert y.is_contiguous() and y.stride() == (336, 42, 7, 1) and _rel(y.double(), ref) <= 1e-3
    xc = x.contiguous(memory_format=torch.channels_last)
    assert conv(xc).is_contiguous(memory_format=torch.channels_last)


def test_every_public_submodule_is_an_attribute_of_a_fresh_import():
    """``fastconv.<module>`` loads each public submodule on first use (PEP 562): ``fastconv.jsonstore`` (the tables'
    store, which erf-lab's caches use too) was missing from the list and raised AttributeError in a fresh process."""
    names = {p.stem for p in Path(fastconv.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert names <= set(fastconv._SUBMODULES)
    code = "import sys, fastconv; print(fastconv.jsonstore.__name__, 'torch' in sys.modules)"  # (no other first)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["fastconv.jsonstore", "False"], out.stderr[-500:]


def test_failed_cpp_build_is_reported_not_silent(tmp_path):
    """A compiler that fails: "cpp" is unavailable with the compiler's verdict, and naming it raises that reason."""
    code = ("import torch, fastconv; from fastconv import cpu_kernels as ck; print(ck.cpp_unavailable_reason()); "
            "print(fastconv.available_backends());\n"
            "try: fastconv.depthwise_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), backend='cpp')\n"
            "except ValueError as e: print(e)")
    env = {**os.environ, "CXX": "false", "FASTCONV_CACHE": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FASTCONV_NO_CPP", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    reason, backends, error = out.splitlines()
    assert reason.startswith("compiling dwconv.cpp failed") and "'cpp'" not in backends
    assert "backend 'cpp' cannot run this call: cpp kernel unavailable: compiling dwconv.cpp failed" in error


def test_a_failed_compile_is_told_by_its_first_error_line_or_exit_status(tmp_path):
    """The reason of a failed build (the line that the one warning quotes) starts with the compiler's first error, not
    with the first line of its output's last 500 characters (mid-line: "_t KW, int64_t nthreads, ..."), and a
    compiler that fails without a word is named with its exit status (it read "compiling dwconv.cpp failed: ")."""
    cxx = need_compiler()
    src = tmp_path / "t.c"
    src.write_text("\n".join(f"int f{i}(int a, int b) {{ return a * b + {i}; }}" for i in range(40))
                   + "\nint g(void) { return no_such_name; }\n")
    with pytest.raises(RuntimeError) as failed:
        ck.compile_shared_library(src, ["-shared", "-fPIC"], cxx=cxx)
    first = str(failed.value).splitlines()[0]
    assert first.startswith("compiling t.c failed: ") and "error:" in first and "no_such_name" in first
    with pytest.raises(RuntimeError, match=r"^compiling t.c failed: 'false' exited with status 1 and printed nothing$"):
        ck.compile_shared_library(src, ["-shared", "-fPIC"], cxx="false")


def test_cxx_is_a_command_line_as_make_reads_it(tmp_path, monkeypatch):
    """$CXX="ccache g++" / "g++ -m64" (a compiler with its own arguments, as make runs it) compiles: it was run as one
    program name ("No such file or directory: 'g++ -DFOO=7'") and the C++ kernel was unavailable. A $CXX that is not
    there says so and what to set."""
    cxx = need_compiler()
    src = tmp_path / "t.c"
    src.write_text("int f(void) { return FOO; }\n")
    monkeypatch.setenv("CXX", f"{cxx} -DFOO=7")
    assert ctypes.CDLL(str(ck.compile_shared_library(src, ["-shared", "-fPIC"]))).f() == 7
    with pytest.raises(RuntimeError, match="cannot run the C\\+\\+ compiler 'no-such-cxx -O2'.*set CXX"):
        ck.compile_shared_library(src, ["-shared", "-fPIC"], cxx="no-such-cxx -O2")


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path):
    """A cached .so that is damaged on disk (truncated: a full disk, a cache folder copied half-way) is compiled again
    and replaced: the kernel (here the FMA probe, built the same way) stayed unavailable in every later process until
    someone found and deleted the file."""
    need_compiler()
    code = "from fastconv import roofline; print(roofline.fma_lanes())"
    env = {**os.environ, "FASTCONV_CACHE": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                 check=True).stdout.strip()
    lanes = run()
    assert lanes in ("8", "16")
    built = sorted((tmp_path / "build").glob("fma_peak_*.so"))
    assert built
    for so in built:
        damaged = so.with_name("damaged")
        damaged.write_bytes(so.read_bytes()[:100])
        os.replace(damaged, so)
    assert run() == lanes
    assert sorted((tmp_path / "build").glob("fma_peak_*.so")) == built  # the same build again, not another one
    assert all(so.stat().st_size > 100 for so in built)


ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp{}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x{}
CPU part\t: 0x{}
CPU revision\t: 1
"""


def test_the_build_key_tells_arm_cpus_apart(monkeypatch):
    """The C++ kernel is built with -march=native and cached under a key that holds the CPU: on Linux arm64, whose
    /proc/cpuinfo has no "model name" or "flags" line, every CPU gave the same key, and a shared cache folder (an NFS
    home) handed a Graviton 3 build (SVE) to a Graviton 2 (illegal instruction). x86 keys stay as they were."""
    read_text = Path.read_text
    cpuinfo = {}
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: cpuinfo["text"] if str(self) == "/proc/cpuinfo"
                        else read_text(self, *a, **k))
    ids = []
    for text in (ARM_CPUINFO.format("", "3", "d0c"), ARM_CPUINFO.format(" sve svebf16 i8mm", "1", "d40"),
                 ARM_CPUINFO.format("", "3", "d0c")):
        cpuinfo["text"] = text
        ids.append(ck._cpu_id())
    assert ids[0] != ids[1] and ids[0] == ids[2]
    assert "sve" in ids[1] and "0xd40" in ids[1]
    cpuinfo["text"] = "processor\t: 0\nmodel name\t: Some x86\nmodel\t: 85\nflags\t\t: fpu avx2\n"
    assert ck._cpu_id() == "model name\t: Some x86flags\t\t: fpu avx2"


def test_an_unwritable_build_cache_builds_in_a_private_folder_with_one_warning(tmp_path, monkeypatch):
    """A cache folder that cannot be written (a read-only home; here one under a plain file, which stops root too)
    left the C++ kernel unavailable without a word, and every call ran PyTorch's kernels. Now it is built in a
    private folder of the process, with one warning saying to set $FASTCONV_CACHE."""
    import warnings

    need_compiler()
    (tmp_path / "file").write_text("")
    fastconv.configure(cache_dir=tmp_path / "file" / "fc")
    monkeypatch.setattr(ck, "_private_builds", [], raising=False)
    src = tmp_path / "t.c"
    src.write_text("int f(void) { return 5; }\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        libs = [ck.load_shared_library(src, ["-shared", "-fPIC", *more]) for more in ([], ["-O1"])]
        folder = ck._private_builds[0]
        built = {so: so.stat().st_ino for so in folder.glob("t_*.so")}
        libs.append(ck.load_shared_library(src, ["-shared", "-fPIC"]))
    assert [lib.f() for lib in libs] == [5, 5, 5]
    assert len(seen) == 1 and "cannot write its build cache" in str(seen[0].message)
    assert "set $FASTCONV_CACHE" in str(seen[0].message)
    assert len(built) == 2 and {so: so.stat().st_ino for so in folder.glob("t_*.so")} == built  # not built again


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """Without a C++ compiler (none on the PATH, $CXX unset) every call still computes, through PyTorch's kernels, and
    the process is told once why the C++ kernel is not used and what to do (it fell back without a word), at the
    user's line (it pointed inside fastconv); with
    $FASTCONV_NO_CPP=1, which asks for that, nothing is said."""
    code = ("import torch, torch.nn.functional as F, fastconv\n"
            "torch.nn.Sequential(fastconv.DepthwiseConv2d(3, 5))(torch.randn(1, 3, 6, 6))\n"
            "for c, k, cl in ((3, 3, False), (8, 13, True), (4, 31, False)):\n"
            "    x, w = torch.randn(2, c, 9, 9), torch.randn(c, 1, k, k)\n"
            "    x = x.contiguous(memory_format=torch.channels_last) if cl else x\n"
            "    y = fastconv.depthwise_conv2d(x, w)\n"
            "    assert torch.allclose(y, F.conv2d(x, w, padding=k // 2, groups=c), atol=1e-4)\n"
            "print('not cpp:' in fastconv.explain(x, w))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCONV_") and k != "CXX"}
    env.update(PATH="", FASTCONV_CACHE=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["True"]
    warned = [ln for ln in proc.stderr.splitlines() if "RuntimeWarning" in ln]
    assert len(warned) == 1 and "C++ kernel is unavailable (no C++ compiler found (set CXX))" in warned[0]
    # at the user's line, the call of the model (line 2), not inside fastconv or torch's Module.__call__
    assert warned[0].startswith("<string>:2: RuntimeWarning"), warned[0]
    assert "Install a C++ compiler or set CXX" in warned[0]
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "FASTCONV_NO_CPP": "1"}, capture_output=True,
                          text=True, check=True)
    assert "RuntimeWarning" not in proc.stderr


def test_processes_that_start_together_compile_the_kernel_once(tmp_path):
    """Processes that need the same library at once (the ranks of one torchrun job) build it once: the others wait
    for it and load it. Each compiled it (~15 s of CPU each for the C++ kernel), all but one for nothing."""
    cxx = need_compiler()
    wrapper = tmp_path / "slow-cxx"
    wrapper.write_text(f'#!/bin/sh\necho run >> "{tmp_path / "runs"}"\nsleep 1\nexec {cxx} "$@"\n')
    wrapper.chmod(0o755)
    src = tmp_path / "t.c"
    src.write_text("int f(void) { return 4; }\n")
    code = (f"import ctypes, pathlib, fastconv; from fastconv import cpu_kernels as ck; "
            f"fastconv.configure(cache_dir={str(tmp_path / 'cache')!r}); "
            f"print(ck.load_shared_library(pathlib.Path({str(src)!r}), ['-shared', '-fPIC'], {str(wrapper)!r}).f())")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["4"] * 3
    assert (tmp_path / "runs").read_text().split() == ["run"]
    assert len(list((tmp_path / "cache" / "build").glob("t_*.so"))) == 1


def test_a_compiler_that_refuses_march_native_still_builds_the_kernel(tmp_path):
    """A compiler that refuses -march=native (older Apple clang on arm64: "the clang compiler does not support
    '-march=native'") left the C++ kernel unavailable: both builds asked for it. Now it is built for the compiler's
    baseline target, and gives F.conv2d's numbers."""
    cxx = need_compiler()
    wrapper = tmp_path / "no-native-cxx"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do if [ "$a" = "-march=native" ]; then\n'
                       "  echo \"clang: error: the clang compiler does not support '-march=native'\" >&2; exit 1\n"
                       f'fi; done\nexec {cxx} "$@"\n')
    wrapper.chmod(0o755)
    code = ("import torch, torch.nn.functional as F, fastconv; from fastconv import cpu_kernels as ck\n"
            "print(ck.cpp_unavailable_reason())\n"
            "x, w = torch.randn(2, 24, 12, 12), torch.randn(24, 1, 13, 13)\n"
            "for lanes in ('8', '16'):\n"
            "    y = ck.cpp_conv(x, w, None, lanes=int(lanes))\n"
            "    print(bool(torch.allclose(y, F.conv2d(x, w, padding=6, groups=24), atol=1e-4)))")
    env = {**os.environ, "CXX": str(wrapper), "FASTCONV_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FASTCONV_NO_CPP", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "True", "True"]


def test_a_library_whose_dependency_is_missing_is_not_rebuilt_at_every_start(tmp_path, monkeypatch):
    """A cached library that does not load because a library it needs is missing (an OpenMP runtime a conda compiler
    linked against, not on the loader's path) is not compiled again: a rebuild does not mend that, and it cost a
    full build in every process start before the build without OpenMP was tried."""
    cxx = need_compiler()
    fake = tmp_path / "fakelib"
    fake.mkdir()
    (tmp_path / "fake.c").write_text("int fake(void) { return 1; }\n")
    subprocess.run([*cxx.split(), "-shared", "-fPIC", "-o", str(fake / "libfake.so"), "-x", "c",
                    str(tmp_path / "fake.c")], check=True)
    src = tmp_path / "t.c"
    src.write_text("int fake(void); int f(void) { return fake() + 1; }\n")
    flags = ["-shared", "-fPIC", f"-L{fake}", "-Wl,--no-as-needed", "-lfake"]
    fastconv.configure(cache_dir=tmp_path / "cache")
    ck.compile_shared_library(src, flags)  # built (and cached) while libfake.so is there
    (fake / "libfake.so").unlink()
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(ck.subprocess, "run", lambda *a, **k: runs.append(a) or real_run(*a, **k))
    for _ in range(2):  # two later process starts
        with pytest.raises(OSError, match="libfake.so"):
            ck.load_shared_library(src, flags)
    assert runs == []


def test_a_build_failure_without_a_message_still_falls_back(monkeypatch):
    """A build that fails with an empty message (an OSError without text) leaves the kernel unavailable with a
    reason and one warning, not an IndexError from the warning's text."""
    monkeypatch.setattr(ck, "_lib", None)
    monkeypatch.setattr(ck, "_lib_error", None)
    monkeypatch.delenv("FASTCONV_NO_CPP", raising=False)
    monkeypatch.setattr(ck, "_build", lambda: (_ for _ in ()).throw(OSError()))
    with pytest.warns(RuntimeWarning, match=r"C\+\+ kernel is unavailable \(OSError\)"):
        assert ck.cpp_library() is None
    assert ck.cpp_unavailable_reason() == "OSError" and not ck.cpp_available()


def test_fastconv_no_cpp_reads_yes_and_no():
    """$FASTCONV_NO_CPP=1 / yes disables the C++ kernel; 0 / false / off (as $FASTCONV_AUTOTUNE reads them) leave it on
    (any non-empty value disabled it: FASTCONV_NO_CPP=0 turned the kernel off)."""
    need_cpp()
    code = "from fastconv import cpu_kernels as ck; print(ck.cpp_unavailable_reason())"
    seen = {}
    for value in ("0", "false", " Off ", "1", "yes"):
        env = {**os.environ, "FASTCONV_NO_CPP": value, "PYTHONPATH": str(REPO_ROOT), "FASTCONV_CACHE": str(USER_CACHE)}
        seen[value] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.strip()
    assert seen == {"0": "None", "false": "None", " Off ": "None", "1": "disabled by FASTCONV_NO_CPP",
                    "yes": "disabled by FASTCONV_NO_CPP"}


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("kernel,shape", [((1, 1), (2, 5, 6, 7)), ((3, 3), (2, 17, 9, 8)), ((7, 5), (1, 20, 11, 13)),
                                          ((31, 31), (2, 16, 12, 12)), ((63, 63), (1, 3, 9, 10)),
                                          ((65, 67), (1, 9, 9, 10)), ((1, 9), (1, 18, 7, 12))])
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
    # second derivatives (gradient penalties), also of a channels_last input
    xs = x.detach()[:1, :2, :4, :3].contiguous(memory_format=torch.channels_last).requires_grad_()
    for args in ((x.detach()[:1, :2, :4, :3].requires_grad_(), w[:2], b[:2]), (xs, w[:2], b[:2])):
        assert torch.autograd.gradgradcheck(lambda *t: fastconv.depthwise_conv2d(*t, backend=backend), args)


def test_a_backend_that_cannot_run_a_call_says_which_can():
    """gradcheck's float64 on backend "cpp" (float32 only) was refused with the reason alone; the error now names
    the backends that can run the call."""
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cpp handles float32 CPU tensors only; backends that can: native, "
                                         r"channels_last, fft, or 'auto'$"):
        fastconv.depthwise_conv2d(x, w, backend="cpp")
    with pytest.raises(ValueError, match=r"backends that can: native, channels_last, or 'auto'$"):
        fastconv.DepthwiseConv2d(2, 3, backend="fft").half()(x.half())


def test_cpp_weight_grad_accumulates_in_fp32_accurately():
    # long reduction (N*H*W = 2*24*24 terms) vs a float64 reference
    need_cpp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 24, 24, generator=g)
    gy = torch.randn(2, 24, 24, 24, generator=g)
    got = ck.cpp_weight_grad(x, gy, 13, 11)
    exp = torch.nn.grad.conv2d_weight(x.double(), (24, 1, 13, 11), gy.double(), padding=(6, 5), groups=24)
    assert _rel(got.double(), exp) <= 1e-5
    assert _rel(ck.onednn_weight_grad(x, gy, 13, 11).double(), exp) <= 1e-5


@pytest.mark.parametrize("backend", ["channels_last", "cpp"] + [None])
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



@pytest.mark.parametrize("backend", ["channels_last", "cpp"] + ["cpp/cpp/native"])
def test_gradients_of_trainable_weights_only_when_this_pass_needs_them(backend, monkeypatch, one_thread):
    """As PyTorch's own convolution: torch.autograd.grad w.r.t. the input (captum on a model that was not frozen)
    computes no dL/dw, w.r.t. the weight no dL/dx, backward(inputs=...) only what it names, a plain backward all;
    the same numbers as nn.Conv2d in each case."""
    from fastconv import backends as fb

    if "cpp" in backend:
        need_cpp()
    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        monkeypatch.setattr(fb if name.startswith("_") else ck, name, wrapped)

    for name in ("_grad_input", "_grad_weight", "cpp_backward"):
        spy(name, getattr(fb if name.startswith("_") else ck, name))
    conv = fastconv.DepthwiseConv2d(16, 9, backend=backend)
    ref = nn.Conv2d(16, 16, 9, padding=4, groups=16)
    ref.load_state_dict(conv.state_dict())
    x0 = torch.randn(2, 16, 12, 12)

    def run(m, want):
        x = x0.clone().requires_grad_()
        y = m(x * 1.0).square().sum()  # x * 1.0: the conv's input is not a leaf (as in a network) ...
        if want == "all":
            y.backward()
            return x.grad, m.weight.grad, m.bias.grad
        if want == "backward w":
            y.backward(inputs=[m.weight])
            return None, m.weight.grad, m.bias.grad
        return torch.autograd.grad(y, {"x": x, "w": m.weight, "b": m.bias}[want])

    for want, ops in [("x", {"_grad_input"}), ("w", {"_grad_weight"}), ("b", set()),
                      ("backward w", {"_grad_weight"}), ("all", {"both"})]:
        conv.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        calls.clear()
        got, exp = run(conv, want), run(ref, want)
        for a, e in zip(got, exp):
            assert (a is None) == (e is None) and (a is None or _rel(a, e) <= 1e-4), want
        ran = set(calls) - ({"cpp_backward"} if ops == {"both"} else set())
        if ops == {"both"}:  # the C++ kernel's one pass, or each gradient on its own
            assert ("cpp_backward" in calls) or ran == {"_grad_input", "_grad_weight"}, calls
        else:
            assert ran == ops, (want, calls)
    # ... and a leaf input (the engine answers for a leaf only where torch.autograd.grad was not asked for it)
    calls.clear()
    conv.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    (gx,) = torch.autograd.grad(conv(x).sum(), x)
    assert set(calls) == {"_grad_input"} and _rel(gx, torch.autograd.grad(ref(x).sum(), x)[0]) <= 1e-4
    assert conv.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["native", "channels_last", "auto"])
def test_half_precision_on_cpu_runs_like_conv2d(dtype, backend, one_thread):
    """F.conv2d computes fp16 / bf16 on CPU, so the drop-in does too (a bf16 model was refused: "unsupported")."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(2, 10, 9, 11, generator=g), torch.randn(10, 1, 7, 9, generator=g) / 8,
               torch.randn(10, generator=g))
    ours = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    ref = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    y, yr = fastconv.depthwise_conv2d(*ours, backend=backend), _ref(*ref)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    got = (y,) + torch.autograd.grad(y, ours, gy)
    exp = (yr,) + torch.autograd.grad(yr, ref, gy)
    assert all(a.dtype == dtype for a in got)
    for a, e in zip(got, exp):  # same dtype, different summation orders: a few units in the last place
        assert _rel(a.float(), e.float()) <= 2e-2
    assert torch.equal(got[0], exp[0]) or backend != "native"



def test_float16_on_cpu_runs_in_float32_and_finishes(tmp_path):
    """PyTorch's float16 depthwise convolution on the CPU does not finish for some shapes: the "channels_last"
    weight gradient (a forward conv with a K x K output and an H x W kernel; B = 1, C = 2, R = 20, K = 31: no result
    after 10 min, where the stock convolution_backward takes 13 ms), and F.conv2d itself at B = 1, C = 2, R = 31,
    K = 15 (no result in 120 s), so "native" and "auto" (which times the candidates) hung too. Every float16 CPU
    call of these backends runs in float32 now, rounded once to float16: output, input and weight gradient within
    float16's rounding of the float64 result, float16 out. In a subprocess: the old code never returns."""
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F, fastconv
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        for r, k in ((20, 31), (31, 15)):
            x, w, gy = (torch.randn(1, 2, r, r, generator=g), torch.randn(2, 1, k, k, generator=g),
                        torch.randn(1, 2, r, r, generator=g))
            xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
            ey = F.conv2d(xr, wr, padding=k // 2, groups=2)
            ex, ew = torch.autograd.grad(ey, (xr, wr), gy.double())
            for backend in ("native", "channels_last", "auto"):
                xh, wh = x.half().requires_grad_(), w.half().requires_grad_()
                y = fastconv.depthwise_conv2d(xh, wh, backend=backend)
                gx, gw = torch.autograd.grad(y, (xh, wh), gy.half())
                err = max(((a.double() - e).abs().max() / e.abs().max()).item()
                          for a, e in ((y, ey), (gx, ex), (gw, ew)))
                print(r, backend, y.dtype, gx.dtype, gw.dtype, err, flush=True)
        xr = torch.randn(1, 2, 31, 31, generator=g, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):  # autocast's float16 call of the same shape
            y = fastconv.depthwise_conv2d(xr, w)
        (gx,) = torch.autograd.grad(y.float().sum(), xr)
        print("autocast", y.dtype, gx.dtype, flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCONV_")}
    env.update(PYTHONPATH=str(REPO_ROOT), FASTCONV_CACHE=str(tmp_path / "fc"))
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"float16 on the CPU did not finish in 120 s; done: {e.stdout}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    *lines, autocast = [ln.split() for ln in proc.stdout.splitlines()]
    assert autocast == ["autocast", "torch.float16", "torch.float32"]
    assert [(r, b) for r, b, *_ in lines] == [(r, b) for r in ("20", "31") for b in ("native", "channels_last", "auto")]
    for *_, ydt, gxdt, gwdt, err in lines:
        assert ydt == gxdt == gwdt == "torch.float16" and float(err) <= 2e-3, lines


def test_autocast_casts_like_conv2d(one_thread):
    """Under autocast a converted model runs as nn.Conv2d does (it raised 'dtypes differ' on the bf16 activations
    of the layer before): same output dtype and values, gradients reach the float32 parameters."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 9, padding=4, groups=6))
    ours = nn.Sequential(nn.Conv2d(6, 6, 1), fastconv.DepthwiseConv2d(6, 9))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yr = ours(x), ref(x)
        assert fastconv.depthwise_conv2d(x, ref[1].weight).dtype == torch.bfloat16
        assert "cpu bfloat16" in fastconv.explain(x, ref[1].weight)
    assert y.dtype == yr.dtype == torch.bfloat16 and torch.equal(y, yr)
    y.float().square().sum().backward()
    yr.float().square().sum().backward()
    assert ours[1].weight.grad.dtype == torch.float32
    for a, e in zip(ours.parameters(), ref.parameters()):
        assert _rel(a.grad, e.grad) <= 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never cast, as for F.conv2d
        assert fastconv.depthwise_conv2d(x.double(), ref[1].weight.double()).dtype == torch.float64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_matches_conv2d(backend, one_thread):
    """A gradient penalty (create_graph=True) differentiates the backward: through the C++ kernel it was silently
    dropped (its gradients had no graph), and the loss's weight gradient was wrong by orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    x0, w0, b0 = torch.randn(2, 9, 7, 8, generator=g), torch.randn(9, 1, 5, 7, generator=g), torch.randn(9, generator=g)

    def penalised_grads(conv):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = conv(x, w, b)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(y.sum() + gx.square().sum(), (x, w, b))

    got = penalised_grads(lambda *t: fastconv.depthwise_conv2d(*t, backend=backend))
    exp = penalised_grads(_ref)
    for a, e in zip(got, exp):
        assert _rel(a, e) <= 1e-4



@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_empty_batch_runs_with_every_backend(backend):
    """An empty batch (e.g. a rank's share of a short last batch) gives an empty output and zero parameter
    gradients with any backend (the FFT backend raised an MKL error)."""
    x = torch.randn(0, 4, 6, 7, requires_grad=True)
    w, b = torch.randn(4, 1, 5, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    y = fastconv.depthwise_conv2d(x, w, b, backend=backend)
    assert y.shape == (0, 4, 6, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros(4))



@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b not in ("native", "fft")] + ["auto"])
def test_the_weight_gradient_has_the_strides_of_the_weight(backend):
    """A (C, 1, K, K) weight is the same memory in NCHW and channels_last, and the backends return either; the
    gradient takes the parameter's own strides (DDP's buckets follow them: otherwise it copied the gradient every
    step and warned "Grad strides do not match bucket view strides" on every channels_last training run). A
    converted nn.Conv2d in a channels_last model, as ``erf_lab.train.loop.speed_levers`` makes it. Not "native"
    and "fft": PyTorch's autograd differentiates them (F.conv2d, torch.fft), and it owns their strides."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8))
    ref = copy.deepcopy(net).double()
    fastconv.convert_model(net, min_kernel=3)
    net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with fastconv.use(backend=backend):
        net(x).square().sum().backward()
    w = net[0].weight
    assert w.grad.stride() == w.stride() == (25, 1, 5, 1)
    ref(x.detach().double()).square().sum().backward()
    torch.testing.assert_close(w.grad, ref[0].weight.grad.float(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_inputs_reach_the_outputs_conv2d_reaches(backend, one_thread):
    """A NaN / inf input pixel makes NaN / inf exactly the outputs within the kernel's reach, as in F.conv2d, and
    leaves the rest equal; the FFT backend (explicit only) spreads it over the whole plane, as documented."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 9, 12, 11, generator=g), torch.rand(9, 1, 5, 3, generator=g) + 0.1
    x[0, 1, 2, 3], x[1, 8, 11, 0] = float("nan"), float("inf")
    y, ref = fastconv.depthwise_conv2d(x, w, backend=backend), _ref(x, w, None)
    if backend == "fft":
        assert y[0, 1].isnan().all() and y[0, 0].isfinite().all()
        return
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert ref.isnan().sum() == 15 and ref.isinf().sum() == 6  # 5x3 around (2, 3); rows 9-11 x cols 0-1
    fin = ref.isfinite()
    assert _rel(y[fin], ref[fin]) <= 1e-5




def test_plain_backward_still_runs_the_cpp_kernels(monkeypatch):
    """Only create_graph moves the gradients to F.conv2d: a plain backward runs the C++ input and weight gradient, in
    one pass where ``cpp_backward_plan`` says so (on one thread here; the units of the one pass would leave a second
    thread idle), else each on its own (on two)."""
    need_cpp()
    calls, conv, wgrad, both = [], ck.cpp_conv, ck.cpp_weight_grad, ck.cpp_backward

    def one_pass(*a, **k):
        out = both(*a, **k)
        if out is not None:
            calls.append("one pass")
        return out

    monkeypatch.setattr(ck, "cpp_conv", lambda *a, **k: calls.append(("conv", k.get("flip", False))) or conv(*a, **k))
    monkeypatch.setattr(ck, "cpp_weight_grad", lambda *a, **k: calls.append("wgrad") or wgrad(*a, **k))
    monkeypatch.setattr(ck, "cpp_backward", one_pass)
    x, w = torch.randn(1, 8, 9, 9, requires_grad=True), torch.randn(8, 1, 9, 9, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        for n, expected in ((1, [("conv", False), "one pass"]), (2, [("conv", False), ("conv", True), "wgrad"])):
            torch.set_num_threads(n)
            calls.clear()
            assert ck.cpp_backward_plan(x, w) == (2 if n == 1 else 0)  # packed planes (9 wide), one unit
            fastconv.depthwise_conv2d(x, w, backend="cpp").square().sum().backward()
            assert calls == expected, n
    finally:
        torch.set_num_threads(threads)


def test_function_apply_skips_torchs_signature_binding(monkeypatch):
    """Outside functorch transforms the custom Function's ``apply`` goes straight to torch's C++ apply: torch's
    Python ``apply`` binds the arguments through ``inspect.signature`` on every call (~40 us between kernel calls).
    With ``inspect.signature`` broken, forward and both gradients still equal F.conv2d's; torch.func.grad, which
    needs torch's own ``apply``, then reaches it (and fails there)."""
    import inspect

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 9, 8, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 7, 5, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    ref = _ref(x, w, b)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w, b))

    def broken(*a, **k):
        raise AssertionError("inspect.signature called")

    monkeypatch.setattr(inspect, "signature", broken)
    y = fastconv.depthwise_conv2d(x, w, b, backend="channels_last")
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    assert _rel(y, ref) <= 1e-6
    for a, e in zip(grads, ref_grads):
        assert _rel(a, e) <= 1e-5
    with pytest.raises(AssertionError, match="inspect.signature called"):
        torch.func.grad(lambda a: fastconv.depthwise_conv2d(a, w, backend="channels_last").sum())(x.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad_matches_conv2d(backend, one_thread):
    """torch.func.grad (and grad of grad) through every backend equals F.conv2d's (the custom Function raised
    'it must override the setup_context staticmethod'); vmap runs the stock op (it was refused: the custom Function
    has no vmap rule)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, 7, generator=g), torch.randn(5, 1, 9, 5, generator=g)

    def grads(conv):
        def loss(a, k):
            return conv(a, k).square().sum()
        gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, w)
        ggx = torch.func.grad(lambda a: torch.func.grad(loss)(a, w).square().sum())(x)
        return gx, gw, ggx

    for a, e in zip(grads(lambda a, k: fastconv.depthwise_conv2d(a, k, backend=backend)),
                    grads(lambda a, k: _ref(a, k, None))):
        assert _rel(a, e) <= 1e-5
    got = torch.func.vmap(lambda a: fastconv.depthwise_conv2d(a, w, backend=backend))(x.unsqueeze(1))
    assert _rel(got, torch.func.vmap(lambda a: _ref(a, w, None))(x.unsqueeze(1))) <= 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["native/native/cpp", "cpp/native/channels_last"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_mode_ad_matches_conv2d(backend, layout, one_thread):
    """Dual numbers, torch.func.jvp and a vectorized forward-mode jacobian through every backend (and per-op names):
    the output's tangent is F.conv2d's (the custom Function had no jvp: NotImplementedError), in the input's layout."""
    if "cpp" in backend:
        need_cpp()
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(2, 8, 9, 7, generator=g), torch.randn(8, 1, 5, 3, generator=g), torch.randn(8, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xt, wt, bt = (torch.randn(t.shape, generator=g) for t in (x, w, b))
    xt = xt.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else xt
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in ((x, xt), (w, wt), (b, bt))]
        y, y_t = fwAD.unpack_dual(fastconv.depthwise_conv2d(*duals, backend=backend))
        ref, ref_t = fwAD.unpack_dual(_ref(*duals))
    assert _rel(y, ref) <= 1e-5 and _rel(y_t, ref_t) <= 1e-5
    if layout == "channels_last" and backend != "fft":
        assert y_t.is_contiguous(memory_format=torch.channels_last)
    _, jt = torch.func.jvp(lambda a: fastconv.depthwise_conv2d(a, w, None, backend=backend), (x,), (xt,))
    assert _rel(jt, _ref(xt, w, None)) <= 1e-5
    # batched tangents (a vectorized forward-mode jacobian): "fft" on channels_last failed with torch's "NYI:
    # Tensor.clone(memory_format) inside vmap"
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    small = (x[:1, :2, :5, :4].contiguous(memory_format=fmt), w[:2], b[:2])
    jf, jr = (torch.autograd.functional.jacobian(conv, small, vectorize=True, strategy="forward-mode")
              for conv in (lambda *a: fastconv.depthwise_conv2d(*a, backend=backend), _ref))
    assert all(_rel(a, e) <= 1e-5 for a, e in zip(jf, jr))


@pytest.mark.parametrize("backend,frozen", [(None, True)] + [(b, f) for b in ("channels_last", "cpp")
                                                              if b in CPU_BACKENDS for f in (True, False)])
def test_captum_saliency_computes_no_weight_gradient(backend, frozen, monkeypatch):
    """captum's gradient w.r.t. the image, frozen or trainable weights: no dL/dw (the kernels that compute it are
    made to raise), the same attribution as nn.Conv2d, no .grad left on the parameters."""
    from captum.attr import Saliency

    def boom(*a, **k):
        raise AssertionError("weight gradient computed for a gradient w.r.t. the input")

    for name in ("onednn_weight_grad", "cpp_weight_grad", "cpp_backward"):
        monkeypatch.setattr(ck, name, boom)
    model = nn.Sequential(fastconv.DepthwiseConv2d(4, 13, backend=backend), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3)).eval()
    model.requires_grad_(not frozen)
    ref = nn.Sequential(nn.Conv2d(4, 4, 13, padding=6, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 8, 8)
    a = Saliency(model).attribute(x, target=1, abs=False)
    r = Saliency(ref).attribute(x, target=1, abs=False)
    assert _rel(a, r) <= 1e-4 and a.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", ["channels_last", "cpp"] + [None])
def test_vmap_jacobians_match_conv2d(backend, one_thread):
    """torch.func.vmap over the module, jacrev w.r.t. the input (NCHW and channels_last) and the parameters, jacfwd,
    hessian, per-sample gradients vmap(grad), and torch.autograd.functional.jacobian(vectorize=True) (the older
    vmap, is_grads_batched): batched tensors have no data pointer for the kernels and the Function has no vmap rule,
    so these calls take the stock op (they failed: "Cannot access data pointer", "does not have vmap support")."""
    from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

    torch.manual_seed(0)
    conv = fastconv.DepthwiseConv2d(4, 7, backend=backend)
    ref = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 6, 6)

    def f(m):
        return lambda t: m(t).tanh().sum(dim=(1, 2, 3))

    assert _rel(vmap(conv)(x.unsqueeze(1)), vmap(ref)(x.unsqueeze(1))) <= 1e-6
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        assert _rel(jacrev(f(conv))(t), jacrev(f(ref))(t)) <= 1e-5
    j = torch.autograd.functional.jacobian(f(conv), x, vectorize=True)
    assert _rel(j, torch.autograd.functional.jacobian(f(ref), x, vectorize=True)) <= 1e-5
    params = {k: v.detach() for k, v in conv.named_parameters()}
    jp = jacrev(lambda p: functional_call(conv, p, (x,)).tanh().sum())(params)
    jr = jacrev(lambda p: functional_call(ref, p, (x,)).tanh().sum())(params)
    assert all(_rel(jp[k], jr[k]) <= 1e-5 for k in jp)
    x1 = x[:1, :, :4, :4]
    assert _rel(jacfwd(f(conv))(x1), jacfwd(f(ref))(x1)) <= 1e-5

    def total(m):
        return lambda t: m(t).tanh().sum()

    assert _rel(hessian(total(conv))(x1), hessian(total(ref))(x1)) <= 1e-5
    for t in (x1, x1.contiguous(memory_format=torch.channels_last)):  # forward-over-reverse with batched tangents
        h, hr = (torch.autograd.functional.hessian(total(m), t, vectorize=True, outer_jacobian_strategy="forward-mode")
                 for m in (conv, ref))
        assert _rel(h, hr) <= 1e-5
    per_sample = {m: vmap(grad(lambda p, t: functional_call(m, p, (t.unsqueeze(0),)).tanh().sum()), (None, 0))(
        {k: v.detach() for k, v in m.named_parameters()}, x) for m in (conv, ref)}
    assert all(_rel(per_sample[conv][k], per_sample[ref][k]) <= 1e-5 for k in per_sample[conv])


def test_module_is_drop_in_for_conv2d_state_dict():
    conv = nn.Conv2d(12, 12, (7, 5), padding=(3, 2), groups=12)
    dw = fastconv.DepthwiseConv2d(12, (7, 5))
    assert isinstance(dw, nn.Conv2d)
    assert list(dw.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    assert dw.weight.shape == conv.weight.shape == (12, 1, 7, 5)
    dw.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(2, 12, 9, 9)
    assert _rel(dw(x), conv(x)) <= 1e-5
    assert torch.equal(dw(x[0]), dw(x[:1])[0]) and _rel(dw(x[0]), conv(x[0])) <= 1e-5  # unbatched (C, H, W)
    back = nn.Conv2d(12, 12, (7, 5), padding=(3, 2), groups=12, bias=True)
    back.load_state_dict(fastconv.DepthwiseConv2d(12, (7, 5)).state_dict(), strict=True)
    assert fastconv.DepthwiseConv2d(3, 5, bias=False).bias is None


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS, "native/native/cpp"])
def test_functional_takes_an_unbatched_input_as_conv2d_does(backend, one_thread):
    """An unbatched (C, H, W) input, which F.conv2d and the module take, gives (C, H, W) and F.conv2d's gradients
    (before: "x must be 4-D (N, C, H, W)"); with groups, the channels are its first dimension."""
    x, w, b = torch.randn(4, 9, 8), torch.randn(4, 1, 7, 5), torch.randn(4)
    for t in (x, w, b):
        t.requires_grad_()
    y = fastconv.depthwise_conv2d(x, w, b, backend=backend)
    want = F.conv2d(x, w, b, padding=(3, 2), groups=4)
    assert y.shape == want.shape == (4, 9, 8) and _rel(y, want) <= 1e-5
    g = torch.randn_like(want)
    grads = torch.autograd.grad(y, (x, w, b), g)
    for got, ref in zip(grads, torch.autograd.grad(want, (x, w, b), g)):
        assert got.shape == ref.shape and _rel(got, ref) <= 1e-4
    with torch.no_grad():
        assert _rel(fastconv.depthwise_conv2d(x, w, b, backend=backend, padding=(3, 2), groups=4), want) <= 1e-5
    with pytest.raises(ValueError, match="groups must equal the 4 channels"):
        fastconv.depthwise_conv2d(x, w, b, backend=backend, groups=9)


def test_module_repr_names_the_backend_that_runs(monkeypatch):
    """The repr is nn.Conv2d's with the backend that runs: the module's own, else the one the settings force, else
    'auto' (it printed ``backend=None`` for every module that follows the settings); a misspelt $FASTCONV_BACKEND,
    which the forward refuses, leaves the model printable."""
    conv = repr(nn.Conv2d(4, 4, (7, 5), padding=(3, 2), groups=4))
    assert repr(fastconv.DepthwiseConv2d(4, (7, 5))) == "Depthwise" + conv[:-1] + ", backend='auto')"
    assert repr(fastconv.DepthwiseConv2d(4, (7, 5), backend="fft")) == "Depthwise" + conv[:-1] + ", backend='fft')"
    with fastconv.use(backend="channels_last"):
        assert repr(fastconv.DepthwiseConv2d(4, (7, 5))).endswith(", backend='channels_last')")
        assert repr(fastconv.DepthwiseConv2d(4, (7, 5), backend="native")).endswith(", backend='native')")
    monkeypatch.setenv("FASTCONV_BACKEND", "cppp")
    monkeypatch.setattr(fastconv.config, "_defaults", None)  # the settings read from the environment again
    assert repr(fastconv.DepthwiseConv2d(4, 3)).endswith(", backend=?)")
    monkeypatch.undo()


def test_module_takes_conv2d_keywords_and_refuses_what_it_does_not_compute():
    """nn.Conv2d's keywords at the values this conv computes build the module (before: TypeError "unexpected keyword
    argument 'padding'"); other values, an nn.Conv2d-style (C, C, K) call (before: silently a CxC kernel with bias
    "K") and a misspelt backend (before: accepted, failing at the first forward) are one ValueError each."""
    x = torch.randn(2, 5, 9, 8)
    for k, pad in ((7, 3), (7, "same"), ((7, 5), (3, 2)), ((7, 5), [3, 2]), ((1, 3), "same")):
        m = fastconv.DepthwiseConv2d(5, k, padding=pad, groups=5, dilation=1, padding_mode="zeros",
                                     backend="native/native/cpp" if ck.cpp_available() else "channels_last")
        ref = nn.Conv2d(5, 5, k, padding=pad, groups=5)
        ref.load_state_dict(m.state_dict(), strict=True)
        assert _rel(m(x), ref(x)) <= 1e-5
    for call, msg in ((lambda: fastconv.DepthwiseConv2d(3, 3, 7), "not nn.Conv2d's"),
                      (lambda: fastconv.DepthwiseConv2d(4, 7, padding=2), "padding=2"),
                      (lambda: fastconv.DepthwiseConv2d(4, (7, 5), padding=3), r"'same' or \(3, 2\)"),
                      (lambda: fastconv.DepthwiseConv2d(4, 7, padding="valid"), "padding='valid'"),
                      (lambda: fastconv.DepthwiseConv2d(4, 7, padding_mode="reflect"), "padding_mode='reflect'"),
                      (lambda: fastconv.DepthwiseConv2d(4, 7, groups=2), "groups=2"),
                      (lambda: fastconv.DepthwiseConv2d(4, 7, dilation=2), "dilation=2"),
                      (lambda: fastconv.DepthwiseConv2d(4, 7, backend="cppp"), "unknown backend 'cppp'")):
        with pytest.raises(ValueError, match=msg):
            call()
    m = fastconv.DepthwiseConv2d(5, 7)
    m.padding = "same"  # as nn.Conv2d stores it: the same conv (before: "changed after construction")
    assert _rel(m(x), _ref(x, m.weight, m.bias)) <= 1e-5


def test_functional_takes_conv2d_padding_and_groups_at_the_values_it_computes():
    """``depthwise_conv2d(x, w, b, padding=K//2, groups=C)``, an F.conv2d call with its name changed, computes the
    same (before: TypeError); another padding or groups is one ValueError."""
    x, w, b = torch.randn(2, 4, 9, 8), torch.randn(4, 1, 7, 5), torch.randn(4)
    want = F.conv2d(x, w, b, padding=(3, 2), groups=4)
    for pad in ((3, 2), [3, 2], "same"):
        assert _rel(fastconv.depthwise_conv2d(x, w, b, padding=pad, groups=4), want) <= 1e-5
    w7 = torch.randn(4, 1, 7, 7)
    assert _rel(fastconv.depthwise_conv2d(x, w7, None, padding=3), F.conv2d(x, w7, padding=3, groups=4)) <= 1e-5
    for kw, msg in (({"padding": 3}, r"'same' or \(3, 2\) for a 7x5"), ({"padding": 0}, "padding=0"),
                    ({"padding": "valid"}, "padding='valid'"), ({"groups": 1}, "groups=1")):
        with pytest.raises(ValueError, match=msg):
            fastconv.depthwise_conv2d(x, w, b, **kw)


@pytest.mark.parametrize("call,msg", [
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4)), "odd"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(5, 1, 3, 3)), "channels"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(8, 8), torch.randn(4, 1, 3, 3)), "(N, C, H, W) or unbatched"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3)), "(C, 1, KH, KW)"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8, dtype=torch.complex64),
                                       torch.randn(4, 1, 3, 3, dtype=torch.complex64)), "dtype"),
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
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8).to_sparse(), torch.randn(4, 1, 3, 3)), "dense"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 9, 9).to_sparse()), "dense"),
    (lambda: fastconv.depthwise_conv2d(torch.randn(1, 4, 8, 8).to_mkldnn(), torch.randn(4, 1, 3, 3)), "dense"),
])
def test_bad_input_raises_clear_value_error(call, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


@pytest.mark.parametrize("backend", ["auto", "cpp", "native"])
def test_sparse_tensors_after_a_dense_call_of_their_shape_raise_clear_value_error(backend):
    """The memoized decision of a dense call must not run a sparse one (before: "Cannot access data pointer of Tensor
    that doesn't have storage" from the C++ kernel, or F.conv2d's RuntimeError)."""
    x, w, b = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 9, 9), torch.randn(4)
    fastconv.depthwise_conv2d(x, w, b, backend=backend)
    for args in ((x, w.to_sparse(), b), (x, w, b.to_sparse()), (x.to_sparse(), w, b)):
        with pytest.raises(ValueError, match="dense"):
            fastconv.depthwise_conv2d(*args, backend=backend)


def test_a_stride_and_dilation_of_one_as_a_list_are_accepted():
    """``stride=[1, 1]`` / ``dilation=[1, 1]`` (as F.conv2d and nn.Conv2d take them) were refused with "only stride 1
    and dilation 1 are supported (got stride=[1, 1])"; other strides still are."""
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    y = fastconv.depthwise_conv2d(x, w, stride=[1, 1], dilation=[1, 1])
    assert _rel(y, _ref(x, w, None)) <= 1e-5
    m = fastconv.DepthwiseConv2d(4, 3, stride=[1, 1])
    assert m.stride == (1, 1) and _rel(m(x), _ref(x, m.weight, m.bias)) <= 1e-5
    for bad in ([1, 2], (2, 1), [1], 2):
        with pytest.raises(ValueError, match="only stride 1"):
            fastconv.depthwise_conv2d(x, w, stride=bad)


def test_flop_counter_and_fake_tensors_run_the_stock_op(monkeypatch):
    """Under FlopCounterMode and on fake tensors the call is the stock op, which they handle: FlopCounterMode counted 0
    FLOPs for the C++ kernel and the FFT and 14x the conv's for an autotuned first call (its timing runs), and
    FakeTensorMode (shape and memory estimates) crashed the process (the C++ kernel wrote through a fake tensor's
    pointer). An "auto" call still makes its decision (outside the mode), as a first call does, so the next plain
    call times nothing."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = torch.randn(2, 4, 12, 11), torch.randn(4, 1, 9, 7), torch.randn(4)
    for backend in ("auto", "cpp", "fft", "native/native/cpp"):
        with FlopCounterMode(display=False) as counter:
            y = fastconv.depthwise_conv2d(x, w, b, backend=backend)
        assert counter.get_total_flops() == 2 * x.numel() * 9 * 7 and _rel(y, _ref(x, w, b)) <= 1e-5
    monkeypatch.setattr(dispatch, "decide", lambda *a, **k: pytest.fail("decided again"))
    assert _rel(fastconv.depthwise_conv2d(x, w, b), _ref(x, w, b)) <= 1e-5  # decided under the mode, outside it
    with FakeTensorMode():
        conv = fastconv.DepthwiseConv2d(4, 13, backend="cpp")
        xf = torch.randn(2, 4, 16, 16, requires_grad=True)
        y = conv(xf)
        y.sum().backward()
        y2 = fastconv.depthwise_conv2d(xf.detach(), conv.weight.detach())  # fake tensors on the auto path
    assert isinstance(y, FakeTensor) and isinstance(y2, FakeTensor) and y.shape == y2.shape == (2, 4, 16, 16)
    assert xf.grad.shape == xf.shape and conv.weight.grad.shape == (4, 1, 13, 13)


def test_explain_on_fake_tensors_answers_without_timing(monkeypatch):
    """``explain`` on fake tensors says what ``depthwise_conv2d`` runs on them, the stock op, without deciding (the
    autotuner timed its candidates on them: the C++ kernel wrote through a fake tensor's pointer and crashed the
    process); an unbatched (C, H, W) input is explained as the batch of one that runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(dispatch, "decide", lambda *a, **k: pytest.fail("decided (timed) on fake tensors"))
    with FakeTensorMode():
        x, w = torch.randn(2, 4, 16, 16), torch.randn(4, 1, 9, 9)
        text = fastconv.explain(x, w)
    assert "x=(2,4,16,16) kernel 9x9" in text and "-> backend 'native': FakeTensor (a tensor that dispatches" in text
    assert "cpp kernel variant" not in text
    monkeypatch.undo()
    with fastconv.use(backend="fft"):
        assert "x=(1,4,16,16)" in fastconv.explain(torch.randn(4, 16, 16), torch.randn(4, 1, 9, 9))


def test_explain_under_dispatch_modes_says_what_runs_and_times_outside_them(fastconv_isolated, monkeypatch):
    """``explain`` on real tensors under FakeTensorMode(allow_non_fake_inputs=True) timed the C++ kernel there, which
    wrote through a fake output's pointer and crashed the process (and under make_fx its timing runs went into the
    graph); it now says the call runs the stock op there, as it does, without timing. Under another dispatch mode (a
    logging one) the decision is timed with the mode set aside: the mode sees none of the timing runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(1, 4, 16, 16), torch.randn(4, 1, 13, 13)
    with monkeypatch.context() as m:
        m.setattr(dispatch, "decide", lambda *a, **k: pytest.fail("decided (timed) under FakeTensorMode"))
        with FakeTensorMode(allow_non_fake_inputs=True):
            text = fastconv.explain(x, w)
    assert "-> backend 'native': under FakeTensorMode: the stock op F.conv2d" in text and "cpp kernel" not in text
    with Log() as log:
        text = fastconv.explain(x, w)
    assert "-> backend '" in text and "under Log" not in text and log.ops == []


def test_a_tensor_subclass_with_its_own_torch_function_keeps_its_type(one_thread):
    """A tensor subclass that overrides ``__torch_function__`` only (no Python dispatch) gets its type back, as from
    F.conv2d, whichever tensor it is and whichever backend runs (the C++ kernel returned a plain Tensor for a subclass
    weight or bias), with F.conv2d's values and gradients; its ``__torch_function__`` sees the op."""
    seen = []

    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x, w, b = torch.randn(2, 4, 9, 8), torch.randn(4, 1, 9, 7), torch.randn(4)
    for i in range(3):
        for backend in ("cpp", "auto", "channels_last", "fft"):
            args = [t.clone().requires_grad_() for t in (x, w, b)]
            args[i] = args[i].as_subclass(Tagged)
            want = F.conv2d(*args, padding=(4, 3), groups=4)
            seen.clear()
            y = fastconv.depthwise_conv2d(*args, backend=backend)
            assert type(y) is type(want) is Tagged and _rel(y, want) <= 1e-5
            assert seen[0] is fastconv.depthwise_conv2d
            g = torch.randn_like(want)
            for got, ref in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(want, args, g)):
                assert type(got) is type(ref) and _rel(got, ref) <= 1e-4
    module = fastconv.DepthwiseConv2d(4, (9, 7), backend="cpp")
    assert type(module(x.as_subclass(Tagged))) is Tagged


def test_flops_counted_by_caller_keeps_the_kernels_under_flop_counter(monkeypatch):
    """With ``flops_counted_by_caller()`` a call under FlopCounterMode runs the backend it runs elsewhere (the mode
    then sees none of its work: the caller counts it), outside the block the stock op again."""
    from torch.utils.flop_counter import FlopCounterMode

    need_cpp()
    ran, real = [], ck.cpp_conv
    monkeypatch.setattr(ck, "cpp_conv", lambda *a, **k: ran.append(1) or real(*a, **k))
    x, w = torch.randn(2, 4, 12, 11), torch.randn(4, 1, 9, 7)
    with FlopCounterMode(display=False) as counter:
        with fastconv.flops_counted_by_caller():
            y = fastconv.depthwise_conv2d(x, w, backend="cpp")
        inside = counter.get_total_flops()
        fastconv.depthwise_conv2d(x, w, backend="cpp")
    assert inside == 0 and len(ran) == 1 and _rel(y, _ref(x, w, None)) <= 1e-5
    assert counter.get_total_flops() == 2 * x.numel() * 9 * 7 and len(ran) == 1


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
        return fake[name]

    monkeypatch.setattr(dispatch, "_time_backend", fake_time)
    # the C++ kernel far ahead at each operation alone: no mix to time
    monkeypatch.setattr(dispatch, "_time_op", lambda op, name, *a: (1.0 if name == "cpp" else 9.0) / 1e3)
    y = fastconv.depthwise_conv2d(x, w)
    # the cost model never times NCHW native at padding 8 (oneDNN im2col cliff)
    assert "native" not in calls and set(calls) == set(CPU_BACKENDS) - {"native", "fft"}
    assert _rel(y, _ref(x, w, None)) <= 1e-5
    cache = json.loads((tmp_path / "fc" / "autotune.json").read_text())
    (key,) = cache
    assert cache[key]["backend"] == "cpp" and "17x17" in key and "grad_x1w1" in key
    # a new process (memory cleared) reads the file instead of timing again
    dispatch.clear_cache(memory_only=True)
    calls.clear()
    text = fastconv.explain(x, w)
    assert calls == [] and "backend 'cpp'" in text and "from cache" in text and "not native" in text
    # inference (no grad) is a different decision
    with torch.no_grad():
        fastconv.depthwise_conv2d(x, w)
    assert calls and len(json.loads((tmp_path / "fc" / "autotune.json").read_text())) == 2



@pytest.mark.parametrize("cpp_ms,expect", [(0.95, "native"), (0.85, "cpp")])
def test_autotune_keeps_the_stock_call_unless_another_is_clearly_faster(cpp_ms, expect, monkeypatch, tmp_path):
    """A backend other than stock F.conv2d (in the input's layout, or through channels_last) is picked only when
    it measured ``STOCK_TIE`` (10 %) faster than the fastest stock way: fastconv never slower than PyTorch. The
    rule also applies to a decision read from the cache (one written by an older erf-lab, with the times)."""
    x = torch.randn(1, 8, 12, 12)
    w = torch.randn(8, 1, 5, 5)
    fake = {"native": 1.0, "channels_last": 1.2, "cpp": cpp_ms}
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: fake[name])
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (list(fake), {}))  # the C++ kernel even without a compiler
    with torch.no_grad():
        d = dispatch.decide(x, w, None)
    assert d["backend"] == expect and not d["cached"] and d["times_ms"]["cpp"] == cpp_ms * 1e3
    assert ("less than 10% faster" in d["why"]) == (expect == "native")
    # an entry cached with the fastest-wins rule: re-decided from its times, without timing again
    cache = tmp_path / "fc" / "autotune.json"
    entries = json.loads(cache.read_text())
    (key,) = entries
    entries[key] = {"backend": "cpp", "why": "autotuned (fastest measured)", "times_ms": d["times_ms"]}
    cache.write_text(json.dumps(entries))
    dispatch.clear_cache(memory_only=True)
    monkeypatch.setattr(dispatch, "_time_backend", lambda *a, **k: pytest.fail("timed again"))
    with torch.no_grad():
        again = dispatch.decide(x, w, None)
    assert again["cached"] and again["backend"] == expect


@pytest.mark.parametrize("content", ["null", "[1, 2]", '"text"', '{"k": 1}', "{bad", "WRONG_ENTRY"])
def test_corrupt_autotune_cache_is_timed_again_and_rewritten(content, monkeypatch, tmp_path):
    """A cache file that is not a JSON object of decisions (it crashed every call: TypeError / AttributeError) is
    read as empty; the next decision rewrites it."""
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 9, 9)
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: {"channels_last": 1.0}.get(name, 2.0))
    key = dispatch.cache_key(x, w, None)
    f = tmp_path / "fc" / "autotune.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({key: "cpp"}) if content == "WRONG_ENTRY" else content)
    assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5
    assert "backend 'channels_last'" in fastconv.explain(x, w)
    on_disk = json.loads(f.read_text())
    assert on_disk[key]["backend"] == "channels_last" and ("k" not in on_disk or content != '{"k": 1}')


def test_autotune_decisions_are_per_cpu(monkeypatch):
    """A cache folder shared by machines with other CPUs (an NFS home on a cluster) keeps a decision per CPU: the key
    held the thread count and lane width only, and a decision timed on one CPU model ran on every other one."""
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 9, 9)
    keys = []
    for cpu in ("model name\t: AMD EPYC 7B13flags\t: avx2 fma", "model name\t: Intel Xeon 8481Cflags\t: avx2 fma",
                "model name\t: AMD EPYC 7B13flags\t: avx2 fma"):
        monkeypatch.setattr(ck, "_cpu_id", lambda cpu=cpu: cpu)
        keys.append(dispatch.cache_key(x, w, None))
    assert keys[0] != keys[1] and keys[0] == keys[2]


@pytest.mark.parametrize("times", [[1, 2], {"channels_last": "1.0", "native": 2.0}, {"channels_last": None},
                                   {"channels_last": float("nan"), "native": True}, "text"])
def test_cached_decision_with_malformed_times_is_kept_as_it_is(times, monkeypatch, tmp_path):
    """A cached decision whose stored times are not numbers (hand-edited or corrupt) runs its backend without
    timing again; the times are left out of the stock tie rule instead of crashing every call."""
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 9, 9)
    monkeypatch.setattr(dispatch, "_time_backend", lambda *a, **k: pytest.fail("timed again"))
    key = dispatch.cache_key(x, w, None)
    f = tmp_path / "fc" / "autotune.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({key: {"backend": "channels_last", "why": "autotuned", "times_ms": times}}))
    assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5
    assert "backend 'channels_last'" in fastconv.explain(x, w)


def test_unwritable_cache_dir_keeps_decisions_in_memory(monkeypatch, tmp_path):
    """A cache folder that cannot be written (here a regular file in its place, which holds for root too): the call
    runs, and the decision is remembered for the process instead of being timed again; ``explain`` says so (it said
    "[from cache <file>]" of a file that was never written)."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    fastconv.configure(cache_dir=blocker)
    calls = []
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: calls.append(name) or 1.0)
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 9, 9)
    assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5
    timed = len(calls)
    dispatch._fast.clear()  # the per-signature memo: the decision must come from the in-memory cache
    text = fastconv.explain(x, w)
    assert "autotuned" in text and len(calls) == timed > 0 and blocker.read_text() == ""
    # explain does not claim a cache file that was never written
    assert "[from cache" not in text and f"decided earlier in this process: the cache {blocker / 'autotune.json'} " \
        "could not be written" in text


@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
def test_first_call_under_saved_tensor_hooks_autotunes_outside_them(hooks, tmp_path):
    """A call first seen inside non-reentrant ``torch.utils.checkpoint`` (PyTorch's recommended mode) or
    ``save_on_cpu`` is timed on a helper thread, outside the hooks: inside checkpoint the autotuner's own timed
    forward + backward calls were packed by checkpoint's hooks, and the backward failed with torch's "Unexpected
    state: target_frame.early_stop is set". Gradients as F.conv2d's."""
    from torch.utils.checkpoint import checkpoint

    fastconv.configure(cache_dir=tmp_path, autotune=True)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    w = torch.randn(16, 1, 7, 7, requires_grad=True)

    def f(x, w):
        return fastconv.depthwise_conv2d(x, w).relu()

    if hooks == "checkpoint":
        y = checkpoint(f, x, w, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            y = f(x, w)
    grads = torch.autograd.grad(y.square().sum(), (x, w))
    ref = torch.autograd.grad(_ref(x, w, None).relu().square().sum(), (x, w))
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(grads, ref))
    assert any(isinstance(e, dict) and "times_ms" in e for e in json.loads(dispatch.cache_file().read_text()).values())


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_cache_files_are_readable_by_other_users_of_a_shared_cache(tmp_path):
    """The tables (autotune, roofline) and the C++ build in the cache folder get the mode a plain open() / the
    compiler gives under the umask (0644 / 0755 under 022), not mkstemp's owner-only one: another user of a shared
    cache folder read an owner-only table as empty (and replaced it with its own entries alone) and could not load
    an owner-only kernel library (0711), which it would never build again."""
    from fastconv import jsonstore

    old = os.umask(0o022)
    try:
        jsonstore.store(tmp_path / "t" / "autotune.json", "k", 1)
        assert (tmp_path / "t" / "autotune.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        jsonstore.store(tmp_path / "t" / "autotune.json", "j", 2)  # the umask decides, as for open()
        assert (tmp_path / "t" / "autotune.json").stat().st_mode & 0o777 == 0o640
        if ck._compiler():
            fastconv.configure(cache_dir=tmp_path / "c")
            src = Path(ck.__file__).with_name("csrc") / "fma_peak.c"
            lib = ck.compile_shared_library(src, ["-O1", "-march=native", "-shared", "-fPIC"])
            assert lib.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)
    assert jsonstore.read_table(tmp_path / "t" / "autotune.json") == {"k": 1, "j": 2}


def _leftovers(folder: Path, old: list[str], young: list[str]) -> None:
    """Files (and folders, names ending in /) in ``folder``: ``old`` ones last modified two hours ago."""
    folder.mkdir(parents=True, exist_ok=True)
    two_hours_ago = time.time() - 7200
    for name in old + young:
        p = folder / name.rstrip("/")
        p.mkdir() if name.endswith("/") else p.write_bytes(b"\0" * 64)
        if name in old:
            os.utime(p, (two_hours_ago, two_hours_ago))


def test_a_build_and_an_autotune_write_remove_their_hour_old_leftovers(tmp_path):
    """A build or a table rewrite killed mid-way (SIGKILL, power loss) left its temporary file (a build's is ~0.5 MB)
    in the cache folder for ever. The next build removes the build leftovers over an hour old, the next autotune
    write those of autotune.json; a finished library, a lock file, a young temporary file (a live writer's) and any
    other file stay."""
    need_compiler()
    cache = tmp_path / "cache"
    fastconv.configure(cache_dir=cache)
    build = cache / "build"
    stale_builds = [".dwconv_k3j9x0qz.so", ".fma_peak_a_b_c_d_.so"]
    kept_builds = [".dwconv_a1b2c3d4.so",  # young: a build in progress
                   "dwconv_0123456789abcdef.so", "dwconv_0123456789abcdef.so.lock", ".dwconv_abc.so", "notes.txt",
                   ".dwconv_k3j9x0qz.so.keep", ".dir_k3j9x0qz.so/", ".autotune.json.k3j9x0qz.tmp"]
    _leftovers(build, old=stale_builds + kept_builds[1:], young=kept_builds[:1])
    src = tmp_path / "t.c"
    src.write_text("int f(void) { return 7; }\n")
    lib = ck.compile_shared_library(src, ["-shared", "-fPIC"])
    assert ctypes.CDLL(str(lib)).f() == 7
    assert sorted(p.name for p in build.iterdir()) == sorted([*(n.rstrip("/") for n in kept_builds), lib.name,
                                                              lib.name + ".lock"])

    stale_tables = [".autotune.json.x_9a0b1c.tmp", ".autotune.json.zzzzzzzz.tmp"]
    kept_tables = [".autotune.json.q1w2e3r4.tmp",  # young: a rewrite in progress
                   "autotune.json.lock", ".roofline.json.x_9a0b1c.tmp", ".autotune.json.tmp", "autotune.json.bak"]
    _leftovers(cache, old=stale_tables + kept_tables[1:], young=kept_tables[:1])
    dispatch._store("k", {"backend": "native"})
    assert dispatch._read(dispatch.cache_file()) == {"k": {"backend": "native"}}
    assert sorted(p.name for p in cache.iterdir()) == sorted([*kept_tables, "autotune.json", "build"])


def test_cleaning_leftovers_never_fails_a_build_or_a_write(tmp_path, monkeypatch):
    """A leftover that cannot be removed (another user's in a shared cache folder) or that another process removed
    first is skipped: the build and the table write go on."""
    from fastconv import jsonstore

    need_compiler()
    fastconv.configure(cache_dir=tmp_path / "cache")
    _leftovers(tmp_path / "cache" / "build", old=[".t_k3j9x0qz.so", ".t_00000000.so"], young=[])
    _leftovers(tmp_path / "cache", old=[".autotune.json.k3j9x0qz.tmp", ".autotune.json.00000000.tmp"], young=[])
    unlink = os.unlink
    refused = []

    def refusing_unlink(path, *args, **kwargs):
        name = os.path.basename(path)
        if "k3j9x0qz" in name:
            refused.append(name)
            raise PermissionError(13, "Permission denied", path)
        if "00000000" in name:
            unlink(path)  # another process was first
            raise FileNotFoundError(2, "No such file or directory", path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing_unlink)
    src = tmp_path / "t.c"
    src.write_text("int f(void) { return 8; }\n")
    assert ctypes.CDLL(str(ck.compile_shared_library(src, ["-shared", "-fPIC"]))).f() == 8
    jsonstore.store(tmp_path / "cache" / "autotune.json", "k", 1)
    assert jsonstore.read_table(tmp_path / "cache" / "autotune.json") == {"k": 1}
    assert refused == [".t_k3j9x0qz.so", ".autotune.json.k3j9x0qz.tmp"]
    assert (tmp_path / "cache" / "build" / ".t_k3j9x0qz.so").exists()
    assert not (tmp_path / "cache" / "build" / ".t_00000000.so").exists()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux /proc")
def test_plain_mode_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    """Where /proc has the umask it is read there: setting it to 0 to read it (as before) left files that other
    threads created in that moment world-writable."""
    from fastconv import jsonstore

    old = os.umask(0o027)
    try:
        f = tmp_path / "f"
        f.write_text("")
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("the umask was set"))
        jsonstore.plain_mode(f)
        jsonstore.plain_mode(tmp_path, executable=True)
        assert f.stat().st_mode & 0o777 == 0o640 and tmp_path.stat().st_mode & 0o777 == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.skipif(fastconv.jsonstore.fcntl is None, reason="no fcntl (Windows): the tables are updated unlocked")
def test_clear_cache_waits_for_an_update_in_progress(tmp_path):
    """``clear_cache`` removes the autotune file under the table's lock: an update in progress elsewhere (here
    the lock held while the table is rewritten, as ``update_table`` does) finishes first and is then cleared (the
    file was unlinked at once, and the update wrote the forgotten decisions back); a file already gone is no
    error."""
    from fastconv import jsonstore

    fastconv.configure(cache_dir=tmp_path)
    f = dispatch.cache_file()
    f.write_text(json.dumps({"old": {"backend": "native"}}))
    cleared = threading.Event()
    with jsonstore.locked(f):
        worker = threading.Thread(target=lambda: (dispatch.clear_cache(), cleared.set()))
        worker.start()
        time.sleep(0.3)
        assert not cleared.is_set() and f.exists()  # waiting for the lock
        tmp = tmp_path / ".autotune.json.tmp"
        tmp.write_text(json.dumps({"old": {"backend": "native"}, "new": {"backend": "cpp"}}))
        os.replace(tmp, f)
    worker.join(10)
    assert cleared.is_set() and not f.exists()
    dispatch.clear_cache()  # nothing left to remove


@pytest.mark.skipif(fastconv.jsonstore.fcntl is None, reason="no fcntl (Windows): the tables are updated unlocked")
def test_concurrent_table_updates_keep_every_entry(tmp_path):
    """Four processes add 50 keys each to one JSON table at once (``fastconv.jsonstore``, behind the autotune,
    roofline and erf-lab structure caches): under the lock all 200 are kept (measured with the lock disabled: 55 of
    200 survived the read-merge-write race)."""
    from fastconv import jsonstore

    script = textwrap.dedent("""
        import importlib.util, os, sys, time
        spec = importlib.util.spec_from_file_location("jsonstore", sys.argv[1])
        js = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(js)  # without fastconv's package import (torch): the processes start together
        table, who, go = sys.argv[2], sys.argv[3], sys.argv[4]
        open(go + "." + who, "w").close()
        while not os.path.exists(go):
            time.sleep(0.001)
        for i in range(50):
            js.store(table, f"{who}-{i}", i)
    """)
    table, go = tmp_path / "table.json", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT / "fastconv" / "jsonstore.py"),
                               str(table), str(n), str(go)]) for n in range(4)]
    deadline = time.time() + 60
    while not all((tmp_path / f"go.{n}").exists() for n in range(4)) and time.time() < deadline:
        time.sleep(0.01)
    go.write_text("")
    assert all(p.wait(60) == 0 for p in procs)
    assert jsonstore.read_table(table) == {f"{n}-{i}": i for n in range(4) for i in range(50)}


def test_real_autotune_times_and_explain_reports_them():
    x = torch.randn(1, 8, 8, 8)
    w = torch.randn(8, 1, 7, 7)  # forward K=7 on NCHW: timed
    text = fastconv.explain(x, w)
    d = dispatch.decide(x, w, None)
    assert d["backend"] in CPU_BACKENDS and d["cached"] is True
    assert "autotuned" in text and "ms: the fastest stock candidate's best round times each one's median" in text
    assert set(d["times_ms"]) == set(CPU_BACKENDS) - {"fft"}  # native is a candidate at K=7 (no cliff)
    assert "not fft: explicit only" in text
    t = d["times_ms"]
    fastest = min(t, key=t.get)
    stock = min((b for b in dispatch.STOCK_BACKENDS if b in t), key=t.get)
    # the fastest, or the fastest stock call where the fastest measured less than STOCK_TIE faster than it
    assert d["backend"] == (fastest if t[fastest] <= (1 - dispatch.STOCK_TIE) * t[stock] else stock)


def test_autotuning_leaves_the_global_rng_alone():
    """The autotuner times candidates inside a training run's first steps: drawing its timing data from the
    global RNG would change the run's dropout / drop-path masks, so a run that autotuned and the same run resumed
    on a warm cache would differ."""
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    w = torch.randn(16, 1, 9, 9, requires_grad=True)
    dispatch.clear_cache()
    torch.manual_seed(123)
    fastconv.depthwise_conv2d(x, w).sum().backward()  # a cold cache: timed, per operation too where it applies
    assert dispatch.decide(x, w, None)["cached"] is True
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))


def test_a_first_call_under_torch_func_is_not_kept_for_eager_calls():
    """Inside torch.func the candidates cannot be timed (they need plain tensors): the cost model answers that call,
    and an eager call of the same signature afterwards is still autotuned, not pinned to the stopgap."""
    from torch.func import grad

    dispatch.clear_cache()
    x, w = torch.randn(1, 16, 8, 20), torch.randn(16, 1, 9, 9)
    g = grad(lambda w: fastconv.depthwise_conv2d(x, w).sum())(w)
    assert torch.allclose(g, grad(lambda w: _ref(x, w, None).sum())(w), rtol=1e-4, atol=1e-3)
    assert not dispatch._fast  # nothing memoized from inside the transform
    ww = w.clone().requires_grad_()
    fastconv.depthwise_conv2d(x, ww).sum().backward()
    d = dispatch.decide(x, ww, None)
    assert d.get("cached") is True and "times_ms" in d  # timed (autotuned) for the eager call
    # with the decision cached, a call inside the transform takes it (the same backend as outside), memoized
    dispatch.clear_cache(memory_only=True)
    grad(lambda w: fastconv.depthwise_conv2d(x, w).sum())(w)
    assert [v[0] for v in dispatch._fast.values()] == [d["backend"]]


def test_explain_of_an_empty_call_does_not_crash():
    x, w = torch.randn(2, 0, 8, 20), torch.randn(0, 1, 5, 5)
    text = fastconv.explain(x, w)
    assert "empty input" in text
    if ck.cpp_available():
        assert ck.cpp_work_split(x, w)["wgrad_slices"] == 1


def test_triton_is_never_picked_above_its_kernel_limit(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 2, 5, 5)
    ok, why = fastconv.supports("triton", x, torch.randn(2, 1, 65, 3))
    assert not ok and "up to 63" in why


def test_triton_is_not_offered_float64(monkeypatch):
    """The Triton kernels refuse float64, and ``supports`` says so: the CUDA cost model, whose first choice is
    triton, asks ``supports`` before choosing (that dispatch itself needs a GPU; here, the refusal and the explicit
    call's clear error)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    ok, why = fastconv.supports("triton", x, w)
    assert not ok and "float64" not in why and "torch.float32" in why
    with pytest.raises(ValueError, match="cannot run this call"):
        fastconv.depthwise_conv2d(x, w, backend="triton")


def test_use_forces_a_backend_nests_and_restores(backend_spy):
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 5, 5)
    ran = backend_spy
    default = fastconv.settings()
    with fastconv.use(backend="fft") as s:
        assert s == fastconv.settings() == fastconv.Settings("fft", True, default.cache_dir)
        assert "forced by fastconv settings (backend='fft')" in fastconv.explain(x, w)
        assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5
        with fastconv.use(autotune=False):
            assert fastconv.settings() == fastconv.Settings("fft", False, default.cache_dir)
            with fastconv.use(backend="auto"):  # the dispatcher decides again, by the cost model
                fastconv.depthwise_conv2d(x, w)
            fastconv.depthwise_conv2d(x, w)
            fastconv.DepthwiseConv2d(4, 5, backend="native")(x)  # a backend named on the module wins
            seen = []
            t = threading.Thread(target=lambda: seen.append(fastconv.settings()))
            t.start()
            t.join()
        assert fastconv.settings().autotune is True
    assert fastconv.settings() == default
    assert ran == ["fft", "channels_last", "fft", "native"] and seen and seen[0] == default  # per thread
    with fastconv.use(backend="triton"), pytest.raises(ValueError, match="fastconv backend 'triton'.*CUDA"):
        fastconv.depthwise_conv2d(x, w)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"), fastconv.use(backend="cuda"):
        pass
    assert not dispatch.cache_file().exists()  # nothing was timed


def test_a_decided_call_skips_checks_and_dispatch_until_its_signature_changes(monkeypatch):
    """The per-signature memo (the stock call's overhead at K = 3 / 5): a repeated call runs the memoized runner,
    without the input checks or the dispatcher; a changed layout, grad mode, thread count or setting is checked and
    decided again, and arguments that are not tensors still get the checked path's error."""
    from fastconv import functional

    checked, real_check = [], functional.check_inputs
    monkeypatch.setattr(functional, "check_inputs", lambda *a: checked.append(1) or real_check(*a))
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: 1.0)  # equal times: the stock call
    x, w, b = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 3, 3), torch.randn(8)
    for _ in range(3):
        assert _rel(fastconv.depthwise_conv2d(x, w, b), _ref(x, w, b)) <= 1e-6
    assert len(checked) == 1
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = fastconv.depthwise_conv2d(x_cl, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last) and _rel(y, _ref(x, w, b)) <= 1e-6
    assert len(checked) == 2
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        fastconv.depthwise_conv2d(xg, w, b).sum().backward()
    assert len(checked) == 3 and _rel(xg.grad, F.conv_transpose2d(torch.ones_like(x), w, padding=1, groups=8)) <= 1e-6
    with fastconv.use(backend="fft"):
        assert _rel(fastconv.depthwise_conv2d(x, w, b), _ref(x, w, b)) <= 1e-5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        fastconv.depthwise_conv2d(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert len(checked) == 5
    fastconv.depthwise_conv2d(x, w, b)
    assert len(checked) == 5
    for bad_bias in (0.5, b.numpy()):
        with pytest.raises(ValueError, match="bias must have shape"):
            fastconv.depthwise_conv2d(x, w, bad_bias)
    with pytest.raises(ValueError, match="must be torch.Tensors"):
        fastconv.depthwise_conv2d(x.numpy(), w, b)
    with pytest.raises(ValueError, match="stride"):
        fastconv.depthwise_conv2d(x, w, b, stride=2)


def test_configure_and_environment_give_the_defaults(tmp_path):
    defaults = fastconv.configure(backend="native", autotune=False)
    assert fastconv.settings() == defaults == fastconv.Settings("native", False, tmp_path / "fc")
    with fastconv.use(backend="fft"):
        fastconv.configure(cache_dir=tmp_path / "other")  # a process default changed inside a block shows there
        assert fastconv.settings() == fastconv.Settings("fft", False, tmp_path / "other")
    code = ("import sys, fastconv; s = fastconv.settings(); "
            "print(s.backend, s.autotune, s.cache_dir, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCONV_")}
    env.update(PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"))

    def run(**extra):
        proc = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        return proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]

    assert run() == f"auto True {tmp_path / 'xdg' / 'fastconv'} False"
    assert run(FASTCONV_BACKEND="cpp", FASTCONV_AUTOTUNE="0", FASTCONV_CACHE="~/fc") == \
        f"cpp False {Path.home() / 'fc'} False"
    assert "unknown backend 'cudnn'" in run(FASTCONV_BACKEND="cudnn")



def test_autotune_values_that_are_not_a_yes_or_no_are_refused(tmp_path):
    """``use(autotune="0")`` / ``configure(autotune="false")`` and ``$FASTCONV_AUTOTUNE=false`` turned autotuning on
    (any non-empty string is true, and the variable was off only for "0"): now the usual spellings of on and off are
    read as such and anything else is one ValueError."""
    for value in ("0", "false", "no", "off", 0, False):
        with fastconv.use(autotune=value):
            assert fastconv.settings().autotune is False, value
    for value in ("1", "true", "yes", "on", 1, True):
        assert fastconv.configure(autotune=value).autotune is True, value
    for value in ("maybe", 2, 0.5, [False]):
        with pytest.raises(ValueError, match="autotune"), fastconv.use(autotune=value):
            pass
        with pytest.raises(ValueError, match="autotune"):
            fastconv.configure(autotune=value)
    code = "import fastconv; print(fastconv.settings().autotune)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCONV_")}
    env.update(PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"))

    def run(value):
        proc = subprocess.run([sys.executable, "-c", code], env={**env, "FASTCONV_AUTOTUNE": value},
                              capture_output=True, text=True)
        return proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]

    assert [run(v) for v in ("false", "Off", " no ", "0", "1", "true", "")] == ["False"] * 4 + ["True"] * 3
    assert "FASTCONV_AUTOTUNE" in run("sometimes")


def test_a_bad_cache_dir_or_backend_variable_is_one_line_naming_it(tmp_path):
    """``configure(cache_dir=3)`` raised Path's own TypeError; ``$FASTCONV_BACKEND=bogus`` did not say that the
    value came from the variable."""
    before = fastconv.settings().cache_dir
    for value in (3, "", [tmp_path]):
        with pytest.raises(ValueError, match=r"fastconv: cache_dir=.* is not a folder path"):
            fastconv.configure(cache_dir=value)
    assert fastconv.settings().cache_dir == before
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCONV_")}
    env.update(PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"), FASTCONV_BACKEND="bogus")
    proc = subprocess.run([sys.executable, "-c", "import fastconv; fastconv.settings()"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ValueError: fastconv: unknown backend 'bogus' (from $FASTCONV_BACKEND)" in proc.stderr.splitlines()[-1]


def test_a_user_without_a_home_folder_gets_a_private_cache_not_an_error(monkeypatch):
    """$HOME unset and a user id without a password entry (a container run as ``-u 12345``): every depthwise_conv2d
    raised Path.home()'s "Could not determine home directory". Now the process caches in a private temporary folder
    and warns once; a "~" path given for the cache is one ValueError saying to give a full path."""
    import pwd

    from fastconv import config

    for name in ("HOME", "XDG_CACHE_HOME", "FASTCONV_CACHE", "FASTCONV_BACKEND", "FASTCONV_AUTOTUNE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    with pytest.warns(RuntimeWarning, match=r"no home folder .* set \$FASTCONV_CACHE"):
        s = config._from_env()
    assert s.cache_dir.is_dir() and os.access(s.cache_dir, os.W_OK) and s.cache_dir.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("FASTCONV_CACHE", "~/fc")
    with pytest.raises(ValueError, match=r"'~/fc' .* names no home folder .*; give a full path"):
        config._from_env()
    monkeypatch.setenv("FASTCONV_CACHE", "~no-such-user-here/fc")  # a "~user" that names nobody
    with pytest.raises(ValueError, match=r"'~no-such-user-here/fc' .* \(no such user, or this user has none\)"):
        config._from_env()


def _erf_cpu_rule(channels_last: bool, kernel_size, dtype) -> str:
    """Copy of the ERF path's fixed CPU choice (``erf_lab.erf.compute.cpu_depthwise_backend`` as it was, CPP_MIN_K
    = 9): the C++ kernel from 9x9 for float32 when it runs multi-threaded, else oneDNN's direct kernel."""
    if max(kernel_size) >= 9 and dtype == torch.float32 and ck.cpp_multithreaded():
        return "cpp"
    return "native" if channels_last else "channels_last"


@pytest.mark.parametrize("cpp_threads", ["as built", "single-threaded"])
def test_cost_model_for_frozen_weights_is_the_erf_cpu_rule(cpp_threads, monkeypatch, backend_spy):
    """``use(autotune=False)`` picks exactly what the ERF code picked per module, so its matrices stay identical."""
    if cpp_threads == "single-threaded":
        monkeypatch.setattr(ck, "cpp_multithreaded", lambda: False)
    ran = backend_spy
    got, want = [], []
    for k in (3, 5, 7, 9, 13, 31):
        for channels_last in (True, False):
            for dtype in (torch.float32, torch.float64):
                for shape in ((1, 8, 12, 12), (1, 64, 64, 64)):  # the second is a "large call" (> 2e8 MACs at K=31)
                    x = torch.zeros(shape, dtype=dtype)
                    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                    w, b = torch.ones(shape[1], 1, k, k, dtype=dtype), torch.ones(shape[1], dtype=dtype)
                    with fastconv.use(autotune=False):
                        got.append(dispatch.decide(x.requires_grad_(), w, b)["backend"])  # forward + input grad
                        with torch.no_grad():
                            got.append(dispatch.decide(x, w, None)["backend"])
                        if shape[1] == 8:
                            fastconv.depthwise_conv2d(x, w, b)
                    want += [_erf_cpu_rule(channels_last, (k, k), dtype)] * 2
    assert got == want
    assert ran == want[::4]
    assert ("cpp" in want) == (cpp_threads == "as built" and ck.cpp_multithreaded())
    assert not dispatch.cache_file().exists()


def test_weight_grad_cost_model_excludes_native_at_large_k():
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 21, 21, requires_grad=True)
    cands, why = dispatch.candidates(x, w, None)
    assert "native" not in cands and "slow GEMM" in why["native"]
    with torch.no_grad():
        assert "native" in dispatch.candidates(x, w, None)[0]  # channels_last forward has no cliff


PER_OP_NAMES = ["native/channels_last/cpp", "cpp/native/channels_last", "channels_last/cpp/native",
                "native/native/cpp", "native/channels_last/channels_last"]


@pytest.mark.parametrize("name", PER_OP_NAMES)
@pytest.mark.parametrize("layout,with_bias", [("nchw", True), ("channels_last", False)])
def test_per_op_backends_match_conv2d_and_run_each_operation_where_named(name, layout, with_bias, monkeypatch,
                                                                         one_thread):
    """A per-op backend ("forward/input_grad/weight_grad") runs each operation with its own backend (spied), and
    the three results are F.conv2d's: forward, input and weight gradient, with and without bias, both layouts."""
    if "cpp" in name:
        need_cpp()
    from fastconv import backends

    ran = []
    for fn in ("_fwd", "_grad_input", "_grad_weight"):
        real = getattr(backends, fn)
        monkeypatch.setattr(backends, fn, lambda b, *a, _real=real, _fn=fn: ran.append((_fn, b)) or _real(b, *a))
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(2, 20, 11, 9, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(20, 1, 7, 5, generator=g)
    b = torch.randn(20, generator=g) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    y = fastconv.depthwise_conv2d(*leaves[:2], leaves[2] if with_bias else None, backend=name)
    ref = _ref(*ref_leaves[:2], ref_leaves[2] if with_bias else None)
    assert _rel(y, ref) <= 1e-5
    want = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=want)
    gy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, gy)
    for got, exp in zip(grads, torch.autograd.grad(ref, ref_leaves, gy)):
        assert got.shape == exp.shape and _rel(got, exp) <= 1e-4
    assert grads[0].is_contiguous(memory_format=want)
    fwd, gin, gwt = name.split("/")
    assert ran == [("_fwd", fwd), ("_grad_input", gin), ("_grad_weight", gwt)]
    with torch.no_grad():  # inference: the forward's backend alone
        ran.clear()
        assert _rel(fastconv.depthwise_conv2d(x, w, b, backend=name), ref) <= 1e-5 and ran == [("_fwd", fwd)]


@pytest.mark.parametrize("bad,msg", [("native/cpp", "unknown backend"), ("native/fft/cpp", "unknown backend"),
                                     ("cpp/native/", "unknown backend"),
                                     ("triton/native/native", "forward 'triton': triton needs a CUDA tensor")])
def test_per_op_backend_names_are_checked(bad, msg):
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=msg):
        fastconv.depthwise_conv2d(x, w, backend=bad)
    if msg == "unknown backend":
        with pytest.raises(ValueError, match="forward/input_grad/weight_grad"):
            fastconv.configure(backend=bad)
    else:
        with fastconv.use(backend=bad), pytest.raises(ValueError, match=msg):
            fastconv.depthwise_conv2d(x, w)
    with fastconv.use(backend="native/channels_last/native"):  # a valid name is a setting like any backend
        assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5


@pytest.mark.parametrize("mix_ms,cl_ms,expect", [(0.5, 1.5, "native/channels_last/channels_last"),
                                                 (0.95, 1.5, "native"), (0.5, 0.52, "channels_last")])
def test_per_op_autotune_times_the_mixes_as_whole_calls(mix_ms, cl_ms, expect, monkeypatch, tmp_path):
    """With gradients, each operation is timed alone per backend; the mixes of the backends within PER_OP_SPREAD of
    each operation's fastest are then timed as whole calls, and one is picked only when it wins there by STOCK_TIE
    over the stock call and by PER_OP_TIE over the fastest single backend. The decision, its per-op times and the
    "per op" line survive a new process (cache file)."""
    monkeypatch.setattr(dispatch, "PER_OP_MIN_MACS", 0)  # (a small call, its timings faked)
    x = torch.randn(1, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 1, 5, 5, requires_grad=True)
    op_ms = [{"native": 1.0, "channels_last": 3.0}, {"channels_last": 1.0, "native": 2.5},
             {"channels_last": 1.0, "native": 5.0}]
    alone = []
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["native", "channels_last"], {}))
    monkeypatch.setattr(dispatch, "_time_op", lambda op, name, *a: alone.append((op, name)) or op_ms[op][name] / 1e3)
    whole = {"native": 1.0, "channels_last": cl_ms}
    timed = []
    monkeypatch.setattr(dispatch, "_time_backend",
                        lambda name, *a, **k: timed.append(name) or whole.get(name, mix_ms) / 1e3)
    d = dispatch.decide(x, w, None)
    assert set(alone) == {(op, b) for op in range(3) for b in ("native", "channels_last")}
    # forward: native alone (channels_last 3x); input gradient: channels_last (native 2.5x); weight gradient:
    # channels_last (native 5x): one mix, timed as a whole call beside the two backends
    assert set(timed) == {"native", "channels_last", "native/channels_last/channels_last"}
    assert d["backend"] == expect and d["per_op_ms"]["forward"] == {"native": 1.0, "channels_last": 3.0}
    dispatch.clear_cache(memory_only=True)
    monkeypatch.setattr(dispatch, "_time_backend", lambda *a, **k: pytest.fail("timed again"))
    monkeypatch.setattr(dispatch, "_time_op", lambda *a, **k: pytest.fail("timed again"))
    again = dispatch.decide(x, w, None)
    assert again["cached"] and again["backend"] == expect
    text = fastconv.explain(x, w)
    assert ("per op: forward native, input gradient channels_last, weight gradient channels_last" in text) == (
        "/" in expect)
    assert ("measured less than 10% faster than channels_last" in text) == (expect == "channels_last")
    assert "measured per op (ms" in text and "weight gradient: channels_last 1, native 5" in text
    y = fastconv.depthwise_conv2d(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    ref = _ref(x, w, None)
    rx, rw = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    assert _rel(y, ref) <= 1e-5 and _rel(gx, rx) <= 1e-4 and _rel(gw, rw) <= 1e-4


def test_per_op_autotune_survives_failures_and_stale_cache_entries(monkeypatch, tmp_path):
    """An operation that fails with one backend leaves it out for that operation; a failure of the per-op pass itself
    leaves the single backends (explain says why); a trained bias alone does not time the weight gradient; a cached
    mix whose backends are no longer all candidates is timed again."""
    monkeypatch.setattr(dispatch, "PER_OP_MIN_MACS", 0)
    cands = ["native", "channels_last"]
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (list(cands), {}))
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: (0.5 if "/" in name else 1.0) / 1e3)

    def flaky(op, name, *a):
        if (op, name) == (0, "native"):
            raise RuntimeError("no kernel")
        return (1.0 if (op, name) in ((1, "native"), (2, "native")) else 3.0) / 1e3

    monkeypatch.setattr(dispatch, "_time_op", flaky)
    x, w = torch.randn(1, 8, 10, 10, requires_grad=True), torch.randn(8, 1, 5, 5, requires_grad=True)
    d = dispatch.decide(x, w, None)
    # forward: only channels_last ran; gradients: native 3x ahead of channels_last
    assert d["backend"] == "channels_last/native/native" and d["per_op_ms"]["forward"] == {"channels_last": 3.0}
    dispatch.clear_cache(memory_only=True)
    cands.remove("native")  # (e.g. a cache file from another torch build of the same key): timed again
    timed = []
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: timed.append(name) or 1e-3)
    cands.append("cpp")
    real_per_op = dispatch._per_op_candidates

    def no_memory(*a, **k):
        raise MemoryError("timing buffers")

    monkeypatch.setattr(dispatch, "_per_op_candidates", no_memory)  # (allocating its x-sized buffers failed)
    d = dispatch.decide(x, w, None)
    assert not d["cached"] and "/" not in d["backend"] and set(timed) == {"channels_last", "cpp"}
    assert d["excluded"]["per-op mixes"] == "failed while autotuning: MemoryError: timing buffers"
    monkeypatch.setattr(dispatch, "_per_op_candidates", real_per_op)
    alone = []
    monkeypatch.setattr(dispatch, "_time_op", lambda op, name, *a: alone.append(op) or 1e-3)
    # x and the bias trained, the weight frozen: the forward and input gradient are timed, not the weight gradient
    dispatch.decide(x, w.detach(), torch.randn(8, requires_grad=True))
    assert set(alone) == {0, 1}


@pytest.mark.parametrize("ratio,expect", [(0.8, "native/channels_last/channels_last"), (0.95, "channels_last"),
                                          (1.1, "channels_last")])
def test_a_mix_that_wins_the_rounds_must_win_head_to_head(ratio, expect, monkeypatch):
    """The winning mix is timed head to head against the fastest single backend and kept only PER_OP_TIE ahead
    there; a mix that lost leaves the decision and the cached times (a new process does not take it back)."""
    monkeypatch.setattr(dispatch, "PER_OP_MIN_MACS", 0)
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["native", "channels_last"], {}))
    op_ms = [{"native": 1.0, "channels_last": 3.0}, {"channels_last": 1.0, "native": 3.0},
             {"channels_last": 1.0, "native": 3.0}]
    monkeypatch.setattr(dispatch, "_time_op", lambda op, name, *a: op_ms[op][name] / 1e3)
    whole = {"native": 1.0, "channels_last": 0.8}
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: whole.get(name, 0.4) / 1e3)
    duels = []
    monkeypatch.setattr(dispatch, "_head_to_head", lambda a, b, *rest: duels.append((a, b)) or ratio)
    x, w = torch.randn(1, 8, 10, 10, requires_grad=True), torch.randn(8, 1, 5, 5, requires_grad=True)
    d = dispatch.decide(x, w, None)
    assert duels == [("native/channels_last/channels_last", "channels_last")] and d["backend"] == expect
    assert d["head_to_head"] == {"mix": duels[0][0], "against": "channels_last", "ratio": ratio}
    assert (duels[0][0] in d["times_ms"]) == (expect != "channels_last")
    assert ("head to head" in d["why"]) == (expect == "channels_last")
    dispatch.clear_cache(memory_only=True)
    assert dispatch.decide(x, w, None)["backend"] == expect
    assert f"head to head: the mix {duels[0][0]} took {ratio:.3g}x the time of channels_last" in fastconv.explain(x, w)


def test_head_to_head_is_against_the_backend_that_would_run_and_old_mixes_are_timed_again(monkeypatch, tmp_path):
    """The mix is held against what runs without it (here the stock call: the C++ kernel measured under 10 % ahead
    of it); a cached mix without a won head to head (an older cache, a hand-edited one) is timed again; a call where
    only mixes ran as whole calls falls back to the stock call."""
    monkeypatch.setattr(dispatch, "PER_OP_MIN_MACS", 0)
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["native", "cpp"], {}))  # timings faked: no compiler
    op_ms = [{"native": 1.0, "cpp": 3.0}, {"cpp": 1.0, "native": 3.0}, {"cpp": 1.0, "native": 3.0}]
    monkeypatch.setattr(dispatch, "_time_op", lambda op, name, *a: op_ms[op][name] / 1e3)
    whole = {"native": 1.0, "cpp": 0.95}
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: whole.get(name, 0.5) / 1e3)
    duels = []
    monkeypatch.setattr(dispatch, "_head_to_head", lambda a, b, *rest: duels.append((a, b)) or 0.5)
    x, w = torch.randn(1, 8, 10, 10, requires_grad=True), torch.randn(8, 1, 5, 5, requires_grad=True)
    mix = "native/cpp/cpp"
    assert dispatch.decide(x, w, None)["backend"] == mix and duels == [(mix, "native")]
    f = tmp_path / "fc" / "autotune.json"
    entries = json.loads(f.read_text())
    (key,) = entries
    for head in (None, {"mix": mix, "against": "native", "ratio": 0.95}):  # none recorded / one it did not win
        entries[key] = {"backend": mix, "why": "autotuned", "times_ms": {mix: 0.5, "native": 1.0},
                        **({"head_to_head": head} if head else {})}
        f.write_text(json.dumps(entries))
        dispatch.clear_cache(memory_only=True)
        duels.clear()
        d = dispatch.decide(x, w, None)
        assert not d["cached"] and duels == [(mix, "native")]
    dispatch.clear_cache(memory_only=True)
    f.unlink()

    def singles_fail(name, *a, **k):
        if "/" not in name:
            raise RuntimeError("no kernel")
        return 0.5e-3

    monkeypatch.setattr(dispatch, "_time_backend", singles_fail)
    d = dispatch.decide(x, w, None)
    assert d["backend"] == "native" and "no single backend ran" in d["why"]


def test_per_op_timing_keeps_a_backend_through_one_slow_round(monkeypatch):
    """A backend is left out of later per-op rounds only when it was far behind in every counted round so far: one
    burst of load does not take it out of the running (its median decides)."""
    monkeypatch.setattr(dispatch, "PER_OP_MIN_MACS", 0)
    calls = {}

    def fake(op, name, *a):
        n = calls[(op, name)] = calls.get((op, name), 0) + 1
        if op == 2 and name == "channels_last":
            return (20.0 if n == 2 else 1.0) / 1e3  # the first counted round hit a burst
        return {"native": 1.0, "channels_last": 5.0}[name] / 1e3 if op == 0 else (
            {"native": 1.0, "channels_last": 9.0}[name] / 1e3 if op == 1 else 3.0e-3)

    monkeypatch.setattr(dispatch, "_time_op", fake)
    x, w = torch.randn(1, 8, 10, 10), torch.randn(8, 1, 5, 5)
    names, ms = dispatch._per_op_candidates(["native", "channels_last"], {}, x, w, None, True, True)
    assert calls[(2, "channels_last")] == 1 + dispatch.PER_OP_ROUNDS and ms["weight gradient"]["channels_last"] == 1.0
    assert calls[(1, "channels_last")] == 3  # 9x behind in both counted rounds: not repeated in the third
    assert names == ["native/native/channels_last"]


def test_head_to_head_alternates_and_takes_the_median_ratio(monkeypatch):
    calls = []
    times = iter([9.0, 9.0] + [1.0, 2.0, 2.0, 1.0] * 10)  # warm-ups, then a / b in alternating order: a at half b

    def fake(name, *a, repeat=True, **k):
        assert repeat is False
        calls.append(name)
        return next(times)

    monkeypatch.setattr(dispatch, "_time_backend", fake)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    assert dispatch._head_to_head("a", "b", x, w, None, True, True) == 0.5
    assert calls[:6] == ["a", "b", "a", "b", "b", "a"] and len(calls) == 2 + 2 * dispatch.HEAD_TO_HEAD_ROUNDS


def test_per_op_autotune_only_where_two_operations_are_needed(monkeypatch):
    """Forward-only calls (no gradient), calls under PER_OP_MIN_MACS and calls where one backend is fastest at every
    operation time no mix."""
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["native", "channels_last"], {}))
    monkeypatch.setattr(dispatch, "_time_backend", lambda name, *a, **k: {"native": 1.0}.get(name, 2.0) / 1e3)
    alone = []
    monkeypatch.setattr(dispatch, "_time_op", lambda op, name, *a: alone.append(op) or (1.0 if name == "native"
                                                                                        else 9.0) / 1e3)
    x, w = torch.randn(1, 8, 10, 10), torch.randn(8, 1, 5, 5)
    with torch.no_grad():
        d = dispatch.decide(x, w, None)
    assert alone == [] and "per_op_ms" not in d
    d = dispatch.decide(x.clone().requires_grad_(), w.clone().requires_grad_(), None)  # 2e4 multiply-adds
    assert alone == [] and "per_op_ms" not in d
    dispatch.clear_cache(memory_only=True)
    monkeypatch.setattr(dispatch, "PER_OP_MIN_MACS", 2e4)
    d = dispatch.decide(x.requires_grad_(), w, None)  # input gradient only: forward and input gradient timed
    assert set(alone) == {0, 1} and set(d["times_ms"]) == {"native", "channels_last"} and d["backend"] == "native"


@pytest.mark.parametrize("layout,k,expect", [("nchw", 3, "cpp"), ("nchw", 7, "cpp"), ("channels_last", 3, "native"),
                                             ("channels_last", 5, "native/native/cpp"),
                                             ("channels_last", 7, "native/native/cpp"), ("channels_last", 9, "cpp")])
@pytest.mark.parametrize("autotune", [True, False])
def test_calls_with_the_weight_gradient_not_timed_follow_the_cpu_rule(layout, k, expect, autotune, monkeypatch):
    """Large calls (and autotune off) that need the weight gradient: the C++ kernel on NCHW and from 9x9; on
    channels_last the stock call at 3x3 and oneDNN's forward and input gradient beside the C++ weight gradient from
    5x5 (the rule before gave the stock call, 1.8-13x slower on NCHW, to every large call below 9x9)."""
    monkeypatch.setattr(ck, "cpp_multithreaded", lambda: True)
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["native", "channels_last", "cpp"], {}))
    monkeypatch.setattr(dispatch, "_time_backend", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(dispatch, "_time_op", lambda *a, **k: pytest.fail("timed"))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    # 16 x 128 x 112^2 x 9 = 2.3e8 multiply-adds: "large" from 3x3 (memory never touched); small without autotune
    x = torch.empty((16, 128, 112, 112) if autotune else (1, 64, 8, 8), memory_format=fmt)
    w = torch.empty(64, 1, k, k, requires_grad=True)
    with fastconv.use(autotune=autotune):
        d = dispatch.decide(x.requires_grad_(), w, None)
    assert d["backend"] == expect, d
    assert ("large call with the weight gradient" in d["why"]) == (autotune and expect != "native")


@pytest.mark.parametrize("layout,k,threads,expect", [
    ("nchw", 3, "multi", "cpp"), ("nchw", 7, "multi", "cpp"), ("nchw", 9, "multi", "cpp"),
    ("channels_last", 5, "multi", "native"), ("channels_last", 9, "multi", "cpp"),
    ("nchw", 5, "single", "native"), ("nchw", 13, "single", "channels_last")])
@pytest.mark.parametrize("input_grad", [False, True])
def test_large_calls_without_the_weight_gradient_follow_the_cost_model(layout, k, threads, expect, input_grad,
                                                                      monkeypatch):
    """Large calls (not timed) of the forward alone or with the input gradient: the C++ kernel on every NCHW input
    (it measured 1.8-15x faster than NCHW F.conv2d at 3x3-7x7, which these calls took before) and from 9x9; the
    stock call below that on channels_last; without a multi-threaded C++ kernel, NCHW F.conv2d up to 9x9."""
    monkeypatch.setattr(ck, "cpp_multithreaded", lambda: threads == "multi")
    monkeypatch.setattr(dispatch, "candidates", lambda *a: (["native", "channels_last", "cpp"], {}))
    monkeypatch.setattr(dispatch, "_time_backend", lambda *a, **kw: pytest.fail("timed"))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(16, 128, 112, 112, memory_format=fmt).requires_grad_(input_grad)  # > 2e8 multiply-adds
    d = dispatch.decide(x, torch.empty(128, 1, k, k), None)
    assert d["backend"] == expect and "large call:" in d["why"], d


def test_bench_cli_writes_table_and_reports_paper_numbers(tmp_path, capsys, one_thread, monkeypatch):
    import fastconv.bench as fb

    real_run = fb.run
    monkeypatch.setattr(fb, "run", lambda **kw: real_run(sgemm_size=256, **kw))  # small SGEMM probe in tests
    from fastconv.bench import PAPER_TABLE1_MS, conv_flops

    assert PAPER_TABLE1_MS[16][0][-1] == 171.4 and PAPER_TABLE1_MS[64][1][0] == 69.6  # Table 1 transcription
    assert conv_flops(64, 384, 16, 31, 24) == 2 * 64 * 384 * 256 * 961 * 24
    out = tmp_path / "bench"
    rc = fb.main(["--kernels", "3,31", "--resolutions", "16", "--batch", "1", "--channels", "4",
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
    # the CPU is named by its model (/proc/cpuinfo), as the roofline does: platform.processor() gave 'x86_64'
    from fastconv.roofline import cpu_description

    cpu = cpu_description()["cpu_model"]
    assert run["device"] == res["meta"]["device"] == cpu and f"{cpu} (cpu, 1 threads)" in text


def test_bench_says_which_cpp_kernel_ran_or_why_none(tmp_path, capsys, one_thread, monkeypatch):
    """The CPU benchmark's results and table name the C++ kernel's variant (a lane width forced by
    $FASTCONV_CPU_LANES changes every "cpp" cell) or why it is unavailable: neither was recorded, and a table measured
    with the 8-lane variant on an AVX-512 CPU, or without a compiler, read as the machine's best."""
    import fastconv.bench as fb

    need_cpp()
    real_run = fb.run
    monkeypatch.setattr(fb, "run", lambda **kw: real_run(sgemm_size=64, **kw))
    argv = ["--kernels", "13", "--resolutions", "8", "--batch", "1", "--channels", "8", "--layers", "1",
            "--repeats", "1", "--warmup", "0", "--mode", "fwd", "--device", "cpu"]
    monkeypatch.setenv("FASTCONV_CPU_LANES", "8")
    assert fb.main([*argv, "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "results.json").read_text())["meta"]
    assert meta["cpp_kernel"] == ck.cpu_variant() and "8-lane" in meta["cpp_kernel"] and "forced" in meta["cpp_kernel"]
    assert f"fastconv's C++ kernel: {meta['cpp_kernel']}" in capsys.readouterr().out
    monkeypatch.setattr(ck, "cpp_library", lambda: None)
    monkeypatch.setattr(ck, "_lib_error", "no C++ compiler found (set CXX)")
    dispatch.clear_cache(memory_only=True)
    assert fb.main([*argv, "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "results.json").read_text())["meta"]
    assert meta["cpp_kernel"] == "unavailable (no C++ compiler found (set CXX))"
    assert "fastconv's C++ kernel: unavailable (no C++ compiler found" in capsys.readouterr().out


def test_bench_in_bfloat16_runs_every_side_in_it_against_the_bf16_gemm(tmp_path, capsys, monkeypatch):
    """``--dtype bfloat16`` (issue 14: Table 1 in fp16 / bf16 on the GPU): inputs and weights of all three sides
    in bf16, the % of peak against the GEMM rate measured in bf16, and the table says the paper's rows are FP32."""
    import fastconv.bench as fb
    from fastconv import roofline

    dtypes = []
    real_probes = roofline.sgemm_probes
    monkeypatch.setattr(roofline, "sgemm_probes", lambda *a: dtypes.append(a[3]) or real_probes(a[0], 256, *a[2:]))
    monkeypatch.setattr(fb, "sgemm_gflops", roofline.sgemm_gflops)
    seen = []
    real_stack = fb._stack
    monkeypatch.setattr(fb, "_stack", lambda impl, x, ws: seen.append((impl, x.dtype, ws[0].dtype))
                        or real_stack(impl, x, ws))
    out = tmp_path / "bench"
    assert fb.main(["--kernels", "3,13", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1",
                    "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "bfloat16", "--out",
                    str(out)]) == 0
    text = capsys.readouterr().out
    assert "bfloat16" in text and "% of bf16 GEMM" in text and "paper's rows are its FP32 times" in text
    assert dtypes == [torch.bfloat16]
    assert {s[0] for s in seen} == {"pytorch_nchw", "pytorch_cl", "fastconv"} and len(seen) == 2 * 2 * 3
    assert all(s[1:] == (torch.bfloat16, torch.bfloat16) for s in seen)
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["dtype"] == "bfloat16" and res["meta"]["gemm_gflops"] > 0 and "sgemm_gflops" not in res["meta"]
    row = res["rows"][1]
    assert row["fwd_fastconv_pct_gemm"] == pytest.approx(100 * row["fwd_fastconv_gflops"] / res["meta"]["gemm_gflops"],
                                                         abs=0.1)
    with pytest.raises(SystemExit) as e:
        fb.main(["--dtype", "float64", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unsupported"):
        fb.run(kernels=(3,), resolutions=(8,), device="cpu", dtype="float64")


def test_bench_table_of_a_results_file_from_before_dtype():
    """results.json written before ``--dtype`` (the 2026-11-28 H200 table) still prints: fp32, "% of SGEMM"."""
    from fastconv.bench import format_table

    old = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h200" /
                      "table1_results.json").read_text())
    assert "dtype" not in old["meta"] and "fwd_fastconv_pct_sgemm" in old["rows"][0]
    text = format_table(old)
    assert "float32" in text and "SGEMM 50763.44 GFLOP/s" in text
    line = next(s for s in text.splitlines() if "fastconv % of SGEMM" in s)
    assert line.split()[-3:] == ["3.3%", "8.8%", "16.4%"], line


def test_bench_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    """A benchmark stopped part way (a time limit on a lent GPU, Ctrl-C) leaves the rows measured so far on disk:
    each (R, K) row is written when it is done, and the table marks the missing cells."""
    import fastconv.bench as fb

    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    calls = []

    def bench_one(impl, mode, b, c, r, k, *rest):
        calls.append((r, k))
        if (r, k) == (16, 13):
            raise KeyboardInterrupt
        return 1e-3 * k

    monkeypatch.setattr(fb, "bench_one", bench_one)
    out = tmp_path / "bench"
    # Ctrl-C: one line and status 130, as 'erf-lab bench' (it was a traceback)
    assert fb.main(["--kernels", "3,13", "--resolutions", "8,16", "--batch", "1", "--channels", "4", "--layers", "1",
                    "--repeats", "1", "--device", "cpu", "--impls", "pytorch_nchw,fastconv", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("fastconv.bench: interrupted"), err
    res = json.loads((out / "results.json").read_text())
    assert [(r["R"], r["K"]) for r in res["rows"]] == [(8, 3), (8, 13), (16, 3)] and res["meta"]["rows_planned"] == 4
    assert res["meta"]["impls"] == ["pytorch_nchw", "fastconv"] and "fwd_pytorch_cl_ms" not in res["rows"][0]
    assert res["rows"][1]["fwd_fastconv_ms"] == 13.0 and res["rows"][1]["fwd_speedup_vs_nchw"] == 1.0
    table = (out / "table.txt").read_text()
    assert "cut short: 3 of 4 rows measured" in table and "PyTorch ch_last" not in table
    line = next(s for s in table.splitlines() if s.startswith("16x16 PyTorch NCHW"))
    assert line.split()[-2:] == ["3.0", "-"], line
    with pytest.raises(ValueError, match="--impls 'cudnn' unsupported"):
        fb.run(kernels=(3,), resolutions=(8,), device="cpu", impls=("cudnn",))


def test_bench_small_rates_keep_their_digits(tmp_path, monkeypatch, capsys):
    """A small stack's GFLOP/s (4.6e-3 here) and % of SGEMM were stored rounded to 2 / 1 decimals, i.e. 0.0, and the
    table showed 0.0 and 0.0%: now three significant digits are kept and the table shows two."""
    import fastconv.bench as fb

    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: 1e-3)
    out = tmp_path / "bench"
    assert fb.main(["--kernels", "3", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1",
                    "--repeats", "1", "--device", "cpu", "--mode", "fwd", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    rate = fb.conv_flops(1, 4, 8, 3, 1) / 1e-3 / 1e9  # 4608 FLOPs in 1 ms
    assert row["fwd_fastconv_gflops"] == pytest.approx(rate, rel=1e-3) and rate == pytest.approx(4.608e-3)
    assert row["fwd_fastconv_pct_gemm"] == pytest.approx(100 * rate / 100.0, rel=1e-3)
    assert row["fwd_fastconv_ms"] == 1.0
    table = capsys.readouterr().out
    assert next(s for s in table.splitlines() if "fastconv GFLOP/s" in s).split()[-1] == "0.0046"
    assert next(s for s in table.splitlines() if "% of SGEMM" in s).split()[-1] == "0.0046%"


def test_bench_a_size_given_twice_is_measured_once(tmp_path, monkeypatch):
    """``--kernels 3,3 --resolutions 8,8`` measured the same cell four times (four identical rows in table.csv)."""
    import fastconv.bench as fb

    calls = []
    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(fb, "bench_one", lambda impl, mode, b, c, r, k, *rest: calls.append((impl, r, k)) or 1e-3)
    out = tmp_path / "bench"
    assert fb.main(["--kernels", "3,5,3", "--resolutions", "8,8", "--batch", "1", "--channels", "4", "--layers", "1",
                    "--repeats", "1", "--device", "cpu", "--mode", "fwd", "--impls", "fastconv", "--out",
                    str(out)]) == 0
    assert calls == [("fastconv", 8, 3), ("fastconv", 8, 5)]
    res = json.loads((out / "results.json").read_text())
    assert [(r["R"], r["K"]) for r in res["rows"]] == [(8, 3), (8, 5)] and res["meta"]["rows_planned"] == 2


def test_bench_progress_advances_by_each_cases_flops(monkeypatch):
    """The bar counted cases, so its ETA after the cheap K=3 cells was far too short (a K=31 cell does 107x their
    work): it advances by each case's nominal FLOPs, names the case number, and a resumed run's kept rows are its
    starting point (``initial``), not work done at once."""
    import fastconv.bench as fb

    bars = []

    class Bar:
        def __init__(self, total=None, initial=0, **kw):
            self.total, self.initial, self.updates, self.postfix = total, initial, [], []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def set_postfix_str(self, text):
            self.postfix.append(text)

        def close(self):
            pass

    monkeypatch.setattr(fb, "tqdm", Bar)
    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: 1e-3)
    kw = dict(kernels=(3, 31), resolutions=(8,), batch=1, channels=4, layers=1, repeats=1, warmup=0, device="cpu",
              impls=("fastconv",))
    first = fb.run(**kw)
    w3, w31 = fb.conv_flops(1, 4, 8, 3, 1), fb.conv_flops(1, 4, 8, 31, 1)
    assert bars[0].updates == [w3, 3 * w3, w31, 3 * w31] and bars[0].total == 4 * (w3 + w31)
    assert bars[0].initial == 0 and bars[0].postfix[0] == "case 1/4: R=8 K=3 fwd fastconv"
    fb.run(**kw, previous={"meta": first["meta"], "rows": first["rows"][:1]})  # K=3 kept
    assert bars[1].initial == 4 * w3 and bars[1].updates == [w31, 3 * w31]
    assert bars[1].postfix == ["case 3/4: R=8 K=31 fwd fastconv", "case 4/4: R=8 K=31 fwdbwd fastconv"]


@pytest.mark.parametrize("cli", ["fastconv.bench", "erf-lab bench"])
def test_bench_records_the_command_line_as_run(cli, tmp_path, monkeypatch):
    """run.json's argv was ``sys.argv[1:]`` (without the program: 'bench --quick', or pytest's arguments when called
    as a function) and table.txt, the file a reader opens, did not say how it was made: now the command as run,
    the other commands' ``erf-lab ...`` form, in both."""
    import sys

    import fastconv.bench as fb
    from erf_lab.cli.main import main as erf_lab_main

    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: 1e-3)
    out = tmp_path / "my bench"
    argv = ["--kernels", "3", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1",
            "--repeats", "1", "--device", "cpu", "--mode", "fwd", "--out", str(out)]
    if cli == "fastconv.bench":
        assert fb.main(argv) == 0
        expected = ["python", "-m", "fastconv.bench", *argv]
    else:
        monkeypatch.setattr(sys, "argv", ["/venv/bin/erf-lab", "bench", *argv])
        assert erf_lab_main(["bench", *argv]) == 0
        expected = ["erf-lab", "bench", *argv]
    assert json.loads((out / "run.json").read_text())["argv"] == expected
    last = (out / "table.txt").read_text().splitlines()[-1]
    assert last == "command: " + " ".join(expected[:-1]) + f" '{out}'", last


@pytest.mark.parametrize("cli", ["fastconv.bench", "erf-lab bench"])
def test_bench_resume_keeps_the_rows_an_interrupted_run_measured(cli, tmp_path, monkeypatch, capsys):
    """``--resume`` after Ctrl-C measures only the missing (R, K) rows (a rerun measured the whole table again and,
    stopped again, replaced the rows on disk with fewer); the kept rows' % of GEMM is taken against the new run's
    GEMM rate; a run with other settings, or a folder without results, is one error line, exit 2."""
    import fastconv.bench as fb
    from erf_lab.cli.main import main as erf_lab_main

    calls, stop_at, peak = [], [(16, 13)], [100.0]
    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: peak[0])

    def bench_one(impl, mode, b, c, r, k, *rest):
        if (r, k) in stop_at:
            raise KeyboardInterrupt
        calls.append((r, k))
        return 1e-3 * k

    monkeypatch.setattr(fb, "bench_one", bench_one)
    out = tmp_path / "bench"
    argv = ["--kernels", "3,13", "--resolutions", "8,16", "--batch", "1", "--channels", "4", "--layers", "1",
            "--repeats", "1", "--device", "cpu", "--mode", "fwd", "--impls", "pytorch_nchw,fastconv",
            "--out", str(out)]
    cli_main = fb.main if cli == "fastconv.bench" else (lambda a: erf_lab_main(["bench", *a]))
    assert cli_main(argv) == 130
    assert "continue with the same command and --resume" in capsys.readouterr().err
    first = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["R"], r["K"]) for r in first] == [(8, 3), (8, 13), (16, 3)]
    calls.clear()
    stop_at.clear()
    peak[0] = 50.0
    assert cli_main([*argv, "--resume"]) == 0
    assert calls == [(16, 13), (16, 13)]  # its two sides only
    res = json.loads((out / "results.json").read_text())
    assert [(r["R"], r["K"]) for r in res["rows"]] == [(8, 3), (8, 13), (16, 3), (16, 13)]
    assert res["meta"]["rows_kept"] == 3 and res["rows"][3]["fwd_fastconv_ms"] == 13.0
    for old, new in zip(first, res["rows"]):
        assert new["fwd_fastconv_ms"] == old["fwd_fastconv_ms"] and new["fwd_fastconv_gflops"] == old[
            "fwd_fastconv_gflops"]
        assert new["fwd_fastconv_pct_gemm"] == pytest.approx(2 * old["fwd_fastconv_pct_gemm"], rel=0.01)  # peak / 2
    assert "resumed: 3 of 4 rows kept" in (out / "table.txt").read_text()
    assert "cut short" not in (out / "table.txt").read_text()
    capsys.readouterr()
    calls.clear()
    assert cli_main([*argv[:7], "8", *argv[8:], "--resume"]) == 2  # --channels 8
    err = capsys.readouterr().err
    assert calls == [] and err.count("\n") == 1 and "measured with channels 4, this run has 8" in err, err
    assert json.loads((out / "results.json").read_text()) == res  # nothing the user had is lost
    assert cli_main([*argv[:1], "3", *argv[2:], "--resume"]) == 2  # --kernels 3 would drop the K=13 rows
    err = capsys.readouterr().err
    assert calls == [] and err.count("\n") == 1 and "also measured (R, K) = (8, 13), (16, 13)" in err, err
    assert json.loads((out / "results.json").read_text()) == res
    assert cli_main([*argv[:-1], str(tmp_path / "new"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no results.json to continue" in err, err
    assert not (tmp_path / "new").exists()  # no empty folder left behind


@pytest.mark.parametrize("cli", ["fastconv.bench", "erf-lab bench"])
def test_bench_run_again_without_resume_keeps_the_earlier_table(cli, tmp_path, monkeypatch, capsys):
    """A benchmark run again into an --out holding a table (without --resume) replaced it without a word: a
    machine's earlier numbers were gone. Its files now move, before the first new row, into
    ``earlier/<when they were written>/`` (copied into a hidden folder renamed into place), said in one line; the
    folder is a benchmark the app lists and loads. A run refused before measuring moves nothing."""
    from datetime import datetime, timezone

    import fastconv.bench as fb
    from app.runs import find_runs
    from erf_lab.cli.main import main as erf_lab_main

    ms, files = [1e-3], ("table.csv", "results.json", "table.txt", "run.json")
    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: ms[0])
    out = tmp_path / "bench"
    argv = ["--kernels", "3", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1",
            "--repeats", "1", "--device", "cpu", "--mode", "fwd", "--impls", "pytorch_nchw", "--out", str(out)]
    cli_main = fb.main if cli == "fastconv.bench" else (lambda a: erf_lab_main(["bench", *a]))
    assert cli_main(argv) == 0
    first = {name: (out / name).read_bytes() for name in files}
    made = datetime.fromisoformat(json.loads(first["run.json"])["created"]).astimezone(timezone.utc)
    capsys.readouterr()
    assert cli_main([*argv[:5], "0", *argv[6:]]) == 2  # --batch 0: refused before measuring, nothing moved
    assert not (out / "earlier").exists() and (out / "results.json").read_bytes() == first["results.json"]
    capsys.readouterr()
    ms[0] = 2e-3
    assert cli_main(argv) == 0
    kept = out / "earlier" / made.strftime("%Y-%m-%d_%H%M%SZ")
    err = [line for line in capsys.readouterr().err.splitlines() if "earlier" in line]
    assert err == [f"the earlier results in {out} were moved to {kept} (--resume continues a run instead)"], err
    assert sorted(p.name for p in kept.iterdir()) == sorted(files)
    assert {name: (kept / name).read_bytes() for name in files} == first  # every file, as it was
    assert [r["fwd_pytorch_nchw_ms"] for r in json.loads((out / "results.json").read_text())["rows"]] == [2.0]
    assert [r["fwd_pytorch_nchw_ms"] for r in json.loads((kept / "results.json").read_text())["rows"]] == [1.0]
    assert cli_main(argv) == 0  # a third run: the second's table kept beside the first's
    assert len(list((out / "earlier").iterdir())) == 2  # no hidden temporary folder left
    listed = {r["name"]: r["kind"] for r in find_runs(out)}
    assert listed["."] == "benchmark" and listed[f"earlier/{kept.name}"] == "benchmark", listed


@pytest.mark.parametrize("cli", ["fastconv.bench", "erf-lab bench"])
def test_bench_a_dtype_this_torch_cannot_run_exits_2(cli, tmp_path, capsys, monkeypatch):
    """An older PyTorch without fp16 kernels on the CPU: one error line, exit 2 (not a traceback)."""
    import fastconv.bench as fb

    def run(**kw):
        raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'\nmore')

    monkeypatch.setattr(fb, "run", run)
    main = fb.main if cli == "fastconv.bench" else pytest.importorskip("erf_lab.cli.main").main
    assert main(["bench"] * (cli != "fastconv.bench") + ["--dtype", "float16", "--device", "cpu", "--out",
                                                          str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--dtype float16 on cpu: this PyTorch cannot run it (\"slow_conv2d_cpu\" not implemented for 'Half')" in err
    assert "Traceback" not in err and err.count("error:") == 1 and err.count("\n") == 1


@pytest.mark.parametrize("cli", ["fastconv.bench", "erf-lab bench"])
def test_bench_cli_bad_kernel_exits_2(cli, tmp_path, capsys):
    if cli == "fastconv.bench":
        from fastconv.bench import main
    else:
        main = pytest.importorskip("erf_lab.cli.main", reason="erf_lab not installed").main
    assert main(["bench"] * (cli != "fastconv.bench") + ["--kernels", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kernel 4 unsupported" in err and "Traceback" not in err and err.count("error:") == 1


@pytest.mark.parametrize("argv,message", [
    (["--quick", "--kernels", "4"], "kernel 4 unsupported: odd sizes only"),
    (["--quick", "--kernels", "3,-3"], "kernel -3 unsupported: sizes from 1 up"),  # (it said "odd sizes only")
    (["--quick", "--batch", "0"], "--batch must be positive, got 0"),
    (["--quick", "--repeats", "0"], "--repeats must be positive, got 0"),
    (["--quick", "--warmup", "-1"], "--warmup must be 0 or more, got -1"),
    (["--quick", "--device", "foo"], "unknown device 'foo'; use cpu, cuda or cuda:N"),
])
def test_bench_bad_options_exit_2_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    import fastconv.bench as fb

    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a: pytest.fail("the benchmark started"))
    assert fb.main([*argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"fastconv.bench: error: {message}" and not (tmp_path / "b").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder no one can write in)")
@pytest.mark.parametrize("cli", ["fastconv.bench", "erf-lab bench"])
def test_bench_unwritable_out_exits_2_before_any_work(cli, tmp_path, capsys, monkeypatch):
    """An --out that cannot be made is one error line before the measurement (it was a FileNotFoundError traceback
    after the whole table had been measured, and the measurement lost)."""
    import fastconv.bench as fb

    main = fb.main if cli == "fastconv.bench" else pytest.importorskip("erf_lab.cli.main").main
    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: pytest.fail("the benchmark started"))
    argv = ["--quick", "--kernels", "3", "--resolutions", "4", "--out", "/proc/fastconv-bench-out"]
    assert main(["bench"] * (cli != "fastconv.bench") + argv) == 2
    err = capsys.readouterr().err
    assert "--out /proc/fastconv-bench-out is not writable" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not Path("/proc/fastconv-bench-out").exists()
    # a folder that can be made is left as it was found until the results are written
    assert fb.check_out_dir(tmp_path / "a" / "b") is None and not (tmp_path / "a").exists()


def test_bench_out_of_memory_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """A size this machine cannot allocate (here 8e17 bytes on the CPU) is one error line, exit 2, as 'erf-lab bench'
    says it (python -m fastconv.bench printed the allocator's traceback); other errors still raise."""
    import fastconv.bench as fb

    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    argv = ["--kernels", "3", "--resolutions", "1000000", "--channels", "100000", "--device", "cpu",
            "--out", str(tmp_path / "b")]
    assert fb.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("fastconv.bench: error: out of memory (800000000.0 GB requested); choose a smaller --batch, "
                       f"--channels, --resolutions or --layers (the rows measured so far are in {tmp_path / 'b'})")
    assert not any("Traceback" in line for line in err)
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a kernel bug")))
    with pytest.raises(RuntimeError, match="a kernel bug"):
        fb.main(argv)


@pytest.mark.parametrize("setting,message", [
    (("backend", "cpp"), "fastconv backend 'cpp' (fastconv.use / configure / $FASTCONV_BACKEND): cpp handles float32 "
                         "CPU tensors only"),
    (("lanes", "12"), "fastconv: $FASTCONV_CPU_LANES='12' is not a CPU lane width; use 8, 16 or auto"),
])
def test_bench_settings_fastconv_cannot_run_exit_2_before_any_work(setting, message, tmp_path, capsys, monkeypatch):
    """A forced backend that cannot run the table's precision, or a bad lane width, is one line before anything is
    measured (it came after the PyTorch sides of the first row, written into the progress bar's line)."""
    import fastconv.bench as fb

    need_cpp()
    if setting[0] == "backend":
        fastconv.configure(backend=setting[1])
    else:
        monkeypatch.setenv(ck.ENV_LANES, setting[1])
    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: pytest.fail("the benchmark started"))
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: pytest.fail("the benchmark started"))
    argv = ["--kernels", "3", "--resolutions", "4", "--channels", "4", "--device", "cpu", "--dtype", "bfloat16",
            "--out", str(tmp_path / "b")]
    assert fb.main(argv) == 2
    assert capsys.readouterr().err == f"fastconv.bench: error: {message}\n"


@pytest.mark.parametrize("argv,expected", [
    (["--quick"], dict(kernels=(3, 13, 31), resolutions=(16, 32), layers=4, repeats=2, batch=1)),
    (["--quick", "--kernels", "5", "--resolutions", "8", "--layers", "1", "--repeats", "1", "--batch", "3"],
     dict(kernels=(5,), resolutions=(8,), layers=1, repeats=1, batch=3)),
    (["--layers", "2"], dict(kernels=(3, 5, 7, 9, 13, 17, 21, 27, 29, 31), resolutions=(16, 32, 64), layers=2,
                             repeats=3, batch=None)),
])
def test_bench_explicit_options_win_over_quick(argv, expected, tmp_path, monkeypatch):
    import argparse

    import fastconv.bench as fb

    seen = {}
    monkeypatch.setattr(fb, "run", lambda **kw: seen.update(kw) or {})
    monkeypatch.setattr(fb, "write_results", lambda result, out, argv=None: [])
    p = argparse.ArgumentParser()
    fb.add_arguments(p)
    fb.run_from_args(p.parse_args([*argv, "--device", "cpu", "--warmup", "0"]))
    assert {k: seen[k] for k in expected} == expected and seen["warmup"] == 0 and seen["device"] == "cpu"


def test_autotune_skips_a_candidate_that_fails(monkeypatch):
    real = dispatch._time_backend

    def flaky(name, *a, **k):
        if name == "channels_last":
            raise RuntimeError("kernel build failed")
        return real(name, *a, **k)

    monkeypatch.setattr(dispatch, "_time_backend", flaky)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 7, 7)  # K=7 on NCHW: timed
    text = fastconv.explain(x, w)
    assert "not channels_last: failed while autotuning: RuntimeError: kernel build failed" in text
    assert dispatch.decide(x, w, None)["backend"] != "channels_last"
    assert _rel(fastconv.depthwise_conv2d(x, w), _ref(x, w, None)) <= 1e-5


def test_cudnn_weight_grad_helper_matches_autograd():
    """The CUDA Triton backend takes dL/dw from ``_cudnn_weight_grad_nhwc``; its math is device independent."""
    from fastconv.backends import _cudnn_weight_grad_nhwc, _nhwc_on_gpu

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
    need_cpp()
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
    assert d["backend"] == "channels_last" and d["times_ms"]["channels_last"] < 150, d  # the 300 ms build: not counted


def test_convert_and_revert_model_share_parameters():
    model = nn.Sequential(nn.Conv2d(6, 6, 9, padding=4, groups=6), nn.Conv2d(6, 6, 7, padding=3, groups=6, bias=False),
                          nn.Conv2d(6, 6, 5, padding=2, groups=6),  # below min_kernel
                          nn.Conv2d(6, 6, 9, padding=4, groups=3),  # not depthwise
                          nn.Conv2d(6, 6, 9, padding=4, groups=6, stride=2),
                          nn.Conv2d(6, 6, 9, padding=8, groups=6, dilation=2),
                          nn.Conv2d(6, 6, 9, padding=4, groups=6, padding_mode="reflect"),
                          nn.Conv2d(6, 6, (9, 7), padding="same", groups=6))
    model[1].eval()
    x = torch.randn(2, 6, 20, 20)
    with torch.no_grad():
        ref = model(x)
    params = [p for p in model.parameters()]
    keys = list(model.state_dict())
    assert fastconv.convert_model(model) == 3
    assert [type(m).__name__ for m in model] == ["DepthwiseConv2d"] * 2 + ["Conv2d"] * 5 + ["DepthwiseConv2d"]
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    assert model[0].training and not model[1].training and model[0].backend is None and model[1].bias is None
    with torch.no_grad():
        assert _rel(model(x), ref) <= 1e-5
    assert fastconv.convert_model(model, min_kernel=5) == 1 and type(model[2]).__name__ == "DepthwiseConv2d"
    assert fastconv.revert_model(model) == 4
    assert all(type(m) is nn.Conv2d for m in model) and all(a is b for a, b in zip(model.parameters(), params))
    assert not model[1].training and model[7].padding == (4, 3)
    with torch.no_grad():
        assert torch.equal(model(x), ref)



def test_convert_model_leaves_convs_with_hooks_or_computed_weights():
    """weight_norm / spectral_norm compute ``weight`` in a hook (converting crashed: TypeError on the assignment),
    and a conv's own hooks would be lost: such convs stay nn.Conv2d, computing what they computed."""
    from torch.nn.utils import spectral_norm, weight_norm

    def conv():
        return nn.Conv2d(4, 4, 7, padding=3, groups=4)

    hooked, calls = conv(), []
    hooked.register_forward_hook(lambda *a: calls.append(1))
    model = nn.Sequential(weight_norm(conv()), spectral_norm(conv()), hooked, conv()).eval()
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        ref = model(x)
    assert fastconv.convert_model(model) == 1
    assert [type(m).__name__ for m in model] == ["Conv2d"] * 3 + ["DepthwiseConv2d"]
    calls.clear()
    with torch.no_grad():
        assert _rel(model(x), ref) <= 1e-5
    assert calls == [1]
    model[3].register_forward_pre_hook(lambda *a: None)
    assert fastconv.revert_model(model) == 0


def test_fastconv_works_without_erf_lab(tmp_path):
    """fastconv is a library of its own: with every import of erf_lab failing, the op, its gradients, explain,
    the settings and the benchmark all work."""
    code = textwrap.dedent("""
        import sys
        sys.modules["erf_lab"] = None  # any import of erf_lab (or a submodule) now raises ImportError
        import torch, torch.nn.functional as F
        import fastconv
        for name in ("backends", "bench", "config", "cpu_kernels", "dispatch", "functional", "module",
                     "triton_backend"):
            __import__("fastconv." + name)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 6, 11, 10, generator=g, requires_grad=True)
        w = torch.randn(6, 1, 9, 7, generator=g, requires_grad=True)
        b = torch.randn(6, generator=g, requires_grad=True)
        y = fastconv.depthwise_conv2d(x, w, b)
        ref = F.conv2d(x, w, b, padding=(4, 3), groups=6)
        gy = torch.randn(y.shape, generator=g)
        got = (y,) + torch.autograd.grad(y, (x, w, b), gy)
        exp = (ref,) + torch.autograd.grad(ref, (x, w, b), gy)
        print(max(float((a - e).abs().max() / e.abs().max()) for a, e in zip(got, exp)))
        print(fastconv.explain(x, w, b).replace(chr(10), " | "))
        r = fastconv.bench.run(kernels=(3,), resolutions=(8,), batch=1, channels=2, layers=1, repeats=1, warmup=0,
                               modes=("fwd",), show_progress=False, sgemm_size=32)
        print(r["rows"][0]["fwd_fastconv_backend"], fastconv.settings().cache_dir)
        print(sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "erf_lab" and v is not None))
    """)
    env = {**os.environ, "FASTCONV_CACHE": str(USER_CACHE), "PYTHONPATH": str(REPO_ROOT)}  # the C++ build is there
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err, explained, bench, erf_modules = proc.stdout.splitlines()
    assert float(err) <= 1e-5
    assert "kernel 9x7, grads: input=True weight=True" in explained and "-> backend" in explained
    backend, cache = bench.split()
    assert backend in CPU_BACKENDS and cache == str(USER_CACHE) and erf_modules == "[]"


@pytest.mark.parametrize("backend", ["channels_last", "auto"])
def test_bfloat16_weight_gradient_on_cpu_is_rounded_once(backend, one_thread):
    """The "channels_last" weight gradient is one forward conv per image then a sum over the batch; in bfloat16
    each image's result was rounded before the sum, so small entries lost up to 11-15 % (relative to each entry,
    floor 1 % of the largest). It runs in float32 now and is rounded once, as PyTorch's convolution_backward: within
    a bfloat16 unit (2^-8) of the float64 gradient of the same bfloat16 inputs."""
    g = torch.Generator().manual_seed(0)
    x, w, gy = (torch.randn(8, 4, 14, 14, generator=g), torch.randn(4, 1, 13, 13, generator=g) / 13,
                torch.randn(8, 4, 14, 14, generator=g))
    xb, wb, gb = x.bfloat16(), w.bfloat16().requires_grad_(), gy.bfloat16()
    (gw,) = torch.autograd.grad(fastconv.depthwise_conv2d(xb, wb, backend=backend), wb, gb)
    wr = wb.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.conv2d(xb.double(), wr, padding=6, groups=4), wr, gb.double())
    assert gw.dtype == torch.bfloat16
    err = (gw.double() - ref).abs() / ref.abs().clamp_min(0.01 * ref.abs().max())
    assert err.max() <= 2 ** -8


def test_bench_table_says_when_its_rates_mostly_count_zero_padding():
    """Table 1's GFLOP/s and % of GEMM take the nominal 2 B C R^2 K^2 FLOPs; at R = 3, K = 31 only
    (3 * 3 / (3 * 31))^2 = 0.94 % of those products meet the map, so a 72 % of GEMM there measured no arithmetic
    speed, and the table said nothing. It says so now, and only where most products are padding."""
    from fastconv.bench import padding_note

    note = padding_note([{"R": 32, "K": 31}, {"R": 3, "K": 31}, {"R": 16, "K": 13}])
    assert "at R=3, K=31 only 0.9 % of them meet the map" in note
    assert padding_note([{"R": 32, "K": 31}, {"R": 56, "K": 13}]) == ""  # 62 % and 95 % inside: rates stand


def test_bench_quiet_turns_the_progress_bar_off(tmp_path, monkeypatch, capsys):
    """``--quiet``, as in erf-lab's other long commands: the benchmark's bar had no off switch, and filled a batch
    job's log; the rows are the same either way."""
    import fastconv.bench as fb

    monkeypatch.setattr(fb, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(fb, "bench_one", lambda *a, **k: 1e-3)
    argv = ["--kernels", "3", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1", "--repeats",
            "1", "--device", "cpu", "--mode", "fwd"]
    assert fb.main([*argv, "--out", str(tmp_path / "bars")]) == 0
    assert "fastconv bench" in capsys.readouterr().err
    assert fb.main([*argv, "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    assert "fastconv bench" not in capsys.readouterr().err
    rows = [json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("bars", "quiet")]
    assert rows[0] == rows[1] and len(rows[0]) == 1
