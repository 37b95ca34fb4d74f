"""ERF and cue-world shape bias across training: every saved checkpoint of an ``erf-lab train`` run, epoch 0
(the initialisation) included.

Per checkpoint, the ERF is measured through the one runner (:func:`erf_lab.erf.runner.run_erf`, the paper's
protocol: Ding et al., CVPR 2022, Sec. 3 / App. C) into ``RUN/timeline/erf-<S>px/epoch_XXX`` with ``reuse``,
and the probes of :mod:`erf_lab.train.probes` into ``RUN/timeline/probe-<S>px/epoch_XXX.json``; both are
caches keyed by the checkpoint's hash and the settings, so a second call measures only new checkpoints.
Writes ``RUN/timeline/timeline.csv`` / ``.json`` and ``timeline.png`` / ``.pdf``; ``timeline.json`` from the start,
``"complete": false`` until the end (:func:`erf_lab.io.command_record`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from erf_lab.errors import ErfLabError

#: ERF summary columns of the timeline (keys of :func:`erf_lab.erf.metrics.summary`)
AREA_KEYS = ("area@20%", "area@30%", "area@50%", "area@99%")


@dataclass
class TrainingRun:
    """What the timeline needs of a training run folder (complete or still running)."""

    root: Path
    settings: dict
    num_classes: int
    checkpoints: dict  # epoch -> weights file
    metrics: dict  # epoch -> metrics.csv row
    ema_checkpoints: dict = field(default_factory=dict)  # epoch -> its EMA weights' file (epoch_NNN_ema.safetensors)


def read_training_run(run_dir: str | os.PathLike) -> TrainingRun:
    """The settings (``run.json``, or the resume state of a run still in progress), checkpoints and metrics of a
    training run; ErfLabError for a folder that is no training run or has no checkpoint."""
    import torch

    from erf_lab.io import read_json_or_none
    from erf_lab.train.checkpoints import STATE_FILE

    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise ErfLabError(f"no such training run folder: {root}" if not root.exists()
                          else f"{root} is a file, not a training run folder")
    info = read_json_or_none(root / "run.json")
    if isinstance(info, dict) and isinstance(info.get("settings"), dict) and "model_config" in info:
        settings = info["settings"]
        num_classes = (info["model_config"] or {}).get("num_classes") if isinstance(info["model_config"], dict) \
            else None
        if type(num_classes) is not int or num_classes < 1:
            raise ErfLabError(f"{root}/run.json: model_config.num_classes must be a positive integer, got "
                              f"{num_classes!r}")
    elif (root / STATE_FILE).is_file():  # a run in progress: its resume point holds the settings
        try:
            settings = torch.load(root / STATE_FILE, map_location="cpu", weights_only=True)["settings"]
        except Exception as e:  # any unreadable state: one line
            raise ErfLabError(f"cannot read the training state of {root} ({type(e).__name__})") from None
        num_classes = None
    else:
        raise ErfLabError(f"{root} is not an erf-lab training run (no run.json with training settings, no "
                          f"{STATE_FILE}); make one with 'erf-lab train'")
    from erf_lab.checkpoint import EPOCH_FILE

    ckpts, ema_ckpts = {}, {}
    for p in sorted((root / "checkpoints").glob("epoch_*")):
        m = EPOCH_FILE.match(p.name)
        found = ema_ckpts if m and m.group(2) else ckpts
        if m and (int(m.group(1)) not in found or m.group(3) == "safetensors"):
            found[int(m.group(1))] = p
    if not ckpts:
        raise ErfLabError(f"{root} holds no checkpoint (checkpoints/epoch_XXX.safetensors or .pth)")
    metrics = {}
    if (root / "metrics.csv").is_file():
        try:
            for row in csv.DictReader(io.StringIO((root / "metrics.csv").read_text())):
                metrics[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, csv.Error) as e:
            raise ErfLabError(f"{root / 'metrics.csv'} is damaged ({type(e).__name__}: {str(e)[:120]}), not what "
                              f"'erf-lab train' writes; restore it or move it away to measure without val "
                              f"accuracies") from None
    for key, kind in (("model", str), ("input_size", int), ("seed", int), ("overrides", (dict, type(None)))):
        v = settings.get(key)
        if key != "overrides" and key not in settings or not isinstance(v, kind) or isinstance(v, bool) or \
                (key == "input_size" and v < 1):
            raise ErfLabError(f"{root}: the training settings' {key} is {v!r}, not what 'erf-lab train' writes "
                              f"(a damaged run.json or state)")
    run = TrainingRun(root, settings, num_classes, ckpts, metrics, ema_ckpts)
    if num_classes is None:
        if str(settings.get("data")) != "cue-world":
            raise _not_cue_world(run)
        run.num_classes = int(settings["num_classes"])
    return run


def _not_cue_world(run: TrainingRun) -> ErfLabError:
    """The refusal of a run trained on an image folder (the probe draws cue-world images of the run's classes), with
    the command that measures the ERF of one of its checkpoints: the model as it was trained, the last checkpoint,
    the folder's val/ images, the training size."""
    import shlex

    from erf_lab.checkpoint import override_options, training_classes
    from erf_lab.io import read_json_or_none

    data, epoch = run.settings.get("data"), max(run.checkpoints)
    weights = run.checkpoints[epoch]
    num_classes = run.num_classes
    if num_classes is None:  # a run in progress: the class names its checkpoints record
        with contextlib.suppress(ErfLabError, OSError, ValueError):
            num_classes = len(training_classes(weights)[0] or []) or None
    info = read_json_or_none(run.root / "run.json")
    described = info.get("data") if isinstance(info, dict) else None
    # the folder as training resolved it (--data may have been relative to another working directory)
    folder = described["root"] if isinstance(described, dict) and isinstance(described.get("root"), str) else data
    overrides = {**(run.settings.get("overrides") or {}), **({"num_classes": num_classes} if num_classes else {})}
    command = " ".join(["erf-lab compute --model", shlex.quote(run.settings["model"]), override_options(overrides),
                        "--weights", shlex.quote(str(weights)), "--images", shlex.quote(str(Path(str(folder)) / "val")),
                        "--input-size", str(run.settings["input_size"])])
    return ErfLabError(f"{run.root}: the timeline's shape-bias probe needs a cue-world run (this one: {data}); "
                       f"measure the ERF of its checkpoints one at a time instead, e.g. epoch {epoch}'s: {command}")


def cue_world_images(folder: Path, num_images: int, input_size: int, num_classes: int, seed: int) -> Path:
    """The first ``num_images`` cue-world validation images at ``input_size`` px as PNG files in ``folder``
    (written once; the ERF runner reads them like any image folder). ``<folder>.json`` beside it records which
    world they are: when it names another (a run retrained with another seed or class count into the same folder), the
    folder's images are rendered again, not measured as this world's."""
    from PIL import Image

    from erf_lab.io import atomic_path, hold_file, hold_folder, read_json_or_none, write_json
    from erf_lab.train.cue_world import draw_scene, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    world = {"split": "val", "input_size": int(input_size), "num_classes": int(num_classes), "seed": int(seed)}
    record = folder.parent / f"{folder.name}.json"
    if read_json_or_none(record) == world and all((folder / f"val_{i:05d}.png").is_file() for i in range(num_images)):
        return folder  # written whole (the record comes last): read without the hold, as study's workers do at once
    # held, the record beside the folder too: a second writer waits or is refused, and the temporaries a killed
    # write left (of the record, of an image) go
    with hold_file(record), hold_folder(folder):
        if read_json_or_none(record) != world:
            record.unlink(missing_ok=True)
            for old in folder.glob("val_*.png"):
                old.unlink()
        for i in range(num_images):
            path = folder / f"val_{i:05d}.png"
            if not path.is_file():
                img = render_scene(draw_scene("val", i, num_classes, seed), input_size)
                with atomic_path(path) as tmp:
                    Image.fromarray(np.round(img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(tmp, format="PNG")
        write_json(record, world)
    return folder


def measure_checkpoint(model: str, weights, overrides: dict, *, erf_dir: Path, probe_file: Path, images: Path,
                       num_images: int, input_size: int, train_size: int, probe_spec, device: str = "cpu") -> dict:
    """ERF summary and cue-world probe of one checkpoint, each reused from its cache when the checkpoint and the
    settings are unchanged. Returns ``{"erf": summary row, "erf_flags": the map's flags, "probe": probe summary,
    "erf_dir", "measured": [...]}`` (``measured`` names what was computed now: "erf", "probe")."""
    from erf_lab.erf.metrics import summary as erf_summary
    from erf_lab.erf.runner import ErfSpec, run_erf
    from erf_lab.io import read_json_or_none, sha256_file, write_json
    from erf_lab.models import create_model
    from erf_lab.train.probes import probe

    measured = []
    spec = ErfSpec(model, weights=str(weights), overrides=dict(overrides), images=str(images),
                   num_images=num_images, input_size=input_size, train_size=train_size, device=device)
    res = run_erf(spec, out=erf_dir, reuse=True, show_progress=False)
    if not res["already_complete"]:
        measured.append("erf")
    key = {"weights_sha256": sha256_file(weights), "model": model,
           "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
           "probe": dict(probe_spec.__dict__)}
    cached = read_json_or_none(probe_file)
    if isinstance(cached, dict) and cached.get("key") == key:
        summ = cached["summary"]
    else:
        net = create_model(model, weights=weights, **overrides)
        summ = probe(net, probe_spec, device=device)["summary"]
        write_json(probe_file, {"key": key, "summary": summ})
        measured.append("probe")
    return {"erf": erf_summary(res["metrics"]), "erf_flags": list(res["metrics"].get("flags") or []), "probe": summ,
            "erf_dir": Path(res["out_dir"]), "measured": measured}


def cue_world_run(run_dir: str | os.PathLike):
    """:func:`read_training_run` of a run trained on cue-world; ErfLabError otherwise (the timeline's shape-bias
    probe draws cue-world images of the run's classes)."""
    run = read_training_run(run_dir)
    if run.settings.get("data") != "cue-world":
        raise _not_cue_world(run)
    return run


def ema_sources(run: TrainingRun) -> dict:
    """Epoch -> where the EMA of its weights is: ``checkpoints/epoch_NNN_ema.safetensors``; for epoch 0 the
    initialisation's file (the EMA starts as a copy of it); for a run of an earlier erf-lab, which kept it only inside
    the epoch's ``.pth`` (under ``model_ema``), that ``.pth``. ErfLabError when the run kept no EMA or an epoch has
    none (a safetensors-only run of an earlier erf-lab)."""
    import torch

    from erf_lab.checkpoint import ema_decay_of

    if ema_decay_of(run.settings) is None:
        raise ErfLabError(f"{run.root} was trained without an EMA of its weights (--ema 0): nothing for --ema to "
                          f"measure; leave --ema out to measure its weights")
    sources, missing = {}, []
    for epoch, path in sorted(run.checkpoints.items()):
        pth = path.with_suffix(".pth")
        if epoch == 0:
            sources[epoch] = path
        elif epoch in run.ema_checkpoints:
            sources[epoch] = run.ema_checkpoints[epoch]
        elif pth.is_file():
            try:
                holds = "model_ema" in torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # any unreadable file: reported with the others below
                holds = False
            if holds:
                sources[epoch] = pth
            else:
                missing.append(epoch)
        else:
            missing.append(epoch)
    if missing:
        raise ErfLabError(f"{run.root}: no EMA weights for epoch(s) {', '.join(map(str, missing))} (an erf-lab before "
                          f"epoch_NNN_ema.safetensors kept them only in the epochs' .pth files, and none in a "
                          f"safetensors-only run); leave --ema out to measure the raw weights")
    return sources


def _ema_file(source: Path, folder: Path, epoch: int, train_size: int) -> Path:
    """The weights file to measure for ``source`` (from :func:`ema_sources`): ``source`` itself for an EMA file or
    epoch 0's initialisation, else (an epoch's ``.pth``) its ``model_ema`` written as
    ``folder/epoch_NNN_ema.safetensors`` (the measurements are cached by the file's hash: the same tensors give the
    same file)."""
    import torch

    from erf_lab.checkpoint import epoch_stem
    from erf_lab.train.checkpoints import save_weights

    if source.suffix != ".pth" or epoch == 0:
        return source
    state = torch.load(source, map_location="cpu", weights_only=True)["model_ema"]
    return save_weights(state, folder / epoch_stem(epoch, ema=True), "safetensors", train_input_size=train_size)[0]


def trained_source(run: TrainingRun, overrides: dict) -> dict:
    """The training run a timeline summarises, for its ``derived_from`` (:func:`erf_lab.provenance.source_identity`):
    its folder, command and time, model, kernel sizes, seed and the SHA-256 of its run.json; of a run still in
    progress (no run.json yet), what its resume state's settings say, with the kernel sizes of the model they build
    (``overrides``: the run's, with its class count)."""
    from erf_lab.io import file_identity, is_training_record, read_json_or_none
    from erf_lab.provenance import source_identity

    record = read_json_or_none(run.root / "run.json")
    done = is_training_record(record)
    source = source_identity(run.root, record if done else {"settings": run.settings},
                             [file_identity(run.root / "run.json")] if done else ())
    if "kernel_sizes" not in source:  # a run in progress, or one of an erf-lab that did not record them
        import torch

        from erf_lab.models import create_model
        from erf_lab.models.summary import model_kernel_sizes

        with contextlib.suppress(ErfLabError, TypeError, ValueError, RuntimeError), torch.device("meta"):
            source["kernel_sizes"] = model_kernel_sizes(create_model(run.settings["model"], **overrides))
    if not done:
        source["in_progress"] = True  # its weights still change: later checkpoints may come
    return source


def timeline(run_dir: str | os.PathLike, *, input_size: int | None = None, num_images: int = 20,
             probe_size: int = 300, device: str = "cpu", formats=("png", "pdf"), show_progress: bool = True,
             out: str | os.PathLike | None = None, argv=None, on_progress=None, ema: bool = False) -> dict:
    """Measure every checkpoint of the training run ``run_dir`` (see the module docstring) and write the table
    and the figure into ``out`` (default ``RUN/timeline``; another folder for a read-only run). ``input_size``: ERF
    measurement size (default: the training size). ``timeline.json`` is written when the work starts
    (``"complete": false``, the checkpoints measured so far in ``rows``: an interrupted timeline's folder is
    recognised, and the same call again resumes from its caches) and complete last, with how it was made (command,
    argv, versions). ``on_progress(done, total)``: after each checkpoint (the app's progress bar). ``ema``: measure
    the EMA of the weights at each checkpoint (:func:`ema_sources`; default folder ``RUN/timeline-ema``), not the
    raw training weights. Returns ``{"rows", "out_dir", "measured": {"erf": n, "probe": n}, "weights_note"}``;
    ``weights_note`` (also in timeline.json) says which weights were measured where the run kept an EMA, else None."""
    from erf_lab.erf.tables import csv_text
    from erf_lab.io import (command_record, hold_folder, prepare_out_dir, progress, read_json_or_none,
                            refuse_other_result, write_text)
    from erf_lab.provenance import provenance
    from erf_lab.train.probes import ProbeSpec

    run = cue_world_run(run_dir)
    s = run.settings
    train_size = int(s["input_size"])
    from erf_lab.erf.runner import MAX_INPUT_SIZE

    if input_size is not None and not 1 <= int(input_size) <= MAX_INPUT_SIZE:
        raise ErfLabError(f"--input-size must be in [1, {MAX_INPUT_SIZE}], got {input_size}")
    size = int(input_size or train_size)
    if int(num_images) < 1 or int(probe_size) < 1:
        raise ErfLabError("--num-images and --probe-size must be at least 1")
    from erf_lab.erf.prepare import check_device

    check_device(device)  # before any folder or image is made (an unknown device failed after both)
    kind = "ema" if ema else "raw"
    sources = ema_sources(run) if ema else dict(run.checkpoints)
    default_out = run.root / ("timeline-ema" if ema else "timeline")
    refuse_other_result(default_out if out is None else out, "timeline")  # e.g. --out RUN_DIR itself
    before = read_json_or_none(Path(default_out if out is None else out).expanduser() / "timeline.json")
    if isinstance(before, dict) and before.get("weights_kind", "raw") != kind:  # one folder, one kind of weights
        other = "the EMA of the weights" if kind == "raw" else "the raw weights"
        raise ErfLabError(f"{default_out if out is None else out} holds the timeline of {other}; give another --out "
                          f"for {'the EMA' if ema else 'the raw weights'} (default {default_out})")
    try:
        out = prepare_out_dir(default_out if out is None else out)
    except ErfLabError as e:
        raise ErfLabError(f"{e}; pass --out FOLDER to write elsewhere" if out is None else str(e)) from None
    probe_spec = ProbeSpec(train_size, int(probe_size), run.num_classes, int(s["seed"])).validate()
    overrides = {**(s.get("overrides") or {}), "num_classes": run.num_classes}
    epochs = sorted(run.checkpoints)
    from erf_lab.checkpoint import ema_decay_of

    decay = ema_decay_of(s)
    # which weights: each checkpoint's raw training weights, or with ``ema`` the EMA of them (decay d per step)
    weights_note = None if decay is None else (
        f"each checkpoint's EMA of the weights was measured (decay {decay:g}; epoch 0: the initialisation, where the "
        f"EMA starts)" if ema else
        f"each checkpoint's raw training weights were measured, not the EMA of them the run also kept (decay "
        f"{decay:g}): erf-lab timeline --ema measures those (the final ones: {run.root / 'model_ema.safetensors'})")
    record = {"run": str(run.root.resolve()), "model": s["model"], "overrides": overrides, "erf_input_size": size,
              "weights_kind": kind, "ema_decay": decay, "weights_note": weights_note,
              "train_input_size": train_size, "num_images": int(num_images), "probe": dict(probe_spec.__dict__),
              "epochs": epochs, "rows": [], **provenance("timeline", {
                  "run_dir": str(run.root.resolve()), "input_size": input_size, "num_images": int(num_images),
                  "probe_size": int(probe_size), "device": device, "formats": list(formats), "ema": bool(ema)},
                  argv, device=device, derived_from=[trained_source(run, overrides)])}
    # held while it writes: a second timeline into it meanwhile (another shell, the app) mixed rows and caches
    with hold_folder(out, subfolders=("ema-weights", "probe-*px", "images-*px")):  # erf-*px/: run_erf cleans
        rows, counts, maps = [], {"erf": 0, "probe": 0}, {}
        # the folder is a timeline from now on; Ctrl-C says how many checkpoints it keeps (the CLI prints it)
        with command_record(out / "timeline.json", record) as save, _kept_on_stop(out, rows, len(epochs)):
            images = cue_world_images(out / f"images-{size}px", int(num_images), size, run.num_classes, int(s["seed"]))
            for epoch in progress(epochs, desc="timeline", unit="ckpt", disable=not show_progress):
                weights = _ema_file(sources[epoch], out / "ema-weights", epoch, train_size) if ema else sources[epoch]
                m = measure_checkpoint(s["model"], weights, overrides,
                                       erf_dir=out / f"erf-{size}px" / f"epoch_{epoch:03d}",
                                       probe_file=out / f"probe-{train_size}px" / f"epoch_{epoch:03d}.json",
                                       images=images, num_images=int(num_images), input_size=size,
                                       train_size=train_size, probe_spec=probe_spec, device=device)
                for k in m["measured"]:
                    counts[k] += 1
                maps[epoch] = np.load(m["erf_dir"] / "erf.npy", allow_pickle=False)
                met = run.metrics.get(epoch, {})
                p = m["probe"]
                rows.append({"epoch": epoch, **{k: m["erf"].get(k) for k in AREA_KEYS}, "r_rms": m["erf"].get("r_rms"),
                             "r50": m["erf"].get("r50"), "shape_bias": p["shape_bias"],
                             "untrained": untrained(epoch, met.get("val_acc"), run.num_classes, s.get("val_size")),
                             "shape_only_accuracy": p["shape_only_accuracy"],
                             "texture_only_accuracy": p["texture_only_accuracy"],
                             "val_acc": met.get("val_acc"), "train_acc": met.get("train_acc"),
                             "checkpoint": str(sources[epoch].relative_to(run.root))})
                save(rows=rows)  # still incomplete: the checkpoints measured so far (each also cached on its own)
                if on_progress is not None:
                    on_progress(len(rows), len(epochs))
        write_text(out / "timeline.csv", csv_text(rows, list(rows[0])))
        plot_timeline(rows, maps, out / "timeline", title=_title(s["model"], size), formats=formats)
        from erf_lab.erf.plotting import FORMATS

        for fmt in set(FORMATS) - set(formats):  # an earlier timeline's figure in another format: fewer epochs, stale
            (out / f"timeline.{fmt}").unlink(missing_ok=True)
        save(complete=True, rows=rows)  # last: the timeline is complete
    return {"rows": rows, "out_dir": out, "measured": counts, "weights_note": weights_note}


@contextlib.contextmanager
def _kept_on_stop(out: Path, rows: list, total: int):
    """Mark a Ctrl-C / SIGTERM (KeyboardInterrupt) with what the stopped timeline keeps, as
    ``stop.timeline_saved = {"out_dir", "measured", "total"}`` (``rows``: the checkpoints measured so far, cached)."""
    try:
        yield
    except KeyboardInterrupt as stop:
        stop.timeline_saved = {"out_dir": str(out), "measured": len(rows), "total": total}
        raise


def _title(model: str, erf_size: int) -> str:
    """The timeline figure's title."""
    return f"{model} on cue-world: ERF at {erf_size} px"


#: the note for the rows marked ``untrained`` (the CLI's "†")
UNTRAINED_NOTE = ("†: the random initialisation (epoch 0) or val accuracy at chance: the model has not learned the "
                  "task, so its shape bias means nothing.")


def untrained(epoch: int, val_acc: float | None, num_classes: int, val_size: int | None) -> bool | None:
    """Whether the checkpoint of ``epoch`` has learned nothing: epoch 0 (the initialisation), or a val accuracy
    at chance (:func:`erf_lab.shape_bias.analysis.at_chance`); None when its val accuracy is unknown."""
    from erf_lab.shape_bias.analysis import at_chance

    if epoch == 0:
        return True
    if val_acc is None or not val_size:
        return None
    return at_chance(val_acc, num_classes, int(val_size))


def _strip_epochs(epochs: list[int], most: int = 8) -> list[int]:
    """At most ``most`` epochs, evenly spread, first and last included."""
    if len(epochs) <= most:
        return epochs
    idx = np.unique(np.round(np.linspace(0, len(epochs) - 1, most)).astype(int))
    return [epochs[i] for i in idx]


#: a panel's legend under its axes: inside, it covered the curves (the shape bias line under its own legend)
_BELOW = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.3), "frameon": False, "ncols": 2, "handlelength": 1.5,
          "columnspacing": 1.0}


def plot_timeline(rows: list[dict], maps: dict, stem, *, title: str = "", formats=("png", "pdf")) -> list[Path]:
    """One figure: ERF heatmaps as a strip over epochs (paper colours, log-normalised each), then area ratios,
    effective radius (r_rms) and shape bias / val accuracy against epoch; the shape bias of rows marked
    ``untrained`` (:data:`UNTRAINED_NOTE`) is drawn hollow and named so in the legend."""
    from matplotlib.ticker import MaxNLocator

    from erf_lab.erf.plotting import (PAGE_WIDTH_IN, _colorbar, _heatmap, _new_figure, _plain_log_ticks, _style,
                                      display_map)
    from erf_lab.io import save_figure

    shown = _strip_epochs(sorted(maps))
    ep = [r["epoch"] for r in rows]

    def col(key):
        return [np.nan if r.get(key) is None else r[key] for r in rows]

    with _style(print_sizes=True):  # a page's text width, in the sizes it prints at (9-11 in wide: 4 pt legends)
        fig = _new_figure((PAGE_WIDTH_IN, 5.0))
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.4, 2.0])
        strip = top.subplots(1, len(shown), squeeze=False)[0]
        images = [_heatmap(ax, display_map(maps[e]), f"epoch {e}") for ax, e in zip(strip, shown)]
        if images:  # what the colours are (each map's log10(A+1) over its own max), as every ERF figure says
            _colorbar(top, images[-1], list(strip), None)
        if title:
            top.suptitle(title, fontsize=9)
        a1, a2, a3 = bottom.subplots(1, 3, sharex=True)  # one epoch axis, also where a panel has no point
        for k, mk in zip(AREA_KEYS, "os^D"):
            a1.plot(ep, col(k), marker=mk, label=f"t = {k[5:]}", markersize=4)
        if all(r.get(k) is None for r in rows for k in AREA_KEYS):
            a1.text(0.5, 0.5, "no area ratio reached at any epoch\n(a larger --input-size helps)",
                    transform=a1.transAxes, ha="center", va="center", fontsize=8, color="0.35")
        a1.set_ylabel("area ratio (%)")
        a1.set_yscale("log")
        _plain_log_ticks(a1.yaxis)
        a1.legend(**_BELOW)
        a2.plot(ep, col("r_rms"), "o-", markersize=4, label="r_rms")
        a2.plot(ep, col("r50"), "s--", markersize=4, label="r50")
        a2.set_ylabel("effective radius (px)")
        a2.legend(**_BELOW)
        for k, mk, lab in (("shape_bias", "o-", "shape bias"), ("val_acc", "s-", "val accuracy"),
                           ("shape_only_accuracy", "^--", "shape-only acc"),
                           ("texture_only_accuracy", "v--", "texture-only acc")):
            line = a3.plot(ep, col(k), mk, markersize=4, label=lab)[0]
            if k == "shape_bias" and any(r.get("untrained") for r in rows):
                # the checkpoints that learned nothing (epoch 0, val accuracy at chance): hollow, as the table's †
                bad = [r for r in rows if r.get("untrained") and r.get(k) is not None]
                a3.plot([r["epoch"] for r in bad], [r[k] for r in bad], "o", markersize=7, color=line.get_color(),
                        markerfacecolor="white", label="† untrained: means nothing", zorder=3)
        a3.set_ylim(-0.02, 1.02)
        a3.set_ylabel("fraction (shape bias, accuracy)")
        a3.legend(**{**_BELOW, "ncols": 1})
        for ax in (a1, a2, a3):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs (no tick at epoch 0.5)
            ax.grid(True, linewidth=0.4, alpha=0.5)
        return save_figure(fig, stem, tuple(formats))


