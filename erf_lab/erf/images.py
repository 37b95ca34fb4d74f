"""Image input for ERF measurement: folders of images, the built-in default set, preprocessing.

Paper protocol (RepLKNet, Ding et al., CVPR 2022, App. C): 50 ImageNet validation images, resized to
1024x1024 (bicubic), normalized with the ImageNet mean / std.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from erf_lab.errors import ErfLabError, NodeWarning
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
PAPER_NUM_IMAGES = 50
PAPER_INPUT_SIZE = 1024
DEFAULT_SET = "default"


def default_images_dir() -> Path:
    """The built-in image set (8 CC0 / public-domain photographs, see its LICENSE.md)."""
    from erf_lab.paths import data_dir

    return data_dir() / "default_images"


def _contains(outer: str, inner: str) -> bool:
    """Whether the real path ``inner`` is ``outer`` or lies under it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def list_image_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (recursive, sorted, hidden files ignored) and the other files found.

    Class sub-folders are allowed but not required. Links to folders are followed, as torchvision's ImageFolder
    follows them (files are listed by the path through the link); a link to a folder that holds the one it sits in
    (itself, a folder above it: a loop) is not followed and is listed with the other files (reason
    :data:`LINK_LOOP`). Links out of ``folder`` are followed, as links to files are; the app refuses a file that
    resolves outside the folder typed (``app.safety.image_files``). Raises ``ErfLabError`` for a missing folder.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ErfLabError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ErfLabError(f"--images must be a folder of images, got a file: {folder}")
    images, others = [], []
    chains = {str(folder): (os.path.realpath(folder),)}  # folder walked -> the real paths of it and those above
    for root, dirs, files in os.walk(folder, followlinks=True):
        chain = chains.pop(root)
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, d))
            if any(_contains(real, c) for c in chain):
                others.append(Path(root) / d)
            else:
                kept.append(d)
                chains[os.path.join(root, d)] = chain + (real,)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            # a named pipe or device under an image's name would block the reader: regular files only (links to
            # them too); the others are listed with the files that are no image
            (images if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() else others).append(p)
    images.sort(key=lambda p: p.relative_to(folder).as_posix())
    return images, others


def model_data_config(model) -> dict:
    """The model's own preprocessing (timm's ``pretrained_cfg``, or the older ``default_cfg``): ``mean``, ``std``,
    ``interpolation``, ``crop_pct``, ``input_size`` (C, H, W); ImageNet's mean / std, bilinear, no crop and 224
    where the model declares none."""
    cfg = {}
    for attr in ("pretrained_cfg", "default_cfg"):
        c = getattr(model, attr, None)
        if isinstance(c, dict) and c:
            cfg = c
            break
    mean_std = "mean" in cfg and "std" in cfg
    size = cfg.get("input_size") or 224
    size = [int(v) for v in size] if isinstance(size, (tuple, list)) else [int(size)]
    return {"mean": tuple(map(float, cfg["mean"] if mean_std else IMAGENET_MEAN)),
            "std": tuple(map(float, cfg["std"] if mean_std else IMAGENET_STD)),
            "interpolation": str(cfg.get("interpolation") or "bilinear"),
            "crop_pct": float(cfg.get("crop_pct") or 1.0),
            "input_size": (3, size[-2] if len(size) > 1 else size[0], size[-1])}


