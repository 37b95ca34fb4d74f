"""Finding, parsing and decoding the cue-conflict, edge and silhouette stimuli (Geirhos et al., ICLR 2019)."""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erf_lab.erf.images import model_data_config, to_rgb, to_tensor
from erf_lab.errors import ErfLabError
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD
from erf_lab.shape_bias.categories import CATEGORIES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HOW_TO_GET = ("get the stimuli with 'erf-lab data download', or point --stimuli DIR / $ERF_LAB_DATA at a folder "
              "holding cue-conflict/ (and edges/, silhouettes/)")
_CUE_RE = re.compile(r"^([a-z]+)(\d+)-([a-z]+)(\d+)$")
_SINGLE_RE = re.compile(r"^([a-z]+)(\d+)$")


@dataclass(frozen=True)
class Stimulus:
    path: Path
    shape: str
    texture: str  # equal to shape for edges / silhouettes and for the 80 non-conflict cue-conflict images

    @property
    def name(self) -> str:
        return self.path.name


def _stem(name: str) -> str:
    """The stimulus part of a name: its last ``_`` part (model-vs-human's trial prefix off), without the suffix."""
    stem = Path(name).name.rsplit("_", 1)[-1]
    return stem.rsplit(".", 1)[0] if "." in stem else stem


def is_cue_conflict_name(name: str) -> bool:
    """Whether ``name`` is named as a cue-conflict stimulus (``<shape><i>-<texture><j>``, the 80 images whose shape
    equals their texture too), not as an edge or silhouette one (``<shape><i>``)."""
    return _CUE_RE.match(_stem(name)) is not None


def name_words(name: str) -> tuple[str, str] | None:
    """The shape and texture words of a name that follows the stimulus naming convention (``parse_name``), whether
    or not they are categories; None for a name that does not follow it."""
    stem = _stem(name)
    m = _CUE_RE.match(stem)
    if m:
        return m.group(1), m.group(3)
    m = _SINGLE_RE.match(stem)
    return (m.group(1), m.group(1)) if m else None


def parse_name(name: str) -> tuple[str, str]:
    """``'bird1-bear2.png'`` -> ``('bird', 'bear')``; ``'bird3.png'`` -> ``('bird', 'bird')``.

    Also accepts model-vs-human image names (``0001_s5n_s01_0_bird_00_bird3-bird2.png``: the last ``_`` part).
    Raises ``ValueError`` for names that do not follow the convention or use unknown categories.
    """
    words = name_words(name)
    if words is None:
        raise ValueError(f"cannot parse stimulus name {name!r} (expected <shape><i>-<texture><j>.png)")
    shape, texture = words
    for c in (shape, texture):
        if c not in CATEGORIES:
            raise ValueError(f"unknown category {c!r} in stimulus name {name!r}")
    return shape, texture


