"""Run a classifier on the cue-conflict, edge and silhouette stimuli and compute its shape bias.

Decisions follow model-vs-human (Geirhos et al., NeurIPS 2021): ImageNet-1k softmax -> mean probability per
16-class category -> argmax; a model with a 16-way head is read directly.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError
from erf_lab.provenance import finished, host, now, versions
from erf_lab.shape_bias.analysis import (CHANCE_SHAPE_OR_TEXTURE, add_consistency, check_human_data,
                                         degenerate_warnings, shape_bias_from_decisions, write_mvh_csv)
from erf_lab.shape_bias.consistency import MVH_DATASETS, image_id, subject_tag
from erf_lab.shape_bias.categories import CATEGORIES, imagenet_class_names, imagenet_to_16
from erf_lab.shape_bias.stimuli import (DecodedCache, Preprocess, Stimulus, StimulusDataset, StimulusPixels,
                                        files_fingerprint, find_stimuli_root, list_stimuli, sibling_set)

RANDOM_SUFFIX = "-random-init"


def default_workers() -> int:
    """Decode workers beside inference (on CUDA, where they overlap the device's work): half the CPUs (1 on 2
    cores, at most 4), leaving the rest to the inference threads. (CPU inference decodes first: decode_all.)
    On 2 busy cores 1 worker kept the pipeline within 1.04-1.09x of pure inference while inference paid page
    faults; with freed memory kept (inference 2.5-3x faster, EfficientNet-Lite0 batch 32: 54-75 img/s) the
    pipeline runs 37-43 img/s with 0, 1 or 2 workers alike (1.3-1.7x): decoding and resizing a stimulus takes
    4.6 ms of one core, which the inference threads now need."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class SetResult:
    """Per-image outputs on one stimulus set."""
    name: str
    stimuli: list[Stimulus]
    scores16: np.ndarray            # (N, 16) category scores (mean probability; or 16-way softmax)
    top_index: np.ndarray           # (N,) argmax of the raw head (ImageNet index for 1000-way heads)
    ok: np.ndarray                  # (N,) bool: image decoded
    errors: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    head_size: int = 1000

    @property
    def decisions(self) -> list[str | None]:
        return [CATEGORIES[int(k)] if ok else None for k, ok in zip(self.scores16.argmax(1), self.ok)]

    def accuracy(self) -> float | None:
        hits = [d == s.shape for d, s, ok in zip(self.decisions, self.stimuli, self.ok) if ok]
        return float(np.mean(hits)) if hits else None


def refuse_allow_random_for_trained(weights, random_weights: bool, allow_random: bool) -> None:
    """ErfLabError for ``--allow-random`` with a weights file that is not marked as a random initialisation: the
    option would be ignored, and the run is of trained weights, not the untrained one asked for."""
    if allow_random and weights is not None and not random_weights:
        from erf_lab.checkpoint import resolve_weights

        try:
            if not resolve_weights(weights)[0].is_file():
                return  # reported as missing where the weights are loaded
        except ErfLabError:
            return
        raise ErfLabError(f"--allow-random is for untrained weights, and {weights} holds trained ones (no random-init "
                          f"mark): drop --allow-random")


def refuse_other_classes(weights) -> None:
    """ErfLabError for weights of a classifier ``erf-lab train`` trained on a folder whose classes are not what the
    probe reads its outputs as: 16 outputs as model-vs-human's categories in their order, 1000 as ImageNet-1k's (its
    sorted synset folders). A folder of 16 other classes had its class 0 read as 'airplane', and a shape bias
    reported. Weights whose classes are not recorded (ImageNet weights, a cue-world run's) pass."""
    if weights is None:
        return
    from erf_lab.checkpoint import resolve_weights, training_classes

    try:
        if not resolve_weights(weights)[0].is_file():
            return  # reported as missing where the weights are loaded
    except ErfLabError:
        return
    classes, where = training_classes(weights)
    if classes is None or len(classes) not in (len(CATEGORIES), 1000):
        return  # another head size is refused where the outputs are read
    if classes == list(CATEGORIES) or (len(classes) == 1000 and classes == sorted(classes)
                                       and all(re.fullmatch(r"n\d{8}", c) for c in classes)):
        return
    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    expected = (f"model-vs-human's 16 categories in their order ({', '.join(CATEGORIES[:3])}, ...)"
                if len(classes) == len(CATEGORIES) else "ImageNet-1k's classes (its synset folders n########)")
    raise ErfLabError(f"{weights} was trained on a folder whose {len(classes)} classes ({shown}; from {where}) are "
                      f"not {expected}: the probe would read its class {classes[0]!r} as "
                      f"{CATEGORIES[0] if len(classes) == len(CATEGORIES) else 'ImageNet class 0'!r}, and its shape "
                      f"bias would mean nothing")


