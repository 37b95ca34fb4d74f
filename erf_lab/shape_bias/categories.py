"""The 16 entry-level categories of Geirhos et al. (ICLR 2019) and the ImageNet-1k -> 16-class decision mapping.

The mapping is the one of model-vs-human (Geirhos et al., NeurIPS 2021): a category's score is the *mean*
softmax probability over its ImageNet classes; the decision is the category with the highest score.
"""
from __future__ import annotations

import functools
import json

import numpy as np

from erf_lab.paths import data_dir

CATEGORIES: tuple[str, ...] = (
    "airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat",
    "chair", "clock", "dog", "elephant", "keyboard", "knife", "oven", "truck",
)
#: model-vs-human's response of a subject who gave none: neither the shape nor the texture (a wrong trial)
NO_ANSWER = "na"


@functools.lru_cache(maxsize=1)
def category_table() -> dict[str, list[int]]:
    """``{category: [ImageNet-1k class indices]}`` from ``data/imagenet16_categories.json``."""
    raw = json.loads((data_dir() / "imagenet16_categories.json").read_text())["categories"]
    table = {c: [int(i) for i in raw[c]["imagenet_indices"]] for c in CATEGORIES}
    assert all(table[c] for c in CATEGORIES)
    return table


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names (first synonym) in index order, or ``str(i)`` when not available."""
    from erf_lab.paths import datasets_root

    root = datasets_root()
    path = root / "imagenet1k_wnids.txt" if root else None
    if path is None or not path.is_file():
        return tuple(str(i) for i in range(1000))
    names = []
    for line in path.read_text().splitlines():
        wnid, _, rest = line.partition(" ")
        names.append(rest.split(",")[0].strip() or wnid)
    return tuple(names) if len(names) == 1000 else tuple(str(i) for i in range(1000))


def aggregation_matrix(num_classes: int = 1000) -> np.ndarray:
    """``(num_classes, 16)`` matrix ``A`` with ``A[i, k] = 1/|C_k|`` for ImageNet class ``i`` in category ``k``,
    so ``probs @ A`` gives the mean probability of each category (model-vs-human's 16-class mapping)."""
    a = np.zeros((num_classes, len(CATEGORIES)), dtype=np.float64)
    for k, cat in enumerate(CATEGORIES):
        idx = category_table()[cat]
        a[idx, k] = 1.0 / len(idx)
    return a


def imagenet_to_16(probs: np.ndarray) -> np.ndarray:
    """Map ImageNet-1k softmax probabilities ``(N, 1000)`` (numpy, or a torch tensor: a model's output that requires
    grad too) to 16 category scores ``(N, 16)`` (mean per category)."""
    from erf_lab.errors import ErfLabError
    from erf_lab.io import as_array

    probs = as_array(probs).astype(np.float64, copy=False)
    if probs.ndim != 2 or probs.shape[1] != 1000:
        raise ErfLabError(f"expected (N, 1000) probabilities, got shape {probs.shape}")
    return probs @ aggregation_matrix(1000)


def decisions_from_scores(scores16: np.ndarray) -> list[str]:
    """Argmax over the 16 category scores -> category names (ties: first category in alphabetical order; exact
    ties have no fixed winner in model-vs-human, whose ``np.argsort`` is not a stable sort)."""
    return [CATEGORIES[i] for i in np.asarray(scores16).argmax(axis=1)]
