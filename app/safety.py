"""Input policy of the app: which typed paths may be read, and checks on uploaded files.

Policy for user-typed directories: the path is expanded and resolved (symlinks followed), must be an
existing, readable directory, and must lie under an allowed root: the current working directory, the
home directory, the project's ``data/`` folder, the datasets root (``$ERF_LAB_DATA`` or
the download cache), the app's run folder (``$ERF_LAB_APP_RUNS``), or a root listed in
``$ERF_LAB_APP_ROOTS`` (``os.pathsep``-separated). System directories (``/proc``, ``/sys``, ``/dev``,
``/etc``, ...) are refused even if a root contains them. Every refusal gives the same message, so the app
never tells whether a server path exists. Uploaded images are size-limited and verified with PIL (bad ones
are skipped and counted); uploaded checkpoints go only through the safe loader (``weights_only=True`` /
safetensors) in :mod:`app.models`.
"""
from __future__ import annotations

import io
import os
import re
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
    if os.environ.get("ERF_LAB_APP_RUNS"):  # where the app writes its own runs (see app.runs.app_runs_dir)
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
    """Resolve a user-typed directory under the policy above; raise ``ErfLabError`` with one line if refused.

    Every refusal (missing, not a directory, outside the roots, system, unreadable) gives the same message,
    naming only what the user typed, so that the app does not reveal which server paths exist."""
    text = (text or "").strip()
    if not text:
        raise ErfLabError(f"enter a {what} path")
    try:
        path = Path(text).expanduser().resolve()
        allowed = (path.is_dir() and not any(_is_within(path, Path(s)) for s in _SYSTEM_DIRS)
                   and any(_is_within(path, r) for r in allowed_roots()) and os.access(path, os.R_OK | os.X_OK))
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the text
        allowed = False
    if not allowed:
        raise ErfLabError(f"cannot open {what} {text!r}: not a readable folder the app may use (under the "
                          f"working directory, your home, data/, the datasets root or $ERF_LAB_APP_ROOTS; "
                          f"never a system directory)")
    return path


def image_files(folder: Path, limit: int = MAX_IMAGES) -> list[Path]:
    """The image files of ``folder`` as the ERF runner lists them (``erf_lab.erf.images.list_image_files``:
    class sub-folders included, sorted, hidden files ignored), at most ``limit``. The runner reads the folder
    itself, so an image that resolves out of the folder (a link, or a file in a linked folder) is refused (one line
    naming the link, not its target), not only left out of this list: the app reads only files inside the folder
    the user typed."""
    from erf_lab.erf.images import IMAGE_EXTENSIONS, list_image_files

    files: list[Path] = []
    for p in list_image_files(folder)[0]:  # every one: the runner may read past the first `limit` (skipped ones)
        if not _is_within(p.resolve(), folder):
            how = "is a link to a file" if p.is_symlink() else "lies in a linked folder"  # links to folders followed
            raise ErfLabError(f"{p.relative_to(folder).as_posix()} in the image folder {how} outside it; the app "
                              "reads only files inside the folder you typed (copy the image in)")
        if len(files) < limit:
            files.append(p)
    if not files:
        raise ErfLabError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder} or its sub-folders")
    return files


def _reason(e: Exception) -> str:
    """First line of a decoder error without object reprs (``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def verify_image_bytes(name: str, data: bytes, max_mb: float = MAX_IMAGE_MB):
    """Check an uploaded image (size, PIL ``verify``) and return it decoded at its real range
    (``erf_lab.erf.images.to_rgb``: 8-bit RGB, or 16-bit grayscale for 16-bit, 32-bit and float images, never
    clipped at 255) as a ``PIL.Image`` that PNG can store."""
    import numpy as np
    from PIL import Image

    from erf_lab.erf.images import to_rgb

    if len(data) > max_mb * 1024 * 1024:
        raise ErfLabError(f"{name}: {len(data) / 2**20:.1f} MB is over the {max_mb} MB limit per image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            rgb = to_rgb(im)
        if rgb.mode == "F":  # [0, 1] grayscale: keep 16 bits
            return Image.fromarray(np.round(np.asarray(rgb, dtype=np.float64) * 65535).astype(np.uint16))
        return rgb
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt / non-image data
        raise ErfLabError(f"{name}: not a valid image ({_reason(e)})") from None


def split_uploads(items) -> tuple[tuple[tuple[str, bytes], ...], tuple[tuple[str, str], ...]]:
    """``(name, bytes)`` uploads -> (the valid ones, ``(name, reason)`` of the others), as the CLI skips and
    counts unreadable files of a folder; ``ErfLabError`` if none is valid."""
    good, skipped = [], []
    for name, data in items:
        try:
            verify_image_bytes(name, data)
            good.append((name, data))
        except ErfLabError as e:
            skipped.append((name, str(e).removeprefix(f"{name}: ")))
    if not good:
        raise ErfLabError(f"none of the {len(skipped)} uploaded image(s) is usable: "
                          + "; ".join(f"{n}: {r}" for n, r in skipped[:3]))
    return tuple(good), tuple(skipped)


def check_checkpoint_upload(name: str, size: int) -> None:
    """Accept only .pth/.pt/.bin/.safetensors uploads under the size limit."""
    if not name.lower().endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise ErfLabError(f"{name}: checkpoints must be .pth, .pt, .bin or .safetensors")
    if size > MAX_CHECKPOINT_MB * 1024 * 1024:
        raise ErfLabError(f"{name}: {size / 2**20:.0f} MB is over the {MAX_CHECKPOINT_MB} MB checkpoint limit")
