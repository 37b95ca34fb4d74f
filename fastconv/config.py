"""How fastconv runs, decided in one place: the backend, whether the dispatcher may time candidates, the cache.

Initial values come from ``$FASTCONV_BACKEND`` ("auto", one of ``BACKENDS`` or a per-op name that
``split_backend`` reads), ``$FASTCONV_AUTOTUNE`` ("0", "false", "no" or "off": cost model only, never timing) and
``$FASTCONV_CACHE`` (default ``$XDG_CACHE_HOME/fastconv`` or ``~/.cache/fastconv``; without a home folder
a private temporary one, ``_env_cache_dir``; ``user_cache_home`` is the base erf-lab's cache shares), read on first use.
``configure`` changes the process-wide defaults; ``use`` overrides them inside a ``with`` block (a context variable:
per thread and asyncio task, nestable, restored on exit). No torch import here.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

BACKENDS = ("native", "channels_last", "cpp", "fft", "triton")
#: the backends that compute each of the three operations of a call on its own (forward, input gradient, weight
#: gradient); a per-op backend names one for each, "forward/input_grad/weight_grad" (``split_backend``)
OP_BACKENDS = ("native", "channels_last", "cpp", "triton")
OPS = ("forward", "input gradient", "weight gradient")
ENV_BACKEND, ENV_AUTOTUNE, ENV_CACHE = "FASTCONV_BACKEND", "FASTCONV_AUTOTUNE", "FASTCONV_CACHE"
#: the C++ kernel's fp32 lanes per vector (8 or 16; "auto" or unset: 16 where the CPU has avx512f)
ENV_LANES = "FASTCONV_CPU_LANES"
#: the C++ kernel's build target, the compiler's -march (unset: "native", this CPU): e.g. "x86-64-v3" builds the AVX2
#: code an AVX2-only CPU gets (16 vector registers), to measure or test it on an AVX-512 machine
ENV_MARCH = "FASTCONV_CPU_MARCH"


@dataclasses.dataclass(frozen=True)
class Settings:
    """``backend``: "auto" (the dispatcher decides), one of ``BACKENDS`` or a per-op name
    "forward/input_grad/weight_grad" (forced for every call that does not name its own); ``autotune``: False = cost
    model only; ``cache_dir``: autotune decisions and the C++ build."""
    backend: str
    autotune: bool
    cache_dir: Path


def split_backend(name: str) -> tuple[str, str, str] | None:
    """The (forward, input gradient, weight gradient) backends of a per-op backend name such as
    ``"native/channels_last/cpp"`` (each one of ``OP_BACKENDS``); None for any other string."""
    parts = tuple(name.split("/")) if isinstance(name, str) else ()
    return parts if len(parts) == 3 and all(p in OP_BACKENDS for p in parts) else None


def _backend(value, source: str = "") -> str:
    value = "auto" if value is None else value
    if value != "auto" and value not in BACKENDS and split_backend(value) is None:
        raise ValueError(f"fastconv: unknown backend {value!r}{f' (from {source})' if source else ''}; choose auto, "
                         f"one of {', '.join(BACKENDS)}, or one per operation as forward/input_grad/weight_grad from "
                         f"{', '.join(OP_BACKENDS)}")
    return value


def _cache_dir(value) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"fastconv: cache_dir={value!r} is not a folder path")
    return Path(value).expanduser()


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _autotune(value, source: str = "autotune") -> bool:
    """``value`` as a yes or no: a bool, 0 / 1, or one of "1 true yes on" / "0 false no off" (any case); ValueError
    (one line) for anything else, which ``bool()`` would read as True (``"0"``, ``"false"``)."""
    if isinstance(value, str) and value.strip().lower() in _ON + _OFF:
        return value.strip().lower() in _ON
    if not isinstance(value, str) and type(value) in (bool, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"fastconv: {source}={value!r} is not a yes or no; use True / False (or 1 / 0, on / off)")


def _bootstrap_frame(frame) -> bool:
    """A frame of importlib's bootstrap, which ``warnings.warn`` leaves out when it counts ``stacklevel``."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning that the caller gives points at the user's line: the first frame outside
    fastconv and torch (through a model's ``nn.Module.__call__``, the line that called the model), not at the line of
    fastconv that happened to load the C++ kernel or the settings first."""
    roots = [str(Path(__file__).parent) + os.sep]
    torch = sys.modules.get("torch")
    if getattr(torch, "__file__", None):
        roots.append(str(Path(torch.__file__).parent) + os.sep)
    roots = tuple(roots)
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(roots) or _bootstrap_frame(frame)):
        frame = frame.f_back
        level += not _bootstrap_frame(frame)
    return level


def xdg_cache_home() -> Path | None:
    """``$XDG_CACHE_HOME`` where it is an absolute path, else None: the XDG Base Directory spec has an unset, empty
    or relative value ignored (a relative one moved the cache with the working directory)."""
    value = os.environ.get("XDG_CACHE_HOME", "")
    return Path(value) if value and Path(value).is_absolute() else None


def user_cache_home() -> Path:
    """The base of the user's caches: :func:`xdg_cache_home`, else ``~/.cache``. RuntimeError where the user has no
    home folder to take ``~`` from (callers fall back to a private folder)."""
    return xdg_cache_home() or Path.home() / ".cache"


def _env_cache_dir() -> Path:
    """``$FASTCONV_CACHE``, else ``fastconv`` in :func:`user_cache_home` (``$XDG_CACHE_HOME`` or ``~/.cache``). A
    user without a home folder (``$HOME`` unset and no entry in the password database: a container run under an
    arbitrary user id) made every call fail with "Could not determine home directory"; such a process now caches in a
    private temporary folder of its own, removed at exit, and says so once. ValueError (one line) for a ``~`` path
    there."""
    given = os.environ.get(ENV_CACHE)
    try:
        return Path(given).expanduser() if given else user_cache_home() / "fastconv"
    except RuntimeError:  # no home folder to expand "~" to
        if given:
            raise ValueError(f"fastconv: cache folder {given!r} (from ${ENV_CACHE}) starts with a ~ "
                             "that names no home folder (no such user, or this user has none); give a full path"
                             ) from None
    folder = tempfile.mkdtemp(prefix="fastconv-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    warnings.warn(f"fastconv: this user has no home folder ($HOME unset); its C++ kernel build and autotune decisions "
                  f"are kept in {folder} for this process only: set ${ENV_CACHE} to a folder to keep them",
                  RuntimeWarning, stacklevel=user_stacklevel())
    return Path(folder)


def requested_lanes(lanes=None) -> int:
    """0 (auto), 8 or 16 from ``lanes`` or else ``$FASTCONV_CPU_LANES`` ("auto"/"" = auto); ValueError (one line)
    otherwise. Here, without torch, so that a command can refuse a bad value before any work
    (:func:`fastconv.cpu_kernels.cpu_lanes` reads it at the C++ kernel's first call)."""
    raw = os.environ.get(ENV_LANES, "") if lanes is None else lanes
    if isinstance(raw, str):
        raw = raw.strip().lower()
        if raw in ("", "auto", "0"):
            return 0
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if value not in (0, 8, 16):
        src = f"${ENV_LANES}" if lanes is None else "lanes"
        raise ValueError(f"fastconv: {src}={raw!r} is not a CPU lane width; use 8, 16 or auto")
    return value


def _from_env() -> Settings:
    return Settings(_backend(os.environ.get(ENV_BACKEND, "").strip() or "auto", f"${ENV_BACKEND}"),
                    _autotune(os.environ.get(ENV_AUTOTUNE, "").strip() or "1", f"${ENV_AUTOTUNE}"),
                    _env_cache_dir())


_defaults: Settings | None = None
_generation = 0  # bumped by configure(): part of the dispatcher's per-call memo key
_overrides: contextvars.ContextVar[tuple] = contextvars.ContextVar("fastconv_use", default=())


def _replace(base: Settings, backend=None, autotune=None, cache_dir=None) -> Settings:
    changes = {}
    if backend is not None:
        changes["backend"] = _backend(backend)
    if autotune is not None:
        changes["autotune"] = _autotune(autotune)
    if cache_dir is not None:
        changes["cache_dir"] = _cache_dir(cache_dir)
    return dataclasses.replace(base, **changes) if changes else base


def settings() -> Settings:
    """The settings in effect here: the process defaults with the enclosing ``use`` blocks applied."""
    global _defaults
    if _defaults is None:
        _defaults = _from_env()
    s = _defaults
    for backend, autotune in _overrides.get():
        s = _replace(s, backend, autotune)
    return s


def memo_key() -> tuple:
    """Cheap key that changes whenever ``settings()`` may (for per-call memoization)."""
    return _generation, _overrides.get()


def configure(*, backend: str | None = None, autotune: bool | None = None, cache_dir=None) -> Settings:
    """Change the process-wide defaults (None leaves a setting as it is); returns the new defaults."""
    global _defaults, _generation
    settings()
    _defaults = _replace(_defaults, backend, autotune, cache_dir)
    _generation += 1
    return _defaults


@contextlib.contextmanager
def use(backend: str | None = None, autotune: bool | None = None):
    """``with fastconv.use(backend="cpp"):`` / ``use(autotune=False)``: override the settings inside the block
    (None leaves a setting as it is, "auto" hands the choice back to the dispatcher); yields the settings."""
    token = _overrides.set(_overrides.get() + ((_backend(backend) if backend is not None else None,
                                                None if autotune is None else _autotune(autotune)),))
    try:
        yield settings()
    finally:
        _overrides.reset(token)
