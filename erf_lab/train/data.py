"""Training data: the built-in cue-world, or a folder in the ImageFolder layout (``train/<class>/*``,
``val/<class>/*``, any format PIL opens). Images come out as float32 (3, S, S) in [0, 1]; the loop normalizes.

Folder augmentations are the standard light ones (random resized crop, scale 0.35-1, ratio 3/4-4/3, and a
horizontal flip; Szegedy et al. 2015), drawn from ``default_rng([seed, epoch, index])``: the same image gets the
same crop in a resumed run, whatever the worker count.
"""
from __future__ import annotations

import math
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erf_lab.errors import ErfLabError, NodeWarning, RankWarning
from erf_lab.io import refuse_empty

CUE_WORLD = "cue-world"


def per_cpu_cap() -> int:
    """The most data-loader workers or torch threads erf-lab accepts: 4 per CPU (more only queue for the CPUs)."""
    return 4 * (os.cpu_count() or 1)


def _jpeg_ends(path: Path) -> bool:
    """Whether the file ends with JPEG's end-of-image marker (a download cut short does not)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 2, 0))
        return f.read(2) == b"\xff\xd9"


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot open ``path`` as an image (one line), or None where it can. A pipe, device or socket is not
    opened (reading a pipe blocked the scan, and the training with it, for good). ``verify()`` does not decode JPEG
    data: a JPEG without its end marker (cut short, or with bytes after it) is decoded whole, so that a truncated
    one is skipped here rather than replaced by another image at every epoch."""
    from PIL import Image

    from erf_lab.erf.images import not_a_file_reason

    if not path.is_file():
        return not_a_file_reason(path)
    try:
        with Image.open(path) as im:
            jpeg = im.format == "JPEG"
            im.verify()
        if jpeg and not _jpeg_ends(path):
            with Image.open(path) as im:
                im.load()
        return None
    except Exception as e:  # PIL raises many types for corrupt / non-image files
        return _why(e)


