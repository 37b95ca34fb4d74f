"""``erf-lab shape-bias``: shape vs. texture decisions on cue-conflict stimuli (Geirhos et al., ICLR 2019)."""
from __future__ import annotations

import sys

from erf_lab.cli.options import command_line, seed, warnings_as_lines

NAME = "shape-bias"
HELP = "shape bias on Geirhos cue-conflict stimuli (model-vs-human 16-class mapping), figures vs. humans"
ORDER = 60
DESCRIPTION = (
    "Run a classifier on the 1280 cue-conflict images (and edges / silhouettes when present), map ImageNet-1k "
    "softmax to the 16 categories by mean probability (model-vs-human), and report shape bias = shape hits / "
    "(shape + texture hits) over images whose shape and texture differ. Writes decisions.csv, summary.json, "
    "run.json, a model-vs-human CSV per set, shape_bias.png/pdf and error_consistency.png/pdf. With --compare "
    "RUN_DIR..., draws several runs in one figure and table. Data: --stimuli DIR, $ERF_LAB_DATA, or 'erf-lab data "
    "download'. Needs trained weights "
    "(--pretrained or --weights); --allow-random measures an untrained network and marks every output so. Runs "
    "that answer one category for >= 90% of the images or hit shape or texture less often than chance (2/16) "
    "are flagged. Every run also reports 16-class accuracies and observed / expected / error consistency "
    "(Cohen's kappa) with each of the 10 human subjects of model-vs-human; --from-csv FILE... analyses "
    "model-vs-human CSVs (<dataset>_<subject>_session-1.csv) without running a model."
)


