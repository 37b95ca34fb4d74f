"""The kernel-family study on cue-world: RepLKNet's Table 5 family (kernel 3 / 7 / 13 / 31, Ding et al., CVPR
2022) trained with one recipe, seed and data at a CPU size, then each model's ERF (area ratios at t = 20 / 30 /
50 / 99 %, effective radius) and cue-world shape bias; plus two of the paper's guidelines as experiments:
MobileNetV2 13x13 with and without identity shortcuts (Table 2) and RepLKNet-31 with and without the small-kernel
re-parameterization (Table 4).

Every step is cached in the study folder (a complete training run is kept, an interrupted one resumed, ERF and
probe results reused), so re-running the command continues where it stopped. ``ship`` copies the weights with
their records into ``data/trained/`` where ``builtin:`` names find them.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from erf_lab.errors import ErfLabError

FAMILY_MODELS = {3: "replknet_3", 7: "replknet_7", 13: "replknet_13", 31: "replknet_31b"}
#: what the family's erf / table columns are
TABLE_KEYS = ("val_acc", "area@20%", "area@30%", "area@50%", "area@99%", "r_rms", "r50", "shape_bias",
              "shape_only_accuracy", "texture_only_accuracy")
ERF_KEYS = ("area@20%", "area@30%", "area@50%", "area@99%", "r_rms", "r50")
NUM_CLASSES = 10  # cue-world's shapes in the study


@dataclass(frozen=True)
class StudySettings:
    """One recipe and world for every model (CPU-sized defaults; see the shipped README for the choice)."""

    channels: tuple = (16, 32, 64, 128)
    layers: tuple = (1, 1, 1, 1)
    input_size: int = 64
    train_size: int = 2000  # images per epoch, new ones every epoch (resample)
    val_size: int = 500
    epochs: int = 10
    batch_size: int = 64
    lr: float = 4e-3
    erf_input_size: int = 128
    erf_images: int = 20
    probe_size: int = 500
    world_seed: int = 0
    mobilenet_width: float = 0.35
    #: MobileNetV2's strided 13x13 depthwise convs run natively (~7x the cost of the whole RepLKNet step on
    #: this CPU at 64 px), so the MobileNetV2 pair trains at half the size; None = the study's size
    mobilenet_input_size: int | None = 32

    def recipe(self):
        from erf_lab.train.recipe import Recipe

        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)


@dataclass(frozen=True)
class StudyModel:
    name: str  # e.g. "K31-seed0"
    model: str
    overrides: dict = field(default_factory=dict)
    seed: int = 0
    group: str = "family"  # "family" or "guideline"
    kernel: int | None = None
    input_size: int | None = None  # training size when not the study's (the ERF size scales with it)

    def sizes(self, settings: "StudySettings") -> tuple[int, int]:
        """(training size, ERF measurement size) of this model."""
        size = int(self.input_size or settings.input_size)
        return size, int(round(settings.erf_input_size * size / settings.input_size))


def plan(settings: StudySettings = StudySettings(), *, kernels=(3, 7, 13, 31), seeds=(0, 1),
         seeded_kernels=(3, 31), guidelines: bool = True) -> list[StudyModel]:
    """The models of the study in training order: the family at seed 0 with the slow MobileNetV2 pair right
    after its first three members (so that a run with a few parallel jobs ends sooner), the rest of the family,
    the extra seeds, then the re-param ablation. Tables list the family by (seed, kernel)."""
    base = {"channels": tuple(settings.channels), "layers": tuple(settings.layers)}
    for k in kernels:
        if k not in FAMILY_MODELS:
            raise ErfLabError(f"kernel {k} is not in the family {sorted(FAMILY_MODELS)}")
    family = [StudyModel(f"K{k}-seed{seeds[0]}", FAMILY_MODELS[k], base, seeds[0], "family", k) for k in kernels]
    family += [StudyModel(f"K{k}-seed{s}", FAMILY_MODELS[k], base, s, "family", k)
               for s in seeds[1:] for k in seeded_kernels if k in kernels]
    if not guidelines:
        return family
    mw, ms = {"width_mult": settings.mobilenet_width}, settings.mobilenet_input_size
    mobilenets = [StudyModel("MNv2-k13-seed0", "mobilenetv2_k13", mw, seeds[0], "guideline", 13, ms),
                  StudyModel("MNv2-k13-noshortcut-seed0", "mobilenetv2_k13_noshortcut", mw, seeds[0], "guideline",
                             13, ms)]
    reparam = StudyModel("K31-noreparam-seed0", "replknet_31b", {**base, "small_kernel": None}, seeds[0],
                         "guideline", 31)
    return family[:3] + mobilenets + family[3:] + [reparam]


def check_study(settings: StudySettings, models: list[StudyModel], *, jobs: int, threads: int | None) -> None:
    """Every check that needs no training, before the study folder is touched: ErfLabError (one line) naming the
    study's own option."""
    from erf_lab.erf.runner import MAX_INPUT_SIZE, layer_geometry
    from erf_lab.models import create_model
    from erf_lab.train.cue_world import MAX_SPLIT_SIZE
    from erf_lab.train.data import per_cpu_cap
    from erf_lab.train.probes import ProbeSpec

    s = settings
    s.recipe().validate()
    for name, v in (("--jobs", jobs), ("--threads", threads), ("--train-size", s.train_size)):
        if v is not None and int(v) < 1:
            raise ErfLabError(f"{name} must be at least 1, got {v}")
    if not 8 <= int(s.input_size) <= 4096:
        raise ErfLabError(f"--input-size must be in [8, 4096], got {s.input_size}")
    if not 1 <= int(s.erf_input_size) <= MAX_INPUT_SIZE:
        raise ErfLabError(f"--erf-input-size must be in [1, {MAX_INPUT_SIZE}], got {s.erf_input_size}")
    if threads is not None and int(threads) > per_cpu_cap():
        raise ErfLabError(f"--threads must be at most {per_cpu_cap()} (4 per CPU of this machine), got {threads}")
    if int(s.train_size) > MAX_SPLIT_SIZE:
        raise ErfLabError(f"--train-size must be at most {MAX_SPLIT_SIZE:,} (new cue-world images per epoch), "
                          f"got {int(s.train_size):,}")
    if int(s.train_size) < int(s.batch_size):
        raise ErfLabError(f"--train-size {s.train_size} is smaller than the study's batch of {s.batch_size} images "
                          f"(no training step would run); give --train-size {s.batch_size} or more")
    for m in models:
        size, erf_size = m.sizes(s)
        ProbeSpec(size, s.probe_size, NUM_CLASSES, s.world_seed).validate()
        try:
            layer_geometry(create_model(m.model, **m.overrides, num_classes=NUM_CLASSES), None, erf_size)
        except ErfLabError:
            raise ErfLabError(f"--erf-input-size {s.erf_input_size} is too small: {m.name} would be measured at "
                              f"{erf_size} px, under its total stride") from None