def _why(e: Exception) -> str:
    """Why a file could not be read, in one line: the error's type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def to_rgb_array(image) -> np.ndarray:
    """PIL image -> uint8 (H, W, 3). 16/32-bit and float modes are scaled by their real range (``convert("RGB")``
    would clip them at 255). A palette image with transparency goes through RGBA, as PIL asks (the same pixels;
    straight to RGB, PIL warned the user to convert their images)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        return np.repeat(np.round(a * 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


class ImageFolderSplit(torch.utils.data.Dataset):
    """One split of an ImageFolder tree. Files PIL cannot open are left out at scan time and listed in
    ``skipped`` ([path relative to the dataset root, why], as ``erf-lab compute`` lists them); a file that fails
    later (truncated data) is replaced by the next readable image, warned about and listed in ``failed_loads``
    ([path relative to the dataset root, why, epoch counted from 1], in the process that loaded it: a DataLoader
    worker hands its own to the batches, :func:`collate_noting_failed_loads`)."""

    def __init__(self, root: Path, classes: list[str], files: list[tuple[Path, int]], skipped: list[list[str]],
                 input_size: int, train: bool, seed: int = 0):
        self.root, self.classes, self.files, self.skipped = root, classes, files, skipped
        self.input_size, self.train, self.seed, self.epoch = int(input_size), bool(train), int(seed), 0
        self.failed_loads: list[list] = []

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """sha256 of the class names and of every image's path (relative to the split) and label: what a resumed
        run must find again (a renamed class or another image set changes it; a file rewritten in place does not)."""
        import hashlib

        h = hashlib.sha256("\n".join(self.classes).encode())
        for path, label in self.files:
            h.update(f"\n{Path(path).relative_to(self.root).as_posix()}\t{label}".encode())
        return h.hexdigest()

    def file_list(self) -> dict:
        """``{"images": n, "sha256": ...}``: the split's image files by path (relative to the split), size and
        modification time (:func:`erf_lab.io.file_list_digest`; no image is read), which tells two runs' images
        apart where :meth:`fingerprint` (the names, what a resumed run must find again) does not."""
        from erf_lab.io import file_list_digest

        return {"images": len(self.files), "sha256": file_list_digest([p for p, _ in self.files], self.root)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def targets(self) -> list[int]:
        return [c for _, c in self.files]

    def __getitem__(self, index: int):
        for k in range(len(self.files)):
            path, label = self.files[(index + k) % len(self.files)]
            try:
                return self._load(path, (index + k) % len(self.files)), label
            except Exception as e:  # unreadable after all (e.g. a truncated JPEG passes the scan): say so, use the next
                self.failed_loads.append([Path(path).relative_to(self.root.parent).as_posix(), _why(e), self.epoch + 1])
                warnings.warn(f"cannot read {path} ({e}); the next image is used in its place", RankWarning)
        raise ErfLabError(f"no image of {self.root} could be read")

    def _load(self, path: Path, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            rgb = Image.fromarray(to_rgb_array(im))
        s = self.input_size
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            box = _random_resized_box(rgb.width, rgb.height, rng)
            rgb = rgb.resize((s, s), Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                rgb = rgb.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # resize the short side to S / 0.875, centre crop S (the usual ImageNet evaluation)
            short = round(s / 0.875)
            scale = short / min(rgb.width, rgb.height)
            w, h = max(s, round(rgb.width * scale)), max(s, round(rgb.height * scale))
            rgb = rgb.resize((w, h), Image.BILINEAR)
            left, top = (w - s) // 2, (h - s) // 2
            rgb = rgb.crop((left, top, left + s, top + s))
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)


def collate_noting_failed_loads(samples):
    """``(images, labels, failed)``: the batch as DataLoader's default collates it, and in a DataLoader worker the
    ``failed_loads`` of its copy of the dataset since its last batch (taken from it; they were lost with the worker
    before). In the main process (``num_workers=0``) ``failed`` is empty: the dataset keeps its own."""
    x, y = torch.utils.data.default_collate(samples)
    worker = torch.utils.data.get_worker_info()
    if worker is None:
        return x, y, []
    dataset = getattr(worker.dataset, "dataset", worker.dataset)  # the split a Subset takes its items from
    failed = getattr(dataset, "failed_loads", None)
    taken = list(failed or [])
    if failed:
        failed.clear()
    return x, y, taken


def unique_failed_loads(*lists) -> list[list]:
    """The entries ([file, why, epoch]) of ``lists`` once each, by epoch and file: a load retried (a resumed run
    replays the steps after its last save; the EMA model is evaluated on the same images) is one failure."""
    seen = {}
    for entries in lists:
        for f in entries or ():
            seen.setdefault((int(f[2]), str(f[0]), str(f[1])), [str(f[0]), str(f[1]), int(f[2])])
    return [seen[k] for k in sorted(seen)]


def _random_resized_box(w: int, h: int, rng: np.random.Generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (x0, y0, x0 + cw, y0 + ch)
    side = min(w, h)  # fall back to the central square
    return ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)


def _scan_split(root: Path, split: str) -> tuple[dict[str, list[Path]], list[list[str]]]:
    """({class folder: its readable images}, [[file relative to ``root``, why it was skipped], ...]); a class folder
    with no readable image maps to an empty list."""
    from erf_lab.erf.images import list_image_files

    folder = root / split
    if not folder.is_dir():
        raise ErfLabError(f"{root} has no {split}/ folder (expected the ImageFolder layout {split}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    found, skipped = {}, []
    for c in classes:
        images, others = list_image_files(folder / c)
        good = []
        for p in images + others:  # any format PIL opens, whatever its extension
            why = _unreadable(p)
            if why is None:
                good.append(p)
            else:
                skipped.append([str(p.relative_to(root)), why])
        found[c] = good
    if not any(found.values()):
        raise ErfLabError(f"{folder} holds no readable image in class folders (ImageFolder layout: "
                          f"{split}/<class>/<image>)" + (f"; {len(skipped)} unreadable file(s)" if skipped else ""))
    return found, skipped


def image_folder(root: str | os.PathLike, input_size: int,
                 seed: int = 0) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """(train, val) splits of an ImageFolder tree; ErfLabError for a missing / empty split, a class folder without
    a readable image, a class present in only one split or a single class."""
    refuse_empty(root, "--data", "name a folder with train/ and val/, or 'cue-world'")  # Path("") is "."
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ErfLabError(f"--data: no such folder: {root}" if not root.exists()
                          else f"--data must be a folder (with train/ and val/) or 'cue-world', got a file: {root}")
    train, train_skipped = _scan_split(root, "train")
    val, val_skipped = _scan_split(root, "val")
    # a class folder without a readable image is refused (as torchvision's ImageFolder does), not left out: left
    # out, it renumbered every class after it against the sorted folder names, without a word
    for split, found, skipped in (("train", train, train_skipped), ("val", val, val_skipped)):
        empty = [c for c, images in found.items() if not images]
        if empty:
            bad = sum(Path(f).parts[1] == empty[0] for f, _ in skipped)
            raise ErfLabError(f"{root}: class folder '{split}/{empty[0]}' holds no readable image"
                              + (f" (only {bad} unreadable file(s))" if bad else "")
                              + (f", nor do {len(empty) - 1} other(s) in {split}/" if len(empty) > 1 else "")
                              + "; every class needs images in both train/ and val/: add images or remove the folder "
                                "(left out, it would renumber the classes after it)")
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    if only_train or only_val:
        where = (f"{only_train[0]!r} is only in train/" if only_train else f"{only_val[0]!r} is only in val/")
        # the same name in other code points (é as one, or as e + a combining accent: macOS writes the latter) looks
        # the same in the message, which then seemed wrong
        nfc = {unicodedata.normalize("NFC", c): c for c in only_val}
        twin = next(((c, nfc[n]) for c in only_train if (n := unicodedata.normalize("NFC", c)) in nfc), None)
        if twin:
            raise ErfLabError(f"{root}: class folders train/{twin[0]} and val/{twin[1]} have the same name in other "
                              f"Unicode code points ({ascii(twin[0])} and {ascii(twin[1])}, e.g. one copied from "
                              f"macOS), so they are read as two classes; rename one as the other")
        raise ErfLabError(f"{root}: class {where} ({len(only_train) + len(only_val)} class(es) in one split only); "
                          f"every class needs images in both train/ and val/")
    classes = sorted(train)
    if len(classes) < 2:
        raise ErfLabError(f"{root}: only one class ({classes[0]!r}); training a classifier needs at least 2 class "
                          f"folders with images in train/ and val/")
    idx = {c: i for i, c in enumerate(classes)}
    total_skipped = len(train_skipped) + len(val_skipped)
    if total_skipped:
        first, why = (train_skipped + val_skipped)[0]
        warnings.warn(f"skipped {total_skipped} unreadable file(s) in {root} (e.g. {first}: {why}; all of them in "
                      f"run.json's skipped)", NodeWarning)
    return (ImageFolderSplit(root / "train", classes, [(p, idx[c]) for c in classes for p in train[c]],
                             train_skipped, input_size, train=True, seed=seed),
            ImageFolderSplit(root / "val", classes, [(p, idx[c]) for c in classes for p in val[c]],
                             val_skipped, input_size, train=False, seed=seed))


@dataclass
class Data:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    classes: list[str]
    description: dict


def build_data(data: str, input_size: int, *, train_size: int = 2000, val_size: int = 500,
               num_classes: int = 10, seed: int = 0, resample: bool = False, show_progress: bool = False) -> Data:
    """``data`` = ``"cue-world"`` (sizes, classes, world seed and ``resample``: new training images every epoch,
    from the keywords; both splits rendered once into the erf-lab cache, see ``CueWorld``) or an ImageFolder
    root."""
    if str(data) == CUE_WORLD:
        from erf_lab.train.cue_world import CueWorld

        kw = dict(num_classes=num_classes, seed=seed, cache=True, show_progress=show_progress)
        tr = CueWorld("train", train_size, input_size, resample=resample, **kw)
        va = CueWorld("val", val_size, input_size, **kw)
        # the world draws every class alike: guessing (1 / classes) is the floor of a val accuracy
        return Data(tr, va, tr.classes, {"kind": CUE_WORLD, "train_size": tr.size, "val_size": va.size,
                                         "num_classes": tr.num_classes, "world_seed": seed, "resample": resample,
                                         "classes": tr.classes, "chance_val_acc": 1 / tr.num_classes})
    if resample:
        raise ErfLabError("--resample is a cue-world option (a folder dataset has a fixed set of images)")
    tr, va = image_folder(data, input_size, seed=seed)
    train_counts, val_counts = (np.bincount(s.targets, minlength=len(tr.classes)).tolist() for s in (tr, va))
    return Data(tr, va, tr.classes, {"kind": "folder", "root": str(Path(data).expanduser().resolve()),
                                     "train_size": len(tr), "val_size": len(va), "num_classes": len(tr.classes),
                                     "classes": tr.classes, "chance_val_acc": 1 / len(tr.classes),
                                     # uneven classes: the val accuracy of always answering the class with the most
                                     # training images is the floor a trained model's accuracy means something above
                                     "train_per_class": dict(zip(tr.classes, train_counts)),
                                     "val_per_class": dict(zip(va.classes, val_counts)),
                                     "majority_class_val_acc": val_counts[int(np.argmax(train_counts))] / len(va),
                                     # which files (path, size, time) each split held when this session read them
                                     "train_files": tr.file_list(), "val_files": va.file_list(),
                                     "skipped_train": tr.skipped, "skipped_val": va.skipped})
