"""CPU kernels: the "channels_last" (oneDNN) path, the "cpp" path (fastconv/csrc/dwconv.cpp) and the "fft" path.

The C++ kernel is plain C ABI, built once with the system C++ compiler (a few seconds, cached under the fastconv
cache directory keyed by source hash, flags, compiler and CPU; where it cannot be written, in a private folder of the
process, with one warning) and called through ``ctypes`` (which releases the
GIL). Per (image, L-channel block) plane it packs a cache-resident channel-blocked copy and computes forward, input
gradient and weight gradient with one register-tiled correlation (see the source); the forward and input gradient
of kernels up to 13 (21 on AVX-512) on rows at least one tile wide run in direct tiles of output pixels instead:
straight on channels_last tensors of whole channel blocks, or from 7x7 on a compact copy of each block's rows (any
layout; channels_last only in the 16 lanes lowered to 256-bit vectors), from 9x9 (13x13 with two 512-bit FMA units
per core) on maps large enough in Winograd F(3, 3) rows (``cpp_conv_path``). L, the lane width, is chosen at run
time (``cpu_lanes``): 16 (the AVX-512 variant) on a CPU that reports avx512f, else 8; ``$FASTCONV_CPU_LANES`` = 8
or 16 forces one (16 on a CPU without AVX-512 runs the same 16-lane code lowered to pairs of 256-bit vectors: how
the tests check it on an AVX2 machine). Built with OpenMP, its loops run on PyTorch's own OpenMP pool: measured on
the 2-core dev box, running them on separate Python threads instead lost a third of the speed to PyTorch's spinning
OpenMP workers (R=32, K=31: 45 vs 71 GFLOP/s). Without OpenMP the kernel runs on one thread
(the cost model then prefers oneDNN, see ``cpp_multithreaded``); without a compiler ``cpp_available()`` is False
and dispatch uses the pure-PyTorch paths (the first use says so, once).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fastconv.config import _OFF, ENV_LANES, ENV_MARCH, settings, user_stacklevel
from fastconv.config import requested_lanes as _requested_lanes
from fastconv.jsonstore import MKSTEMP_RANDOM, locked, plain_mode, remove_stale_temporaries

_SRC = Path(__file__).with_name("csrc") / "dwconv.cpp"
_lib = None
_lib_error: str | None = None
#: the -march the loaded library was built for (None: not loaded, or built for the compiler's baseline)
_built_target: str | None = None
_lock = threading.Lock()


#: the /proc/cpuinfo lines that say which instructions ``-march=native`` may use: x86's model and flags; an Arm
#: CPU's (Linux arm64 has neither) implementer, architecture, variant, part and features
_CPUINFO_KEYS = ("model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")


def _cpu_id() -> str:
    """What the kernel built for this CPU (``-march=native``) depends on: part of the build's cache key, so a shared
    cache folder (an NFS home) never hands a library built on one CPU to another that may lack its instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    found = [next((ln for ln in lines if ln.startswith(k)), "") for k in _CPUINFO_KEYS]
    if any(found):
        return "".join(found)  # (an x86 CPU: model and flags alone, as before)
    try:  # macOS: the CPU's name and features
        proc = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                               "machdep.cpu.leaf7_features"], capture_output=True, text=True, timeout=10)
        described = proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return described + platform.processor() + platform.machine()


def _compiler() -> str | None:
    """``$CXX`` (a command line, as make reads it: "ccache g++", "g++ -m64"), else the first of c++, g++, clang++
    on the PATH; None when there is none."""
    return os.environ.get("CXX", "").strip() or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


#: the kernel's compiler flags beside the target (-march) and the library's (-shared -fPIC) and OpenMP's: -O3, and
#: -ffp-contract=fast, with which the vector code's a * b + c compiles to one FMA instruction
KERNEL_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast", "-Wno-psabi")
_LIB_FLAGS = ["-shared", "-fPIC", *KERNEL_FLAGS]


def build_target() -> str:
    """The compiler's -march the kernel is built for: ``$FASTCONV_CPU_MARCH``, else "native" (this CPU)."""
    return os.environ.get(ENV_MARCH, "").strip() or "native"


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    last_error = ""
    # without OpenMP: one thread; without -march=native (which some compilers refuse: older Apple clang on arm64,
    # "the clang compiler does not support '-march=native'"): the compiler's baseline target, where the AVX-512
    # variant still runs on a CPU that has it (built for its own target, chosen at run time); a target the user
    # named ($FASTCONV_CPU_MARCH) is kept, or the build fails and says why
    march = build_target()
    target = [f"-march={march}"]
    tries = [[*target, *_LIB_FLAGS, "-fopenmp"], [*target, *_LIB_FLAGS]]
    if march == "native":
        tries += [[*_LIB_FLAGS, "-fopenmp"], _LIB_FLAGS]
    global _built_target
    for flags in tries:
        try:
            lib = _build_with(cxx, flags)
            _built_target = march if flags[0] == target[0] else None
            return lib
        except (RuntimeError, OSError) as e:  # OSError: built, but does not load (an OpenMP library missing)
            last_error = str(e)
    raise RuntimeError(last_error)


