"""cue-world: a procedural, seeded, resolution-free image world where shape and texture compete.

Class k is the pair (shape ``SHAPES[k]``, texture ``TEXTURES[k]``). A training image shows shape k filled with
texture k at a random position, scale, rotation and colour on a smooth low-frequency colour background that
carries neither cue, so in training both cues predict the class perfectly and what a network uses is its own
bias. Probe splits (generated from other seed streams) separate the cues, as in Geirhos et al. (ICLR 2019):
``cue-conflict`` (shape i filled with texture j != i), ``shape-only`` (silhouette filled flat) and
``texture-only`` (the texture over the whole frame, no outline).

Every image is a pure function of (seed, split, index): its parameters are drawn from
``numpy.random.default_rng([seed, split code, index])`` before the resolution is known, then rendered
analytically (signed distances, anti-aliased over one pixel) at any size, so the same index gives the same
scene at 32 px and at 1024 px.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erf_lab.errors import ErfLabError

SPLITS = ("train", "val", "cue-conflict", "shape-only", "texture-only")
_SPLIT_CODE = {"train": 101, "val": 202, "cue-conflict": 303, "shape-only": 404, "texture-only": 505}
DEFAULT_NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------- shapes
def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


_POLYGONS = {
    "triangle": np.array([[0.0, 1.0], [-0.866, -0.5], [0.866, -0.5]]),
    "square": np.array([[-0.72, -0.72], [0.72, -0.72], [0.72, 0.72], [-0.72, 0.72]]),
    "star": _star(),
    "cross": np.array([[-0.3, 0.95], [0.3, 0.95], [0.3, 0.3], [0.95, 0.3], [0.95, -0.3], [0.3, -0.3], [0.3, -0.95],
                       [-0.3, -0.95], [-0.3, -0.3], [-0.95, -0.3], [-0.95, 0.3], [-0.3, 0.3]]),
    "arrow": np.array([[1.0, 0.0], [0.2, 0.75], [0.2, 0.3], [-0.95, 0.3], [-0.95, -0.3], [0.2, -0.3], [0.2, -0.75]]),
    "ell": np.array([[-0.75, -0.9], [0.8, -0.9], [0.8, -0.42], [-0.27, -0.42], [-0.27, 0.95], [-0.75, 0.95]]),
    "heart-tip": np.array([[-0.84, 0.12], [0.84, 0.12], [0.0, -0.92]]),
}

#: Shape names in class order (class k has shape ``SHAPES[k]``).
SHAPES = ("circle", "triangle", "square", "star", "cross", "crescent", "heart", "ellipse", "arrow", "ring",
          "blob", "ell")


def _polygon_sdf(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside; even-odd rule)."""
    d = np.full(x.shape, np.inf, dtype=x.dtype)
    inside = np.zeros(x.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(poly.tolist(), np.roll(poly, -1, axis=0).tolist()):
        ex, ey = bx - ax, by - ay
        px, py = x - ax, y - ay
        h = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d = np.minimum(d, (px - h * ex) ** 2 + (py - h * ey) ** 2)
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = ax + (y - ay) * ex / (ey if ey != 0 else 1e-12)
        inside ^= crosses & (x < xc)
    d = np.sqrt(d)
    return np.where(inside, -d, d)


def shape_sdf(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance of shape ``name`` (fits in the unit disc) at shape-frame points (x, y)."""
    r = np.hypot(x, y)
    if name == "circle":
        return r - 0.85
    if name == "ring":
        return np.abs(r - 0.72) - 0.24
    if name == "crescent":
        return np.maximum(r - 0.9, 0.72 - np.hypot(x - 0.45, y))
    if name == "heart":  # two lobes over a triangular tip (union = min of the distances)
        lobes = np.minimum(np.hypot(x + 0.42, y - 0.36), np.hypot(x - 0.42, y - 0.36)) - 0.46
        return np.minimum(lobes, _polygon_sdf(x, y, _POLYGONS["heart-tip"]))
    if name == "ellipse":  # first-order distance to the ellipse x^2/1 + y^2/0.5^2 = 1
        k0 = np.hypot(x, y / 0.5)
        return k0 * (k0 - 1.0) / np.maximum(np.hypot(x, y / 0.25), 1e-9)
    if name == "blob":  # star-shaped outline R(theta), distance ~ (r - R) / |grad|
        t = np.arctan2(y, x)
        big_r = 0.78 + 0.14 * np.sin(3 * t + 0.4) + 0.08 * np.cos(5 * t)
        d_r = 0.42 * np.cos(3 * t + 0.4) - 0.4 * np.sin(5 * t)
        return (r - big_r) / np.sqrt(1 + (d_r / np.maximum(r, 1e-6)) ** 2)
    return _polygon_sdf(x, y, _POLYGONS[name])


# ----------------------------------------------------------------------------------------------- textures
#: Texture names in class order (class k has texture ``TEXTURES[k]``). Orientations live in the image frame.
TEXTURES = ("grating-0", "grating-45", "grating-90", "grating-135", "dots", "checks", "waves", "blotches",
            "crosshatch", "zigzag", "rings", "speckle")


def _soft(v: np.ndarray, sharpness: float = 2.5) -> np.ndarray:
    return np.clip(0.5 + sharpness * v, 0.0, 1.0)


def _band_noise(x, freq: float, rng: np.random.Generator, waves: int = 8) -> np.ndarray:
    """Isotropic band-limited noise: a sum of plane waves of frequency ``freq`` in random directions."""
    a = rng.uniform(0, 2 * np.pi, waves)
    ph = rng.uniform(0, 2 * np.pi, waves)
    k = 2 * np.pi * freq * rng.uniform(0.8, 1.25, waves)
    return _plane_waves(x.shape[-1], k * np.cos(a), k * np.sin(a), ph, np.full(waves, 1 / np.sqrt(waves / 2)))


def texture_value(name: str, x: np.ndarray, y: np.ndarray, period: float, angle: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Texture ``name`` in [0, 1] at image-frame points (x, y); ``period`` in the same units, ``angle`` a jitter
    (radians) added to the texture's own orientation; ``rng`` draws phases (consumed deterministically)."""
    phase = rng.uniform(0, 1, 2)
    if name.startswith("grating-"):
        a = math.radians(float(name.split("-")[1])) + angle
        u = math.cos(a) * x + math.sin(a) * y
        return _soft(np.sin(2 * np.pi * (u / period + float(phase[0]))))
    c, s = math.cos(angle), math.sin(angle)
    p0, p1 = float(phase[0]), float(phase[1])
    u, v = (c * x + s * y) / period + p0, (-s * x + c * y) / period + p1
    if name == "dots":
        du, dv = u - np.round(u), v - np.round(v)
        return _soft((0.3 - np.hypot(du, dv)) * 4.0)
    if name == "checks":
        return _soft(np.sin(np.pi * u) * np.sin(np.pi * v) * 1.5)
    if name == "waves":
        return _soft(np.sin(2 * np.pi * (v + 0.35 * np.sin(2 * np.pi * u / 2.5))))
    if name == "blotches":
        return _soft(_band_noise(x, 0.6 / period, rng), 1.5)
    if name == "crosshatch":
        du, dv = np.abs(u - np.round(u)), np.abs(v - np.round(v))
        return _soft((0.14 - np.minimum(du, dv)) * 6.0)
    if name == "zigzag":
        tri = np.abs((u / 1.2) % 2 - 1)  # triangle wave along u
        return _soft(np.sin(2 * np.pi * (v + 0.8 * tri)))
    if name == "rings":
        return _soft(np.sin(2 * np.pi * np.hypot(u - p0 - 2, v - p1 - 1.3)))
    if name == "speckle":
        return _soft(_band_noise(x, 1.6 / period, rng), 1.5)
    raise ErfLabError(f"unknown cue-world texture {name!r}")


# ------------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """Everything that defines one image, drawn before the resolution is known."""

    shape: int  # class index of the silhouette, -1 for none (texture-only)
    texture: int  # class index of the fill texture, -1 for a flat fill (shape-only)
    center: tuple[float, float]
    radius: float
    rotation: float
    period: float
    texture_angle: float
    colors: tuple  # (fill colour A, fill colour B) RGB in [0, 1]
    background: tuple  # (base RGB, 3x3 plane-wave params per channel)
    texture_seed: int


def _contrasting_pair(rng: np.random.Generator, min_dist: float = 0.55) -> tuple[np.ndarray, np.ndarray]:
    while True:
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.abs(a - b).sum() >= min_dist * 1.5 and abs(a.mean() - b.mean()) >= 0.2:
            return a, b


def _scene_rng(split: str, index: int, seed: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``; its first draw is the image's class (``draw_class``)."""
    if split not in _SPLIT_CODE:
        raise ErfLabError(f"unknown cue-world split {split!r}; choose one of {', '.join(SPLITS)}")
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


def draw_class(split: str, index: int, num_classes: int = DEFAULT_NUM_CLASSES, seed: int = 0) -> int:
    """The label of image ``index`` of ``split``, the first draw of its scene (the shape class; in texture-only
    images the texture class), without drawing the rest: ~9 against ~30 us (2-core Intel Xeon)."""
    return int(_scene_rng(split, index, seed).integers(num_classes))


def draw_scene(split: str, index: int, num_classes: int = DEFAULT_NUM_CLASSES, seed: int = 0) -> Scene:
    """The scene of image ``index`` of ``split`` (deterministic in (seed, split, index))."""
    rng = _scene_rng(split, index, seed)
    k = int(rng.integers(num_classes))
    shape, texture = k, k
    if split == "cue-conflict":
        texture = int((k + 1 + rng.integers(num_classes - 1)) % num_classes)
    elif split == "shape-only":
        texture = -1
    elif split == "texture-only":
        shape = -1
    radius = float(rng.uniform(0.45, 0.72))
    center = tuple(float(c) for c in rng.uniform(-1 + radius, 1 - radius, 2))
    a, b = _contrasting_pair(rng)
    base = rng.uniform(0.25, 0.75, 3)
    waves = rng.uniform(0, 1, (3, 3, 3))  # per channel: 3 plane waves (angle, phase, amplitude)
    return Scene(shape=shape, texture=texture, center=center, radius=radius,
                 rotation=float(rng.uniform(0, 2 * np.pi)), period=float(rng.uniform(0.2, 0.28)),
                 texture_angle=float(rng.uniform(-0.15, 0.15)), colors=(a, b), background=(base, waves),
                 texture_seed=int(rng.integers(2 ** 31)))


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _coords(size: int) -> np.ndarray:
    """Pixel-centre coordinates in [-1, 1] along one axis."""
    return ((np.arange(size, dtype=np.float64) + 0.5) / size * 2 - 1).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel-centre coordinate planes in [-1, 1] (x along columns, y down the rows), cached per size."""
    if size not in _GRIDS:
        c = _coords(size)
        _GRIDS[size] = tuple(np.meshgrid(c, c, indexing="xy"))
    return _GRIDS[size]


def _plane_waves(size: int, kx, ky, phase, amp) -> np.ndarray:
    """sum_w amp_w cos(kx_w x + ky_w y + phase_w) on the pixel grid, as one rank-2W matrix product
    (cos(A + B) = cos A cos B - sin A sin B separates the column and row terms)."""
    c = _coords(size).astype(np.float64)
    a = np.outer(c, kx) + phase  # (S, W): column term
    b = np.outer(c, ky)  # (S, W): row term
    rows = np.concatenate([np.cos(b), -np.sin(b)], 1)
    cols = np.concatenate([amp * np.cos(a), amp * np.sin(a)], 1)
    return (rows @ cols.T).astype(np.float32)


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """The scene as a float32 (3, size, size) array in [0, 1]."""
    x, y = _grid(size)
    base, waves = scene.background
    img = np.empty((3, size, size), dtype=np.float32)
    for ch in range(3):  # smooth colour field: plane waves with a period of 3.3 image widths: no edge, no texture
        ang, ph, amp = 2 * np.pi * waves[ch].T
        k = np.pi * 0.6
        img[ch] = base[ch] + _plane_waves(size, k * np.cos(ang), k * np.sin(ang), ph, 0.12 * amp / (2 * np.pi))
    a, b = scene.colors
    if scene.texture >= 0:
        t = texture_value(TEXTURES[scene.texture], x, y, scene.period, scene.texture_angle,
                          np.random.default_rng(scene.texture_seed))
        a, b = a.astype(np.float32)[:, None, None], b.astype(np.float32)[:, None, None]
        fill = b + (a - b) * t
    else:
        flat = a if abs(a.mean() - base.mean()) >= abs(b.mean() - base.mean()) else b  # the more visible one
        fill = np.broadcast_to(flat[:, None, None], img.shape)
    if scene.shape >= 0:
        cx, cy = scene.center
        c, s = math.cos(scene.rotation), math.sin(scene.rotation)
        dx, dy = (x - cx) / scene.radius, (y - cy) / scene.radius
        sdf = shape_sdf(SHAPES[scene.shape], c * dx + s * dy, -s * dx + c * dy) * scene.radius
        mask = np.clip(0.5 - sdf * size / 2, 0.0, 1.0)  # anti-aliased over one pixel (pixel = 2 / size)
        img = fill * mask + img * (1 - mask)
    else:
        img = np.array(fill)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ dataset
def class_names(num_classes: int = DEFAULT_NUM_CLASSES) -> list[str]:
    """``shape/texture`` name of each class."""
    return [f"{SHAPES[k]}/{TEXTURES[k]}" for k in range(num_classes)]


#: Above this many bytes a split is not cached (rendered on the fly instead): float32, 3 x S x S per image.
CACHE_MAX_BYTES = 2 << 30
#: Up to this many images a split keeps the labels it has drawn (1 byte each); a larger one draws them each time.
LABEL_MEMO_MAX = 1 << 20
#: The most images one split can have: a shuffled epoch order is a list of this many indices (~0.4 GB at 10^7);
#: ``resample`` gives an endless stream of new training images instead.
MAX_SPLIT_SIZE = 10_000_000


def renderer_version() -> str:
    """Hash of this module's source: part of every cache file name, so a changed renderer never serves old images."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


class CueWorldSettingError(ErfLabError):
    """A cue-world setting out of its range; ``setting`` names it as ``CueWorld`` takes it (``num_classes``,
    ``train_size``, ``val_size``, ``input_size``), so a command line can name its own option."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting

class CueWorld(torch.utils.data.Dataset):
    """``size`` images of ``split`` as ``(float32 tensor (3, S, S) in [0, 1], label)``.

    The label is the class for train / val, the shape class for cue-conflict and shape-only, the texture class
    for texture-only; :meth:`cues` gives both. ``cache=True`` renders the split once (in parallel worker processes
    for large splits, with a progress bar) into ``<erf-lab cache>/cue-world/`` as float32, bit-identical to
    rendering on the fly, keyed by the renderer's source hash, and reads it memory-mapped afterwards: a training
    run then spends no time drawing images (splits over ``CACHE_MAX_BYTES`` render on the fly; an unwritable cache
    keeps the split in memory). ``resample=True`` makes the set an endless stream: after :meth:`set_epoch` (e),
    item i is image ``e * size + i`` of the split (epoch 0 comes from the cache, later epochs are rendered).
    """

    def __init__(self, split: str = "train", size: int = 2000, input_size: int = 64,
                 num_classes: int = DEFAULT_NUM_CLASSES, seed: int = 0, cache: bool = False,
                 resample: bool = False, show_progress: bool = False):
        if split not in SPLITS:
            raise ErfLabError(f"unknown cue-world split {split!r}; choose one of {', '.join(SPLITS)}")
        if not 2 <= int(num_classes) <= len(SHAPES):
            raise CueWorldSettingError("num_classes", f"cue-world has 2 to {len(SHAPES)} classes, got {num_classes}")
        if not 1 <= int(size) <= MAX_SPLIT_SIZE:
            raise CueWorldSettingError(f"{split}_size", f"cue-world {split} size must be 1 to {MAX_SPLIT_SIZE:,} "
                                       f"images, got {int(size):,}"
                                       + ("; to train on more, --resample draws that many new images every epoch"
                                          if split == "train" and int(size) > MAX_SPLIT_SIZE else ""))
        if not 8 <= int(input_size) <= 4096:
            raise CueWorldSettingError("input_size", f"cue-world input size must be in [8, 4096] pixels, got "
                                       f"{input_size}")
        self.split, self.size, self.input_size = split, int(size), int(input_size)
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.classes = class_names(self.num_classes)
        self.resample, self.epoch = bool(resample), 0
        self._cached = None
        self._labels: np.ndarray | None = None  # labels of the split's fixed images, drawn as they are asked for
        if cache and self.size * 3 * self.input_size ** 2 * 4 <= CACHE_MAX_BYTES:
            self._cached = self._load_cache(show_progress)

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _scene_index(self, index: int, epoch: int | None = None) -> int:
        """The index in the split's endless stream of item ``index`` of ``epoch`` (default the current one)."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"cue-world {self.split} item {index} of {self.size}")
        epoch = self.epoch if epoch is None else int(epoch)
        return (epoch * self.size if self.resample else 0) + index % self.size

    def scene(self, index: int, epoch: int | None = None) -> Scene:
        """The scene of item ``index`` (of ``epoch``, default the current one; drawn on demand, ~30 us)."""
        return draw_scene(self.split, self._scene_index(index, epoch), self.num_classes, self.seed)

    def cues(self, index: int) -> tuple[int, int]:
        """(shape class, texture class) of image ``index``; -1 where the cue is absent."""
        s = self.scene(index)
        return s.shape, s.texture

    @property
    def targets(self) -> list[int]:
        return [self.label(i) for i in range(self.size)]

    @property
    def cached(self) -> bool:
        return self._cached is not None

    def image(self, index: int) -> torch.Tensor:
        if self._cached is not None and not (self.resample and self.epoch > 0):
            return torch.from_numpy(np.array(self._cached[index]))  # a copy: the cache is a read-only map
        return torch.from_numpy(render_scene(self.scene(index), self.input_size))

    def __getitem__(self, index: int):
        return self.image(index), self.label(index)

    def label(self, index: int) -> int:
        """The class of item ``index`` (the shape class; in texture-only images the texture class). Drawn alone
        (``draw_class``) and kept for the split's fixed images, so a batch's labels cost no scene draws: drawing
        each item's whole scene for its label, as ``__getitem__`` did, cost the training loop 11.5 % over a bare loop
        (2-core Intel Xeon, RepLKNet-31B at widths 16-128, 64 px, batch 64; ``benchmarks/bench_train.py``)."""
        i = self._scene_index(index)
        if i >= self.size or self.size > LABEL_MEMO_MAX:  # a resampled epoch's new image, or a huge split
            return draw_class(self.split, i, self.num_classes, self.seed)
        if self._labels is None:
            self._labels = np.full(self.size, -1, np.int8)  # at most 12 classes
        if self._labels[i] < 0:
            self._labels[i] = draw_class(self.split, i, self.num_classes, self.seed)
        return int(self._labels[i])

    def describe(self) -> dict:
        return {"kind": "cue-world", "split": self.split, "size": self.size, "input_size": self.input_size,
                "num_classes": self.num_classes, "seed": self.seed, "resample": self.resample,
                "classes": self.classes}

    def cache_path(self) -> Path:
        from erf_lab.paths import cache_dir

        return (cache_dir() / "cue-world" / f"{self.split}-n{self.size}-c{self.num_classes}-s{self.seed}-"
                                            f"{self.input_size}px-{renderer_version()}.f32.npy")

    def _load_cache(self, show_progress: bool) -> np.ndarray:
        from erf_lab.io import load_cached_array, save_cached_array

        path, shape = self.cache_path(), (self.size, 3, self.input_size, self.input_size)
        arr = load_cached_array(path, shape, np.float32)  # None when missing or unreadable: render it again
        return arr if arr is not None else save_cached_array(path, self._render_all(show_progress))

    def _render_all(self, show_progress: bool) -> np.ndarray:
        """Every image of the split, (N, 3, S, S) float32; worker processes share the work for large splits."""
        from erf_lab.io import progress
        from erf_lab.train.stop import iterate

        # as many workers as torch has threads (a study running jobs with --threads 1 renders in each job)
        workers = min(torch.get_num_threads(), 8) if self.size * self.input_size ** 2 >= 256 * 64 * 64 else 0
        loader = torch.utils.data.DataLoader(_Renderer(self, self.input_size), batch_size=32,
                                             num_workers=workers if workers > 1 else 0)
        out = np.empty((self.size, 3, self.input_size, self.input_size), np.float32)
        done = 0
        for batch in progress(iterate(loader), total=len(loader), unit="batch",
                              desc=f"cue-world {self.split} (rendered once, then cached)",
                              disable=not show_progress):
            out[done:done + len(batch)] = batch.numpy()
            done += len(batch)
        return out


class _Renderer(torch.utils.data.Dataset):
    """The images of the split's epoch 0 (what the cache holds)."""

    def __init__(self, world: CueWorld, size: int):
        self.world, self.size = world, size

    def __len__(self):
        return self.world.size

    def __getitem__(self, i):
        return torch.from_numpy(render_scene(self.world.scene(i, epoch=0), self.size))


def render_batch(split: str, indices, input_size: int, num_classes: int = DEFAULT_NUM_CLASSES,
                 seed: int = 0) -> torch.Tensor:
    """Images ``indices`` of ``split`` as one (N, 3, S, S) tensor (no dataset object needed)."""
    return torch.stack([torch.from_numpy(render_scene(draw_scene(split, i, num_classes, seed), input_size))
                        for i in indices])


def plot_examples(stem: str | os.PathLike, num_classes: int = DEFAULT_NUM_CLASSES, input_size: int = 96,
                  seed: int = 0, per_class: int = 3) -> list[Path]:
    """Figure of the world: per class ``per_class`` training images, then one image of each probe split
    (shape-only and texture-only of that class, cue-conflict with that shape). Writes ``stem.png`` / ``.pdf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from erf_lab.io import figure_style, save_figure

    def first(split, pred):
        for i in range(10_000):
            sc = draw_scene(split, i, num_classes, seed)
            if pred(sc):
                return sc
        raise RuntimeError(f"no {split} example found")  # unreachable for num_classes <= 12

    cols = ["train"] * per_class + ["shape-only", "texture-only", "cue-conflict"]
    with figure_style():  # every erf-lab figure's font (erf_lab.io.FIGURE_FONT), as it is laid out
        fig, axes = plt.subplots(num_classes, len(cols), figsize=(1.3 * len(cols) + 1.6, 1.3 * num_classes),
                                 squeeze=False)
        for k in range(num_classes):
            train = [sc for sc in (draw_scene("train", i, num_classes, seed) for i in range(400)) if sc.shape == k]
            scenes = train[:per_class] + [first("shape-only", lambda s: s.shape == k),
                                          first("texture-only", lambda s: s.texture == k),
                                          first("cue-conflict", lambda s: s.shape == k)]
            for j, sc in enumerate(scenes):
                ax = axes[k, j]
                ax.imshow(render_scene(sc, input_size).transpose(1, 2, 0), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if cols[j] == "cue-conflict":
                    ax.set_xlabel(f"{SHAPES[sc.shape]} / {TEXTURES[sc.texture]}", fontsize=6)
                if k == 0:
                    ax.set_title(cols[j], fontsize=8)
            axes[k, 0].set_ylabel(f"{k}: {SHAPES[k]}\n{TEXTURES[k]}", fontsize=7)
        fig.suptitle(f"cue-world ({num_classes} classes, seed {seed}, {input_size} px)", fontsize=9)
        fig.tight_layout()
        try:
            return save_figure(fig, stem)
        finally:
            plt.close(fig)