def trained_run(run: Path) -> dict | None:
    """The run.json of a finished training run in ``run`` (it has its ``final`` epoch), else None (not trained, or
    not yet)."""
    from erf_lab.io import read_json_or_none

    info = read_json_or_none(run / "run.json")
    return info if isinstance(info, dict) and "final" in info else None


def train_one(m: StudyModel, settings: StudySettings, runs: Path, threads: int | None = None) -> dict:
    """Train one model (kept when complete, resumed when interrupted); returns its run.json plus wall time."""
    import torch

    from erf_lab.train.checkpoints import STATE_FILE
    from erf_lab.train.loop import train

    if threads:
        torch.set_num_threads(int(threads))
    out = runs / m.name
    if (info := trained_run(out)) is not None:
        # a finished run is kept only when it is this model at these settings (a study.json that was damaged or
        # removed no longer guards the folder: its runs of other settings were reported as this study's)
        s = info.get("settings") or {}
        have = {**{k: s.get(k) for k in ("model", "overrides", "input_size", "train_size", "val_size", "seed")},
                **{k: (s.get("recipe") or {}).get(k) for k in ("epochs", "batch_size", "lr")}}
        want = {"model": m.model, "overrides": _jsonable(dict(m.overrides)), "input_size": m.sizes(settings)[0],
                "train_size": settings.train_size, "val_size": settings.val_size, "seed": m.seed,
                "epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr}
        diff = [k for k in want if have[k] != want[k]]
        if diff:
            raise ErfLabError(f"{out} holds a training run of other settings ({len(diff)} differ, e.g. {diff[0]}: "
                              f"{have[diff[0]]!r} there, {want[diff[0]]!r} now); use another --out")
        return info
    from tqdm import tqdm

    t0 = time.time()
    tqdm.write(f"[{m.name}] training {m.model} {m.overrides}")
    res = train(m.model, "cue-world", out=out, overrides=dict(m.overrides), recipe=settings.recipe(),
                input_size=m.sizes(settings)[0], train_size=settings.train_size, val_size=settings.val_size,
                resample=True, seed=m.seed, resume=(out / STATE_FILE).is_file(),
                force=not (out / STATE_FILE).is_file(), show_progress=False,
                argv=["erf-lab", "study", "kernel-family", f"({m.name})"],
                resume_hint="run the same 'erf-lab study' command again to continue the study",
                diverge_hint=f"the study's recipe does not train {m.name} at these settings; delete {out} to try "
                             "again, or run the study into another --out with other --channels / --layers / "
                             "--input-size",
                # the study has no --warmup-epochs: its recipe's warm-up is fixed, its --epochs is what a user sets
                warmup_option=None, warmup_hint=f"the study's warm-up is fixed: run it with --epochs "
                                                f"{math.floor(settings.recipe().warmup_epochs) + 1} or more")
    f = res["run_info"]["final"]
    tqdm.write(f"[{m.name}] done in {time.time() - t0:.0f} s: val acc {f['val_acc']:.3f}")
    return res["run_info"]


def measure_one(m: StudyModel, settings: StudySettings, study: Path) -> dict:
    """ERF (at ``erf_input_size``) and cue-world probes of a trained study model (cached)."""
    from erf_lab.train.probes import ProbeSpec
    from erf_lab.train.timeline import cue_world_images, measure_checkpoint

    s = settings
    size, erf_size = m.sizes(s)
    images = cue_world_images(study / f"erf-images-{erf_size}px", s.erf_images, erf_size, NUM_CLASSES,
                              s.world_seed)
    return measure_checkpoint(m.model, study / "runs" / m.name / "model.safetensors",
                              {**m.overrides, "num_classes": NUM_CLASSES}, erf_dir=study / f"erf-{erf_size}px" / m.name,
                              probe_file=study / "probes" / f"{m.name}.json", images=images,
                              num_images=s.erf_images, input_size=erf_size, train_size=size,
                              probe_spec=ProbeSpec(size, s.probe_size, NUM_CLASSES, s.world_seed))


def _job(m: StudyModel, settings: StudySettings, study: Path, threads: int | None) -> dict:
    info = train_one(m, settings, study / "runs", threads)
    meas = measure_one(m, settings, study)
    return {"name": m.name, "info": info, "erf": meas["erf"], "erf_flags": meas["erf_flags"], "probe": meas["probe"]}


def run_study(out, settings: StudySettings = StudySettings(), *, jobs: int = 1, threads: int | None = None,
              guidelines: bool = True, kernels=(3, 7, 13, 31), seeds=(0, 1), show_progress: bool = True,
              warnings_as: str | None = None) -> dict:
    """Train and measure every model of :func:`plan` (``jobs`` processes at once, ``threads`` torch threads
    each), then write ``family.csv`` / ``guidelines.csv``, ``results.md`` and ``family.png`` / ``.pdf``. A study
    folder continues only with its own settings (ErfLabError otherwise; the model list may change). A progress
    bar (models done, with ETA) unless ``show_progress`` is False. ``warnings_as``: the command whose one-line
    warnings (:func:`erf_lab.cli.options.warnings_as_lines`) the ``jobs`` > 1 processes say theirs as."""
    from erf_lab.io import hold_folder, prepare_out_dir, progress, read_json_or_none, refuse_other_result, write_json

    models = plan(settings, kernels=kernels, seeds=seeds, guidelines=guidelines)
    check_study(settings, models, jobs=jobs, threads=threads)
    refuse_other_result(out, "study")  # its own runs/ and erf-*/ sub-folders are checked by train and run_erf
    new = _jsonable(asdict(settings))
    old = read_json_or_none(Path(out).expanduser() / "study.json")
    if not isinstance(old, dict) and (Path(out).expanduser() / "study.json").is_file():  # unreadable, or a list...
        raise ErfLabError(f"{Path(out) / 'study.json'} is damaged (not a JSON object), so the settings of the study "
                          "in it are unknown; delete it to continue the study there (its trained runs are checked "
                          "against the settings) or use another --out")
    if isinstance(old, dict):  # its runs and measurements are reused: they must be of these settings
        diff = [k for k in new if (old.get("settings") or {}).get(k) != new[k]]
        if diff:
            k = diff[0]
            raise ErfLabError(f"{out} holds a study made with other settings ({len(diff)} differ, e.g. {k}: "
                              f"{(old.get('settings') or {}).get(k)!r} there, {new[k]!r} now); repeat its command "
                              f"to continue it, or use another --out")
    study = prepare_out_dir(out)
    # held while it writes: the same study again in another shell trained and measured the same models beside it
    # its own sub-folders cleaned of a killed study's temporary files; runs/ and erf-*px/ hold and clean their own
    with hold_folder(study, subfolders=("probes", "erf-images-*px")):
        from erf_lab.provenance import finished, provenance

        how = provenance("study", new, sys.argv)  # where, with which versions and when (as sweep.json, timeline.json)
        record, started = {"settings": new, "models": [_jsonable(asdict(m)) for m in models], "command": sys.argv,
                           **{k: how[k] for k in ("cwd", "versions", "host", "time")}}, time.monotonic()
        write_json(study / "study.json", record)
        results = {}
        # the study's own bar (hours at the shipped size): models done and the ETA; the lines of each model's
        # training are written above it. Models trained by an earlier run of the study count from the start: they
        # come back in seconds, and as steps of the bar they made the ETA of a continued study seconds for hours
        trained = {m.name for m in models if trained_run(study / "runs" / m.name) is not None}
        bar = progress(total=len(models), initial=len(trained), desc="study", unit="model", disable=not show_progress)

        def done(r):  # the tables so far after every model: an interrupted study still leaves valid tables
            results[r["name"]] = r
            bar.write(f"[{r['name']}] measured: shape bias {r['probe']['shape_bias']}, "
                      f"area@50% {r['erf'].get('area@50%')}")
            write_results(study, [_row(m, results[m.name]) for m in models if m.name in results], settings,
                          planned=len(models))
            if r["name"] not in trained:
                bar.update(1)

        try:
            if jobs == 1:
                for m in models:
                    done(_job(m, settings, study, threads))
            else:  # the ERF images the workers share, rendered before them: two workers rendering at once collided
                from erf_lab.train.timeline import cue_world_images

                for erf_size in sorted({m.sizes(settings)[1] for m in models}):
                    cue_world_images(study / f"erf-images-{erf_size}px", settings.erf_images, erf_size, NUM_CLASSES,
                                     settings.world_seed)
                in_processes(_job, [(m, settings, study, threads) for m in models], int(jobs), done,
                             labels=[m.name for m in models], warnings_as=warnings_as)
        finally:
            bar.close()
        write_json(study / "study.json", {**record, **finished(started)})  # finished: its end and duration
    rows = [_row(m, results[m.name]) for m in models]
    return {"rows": rows, "out_dir": study}


def in_processes(fn, calls: list[tuple], jobs: int, done, labels: list[str] | None = None,
                 warnings_as: str | None = None) -> None:
    """``fn(*args)`` for each ``args`` of ``calls`` in ``jobs`` spawned processes, ``done(result)`` as each one
    finishes. A call is handed to the pool only when a process is free, so a stop or an error leaves only the calls
    under way to wait for (Ctrl-C, which a terminal sends the workers too: each saves the state of its model and
    stops). Before, every call was queued at once and leaving the pool ran them all: a Ctrl-C'd 'study --jobs N'
    went on training its remaining models first. A process that ends abruptly (killed, out of memory) is one
    ErfLabError naming its call's label (``labels``, default the call's index), not a BrokenProcessPool traceback.
    The workers end with the study's process, a SIGKILL of it included (:func:`_end_with_parent`). ``warnings_as``:
    the command whose one-line warnings the workers say theirs as (else Python's format)."""
    import contextlib
    import multiprocessing as mp
    import os
    import signal
    import threading
    from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, ProcessPoolExecutor, wait

    todo = list(zip(labels or [f"call {i}" for i in range(len(calls))], calls))[::-1]
    under_way = {}  # future -> label
    ex = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_end_with_parent,
                             initargs=(os.getpid(),))

    def on_term(signum, frame):  # kill PID of the study: each worker stops as a training run does on kill (after
        # a step, its state saved), then the study ends as on Ctrl-C. Before, the study's process died at once and
        # its workers trained on as orphans, holding their run folders.
        for proc in list((getattr(ex, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGTERM)
        raise KeyboardInterrupt

    take_term = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a caller's own handler stays
    if take_term:
        signal.signal(signal.SIGTERM, on_term)
    try:
        while todo or under_way:
            while todo and len(under_way) < jobs:
                label, args = todo.pop()
                under_way[ex.submit(_in_worker, os.getpid(), warnings_as, fn, *args)] = label
            finished, _ = wait(set(under_way), return_when=FIRST_COMPLETED)
            for fut in finished:
                label = under_way.pop(fut)
                try:
                    result = fut.result()
                except BrokenExecutor:
                    raise ErfLabError(f"the process running {label} ended abruptly (killed, or out of memory?); what "
                                      f"had finished is kept: run the same command again to continue (with fewer "
                                      f"--jobs if memory ran out)") from None
                done(result)
    finally:
        try:
            ex.shutdown(wait=True, cancel_futures=True)
        finally:
            if take_term:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _end_with_parent(parent: int) -> None:
    """In a worker of :func:`in_processes`: once the study's process ``parent`` is gone (SIGKILL, the OOM killer),
    SIGTERM itself, as the study's own SIGTERM handler would: a model under way stops after its step, its state
    saved (:func:`_in_worker` then ends the process), an idle worker ends. Before, the workers lived on for good,
    blocked on a queue nobody fed, holding the terminal's pipes (``erf-lab study ... | tee study.log`` never ended)."""
    import os
    import signal
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="erf-lab: end with the study", daemon=True).start()


def _in_worker(parent: int, warnings_as: str | None, fn, *args):
    """``fn(*args)`` in a worker of :func:`in_processes`, its warnings as the command ``warnings_as`` says them
    (a spawned process has Python's format); the process ends after it when the study's process ``parent`` is gone
    (no one takes its result, and it would wait for the next call for good)."""
    import contextlib
    import os

    from erf_lab.cli.options import warnings_as_lines

    try:
        with warnings_as_lines(warnings_as) if warnings_as else contextlib.nullcontext():
            return fn(*args)
    finally:
        if os.getppid() != parent:
            os._exit(1)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def _row(m: StudyModel, r: dict) -> dict:
    from erf_lab.shape_bias.analysis import at_chance

    info, erf, p = r["info"], r["erf"], r["probe"]
    return {"name": m.name, "group": m.group, "model": m.model, "kernel": m.kernel, "seed": m.seed,
            "train_px": info["settings"]["input_size"], "params": info["model_config"]["params"],
            "val_acc": info["final"]["val_acc"], **{k: erf.get(k) for k in ERF_KEYS},
            "shape_bias": p["shape_bias"], "shape_only_accuracy": p["shape_only_accuracy"],
            "texture_only_accuracy": p["texture_only_accuracy"],
            "img_per_s": round(float(info["final"]["img_per_s"]), 1),  # last epoch, on a shared CPU
            "erf_empty": "empty_map" in r["erf_flags"],
            "at_chance": at_chance(info["final"]["val_acc"], info["model_config"]["num_classes"],
                                   info["settings"]["val_size"])}


def _fmt(v, key: str) -> str:
    if v is None:
        return "n/r"  # threshold not reached inside the image
    if key.startswith("area@"):
        return f"{v:.2f}"
    if key in ("r_rms", "r50", "img_per_s"):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _cell(r: dict, key: str) -> str:
    if key in ERF_KEYS and r.get("erf_empty"):
        return "empty"
    return _fmt(r.get(key), key) + (" †" if key == "shape_bias" and r.get("at_chance") else "")


def markdown_table(rows: list[dict], keys) -> str:
    """The rows as a markdown table: an all-zero ERF map's metrics read "empty", the shape bias of a model at
    chance is marked "†" (:func:`table_notes` explains both)."""
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(_cell(r, k) for k in keys) + " |\n" for r in rows)