#: the names of ``_compiled``'s temporary files (``.<source>_<random>.so``), of any source: a finished library has no
#: leading dot, a lock file ends in ``.lock``
_BUILD_TEMPORARY = r"\..+_" + MKSTEMP_RANDOM + r"\.so"


def compile_shared_library(src: Path, flags: list[str], cxx: str | None = None, rebuild: bool = False) -> Path:
    """``src`` compiled to a shared library with ``flags``, cached under the fastconv cache directory by a hash of
    the source, flags, compiler and CPU (written atomically: concurrent builders never load a half-written file; one
    process builds, under a lock, while the others wait for its file). ``cxx``: a compiler command line (default
    ``_compiler()``); ``rebuild``: compile again over a cached file (``load_shared_library`` does where the cached
    one does not load). Where the cache cannot be written (a read-only home), built in a private folder of this
    process (``_private_build_folder``, one warning)."""
    return _compiled(src, flags, cxx, rebuild)[0]


def _compiled(src: Path, flags: list[str], cxx: str | None, rebuild: bool) -> tuple[Path, bool]:
    """``compile_shared_library``'s work: the library's path, and whether it was compiled in this call."""
    cxx = cxx or _compiler()
    out = _library_path(src, flags, cxx)
    if rebuild or not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out.parent, _BUILD_TEMPORARY)  # builds killed mid-compile (~0.5 MB each)
            fd, tmp = tempfile.mkstemp(prefix=f".{src.stem}_", suffix=".so", dir=out.parent)
        except OSError as e:
            out = _private_build_folder(out.parent, e) / out.name
            if out.exists() and not rebuild:
                return out, False
            fd, tmp = tempfile.mkstemp(prefix=f".{src.stem}_", suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            # one build at a time (the lock file beside it): the ranks of a torchrun job that start together each
            # compiled the kernel (~15 s of CPU each) and all but the last replaced another's identical file
            with locked(out):
                if not rebuild and out.exists():  # built by another process while this one waited
                    return out, False
                lang = ["-x", "c++"] if src.suffix == ".cpp" else ["-x", "c"]
                try:
                    proc = subprocess.run([*shlex.split(cxx), *flags, "-o", tmp, *lang, str(src)],
                                          capture_output=True, text=True)
                except OSError as e:  # not there, not executable
                    raise RuntimeError(f"cannot run the C++ compiler {cxx!r} ({e.strerror or e}); set CXX") from None
                if proc.returncode != 0:
                    raise RuntimeError(_compile_error(src, cxx, proc))
                plain_mode(tmp, executable=True)  # readable by every user of a shared cache folder, as cc's output
                os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):  # replaced, or (after an hour's wait) removed as stale
                os.unlink(tmp)
        return out, True
    return out, False


def _compile_error(src: Path, cxx: str, proc: subprocess.CompletedProcess) -> str:
    """What a failed compile said, its first error line first (the line that the unavailable kernel's one warning
    quotes: it quoted the first line of the output's last 500 characters, which began mid-line, "_t KW, int64_t
    nthreads, ..."), then the end of its output; the exit status where it printed nothing (it read "failed: ")."""
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    if not lines:
        return f"compiling {src.name} failed: {cxx!r} exited with status {proc.returncode} and printed nothing"
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0])
    return f"compiling {src.name} failed: {first[:300]}\n{proc.stderr.strip()[-500:]}"


_private_builds: list[Path] = []