def model_mean_std(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std of :func:`model_data_config`."""
    cfg = model_data_config(model)
    return cfg["mean"], cfg["std"]


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels show white, as a viewer on a white page shows them


def to_rgb(image):
    """A PIL image of any mode at its real range: an 8-bit ``'RGB'`` image, or for 16-bit, 32-bit integer and
    float modes a grayscale ``'F'`` image in [0, 1] (``convert("RGB")`` would clip those at 255).

    - 1, L, P, RGB, CMYK, YCbCr, HSV: PIL's conversion to RGB (1 -> 0/255; CMYK and YCbCr by PIL's formulas).
    - Alpha (RGBA, LA, PA, RGBa, La, or a ``transparency`` key): composited over white (``ALPHA_BACKGROUND``).
    - I;16, I;16L, I;16B, I;16N: ``value / 65535``. I (32-bit int): ``value / 65535`` when every value lies in
      [0, 65535] (16-bit data in a 32-bit container), else refused. F (float): used as is when every value lies
      in [0, 1], else refused. Refusals raise ``ValueError`` (an image that is skipped and counted, not fatal).
    """
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image)
        if mode == "F":
            x, scale = a.astype(np.float32), 1.0
        else:
            x, scale = a.astype(np.float64), 65535.0
        lo, hi = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi <= scale):
            what = "float image (mode F)" if mode == "F" else "32-bit integer image (mode I)"
            raise ValueError(f"{what} with values in [{lo:g}, {hi:g}]: no defined black and white level "
                             f"(expected [0, {scale:g}]); save it as 8- or 16-bit")
        return Image.fromarray((x / scale).astype(np.float32), mode="F")
    if "A" in mode or "a" in mode or "transparency" in image.info:
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_tensor(image) -> torch.Tensor:
    """An ``'RGB'`` or ``'F'`` image from :func:`to_rgb` -> ``(3, H, W)`` float32 in [0, 1]."""
    if image.mode == "F":  # resampling may overshoot [0, 1] slightly; 8-bit images clip there too
        x = torch.from_numpy(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0))
        return x.unsqueeze(0).repeat(3, 1, 1)
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)


def preprocess(image, input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL image -> normalized (3, S, S) float tensor: RGB at the image's real range (:func:`to_rgb`), bicubic
    resize to S x S (as the official ``transforms.Resize((1024, 1024), BICUBIC)``), [0, 1], subtract mean,
    divide by std."""
    from PIL import Image

    x = to_tensor(to_rgb(image).resize((input_size, input_size), Image.BICUBIC))
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


@dataclass
class ImageSource:
    """A lazily loaded, ordered list of image files; ``ids`` are paths relative to ``root``."""

    root: Path
    files: list[Path]
    input_size: int = PAPER_INPUT_SIZE
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    name: str = ""
    skipped: list = field(default_factory=list)  # (id, reason) found while selecting
    num_other_files: int = 0
    file_sha256: dict = field(default_factory=dict)  # id -> sha256 of the file's bytes, read while selecting

    @property
    def content_sha256(self) -> str:
        """One sha256 over the chosen files' relative paths and contents, in order, as they were when selected:
        what decides whether a resumed or reused run measured the same images (a file rewritten in place under the
        same name changes it; one rewritten while the run measures is not noticed)."""
        import hashlib

        h = hashlib.sha256()
        for i in self.ids:
            # surrogateescape: a file name that is not UTF-8 (legal on Linux) hashes by its bytes
            h.update(f"{i}\0{self.file_sha256.get(i, '')}\0".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    @property
    def ids(self) -> list[str]:
        return [self.id_of(p) for p in self.files]

    def id_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> torch.Tensor:
        """The preprocessed (3, S, S) tensor; raises ``OSError``/``ValueError`` for an unreadable file."""
        from PIL import Image

        with Image.open(path) as im:
            return preprocess(im, self.input_size, self.mean, self.std)

    def items(self):
        """Yield ``(id, loader)`` pairs; ``loader()`` returns the tensor or raises for unreadable files."""
        for p in self.files:
            yield self.id_of(p), (lambda p=p: self.load(p))


NOT_AN_IMAGE = "not an image file (extension)"
BROKEN_LINK = "a broken link"
NOT_REGULAR = "not a regular file (a pipe, device or socket)"
LINK_LOOP = "a link to a folder that holds it (a loop; not followed)"
#: the reasons of the files that are no image at all (``ignored ... non-image file(s)``), not unreadable images
NON_IMAGE_REASONS = (NOT_AN_IMAGE, BROKEN_LINK, NOT_REGULAR, LINK_LOOP)


def not_a_file_reason(path: Path) -> str:
    """Why ``path``, which is no regular file, is skipped: a loop link to a folder, a broken link, or a pipe,
    device or socket."""
    return LINK_LOOP if path.is_dir() else BROKEN_LINK if path.is_symlink() and not path.exists() else NOT_REGULAR


def _check_image(path: Path) -> tuple[str | None, str | None]:
    """(None, sha256 of the file's bytes) if PIL can decode the file header and data and :func:`to_rgb` accepts
    the pixels, else (the reason, None). The whole image is decoded (``verify`` alone passes a JPEG cut short,
    which then failed only when measured, after it had taken one of the ``--num-images`` places). The digest
    reads the whole file once more (in 1 MiB pieces; ~0.3 ms for a 100 kB JPEG)."""
    import hashlib

    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: open it again to decode it
            im.load()
            to_rgb(im)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
        return None, digest.hexdigest()
    except Exception as e:  # OSError, or one of PIL's many types for corrupt / non-image files
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}", None


