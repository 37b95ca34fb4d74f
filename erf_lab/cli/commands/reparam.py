"""``erf-lab reparam``: structural re-parameterization of RepLKNet into the official deploy checkpoint layout."""
from __future__ import annotations

import argparse

NAME = "reparam"
HELP = "merge RepLKNet's small kernels into the large ones and save the deploy checkpoint"
ORDER = 40
DESCRIPTION = ("Structural re-parameterization (RepLKNet, CVPR 2022, Sec. 3): fuse each large-kernel conv's BN and "
               "its parallel small-kernel conv-BN into one biased large kernel (official 'lkb_reparam' key layout, "
               "loadable by the official code and by 'erf-lab ... --weights'). Prints parameters and FLOPs (MACs of "
               "conv/linear at 224x224) before and after, and the measured max relative error of the logits.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a RepLKNet, UniRepLKNet or SLaK model, e.g. replknet_31b, "
                   "unireplknet_a, slak_t (see 'erf-lab models')")
    p.add_argument("--weights", help="train-time checkpoint (.pth/.pt state dict, or .safetensors); default: random init")
    p.add_argument("--drop-head", action="store_true", help="load a checkpoint whose classifier differs (e.g. 21841-class)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="model constructor option, e.g. channels=(16,32,64,128); repeatable")
    p.add_argument("--out", required=True, help="output checkpoint (.pth, or .safetensors by suffix)")
    p.add_argument("--check-batch", type=int, default=2, help="random images for the equivalence check (default 2)")
    p.add_argument("--check-size", type=int, default=224, help="their side in pixels (default 224)")


def run(args: argparse.Namespace) -> int:
    from erf_lab.cli.options import command_line, parse_overrides, warnings_as_lines
    from erf_lab.models.deploy import export_deploy

    with warnings_as_lines("reparam"):  # e.g. which of a checkpoint's weights (raw, EMA) loaded
        s = export_deploy(args.model, args.out, weights=args.weights, drop_head=args.drop_head,
                          batch_size=args.check_batch, input_size=args.check_size, argv=command_line(),
                          **parse_overrides(args.override))
    seed = "" if s["init_seed"] is None else f", seed {s['init_seed']}"
    init = f"  (random init{seed}; the output is marked as untrained)" if s["random_init"] else ""
    print(f"model        {s['model']}" + (f"  (weights {s['weights']})" if s["weights"] else "") + init)
    print(f"params       {s['params_before'] / 1e6:.2f}M -> {s['params_after'] / 1e6:.2f}M")
    print(f"FLOPs@{s['flops_input_size']}    {s['flops_before'] / 1e9:.2f}G -> {s['flops_after'] / 1e9:.2f}G (MACs)")
    if s["nonzero_flops_before"] < s["flops_before"] or s["nonzero_flops_after"] < s["flops_after"]:
        print(f"non-zero     {s['nonzero_params_before'] / 1e6:.2f}M / {s['nonzero_flops_before'] / 1e9:.2f}G -> "
              f"{s['nonzero_params_after'] / 1e6:.2f}M / {s['nonzero_flops_after'] / 1e9:.2f}G  (params / FLOPs of "
              "the non-zero weights: a sparse checkpoint's zeros and merged kernels' zero taps left out, as the SLaK "
              "paper counts its sparse models)")
    print(f"max rel err  {s['max_rel_error']:.2e}  ({s['compared']}, {'x'.join(map(str, s['check_batch']))} random "
          "batch)")
    if s["branch_max_rel_error"] is not None:
        print(f"             {s['branch_max_rel_error']:.2e}  (the worst of {s['num_branches']} residual branches)")
    print(f"wrote        {s['out']}  ({s['num_keys']} keys, sha256 {s['sha256'][:12]}) + {s['out']}.run.json")
    if s["head_left_out"]:
        head = ", ".join(s["head_left_out"])
        print(f"note         the classifier ({head}) was not in --weights' form (--drop-head): left out of the file, "
              "not written at its random init; load it with --drop-head, or build the model with --override "
              "num_classes=0")
    return 0
