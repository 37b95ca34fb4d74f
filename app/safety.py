"""Input policy of the app: which typed paths may be read, and checks on uploaded files.

Policy for user-typed directories: the path is expanded and resolved (symlinks followed), must be an
existing, readable directory, and must lie under an allowed root: the current working directory, the
home directory, the project's ``data/`` folder, the datasets root (``$ERF_LAB_DATA`` or
``../shared/datasets``), the app's run folder (``$ERF_LAB_APP_RUNS``), or a root listed in ``$ERF_LAB_APP_ROOTS`` (``os.pathsep``-separated). System
directories (``/proc``, ``/sys``, ``/dev``, ``/etc``, ...) are refused even if a root contains them.
Uploaded images are size-limited and verified with PIL; uploaded checkpoints go only through the safe
loader (``weights_only=True`` / safetensors) in :mod:`loaders`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from erf_lab.errors import ErfLabError

MAX_IMAGE_MB = 10
MAX_IMAGES = 64
MAX_CHECKPOINT_MB = 400
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/boot", "/run", "/bin", "/sbin", "/lib", "/lib64",
                "/usr", "/var/run", "/var/lib", "/snap")


def allowed_roots() -> list[Path]:
    """The directories under which typed paths may point (resolved, existing ones only)."""
    from erf_lab.paths import data_dir, datasets_root

    roots = [Path.cwd(), Path.home(), data_dir()]
    ds = datasets_root()
    if ds is not None:
        roots.append(ds)
    if os.environ.get("ERF_LAB_APP_RUNS"):  # where the app writes its own runs (see loaders.app_runs_dir)
        roots.append(Path(os.environ["ERF_LAB_APP_RUNS"]).expanduser())
    for extra in os.environ.get("ERF_LAB_APP_ROOTS", "").split(os.pathsep):
        if extra.strip():
            roots.append(Path(extra.strip()).expanduser())
    out = []
    for r in roots:
        try:
            r = r.resolve()
        except OSError:
            continue
        if r.is_dir() and r not in out and str(r) != "/":
            out.append(r)
    return out


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def safe_directory(text: str, what: str = "folder") -> Path:
    """Resolve a user-typed directory under the policy above; raise ``ErfLabError`` with one line if refused."""
    text = (text or "").strip()
    if not text:
        raise ErfLabError(f"enter a {what} path")
    if "\x00" in text:
        raise ErfLabError(f"invalid {what} path")
    try:
        path = Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise ErfLabError(f"cannot resolve {what} {text!r}: {e}") from None
    if any(_is_within(path, Path(s)) for s in _SYSTEM_DIRS):
        raise ErfLabError(f"{what} {path} is inside a system directory; choose a data folder")
    if not path.is_dir():
        raise ErfLabError(f"{what} {path} does not exist or is not a directory")
    roots = allowed_roots()
    if not any(_is_within(path, r) for r in roots):
        raise ErfLabError(f"{what} {path} is outside the allowed roots ({', '.join(map(str, roots))}); "
                          f"add its parent to $ERF_LAB_APP_ROOTS to allow it")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ErfLabError(f"{what} {path} is not readable")
    return path


def image_files(folder: Path, limit: int = MAX_IMAGES) -> list[Path]:
    """Image files directly inside ``folder`` (sorted, at most ``limit``, no symlinks out of it)."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if not _is_within(p.resolve(), folder):
                continue
            files.append(p)
    if not files:
        raise ErfLabError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:limit]


def verify_image_bytes(name: str, data: bytes, max_mb: float = MAX_IMAGE_MB):
    """Check an uploaded image (size, PIL ``verify``) and return it decoded as an RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_mb * 1024 * 1024:
        raise ErfLabError(f"{name}: {len(data) / 2**20:.1f} MB is over the {max_mb} MB limit per image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ErfLabError(f"{name}: not a valid image ({type(e).__name__}: {e})") from None


def check_checkpoint_upload(name: str, size: int) -> None:
    """Accept only .pth/.pt/.bin/.safetensors uploads under the size limit."""
    if not name.lower().endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise ErfLabError(f"{name}: checkpoints must be .pth, .pt, .bin or .safetensors")
    if size > MAX_CHECKPOINT_MB * 1024 * 1024:
        raise ErfLabError(f"{name}: {size / 2**20:.0f} MB is over the {MAX_CHECKPOINT_MB} MB checkpoint limit")