def table_notes(rows: list[dict]) -> str:
    """The note lines under a table for its "empty" and "†" cells ("" when there are none)."""
    from erf_lab.shape_bias.analysis import CHANCE_SE

    notes = []
    if any(r.get("erf_empty") for r in rows):
        notes.append("empty: the ERF map is all zeros (no gradient reached the input), so it has no area or radius.")
    if any(r.get("at_chance") for r in rows):
        notes.append(f"†: val_acc at chance (within {CHANCE_SE:g} standard errors of 1 / classes): the model has "
                     "not learned the task, so its shape bias means nothing.")
    return "".join(f"\n{n}\n" for n in notes)


def write_results(study: Path, rows: list[dict], settings: StudySettings, planned: int | None = None) -> None:
    """``family.csv`` / ``guidelines.csv``, ``results.md`` and ``family.png`` / ``.pdf`` of the ``rows`` measured
    so far; with fewer than ``planned`` rows, results.md opens with a note that the study is incomplete."""
    from erf_lab.erf.tables import csv_text
    from erf_lab.io import write_text

    fam = sorted((r for r in rows if r["group"] == "family"), key=lambda r: (r["seed"], r["kernel"]))
    if not rows:
        return
    gl = [r for r in rows if r["group"] == "guideline"]
    keys = ["name", "train_px", "params", "val_acc", "area@20%", "area@30%", "area@50%", "area@99%", "r_rms", "r50",
            "shape_bias", "shape_only_accuracy", "texture_only_accuracy", "img_per_s"]
    s = settings
    todo = f"**Incomplete: {len(rows)} of {planned} models measured** (the study stopped or is still running; run " \
        f"its command again to continue).\n\n" if planned is not None and len(rows) < planned else ""
    text = (f"# Kernel-family study on cue-world\n\n{todo}RepLKNet family at channels={tuple(s.channels)}, "
            f"layers={tuple(s.layers)}; {s.epochs} epochs x {s.train_size} new cue-world images at {s.input_size} px "
            f"(batch {s.batch_size}, AdamW lr {s.lr}, cosine, 1 warm-up epoch, label smoothing 0.1), val on "
            f"{s.val_size} images. ERF: {s.erf_images} cue-world val images at {s.erf_input_size} px, i.e. "
            f"{s.erf_input_size / s.input_size:g}x the training size (train_px) of each model (area ratios in "
            f"% of the image, n/r = not reached inside it; r_rms / r50 in pixels). Shape bias: {s.probe_size} "
            f"cue-conflict images, shape hits / (shape + texture hits).\n\n## Kernel family\n\n"
            + markdown_table(fam, keys) + table_notes(fam))
    if fam:  # runs finish in any order: a guideline model may be the only one done yet
        write_text(study / "family.csv", csv_text(fam, list(fam[0])))
    if gl:
        ref = [r for r in fam if r["name"] == "K31-seed0"]
        text += ("\n## Guidelines (Table 2: shortcuts; Table 4: small-kernel re-param)\n\n"
                 + markdown_table(ref + gl, keys) + table_notes(ref + gl))
        write_text(study / "guidelines.csv", csv_text(ref + gl, list((ref + gl)[0])))
    write_text(study / "results.md", text)
    if fam:
        plot_family(study, fam, s)


