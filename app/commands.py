"""The ``erf-lab`` command lines equivalent to what a page shows (shown under it with ``ui.cli_hint``)."""
from __future__ import annotations

import json


def _tuple_text(v) -> str:
    return "(" + ",".join(map(str, v)) + ")"


def erf_cli_args(spec: dict, source: tuple, full: bool = True) -> list[str]:
    """The ``erf-lab compute`` arguments for an ERF explorer ``spec`` and image ``source``
    (``full``: the paper protocol, trained weights, 50 ImageNet images at 1024 px)."""
    ov = json.loads(spec["overrides"])
    args = ["compute", "--model", spec["model"]]
    if "large_kernel_sizes" in ov:
        args += ["--override", f"large_kernel_sizes={_tuple_text(ov['large_kernel_sizes'])}",
                 "--override", f"small_kernel={ov.get('small_kernel')}"]
    if not full and "channels" in ov:
        args += ["--override", f"channels={_tuple_text(ov['channels'])}",
                 "--override", f"layers={_tuple_text(ov['layers'])}"]
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
        args += ["--input-size", str(spec["input_size"])]
        if source[0] == "cue-world":
            args += ["--images", "CUE_WORLD_VAL_DIR", "--num-images", str(source[1])]
        elif source[0] == "folder":
            args += ["--images", source[1]]
        elif source[0] == "builtin":
            args += ["--num-images", str(len(source[1]))]
    args += ["--out", "runs/erf"]
    return args