def load_images(images: str | os.PathLike | None = None, *, num_images: int | None = None,
                input_size: int = PAPER_INPUT_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ImageSource:
    """Select the images of a run: the first ``num_images`` readable images of a folder (sorted by relative
    path), or of the built-in set when ``images`` is None / ``"default"``. Default count: all, at most 50.

    Unreadable or non-image files are skipped with a warning and recorded in ``ImageSource.skipped``.
    """
    if input_size is None or int(input_size) < 1:
        raise ErfLabError(f"--input-size must be a positive integer, got {input_size}")
    if num_images is not None and int(num_images) < 1:
        raise ErfLabError(f"--num-images must be at least 1, got {num_images}")
    builtin = images is None or str(images) == DEFAULT_SET
    root = default_images_dir() if builtin else Path(images).expanduser()
    files, others = list_image_files(root)
    if builtin:
        others = []  # LICENSE.md lives beside the built-in images
    limit = PAPER_NUM_IMAGES if num_images is None else int(num_images)
    chosen, skipped = [], []
    for o in others:
        reason = (NOT_AN_IMAGE if o.is_file() or (o.suffix.lower() not in IMAGE_EXTENSIONS and not o.is_dir())
                  else not_a_file_reason(o))
        skipped.append((o.relative_to(root).as_posix(), reason))
    digests = {}
    for p in files:
        if len(chosen) >= limit:
            break
        reason, digest = _check_image(p)
        if reason is None:
            chosen.append(p)
            digests[p.relative_to(root).as_posix()] = digest
        else:
            skipped.append((p.relative_to(root).as_posix(), reason))
    if not chosen:
        if files:
            raise ErfLabError(f"no readable images found in {root}: {skip_summary(skipped)}")
        raise ErfLabError("no image files (" + "/".join(e[1:] for e in IMAGE_EXTENSIONS[:4]) + f" ...) found in {root}"
                          + (f" ({len(others)} other file(s))" if others else ""))
    bad = [s for s in skipped if s[1] not in NON_IMAGE_REASONS]  # the others are the "ignored" ones below
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root}: "
                      + ", ".join(s[0] for s in bad[:5]) + (", ..." if len(bad) > 5 else ""), NodeWarning, stacklevel=2)
    if others:
        warnings.warn(f"ignored {len(others)} non-image file(s) in {root}", NodeWarning, stacklevel=2)
    return ImageSource(root=root, files=chosen, input_size=int(input_size), mean=tuple(mean), std=tuple(std),
                       name=DEFAULT_SET if builtin else root.name, skipped=skipped, num_other_files=len(others),
                       file_sha256=digests)


def skip_summary(skipped, shown: int = 3) -> str:
    """``skipped`` ([id, reason] pairs) in one phrase for an error line: the count, split into unreadable images,
    images with a non-finite gradient and files that are no image (as the warnings count them), then the first
    ``shown`` entries, non-image files last: ``"2 skipped: 1 unreadable image(s), 1 non-image file(s) (trunc.jpg:
    OSError: ...; notes.txt: not an image file (extension))"``."""
    skipped = [tuple(s) for s in skipped]
    groups = {"unreadable image(s)": [], "image(s) with a non-finite gradient": [], "non-image file(s)": []}
    for s in skipped:
        key = ("non-image file(s)" if s[1] in NON_IMAGE_REASONS else
               "image(s) with a non-finite gradient" if str(s[1]).startswith("non-finite") else "unreadable image(s)")
        groups[key].append(s)
    listed = [s for g in groups.values() for s in g][:shown]
    parts = ", ".join(f"{len(g)} {name}" for name, g in groups.items() if g)
    return (f"{len(skipped)} skipped" + (f": {parts}" if parts else "")
            + (" (" + "; ".join(f"{i}: {r}" for i, r in listed) + ("; ..." if len(skipped) > shown else "") + ")"
               if listed else ""))