def plot_family(study: Path, fam: list[dict], settings: StudySettings, formats=("png", "pdf")) -> list[Path]:
    """Seed-0 ERF maps of the family side by side, then area@50 %, r_rms, shape bias and val accuracy against
    kernel size (every seed a point, seed 0 joined by a line; the shape bias of a model at chance hollow, as the
    table's †)."""
    from erf_lab.erf.plotting import PAGE_WIDTH_IN, _colorbar, _heatmap, _new_figure, _style, display_map
    from erf_lab.io import save_figure

    seed0 = sorted((r for r in fam if r["seed"] == min(x["seed"] for x in fam)), key=lambda r: r["kernel"])
    with _style(print_sizes=True):  # a page's text width, in the sizes it prints at (it was 9 in or wider)
        fig = _new_figure((PAGE_WIDTH_IN, 4.4))
        top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1])
        strip = top.subplots(1, len(seed0), squeeze=False)[0]
        for ax, r in zip(strip, seed0):
            erf = np.load(study / f"erf-{settings.erf_input_size}px" / r["name"] / "erf.npy", allow_pickle=False)
            image = _heatmap(ax, display_map(erf), f"K = {r['kernel']}")
        _colorbar(top, image, list(strip), None)  # what the colours are, as every ERF figure says
        top.suptitle(f"trained on cue-world ({settings.input_size} px), ERF at {settings.erf_input_size} px",
                     fontsize=9)
        axes = bottom.subplots(1, 4)
        for ax, (key, label) in zip(axes, (("area@50%", "area ratio t = 50 % (%)"), ("r_rms", "r_rms (px)"),
                                           ("shape_bias", "shape bias"), ("val_acc", "val accuracy"))):
            pts = [(r["kernel"], r[key]) for r in fam if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="0.5", markersize=4, label="every seed")
            line = [(r["kernel"], r[key]) for r in seed0 if r.get(key) is not None]
            drawn = ax.plot([p[0] for p in line], [p[1] for p in line], "o-", markersize=5,
                            label=f"seed {seed0[0]['seed']}")[0]
            bad = [(r["kernel"], r[key]) for r in fam if key == "shape_bias" and r.get("at_chance")
                   and r.get(key) is not None]
            if bad:  # the table's †: a model at chance has no shape bias to speak of
                ax.plot([p[0] for p in bad], [p[1] for p in bad], "o", markersize=8, color=drawn.get_color(),
                        markerfacecolor="white", label="† at chance: means nothing", zorder=3)
            ax.set_xticks(sorted({r["kernel"] for r in fam}))
            ax.set_xlabel("kernel size")
            ax.set_ylabel(label)
            ax.grid(True, linewidth=0.4, alpha=0.5)
        # one legend under the panels (the † entry inside the shape-bias panel covered its points and ticks)
        handles = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
        bottom.legend(*handles, loc="outside lower center", ncols=len(handles[0]), frameon=False)
        return save_figure(fig, study / "family", tuple(formats))


