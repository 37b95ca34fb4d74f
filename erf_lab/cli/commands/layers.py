"""``erf-lab layers``: layer names, output shapes and theoretical receptive fields, to pick ``--layer``."""
from __future__ import annotations

import argparse

NAME = "layers"
HELP = "list a model's layers with output shapes and theoretical receptive fields"
ORDER = 21
DESCRIPTION = ("List every module that outputs a feature map, in execution order, with its (C, H, W) shape at "
               "--input-size and its theoretical receptive field computed from the module graph (kernels, strides, "
               "dilations; parallel branches take their union). The names are those of the deploy form that 'compute' "
               "measures (RepLKNet's re-parameterized blocks); "
               "--no-reparam lists the train-time form, for 'compute --no-reparam --layer'.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="registered model name, timm/<name> (extra '.[timm]') or package.module:factory")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="model constructor option; repeatable")
    p.add_argument("--input-size", type=int, default=224, help="square input side for the shapes (default 224)")
    p.add_argument("--filter", help="only names containing this text")
    p.add_argument("--all", action="store_true", help="also list sub-modules inside blocks (BN, activations)")
    p.add_argument("--no-reparam", action="store_true",
                   help="list the train-time form (branches and BN layers that re-parameterization folds away)")


def layer_table(model_name: str, input_size: int = 224, overrides: dict | None = None, *,
                contains: str | None = None, all_modules: bool = False, reparameterize: bool = True) -> list[dict]:
    """Rows of ``list_layers`` for a model by name (containers' leaves elided unless ``all_modules``), in the
    deploy form that ``compute`` measures unless ``reparameterize`` is False (then the train-time form)."""
    from erf_lab.erf.receptive_field import list_layers
    from erf_lab.errors import ErfLabError
    from erf_lab.models import create_model

    from erf_lab.erf.runner import MAX_INPUT_SIZE

    if not 1 <= input_size <= MAX_INPUT_SIZE:
        raise ErfLabError(f"--input-size must be in [1, {MAX_INPUT_SIZE}], got {input_size}")
    model = create_model(model_name, **(overrides or {}))
    if reparameterize:
        from erf_lab.models import reparameterize_model

        model = reparameterize_model(model, inplace=True)
    rows = list_layers(model, input_size)
    if not all_modules:
        leaf_like = (".bn", ".nonlinear", ".drop_path", ".act", ".relu")
        rows = [r for r in rows if not r["name"].endswith(leaf_like)]
    if contains:
        names = [r["name"] for r in rows]
        rows = [r for r in rows if contains in r["name"]]
        if not rows:
            import difflib

            close = difflib.get_close_matches(contains, names, n=3, cutoff=0.5)
            raise ErfLabError(f"--filter {contains!r} matches no layer of {model_name}"
                              + (f"; close names: {', '.join(close)}" if close else "; run without --filter"))
    return rows


def run(args: argparse.Namespace) -> int:
    from erf_lab.cli.options import parse_overrides
    from erf_lab.erf.metrics import GLOBAL_RF_REASON
    from erf_lab.erf.tables import rf_text

    rows = layer_table(args.model, args.input_size, parse_overrides(args.override), contains=args.filter,
                       all_modules=args.all, reparameterize=not args.no_reparam)
    width = max([len(r["name"]) for r in rows] + [5])
    print(f"{'layer':<{width}}  {'output (C, H, W)':<18}  {'stride':>6}  {'theoretical RF':>14}")
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        print(f"{r['name']:<{width}}  {shape:<18}  {str(r['stride']):>6}  {rf_text(r):>14}")
    if any(r.get("rf_global") for r in rows):
        print(f"global (N): {GLOBAL_RF_REASON}; N: the RF of its kernels alone (none after window attention or a "
              "resampling)")
    return 0
