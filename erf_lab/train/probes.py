"""Shape bias of a cue-world classifier, measured as for the Geirhos stimuli (model-vs-human formula).

On the cue-conflict split (shape i filled with texture j != i) a decision is a *shape hit* when the predicted
class is i, a *texture hit* when it is j; shape bias = shape hits / (shape hits + texture hits) (Geirhos et
al., ICLR 2019, Sec. 3; model-vs-human, NeurIPS 2021). The shape-only (flat silhouettes) and texture-only
(texture over the whole frame) splits give how well each cue alone is read. Probe images come from the splits'
own seed streams, never from the training images.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError

PROBE_SPLITS = ("cue-conflict", "shape-only", "texture-only")


@dataclass(frozen=True)
class ProbeSpec:
    """Which probe images: ``size`` images of each probe split of the world (``num_classes``, ``seed``) at
    ``input_size`` pixels."""

    input_size: int = 64
    size: int = 500
    num_classes: int = 10
    seed: int = 0

    def validate(self) -> "ProbeSpec":
        from erf_lab.train.cue_world import MAX_SPLIT_SIZE, SHAPES

        if not 8 <= int(self.input_size) <= 4096:
            raise ErfLabError(f"cue-world probe input size must be in [8, 4096] pixels, got {self.input_size}")
        if not 1 <= int(self.size) <= MAX_SPLIT_SIZE:
            raise ErfLabError(f"cue-world probe size must be 1 to {MAX_SPLIT_SIZE:,} images per split, "
                              f"got {int(self.size):,}")
        if not 2 <= int(self.num_classes) <= len(SHAPES):
            raise ErfLabError(f"cue-world has 2 to {len(SHAPES)} classes, got {self.num_classes}")
        return self


def shape_bias_counts(shapes, textures, predictions) -> dict:
    """Shape / texture hits of cue-conflict decisions and the shape bias (None when no image hit either cue)."""
    s, t, p = (np.asarray(a, dtype=np.int64) for a in (shapes, textures, predictions))
    if (s == t).any():
        raise ErfLabError("cue-conflict images need shape != texture")
    shape_hits, texture_hits, n = int((p == s).sum()), int((p == t).sum()), len(p)
    return {"n_conflict": n, "shape_hits": shape_hits, "texture_hits": texture_hits,
            "shape_bias": shape_hits / (shape_hits + texture_hits) if shape_hits + texture_hits else None,
            "fraction_shape_hits": shape_hits / n if n else None,
            "fraction_texture_hits": texture_hits / n if n else None}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: str = "cpu") -> np.ndarray:
    """Top-1 classes of ``images`` (N, 3, S, S) in [0, 1], normalised with the model's mean / std, in the model's
    dtype. The model runs in eval mode on ``device`` and gets its modes and its place back
    (:func:`~erf_lab.erf.prepare.eval_mode`, :func:`~erf_lab.erf.prepare.on_device`), also when a batch fails."""
    from erf_lab.erf.images import model_mean_std
    from erf_lab.erf.prepare import eval_mode, on_device, param_dtype
    from erf_lab.shape_bias.evaluate import check_finite_outputs

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model_mean_std(model))
    dtype = param_dtype(model)  # a float64 / bfloat16 model gets its inputs in its precision
    out = []
    with on_device(model, device), eval_mode(model):  # given back where it was and in its modes
        for i in range(0, len(images), batch_size):
            x = ((images[i:i + batch_size] - mean) / std).to(device, dtype)
            logits = model(x)
            check_finite_outputs(logits, "cue-world probe image(s)")
            out.append(logits.argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def probe(model: nn.Module, spec: ProbeSpec = ProbeSpec(), *, batch_size: int = 128, device: str = "cpu") -> dict:
    """``{"summary": {...}, "rows": [...]}``: the shape bias on cue-conflict and the accuracies on shape-only /
    texture-only (one row per image: split, index, shape, texture, prediction)."""
    from erf_lab.train.cue_world import draw_scene, render_scene

    spec.validate()
    rows, per = [], {}
    for split in PROBE_SPLITS:
        scenes = [draw_scene(split, i, spec.num_classes, spec.seed) for i in range(spec.size)]
        images = torch.from_numpy(np.stack([render_scene(s, spec.input_size) for s in scenes]))
        pred = predict(model, images, batch_size, device)
        if pred.size and int(pred.max()) >= spec.num_classes:
            raise ErfLabError(f"the model answered class {int(pred.max())}, outside cue-world's {spec.num_classes} "
                              f"classes: is its head (num_classes) the cue-world one?")
        per[split] = ([s.shape for s in scenes], [s.texture for s in scenes], pred)
        rows += [{"split": split, "index": i, "shape": s.shape, "texture": s.texture, "prediction": int(p)}
                 for i, (s, p) in enumerate(zip(scenes, pred))]
    summary = shape_bias_counts(*per["cue-conflict"])
    s_shape, _, p_shape = per["shape-only"]
    _, t_tex, p_tex = per["texture-only"]
    summary["shape_only_accuracy"] = float(np.mean(np.asarray(p_shape) == np.asarray(s_shape)))
    summary["texture_only_accuracy"] = float(np.mean(np.asarray(p_tex) == np.asarray(t_tex)))
    s, t, p = (np.asarray(a) for a in per["cue-conflict"])
    summary["per_class"] = {  # by the shape class of the conflict image
        int(k): {"shape_hits": int(((p == s) & (s == k)).sum()), "texture_hits": int(((p == t) & (s == k)).sum()),
                 "n": int((s == k).sum())} for k in range(spec.num_classes)}
    summary["probe"] = {"input_size": spec.input_size, "size": spec.size, "num_classes": spec.num_classes,
                        "seed": spec.seed, "splits": list(PROBE_SPLITS)}
    return {"summary": summary, "rows": rows}


def write_decisions_csv(path, rows: list[dict], class_names: list[str]) -> None:
    from erf_lab.io import write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "index", "shape", "texture", "decision", "shape_name", "texture_name", "decision_name"])
    shapes_tex = [n.split("/") for n in class_names]
    for r in rows:
        sn = shapes_tex[r["shape"]][0] if r["shape"] >= 0 else ""
        tn = shapes_tex[r["texture"]][1] if r["texture"] >= 0 else ""
        w.writerow([r["split"], r["index"], r["shape"], r["texture"], r["prediction"], sn, tn,
                    class_names[r["prediction"]]])
    write_text(path, buf.getvalue())


def plot_probe(summary: dict, stem, class_names: list[str]) -> list[Path]:
    """Per shape class, the fraction of shape decisions among cue hits (shape on the left, as in Geirhos et al.
    Fig. 4), the overall shape bias as a dashed line, and the single-cue accuracies in the title."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from erf_lab.io import save_figure

    ks = sorted(summary["per_class"], key=int)
    xs = []
    for k in ks:
        c = summary["per_class"][k]
        hits = c["shape_hits"] + c["texture_hits"]
        xs.append(c["shape_hits"] / hits if hits else np.nan)
    fig, ax = plt.subplots(figsize=(5.2, 0.3 * len(ks) + 1.9), layout="constrained")
    ax.scatter(xs, np.arange(len(ks)), color="#1f77b4", zorder=3)
    if summary["shape_bias"] is not None:
        ax.axvline(summary["shape_bias"], color="#1f77b4", linestyle="--",
                   label=f"{summary.get('label', 'model')}: {summary['shape_bias']:.3f}")
        # under the axes, as the shape-bias figure's: in the lower left it covered the last class's point
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.set_yticks(np.arange(len(ks)), [class_names[int(k)] for k in ks], fontsize=7)
    ax.set_ylim(len(ks) - 0.5, -0.5)
    ax.set_xlim(1.02, -0.02)
    ax.set_xlabel("fraction of 'shape' decisions (cue-conflict, by shape)")
    ax.grid(axis="y", color="0.92")
    ax.set_title(f"cue-world: shape-only acc {summary['shape_only_accuracy']:.3f}, "
                 f"texture-only acc {summary['texture_only_accuracy']:.3f}", fontsize=8)
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def run_cue_world_shape_bias(model_name: str, *, out, weights=None, overrides: dict | None = None,
                             allow_random: bool = False, input_size: int | None = None, size: int = 500,
                             num_classes: int | None = None, seed: int = 0, batch_size: int = 128,
                             device: str = "cpu", command: list[str] | None = None, init_seed: int = 0) -> dict:
    """``erf-lab shape-bias --stimuli cue-world``: probe a cue-world classifier and write ``decisions.csv``,
    ``summary.json``, ``run.json`` and ``shape_bias.png`` / ``.pdf`` into ``out``. Returns the summary.
    ``seed`` picks the world's probe images, ``init_seed`` the model's initialisation (random weights).

    The world's class count and input size come from the weights' training record when there is one (a
    ``builtin:`` model's JSON or the ``run.json`` of the training run that holds the checkpoint), else
    ``num_classes`` / ``input_size`` (defaults 10 and 64). Untrained weights are refused unless ``allow_random``.
    """
    from erf_lab.checkpoint import random_init_of, resolve_weights, training_weights
    from erf_lab.io import (hold_folder, prepare_out_dir, refuse_other_result, remove_earlier_outputs, sha256_file,
                            write_json)
    from erf_lab.models import create_model
    from erf_lab.provenance import finished, host, now, versions
    from erf_lab.shape_bias.evaluate import refuse_allow_random_for_trained
    from erf_lab.train.cue_world import class_names

    started, start_time = time.monotonic(), now()
    init = random_init_of(weights, seed=init_seed)  # no weights, or a file marked untrained (reparam of a random init)
    random_weights = init is not None
    refuse_allow_random_for_trained(weights, random_weights, allow_random)
    if random_weights and not allow_random:
        why = f"{weights} holds a random initialisation" if weights else f"{model_name} has no trained weights"
        raise ErfLabError(f"{why}: pass --weights FILE (a cue-world training "
                          f"checkpoint or builtin:cue-world/...); a shape bias of random weights means nothing "
                          f"(--allow-random measures one anyway, marked untrained)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ErfLabError("--device cuda requested but no CUDA device is available")
    if int(batch_size) < 1:
        raise ErfLabError("--batch-size must be >= 1")
    path, record = resolve_weights(weights) if weights is not None else (None, {})
    record = record or training_record(path)
    n_cls = int(num_classes or record.get("num_classes") or 10)
    spec = ProbeSpec(int(input_size or record.get("input_size") or 64), int(size), n_cls, int(seed)).validate()
    kwargs = {**record.get("overrides", {}), **(overrides or {}), "num_classes": n_cls}
    torch.manual_seed(init_seed)  # a random init is the same network every run
    model = create_model(model_name, weights=weights, **kwargs)
    refuse_other_result(out, "shape-bias")
    out = prepare_out_dir(out)  # after the model: a bad weights file leaves no folder
    with hold_folder(out):  # as a model-vs-human run's: another probe into it meanwhile would mix its outputs in
        res = probe(model, spec, batch_size=batch_size, device=device)
        names = class_names(n_cls)
        res["summary"].update(probe_warnings(res, names))
        shown = None if weights is None else (weights if str(weights).startswith("builtin:") else Path(weights).name)
        label = model_name + ("" if shown is None else f" ({shown})")
        summary = {"model": model_name, "label": label + (" (random init)" if random_weights else ""),
                   "stimuli": "cue-world", "random_weights": random_weights,
                   "seed": init["seed"] if random_weights else None,
                   "weights": None if weights is None else str(weights),
                   "weights_sha256": None if path is None else sha256_file(path),
                   "weights_selection": getattr(model, "weights_selection", None),  # which part of the file loaded
                   # which of a training run's weights: raw or EMA (and the EMA file where raw ones were measured)
                   **training_weights(path), "overrides": kwargs, "classes": names, **res["summary"]}
        meta = {"command": command or sys.argv, "versions": versions(), "host": host(device), "device": device,
                "batch_size": batch_size, "start_time": start_time, **finished(started),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_decisions_csv(out / "decisions.csv", res["rows"], names)
        write_json(out / "summary.json", {**summary, **meta})
        plot_probe(summary, out / "shape_bias", names)
        outputs = ["decisions.csv", "summary.json", "shape_bias.png", "shape_bias.pdf"]
        remove_earlier_outputs(out, outputs)
        write_json(out / "run.json", {"what": "erf-lab shape-bias --stimuli cue-world", "model": model_name,
                                      "weights": summary["weights"], "weights_sha256": summary["weights_sha256"],
                                      **{k: summary[k] for k in ("weights_selection", "weights_kind", "ema_decay",
                                                                 "weights_note", "random_weights", "seed")},
                                      "probe": summary["probe"], "outputs": outputs, **meta})
        return summary


def probe_warnings(res: dict, names: list[str]) -> dict:
    """``{"shape_bias_ci95", "chance_shape_or_texture", "warnings"}`` of a :func:`probe` result, as the
    cue-conflict path records them: the shape bias's 95 % Wilson interval; one class for most conflict images, hits
    below chance (2 / classes) or under 30 shape-or-texture decisions
    (:func:`erf_lab.shape_bias.analysis.degenerate_warnings`); and single-cue accuracies both at chance (the model
    has learned neither cue: :func:`erf_lab.shape_bias.analysis.at_chance`)."""
    from erf_lab.shape_bias.analysis import at_chance, wilson_interval
    from erf_lab.shape_bias.analysis import degenerate_warnings

    s = res["summary"]
    n_cls, size = s["probe"]["num_classes"], s["probe"]["size"]
    rows = [(names[r["shape"]], names[r["texture"]], names[r["prediction"]]) for r in res["rows"]
            if r["split"] == "cue-conflict"]
    warnings = degenerate_warnings(rows, chance=2 / n_cls)
    accs = (s["shape_only_accuracy"], s["texture_only_accuracy"])
    if all(at_chance(a, n_cls, size) for a in accs):
        warnings.append(f"shape-only and texture-only accuracies ({accs[0]:.3f}, {accs[1]:.3f}) are at chance "
                        f"(1/{n_cls}): the model has learned neither cue, and its shape bias means nothing")
    return {"shape_bias_ci95": wilson_interval(s["shape_hits"], s["shape_hits"] + s["texture_hits"]),
            "chance_shape_or_texture": 2 / n_cls, "warnings": warnings}


def training_record(weights: str | os.PathLike | None) -> dict:
    """``{"overrides", "num_classes", "input_size"}`` of the ``erf-lab train`` run whose folder holds
    ``weights`` (``RUN/model.*`` or ``RUN/checkpoints/epoch_*.*``); {} when there is none."""
    from erf_lab.checkpoint import training_run_of

    found = None if weights is None else training_run_of(weights)
    if found is None:
        return {}
    info = found[1]
    s = info["settings"]
    return {"overrides": dict(s.get("overrides") or {}), "num_classes": info["model_config"]["num_classes"],
            "input_size": s.get("input_size"), "model": s.get("model")}


__all__ = ["ProbeSpec", "PROBE_SPLITS", "shape_bias_counts", "predict", "probe", "run_cue_world_shape_bias",
           "training_record", "plot_probe"]