def redraw_family(folder, formats=None) -> list[Path]:
    """Draw a shipped study's ``family.png`` (:func:`ship`'s ``dest``) again with the current :func:`plot_family`
    from what is shipped: the settings of ``study.json``, the rows of ``family.csv`` and the ERF maps of the seed-0
    models measured again from their shipped weights as the study measured them (:func:`measure_one`: the same
    images, size and model; seconds at the study's size). ``formats``: default, those the folder has. Returns the
    written paths."""
    import csv
    import io
    import tempfile

    from erf_lab.erf.plotting import FORMATS
    from erf_lab.erf.runner import ErfSpec, run_erf
    from erf_lab.io import atomic_path, read_json_or_none
    from erf_lab.shape_bias.analysis import at_chance
    from erf_lab.train.timeline import cue_world_images

    folder = Path(folder).expanduser()
    meta = read_json_or_none(folder / "study.json")
    if not isinstance(meta, dict) or not (folder / "family.csv").is_file():
        raise ErfLabError(f"{folder} is not a shipped study (study.json and family.csv)")
    s = StudySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()})
    models = {m["name"]: m for m in meta["models"]}

    def value(v: str):  # a family.csv cell: "" is None (not reached), numbers and booleans as such
        if v in ("True", "False"):
            return v == "True"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return None if v == "" else v

    table = csv.DictReader(io.StringIO((folder / "family.csv").read_text()))
    fam = [{k: value(v) for k, v in r.items()} for r in table]
    for r in fam:  # not a column of the table: from its val accuracy, as the study's rows
        r["at_chance"] = at_chance(r["val_acc"], NUM_CLASSES, s.val_size)
    formats = formats or tuple(f for f in FORMATS if (folder / f"family.{f}").is_file()) or ("png", "pdf")
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp)
        images = cue_world_images(study / f"erf-images-{s.erf_input_size}px", s.erf_images, s.erf_input_size,
                                  NUM_CLASSES, s.world_seed)
        for r in fam:
            if r["seed"] == min(x["seed"] for x in fam):  # the maps plot_family shows
                m = models[r["name"]]
                spec = ErfSpec(m["model"], weights=str(folder / f"{r['name']}.safetensors"),
                               overrides={**m["overrides"], "num_classes": NUM_CLASSES}, images=str(images),
                               num_images=s.erf_images, input_size=s.erf_input_size, train_size=s.input_size)
                run_erf(spec, out=study / f"erf-{s.erf_input_size}px" / r["name"], show_progress=False)
        written = []
        for path in plot_family(study, fam, s, formats):
            with atomic_path(folder / path.name) as target:
                shutil.copyfile(path, target)
            written.append(folder / path.name)
    return written