#: a shipped timeline's strip (``ship``'s copy holds no per-epoch map): ``epochs`` (those the figure shows),
#: ``levels`` (each map's colours, :func:`erf_lab.erf.plotting.display_levels`) and ``r_rms`` (of those epochs'
#: rows: a strip left beside another timeline's rows is refused)
STRIP_FILE = "strip.npz"


def write_strip(timeline_dir, dest) -> Path:
    """:data:`STRIP_FILE` of the finished timeline in ``timeline_dir`` (``RUN/timeline``) written to ``dest``
    (atomically): the display levels of the maps its figure's strip shows, read from ``erf-<S>px/epoch_XXX``, and
    those epochs' r_rms; what :func:`redraw_timeline` draws the strip from where the checkpoints are not kept."""
    from erf_lab.erf.plotting import display_levels
    from erf_lab.io import atomic_path, read_json_or_none

    timeline_dir = Path(timeline_dir)
    record = read_json_or_none(timeline_dir / "timeline.json")
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ErfLabError(f"{timeline_dir} holds no finished timeline (timeline.json)")
    by_epoch = {r["epoch"]: r for r in record["rows"]}
    epochs = _strip_epochs(sorted(by_epoch))
    maps = [timeline_dir / f"erf-{record['erf_input_size']}px" / f"epoch_{e:03d}" / "erf.npy" for e in epochs]
    if missing := [str(m) for m in maps if not m.is_file()]:
        raise ErfLabError(f"{timeline_dir}: the ERF maps of its figure's strip are gone ({missing[0]})")
    r_rms = [np.nan if by_epoch[e].get("r_rms") is None else by_epoch[e]["r_rms"] for e in epochs]
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, epochs=np.asarray(epochs, dtype=np.int64), r_rms=np.asarray(r_rms, dtype=np.float64),
                            levels=np.stack([display_levels(np.load(m, allow_pickle=False)) for m in maps]))
    return Path(dest)