def add_arguments(p) -> None:
    p.add_argument("--model",
                   help="registered model name, timm/<name> (extra '.[timm]') or package.module:factory")
    p.add_argument("--weights", help="checkpoint (.pth/.pt state dict, or .safetensors)")
    p.add_argument("--pretrained", action="store_true", help="use the model's published ImageNet weights")
    p.add_argument("--allow-random", action="store_true",
                   help="measure an untrained (randomly initialized) network; marked untrained in every output")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="model constructor option (repeatable)")
    p.add_argument("--seed", type=seed, default=None,
                   help="seed of the random initialisation (--allow-random; default 0)")
    p.add_argument("--stimuli", help="cue-conflict folder (<category>/<shape><i>-<texture><j>.png), default from "
                                     "$ERF_LAB_DATA, else the download cache; 'cue-world' probes a cue-world "
                                     "classifier on the built-in world's cue-conflict / shape-only / texture-only "
                                     "splits (--limit images each, default 500)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode worker processes (default on CPU one per torch thread, up to 8, decoding before "
                        "inference; on CUDA half the CPUs, 1-4, beside it)")
    p.add_argument("--no-cache", action="store_true",
                   help="decode every image again, without reading or writing the decoded-stimulus cache "
                        "(<erf-lab cache>/stimuli, ~150 KB per 224 px image)")
    p.add_argument("--crop-pct", default=None, metavar="F|model",
                   help="centre-crop fraction: 1.0 (default) feeds the stimuli whole, as model-vs-human does; "
                        "'model' takes the model's ImageNet-evaluation crop (e.g. 0.875), which cuts the border")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N cue-conflict images spread over all categories (edges and silhouettes: N/8 "
                        "each, at least 16)")
    p.add_argument("--from-csv", nargs="+", metavar="CSV",
                   help="analyse model-vs-human CSVs (cue-conflict / edge / silhouette) instead of running a model")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="compare finished runs instead of evaluating")
    p.add_argument("--no-humans", action="store_true",
                   help="leave the human data out: no human reference shape bias, no consistency with the subjects, "
                        "none in the figures")
    p.add_argument("--out", default=None, help="output folder (default runs/shape_bias/<model> or "
                                               "runs/shape_bias/comparison)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from pathlib import Path

    from erf_lab.errors import ErfLabError
    from erf_lab.io import refuse_empty
    from erf_lab.shape_bias.analysis import human_csvs

    refuse_empty(args.out)  # not the default folder: below, Path(args.out or default) would pick that
    if args.stimuli != "cue-world":  # the stimuli, human data and class names come from there (or the cache)
        from erf_lab.paths import check_erf_lab_data

        check_erf_lab_data()

    model_flags = [flag for flag, v in (("--model", args.model), ("--weights", args.weights),
                                        ("--pretrained", args.pretrained), ("--seed", args.seed is not None),
                                        ("--crop-pct", args.crop_pct is not None),
                                        ("--allow-random", args.allow_random), ("--override", args.override),
                                        ("--batch-size", args.batch_size != 32), ("--workers", args.workers is not None),
                                        ("--no-cache", args.no_cache), ("--device", args.device != "cpu"),
                                        ("--limit", args.limit is not None)) if v]
    if args.compare and (model_flags or args.from_csv or args.stimuli is not None):
        extra = (model_flags + (["--from-csv"] if args.from_csv else [])
                 + (["--stimuli"] if args.stimuli is not None else []))
        raise ErfLabError(f"--compare draws finished runs only; drop {', '.join(extra)}")
    if args.from_csv and model_flags:
        raise ErfLabError(f"--from-csv analyses CSV files without a model; drop {', '.join(model_flags)}")
    if args.from_csv and args.stimuli is not None:  # where the human CSVs are looked for first: a folder
        if args.stimuli == "cue-world":
            raise ErfLabError("--stimuli cue-world is for a model run; --from-csv analyses model-vs-human CSVs: drop "
                              "it")
        from erf_lab.shape_bias.stimuli import find_stimuli_root

        find_stimuli_root(args.stimuli)  # one error line for a folder that is not there
    if args.compare:
        from erf_lab.shape_bias.plotting import compare_runs

        out = Path(args.out or "runs/shape_bias/comparison")
        res = compare_runs(args.compare, out, human_csv_paths=None if args.no_humans else human_csvs())
        if res["runs"] != [str(d) for d in args.compare]:  # a multi-model --from-csv output: its model folders
            print(f"compared {len(res['runs'])} runs: {', '.join(res['runs'])}")
        print(res["markdown"])
        print(f"wrote {out}/comparison.md, comparison.csv, shape_bias_comparison.png/pdf (and "
              f"error_consistency_comparison.png/pdf with human data)")
        return 0
    if args.from_csv:
        from erf_lab.shape_bias.plotting import analyse_csvs

        out = Path(args.out or "runs/shape_bias/from_csv")
        for s in analyse_csvs(args.from_csv, out, near=Path(args.stimuli) if args.stimuli else None,
                              humans=not args.no_humans, command=command_line()):
            _report(s)
            _warn(s)
            print(f"wrote {s['out']}/summary.json and figures")
        return 0
    if not args.model:
        raise ErfLabError("--model is required (or --compare RUN_DIR..., or --from-csv CSV...)")
    weights_flag = "--weights" if args.weights else "--pretrained" if args.pretrained else None
    if args.pretrained and args.allow_random:  # (--weights may hold a random initialisation that it accepts)
        raise ErfLabError("--allow-random measures an untrained model; it cannot go with --pretrained (drop one)")
    if args.seed is not None and (weights_flag or not args.allow_random):
        raise ErfLabError("--seed seeds the random initialisation of --allow-random"
                          + (f"; {weights_flag} loads trained weights: drop --seed" if weights_flag else
                             "; add --allow-random, or give trained weights (--weights/--pretrained) without --seed"))
    from erf_lab.cli.options import parse_overrides
    from erf_lab.shape_bias.evaluate import run_shape_bias

    out = Path(args.out or Path("runs/shape_bias") / args.model.replace(":", "_"))
    with warnings_as_lines("shape-bias"):  # e.g. which of a checkpoint's weights (raw, EMA) loaded
        if args.stimuli == "cue-world":
            return _cue_world(args, out, parse_overrides(args.override))
        s = run_shape_bias(args.model, out=out, weights=args.weights, pretrained=args.pretrained,
                           overrides=parse_overrides(args.override), stimuli=args.stimuli, batch_size=args.batch_size,
                           workers=args.workers, device=args.device, limit=args.limit, command=command_line(),
                           allow_random=args.allow_random, cache=not args.no_cache,
                           crop_pct=_crop_pct(args.crop_pct or "1.0"), seed=args.seed or 0,
                           with_humans=not args.no_humans, show_progress=not args.quiet)

    if s["random_weights"]:
        print(f"{args.model}: UNTRAINED (random initial weights, --allow-random): the numbers describe no trained model")
    _report(s)
    _warn(s)
    if s["n_skipped"]:
        print(f"  warning: {s['n_skipped']} file(s) skipped (see summary.json)", file=sys.stderr)
    print(f"wrote {out}/decisions.csv, summary.json, model-vs-human CSVs, shape_bias.png/pdf"
          + (", error_consistency.png/pdf" if (out / "error_consistency.png").is_file() else ""))
    return 0


def _warn(s: dict) -> None:
    """The summary's warnings (few decisions, a degenerate run, a subset, no human data), one line each on stderr."""
    for w in s.get("warnings") or ():
        print(f"  warning: {w}", file=sys.stderr)


def _crop_pct(text: str) -> float | None:
    """``--crop-pct``: a fraction in (0, 1], or 'model' (None: the model's own crop)."""
    from erf_lab.errors import ErfLabError

    if text == "model":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v <= 1:
        raise ErfLabError(f"--crop-pct must be a fraction in (0, 1] or 'model', got {text!r}")
    return v


def _f(v):
    return "n/a" if v is None else f"{v:.3f}"


def _report(s: dict) -> None:
    """Shape bias, accuracies and mean error consistency with the humans, one dataset a line."""
    if s["n_conflict"]:
        ci = s.get("shape_bias_ci95")
        print(f"{s['label']}: shape bias {_f(s['shape_bias'])}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
              + f"; shape hits {s['shape_hits']}, texture hits {s['texture_hits']}, of {s['n_conflict']} "
              f"cue-conflict images")
    else:
        print(f"{s['label']}: no cue-conflict trials (no shape bias)")
    if s.get("human_reference") and s["n_conflict"]:
        print(f"  humans: shape bias {_f(s['human_reference']['shape_bias'])}")
    for ds, r in (s.get("consistency") or {}).items():
        line = f"  {ds}: accuracy {_f(r['accuracy'])}"
        if "texture_accuracy" in r:
            line += f" (texture label {_f(r['texture_accuracy'])})"
        if r["vs_humans"]:
            k = r["vs_humans"]["error_consistency"]
            line += f"; error consistency with humans {_f(k['mean'])} +- {_f(k['sd'])}"
        hh = r["human_vs_human"]
        if hh:
            line += f" (human-human {_f(hh['error_consistency']['mean'])})"
        if r["vs_humans"] and "accuracy_difference" in r["vs_humans"]:  # summaries from before it was recorded lack it
            line += f"; accuracy difference {_f(r['vs_humans']['accuracy_difference']['mean'])}"
            if hh and "accuracy_difference" in hh:
                line += f" (human-human {_f(hh['accuracy_difference']['mean'])})"
        print(line + f"; {r['n_trials']} trials")


def _cue_world(args, out, overrides) -> int:
    from erf_lab.errors import ErfLabError
    from erf_lab.train.probes import run_cue_world_shape_bias

    if args.pretrained:
        raise ErfLabError("--stimuli cue-world needs a cue-world classifier (--weights), not ImageNet weights")
    if args.crop_pct is not None:
        raise ErfLabError("--crop-pct is for the cue-conflict stimuli; cue-world images are drawn at the model's size")
    if args.limit is not None and args.limit < 1:
        raise ErfLabError("--limit must be >= 1")
    s = run_cue_world_shape_bias(args.model, out=out, weights=args.weights, overrides=overrides,
                                 allow_random=args.allow_random, size=args.limit or 500, batch_size=args.batch_size,
                                 device=args.device, command=command_line(), init_seed=args.seed or 0)
    if s["random_weights"]:
        print(f"{args.model}: UNTRAINED (random initial weights, --allow-random): the numbers describe no trained "
              f"model")
    sb = "n/a" if s["shape_bias"] is None else f"{s['shape_bias']:.3f}"
    ci = s.get("shape_bias_ci95")
    print(f"{s['label']}: cue-world shape bias {sb}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
          + f"; shape hits {s['shape_hits']}, texture hits {s['texture_hits']}, of {s['n_conflict']} cue-conflict "
          f"images")
    print(f"  shape-only acc {s['shape_only_accuracy']:.3f}, texture-only acc {s['texture_only_accuracy']:.3f}")
    if s.get("weights_note"):
        print(f"  note: {s['weights_note']}")
    for w in s.get("warnings", []):
        print(f"  warning: {w}", file=sys.stderr)
    print(f"wrote {out}/decisions.csv, summary.json, shape_bias.png/pdf")
    return 0
