"""The ``erf-lab`` command lines equivalent to what a page shows (shown under it with ``ui.cli_hint``)."""
from __future__ import annotations

import json

from app import safety


def _tuple_text(v) -> str:
    return "(" + ",".join(map(str, v)) + ")"


def _override_text(v) -> str:
    return _tuple_text(v) if isinstance(v, (list, tuple)) else str(v)


def override_args(overrides: dict) -> list[str]:
    """``--override key=value`` for each model option, as ``erf-lab`` reads them back."""
    return [a for k, v in overrides.items() for a in ("--override", f"{k}={_override_text(v)}")]


def options_text(spec: dict) -> str:
    """The model and options of a configuration as one line: ``replknet_3 channels=(16,32,64,128) ...``."""
    return " ".join([spec["model"], *override_args(json.loads(spec["overrides"]))[1::2]])


def erf_cli_args(spec: dict, source: tuple, full: bool = True, run_info: dict | None = None) -> list[str]:
    """The ``erf-lab compute`` arguments for an ERF explorer ``spec`` and image ``source``
    (``full``: the paper protocol, trained weights, 50 ImageNet images at 1024 px; otherwise this configuration:
    every model option, the uploaded checkpoint by its name, and, given the ``run_info`` of the app's measurement,
    the very folder and number of images it read)."""
    ov = json.loads(spec["overrides"])
    args = ["compute", "--model", spec["model"]]
    if full:
        if "large_kernel_sizes" in ov:
            args += ["--override", f"large_kernel_sizes={_tuple_text(ov['large_kernel_sizes'])}",
                     "--override", f"small_kernel={ov.get('small_kernel')}"]
    else:
        args += override_args(ov)
    if spec.get("layer") and spec["layer"] != "forward_features":
        args += ["--layer", spec["layer"]]
    if not spec.get("reparameterize", True):
        args += ["--no-reparam"]
    if spec.get("aggregate", "relu") != "relu":
        args += ["--aggregate", spec["aggregate"]]
    if full:
        args += ["--weights", "CHECKPOINT.pth", "--images", "IMAGENET_VAL_DIR", "--num-images", "50",
                 "--input-size", "1024"]
    else:
        if spec.get("weights"):
            args += ["--weights", spec["weights"]]
        elif spec.get("weights_name"):  # an upload: the app loads it without its classifier
            args += ["--weights", spec["weights_name"], "--drop-head"]
        args += ["--input-size", str(spec["input_size"])]
        if run_info is not None:
            args += ["--images", run_info["images"], "--num-images", str(run_info["num_images_requested"])]
        elif source[0] == "cue-world":
            args += ["--images", "CUE_WORLD_VAL_DIR", "--num-images", str(source[1])]
        elif source[0] == "folder":
            args += ["--images", source[1], "--num-images", str(safety.MAX_IMAGES)]
        else:  # built-in photos: the first n are the default set's; a selection or uploads: a folder of them
            from app.erf_maps import builtin_image_names

            if source[0] != "builtin" or list(source[1]) != builtin_image_names()[:len(source[1])]:
                args += ["--images", "IMAGES_DIR"]
            args += ["--num-images", str(len(source[1]))]
    args += ["--out", "runs/erf"]
    return args