def redraw_timeline(folder, formats=None) -> list[Path]:
    """Draw a shipped timeline's figure (``folder/timeline.png`` / ``.pdf``) again with the current
    :func:`plot_timeline`: the curves from the rows of ``timeline.json``, the strip from :data:`STRIP_FILE`.
    ``formats``: default, those the folder has. Returns the written paths."""
    from erf_lab.erf.plotting import FORMATS, levels_map
    from erf_lab.io import read_json_or_none

    folder = Path(folder).expanduser()
    record = read_json_or_none(folder / "timeline.json")
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or not (folder / STRIP_FILE).is_file():
        raise ErfLabError(f"{folder} is not a shipped timeline (timeline.json and {STRIP_FILE})")
    rows = record["rows"]
    with np.load(folder / STRIP_FILE, allow_pickle=False) as strip:
        epochs, levels, r_rms = [int(e) for e in strip["epochs"]], strip["levels"], strip["r_rms"]
    by_epoch = {r["epoch"]: r for r in rows}
    measured = [np.nan if by_epoch.get(e, {}).get("r_rms") is None else by_epoch[e]["r_rms"] for e in epochs]
    if epochs != _strip_epochs(sorted(by_epoch)) or not np.allclose(r_rms, measured, equal_nan=True):
        raise ErfLabError(f"{folder / STRIP_FILE} is not the strip of the timeline beside it (other epochs or ERFs)")
    maps = {e: levels_map(lv) for e, lv in zip(epochs, levels)}
    formats = formats or tuple(f for f in FORMATS if (folder / f"timeline.{f}").is_file()) or ("png", "pdf")
    return plot_timeline(rows, maps, folder / "timeline", title=_title(record["model"], record["erf_input_size"]),
                         formats=formats)


__all__ = ["TrainingRun", "read_training_run", "cue_world_images", "measure_checkpoint", "timeline",
           "plot_timeline", "redraw_timeline", "write_strip", "untrained", "AREA_KEYS", "UNTRAINED_NOTE"]
