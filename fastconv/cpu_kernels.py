"""CPU kernels: the "channels_last" (oneDNN) path, the "cpp" path (fastconv/csrc/dwconv.cpp) and the "fft" path.

The C++ kernel is plain C ABI, built once with the system C++ compiler (about 2 s, cached under the fastconv
cache directory keyed by source hash, compiler and CPU) and called through ``ctypes``. ``ctypes`` releases the
GIL, so a small thread pool splits output rows (forward) or kernel rows (weight gradient) across cores.
Without a compiler ``cpp_available()`` is False and dispatch uses the pure-PyTorch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

_SRC = Path(__file__).with_name("csrc") / "dwconv.cpp"
_lib = None
_lib_error: str | None = None
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def cache_root() -> Path:
    """``$FASTCONV_CACHE`` or ``erf_lab.paths.cache_dir()/fastconv``."""
    env = os.environ.get("FASTCONV_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        from erf_lab.paths import cache_dir
        return cache_dir() / "fastconv"
    except ImportError:  # fastconv used on its own
        return Path.home() / ".cache" / "fastconv"


def _cpu_id() -> str:
    try:
        txt = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in txt.splitlines() if ln.startswith("model name")), "")
        flags = next((ln for ln in txt.splitlines() if ln.startswith("flags")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17"]
    key = hashlib.sha256(_SRC.read_bytes() + " ".join([cxx, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_root() / "build" / f"dwconv_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dwconv_", suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, "-o", tmp, str(_SRC)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {_SRC.name} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, out)  # atomic: concurrent builders never load a half-written library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dw_fwd.argtypes = [p, p, p, p] + [i64] * 8
    lib.dw_fwd.restype = None
    lib.dw_wgrad.argtypes = [p, p, p] + [i64] * 8
    lib.dw_wgrad.restype = None
    return lib


def cpp_library():
    """The loaded kernel library (built on first use), or None with the reason in ``cpp_unavailable_reason()``."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        with _lock:
            if _lib is None and _lib_error is None:
                if os.environ.get("FASTCONV_NO_CPP"):
                    _lib_error = "disabled by FASTCONV_NO_CPP"
                else:
                    try:
                        _lib = _build()
                    except (RuntimeError, OSError) as e:
                        _lib_error = str(e)
    return _lib


def cpp_available() -> bool:
    return cpp_library() is not None


def cpp_unavailable_reason() -> str | None:
    cpp_library()
    return _lib_error


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _parallel(fn, total: int) -> None:
    """Run ``fn(start, stop)`` over [0, total) split into one chunk per thread (ctypes drops the GIL)."""
    global _pool
    t = min(_threads(), total)
    if t <= 1:
        fn(0, total)
        return
    if _pool is None or _pool._max_workers < t:  # noqa: SLF001
        _pool = ThreadPoolExecutor(max_workers=t, thread_name_prefix="fastconv")
    bounds = [total * k // t for k in range(t + 1)]
    futs = [_pool.submit(fn, bounds[k], bounds[k + 1]) for k in range(1, t)]
    fn(bounds[0], bounds[1])
    for f in futs:
        f.result()


def _nhwc_padded(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """(N, H+KH-1, W+KW-1, C) contiguous zero-padded copy of an NCHW-shaped tensor of any memory format."""
    ph, pw = kh // 2, kw // 2
    xn = x.permute(0, 2, 3, 1)
    return F.pad(xn, (0, 0, pw, pw, ph, ph)).contiguous()


def cpp_conv_nhwc(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise same conv of ``x`` (N,C,H,W any format) with ``w`` (C,1,KH,KW); result is channels_last."""
    lib = cpp_library()
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    xp = _nhwc_padded(x, kh, kw)
    wt = w.reshape(c, kh * kw).t().contiguous()  # (KH*KW, C)
    b = bias.contiguous() if bias is not None else None
    y = torch.empty((n, h, wd, c), dtype=x.dtype)
    args = (xp.data_ptr(), wt.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(), n, h, wd, c, kh, kw)
    _parallel(lambda r0, r1: lib.dw_fwd(*args, r0, r1), n * h)
    return y.permute(0, 3, 1, 2)


def cpp_weight_grad(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """dL/dw (C,1,KH,KW) = correlation of the padded input with the output gradient, summed over the batch."""
    lib = cpp_library()
    n, c, h, wd = x.shape
    xp = _nhwc_padded(x, kh, kw)
    gn = g.permute(0, 2, 3, 1).contiguous()
    gw = torch.empty((kh, kw, c), dtype=x.dtype)
    args = (xp.data_ptr(), gn.data_ptr(), gw.data_ptr(), n, h, wd, c, kh, kw)
    _parallel(lambda b0, b1: lib.dw_wgrad(*args, b0, b1), -(-c // 8))  # channel blocks of 8 (GCB)
    return gw.permute(2, 0, 1).unsqueeze(1).contiguous()


# ----------------------------------------------------------------------------------------------- oneDNN paths
def onednn_conv_cl(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d on a channels_last input: oneDNN's depthwise kernel accepts large padding there."""
    kh, kw = w.shape[-2:]
    xc = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(xc, w, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


def onednn_weight_grad(x: torch.Tensor, g: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Weight gradient as one *forward* depthwise conv: the padded input viewed as (1, N*C, H+KH-1, W+KW-1)
    correlated with the output gradient as an (N*C, 1, H, W) kernel, no padding, then summed over N.
    With zero padding oneDNN's direct depthwise kernel applies (the cliff is the padding > 6 case)."""
    n, c, h, wd = x.shape
    ph, pw = kh // 2, kw // 2
    xp = F.pad(x.contiguous(), (pw, pw, ph, ph)).reshape(1, n * c, h + 2 * ph, wd + 2 * pw)
    k = g.contiguous().reshape(n * c, 1, h, wd)
    return F.conv2d(xp, k, groups=n * c).reshape(n, c, kh, kw).sum(0).unsqueeze(1)


# -------------------------------------------------------------------------------------------------- FFT path
def fft_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same-padded depthwise cross-correlation by the convolution theorem (differentiable through torch.fft):
    linear correlation via zero padding to (H+KH-1, W+KW-1), cost O(NC P log P) independent of K."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    fh, fw = h + kh - 1, wd + kw - 1
    xf = torch.fft.rfft2(x, s=(fh, fw))
    wf = torch.fft.rfft2(w.flip(-1, -2).reshape(1, c, kh, kw), s=(fh, fw))
    y = torch.fft.irfft2(xf * wf, s=(fh, fw))[..., kh // 2: kh // 2 + h, kw // 2: kw // 2 + wd]
    if bias is not None:
        y = y + bias.view(1, c, 1, 1)
    return y