def redraw_shipped(folder) -> list[Path]:
    """Every figure of a shipped study folder drawn again with the current plotting code (after a change of the
    figures' style): ``family.png`` (:func:`redraw_family`) and each ``timeline/NAME/timeline.png`` / ``.pdf``
    (:func:`erf_lab.train.timeline.redraw_timeline`). Returns the written paths."""
    from erf_lab.train.timeline import STRIP_FILE, redraw_timeline

    folder = Path(folder).expanduser()
    return redraw_family(folder) + [p for strip in sorted(folder.glob(f"timeline/*/{STRIP_FILE}"))
                                    for p in redraw_timeline(strip.parent)]


def check_ship(study, dest) -> Path:
    """``dest`` (``~`` expanded) made and writable for :func:`ship`; ErfLabError (one line) when it cannot be, or
    when it is the study folder itself (its results.md, family.csv ... would be copied onto themselves: a
    SameFileError traceback after the study, with the models already copied in beside its runs)."""
    from erf_lab.io import prepare_out_dir

    if Path(dest).expanduser().resolve() == Path(study).expanduser().resolve() and str(dest):  # "": one line below
        raise ErfLabError(f"--ship {dest} is the study folder itself; ship to another folder (e.g. "
                          f"data/trained/cue-world)")
    return prepare_out_dir(dest, what="--ship")


