"""How the ERF changes with kernel size, input size and structural re-parameterization (``erf-lab sweep``).

The kernel family is the one of RepLKNet's kernel-size study (Ding et al., CVPR 2022, Table 5): the registered
``replknet_3/7/13/25`` and ``replknet_31b`` (kernels 31-29-27-13); any other K uses the 31B layout with kernels
(K, K, K, min(K, 13)) and a 5x5 re-param branch when K > 5. Every member is its own run directory written by the
one runner (:func:`erf_lab.erf.runner.run_erf`); the sweep adds a heatmap grid, growth curves and a table.
Across input sizes, the paper's area ratios are fractions of the image (they shrink as the image grows even when
the ERF in pixels does not), so the size-free metrics (r_rms, r50 / r99, Gaussian sigma, in pixels) are reported
beside them.
The train-time and deploy (re-parameterized) forms compute the same function, so their ERFs must agree
(Ding et al. 2022, Sec. 3, Guideline 2); the sweep reports the largest difference.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from erf_lab.erf.metrics import GAUSS_MIN_R2, NOT_MEANINGFUL, summary, theoretical_rf_exceeds_map
from erf_lab.erf.tables import csv_text, global_rf_note, markdown_table, trf_exceeds_line
from erf_lab.errors import ErfLabError
from erf_lab.io import command_record, progress, refuse_other_result, write_text
from erf_lab.provenance import provenance

REPARAM_MODES = {"train": ("train",), "deploy": ("deploy",), "both": ("train", "deploy")}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SWEEP_COLUMNS = ("kernel", "reparam", "model", "weights", "shape", "area@20%", "area@30%", "area@50%", "area@99%",
                 "r_rms", "r50", "r99", "std_y", "std_x", "gauss_sigma_y", "gauss_sigma_x", "gauss_r2", "gauss_fit",
                 "trf", "erf/trf", "num_used", "run_dir")


def _parse_int_list(text: str | Sequence[int], option: str, valid, rule: str) -> list[int]:
    """'3,7,13' -> [3, 7, 13] for ``option``; every value must pass ``valid`` (described by ``rule``), no duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ErfLabError(f"{option} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise ErfLabError(f"{option} is empty")
    bad = [v for v in values if not valid(v)]
    if bad:
        raise ErfLabError(f"{option}: values must be {rule}, got {', '.join(map(str, bad))}")
    if len(set(values)) != len(values):
        raise ErfLabError(f"{option}: duplicate values in {text!r}")
    return values


def parse_kernels(text: str | Sequence[int]) -> list[int]:
    """'3,7,13' -> [3, 7, 13]: odd positive kernel sizes, no duplicates."""
    return _parse_int_list(text, "--kernels", lambda k: k >= 1 and k % 2 == 1, "odd positive integers")


def kernel_family_member(k: int) -> tuple[str, dict]:
    """(registered model name, constructor overrides) of the RepLKNet kernel-family member with kernel K."""
    from erf_lab.models import is_model

    if k == 31:
        return "replknet_31b", {}
    if is_model(f"replknet_{k}"):
        return f"replknet_{k}", {}
    return "replknet_31b", {"large_kernel_sizes": (k, k, k, min(k, 13)), "small_kernel": 5 if k > 5 else None}


def find_weights(weights_dir: str | os.PathLike, k: int) -> Path:
    """The checkpoint for kernel K in ``weights_dir``: ``replknet_<K>.*``, ``replknet_31b.*`` (K=31), ``K<K>.*``
    or ``<K>.*`` with a .safetensors/.pth/.pt/.bin/.ckpt suffix; ErfLabError when none or several match."""
    return find_family_weights(weights_dir, [k])[k]


def find_family_weights(weights_dir: str | os.PathLike, kernels: Sequence[int]) -> dict[int, Path]:
    """:func:`find_weights` of each kernel size; one ErfLabError line for all of them: the folder, every K without
    a checkpoint, or the first K with several."""
    d = Path(weights_dir).expanduser()
    if not d.is_dir():
        raise ErfLabError(f"--weights-dir not found or not a folder: {d}")
    files = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
    hits = {}
    for k in kernels:
        stems = {f"replknet_{k}", f"replknet-{k}", f"k{k}", str(k)} | \
            ({"replknet_31b", "replknet-31b"} if k == 31 else set())
        hits[k] = sorted(p for p in files if p.name[: -len(p.suffix)].lower() in stems)
    missing = [k for k in kernels if not hits[k]]
    if len(missing) == 1:
        k = missing[0]
        raise ErfLabError(f"no checkpoint for kernel {k} in {d} (expected replknet_{k}.pth / .safetensors, "
                          f"K{k}.pth or {k}.pth)")
    if missing:
        raise ErfLabError(f"no checkpoint for kernels {', '.join(map(str, missing))} in {d} (expected "
                          "replknet_<K>.pth / .safetensors, K<K>.pth or <K>.pth for each)")
    for k in kernels:
        if len(hits[k]) > 1:
            raise ErfLabError(f"several checkpoints for kernel {k} in {d}: {', '.join(p.name for p in hits[k])}")
    return {k: hits[k][0] for k in kernels}


def weights_label(run_info: dict) -> str:
    """What a member's weights were, for the tables: "random" (seeded init), the checkpoint's file name, or
    "pretrained" (a model's own download)."""
    if run_info.get("random_init"):
        return "random"
    return Path(run_info["weights"]).name if run_info.get("weights") else "pretrained"


SIZE_FREE_METRICS = (
    ("r_rms", "effective radius r_rms (px)"),
    ("gauss_sigma_x", "Gaussian sigma_x (px)"),  # the x axis only: an anisotropic ERF's sigma_y differs
    ("r50", "radius holding 50% (px)"),
    ("r99", "radius holding 99% (px)"),
)
AREA_METRICS = (("area@20%", "area ratio t=20% (%)"), ("area@50%", "area ratio t=50% (%)"),
                ("area@99%", "area ratio t=99% (%)"))


def parse_sizes(text: str | Sequence[int]) -> list[int]:
    """'224,384' -> [224, 384]: input sizes from 1 to the runner's maximum, no duplicates."""
    from erf_lab.erf.runner import MAX_INPUT_SIZE

    return _parse_int_list(text, "--input-sizes", lambda v: 1 <= v <= MAX_INPUT_SIZE,
                           f"between 1 and {MAX_INPUT_SIZE}")


def _members(ks, sizes, model, weights, init, weights_dir, overrides):
    """(sub-dir stem, kernel or None, size, model name, model kwargs, weights) for every swept member."""
    clash = [key for key in ("large_kernel_sizes", "kernels") if key in overrides and ks]
    if clash:
        raise ErfLabError(f"--override {clash[0]} conflicts with the swept kernel size (set by --kernels)")
    found = find_family_weights(weights_dir, ks) if init == "weights" and ks else {}
    out = []
    for k in ks or [None]:
        if k is None:
            name, kwargs, w = model, dict(overrides), weights
        else:
            name, fam = kernel_family_member(k)
            kwargs = {**fam, **overrides}
            w = str(found[k]) if init == "weights" else None
        for size in sizes:
            parts = ([f"K{k}"] if k is not None else []) + ([f"S{size}"] if len(sizes) > 1 or k is None else [])
            out.append(("-".join(parts), k, size, name, kwargs, w))
    return out


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _with_held_folder(body):
    """``body`` called without its first argument, ``held_folder``: an ExitStack made for the call and closed when it
    returns or raises, for what must be held until then (the sweep's rank 0 holds its ``out`` in it while it writes
    there). One signature, ``body``'s, without a second copy that passes the arguments on."""
    @functools.wraps(body)
    def call(*args, **kwargs):
        with contextlib.ExitStack() as held_folder:
            return body(held_folder, *args, **kwargs)

    signature = inspect.signature(body)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return call


@_with_held_folder
def run_sweep(held_folder: contextlib.ExitStack, /, kernels: Sequence[int] | None = None, *,
              input_sizes: Sequence[int] | None = None, model: str | None = None, weights: str | None = None,
              reparam: str = "both", init: str | None = None, weights_dir: str | os.PathLike | None = None,
              input_size: int = 1024, images: str | None = None, num_images: int | None = None,
              overrides: dict | None = None, out: str | os.PathLike = "sweep", force: bool = False,
              formats: Sequence[str] = ("png", "pdf"), seed: int = 0, layer: str | None = None, aggregate: str = "relu",
              batch_size: int | None = None, device: str = "cpu", show_progress: bool = True,
              argv: Sequence[str] | None = None, on_progress=None) -> dict:
    """ERF of each kernel-family member and / or each input size (train-time and/or deploy form), summarised.

    Every member is one :func:`erf_lab.erf.runner.run_erf` run directory ``out/<K..>-<S..>-<mode>/`` (reused when
    complete with the same settings; one with other settings is an error unless ``force``). ``model`` / ``weights``
    belong to a sweep without kernels, ``weights_dir`` (which implies ``init="weights"``) to one with them. The sweep
    adds ``grid.<fmt>`` (heatmaps: rows = kernel x mode, columns = the swept axis), ``growth.<fmt>`` (area ratios
    and size-free metrics against the swept axis), ``sweep.csv`` / ``sweep.md`` (a weights column; random-init
    members noted) and ``sweep.json``: written when the sweep starts (``"complete": false``, the members measured
    so far in ``rows``: an interrupted sweep's folder is recognised, and the same call again resumes it, its finished
    members reused) and complete last. Returns ``{"rows", "reparam_diff", "files", "out_dir", "markdown"}``.
    """
    from erf_lab.erf.plotting import FORMATS, plot_grid, plot_growth
    from erf_lab.erf.rundir import RANDOM_MARK, load_run, run_metrics
    from erf_lab.erf.runner import ErfSpec, jsonable, run_erf, settings_differ
    from erf_lab.io import hold_folder, prepare_out_dir

    from erf_lab.erf import distributed as D

    existed = Path(out).expanduser().exists()
    with D.HeldChecks() as checks:  # under torchrun: said to the other ranks once they have met
        ks = parse_kernels(kernels) if kernels is not None else []
        sizes = parse_sizes(input_sizes) if input_sizes is not None else [int(input_size)]
        if not ks and input_sizes is None:
            raise ErfLabError("give --kernels (the RepLKNet kernel family), --input-sizes (of --model) or both")
        if reparam not in REPARAM_MODES:
            raise ErfLabError(f"--reparam must be train, deploy or both, got {reparam!r}")
        init = init or ("weights" if weights_dir is not None else "random")
        if init not in ("random", "weights"):
            raise ErfLabError(f"--init must be random or weights, got {init!r}")
        if ks and (model is not None or weights is not None):
            raise ErfLabError(f"{'--model' if model is not None else '--weights'} is for an --input-sizes sweep "
                              "without --kernels; --kernels measures the RepLKNet family (checkpoints: --weights-dir)")
        if not ks and (weights_dir is not None or init == "weights"):
            raise ErfLabError("--weights-dir / --init weights are for --kernels (one checkpoint per kernel size); "
                              "give --weights for --model")
        if init == "random" and weights_dir is not None:
            raise ErfLabError("--weights-dir conflicts with --init random; drop one of them")
        if init == "weights" and weights_dir is None:
            raise ErfLabError("--init weights needs --weights-dir (one checkpoint per kernel size)")
        from erf_lab.models.constants import MAX_KERNEL_SIZE

        bad = [k for k in ks if k % 2 == 0 or not 1 <= k <= MAX_KERNEL_SIZE]
        if bad:  # before any folder is made
            raise ErfLabError(f"--kernels: sizes must be odd, from 1 to {MAX_KERNEL_SIZE}, got {bad[0]}")
        model = model or "replknet_31b"
        overrides = dict(overrides or {})
        modes = REPARAM_MODES[reparam]
        members = _members(ks, sizes, model, weights, init, weights_dir, overrides)
        specs = {(stem, mode): (k, size, ErfSpec(
            model=name, weights=w, overrides=kwargs, images=images, num_images=num_images, input_size=size, layer=layer,
            aggregate=aggregate, batch_size=batch_size, device=device, reparameterize=(mode == "deploy"),
            seed=seed).validate()) for stem, k, size, name, kwargs, w in members for mode in modes}
        refuse_other_result(out, "sweep")  # its members, figures and sweep.json would land in another result
        for (stem, mode), (_, _, spec) in specs.items():
            diff = [] if force else settings_differ(Path(out) / f"{stem}-{mode}", spec)
            if diff:
                raise ErfLabError(f"{Path(out) / f'{stem}-{mode}'} already holds a complete run with other settings "
                                  f"({', '.join(diff)}); use --force to overwrite or choose another --out")
        out_dir = prepare_out_dir(out)
    # one process group for all members (under torchrun): a group destroyed and joined again per member met the
    # first one's stale addresses on torchrun's store (the second member failed: 'Connection refused', or hung)
    dinfo = None
    try:
        dinfo = D.init(device)  # the same device everywhere (a bad --device: refused here, alike on every rank)
        error = checks.error
        if error is None and dinfo.is_main:  # rank 0 writes: another erf-lab process writing there is refused
            try:
                held_folder.enter_context(hold_folder(out_dir))
            except ErfLabError as e:
                error = e
        # made by this job where any rank found it missing: a rank that started late saw the folder another had
        # made meanwhile, and rank 0 then left it behind, empty, after a refusal
        existed = all(D.gather_or_fail(existed, error, dinfo))
    except BaseException:
        if dinfo is not None:
            D.shutdown(dinfo)
        # made here, for a sweep another rank refused or a process that could not join (RANK set by hand)
        if checks.error is None and not existed:
            with contextlib.suppress(OSError):  # another process of this node may remove it first
                if out_dir.is_dir() and not any(out_dir.iterdir()):
                    out_dir.rmdir()
        raise
    params = {"kernels": ks, "input_sizes": sizes, "model": None if ks else model, "reparam": reparam, "init": init,
              "weights_dir": None if weights_dir is None else str(Path(weights_dir).resolve()), "images": images or
              "default", "num_images": num_images, "overrides": {k: jsonable(v) for k, v in overrides.items()},
              "seed": int(seed), "layer": layer or "forward_features", "aggregate": aggregate,
              "batch_size": batch_size, "device": device, "formats": list(formats)}

    main = D.env_info().is_main  # under torchrun every rank measures its share; rank 0 alone writes the sweep
    record = provenance("sweep", params, argv, device=device)
    record.update({"members": [f"{stem}-{mode}" for stem, mode in specs], "rows": []})
    with contextlib.ExitStack() as stack:
        stack.callback(D.shutdown, dinfo)
        if main and not existed:  # a bad input met by the first member (unknown layer, no image): no empty folder
            stack.callback(_remove_if_empty, out_dir)
        save = stack.enter_context(command_record(out_dir / "sweep.json", record, write=main))  # a sweep from now on
        rows, maps = [], {}
        # under torchrun rank 0's bar alone (the ranks run each member together)
        bar = progress(total=len(specs), desc="sweep", unit="run", disable=not (show_progress and main))
        try:
            for (stem, mode), (k, size, spec) in specs.items():
                sub = out_dir / f"{stem}-{mode}"
                what = " ".join(p for p in (f"K={k}" if k is not None else spec.model, f"{size}px", mode) if p)
                res = run_erf(spec, out=sub, reuse=True, label=what, tags={"sweep": {
                    "kernel": k, "input_size": size, "reparam": mode}}, formats=formats, show_progress=False, argv=argv)
                def read_back(sub=sub, res=res):
                    run = load_run(sub)
                    # a reused member's table row comes from its erf.npy, as compare's: its metrics.json may be
                    # damaged or stale (edited, rewritten by analyze). run_erf returns them so (a reused run's
                    # recomputed); where it gave none they are computed the same way
                    metrics = res["metrics"] or run_metrics(run.erf, run.run_info, theoretical_rf=run.theoretical_rf,
                                                            centre=run.centre)
                    return run.erf, weights_label(run.run_info), run.run_info.get("num_used"), {
                        **summary(metrics), "rf_global": bool(run.run_info.get("rf_global")),
                        "kernel_rf": run.run_info.get("kernel_rf")}

                # rank 0 wrote the member and reads it back; the other ranks get it from rank 0 (under torchrun
                # across nodes their --out may be another disk, where the member is not: they stopped with "no
                # such run directory", and rank 0 with them)
                maps[(stem, mode)], weights_used, num_used, values = D.decided_on_rank0(read_back, dinfo)
                rows.append({"kernel": k, "input_size": size, "reparam": mode,
                             "series": f"K={k} {mode}" if k else mode, "model": spec.model,
                             "weights": weights_used, "num_used": num_used, "run_dir": sub.name,
                             "reused": res["already_complete"], **values})
                bar.update(1)
                save(rows=rows)  # still incomplete: the members so far
                if on_progress is not None:  # the app's progress bar: runs measured (or reused) of all
                    on_progress(len(rows), len(specs))
        finally:
            bar.close()
    diffs = []
    if len(modes) == 2:
        for stem, k, size, *_ in members:
            a, b = maps[(stem, "train")], maps[(stem, "deploy")]
            scale = float(np.abs(a).max()) or 1.0
            diffs.append({"member": stem, "kernel": k, "input_size": size, "max_abs_diff": float(np.abs(a - b).max()),
                          "max_rel_diff": float(np.abs(a - b).max()) / scale})

    by_size = input_sizes is not None
    axis = sizes if by_size else ks
    row_keys = [(k, mode) for k in (ks if (ks and by_size) else [None]) for mode in modes]

    def cell(k, mode, v):
        stem = next(m[0] for m in members if (m[1] == k or k is None) and (m[2] == v if by_size else m[1] == v))
        return maps[(stem, mode)]

    if not main:  # under torchrun every rank measured its share; rank 0 alone writes the sweep
        return {"rows": rows, "reparam_diff": diffs, "files": [], "out_dir": out_dir, "markdown": "", "main": False}
    def untrained(k, mode) -> str:  # the figures say so, as compute's and compare's do (they may travel alone)
        return f" {RANDOM_MARK}" if any(r["weights"] == "random" for r in rows
                                        if r["reparam"] == mode and (k is None or r["kernel"] == k)) else ""

    files = plot_grid([[cell(k, mode, v) for v in axis] for k, mode in row_keys],
                      [(f"K={k} {mode}" if k is not None else mode) + untrained(k, mode) for k, mode in row_keys],
                      [f"{v}px" if by_size else f"K = {v}" for v in axis], out_dir / "grid", formats=formats)
    x = "input_size" if by_size else "kernel"
    group = "series" if (ks and by_size) else "reparam"
    metric_set = AREA_METRICS + SIZE_FREE_METRICS if by_size else AREA_METRICS + SIZE_FREE_METRICS[:1]
    gauss_bad = [r for r in rows if r.get("gauss_fit") == NOT_MEANINGFUL]
    plotted = [{**r, "gauss_sigma_x": None} if r.get("gauss_fit") == NOT_MEANINGFUL else r for r in rows]  # no point
    plotted = [{**r, group: f"{r[group]} {RANDOM_MARK}"} if r["weights"] == "random" else r for r in plotted]
    files += plot_growth(plotted, out_dir / "growth", x=x, group=group, metrics=metric_set, formats=formats)
    for stem in ("grid", "growth"):  # an earlier sweep's figures in formats not drawn now (other kernels, stale)
        for fmt in set(FORMATS) - set(formats):
            (out_dir / f"{stem}.{fmt}").unlink(missing_ok=True)
    columns = ("input_size",) + SWEEP_COLUMNS if by_size else SWEEP_COLUMNS
    write_text(out_dir / "sweep.csv", csv_text(rows, columns))
    md = markdown_table(rows, columns)
    if by_size:
        md += ("\n\nArea ratios are fractions of the image and shrink as the image grows even when the ERF in pixels "
               "does not; compare r_rms, r50/r99" + (" (pixels) across input sizes." if gauss_bad else
                                                     " and the Gaussian sigma (pixels) across input sizes."))
    if gauss_bad:
        md += ("\n\n" + NOT_MEANINGFUL + " = Gaussian fit not meaningful (a parameter at its bound, a sigma wider "
               f"than the map, or R^2 < {GAUSS_MIN_R2:g}) for " + ", ".join(str(r["run_dir"]) for r in gauss_bad)
               + "; its sigma is not an ERF size and is left out of the growth figure.")
    short = [r["run_dir"] for r in rows if num_images and (r["num_used"] or 0) < int(num_images)]
    if short:
        md += (f"\n\nnum_used: {int(num_images)} images asked for (--num-images), fewer used by "
               + ", ".join(short) + ": the image set holds no more usable ones.")
    beyond = [r["run_dir"] for r in rows if r.get("erf/trf") is not None
              and theoretical_rf_exceeds_map(r.get("trf"), [int(v) for v in r["shape"].split("x")])]
    if beyond:
        md += "\n\n" + trf_exceeds_line(beyond)
    if note := global_rf_note([(r["run_dir"], r) for r in rows if r.get("trf") is None]):
        md += "\n\n" + note
    if any(r["weights"] == "random" for r in rows):
        md += ("\n\nweights = random: seeded random initialization, not trained weights; these ERFs describe the "
               "untrained architecture, not what a trained network sees.")
    if diffs:
        md += "\n\ntrain vs deploy (re-parameterized) ERF, largest difference:\n\n" + markdown_table(
            diffs, ("member", "max_abs_diff", "max_rel_diff"))
    write_text(out_dir / "sweep.md", md + "\n")
    files += [out_dir / "sweep.csv", out_dir / "sweep.md"]
    save(complete=True, rows=rows, reparam_diff=diffs, files=[p.name for p in files])  # last: the sweep is complete
    files.append(out_dir / "sweep.json")
    return {"rows": rows, "reparam_diff": diffs, "files": files, "out_dir": out_dir, "markdown": md, "main": True}
