"""``erf-lab timeline``: ERF and cue-world shape bias at every checkpoint of a training run."""
from __future__ import annotations

import sys

from erf_lab.cli.options import command_line

NAME = "timeline"
HELP = "ERF and cue-world shape bias at every checkpoint of an 'erf-lab train' run (epoch 0 included), one figure"
ORDER = 61
DESCRIPTION = (
    "For every checkpoint RUN_DIR/checkpoints/epoch_XXX of a cue-world training run (complete or still running), "
    "measure the ERF through the ERF runner (paper protocol, metrics.json per checkpoint) on cue-world "
    "validation images and the cue-world probes (shape bias on cue-conflict, shape-only and texture-only "
    "accuracy). Results are cached per checkpoint in RUN_DIR/timeline/ (or --out), so a second call measures only new "
    "checkpoints, and the same command after an interruption resumes. --ema measures the EMA of the weights at each "
    "checkpoint (a run trained with --ema keeps it per epoch) instead of the raw weights. Writes timeline.csv, "
    "timeline.json (from the start; complete at the end) and timeline.png/pdf (ERF strip over epochs; area ratios, "
    "effective radius, shape bias and val accuracy against epoch)."
)


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="an 'erf-lab train' run folder on cue-world")
    p.add_argument("--input-size", type=int, default=None,
                   help="ERF measurement size in pixels (default: the training input size)")
    p.add_argument("--num-images", type=int, default=20, help="cue-world val images per ERF (default 20)")
    p.add_argument("--probe-size", type=int, default=300, help="images per probe split (default 300)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated (default png,pdf)")
    p.add_argument("--ema", action="store_true",
                   help="measure the EMA of the weights at each checkpoint (a run trained with --ema), not the raw "
                        "weights (default folder RUN_DIR/timeline-ema)")
    p.add_argument("--out", default=None,
                   help="output and cache folder (default RUN_DIR/timeline, with --ema RUN_DIR/timeline-ema; another "
                        "folder for a read-only run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from erf_lab.erf.plotting import parse_formats
    from erf_lab.train.timeline import UNTRAINED_NOTE, timeline

    try:
        res = timeline(args.run_dir, input_size=args.input_size, num_images=args.num_images,
                       probe_size=args.probe_size, device=args.device, formats=parse_formats(args.formats),
                       show_progress=not args.quiet, out=args.out, argv=command_line(), ema=args.ema)
    except KeyboardInterrupt as e:
        if saved := getattr(e, "timeline_saved", None):
            print(f"stopped after {saved['measured']} of {saved['total']} checkpoints: those are kept in "
                  f"{saved['out_dir']}; the same command measures the rest", file=sys.stderr)
        raise

    def f(v, fmt=".3f", none="n/a"):
        return none if v is None else format(v, fmt)

    print(f"{'epoch':>5}  {'area@20%':>8}  {'area@50%':>8}  {'area@99%':>8}  {'r_rms':>6}  {'shape bias':>10}  "
          f"{'val acc':>7}")
    for r in res["rows"]:
        print(f"{r['epoch']:>5}  {f(r['area@20%'], '.2f', 'n/r'):>8}  {f(r['area@50%'], '.2f', 'n/r'):>8}  "
              f"{f(r['area@99%'], '.2f', 'n/r'):>8}  {f(r['r_rms'], '.1f'):>6}  "
              f"{f(r['shape_bias']) + (' †' if r['untrained'] else ''):>10}  {f(r['val_acc']):>7}")
    if any(r[k] is None for r in res["rows"] for k in ("area@20%", "area@50%", "area@99%")):
        print("n/r: not reached: no square centred on the measured unit's receptive-field centre that fits in the "
              "image holds that share of the ERF (a small map, or a centre near the image's edge: see the flags in "
              "each ERF's metrics.json; a larger --input-size helps)")
    if any(r["untrained"] for r in res["rows"]):
        print(UNTRAINED_NOTE)
    if res.get("weights_note"):
        print(f"note: {res['weights_note']}")
    m = res["measured"]
    n = len(res["rows"])
    print(f"measured {m['erf']} ERF(s) and {m['probe']} probe(s) of {n} checkpoint(s)"
          + ("; the rest came from the cache" if min(m["erf"], m["probe"]) < n else ""))
    print(f"wrote {res['out_dir']}/timeline.csv, timeline.json, timeline.png/pdf")
    return 0
