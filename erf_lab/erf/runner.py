"""The one orchestrator of ERF runs: ``erf-lab compute``, ``erf-lab sweep``, the app and the training timeline all
measure through :func:`run_erf`, which writes a run directory through :func:`erf_lab.erf.rundir.write_run_dir`.

A run is described by an :class:`ErfSpec` (what to measure) and executed with resume, reuse, distributed
sharding and atomic outputs: the accumulator (sum, count, processed ids) is saved atomically to
``<out>/.erf_state*.npz`` at most every ``checkpoint_seconds`` (default 30 s; after every image when images are
slower) and on Ctrl-C / crash, so ``--resume`` continues with no image counted twice, even after SIGKILL.
Final files are written only at the end, by rank 0, run.json last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib
import os
import math
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from erf_lab.checkpoint import not_a_weights_file, random_init_of, resolve_weights
from erf_lab.erf import distributed as D
from erf_lab.erf.attribution import AGGREGATES
from erf_lab.erf.compute import Accumulator, compute_erf
from erf_lab.erf.prepare import CONV_BACKENDS, check_device
from erf_lab.erf.rundir import RUN_FILE, STATE_GLOB, load_run, write_run_dir
from erf_lab.errors import ErfLabError, on_every_rank, out_of_memory
from erf_lab.io import check_out_path, refuse_empty
from erf_lab.provenance import host, launch, now, provenance, versions

OUTPUT_FILES = ("erf.npy", "metrics.json", "erf.png", "erf.pdf", "erf.svg", RUN_FILE)
CHECKPOINT_SECONDS = 30.0
#: largest accepted --input-size (pixels per side); the paper measures at 1024. Larger inputs need memory for
#: every activation of the model at that size (RepLKNet-31B: ~4.5 GiB at 1024^2, growing with the area).
MAX_INPUT_SIZE = 4096
#: a measurement more than this factor away from the model's training resolution is flagged (not refused)
SIZE_NOTE_FACTOR = 2.0
#: ``batch_size=None`` (auto): images per forward/backward pass until a pass holds this many pixels, at most
#: AUTO_BATCH_MAX. Small inputs make small GEMMs (the 1x1 convs of a late stage at 224 px have 49 rows per image):
#: measured for RepLKNet-31B on the 2-core AVX2 EPYC, forward + input gradient, at 224 px B = 1 / 2 / 4 / 8 gave
#: 73 / 96 / 111 / 112 GFLOP/s, at 448 px B = 1 111 and B = 2 100; the activation memory of an auto batch stays
#: that of one 448 px image (two on an AVX-512 CPU).
AUTO_BATCH_PIXELS = 448 * 448
#: the budget on a CPU where PyTorch runs its AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``): twice
#: the pixels, as the larger batches were faster there. Measured for RepLKNet-31B on a 2-core AVX-512 Intel Xeon,
#: forward + input gradient, s per image, best of interleaved rounds: 224 px B = 4 / 8 / 16 0.229 / 0.212 / 0.211,
#: 448 px B = 1 0.934 and B = 2 0.848, 640 px B = 1 1.86 and B = 2 1.81; ResNet-18 at 224 px B = 4 / 8 / 16
#: 0.0296 / 0.0274 / 0.0267. The AVX2 machine's 448 px figures above are why the budget depends on the CPU; from
#: 640 px up one image per pass (two were within 3 % there, at twice the memory).
AUTO_BATCH_PIXELS_AVX512 = 2 * 448 * 448
AUTO_BATCH_MAX = 8


def auto_batch_pixels(device="cpu") -> int:
    """Pixels per pass of an auto batch on ``device`` (a name or ``torch.device``; None = the CPU):
    ``AUTO_BATCH_PIXELS_AVX512`` on a CPU where PyTorch runs its AVX-512 kernels, else ``AUTO_BATCH_PIXELS`` (a run on
    CUDA sizes its batch by memory instead: :func:`erf_lab.erf.compute.memory_batch_size`)."""
    if torch.device(device or "cpu").type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return AUTO_BATCH_PIXELS_AVX512
    return AUTO_BATCH_PIXELS


def auto_batch_size(input_size: int, num_images: int, device="cpu") -> int:
    """Images per pass for ``batch_size=None``: as many as fit ``auto_batch_pixels(device)`` (on an AVX2 CPU 4 at
    224 px and 1 from 448 px up; with AVX-512 8 at 224 px, 2 at 448 px, 1 from 640 px up), at most
    ``AUTO_BATCH_MAX`` and the number of images."""
    return max(1, min(AUTO_BATCH_MAX, auto_batch_pixels(device) // max(1, int(input_size)) ** 2, int(num_images)))


@dataclass(frozen=True)
class ErfSpec:
    """What one ERF run measures (its ``config`` is recorded in run.json and decides resume / reuse)."""

    model: str
    weights: str | None = None
    drop_head: bool = False
    overrides: dict = field(default_factory=dict)
    images: str | None = None  # a folder, or None / "default" for the built-in set
    num_images: int | None = None
    input_size: int = 1024
    layer: str | None = None
    aggregate: str = "relu"
    batch_size: int | None = None  # None: auto_batch_size (recorded resolved in run.json)
    device: str = "cpu"
    reparameterize: bool = True
    channels_last: bool = True
    conv_backend: str = "fastconv"
    seed: int = 0
    train_size: int | None = None  # the model's training resolution, when known

    def validate(self) -> "ErfSpec":
        """Every check that needs no model, once, before anything is built or written."""
        if self.aggregate not in AGGREGATES:
            raise ErfLabError(f"unknown aggregate {self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        if self.conv_backend not in CONV_BACKENDS:
            raise ErfLabError(f"unknown conv backend {self.conv_backend!r}; choose from {', '.join(CONV_BACKENDS)}")
        for name, v, lo in (("--batch-size", self.batch_size, 1), ("--input-size", self.input_size, 1),
                            ("--num-images", self.num_images, 1), ("--train-size", self.train_size, 1)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise ErfLabError(f"{name} must be a positive integer, got {v!r}")
        if self.input_size > MAX_INPUT_SIZE:
            raise ErfLabError(f"--input-size {self.input_size} is above the maximum {MAX_INPUT_SIZE} (activation "
                              f"memory grows with the image area; the paper measures at 1024)")
        if self.train_size is not None and self.train_size > MAX_INPUT_SIZE:
            raise ErfLabError(f"--train-size (the weights' training resolution) {self.train_size} is above "
                              f"{MAX_INPUT_SIZE} px, the largest input erf-lab measures")
        # Path("") is the current folder: '--images ""' (an unset shell variable) read it recursively, '--layer ""'
        # measured the default layer as if the option were not given
        refuse_empty(self.images, "--images", "name a folder of images, or leave --images out for the built-in set")
        refuse_empty(self.layer, "--layer", "name a layer ('erf-lab layers --model ...'), or leave --layer out for "
                                            "the last feature map")
        if self.images is not None and str(self.images) != "default":
            p = Path(self.images).expanduser()
            if not p.is_dir():
                raise ErfLabError(f"image folder not found: {self.images}" if not p.exists()
                                  else f"--images must be a folder of images, got a file: {self.images}")
        if self.weights is not None and not resolve_weights(self.weights)[0].is_file():
            raise ErfLabError(not_a_weights_file(self.weights))
        check_device(self.device)
        return self

    def config(self) -> dict:
        """JSON-ready record of the spec (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["overrides"] = {k: jsonable(v) for k, v in self.overrides.items()}
        return d


def jsonable(v):
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "model"


def default_out_dir(model: str, images_name: str, input_size: int, root: str | os.PathLike = "runs") -> Path:
    """``ROOT/<model>-<images>-<size>-<time>``; under torchrun the time its job began (:func:`D.job_started`), so a
    try that ``--max-restarts`` starts again finds the failed try's folder (before: a new one, measured anew)."""
    started = D.job_started()
    stamp = (_dt.datetime.fromtimestamp(started) if started else _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{_safe(model)}-{_safe(images_name)}-{input_size}-{stamp}"


def state_path(out_dir: Path, info: D.DistInfo) -> Path:
    name = ".erf_state.npz" if not info.enabled else f".erf_state.rank{info.rank}of{info.world_size}.npz"
    return Path(out_dir) / name


GEOMETRY_CACHE = "erf_geometry.json"
GEOMETRY_PROBE_SIZE = 64  # px: every map of a stride-32 network is 2 x 2 or more there


def layer_geometry(model, layer: str | None, input_size: int) -> dict:
    """Feature-map shape and theoretical RF of ``layer``; ErfLabError if ``input_size`` is too small.
    Kept per model structure, layer and size in the erf-lab cache (``erf_geometry.json``,
    :mod:`erf_lab.erf.structure_cache`): the probe forward costs a RepLKNet-31B process 0.3-0.45 s."""
    from erf_lab.erf import structure_cache
    from erf_lab.erf.receptive_field import resolve_layer

    name, _ = resolve_layer(model, layer)
    # "v2": NHWC maps inside ConvNeXt-style blocks are read as (C, H, W) since; older entries had (H, W, C)
    # "v3": a Linear / LayerNorm over an NCHW map's width (or over (C, H, W)) is NCHW again (v2 read it as NHWC)
    # "v5": the stride per axis (``stride_hw``), for the centre of a layer whose strides differ along y and x
    # "v6": rf_start after a conv module that pads inside its forward (TF 'SAME'); v5 took its padding as 0
    # "v8": a global theoretical RF after a reduction over the whole map (SE, GRN: ``rf_global``, ``kernel_rf``);
    # v6 gave the kernels' RF there (v7: a draft that put SE's squeeze on the unit grid)
    # "v9": probed where every map is over 1 x 1 (v8 probed at 32 px: an SE in a stride-32 stage, on a 1 x 1 map
    # there, was not global) and a LayerNorm over (C, H, W) is global
    # "v10": adaptive pooling to more than one unit (probed at the input's size), a stride-1 transposed conv's
    # dilation and padding, F.unfold / F.fold, lp_pool2d, pixel_unshuffle (also by view / permute), torch.roll,
    # crops and a Linear over a flattened map or its tokens (global) are tracked, misaligned branches merged by
    # their union, and flips, gathers, y / x swaps and concatenations along y or x leave no grid (v9 misread or left
    # out all of them)
    # "v11": also global after an attention over every token of the map (a ViT's), placed on the patch grid, and the
    # tokens after window attention placed too (v10: n/a, unplaced: the metrics centred on the map's middle instead of
    # the measured token's patch, 16 px off for a Swin at 64 px)
    # "v12": global also where the kernels' RF is untracked (v11: after window attention or a resampling a global
    # layer, MaxViT's attention after its MBConv's SE, was n/a, not global; ``kernel_rf`` None there)
    # "v13": an F.pad of a channels-last map moves its units by its (x, y) pairs (v12 took the channels' as x's)
    key = structure_cache.structure_key(model, "geometry-v13", name, int(input_size))
    hit = structure_cache.cached(GEOMETRY_CACHE, key)
    if (isinstance(hit, dict) and hit.get("layer") == name and {"theoretical_rf", "stride", "feature_shape", "rf_start",
                                                                "stride_hw", "rf_global", "kernel_rf"} <= set(hit)):
        return hit
    geom = _probe_geometry(model, name, input_size)
    structure_cache.store(GEOMETRY_CACHE, key, geom)
    return geom


def _probe_geometry(model, name: str, input_size: int) -> dict:
    import fastconv

    from erf_lab.erf.prepare import num_threads
    from erf_lab.erf.receptive_field import DEFAULT_LAYER, list_layers

    # RF and stride do not depend on the input size (but after an adaptive pooling, below): probe small and fast,
    # but where every map is over 1 x 1 (a pooling or norm over a 1 x 1 map reduces nothing, so an SE in a stride-32
    # stage was not seen as global at 32 px): at 64 px, and again at twice the deepest stride where that is more (up
    # to the input size)
    probe = int(min(input_size, GEOMETRY_PROBE_SIZE))
    # no autotuning for shapes the measurement never uses; one thread: ~1000 tiny ops, where a second OpenMP
    # thread only adds fork/join (RepLKNet-31B with 2 busy cores: 0.7 s on one thread, 3.7-8 s on two)
    with fastconv.use(backend="native"), num_threads(1):
        try:
            rows = {r["name"]: r for r in list_layers(model, probe)}
        except ErfLabError:
            if probe == input_size:
                raise
            probe = input_size
            rows = {r["name"]: r for r in list_layers(model, probe)}
        deeper = min(input_size, 2 * max((int(r["stride"] or 1) for r in rows.values()), default=1))
        if probe < deeper:
            try:
                rows, probe = {r["name"]: r for r in list_layers(model, deeper)}, deeper
            except ErfLabError:  # a size the model refuses (e.g. windows): the input's own
                rows, probe = {r["name"]: r for r in list_layers(model, input_size)}, input_size
    step = math.lcm(*(int(r["stride"] or 1) for r in rows.values())) if rows else 1
    if (input_size - probe) % step:
        # a padding that depends on the map's size (TF 'SAME': the extra pixel goes after, by the size's parity)
        # puts unit 0 elsewhere at sizes of another residue: probe again at the least size congruent to the input's
        # modulo every stride, which takes the same paddings as the input (RF and stride are the same anyway)
        with fastconv.use(backend="native"), num_threads(1):
            try:
                rows, probe = {r["name"]: r for r in list_layers(model, probe + (input_size - probe) % step)}, None
            except ErfLabError:  # a size the model refuses (e.g. windows): the input's own, whose error is the one
                rows, probe = {r["name"]: r for r in list_layers(model, input_size)}, input_size
    if probe != input_size and (rows.get(name) or {}).get("size_dependent"):
        # after an adaptive pooling to more than one unit (a VGG / AlexNet head's 7 x 7) the bins, and with them RF,
        # stride and centre, depend on the map's size: probed at the input's own
        with fastconv.use(backend="native"), num_threads(1):
            rows = {r["name"]: r for r in list_layers(model, input_size)}
    row = rows.get(name)
    if row is None or len(row["shape"]) != 3:
        hint = (" (forward_features or, without one, the model's output: here e.g. logits, a tuple or a dict); "
                "pass --layer with a name from 'erf-lab layers --model ...'") if name == DEFAULT_LAYER else ""
        raise ErfLabError(f"layer {name!r} does not produce a (N, C, H, W) feature map in the forward pass{hint}")
    stride = int(row.get("stride") or 1)
    if input_size < stride or row["shape"][-1] < 1 or row["shape"][-2] < 1:
        why = ("the feature map would be under 1 pixel" if min(row["shape"][-2:]) < 1 else
               "the map would hold a single unit, fed by less than one stride of image")  # "same" padding: 1 x 1
        raise ErfLabError(f"input size {input_size} is too small for layer {name!r} (total stride {stride}: "
                          f"{why}); use --input-size >= {stride}")
    # (C, H, W) at input_size for a "same"-padded map (probed there after an adaptive pooling: its own); run.json
    # records the measured map's own H x W
    shape = row["shape"] if row.get("size_dependent") else [row["shape"][0], *[-(-input_size // stride)] * 2]
    return {"layer": name, "theoretical_rf": row["theoretical_rf"], "stride": stride, "feature_shape": shape,
            "rf_start": row.get("rf_start"), "stride_hw": row.get("stride_hw"), "rf_global": bool(row.get("rf_global")),
            "kernel_rf": row.get("kernel_rf")}


def erf_centre(geom: dict, input_size: int, feature_hw=None) -> list[int] | None:
    """The input pixel (y, x) at the centre of the measured unit's receptive field (the metrics' centre) on the
    measured map (``feature_hw``, else its "same"-padded size), None where the layer's units lie on no grid (after a
    resampling) or the centre falls outside the image. A global RF (SE, GRN, a ViT's attention) keeps its kernels'
    centre, window attention its tokens' (a Swin's)."""
    from erf_lab.erf.metrics import target_centre

    if geom.get("rf_start") is None:
        return None
    stride = geom.get("stride_hw") or int(geom["stride"])  # per axis (y, x); geometry stored before: one number
    return target_centre(geom["rf_start"], stride, int(input_size), feature_hw)


_SIZE_IN_NAME = re.compile(r"(?:^|[_\-.])(\d{3,4})(?=[_\-.]|$)")


def random_init(spec: ErfSpec) -> dict | None:
    """``{"seed": ...}`` when the measured weights are random: no weights and not ``pretrained``, or a file
    marked as a random initialisation (``erf-lab reparam`` of an untrained model); None for trained weights."""
    return random_init_of(spec.weights, pretrained=bool(spec.overrides.get("pretrained")), seed=spec.seed)


_NOT_A_SIZE = re.compile(r"(?i)(?:epoch|step|iter|ckpt|checkpoint)[_\-.]?\d+$")


def training_resolution(spec: ErfSpec, model) -> int | None:
    """The model's training resolution in pixels, None where it is unknown (:func:`training_resolution_source`)."""
    return training_resolution_source(spec, model)[0]


def training_resolution_source(spec: ErfSpec, model) -> tuple[int | None, str]:
    """(training resolution or None, where it comes from / why it is unknown).

    ``spec.train_size`` (``--train-size``) first; None for a randomly initialised model (never trained); for a
    weights file its training record (:func:`erf_lab.checkpoint.training_input_size`: a ``builtin:`` model's JSON,
    the record ``erf-lab train`` / ``reparam`` write into the file, the run folder's ``run.json``), else a 3-4 digit
    size in the file's name (the official RepLKNet files: ``..._224.pth``, ``..._384.pth``, ``..._320.pth``; not
    ``epoch_100``), else
    unknown: the model's ``pretrained_cfg`` / ``default_cfg`` ``input_size`` describes its official weights, not a
    file of other weights. Without a file (the model's own published weights, ``pretrained=True``) that config."""
    from erf_lab.checkpoint import training_input_size

    if spec.train_size is not None:  # the user's word wins; where the weights' record disagrees, it is said
        given = int(spec.train_size)
        if random_init(spec) is not None:
            return given, "given (--train-size), for a random initialization (never trained)"
        recorded, where = training_input_size(spec.weights) if spec.weights else (None, None)
        if recorded and recorded != given:
            import warnings

            warnings.warn(f"--train-size {given} overrides the training resolution {recorded} px of {where}")
            return given, f"given (--train-size), against {recorded} px in {where}"
        return given, "given (--train-size)"
    if random_init(spec) is not None:
        return None, "random initialization (never trained)"
    if spec.weights:
        size, where = training_input_size(spec.weights)
        if size:
            return size, where
        stem = Path(str(spec.weights)).stem
        hits = [int(m) for m in _SIZE_IN_NAME.findall(stem) if 96 <= int(m) <= 2048]
        if hits and not _NOT_A_SIZE.search(stem):
            return hits[-1], f"the size in the file name {Path(str(spec.weights)).name}"
        return None, (f"unknown: {Path(str(spec.weights)).name} carries no training record (erf-lab train's run "
                      "folder or metadata) and no size in its name")
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
            return int(cfg["input_size"][-1]), f"the model's {attr} (its published weights)"
    return None, "unknown: the model declares no training resolution"


def size_note(input_size: int, train_size: int | None, unknown: str | None = None) -> str | None:
    """A warning when the measurement size is far (> 2x) from the training resolution (allowed: the paper's
    protocol measures 224-trained models at 1024); with ``train_size`` None and ``unknown`` (why: trained weights
    whose resolution no record gives) a note that it is unknown, so the gap cannot be judged."""
    if train_size is None:
        if unknown:
            return (f"the training resolution is unknown ({unknown.removeprefix('unknown: ')}): whether "
                    f"{input_size}px is far from it cannot be judged; pass --train-size N if you know it")
        return None
    f = input_size / train_size
    if f > SIZE_NOTE_FACTOR or f < 1 / SIZE_NOTE_FACTOR:
        return (f"measured at {input_size}px, {f:.2g}x the training resolution {train_size}px: the model may behave "
                f"unlike at its training size; compare size-free metrics (effective radius, sigma) across sizes")
    return None


@contextlib.contextmanager
def _owned_out_dir(out_dir: Path, info: D.DistInfo, held_folder: contextlib.ExitStack):
    """Create ``out_dir`` (checking it is writable) and hold it (:func:`erf_lab.io.hold_folder`, a no-op where
    the run holds it already); on failure, remove it again when this run created it and left nothing in it (no
    empty folder that looks like a result)."""
    from erf_lab.io import hold_folder, prepare_out_dir

    existed = out_dir.exists()
    error = None
    try:
        if info.is_main:
            prepare_out_dir(out_dir)
            held_folder.enter_context(hold_folder(out_dir))  # a folder another process made meanwhile: in use
    except Exception as e:  # noqa: BLE001 - every rank stops with it (not left in the next collective)
        error = e
    D.gather_or_fail(None, error, info)
    try:
        yield
    except BaseException:
        if info.is_main and not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def run_erf(spec: ErfSpec, *, out: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
            reuse: bool = False, label: str | None = None, tags: dict | None = None,
            formats: Sequence[str] = ("png", "pdf"), show_progress: bool = True,
            on_batch: Callable[[Accumulator], None] | None = None, checkpoint_seconds: float = CHECKPOINT_SECONDS,
            argv: Sequence[str] | None = None, runs_root: str | os.PathLike = "runs",
            display: str | None = None) -> dict:
    """Measure one ERF and write its run directory; returns ``{"out_dir", "metrics", "run_info", "result",
    "already_complete", "reused"}`` (metrics / result on rank 0 only; result is None for a reused run).

    ``resume``: continue an interrupted run in ``out`` (same spec required). ``reuse``: a complete run in ``out``
    with the same spec is returned as is (sweeps, the app, the training timeline), any other content is replaced.
    ``force``: start over. ``label`` / ``tags`` go into run.json (``tags``: the orchestrator's own keys).
    ``display``: heatmap preset of the figure (``erf_lab.erf.plotting.DISPLAY_PRESETS``; data unaffected).
    """
    from erf_lab.erf.plotting import display_preset

    with D.HeldChecks() as checks:  # under torchrun: said to the other ranks once they have met
        if resume and out is None:
            raise ErfLabError("--resume needs --out DIR (the folder of the interrupted run)")
        if resume and force:
            raise ErfLabError("--resume and --force exclude each other")
        if not checkpoint_seconds >= 0:  # NaN too: a NaN interval would never save
            raise ErfLabError(f"--checkpoint-seconds must be 0 or more, got {checkpoint_seconds:g}")
        spec.validate()
        display = display_preset(display)  # before measuring
        if out is not None:
            check_out_path(out)
    start, t0 = now(), time.time()
    # a process group joined by the caller (a sweep's, for all its members) stays: gloo / NCCL cannot join a second
    # group on the same torchrun store (the ranks met the first group's stale addresses: 'Connection refused', a hang)
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    # the same device everywhere: ranks that joined with gloo and NCCL would not meet (a bad --device: refused here)
    dinfo = D.init(spec.device)
    try:
        D.gather_or_fail(None, checks.error, dinfo)
        with contextlib.ExitStack() as held_folder:
            return _run(spec, dinfo, out=out, resume=resume, force=force, reuse=reuse, label=label, tags=tags or {},
                        formats=formats, show_progress=show_progress, on_batch=on_batch,
                        checkpoint_seconds=checkpoint_seconds, argv=argv, runs_root=runs_root, start=start, t0=t0,
                        display=display, held_folder=held_folder)
    finally:
        if joined_here:
            D.shutdown(dinfo)


#: how a resume refusal names a config entry that is not an option
CONFIG_KEY_NAMES = {"images": "the image list", "images_sha256": "the images' contents",
                    "weights": "the weights file's contents"}


def _config(spec: ErfSpec, source, mean, std, weights_sha, dinfo) -> dict:
    return {**spec.config(), "weights": weights_sha, "images": source.ids, "images_sha256": source.content_sha256,
            "mean": list(mean), "std": list(std), "world_size": dinfo.world_size}


def finished_diff(old: dict, new: dict) -> list[str]:
    """``config_diff`` against a finished run: the number of processes that measured it is left out (the ERF does
    not depend on it; only an interrupted run's per-rank state files do)."""
    return [k for k in config_diff(old, new) if k != "world_size"]


def config_diff(old: dict, new: dict) -> list[str]:
    """The config entries in which a stored run (``old``) differs from this one (``new``). A run written before
    erf-lab hashed the images' contents has no ``images_sha256``: it is taken as matching, with a warning, as the
    version that wrote it would have taken it."""
    new = _normalise(new)
    if "images_sha256" not in old and "images_sha256" in new:
        import warnings

        warnings.warn("the stored run predates image-content checks: its images are assumed unchanged (names and "
                      "order are still compared)", stacklevel=3)
        new = {k: v for k, v in new.items() if k != "images_sha256"}
    return [k for k in dict.fromkeys([*new, *old]) if k not in SPEED_ONLY and old.get(k) != new.get(k)]


#: settings that change only the speed of a measurement, not its map: a run resumes with another value (a
#: --batch-size that ran out of memory, made smaller), and ranks may differ in them
SPEED_ONLY = ("batch_size",)


def _refuse_out_in_images(out_dir: Path, images) -> None:
    """An output folder that is the image folder or inside it: the folder is read recursively, so the run's own
    erf.png becomes an input of the next run, and ``--force`` deletes the outputs (inputs) it has just listed."""
    from erf_lab.io import refuse_out_inside

    if images is not None and str(images) != "default":
        refuse_out_inside(out_dir, images, "--images", "the run's own erf.png would become an input image")


def _existing(out_dir: Path, config: dict, resume: bool, force: bool, reuse: bool):
    """What is already in ``out_dir``: ('complete', Run) to return, ('resume', state files), or ('new', files
    to delete before starting)."""
    from erf_lab.io import read_json_or_none

    outputs = [out_dir / f for f in OUTPUT_FILES if (out_dir / f).exists()]
    states = sorted(out_dir.glob(STATE_GLOB)) if out_dir.is_dir() else []
    complete = (out_dir / RUN_FILE).exists()
    if D.restarted() and (states or complete):  # torchrun --max-restarts: continue the failed try (not deleted)
        resume, force = True, False
    if reuse and complete:
        info = read_json_or_none(out_dir / RUN_FILE)
        if isinstance(info, dict) and isinstance(info.get("config"), dict) and not finished_diff(info["config"], config):
            try:
                load_run(out_dir)  # a complete run whose erf.npy is damaged is measured again, not reused
                return "complete", None
            except ErfLabError:
                pass
        return "new", [*outputs, *states]
    if reuse:
        return ("resume", states) if states else ("new", [*outputs, *states])
    if complete and not force:
        if resume:
            info = read_json_or_none(out_dir / RUN_FILE)
            old = info.get("config") if isinstance(info, dict) else None
            diff = finished_diff(old, config) if isinstance(old, dict) else ["run.json unreadable"]
            if diff:
                what = [CONFIG_KEY_NAMES.get(k, k) for k in diff]
                raise ErfLabError(f"{out_dir} already holds a complete run with other settings ({', '.join(what)}); "
                                  f"use --force to overwrite or choose another --out")
            return "complete", None
        raise ErfLabError(f"{out_dir} already holds a complete run; use --force to overwrite or choose another --out")
    if states and not (resume or force):
        raise ErfLabError(f"{out_dir} holds an interrupted run; pass --resume to continue it or --force to start over")
    if outputs and not states and not force:
        raise ErfLabError(f"{out_dir} holds incomplete output files ({outputs[0].name}); use --force to overwrite")
    if force:
        return "new", [*outputs, *states]
    return ("resume", states) if resume else ("new", [])


_RANK_STATE = re.compile(r"\.erf_state\.rank\d+of(\d+)\.npz")


def _state_world_size(path: Path) -> int:
    """The number of processes that wrote the state file ``path`` (``.erf_state.rank<r>of<N>.npz``: N, else 1)."""
    m = _RANK_STATE.fullmatch(path.name)
    return int(m.group(1)) if m else 1


def _other_world_states(out_dir: Path, action: str, stale: list, dinfo: D.DistInfo, reuse: bool):
    """``_existing``'s answer, checked against the state files of a run interrupted with another number of
    processes: each process resumes its own file, so a ``--resume`` with another number would ignore them (start
    again, saying there was no interrupted run, and leave them beside the finished run). A refusal naming how to
    resume; a reused run (sweeps) starts again, and those files go with the run's other stale files."""
    if action != "resume":
        return action, stale
    other = [p for p in stale if _state_world_size(p) != dinfo.world_size]
    if not other:
        return action, stale
    if reuse:
        return "new", stale
    n = _state_world_size(other[0])
    how = "one process (without torchrun)" if n == 1 else f"{n} processes (torchrun --nproc_per_node {n} on one node)"
    raise ErfLabError(f"cannot resume {out_dir}: it was interrupted with {n} process{'es' if n > 1 else ''}, this run "
                      f"has {dinfo.world_size}; resume it with {how}, or start over with --force")


def settings_differ(out_dir: str | os.PathLike, spec: ErfSpec) -> list[str]:
    """The settings in which the complete run in ``out_dir`` differs from ``spec`` (empty when there is no
    complete run or it is the same measurement), read from run.json without building anything."""
    from erf_lab.io import read_json_or_none, sha256_file

    info = read_json_or_none(Path(out_dir) / RUN_FILE)
    if not isinstance(info, dict):
        return []
    old, new = info.get("config") or {}, _normalise(spec.config())
    diff = [k for k in new if k not in ("weights", "images", *SPEED_ONLY) and old.get(k) != new[k]]
    sha = sha256_file(resolve_weights(spec.weights)[0]) if spec.weights else None
    if info.get("weights_sha256") != sha:
        diff.append("weights")
    folder = "default" if spec.images in (None, "default") else str(Path(spec.images).expanduser().resolve())
    if info.get("images") != folder:
        diff.append("images")
    return diff


def _normalise(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


# imported on a second thread while the model is built (see _start_background_imports): captum (which pulls in
# matplotlib.pyplot) and the figure backends; together ~0.9 s of a process on the 2-core dev box
BACKGROUND_IMPORTS = ("captum.attr", "matplotlib.figure", "matplotlib.backends.backend_agg",
                      "matplotlib.backends.backend_pdf", "matplotlib.backends._backend_pdf_ps")


#: the interpreter's GIL switch interval while the background imports run (see _start_background_imports)
BACKGROUND_SWITCH_INTERVAL_S = 0.0002
_switch = {"lock": threading.Lock(), "threads": 0, "interval": None}  # importing threads, the interval they found


def _start_background_imports(names=BACKGROUND_IMPORTS) -> threading.Thread:
    """Import ``names`` on a daemon thread and return it (join it before the measurement). Building and loading
    a model runs torch kernels that release the GIL (the random initialization alone: 0.7 s for RepLKNet-31B),
    so the imports overlap it instead of adding to the fixed cost of a process (issue 14). A failed import is
    skipped and left for the main thread, whose own import then raises it where it is needed (the PDF backend's
    font subsetting, imported on the first PDF save, is a private matplotlib module: it may move).

    While it imports, the GIL switch interval is ``BACKGROUND_SWITCH_INTERVAL_S``: each of the model build's ~2000
    small torch calls gives the GIL up and waits to get it back from the importing thread, which keeps it for a
    switch interval (5 ms by default) between hand-overs. The interpreter's own interval is back once the last
    importing thread ends (runs started at the same time, as in the app, share the lowered one)."""
    todo = [name for name in names if name not in sys.modules]

    def work():
        try:
            for name in todo:
                if name not in sys.modules:
                    try:
                        importlib.import_module(name)
                    except Exception:  # noqa: BLE001 - re-raised by the main thread's own import
                        continue
        finally:
            if todo:
                _switch_interval(lower=False)

    if todo:
        _switch_interval(lower=True)
    thread = threading.Thread(target=work, name="erf-lab-imports", daemon=True)
    try:
        thread.start()
    except BaseException:
        if todo:  # work() never runs: give its share of the lowered interval back here
            _switch_interval(lower=False)
        raise
    return thread


def _switch_interval(lower: bool) -> None:
    """One importing thread more (``lower``: the first lowers the switch interval) or fewer (the last restores
    the interval it found)."""
    with _switch["lock"]:
        if lower:
            if _switch["threads"] == 0:
                _switch["interval"] = sys.getswitchinterval()
                sys.setswitchinterval(min(BACKGROUND_SWITCH_INTERVAL_S, _switch["interval"]))
            _switch["threads"] += 1
        else:
            _switch["threads"] -= 1
            if _switch["threads"] == 0:
                sys.setswitchinterval(_switch["interval"])


def _metrics_of(run) -> dict:
    """The metrics of a finished run, from its erf.npy (as write_run_dir computed them): its metrics.json may be
    damaged (a TypeError in every caller) or stale (edited, rewritten by ``analyze --theoretical-rf``)."""
    from erf_lab.erf.rundir import run_metrics

    return run_metrics(run.erf, run.run_info, theoretical_rf=run.theoretical_rf, centre=run.centre)


@contextlib.contextmanager
def _term_as_interrupt():
    """SIGTERM (``kill``, ``timeout``, a batch scheduler) raises KeyboardInterrupt while a run measures and writes,
    so its progress is saved for ``--resume`` as on Ctrl-C; a further SIGTERM is ignored while that is saved. Only in
    the main thread and where SIGTERM has its default action (a caller's own handler stays)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        # the first one stops the run; a later one (torchrun's agent forwards a scheduler's SIGTERM that reached
        # the worker too) must not cut the saving of its progress short: ignored from now on (SIGKILL still ends it)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(spec: ErfSpec, dinfo: D.DistInfo, *, out, resume, force, reuse, label, tags, formats, show_progress,
         on_batch, checkpoint_seconds, argv, runs_root, start, t0, held_folder: contextlib.ExitStack,
         display=None) -> dict:
    from erf_lab.erf.images import load_images, model_data_config
    from erf_lab.erf.prepare import to_measured_form
    from erf_lab.erf.receptive_field import input_channels
    from erf_lab.io import hold_folder, refuse_other_result, sha256_file
    from erf_lab.models import create_model

    device = D.device_for(spec.device, dinfo)
    imports = _start_background_imports()
    torch.manual_seed(spec.seed)
    config, setup_error = None, None
    try:
        model = create_model(spec.model, weights=spec.weights, drop_head=spec.drop_head, **spec.overrides)
        chans = input_channels(model)
        if chans != 3:
            raise ErfLabError(f"{spec.model} takes {chans} input channel{'s' if chans != 1 else ''}; erf-lab's image "
                              f"sets are RGB: measure it in Python with compute_erf on (N, {chans}, H, W) tensors")
        data_cfg = model_data_config(model)
        mean, std = data_cfg["mean"], data_cfg["std"]
        if out is not None:  # before the folder is listed (and warned about)
            _refuse_out_in_images(Path(out), spec.images)
        with D.said_once_per_node(dinfo):  # every process of a node scans the same folder
            source = load_images(spec.images, num_images=spec.num_images, input_size=spec.input_size, mean=mean,
                                 std=std)
        # the names of the form measured (deploy-only ones found, train-time-only ones refused) before any folder
        # is touched; prepare_model then leaves the re-parameterized model as it is
        geom = layer_geometry(to_measured_form(model, spec.layer, spec.reparameterize), spec.layer, spec.input_size)
        imports.join()
        train_size, train_size_source = training_resolution_source(spec, model)
        weights_sha = sha256_file(resolve_weights(spec.weights)[0]) if spec.weights else None
        config = _config(spec, source, mean, std, weights_sha, dinfo)
        target = Path(out) if out is not None else default_out_dir(spec.model, source.name, spec.input_size,
                                                                   runs_root)
        _refuse_out_in_images(target, spec.images)  # the default --out too (runs/ under an --images folder)
        refuse_other_result(target, "erf")
        if dinfo.is_main and target.is_dir():  # no other erf-lab process writes a run there meanwhile; the
            held_folder.enter_context(hold_folder(target))  # temporary files of a run killed while it wrote go
    except Exception as e:  # noqa: BLE001 - every rank learns of it below (one process: raised there as it is)
        setup_error = e
    finally:
        imports.join()  # done before the measurement (and on an error: no import left running behind it)
    # the ranks compare their settings before anything is measured or written: nodes whose folders at the same
    # path hold other files would otherwise sum one ERF over two image sets
    configs = D.gather_or_fail(None if setup_error else _normalise(config), setup_error, dinfo)
    differing = next((r for r, c in enumerate(configs) if config_diff(configs[0], c)), None)
    if differing is not None:
        what = [CONFIG_KEY_NAMES.get(k, k) for k in config_diff(configs[0], configs[differing])]
        raise on_every_rank(ErfLabError(f"the ranks disagree on {', '.join(what)}: rank {differing} differs from "
                                        "rank 0 (every rank must read the same images, weights and options)"))

    out_dir = Path(D.broadcast_object(str(target), dinfo))  # rank 0's default --out (another node's clock differs)
    # rank 0 decides what the folder holds (nodes may see other files there) and tells the others
    action, stale = D.decided_on_rank0(
        lambda: _other_world_states(out_dir, *_existing(out_dir, config, resume, force, reuse), dinfo, reuse), dinfo)
    if action == "complete":
        run = load_run(out_dir) if dinfo.is_main else None
        return {"out_dir": out_dir, "already_complete": True, "reused": reuse, "result": None,
                "metrics": _metrics_of(run) if run else None, "run_info": run.run_info if run else None}
    D.barrier(dinfo)
    if dinfo.is_main and action == "new":
        for f in stale:
            f.unlink(missing_ok=True)
    D.barrier(dinfo)

    spath = state_path(out_dir, dinfo)
    acc, resumed_from, error = Accumulator(), 0, None
    earlier_sessions: list = []  # of a resumed run, from its state: each process that measured part of it
    try:  # each rank reads its own saved state; one that cannot tells the others (gather_or_fail below)
        if action == "resume" and spath.exists():
            try:
                acc, extra = Accumulator.load(spath)
            except Exception as e:
                raise ErfLabError(f"cannot read the saved state {spath}: {type(e).__name__}; use --force to start "
                                  "over") from None
            old = extra.get("config", {})
            diff = config_diff(old if isinstance(old, dict) else {}, config)
            if diff:
                if not reuse:
                    what = [CONFIG_KEY_NAMES.get(k, k) + (" (a file changed since)" if k == "images_sha256" else "")
                            for k in diff]
                    raise ErfLabError(f"cannot resume {out_dir}: settings differ from the interrupted run "
                                      f"({', '.join(what)}); use the same options or --force to start over")
                acc = Accumulator()
            else:
                start = extra.get("start_time", start)
                resumed_from = len(acc.processed)
                earlier_sessions = [x for x in extra.get("sessions") or [] if isinstance(x, dict)]
    except ErfLabError as e:
        error = e
    # what every rank measured before: rank 0's own state stood for all (run.json's count a quarter of the images
    # with 4 ranks; a rank 0 that had saved none said "no interrupted run" and lost the earlier sessions and start)
    earlier = D.gather_or_fail((resumed_from, earlier_sessions, start), error, dinfo)
    resumed_from = sum(n for n, _, _ in earlier)
    earlier_sessions, start = next(((x, t) for n, x, t in earlier if n), (earlier_sessions, start))
    if resume and not reuse and not resumed_from and dinfo.is_main:
        print(f"no interrupted run in {out_dir}; starting a new one", file=sys.stderr)

    n_all = len(source.files)
    source.files = D.shard(source.files, dinfo)
    # rank 0's bar counts its own share; the ranks run in step, so its rate and ETA are the job's
    note = f" (rank 0 of {dinfo.world_size}: {len(source.files)} of the {n_all} images)" if dinfo.world_size > 1 else ""
    # auto: the pixel rule on a CPU; on CUDA None, the batch sized by memory after a one-image pass (compute_erf)
    batch_size = spec.batch_size or (None if torch.device(device).type == "cuda" else
                                     auto_batch_size(spec.input_size, len(source.files), device))
    # this process's part of the run: its command, versions, device and the images measured before it (a resumed
    # run's run.json otherwise gave only the last session's, as if one process had measured every image)
    session = {"argv": list(argv) if argv is not None else list(sys.argv), "launch": launch(), "versions": versions(),
               "device": str(device), "host": host(device), "start_time": now(), "after_images": resumed_from}
    extra = {"config": _normalise(config), "start_time": start, "sessions": [*earlier_sessions, session]}
    last_save = [time.monotonic()]

    def checkpoint(a: Accumulator):
        if time.monotonic() - last_save[0] >= checkpoint_seconds:
            a.save(spath, extra)
            last_save[0] = time.monotonic()
        if on_batch is not None:
            on_batch(a)

    # kill / timeout / a scheduler's SIGTERM: progress saved as on Ctrl-C (it was lost back to the last periodic save)
    with _term_as_interrupt(), _owned_out_dir(out_dir, dinfo, held_folder):
        t_measure = time.time()
        try:
            result = compute_erf(model, source, layer=geom["layer"], aggregate=spec.aggregate,
                                 batch_size=batch_size, device=device, reparameterize=spec.reparameterize,
                                 channels_last=spec.channels_last, conv_backend=spec.conv_backend,
                                 show_progress=show_progress and dinfo.is_main, state=acc, on_batch=checkpoint,
                                 inplace=True, reducer=D.make_reducer(dinfo, (spec.input_size, spec.input_size), device),
                                 roofline=True, shrink_on_oom=spec.batch_size is None, progress_note=note)
        except ErfLabError:
            if acc.count:  # images measured, in this session or an earlier one: kept for --resume
                acc.save(spath, extra)
            else:
                spath.unlink(missing_ok=True)  # nothing to resume from: every image failed, or bad input
            raise
        except BaseException as e:
            if acc.processed:
                acc.save(spath, extra)  # Ctrl-C or crash: keep every image already accumulated
                _tell_saved(e, out_dir, len(acc.processed), n_all, dinfo)
            if out_of_memory(e) is not None:
                # the auto batch was halved down to one image before the error got here (erf_lab.erf.compute)
                how = (f"with --batch-size {batch_size}; use a smaller input or --batch-size" if spec.batch_size else
                       "with the auto batch (it halves down to one image per pass before giving up); use a smaller "
                       "input or model")
                raise ErfLabError(f"out of memory at --input-size {spec.input_size} {how}"
                                  + (f" (progress saved in {out_dir}: --resume --out {out_dir}, with any --batch-size)"
                                     if acc.processed else "")) from None
            raise
        measure_s = time.time() - t_measure

        run_info = metrics = None
        if dinfo.is_main:
            try:
                run_info = _run_info(spec, config, result, source, geom, (train_size, train_size_source), device,
                                     dinfo, label, tags, resumed_from, start, t0, measure_s, argv, data_cfg,
                                     getattr(model, "weights_selection", None))
                run_info["sessions"] = [*earlier_sessions, {**session, "end_time": run_info["end_time"]}]
                metrics = write_run_dir(out_dir, result.erf, run_info, theoretical_rf=geom["theoretical_rf"],
                                        centre=run_info.get("erf_centre"), formats=formats, display=display)
            except BaseException as e:  # Ctrl-C or a failure while writing: the measurement is kept for --resume
                acc.save(spath, extra)
                _tell_saved(e, out_dir, len(acc.processed), n_all, dinfo)
                raise
        D.barrier(dinfo)
        spath.unlink(missing_ok=True)
    return {"out_dir": out_dir, "metrics": metrics, "run_info": run_info, "result": result if dinfo.is_main else None,
            "already_complete": False, "reused": False}


def _tell_saved(stop: BaseException, out_dir: Path, measured: int, total: int, dinfo: D.DistInfo) -> None:
    """Mark a Ctrl-C / SIGTERM (KeyboardInterrupt) of rank 0 with where its progress was saved, as
    ``stop.erf_saved = {"out_dir", "measured", "total"}`` (the counts None under torchrun, where rank 0 holds a
    share only): the caller says how to continue, which for a default ``--out`` names a folder the user never saw."""
    if isinstance(stop, KeyboardInterrupt) and dinfo.is_main:
        one = dinfo.world_size <= 1
        stop.erf_saved = {"out_dir": str(out_dir), "measured": measured if one else None,
                          "total": total if one else None}


def _run_info(spec, config, result, source, geom, train, device, dinfo, label, tags, resumed_from, start, t0,
              measure_s, argv, data_cfg, selection) -> dict:
    from erf_lab.models.registry import build_options

    order = {i: n for n, i in enumerate(config["images"])}
    skipped_ids = {s[0] for s in result.skipped}
    used = sorted((p for p in result.processed if p not in skipped_ids), key=lambda p: order.get(p, 1 << 30))
    skipped = [list(s) for s in source.skipped] + result.skipped
    new_images = max(1, len(result.processed) - resumed_from)
    init = random_init(spec)
    train_size, train_size_source = train
    return {
        "label": label, "config": _normalise(config), "tags": _normalise(tags),
        # the options the network was built with: a builtin: model's recorded ones too (config: those asked for)
        "model": spec.model, "overrides": _normalise(build_options(spec.model, spec.weights, spec.overrides)),
        "weights": str(resolve_weights(spec.weights)[0].resolve()) if spec.weights else None,
        "weights_sha256": config["weights"],
        "weights_selection": selection,  # which part of the file loaded: its entry, a backbone. part, ...
        "random_init": init is not None, "init_seed": None if init is None else init["seed"],
        "drop_head": spec.drop_head,
        "train_size": train_size, "train_size_source": train_size_source,
        "size_note": size_note(spec.input_size, train_size,
                               train_size_source if train_size_source.startswith("unknown") else None),
        "layer": geom["layer"], "aggregate": spec.aggregate, "input_size": spec.input_size,
        "feature_shape": _feature_shape(geom, result.info.get("feature_hw")), "theoretical_rf": geom["theoretical_rf"],
        "erf_centre": erf_centre(geom, spec.input_size, result.info.get("feature_hw")),
        "rf_global": geom["rf_global"], "kernel_rf": geom["kernel_rf"],
        "images": "default" if source.name == "default" else str(Path(source.root).resolve()),
        "image_list": used, "num_images_requested": spec.num_images, "num_used": result.num_used,
        "num_skipped": len(skipped), "skipped": skipped, "mean": list(config["mean"]), "std": list(config["std"]),
        "resize": "bicubic, square", "model_preprocessing": _normalise(data_cfg),
        "target": result.info.get("target"), "map": result.info.get("map"),
        "gradient": "captum.attr.NeuronGradient", "reparameterized": spec.reparameterize,
        "channels_last": spec.channels_last, "conv_backend": spec.conv_backend,
        "fastconv_modules": result.info.get("fastconv_modules"), "weight_grads": False, "tf32": result.info.get("tf32"),
        "dtype": result.info.get("dtype"), "batch_size": result.info["batch_size"],
        "batch_memory": result.info.get("batch_memory"), "batch_halved_at": result.info.get("batch_halved_at"),
        "seed": spec.seed, "device": str(device), "world_size": dinfo.world_size,
        "dist_backend": dinfo.backend, "resumed": resumed_from > 0, "resumed_after_images": resumed_from,
        "start_time": start, "end_time": now(), "wall_seconds": round(time.time() - t0, 2),
        "seconds_per_image": round(measure_s / new_images, 4),
        **_roofline_fields(result.info),
        "provenance": provenance("erf", spec.config(), argv, device=device),
    }


def _feature_shape(geom: dict, feature_hw) -> list:
    """(C, H, W) of the measured map: its own H x W where the measurement saw it (a "valid" conv's map is smaller
    than the geometry's "same"-padded estimate ceil(S / stride))."""
    shape = list(geom["feature_shape"])
    return shape[:1] + [int(v) for v in feature_hw] if feature_hw is not None else shape


def _roofline_fields(info: dict) -> dict:
    """run.json's roofline fields from ``compute_erf``'s info (this process's batches only: a resumed run times
    the images it computed itself)."""
    from erf_lab.erf.roofline import fraction_note, roofline_numbers, steady_seconds_per_image

    ref = info.get("roofline") or {}
    sec = steady_seconds_per_image(info.get("batch_seconds") or [])
    flops, padding = info.get("flops_per_image"), info.get("padding_flops_per_image")
    inside = flops - padding if flops is not None and padding is not None else None
    without = roofline_numbers(inside, sec, ref.get("sgemm_gflops"))
    fields = {"flops_per_image": flops,
              "compute_seconds_per_image": None if sec is None else round(sec, 5),
              **roofline_numbers(flops, sec, ref.get("sgemm_gflops")),
              # the depthwise products with the zero padding (avoidable work: fastconv's C++ kernel skips it)
              "padding_flops_per_image": padding,
              "roofline_fraction_without_padding": without["roofline_fraction"],
              "sgemm_gflops": ref.get("sgemm_gflops"), "sgemm_device": ref.get("sgemm_device"),
              "sgemm_reprobed": bool(ref.get("reprobed")) if ref else None,
              "cpu_model": ref.get("cpu_model"), "isa": ref.get("isa"), "threads": ref.get("threads")}
    return {**fields, "roofline_note": fraction_note(fields, info.get("tf32"))}