def list_stimuli(folder: str | os.PathLike, limit: int | None = None) -> tuple[list[Stimulus], list[dict]]:
    """All images in ``folder/<category>/`` sorted by (category, name); returns (stimuli, skipped).

    Image files whose name does not parse, and files named as stimuli but of another type than
    ``IMAGE_SUFFIXES``, are skipped with a reason (never silently); other files (MANIFEST.json) are no stimuli.
    ``limit`` takes an even spread over categories (every k-th image) so small runs still cover all 16 categories.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ErfLabError(f"stimulus folder not found: {folder}; {HOW_TO_GET}")
    stimuli, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            try:  # a stimulus saved as another type (.webp, .tif): said, not dropped unseen
                parse_name(path.name)
            except ValueError:  # MANIFEST.json, a README: no stimulus
                continue
            skipped.append({"file": str(path.relative_to(folder)),
                            "reason": f"a {path.suffix or 'suffix-less'} file: stimuli are read from "
                                      f"{'/'.join(IMAGE_SUFFIXES)} files"})
            continue
        try:
            shape, texture = parse_name(path.name)
        except ValueError as e:
            skipped.append({"file": str(path.relative_to(folder)), "reason": str(e)})
            continue
        if path.parent != folder and path.parent.name in CATEGORIES and path.parent.name != shape:
            skipped.append({"file": str(path.relative_to(folder)),
                            "reason": f"file in folder {path.parent.name!r} but its name says shape {shape!r}"})
            continue
        stimuli.append(Stimulus(path, shape, texture))
    if not stimuli:
        raise ErfLabError(f"no stimulus images found in {folder}; {HOW_TO_GET}")
    if limit is not None and 0 < limit < len(stimuli):
        step = len(stimuli) / limit
        stimuli = [stimuli[int(i * step)] for i in range(limit)]
    return stimuli, skipped


def find_stimuli_root(stimuli: str | os.PathLike | None = None) -> Path:
    """The folder holding ``cue-conflict/``: ``--stimuli`` (either that folder or cue-conflict/ itself), else
    ``erf_lab.paths.datasets_root()``. Raises ``ErfLabError`` with instructions when nothing is found."""
    from erf_lab.paths import datasets_root

    if stimuli is not None:
        p = Path(stimuli).expanduser()
        if not p.is_dir():
            raise ErfLabError(f"stimulus folder not found: {p}; {HOW_TO_GET}")
        return p / "cue-conflict" if (p / "cue-conflict").is_dir() else p
    root = datasets_root()
    if root is None or not (root / "cue-conflict").is_dir():
        raise ErfLabError(f"cue-conflict stimuli not found; {HOW_TO_GET}")
    return root / "cue-conflict"


def sibling_set(cue_dir: Path, name: str) -> Path | None:
    """``edges`` / ``silhouettes`` beside the cue-conflict folder, if present."""
    p = cue_dir.parent / name
    return p if p.is_dir() and p != cue_dir else None


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing of a stimulus: resize the short side to ``size / crop_pct`` with ``interpolation`` (no resize
    when the image has that size already), centre-crop ``size``, scale to [0, 1], normalize ``mean``/``std``."""
    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_model(cls, model, crop_pct: float | None = 1.0) -> "Preprocess":
        """The model's input size, mean / std and interpolation from :func:`erf_lab.erf.images.model_data_config`
        (timm's ``pretrained_cfg``).

        ``crop_pct=1.0`` (default) is model-vs-human's protocol (Geirhos et al., NeurIPS 2021): it feeds the
        224 px stimuli whole (``datasets/dataloaders.py``: ToTensor and Normalize only), so a 224 px model sees
        every pixel. A model of another input size gets the whole stimulus resized (model-vs-human would feed it
        the 224 px image as it is; ``model_vs_human_geometry`` is then false). ``crop_pct=None`` takes
        the model's own ImageNet-evaluation crop instead (e.g. 0.875: resize to 256, centre-crop 224), which cuts
        the stimulus's border and enlarges the rest: a departure from the protocol, recorded in the summary.
        """
        cfg = model_data_config(model)
        crop = cfg["crop_pct"] if crop_pct is None else crop_pct
        if not 0 < crop <= 1:
            raise ErfLabError(f"crop_pct must be in (0, 1], got {crop}")
        return cls(size=tuple(cfg["input_size"][-2:]), mean=cfg["mean"], std=cfg["std"],
                   interpolation=cfg["interpolation"], crop_pct=float(crop))

    def as_dict(self) -> dict:
        return {"input_size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "steps": "RGB at the image's real range (alpha over white), resize short side to size/crop_pct, "
                         "centre crop, scale to [0, 1], (x-mean)/std",
                "model_vs_human_geometry": self.crop_pct == 1.0 and tuple(self.size) == (224, 224)}

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """The model input (3, H, W) of one image: ``normalize(to_tensor(pixels(img)))``."""
        return self.normalize(to_tensor(self.pixels(img)))

    def pixels(self, img: Image.Image) -> Image.Image:
        """The resized, centre-cropped image (``'RGB'``, or ``'F'`` in [0, 1] for high-bit-depth sources)."""
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                    "lanczos": Image.LANCZOS}.get(self.interpolation, Image.BILINEAR)
        img = to_rgb(img)
        h, w = self.size
        scale_h, scale_w = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)  # timm's scale_size
        if img.size != (scale_w, scale_h):
            iw, ih = img.size
            r = max(scale_w / iw, scale_h / ih)
            img = img.resize((max(scale_w, round(iw * r)), max(scale_h, round(ih * r))), resample)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        return img.crop((left, top, left + w, top + h))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel of (3, H, W) or (B, 3, H, W) values in [0, 1], on ``x``'s device."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x - mean) / std


class StimulusPixels(torch.utils.data.Dataset):
    """Item i: ``(i, pixels, error)`` with the resized, cropped pixels as a NumPy array: uint8 (3, H, W) for 8-bit
    RGB (a quarter of the bytes to send back from a worker process), float32 (3, H, W) in [0, 1] otherwise, and
    None with the reason for an undecodable image. Arrays, not tensors: a tensor from a worker process keeps a
    file descriptor open while it lives, and a set's pixels live until it is done. Load with ``collate_fn=list``."""

    def __init__(self, stimuli: list[Stimulus], preprocess: Preprocess):
        self.stimuli = stimuli
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.stimuli)

    def decode(self, i: int) -> tuple[Image.Image | None, str]:
        """(``Preprocess.pixels`` of image i, ""), or (None, the reason) for an undecodable image."""
        try:
            with Image.open(self.stimuli[i].path) as img:
                return self.preprocess.pixels(img), ""
        except Exception as e:  # PIL raises many types for broken files
            return None, f"{type(e).__name__}: {e}".splitlines()[0]

    def __getitem__(self, i: int):
        px, err = self.decode(i)
        if px is None:
            return i, None, err
        if px.mode == "RGB":
            return i, np.ascontiguousarray(np.asarray(px).transpose(2, 0, 1)), ""
        return i, to_tensor(px).numpy(), ""