def check_finite_outputs(logits: torch.Tensor, what: str) -> None:
    """ErfLabError where the model's outputs on ``what`` are NaN or infinite: its argmax would be read as a
    decision (class 0) and a shape bias reported from weights that compute nothing."""
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        rows = logits.reshape(logits.shape[0], -1) if logits.ndim else logits.reshape(1, 1)
        bad = int((~torch.isfinite(rows)).any(-1).sum())
        raise ErfLabError(f"the model's outputs are not finite (NaN or inf) on {bad} of {len(rows)} {what} in a "
                          f"batch (the run stops at the first such batch): its weights compute nothing usable (a "
                          f"diverged training run or a corrupt checkpoint?)")


def logits_to_scores16(logits: torch.Tensor) -> np.ndarray:
    """Head output -> 16 category scores: 1000-way via the mean-probability mapping, 16-way via softmax.

    The softmax is taken in float64: in float32 every probability more than ~104 below the top logit underflows to
    exactly 0, so an image whose top class lies in none of the 16 categories (e.g. logit 120 on "tench", 10 on
    every dog class) got 16 scores of 0, a tie that argmax gave to "airplane"; float64 keeps them apart up to a gap
    of ~745 (and changes the others only in the last float32 bits)."""
    n = logits.shape[-1]
    probs = torch.softmax(logits.detach().double(), dim=-1).cpu().numpy()
    if n == 1000:
        return imagenet_to_16(probs)
    if n == len(CATEGORIES):
        return probs
    raise ErfLabError(f"model head has {n} outputs; shape-bias probes need a 1000-way ImageNet or a 16-way head")


class PartialSet:
    """The scores of a set's images so far, kept in ``path`` (``.npz``, written atomically at most every
    ``SAVE_SECONDS`` and when the run stops early) so that a rerun into the same folder goes on where an interrupted
    one stopped. ``key`` (weights, preprocessing, files, device) must match, else the set starts again."""

    SAVE_SECONDS = 30.0

    def __init__(self, path: Path | None, key: str, n: int):
        """``path`` None: kept in memory only."""
        self.path, self.key, self.saved = path, key, time.monotonic()
        self.scores, self.top = np.zeros((n, len(CATEGORIES))), np.full(n, -1, dtype=np.int64)
        self.ok, self.done = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        self.errors: dict[int, str] = {}
        self.head_size = 1000
        self.resumed = 0
        if path is None:
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["key"]) == key and z["scores"].shape == self.scores.shape:
                    self.scores, self.top, self.ok, self.done = (z[k].copy() for k in ("scores", "top", "ok", "done"))
                    self.errors = {int(i): str(e) for i, e in json.loads(str(z["errors"]))}
                    self.head_size = int(z["head_size"])
                    self.resumed = int(self.done.sum())
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # no state, or one of another run / unreadable: start the set again

    def save(self, force: bool = False) -> None:
        if self.path is None or not force and time.monotonic() - self.saved < self.SAVE_SECONDS:
            return
        from erf_lab.io import atomic_path

        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=self.key, scores=self.scores, top=self.top, ok=self.ok, done=self.done,
                     errors=json.dumps(sorted(self.errors.items())), head_size=self.head_size)
        self.saved = time.monotonic()


def remove_partial_sets(folder) -> None:
    """Remove the :class:`PartialSet` files that :func:`evaluate` kept in ``folder`` (its outputs are written)."""
    for f in Path(folder).glob(".partial-*.npz"):
        f.unlink(missing_ok=True)


