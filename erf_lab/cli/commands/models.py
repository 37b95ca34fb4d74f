"""``erf-lab models``: the model zoo with parameters, FLOPs at 224, kernel sizes, deploy parameters and FLOPs."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "models"
HELP = "list the available models with parameters, GFLOPs at 224, kernel sizes and deploy parameters / GFLOPs"
ORDER = 10
DESCRIPTION = (
    "List registered models (RepLKNet variants and the comparison CNNs of Ding et al., CVPR 2022) with their "
    "parameter count, GFLOPs for one 224x224 image (multiply-accumulates of conv and linear layers, as in the "
    "paper's tables), characteristic kernel sizes (RepLKNet: per stage) and the parameters and GFLOPs of the "
    "re-parameterized deploy form (the form the RepLKNet and UniRepLKNet tables count). Models are built on the "
    "meta device, so no weights are allocated."
)
SORT_KEYS = {"name": "name", "params": "params", "flops": "flops_224", "family": "family"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="MODEL",
                        help="models to describe (default: all registered models)")
    parser.add_argument("--family", metavar="FAMILY",
                        help="only models of this family (replknet, unireplknet, slak, resnet, mobilenetv2, "
                             "efficientnet_lite)")
    parser.add_argument("--sort", choices=sorted(SORT_KEYS), default="name",
                        help="sort the rows by this column (default: name)")
    parser.add_argument("--json", action="store_true",
                        help="print machine-readable JSON (a list of objects with name, family, params, "
                             "flops_224, kernel_sizes, deploy_params, deploy_flops_224; counts are exact integers)")


def list_model_rows(names: list[str] | None = None, family: str | None = None, sort: str = "name",
                    show_progress: bool = False) -> list[dict]:
    """The rows ``erf-lab models`` shows, as data (also used by the app and tests)."""
    from erf_lab.models.summary import describe_models

    rows = describe_models(names, family=family, show_progress=show_progress)
    key = SORT_KEYS[sort]
    return sorted(rows, key=lambda r: (r[key], r["name"]))


def run(args: argparse.Namespace) -> int:
    from erf_lab.models.summary import format_table

    rows = list_model_rows(args.names, family=args.family, sort=args.sort,
                           show_progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0