def _private_build_folder(cache: Path, error: OSError) -> Path:
    """A folder of this process (made once, removed at exit) for the builds that the cache folder ``cache`` cannot
    take (``error``): the C++ kernel then still runs, built again in each process, and the first such build says so
    once. Before, it was unavailable without a word and every call ran PyTorch's kernels."""
    if not _private_builds:
        folder = Path(tempfile.mkdtemp(prefix="fastconv-build-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _private_builds.append(folder)
        warnings.warn(f"fastconv: cannot write its build cache {cache} ({error.strerror or error}); the C++ kernel "
                      f"is built in {folder} for this process only, again in each process: set $FASTCONV_CACHE to a "
                      "writable folder", RuntimeWarning, stacklevel=user_stacklevel())
    return _private_builds[0]


def _library_path(src: Path, flags: list[str], cxx: str | None) -> Path:
    """Where ``compile_shared_library`` caches ``src`` built by ``cxx`` with ``flags``."""
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    key = hashlib.sha256(src.read_bytes() + " ".join([cxx, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    return settings().cache_dir / "build" / f"{src.stem}_{key}.so"


def load_shared_library(src: Path, flags: list[str], cxx: str | None = None) -> ctypes.CDLL:
    """``compile_shared_library(src, flags, cxx)`` loaded; a cached file that does not load (truncated or damaged
    on disk, copied from another machine) is compiled again, once, and replaced atomically."""
    out, built = _compiled(src, flags, cxx, rebuild=False)
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        if built or not _damaged(out, e):  # compiled just now, or a library it needs is missing: no rebuild helps
            raise
    return ctypes.CDLL(str(_compiled(src, flags, cxx, rebuild=True)[0]))


def _damaged(path: Path, error: OSError) -> bool:
    """Whether the loader's ``error`` is about the file ``path`` itself (too short, no valid header: glibc's
    "<path>: file too short", macOS's "dlopen(<path>, ...): ... not a mach-o file"), not about a library it needs
    ("libgomp.so.1: cannot open shared object file", "Library not loaded", "... (required by <path>)") or a symbol:
    those a rebuild does not mend, and rebuilding in every process start cost a full build each time."""
    text = str(error)
    about_it = text.startswith(f"{path}: ") or text.startswith(f"dlopen({path},")
    return about_it and not any(s in text for s in ("undefined symbol", "Library not loaded", "Symbol not found"))


def _build_with(cxx: str, flags: list[str]) -> ctypes.CDLL:
    lib = load_shared_library(_SRC, flags, cxx)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dw_wgrad_fused.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, i64, p] + [i64] * 8
    lib.dw_wgrad_fused.restype = None
    lib.dw_conv_fused.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, p, p] + [i64] * 12
    lib.dw_conv_fused.restype = None
    for name in ("dw_has_openmp", "dw_has_avx512_build", "dw_cpu_avx512f"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    lib.dw_tuning.argtypes = []
    lib.dw_tuning.restype = ctypes.c_int
    lib.dw_set_tuning.argtypes = [ctypes.c_int]
    lib.dw_set_tuning.restype = None
    lib.dw_variant.argtypes = [i64]
    lib.dw_variant.restype = ctypes.c_int
    lib.dw_conv_path.argtypes = [i64] * 8
    lib.dw_conv_path.restype = ctypes.c_int
    lib.dw_wgrad_wino.argtypes = [i64] * 5
    lib.dw_wgrad_wino.restype = ctypes.c_int
    tensor, kernel = [p] + [i64] * 4, [p] + [i64] * 3  # pointer and (N, C, H, W) / (C, KH, KW) strides
    lib.dw_backward_fused.argtypes = tensor * 2 + kernel + tensor + [p] + [i64] * 8
    lib.dw_backward_fused.restype = ctypes.c_int
    lib.dw_backward_plan.argtypes = [i64] * 11
    lib.dw_backward_plan.restype = ctypes.c_int
    lib.dw_row_bands.argtypes = [i64] * 8
    lib.dw_row_bands.restype = i64
    lib.dw_row_groups.argtypes = [i64] * 9
    lib.dw_row_groups.restype = i64
    lib.dw_wgrad_slices.argtypes = [i64] * 4
    lib.dw_wgrad_slices.restype = i64
    # the passes with their integer arguments in one array (``_call_arguments``): pointers, then the array's address
    lib.dw_conv_fused_p.argtypes = [p] * 5
    lib.dw_conv_fused_p.restype = None
    lib.dw_wgrad_fused_p.argtypes = [p] * 4
    lib.dw_wgrad_fused_p.restype = None
    lib.dw_backward_fused_p.argtypes = [p] * 6
    lib.dw_backward_fused_p.restype = ctypes.c_int
    lib.has_openmp = bool(lib.dw_has_openmp())
    return lib


# ------------------------------------------------------------------------------------------------- lane width
_VARIANTS = {8: "8-lane (256-bit vectors)", 16: "16-lane AVX-512", 17: "16-lane lowered to 2x256-bit (no AVX-512)"}


def cpu_lanes(lanes=None) -> int:
    """fp32 lanes per vector the C++ kernel runs with: ``lanes`` (8 or 16) or ``$FASTCONV_CPU_LANES`` when given,
    else 16 where the CPU reports avx512f (and the AVX-512 variant was built), else 8."""
    req = _requested_lanes(lanes)
    if req:
        return req
    lib = cpp_library()
    return 16 if lib is not None and lib.dw_variant(0) == 16 else 8


#: the kernel's tunings, by the kind of core they were measured on (``dwconv.cpp``: the AVX-512 variant's
#: WINOGRAD_RULES, where the direct tiles and the weight gradient run in Winograd rows; in every variant straight_taps,
#: up to which kernels run the straight channels_last tiles)
TUNINGS = {0: "two 512-bit FMA units per core (tuned on an Intel Xeon)",
           1: "512-bit FMAs in two 256-bit halves (tuned on an AMD EPYC of Zen 4)"}


def cpu_tuning() -> int:
    """The kernel's tuning (a ``TUNINGS`` key): 1 on cores that run a 512-bit FMA as two 256-bit halves (AMD family
    19h with AVX-512: Zen 4), where the Winograd rows pay from smaller kernels and maps and a 7x7 kernel on
    channels_last runs the straight tiles (in every variant), else 0."""
    lib = cpp_library()
    return int(lib.dw_tuning()) if lib is not None else 0


def set_tuning(tuning: int | None) -> None:
    """Run the kernel with tuning ``tuning`` (a ``TUNINGS`` key) in this process, None: the CPU's own again (for tests
    and measurements of both on one CPU; not while a call runs). The memoized call arguments go with it: the
    backward's plan (``cpp_backward``) depends on the tuning's paths."""
    lib = cpp_library()
    if lib is not None:
        lib.dw_set_tuning(-1 if tuning is None else int(tuning))
        _calls.clear()


def cpu_variant(lanes=None) -> str:
    """Which variant of the C++ kernel runs, in words (for ``explain`` and the benchmark header)."""
    lib = cpp_library()
    if lib is None:
        return "unavailable"
    req = _requested_lanes(lanes)
    how = f"forced by {'lanes' if lanes is not None else '$' + ENV_LANES}" if req else (
        "auto: CPU has avx512f" if lib.dw_cpu_avx512f() else "auto: CPU without avx512f")
    variant = lib.dw_variant(req)
    target = "" if _built_target in (None, "native") else f"; built for -march={_built_target} (${ENV_MARCH})"
    return f"{_VARIANTS[variant]}, {how}" + (f"; {TUNINGS[int(lib.dw_tuning())]}" if variant == 16 else "") + target


@functools.lru_cache(maxsize=None)
def _source_id() -> str:
    return hashlib.sha256(_SRC.read_bytes()).hexdigest()[:10]


def kernel_id() -> str:
    """Short hash of the C++ source, and the build target where it is not this CPU's own: part of the autotune cache
    key, so a changed kernel is timed again. The target is the loaded library's ("baseline" where -march=native was
    refused and the compiler's default target built it), else the one it will be built for (``build_target``): a
    process that changes ``$FASTCONV_CPU_MARCH`` after the library is built keys its decisions by the library that
    runs them."""
    target = (_built_target or "baseline") if _lib is not None else build_target()
    return _source_id() if target == "native" else f"{_source_id()}-{target}"


def cpp_library():
    """The loaded kernel library (built on first use), or None with the reason in ``cpp_unavailable_reason()``."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        with _lock:
            if _lib is None and _lib_error is None:
                if os.environ.get("FASTCONV_NO_CPP", "").strip().lower() not in ("", *_OFF):  # "0": not disabled
                    _lib_error = "disabled by FASTCONV_NO_CPP"
                else:
                    try:
                        _lib = _build()
                    except (RuntimeError, OSError) as e:
                        _lib_error = str(e) or type(e).__name__
                        warnings.warn(f"fastconv: its C++ kernel is unavailable ({_lib_error.splitlines()[0][:200]}); "
                                      "depthwise_conv2d runs PyTorch's own kernels (explain() says which). Install a "
                                      "C++ compiler or set CXX; FASTCONV_NO_CPP=1 turns the kernel and this warning "
                                      "off", RuntimeWarning, stacklevel=user_stacklevel())
    return _lib


#: what ``dw_conv_path`` returns -> how the C++ forward / input gradient computes a call
CONV_PATHS = {0: "packed planes", 1: "direct channels_last tiles", 2: "packed planes, map and kernel swapped",
              3: "direct tiles on rows packed per channel block", 4: "packed planes in Winograd F(3, 3) rows",
              5: "direct tiles in Winograd F(3, 3) rows on rows packed per channel block"}
#: the ``CONV_PATHS`` values of the direct tiles (no packed planes, no write-back of whole planes)
DIRECT_CONV_PATHS = (CONV_PATHS[1], CONV_PATHS[3], CONV_PATHS[5])
#: the ``CONV_PATHS`` values of the direct tiles on packed rows (in bands of output rows)
ROW_CONV_PATHS = (CONV_PATHS[3], CONV_PATHS[5])


def cpp_conv_path(x: torch.Tensor, w: torch.Tensor, lanes: int | None = None) -> str:
    """How ``cpp_conv(x, w, ...)`` computes (a ``CONV_PATHS`` value). Kernels of 9 (13 on AVX-512 CPUs with two
    512-bit FMA units per core: ``cpu_tuning``) to 31 in Winograd F(3, 3) rows (1.72x fewer multiply-adds at K = 31:
    ``fastconv.roofline.winograd_rows_flops``), as direct tiles on a compact copy of each channel block's rows, on any
    layout (AVX-512: K = 13 on maps from 36, 15-21 from 17, on Zen 4 K = 9-21 from 16; 23-31 from K - 3 where a row's
    last W mod 16 pixels fit a tile of 8; 8 lanes: K = 9-21 from 16, 23-31 on maps from max(24, K - 3) up to 32;
    where a band of two kernels' height fits the band buffer: dwconv.cpp's wino_direct), else on packed planes (from
    21 on maps from 22 with AVX-512, from 15 on maps from 20 with 8 lanes: corr_plane_wino); else direct tiles of
    output pixels for rows at least one tile wide and kernels up to 13 (21 on AVX-512), from 7x7 on a compact copy of
    each channel block's rows (any layout; channels_last only in the 16 lanes lowered to 256-bit vectors), below that
    straight on channels_last tensors of whole channel blocks, and on the compact copy for other layouts on maps from
    16 wide (not in the lowered lanes); else through packed channel-blocked planes."""
    lib = cpp_library()
    n, c, h, wd = x.shape
    y_stride = torch.empty_like(x, dtype=torch.float32, device="meta").stride()  # cpp_conv's output layout
    return CONV_PATHS[lib.dw_conv_path(x.stride(1), y_stride[1], c, h, wd, *w.shape[-2:], _requested_lanes(lanes))]


def cpp_wgrad_winograd(x: torch.Tensor, w: torch.Tensor, lanes: int | None = None) -> bool:
    """Whether ``cpp_weight_grad(x, g, KH, KW)`` (and the weight gradient of ``cpp_backward``) runs Winograd F(3, 3)
    rows (the map is that correlation's kernel: kernels from 9 on maps from 20 with 8 lanes; with AVX-512 from 13 on
    maps from 20 on cores with two 512-bit FMA units, from 9 on maps from 16 on cores that split 512-bit FMAs
    (``cpu_tuning``); see dwconv.cpp's wino_wgrad)."""
    h, wd = x.shape[-2:]
    return cpp_library().dw_wgrad_wino(h, wd, *w.shape[-2:], _requested_lanes(lanes)) == 1


def cpp_work_split(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None = None, threads: int | None = None,
                   lanes: int | None = None) -> dict[str, int]:
    """How the C++ kernel splits a call over ``threads`` (default: the threads it runs, as ``cpp_conv``; returned as
    ``threads``): ``row_bands``, the bands of output rows per (image, channel block) where the forward / input
    gradient runs the direct tiles on packed rows (``cpp_conv_path`` says so; as tall as fit the band buffer, then at
    least 4 units per thread, then whole rounds of units where up to twice the bands give them); ``row_groups``, the
    channel blocks per unit there (4 or 2 on a channels_last input of whole blocks where the units stay at least 4
    per thread in whole rounds, else 1); ``wgrad_slices``, the
    slices of the images per group of channel blocks in ``cpp_weight_grad(x, g, ...)`` (``g``: the output gradient,
    default laid out like ``x``; split where there are fewer groups than 4; the slices are added in order, so the
    numbers do not depend on the thread count). ``explain()`` prints both."""
    lib = cpp_library()
    n, c, h, wd = x.shape
    ln = _requested_lanes(lanes)
    channels_inner = x.stride(1) == 1 or (g if g is not None else x).stride(1) == 1
    threads = threads or _omp_threads(lib)
    kh, kw = w.shape[-2:]
    return {"threads": threads, "row_bands": int(lib.dw_row_bands(n, c, h, wd, kh, kw, threads, ln)),
            "row_groups": int(lib.dw_row_groups(n, c, h, wd, kh, kw, threads, int(x.stride(1) == 1), ln)),
            "wgrad_slices": int(lib.dw_wgrad_slices(n, c, int(channels_inner), ln))}


def cpp_available() -> bool:
    return cpp_library() is not None


def cpp_unavailable_reason() -> str | None:
    cpp_library()
    return _lib_error


_get_num_threads = torch.get_num_threads


def _threads() -> int:
    return max(1, _get_num_threads())


def _omp_threads(lib) -> int:
    return _threads() if lib.has_openmp else 1


def cpp_multithreaded() -> bool:
    """The C++ kernel is available and uses all of torch's threads (built with OpenMP, or torch runs 1 thread):
    the condition under which the cost model prefers it."""
    lib = cpp_library()
    return lib is not None and (lib.has_openmp or _threads() == 1)


#: per call signature (a pass, the tensors' shapes and strides, threads, lanes): the kernel's integer arguments as
#: one ctypes array (``_call_arguments``), and what else the signature fixes
_calls: dict[tuple, tuple] = {}
_CALLS_MAX = 4096  # signatures kept (a sweep over many shapes starts again from empty past this)


def _call_arguments(key: tuple, values, *extra) -> tuple:
    """``(array, its address, *extra)`` for a call signature ``key``: ``values`` (the integer arguments of one of
    the ``dw_*_p`` entry points, in their order) in a ctypes array kept alive in ``_calls``. Converting the 19-27
    integers of a call took ctypes 3-8 us per call (0.12 us each on a warm cache, more between a network's layers),
    one address takes 0.1 us."""
    if len(_calls) >= _CALLS_MAX:
        _calls.clear()
    array = (ctypes.c_int64 * len(values))(*values)
    _calls[key] = entry = (array, ctypes.addressof(array), *extra)
    return entry


def _lanes(lanes) -> int:
    """``_requested_lanes(lanes)`` without its parsing where neither ``lanes`` nor ``$FASTCONV_CPU_LANES`` is set
    (the usual call; ``os.environ.get`` of a missing name raises and catches a KeyError inside, ~1 us)."""
    if lanes is None and not _lanes_in_environ():
        return 0
    return _requested_lanes(lanes)


try:  # os.environ's own dict (POSIX: bytes names), read without the exception of a missing name
    _lanes_in_environ = functools.partial(os.environ._data.get, os.environ.encodekey(ENV_LANES))
except AttributeError:  # another os.environ
    _lanes_in_environ = functools.partial(os.environ.get, ENV_LANES)


def cpp_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, flip: bool = False,
             lanes: int | None = None) -> torch.Tensor:
    """Depthwise same conv of ``x`` (N,C,H,W any format) with ``w`` (C,1,KH,KW) (flipped in both axes if ``flip``:
    the input gradient) through the C++ kernel in one fused pass (``dw_conv_fused``: per-plane packing, the
    register-tiled correlation and the write-back, or the direct tiles: ``cpp_conv_path``); returns an
    (N,C,H,W) tensor in ``x``'s memory format.
    ``lanes``: 8 or 16 forces a lane width (default ``cpu_lanes()``)."""
    lib = _lib or cpp_library()
    w = w.float()
    if x.is_neg() or w.is_neg():
        x, w = _resolved(x), _resolved(w)
    b = _resolved(bias.float()).contiguous() if bias is not None else None
    y = torch.empty_like(x, dtype=torch.float32)  # x's strides when dense (NCHW, channels_last), else NCHW
    ln = _lanes(lanes)
    threads = _get_num_threads() if lib.has_openmp else 1
    key = ("conv", x.shape, x.stride(), w.shape, w.stride(), flip, threads, ln)
    call = _calls.get(key)
    if call is None:
        n, c, h, wd = x.shape
        kh, kw = w.shape[-2:]
        w_at, *w_strides = _kernel_view(w, flip)
        call = _call_arguments(key, (*x.stride(), *w_strides, *y.stride(), n, c, h, wd, kh, kw, max(1, threads), ln),
                               w_at - w.data_ptr())
    lib.dw_conv_fused_p(x.data_ptr(), w.data_ptr() + call[2], b.data_ptr() if b is not None else None, y.data_ptr(),
                        call[1])
    return y


def _resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its negative bit applied: the kernel reads raw memory, and a lazily negated view (``z.conj().imag``
    of a complex ``z``, ``torch._neg_view``) holds the un-negated values there (F.conv2d applies the bit itself)."""
    return t.resolve_neg() if t.is_neg() else t


def _kernel_view(w: torch.Tensor, flip: bool) -> tuple[int, int, int, int]:
    """Pointer and (C, KH, KW) element strides of a float32 kernel (C, 1, KH, KW) as the C++ kernel reads it; flipped
    in both axes as a negative-stride view (no copy)."""
    kh, kw = w.shape[-2:]
    s_c, _, s_h, s_w = w.stride()
    if not flip:
        return w.data_ptr(), s_c, s_h, s_w
    return w.data_ptr() + ((kh - 1) * s_h + (kw - 1) * s_w) * w.element_size(), s_c, -s_h, -s_w


#: what ``cpp_backward_plan`` returns: how ``cpp_backward`` computes a call (0: it does not; each gradient on its own)
BACKWARD_PLANS = {0: "", 1: "direct tiles on rows packed per channel block, read by both gradients",
                  2: "packed planes, each plane of the output gradient packed once for both gradients"}


def cpp_backward_plan(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None = None, threads: int | None = None,
                      lanes: int | None = None) -> int:
    """How ``cpp_backward(x, g, w)`` computes (a ``BACKWARD_PLANS`` key; ``g`` defaults to a tensor laid out like
    ``x``) on ``threads`` (default: the threads it runs): 1 where the input gradient runs the direct tiles on packed
    rows with one band per image and channel block (and the weight gradient groups no channel blocks), 2 where it runs
    packed planes (plain or in Winograd rows), 0 elsewhere, and wherever the one pass's units (a group of channel
    blocks over a slice of the images, as the weight gradient's) would leave threads idle: fewer than 4 per thread and
    not whole rounds."""
    lib = cpp_library()
    n, c, h, wd = x.shape
    g_stride = (g if g is not None else x).stride(1)
    gx_stride = torch.empty_like(g if g is not None else x, dtype=torch.float32, device="meta").stride(1)
    return int(lib.dw_backward_plan(x.stride(1), g_stride, gx_stride, n, c, h, wd, *w.shape[-2:],
                                    threads or _omp_threads(lib), _requested_lanes(lanes)))


def cpp_backward(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                 lanes: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Input and weight gradient of ``cpp_conv(x, w, ...)`` for the output gradient ``g`` in one pass
    (``dw_backward_fused``; ``cpp_backward_plan`` says where and how): on direct tiles the packed rows of ``g`` serve
    both, on packed planes each plane of ``g`` is packed once for both, so ``g`` is read and packed once. The same
    numbers as ``cpp_conv(g, w, None, flip=True)`` and ``cpp_weight_grad(x, g, KH, KW)``; None (nothing computed)
    where the pass does not apply."""
    lib = _lib or cpp_library()
    ln = _lanes(lanes)
    w = w.float()  # (kept alive: the kernel reads it by pointer)
    if x.is_neg() or g.is_neg() or w.is_neg():
        x, g, w = _resolved(x), _resolved(g), _resolved(w)
    key = ("backward", x.shape, x.stride(), g.stride(), w.shape, w.stride(), _omp_threads(lib), ln)
    call = _calls.get(key)
    if call is None:
        if not cpp_backward_plan(x, w, g, lanes=lanes):  # (asked first: the outputs' allocation cost ~20 us per call)
            call = _call_arguments(key, (), None)
        else:
            n, c, h, wd = x.shape
            kh, kw = w.shape[-2:]
            gx_strides = torch.empty_like(g, dtype=torch.float32, device="meta").stride()  # as cpp_conv(g, ...)
            w_at, *w_strides = _kernel_view(w, True)
            call = _call_arguments(key, (*x.stride(), *g.stride(), *w_strides, *gx_strides, n, c, h, wd, kh, kw,
                                         _omp_threads(lib), ln), w_at - w.data_ptr())
    if call[2] is None:
        return None
    gx = torch.empty_like(g, dtype=torch.float32)
    gw = torch.empty((w.shape[0], 1, *w.shape[-2:]), dtype=torch.float32)
    done = lib.dw_backward_fused_p(x.data_ptr(), g.data_ptr(), w.data_ptr() + call[2], gx.data_ptr(), gw.data_ptr(),
                                   call[1])
    return (gx, gw) if done == 1 else None


def cpp_weight_grad(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int, lanes: int | None = None) -> torch.Tensor:
    """dL/dw (C,1,KH,KW) = correlation of the padded input with the output gradient, summed over the batch, in
    one fused C++ pass (``dw_wgrad_fused``) reading both tensors in any layout (``lanes`` as in ``cpp_conv``)."""
    lib = cpp_library()
    gw = torch.empty((x.shape[1], 1, kh, kw), dtype=torch.float32)
    x, g = _resolved(x), _resolved(g)
    ln = _lanes(lanes)
    key = ("wgrad", x.shape, x.stride(), g.stride(), kh, kw, _omp_threads(lib), ln)
    call = _calls.get(key)
    if call is None:
        n, c, h, wd = x.shape
        call = _call_arguments(key, (*x.stride(), *g.stride(), n, c, h, wd, kh, kw, _omp_threads(lib), ln))
    lib.dw_wgrad_fused_p(x.data_ptr(), g.data_ptr(), gw.data_ptr(), call[1])
    return gw


# ----------------------------------------------------------------------------------------------- oneDNN paths
def float32_for_cpu(*dtypes: torch.dtype):
    """Decorator: ``fn(x, *args)`` on a CPU ``x`` of one of ``dtypes`` runs in float32 (its tensor arguments too)
    and is rounded once to ``x.dtype``, with CPU autocast off inside (it would cast them back)."""
    def wrap(fn):
        @functools.wraps(fn)
        def in_float32(x, *args):
            if x.dtype in dtypes and x.device.type == "cpu":
                args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
                with torch.autocast("cpu", enabled=False):
                    return fn(x.float(), *args).to(x.dtype)
            return fn(x, *args)
        return in_float32
    return wrap


float32_for_cpu_half = float32_for_cpu(torch.float16)
float32_for_cpu_half.__doc__ = """float16 on the CPU runs in float32, rounded once to float16: PyTorch's float16
depthwise convolution on the CPU does not finish for some shapes (F.conv2d, B = 1, C = 2, R = 31, K = 15: no result
in 120 s, float32 well under 1 ms; 2-core Intel Xeon with AVX-512, torch 2.13), and float32 sums are more exact.
Every stock-call path of the backends that take float16 on the CPU ("native", "channels_last") goes through it."""


@float32_for_cpu_half
def onednn_conv_cl(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d on a channels_last input: oneDNN's depthwise kernel accepts large padding there."""
    kh, kw = w.shape[-2:]
    xc = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(xc, w, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


@float32_for_cpu(torch.float16, torch.bfloat16)
def onednn_weight_grad(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Weight gradient as one *forward* depthwise conv: the padded input viewed as (1, N*C, H+KH-1, W+KW-1)
    correlated with the output gradient as an (N*C, 1, H, W) kernel, no padding, then summed over N.
    With zero padding oneDNN's direct depthwise kernel applies (the cliff is the padding > 6 case). float16 on the
    CPU: see :func:`float32_for_cpu_half` (this shape, an H x W kernel and a K x K output, did not finish in
    float16: B = 1, C = 2, R = 20, K = 31, no result in 10 min; float32 3 ms). bfloat16 runs in float32 as well: in
    bfloat16 each image's K x K result was rounded before the sum over N, which lost up to 11-15 % of the small
    entries (relative to each entry, floor 1 % of the largest; float32: 0.4 %, one rounding, as convolution_backward),
    and float32 took 0.6-0.9x the time (2-core Intel Xeon with AMX, B = 4..64, C = 16..384, R = 14..56, K = 7..31)."""
    n, c, h, wd = x.shape
    ph, pw = kh // 2, kw // 2
    xp = F.pad(x.contiguous(), (pw, pw, ph, ph)).reshape(1, n * c, h + 2 * ph, wd + 2 * pw)
    k = g.contiguous().reshape(n * c, 1, h, wd)
    return F.conv2d(xp, k, groups=n * c).reshape(n, c, kh, kw).sum(0).unsqueeze(1)


# -------------------------------------------------------------------------------------------------- FFT path
def fft_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same-padded depthwise cross-correlation by the convolution theorem (differentiable through torch.fft):
    linear correlation via zero padding to (H+KH-1, W+KW-1), cost O(NC P log P) independent of K. A NaN or inf
    in a plane turns the whole output plane NaN (F.conv2d: only the outputs within reach of it)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    fh, fw = h + kh - 1, wd + kw - 1
    xf = torch.fft.rfft2(x, s=(fh, fw))
    wf = torch.fft.rfft2(w.flip(-1, -2).reshape(1, c, kh, kw), s=(fh, fw))
    y = torch.fft.irfft2(xf * wf, s=(fh, fw))[..., kh // 2: kh // 2 + h, kw // 2: kw // 2 + wd]
    if bias is not None:
        y = y + bias.view(1, c, 1, 1)
    return y