def run_set(model: nn.Module, name: str, stimuli: list[Stimulus], preprocess: Preprocess, *, batch_size: int = 32,
            workers: int | None = None, device: str = "cpu", show_progress: bool = True,
            cache: bool = True, partial: PartialSet | None = None, on_progress=None) -> SetResult:
    """Batched inference under ``torch.inference_mode`` on the stimuli's pixels, which come from

    - the :class:`DecodedCache` of an earlier run on the same files (``cache``: read it, and write it after a
      first run whose images all decode to 8-bit RGB);
    - on CPU, else: all images decoded first, in ``workers`` processes (default: one per torch thread, up to 8),
      then inference on every core. Decoding beside inference made the two fight for the cores: EfficientNet-Lite0,
      256 stimuli on the 2-core dev box, 1.50x the time of pure inference against 1.1-1.2x this way;
    - on CUDA (or a set over ``DECODED_CACHE_MAX_BYTES``): decoded in ``workers`` DataLoader processes (default
      half the CPUs) while the device runs the batches before (this path reads the cache but does not write it).
    ``SetResult.seconds`` counts decoding. ``partial``: images it holds as done are not run again, and the
    scores go there as they come (an interrupted run resumes); the caller removes it once its outputs are
    written. ``on_progress(name, done, total)`` is called after every batch (the app's progress bar).
    The images go in the model's precision (a float64 or bfloat16 model gets float64 or bfloat16 inputs); the
    model runs in eval mode and is given back in the train / eval modes it came in, whatever happens."""
    from erf_lab.erf.prepare import eval_mode, keep_freed_memory, param_dtype
    from erf_lab.io import progress
    from erf_lab.train.stop import die_with_parent, iterate, stop_handling

    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        keep_freed_memory()  # the activations of a batch at 224 px: 25-100 MB tensors, fresh pages every layer
    n = len(stimuli)
    t0 = time.perf_counter()  # decoding counts, as it did when workers decoded beside the batches
    decoded = DecodedCache(stimuli, preprocess)
    pixels = decoded.load() if cache else None
    others: dict[int, torch.Tensor] = {}  # decoded images that uint8 cannot hold (high bit depth)
    failed: dict[int, str] = {}
    if pixels is None and on_cpu and decoded.fits:
        pixels, others, failed = decode_all(stimuli, preprocess, workers=workers, desc=f"{name}: decoding",
                                            show_progress=show_progress)
        if cache and not others and not failed:
            pixels = decoded.save(pixels)
    st = partial if partial is not None else PartialSet(None, "", n)
    todo = np.flatnonzero(~st.done)
    if pixels is not None:
        starts = [i for i in range(0, n, batch_size) if not st.done[i:i + batch_size].all()]
        batches = (_pixel_batch(pixels, others, failed, i, min(n, i + batch_size)) for i in starts)
    else:
        dataset = StimulusDataset(stimuli, preprocess)
        batches = torch.utils.data.DataLoader(dataset if len(todo) == n else torch.utils.data.Subset(dataset, todo),
                                              batch_size=batch_size, shuffle=False,
                                              num_workers=default_workers() if workers is None else workers,
                                              pin_memory=device.startswith("cuda"), persistent_workers=False,
                                              worker_init_fn=functools.partial(die_with_parent, os.getpid()))
        batches = iterate(batches)  # Ctrl-C never cuts the workers' start or a batch's transfer in half
    dtype = param_dtype(model)
    wide = torch.promote_types(dtype, torch.float32)  # normalized in float32 at least, then in the model's dtype
    finished = False
    try:
        # closing: a stop in the loop body comes from outside the generator, whose clean-up (the DataLoader's
        # workers shut down) must not wait for the traceback to be collected: the process may end first (exit_now)
        with eval_mode(model), stop_handling(), contextlib.closing(batches), torch.inference_mode(), \
                progress(total=n, initial=n - len(todo), desc=f"{name}", unit="img", disable=not show_progress) as bar:
            for x, idx, good, err in batches:
                logits = model(preprocess.normalize(x.to(device, wide, non_blocking=True)).to(dtype))
                if logits.ndim != 2:
                    raise ErfLabError(f"model output has shape {tuple(logits.shape)}; expected (batch, classes)")
                check_finite_outputs(logits[good.bool()], f"{name} image(s)")
                s = logits_to_scores16(logits)
                st.head_size = logits.shape[-1]
                idx = idx.numpy()
                good = good.numpy().astype(bool)
                st.scores[idx] = s
                st.top[idx] = logits.argmax(-1).cpu().numpy()
                st.ok[idx] = good
                for i, g, e in zip(idx, good, err):
                    if not g:
                        st.errors[int(i)] = e
                        warnings.warn(f"cannot decode {stimuli[int(i)].path}: {e}", stacklevel=2)
                st.done[idx] = True
                bar.update(len(idx))
                st.save()
                if on_progress is not None:
                    on_progress(name, int(st.done.sum()), n)
        finished = True
    finally:
        with contextlib.nullcontext() if finished else contextlib.suppress(OSError):  # keep the first error
            st.save(force=True)
    st.top[~st.ok] = -1
    return SetResult(name, stimuli, st.scores, st.top, st.ok, st.errors, time.perf_counter() - t0, st.head_size)