def ship(study, dest, *, subset: int = 200) -> list[Path]:
    """Copy every trained model of the study folder to ``dest/<name>.safetensors`` with its record
    ``<name>.json`` (model, overrides, classes, training settings, val accuracy, the correct count on the first
    ``subset`` val images) and ``<name>.metrics.csv``; plus the study's results and log. Returns the files.
    Holds ``dest`` while it copies (:func:`erf_lab.io.hold_folder`; ErfLabError, one line, while another process
    holds it): two studies shipping into one folder at once mixed their models, records and results there."""
    from erf_lab.io import hold_folder, read_json_or_none

    study, dest = Path(study).expanduser(), Path(dest).expanduser()
    meta = read_json_or_none(study / "study.json")
    if not isinstance(meta, dict):
        raise ErfLabError(f"{study} is not a study folder (no study.json)")
    with hold_folder(check_ship(study, dest), what="--ship"):
        return _ship_files(study, dest, meta, subset)


def _ship_files(study: Path, dest: Path, meta: dict, subset: int) -> list[Path]:
    """:func:`ship`'s copies into ``dest`` (made and held), each written atomically: a ship stopped mid-copy left a
    truncated model or table under the name of a whole one (``builtin:`` loaded it); the earlier file stays instead."""
    from erf_lab.io import (atomic_path, read_json_or_none, record_complete, remove_write_leftovers, write_json,
                            write_text)
    from erf_lab.models import create_model
    from erf_lab.train.timeline import STRIP_FILE, write_strip

    def copy(src: Path, dst: Path) -> None:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)

    remove_write_leftovers(dest, *(f"timeline/{m['name']}" for m in meta["models"]))  # of a ship killed mid-copy
    files = []
    for m in meta["models"]:
        run = study / "runs" / m["name"]
        if (info := trained_run(run)) is None:
            continue  # not trained (yet)
        s = info["settings"]
        overrides = {**s["overrides"], "num_classes": info["model_config"]["num_classes"]}
        net = create_model(m["model"], weights=run / "model.safetensors", **overrides)
        correct = val_subset_correct(net, subset, s["input_size"], overrides["num_classes"], s["seed"])
        copy(run / "model.safetensors", dest / f"{m['name']}.safetensors")
        copy(run / "metrics.csv", dest / f"{m['name']}.metrics.csv")
        write_json(dest / f"{m['name']}.json", {
            "model": m["model"], "overrides": s["overrides"], "num_classes": overrides["num_classes"],
            "input_size": s["input_size"], "seed": s["seed"], "group": m["group"], "kernel": m["kernel"],
            "val_acc": info["final"]["val_acc"], "val_size": s["val_size"],
            "val_subset": {"size": subset, "correct": correct, "world_seed": s["seed"]},
            "settings": s, "params": info["model_config"]["params"], "wall_s": info.get("wall_s_this_session")})
        files += [dest / f"{m['name']}{ext}" for ext in (".safetensors", ".json", ".metrics.csv")]
        if record_complete(read_json_or_none(run / "timeline" / "timeline.json")):  # erf-lab timeline's, finished
            # (one interrupted has no figure yet): shipped for the app
            (dest / "timeline" / m["name"]).mkdir(parents=True, exist_ok=True)
            for name in ("timeline.json", "timeline.csv", "timeline.png", "timeline.pdf"):
                if name.endswith((".png", ".pdf")) and not (run / "timeline" / name).is_file():
                    continue  # a timeline made with --formats png (or pdf) has only that figure
                copy(run / "timeline" / name, dest / "timeline" / m["name"] / name)
                files.append(dest / "timeline" / m["name"] / name)
            # the strip's maps as their colours: the checkpoints are not shipped (redraw_timeline draws from it)
            files.append(write_strip(run / "timeline", dest / "timeline" / m["name"] / STRIP_FILE))
    for name in ("results.md", "family.csv", "guidelines.csv", "family.png", "family.pdf", "study.json", "study.log"):
        if (study / name).is_file():
            copy(study / name, dest / name)
            files.append(dest / name)
    command = "erf-lab " + " ".join(str(a) for a in (meta.get("command") or ["", "study", "kernel-family"])[1:])
    results = (study / "results.md").read_text() if (study / "results.md").is_file() else ""
    write_text(dest / "README.md", (
        "# Trained on cue-world: the RepLKNet kernel family (and two guideline ablations)\n\n"
        f"Made with\n\n    OMP_NUM_THREADS=1 {command}\n\n"
        "(`study.log` is its log, `study.json` its settings; each model's `NAME.metrics.csv` its training curve.) "
        "Use a model by name: `create_model(record['model'], weights='builtin:cue-world/NAME')` applies the "
        "options of `NAME.json`; on the command line `--model replknet_31b --weights builtin:cue-world/K31-seed0`. "
        f"`NAME.json` also records the correct count on the first {subset} val images, which "
        "tests/test_trained_weights.py checks.\n\n" + results.split("\n", 1)[-1].rstrip("\n") + "\n\n## Figures\n\n"
        "`family.png` and `timeline/NAME/timeline.png` / `.pdf` are drawn by the current plotting code (a test checks "
        "it); `erf_lab.train.study.redraw_shipped(FOLDER)` draws them again from the files here: `family.png` from "
        "`family.csv`, `study.json` and the seed-0 ERFs measured again from the weights, each timeline from its "
        "`timeline.json` and `strip.npz` (the checkpoints are not shipped: the maps of its strip as the figure shows "
        "them, each cell's colour index, `erf_lab.erf.plotting.display_levels`).\n"))
    files.append(dest / "README.md")
    return files


def val_subset_correct(model, size: int, input_size: int, num_classes: int, seed: int) -> int:
    """Correct top-1 answers of ``model`` on the first ``size`` cue-world val images (the shipped check)."""
    import torch

    from erf_lab.train.cue_world import draw_class, render_batch
    from erf_lab.train.probes import predict

    images = render_batch("val", range(size), input_size, num_classes, seed)
    labels = torch.tensor([draw_class("val", i, num_classes, seed) for i in range(size)])
    return int((torch.from_numpy(predict(model, images)) == labels).sum())


__all__ = ["StudySettings", "StudyModel", "plan", "run_study", "ship", "val_subset_correct", "FAMILY_MODELS",
           "markdown_table"]
