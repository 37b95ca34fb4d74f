"""ERF maps of the explorer and growth pages: image sources, the measurement, metrics, kernel sweeps.

A page's image choice is a hashable ``source``: ``("builtin", names)``, ``("cue-world", n)`` (the first n cue-world
validation images, drawn at the measured size), ``("folder", path)`` or
``("upload", ((name, bytes), ...), ((name, reason), ...))`` (valid uploads, then the skipped ones).

A configuration ``spec`` may name shipped trained weights, ``spec["weights"] = "builtin:cue-world/K31-seed0"``
(data/trained/cue-world, :func:`erf_lab.checkpoint.resolve_weights`); its model options come from the record."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Callable

from app import safety
from app.cache import cached, sha
from app.models import TINY_CHANNELS, build_model, overrides_key, parse_overrides
from app.runs import app_runs_dir
from erf_lab.erf.images import default_images_dir, list_image_files
from erf_lab.erf.metrics import summary
from erf_lab.erf.rundir import RANDOM_MARK, load_run
from erf_lab.erf.runner import ErfSpec, run_erf
from erf_lab.erf.sweep import run_sweep
from erf_lab.errors import ErfLabError
from erf_lab.io import file_list_digest

DEFAULT_INPUT = 128
DEFAULT_NUM_IMAGES = 2
#: the shipped kernel family (data/trained/cue-world): kernel size -> name; trained at 64 px, 10 classes
SHIPPED_FAMILY = {3: "K3-seed0", 7: "K7-seed0", 13: "K13-seed0", 31: "K31-seed0"}
SHIPPED_PREFIX = "builtin:cue-world/"
#: cue-world validation images of the trained defaults (4 keep a page at a few seconds per model)
DEFAULT_CUE_WORLD_IMAGES = 4
#: shown beside an ERF measured with seeded random weights (run.json ``random_init``; as `erf-lab sweep` notes it)
RANDOM_INIT_NOTE = ("random init: seeded random weights, never trained; this ERF describes the untrained "
                    "architecture, not what a trained network sees")
#: under a table with "n/r" cells (:func:`metrics_table`)
NOT_REACHED_NOTE = "n/r: no centred square inside the image holds that share of the ERF (not reached)."
#: shown for a map whose metrics are flagged ``empty_map`` (erf_lab.erf.metrics): its n/r areas mean nothing
EMPTY_MAP_NOTE = ("ERF map is all zeros (no gradient reached the input): it has no area or radius, so its n/r "
                  "areas and missing radii are not measurements")


def shipped_names() -> list[str]:
    """Names of the shipped cue-world models (``K31-seed0``, ...): the stems of data/trained/cue-world/*.safetensors."""
    from erf_lab.paths import data_dir

    return sorted(p.stem for p in (data_dir() / "trained" / "cue-world").glob("*.safetensors"))


def shipped_spec(name: str, **fields) -> dict:
    """ERF configuration of the shipped model ``name`` (e.g. ``"K31-seed0"``) with its recorded model options;
    ``random_init=True`` gives the same architecture without the weights (seeded init)."""
    from erf_lab.checkpoint import resolve_weights
    from erf_lab.models.registry import build_options

    record = resolve_weights(SHIPPED_PREFIX + name)[1]
    overrides = build_options(record["model"], SHIPPED_PREFIX + name, {})  # its recorded options, as create_model's
    spec = {"model": record["model"], "overrides": overrides_key(overrides), "reparameterize": True, **fields}
    if not spec.pop("random_init", False):
        spec["weights"] = SHIPPED_PREFIX + name
    return spec


@functools.lru_cache(maxsize=4)
def _shipped_digests(stamp: tuple) -> dict[str, str]:
    """SHA-256 of each shipped model's file -> its name (``stamp``: the files' names, sizes and mtimes)."""
    from erf_lab.io import sha256_file
    from erf_lab.paths import data_dir

    root = data_dir() / "trained" / "cue-world"
    return {sha256_file(root / f"{name}.safetensors"): name for name, *_ in stamp}


def shipped_upload(weights: bytes | None) -> str | None:
    """The name of the shipped model (``K3-seed0``) whose file an upload is, byte for byte; None for any other file.
    Its record (data/trained/cue-world/NAME.json) names the model and options it was trained with, which the file
    alone does not carry."""
    from erf_lab.paths import data_dir

    if not weights:
        return None
    root = data_dir() / "trained" / "cue-world"
    stamp = tuple((n, p.stat().st_size, p.stat().st_mtime_ns)
                  for n in shipped_names() if (p := root / f"{n}.safetensors").is_file())
    if len(weights) not in {size for _, size, _ in stamp}:
        return None
    return _shipped_digests(stamp).get(sha(weights))


def builtin_image_names() -> list[str]:
    """File names of the built-in image set (data/default_images)."""
    root = default_images_dir()
    return [p.relative_to(root).as_posix() for p in list_image_files(root)[0]]


def _stored(kind: str, key: str) -> Path:
    """A folder of the app's run area for uploaded or selected inputs (content-addressed: reused)."""
    d = app_runs_dir() / "inputs" / f"{kind}-{key}"
    d.mkdir(parents=True, exist_ok=True)
    return d


#: in each folder of :func:`_stored`: stored file name -> SHA-256 of its content (hidden: no runner reads it)
_STORED_RECORD = ".stored.json"


def _store(folder: Path, files: dict[str, bytes | Callable[[], bytes]]) -> None:
    """Write ``files`` (name -> its bytes, or a function making them) into ``folder`` (:func:`_stored`). Each file
    appears only whole (atomically), and one already there is reused only when its SHA-256 is the content's (bytes
    given) or the one recorded when it was written (:data:`_STORED_RECORD`): a truncated file (a write the app's
    stop cut short, before writes were atomic) or one changed since is written again, never measured. Held while it
    writes (:func:`erf_lab.io.hold_folder`): two sessions storing the same input take turns, and the temporary
    file of a write killed before is removed."""
    from erf_lab.io import atomic_path, hold_folder, read_json_or_none, sha256_file, write_json

    with hold_folder(folder):  # the temporary files of a write killed before go
        record = read_json_or_none(folder / _STORED_RECORD)
        digests = {k: v for k, v in record.items() if isinstance(v, str)} if isinstance(record, dict) else {}
        for name, content in files.items():
            path = folder / name
            want = hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else digests.get(name)
            if want is not None and path.is_file() and not path.is_symlink() and sha256_file(path) == want:
                digests[name] = want
                continue
            data = content if isinstance(content, bytes) else content()
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        if digests != record:
            write_json(folder / _STORED_RECORD, digests)


def _png_bytes(name: str, data: bytes) -> bytes:
    """An uploaded image, checked (:func:`app.safety.verify_image_bytes`), as the PNG the app stores."""
    buf = io.BytesIO()
    safety.verify_image_bytes(name, data).save(buf, format="PNG")
    return buf.getvalue()


def _images_folder(source: tuple, input_size: int) -> str | None:
    """The folder the runner reads for a page's image choice: a folder of the chosen built-in images, of cue-world
    validation images drawn at ``input_size``, the user's (checked) folder, or the uploads written as PNG."""
    from erf_lab.io import hold_folder

    kind, payload = source[:2]
    if kind == "cue-world":
        from erf_lab.train.timeline import cue_world_images

        d = _stored("cue-world", f"val-{input_size}px")
        with hold_folder(d):  # two sessions drawing them at once: one draws, the other finds them drawn
            return str(cue_world_images(d, int(payload), input_size, 10, 0))
    if kind == "builtin":
        names = builtin_image_names()
        chosen = [n for n in names if n in set(payload)]
        if not chosen:
            raise ErfLabError(f"none of {sorted(payload)} is a built-in image")
        d = _stored("builtin", hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:16])
        _store(d, {n: (default_images_dir() / n).read_bytes() for n in chosen})
        return str(d)
    if kind == "folder":
        return str(safety.safe_directory(payload, "image folder"))
    if kind == "upload":
        d = _stored("upload", hashlib.sha256(_source_key(source).encode()).hexdigest()[:16])
        _store(d, {f"{i:03d}_{Path(name).stem[:40]}.png": functools.partial(_png_bytes, name, data)
                   for i, (name, data) in enumerate(payload)})
        return str(d)
    raise ErfLabError(f"unknown image source {kind!r}")


def _weights_file(spec: dict, weights: bytes | None) -> str | None:
    """The uploaded checkpoint, checked first by ``build_model`` (errors name the user's file), then stored."""
    if weights is None:
        return None
    build_model(spec["model"], spec["overrides"], weights, spec.get("weights_name", ""))
    suffix = ".safetensors" if spec.get("weights_name", "").endswith(".safetensors") else ".pth"
    folder = _stored("weights", sha(weights)[:16])
    _store(folder, {f"checkpoint{suffix}": weights})
    return str(folder / f"checkpoint{suffix}")


def spec_label(spec: dict) -> str:
    """Short human label of one ERF configuration."""
    form = "re-param" if spec.get("reparameterize") else "train-time"
    if spec.get("weights", "").startswith(SHIPPED_PREFIX):
        return f"{spec['weights'][len(SHIPPED_PREFIX):]} · trained (cue-world) · {form}"
    ov = json.loads(spec["overrides"])
    parts = [spec["model"]]
    if "large_kernel_sizes" in ov:
        ks = ov["large_kernel_sizes"]
        parts.append("K" + ("-".join(map(str, ks)) if len(set(ks)) > 1 else str(ks[0])))
    if ov.get("channels") == list(TINY_CHANNELS):
        parts.append("tiny")
    parts.append(form)
    if spec.get("weights_name"):
        parts.append(Path(spec["weights_name"]).stem[:20])
    elif spec.get("pretrained") or ov.get("pretrained"):  # the explorer puts it in the overrides
        parts.append("pretrained")
    return " · ".join(parts)


def _folder_fingerprint(folder: str) -> str:
    """Hash of the image files the runner would read from ``folder`` (relative path, size, modification time):
    a folder whose images were added, removed or replaced is a new measurement, not the stored one."""
    return file_list_digest(list_image_files(Path(folder))[0], folder)  # one gone since: the runner skips it too


def _source_key(source: tuple) -> str:
    if source[0] == "upload":
        return json.dumps(["upload", [(n, sha(d)) for n, d in source[1]], source[2]])
    if source[0] == "folder":  # the folder's contents, not only its name, decide whether a stored map is reused
        return json.dumps(["folder", source[1], _folder_fingerprint(source[1])])
    return json.dumps(list(source), default=list)


def erf_for(spec: dict, source: tuple, weights: bytes | None = None, on_progress=None) -> dict:
    """ERF map, metrics and skipped images of one configuration, measured by the one runner
    (``erf_lab.erf.runner.run_erf``) into a run directory of the app's run area, reused when it exists.

    Random-init models are seeded (seed 0) so a configuration always gives the same map, as in the CLI.
    ``on_progress(fraction)`` is called after every image. Skipped images are counted as by the CLI: the
    unusable uploads, the unreadable files of the folder, and the images whose gradient was not finite.
    """
    key = "erf:" + json.dumps(spec, sort_keys=True) + _source_key(source) + sha(weights)
    return cached(key, lambda: _erf(spec, source, weights, on_progress, key), valid=_run_still_there)


def _run_stamp(run_dir: str | Path) -> tuple | None:
    """Size and modification time of a run folder's run.json and erf.npy (None when one is missing): another run
    written in its place has another stamp."""
    try:
        return tuple((s.st_size, s.st_mtime_ns) for s in (Path(run_dir, n).stat() for n in ("run.json", "erf.npy")))
    except OSError:
        return None


def _run_still_there(res: dict) -> bool:
    """A remembered measurement stands while its run folder, in the app's run area of now, still holds that run and
    the image folder it read (the command hint names) exists: after the run area was cleared or moved
    ($ERF_LAB_APP_RUNS) it is measured again, not shown from memory."""
    images = res["info"].get("images")
    return (Path(res["run_dir"]).parent == app_runs_dir() and _run_stamp(res["run_dir"]) == res["run_stamp"]
            and (not images or Path(images).is_dir()))


def _erf(spec: dict, source: tuple, weights: bytes | None, on_progress, key: str) -> dict:
    t0 = time.perf_counter()
    images = _images_folder(source, int(spec["input_size"]))
    num = (int(source[1]) if source[0] == "cue-world" else len(source[1]) if source[0] in ("builtin", "upload")
           else safety.MAX_IMAGES)
    run_spec = ErfSpec(model=spec["model"], weights=spec.get("weights") or _weights_file(spec, weights),
                       drop_head=weights is not None,
                       overrides=parse_overrides(spec["overrides"]), images=images, num_images=num,
                       input_size=int(spec["input_size"]), layer=spec.get("layer") or None,
                       aggregate=spec.get("aggregate", "relu"), reparameterize=bool(spec.get("reparameterize", True)))
    out = app_runs_dir() / f"erf-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    callback = (lambda acc: on_progress(min(len(acc.processed) / max(num, 1), 1.0))) if on_progress else None
    res = run_erf(run_spec, out=out, reuse=True, label=spec_label(spec), show_progress=False, on_batch=callback,
                  formats=("png",), argv=["streamlit", "app/main.py", "(ERF explorer)"])
    run = load_run(out)
    metrics = res["metrics"]  # a reused run's recomputed from its erf.npy (its metrics.json may be damaged or stale)
    info = run.run_info
    label = f"{spec_label(spec)} {RANDOM_MARK}" if info.get("random_init") else spec_label(spec)
    skipped = [list(s) for s in (source[2] if source[0] == "upload" else ())]
    skipped += [list(s) for s in info["skipped"] if s[1] != "not an image file (extension)"]
    return {"erf": run.erf, "metrics": metrics, "summary": summary(metrics), "num_used": info["num_used"],
            "num_skipped": len(skipped), "skipped": skipped, "layer": info["layer"], "trf": info["theoretical_rf"],
            "seconds": time.perf_counter() - t0, "label": label, "info": info, "run_dir": str(out),
            "run_stamp": _run_stamp(out)}


def skip_message(skipped: list, num_used: int) -> str | None:
    """``"N of M images skipped: name: reason; ..."`` (the first five), or None when nothing was skipped."""
    if not skipped:
        return None
    shown = "; ".join(f"{n}: {r}" for n, r in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    return f"{len(skipped)} of {len(skipped) + num_used} images skipped: {shown}"


def summary_table(results: list[tuple[dict, dict]]):
    """One row per configuration: label + the flat metrics summary."""
    return metrics_table([{"configuration": r["label"], "images": r["num_used"], **r["summary"]} for _, r in results])


def metrics_table(rows: list[dict]):
    """A DataFrame of metric rows (flat summaries) with each area / side threshold the centred square never reaches
    inside the image as "n/r", as erf-lab compare and sweep.md write it (not an unexplained NaN)."""
    import math

    import pandas as pd

    def cell(k, v):
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return "n/r" if missing and k.startswith(("area@", "side@")) else v

    return nr_columns_as_text(pd.DataFrame([{k: cell(k, v) for k, v in r.items()} for r in rows]))


def nr_columns_as_text(table):
    """``table`` with each column that holds "n/r" (not reached) as text, as erf-lab compare prints it: a column of
    numbers and "n/r" cannot be sent to the browser as one Arrow type (Streamlit logs a traceback and converts it
    itself). Numbers as ``.4g``, a missing value (None / NaN) as empty."""
    import math

    def text(v):
        return v if isinstance(v, str) else "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    for col in table.columns[(table == "n/r").any()]:
        table[col] = table[col].map(text)
    return table


def sweep_member(k: int, *, reparam: str, init: str, weights_dir: str | None, input_size: int, num_images: int,
                 overrides_json: str, layer: str | None = None) -> dict:
    """One kernel size of ``erf_lab.erf.sweep.run_sweep`` (its run directories are reused when settings match).

    Returns ``{"rows", "reparam_diff", "maps": {mode: erf}, "run_info": {mode: run.json}, "out_dir"}``.
    """
    tag = hashlib.sha256(json.dumps([reparam, init, weights_dir, input_size, num_images, overrides_json, layer])
                         .encode()).hexdigest()[:12]
    out = app_runs_dir() / f"sweep-{tag}" / f"K{k}"
    res = run_sweep([k], reparam=reparam, init=init, weights_dir=weights_dir, input_size=input_size,
                    num_images=num_images, overrides=parse_overrides(overrides_json), out=out, formats=("png",),
                    force=True,  # a cache: a member of other settings (e.g. a replaced checkpoint) is measured again
                    layer=layer, show_progress=False, argv=["streamlit", "app/main.py", "(growth page)"])
    loaded = {row["reparam"]: load_run(out / row["run_dir"]) for row in res["rows"]}
    return {"rows": res["rows"], "reparam_diff": res["reparam_diff"], "maps": {m: r.erf for m, r in loaded.items()},
            "run_info": {m: r.run_info for m, r in loaded.items()}, "out_dir": str(out)}


def shipped_member(k: int, *, reparam: str, input_size: int, num_images: int, random_init: bool = False) -> dict:
    """The shipped trained model of kernel ``k`` (or, ``random_init``, its architecture at seeded random init) on
    ``num_images`` cue-world validation images, through :func:`erf_for`; same return as :func:`sweep_member`."""
    from erf_lab.erf.sweep import REPARAM_MODES

    if k not in SHIPPED_FAMILY:
        raise ErfLabError(f"no shipped trained model for K = {k}; shipped: K = {', '.join(map(str, SHIPPED_FAMILY))}")
    init = "random" if random_init else "trained"
    rows, maps = [], {}
    for mode in REPARAM_MODES[reparam]:
        spec = shipped_spec(SHIPPED_FAMILY[k], random_init=random_init, reparameterize=mode == "deploy",
                            input_size=int(input_size), aggregate="relu")
        res = erf_for(spec, ("cue-world", int(num_images)))
        maps[mode] = res["erf"]
        rows.append({"kernel": k, "input_size": int(input_size), "reparam": mode, "init": init,
                     "series": f"{init} {mode}", "model": spec["model"], "num_used": res["num_used"],
                     "run_dir": res["run_dir"], **res["summary"]})
    diffs = []
    if len(maps) == 2:
        import numpy as np

        a, b = maps["train"], maps["deploy"]
        worst = float(np.abs(a - b).max())
        diffs.append({"member": f"K{k} {init}", "kernel": k, "input_size": int(input_size), "max_abs_diff": worst,
                      "max_rel_diff": worst / (float(np.abs(a).max()) or 1.0)})
    return {"rows": rows, "reparam_diff": diffs, "maps": maps}


def size_sweep(sizes: tuple[int, ...], *, model: str, overrides_json: str, num_images: int,
               reparam: str = "deploy", on_progress=None) -> dict:
    """``erf_lab.erf.sweep.run_sweep`` over input sizes (its run directories are reused when settings match).

    Returns ``{"rows", "out_dir", "markdown"}``; the sweep folder holds growth / grid figures and sweep.csv."""
    check = parse_overrides(overrides_json)
    tag = hashlib.sha256(json.dumps([sorted(sizes), model, overrides_json, num_images, reparam]).encode()).hexdigest()
    out = app_runs_dir() / f"size-sweep-{tag[:12]}"
    res = run_sweep(None, input_sizes=sorted(sizes), model=model, reparam=reparam, num_images=num_images,
                    overrides=check, out=out, formats=("png", "pdf"), show_progress=False, force=True,
                    argv=["streamlit", "app/main.py", "(growth page, vs input size)"], on_progress=on_progress)
    return {"rows": res["rows"], "out_dir": str(out), "markdown": res["markdown"]}