class StimulusDataset(StimulusPixels):
    """Decodes images in DataLoader workers: item i is ``(pixels (3, H, W) in [0, 1], i, ok, error)``, the pixels
    before ``Preprocess.normalize``; an undecodable image yields ``ok=False`` and zeros (counted, not fatal)."""

    def __getitem__(self, i: int):
        px, err = self.decode(i)
        if px is None:
            h, w = self.preprocess.size
            return torch.zeros(3, h, w), i, False, err
        return to_tensor(px), i, True, ""


#: decoded sets larger than this (uint8, 3 x H x W bytes per image) are not cached, and the cache folder keeps the
#: most recently used sets up to this many bytes in all
DECODED_CACHE_MAX_BYTES = 2 << 30


class DecodedCache:
    """The decoded, resized and cropped pixels of a stimulus list as uint8 (N, 3, H, W) under
    ``<erf-lab cache>/stimuli/``, so a second run on the same images skips PNG decoding and resizing (4.6-5.5 ms
    of a core per stimulus on the 2-core dev box, which the inference threads need there). Keyed by every file's
    path, size and modification time, the preprocessing geometry, the decoder's source and Pillow's version and
    codec libraries: a changed image, size or decoder is decoded again. Stored only for a list whose images all
    decoded to 8-bit RGB, which uint8 holds exactly: ``uint8 / 255`` is bit for bit what :class:`StimulusDataset`
    gives. The folder keeps the most recently used sets up to ``DECODED_CACHE_MAX_BYTES``; delete it at will."""

    def __init__(self, stimuli: list[Stimulus], preprocess: Preprocess):
        h, w = preprocess.size
        self.stimuli, self.preprocess = stimuli, preprocess
        self.shape = (len(stimuli), 3, h, w)

    @property
    def fits(self) -> bool:
        return 0 < math.prod(self.shape) <= DECODED_CACHE_MAX_BYTES

    @property
    def path(self) -> Path:
        import hashlib
        import json

        import PIL
        from PIL import features

        import erf_lab.erf.images as images_module
        from erf_lab.paths import cache_dir

        n, _, h, w = self.shape
        pp = self.preprocess
        key = hashlib.sha256(json.dumps({
            "files": files_fingerprint(self.stimuli),
            "size": [h, w], "interpolation": pp.interpolation, "crop_pct": pp.crop_pct,
            "pillow": [PIL.__version__, *(features.version(f) for f in ("jpg", "zlib", "libtiff", "webp"))],
        }).encode())
        for module_file in (__file__, images_module.__file__):
            key.update(Path(module_file).read_bytes())
        return cache_dir() / "stimuli" / f"{n}x{h}x{w}-{key.hexdigest()[:20]}.u8.npy"

    def load(self) -> np.ndarray | None:
        """The cached pixels (memory-mapped, read-only), or None."""
        from erf_lab.io import load_cached_array

        if not self.fits:
            return None
        try:
            path = self.path
        except OSError:  # no home folder for the cache, an unreadable stimulus folder: decode
            return None
        arr = load_cached_array(path, self.shape, np.uint8)
        if arr is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept when the folder is trimmed
        return arr

    def save(self, pixels: np.ndarray) -> np.ndarray:
        """Store ``pixels`` and trim the folder; returns them memory-mapped from the cache (``pixels`` where it is
        not writable)."""
        from erf_lab.io import save_cached_array

        if not self.fits:
            return pixels
        try:
            path = self.path
        except OSError:
            return pixels
        stored = save_cached_array(path, pixels)
        _trim(path.parent, keep=path)
        return stored


def _trim(folder: Path, keep: Path, budget: int | None = None) -> None:
    """Delete the least recently used ``*.u8.npy`` sets of ``folder`` beyond ``budget`` bytes (default
    ``DECODED_CACHE_MAX_BYTES``) in all; ``keep`` stays."""
    budget = DECODED_CACHE_MAX_BYTES if budget is None else budget
    with contextlib.suppress(OSError):
        files = sorted(((f.stat().st_mtime_ns, f.stat().st_size, f) for f in folder.glob("*.u8.npy")), reverse=True)
        total = 0
        for _, size, f in files:
            total += size
            if total > budget and f != keep:
                f.unlink(missing_ok=True)


def files_fingerprint(stimuli: list[Stimulus]) -> list:
    """``[path, size, mtime_ns]`` of every stimulus file (-1s for a missing one): a changed file changes it."""
    out = []
    for s in stimuli:
        try:
            st = s.path.stat()
            out.append([str(s.path.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(s.path.resolve()), -1, -1])
    return out