def decode_workers() -> int:
    """Processes that decode a whole set before CPU inference: as many as torch has threads, at most 8 (as the
    cue-world renderer); 0 (this process) with one thread, e.g. in a study's ``--threads 1`` jobs."""
    n = min(torch.get_num_threads(), 8)
    return n if n > 1 else 0


def decode_all(stimuli: list[Stimulus], preprocess: Preprocess, *, workers: int | None = None,
               desc: str = "decoding", show_progress: bool = False
               ) -> tuple[np.ndarray, dict[int, torch.Tensor], dict[int, str]]:
    """Every stimulus decoded, resized and cropped, in ``workers`` processes (default :func:`decode_workers`):
    (uint8 pixels (N, 3, H, W), {i: float pixels} of the images uint8 cannot hold exactly (zeros in the array),
    {i: error} of the undecodable ones (zeros)). 256 stimuli at 224 px on the 2-core dev box: 1.25-1.4 s in
    one process, 0.8 s in two."""
    from erf_lab.io import progress
    from erf_lab.train.stop import die_with_parent, iterate, stop_handling

    workers = decode_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(StimulusPixels(stimuli, preprocess), batch_size=16, shuffle=False,
                                         num_workers=workers if len(stimuli) > 16 else 0, collate_fn=list,
                                         worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    h, w = preprocess.size
    pixels = np.zeros((len(stimuli), 3, h, w), np.uint8)
    others: dict[int, torch.Tensor] = {}
    failed: dict[int, str] = {}
    with stop_handling(), progress(total=len(stimuli), desc=desc, unit="img", disable=not show_progress) as bar:
        for batch in iterate(loader):  # Ctrl-C never cuts the workers' start or a batch's transfer in half
            for i, px, err in batch:
                if px is None:
                    failed[i] = err
                elif px.dtype == np.uint8:
                    pixels[i] = px
                else:
                    others[i] = torch.from_numpy(px)
            bar.update(len(batch))
    return pixels, others, failed


def _pixel_batch(pixels: np.ndarray, others: dict[int, torch.Tensor], failed: dict[int, str], start: int, stop: int):
    """Images [start, stop) of decoded pixels as a loader batch (pixels in [0, 1], indices, ok, errors):
    ``uint8 / 255``, bit for bit what :class:`StimulusDataset` gives."""
    x = torch.from_numpy(np.array(pixels[start:stop])).float().div_(255.0)
    for i, px in others.items():
        if start <= i < stop:
            x[i - start] = px
    good = torch.tensor([i not in failed for i in range(start, stop)])
    return x, torch.arange(start, stop), good, [failed.get(i, "") for i in range(start, stop)]


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, shapes, bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluate(model: nn.Module, stimuli_dir=None, *, batch_size: int = 32, workers: int | None = None,
             device: str = "cpu", limit: int | None = None, show_progress: bool = True,
             preprocess: Preprocess | None = None, cache: bool = True, partial_dir=None, on_progress=None) -> dict:
    """Shape bias of ``model`` on the cue-conflict set (plus edge / silhouette accuracy when those sets are
    beside it). Returns ``{"summary": dict, "sets": {name: SetResult}}``; writes nothing but the decoded
    stimuli's cache (:class:`DecodedCache`; ``cache=False``: nothing) and, with ``partial_dir``, each set's
    :class:`PartialSet` there (a rerun with the same weights, preprocessing, files and device resumes; the
    caller removes them, :func:`remove_partial_sets`, once its outputs are written)."""
    from erf_lab.erf.prepare import on_device

    cue_dir = find_stimuli_root(stimuli_dir)
    preprocess = preprocess or Preprocess.from_model(model)
    weights_id = state_dict_sha256(model) if partial_dir is not None else None
    with on_device(model, device):  # the caller's model is given back where it was, also when a set fails
        sets, skipped, resumed = _evaluate_sets(model, cue_dir, preprocess, weights_id, batch_size=batch_size,
                                                workers=workers, device=device, limit=limit,
                                                show_progress=show_progress, cache=cache, partial_dir=partial_dir,
                                                on_progress=on_progress)
    cue = sets["cue-conflict"]
    rows = [(s.shape, s.texture, d) for s, d, ok in zip(cue.stimuli, cue.decisions, cue.ok) if ok]
    summary = shape_bias_from_decisions(rows)
    if summary["n_conflict"] == 0:
        raise ErfLabError(f"no decodable cue-conflict images (shape differs from texture) in {cue_dir}")
    undecodable = [{"file": str(r.stimuli[i].path), "reason": e, "set": name}
                   for name, r in sets.items() for i, e in sorted(r.errors.items())]
    summary.update({
        "warnings": degenerate_warnings(rows),
        "chance_shape_or_texture": CHANCE_SHAPE_OR_TEXTURE,
        "n_images": {name: len(r.stimuli) for name, r in sets.items()},
        "edge_accuracy": sets["edges"].accuracy() if "edges" in sets else None,
        "silhouette_accuracy": sets["silhouettes"].accuracy() if "silhouettes" in sets else None,
        "cue_conflict_accuracy_nonconflict": _nonconflict_accuracy(cue),
        "skipped_files": skipped,
        "undecodable_files": undecodable,
        "n_skipped": len(skipped) + len(undecodable),
        "preprocessing": preprocess.as_dict(),
        "stimuli_dir": str(cue_dir),
        "resumed_images": resumed,
        **({"state_dict_sha256": weights_id} if weights_id else {}),
        "limit": limit,
        "seconds": {name: round(r.seconds, 2) for name, r in sets.items()},
        "images_per_second": round(sum(len(r.stimuli) - resumed.get(name, 0) for name, r in sets.items())
                                   / max(1e-9, sum(r.seconds for r in sets.values())), 1),
    })
    return {"summary": summary, "sets": sets}


def _evaluate_sets(model, cue_dir, preprocess, weights_id, *, batch_size, workers, device, limit, show_progress,
                   cache, partial_dir, on_progress):
    """:func:`evaluate`'s inference: ``(sets, skipped files, resumed images per set)``."""
    sets, skipped, resumed = {}, [], {}
    for name, d in (("cue-conflict", cue_dir), ("edges", sibling_set(cue_dir, "edges")),
                    ("silhouettes", sibling_set(cue_dir, "silhouettes"))):
        if d is None:
            continue
        stim, sk = list_stimuli(d, limit if name == "cue-conflict" or limit is None else max(16, limit // 8))
        skipped += [dict(s, set=name) for s in sk]
        partial = None
        if partial_dir is not None:
            key = hashlib.sha256(json.dumps({"weights": weights_id, "preprocess": preprocess.as_dict(),
                                             "files": files_fingerprint(stim), "device": torch.device(device).type}
                                            ).encode()).hexdigest()
            partial = PartialSet(Path(partial_dir) / f".partial-{name}.npz", key, len(stim))
            resumed[name] = partial.resumed
        sets[name] = run_set(model, name, stim, preprocess, batch_size=batch_size, workers=workers, device=device,
                             show_progress=show_progress, cache=cache, partial=partial, on_progress=on_progress)
    return sets, skipped, resumed


def _nonconflict_accuracy(r: SetResult) -> float | None:
    hits = [d == s.shape for s, d, ok in zip(r.stimuli, r.decisions, r.ok) if ok and s.shape == s.texture]
    return float(np.mean(hits)) if hits else None


def write_decisions_csv(path, sets: dict[str, SetResult]) -> None:
    """One row per image: set, image, shape, texture, decision, top ImageNet class, the 16 category scores."""
    from erf_lab.io import atomic_path

    names = imagenet_class_names()
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", "image", "shape", "texture", "decision", "top_class_index", "top_class"] +
                   [f"score_{c}" for c in CATEGORIES])
        for name, r in sets.items():
            for i, (s, d) in enumerate(zip(r.stimuli, r.decisions)):
                t = int(r.top_index[i])
                cls = "" if t < 0 else (CATEGORIES[t] if r.head_size == len(CATEGORIES) else names[t])
                w.writerow([name, s.name, s.shape, s.texture, d or "", t, cls] +
                           ([f"{v:.6g}" for v in r.scores16[i]] if r.ok[i] else [""] * len(CATEGORIES)))


def _decoded(sets: dict[str, SetResult]) -> dict[str, list[tuple[str, str, str]]]:
    """``{model-vs-human dataset: [(file name, category, decision)]}`` of the decoded images."""
    return {MVH_DATASETS[name]: [(s.name, s.shape, d) for s, d, ok in zip(r.stimuli, r.decisions, r.ok) if ok]
            for name, r in sets.items() if name in MVH_DATASETS}


def model_trials(sets: dict[str, SetResult]) -> dict[str, dict]:
    """``{model-vs-human dataset: {image id: (category, decision)}}`` of the decoded images, keyed as the human
    trials are (``image_id``: model-vs-human's own file names carry a trial prefix)."""
    return {ds: {image_id(name): (shape, d) for name, shape, d in rows} for ds, rows in _decoded(sets).items()}


def write_mvh_csvs(out: Path, subject: str, sets: dict[str, SetResult]) -> list[str]:
    """One model-vs-human CSV per stimulus set (``<dataset>_<subject>_session-1.csv``, model-vs-human's raw-data
    naming with the subject as :func:`subject_tag` writes it: ``timm/resnet18`` is ``timm-resnet18`` there); returns
    the file names."""
    names = []
    tag = subject_tag(subject)
    for ds, rows in _decoded(sets).items():
        names.append(f"{ds}_{tag}_session-1.csv")
        write_mvh_csv(out / names[-1], subject, *zip(*rows) if rows else ([], [], []))
    return names


def load_model(name: str, weights=None, pretrained: bool = False, overrides: dict | None = None) -> nn.Module:
    from erf_lab.models import create_model

    kwargs = dict(overrides or {})
    if pretrained:
        kwargs["pretrained"] = True
    return create_model(name, weights=weights, **kwargs)


def run_shape_bias(model_name: str, *, out, weights=None, pretrained: bool = False, overrides: dict | None = None,
                   stimuli=None, batch_size: int = 32, workers: int | None = None, device: str = "cpu",
                   limit: int | None = None, show_progress: bool = True, command: list[str] | None = None,
                   model: nn.Module | None = None, allow_random: bool = False, cache: bool = True,
                   crop_pct: float | None = 1.0, seed: int = 0, with_humans: bool = True, on_progress=None) -> dict:
    """Evaluate a zoo model and write ``decisions.csv``, ``summary.json``, ``run.json``, the model-vs-human CSV
    and the shape-bias figure (PNG + PDF) into ``out``. Returns the summary.

    Without ``weights`` or ``pretrained`` the network is untrained and its shape bias means nothing: refused
    (``ErfLabError``) unless ``allow_random``, and then marked everywhere (``random_weights`` in summary.json,
    ``-random-init`` in the CSV's subject, "(random init)" in the label). A caller passing its own ``model``
    vouches for its weights; it passes ``allow_random=True`` when they are random. ``crop_pct``: see
    :meth:`Preprocess.from_model` (1.0: model-vs-human's whole stimuli; None: the model's own crop). ``seed``
    seeds the model's initialisation (a random init is then the same network every run). ``with_humans=False``
    leaves the human data out (no reference shape bias, no consistency with the subjects, none in the figure)."""
    from erf_lab.checkpoint import random_init_of
    from erf_lab.io import (hold_folder, prepare_out_dir, refuse_other_result, remove_earlier_outputs, sha256_file,
                            write_json)
    from erf_lab.shape_bias.plotting import plot_error_consistency, plot_shape_bias

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ErfLabError("--device cuda requested but no CUDA device is available")
    started, start_time = time.monotonic(), now()
    if batch_size < 1:
        raise ErfLabError("--batch-size must be >= 1")
    if limit is not None and limit < 1:
        raise ErfLabError("--limit must be >= 1")
    # no weights, or a file marked untrained (reparam of a random init); a caller's own model vouches for itself
    init = random_init_of(weights, pretrained=pretrained, seed=seed) if weights or model is None or allow_random \
        else None
    random_weights = init is not None
    refuse_allow_random_for_trained(weights, random_weights, allow_random)
    if random_weights and not allow_random:
        why = f"{weights} holds a random initialisation" if weights else f"{model_name} has no trained weights"
        raise ErfLabError(f"{why}: pass --weights FILE (.pth/.pt/.safetensors) of a trained model or "
                          f"--pretrained (published ImageNet weights, e.g. efficientnet_lite0); a shape bias of "
                          f"random weights means nothing (--allow-random measures one anyway, marked untrained)")
    refuse_other_classes(weights)
    from erf_lab.train.data import per_cpu_cap

    if workers is not None and not 0 <= workers <= per_cpu_cap():  # each one a process
        raise ErfLabError(f"--workers must be >= 0 and at most {per_cpu_cap()} (4 per CPU of this machine), got "
                          f"{workers}")
    # fail fast, before building the model: stimuli that are not there, and human data (found beside them) that
    # would be refused after minutes of inference, with --out made
    check_human_data(find_stimuli_root(stimuli).parent, with_humans)
    if model is None:
        torch.manual_seed(seed)
        model = load_model(model_name, weights, pretrained, overrides)
        random_head = list(getattr(model, "random_init_keys", None) or [])
        if random_head:  # e.g. --pretrained with another num_classes: trained features, an untrained classifier
            raise ErfLabError(f"the classifier of {model_name} ({', '.join(random_head)}) is at its random "
                              "initialisation (the weights' classifier has another class count): a shape bias "
                              "needs a trained classifier; drop --override num_classes")
    refuse_other_result(out, "shape-bias")
    out = prepare_out_dir(out)  # before minutes of inference; after the model, so a bad file leaves no folder
    # held while it writes: a second erf-lab process evaluating into it meanwhile (the same command again in another
    # shell, to resume a run that still goes) would write the same partial scores and outputs
    with hold_folder(out):  # and the temporary files of a run killed while it wrote go
        result = evaluate(model, stimuli, batch_size=batch_size, workers=workers, device=device, limit=limit,
                          show_progress=show_progress, cache=cache, preprocess=Preprocess.from_model(model, crop_pct),
                          partial_dir=out, on_progress=on_progress)
        summary = result["summary"]
        cfg = dict(getattr(model, "default_cfg", None) or {})
        label = model_name + ("" if weights is None else f" ({Path(weights).name})")
        summary = {"model": model_name, "label": label + (" (random init)" if random_weights else ""),
                   "random_weights": random_weights,
                   "seed": init["seed"] if random_weights else None,
                   "weights": None if weights is None else str(weights),
                   "weights_sha256": None if weights is None else sha256_file(weights),
                   "weights_selection": getattr(model, "weights_selection", None),  # which part of the file loaded
                   "pretrained": pretrained, "overrides": overrides or {},
                   "state_dict_sha256": summary.get("state_dict_sha256") or state_dict_sha256(model),
                   "default_cfg": {k: v for k, v in cfg.items()
                                   if isinstance(v, (str, int, float, list, tuple, type(None)))},
                   **summary}
        write_decisions_csv(out / "decisions.csv", result["sets"])
        subject = model_name + (RANDOM_SUFFIX if random_weights else "")
        csvs = write_mvh_csvs(out, subject, result["sets"])
        humans = add_consistency(summary, model_trials(result["sets"]), Path(summary["stimuli_dir"]).parent,
                                 with_humans=with_humans)
        meta = {"command": command or sys.argv, "versions": versions(), "host": host(device),
                "random_weights": random_weights, "start_time": start_time, **finished(started),
                "device": device, "batch_size": batch_size,
                "workers": default_workers() if workers is None else workers,
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        summary.update(meta)
        write_json(out / "summary.json", summary)
        figs = plot_shape_bias([summary], out / "shape_bias", human_csv_paths=humans)
        figs += plot_error_consistency([summary], out / "error_consistency")
        outputs = ["decisions.csv", "summary.json", *csvs, *(Path(p).name for p in figs)]
        remove_earlier_outputs(out, outputs)
        write_json(out / "run.json", {"what": "erf-lab shape-bias", "model": model_name, "seed": summary["seed"],
                                      "weights": summary["weights"],
                                      "weights_sha256": summary["weights_sha256"],
                                      "weights_selection": summary["weights_selection"],
                                      "stimuli_dir": summary["stimuli_dir"], "limit": limit, "outputs": outputs,
                                      **meta})
        remove_partial_sets(out)
        return summary
