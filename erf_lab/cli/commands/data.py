"""``erf-lab data``: fetch or locate the shape-bias data sets (cue-conflict, edges, silhouettes, human CSVs)."""
from __future__ import annotations

NAME = "data"
HELP = "download the Geirhos cue-conflict stimuli and human data (checksummed, resumable) or show where data is"
ORDER = 95
DESCRIPTION = (
    "'download' fetches the stimuli of rgeirhos/texture-vs-shape (Geirhos et al., ICLR 2019, CC BY 4.0) and the "
    "human responses (cue-conflict, edge, silhouette) of bethgelab/model-vs-human into the cache (or --dest), "
    "verifying every file's "
    "SHA-256 and resuming partial files. 'info' shows which folder erf-lab reads ($ERF_LAB_DATA, else the "
    "cache)."
)


def add_arguments(p) -> None:
    from erf_lab.shape_bias.download import DEFAULT_BASE_URL, SETS

    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = sub.add_parser("download", help="download the data sets (checksummed, resumable)")
    d.add_argument("--dest", default=None, help="target folder (default: <cache>/datasets, found automatically)")
    d.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"raw-file base URL or mirror (default {DEFAULT_BASE_URL})")
    d.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="which sets (default all)")
    d.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("info", help="show where the data sets are found")


def run(args) -> int:
    from pathlib import Path

    from erf_lab.errors import ErfLabError
    from erf_lab.io import hold_folder, missing_folders, prepare_out_dir, remove_empty_folders
    from erf_lab.shape_bias import download as dl

    if args.data_command == "download":
        if args.workers < 1:
            raise ErfLabError("--workers must be >= 1")
        if not str(args.base_url).startswith(("http://", "https://", "file:")):  # before --dest is made
            raise ErfLabError(f"--base-url must be an http(s):// or file: URL, got {args.base_url!r}")
        made = missing_folders(dl.default_dest() if args.dest is None else args.dest)
        dest = prepare_out_dir(dl.default_dest() if args.dest is None else args.dest, what="--dest")  # "": one line
        try:  # held while it downloads: a second download into it meanwhile appended to the same partial files
            with hold_folder(dest, what="--dest"):
                rep = dl.download(args.dest, base_url=args.base_url, sets=args.sets, workers=args.workers,
                                  show_progress=not args.quiet)
        except BaseException:
            remove_empty_folders(made)  # a failed download leaves no empty --dest it made (one holding .part stays)
            raise
        for name, r in rep["sets"].items():
            print(f"{name}: {r['status']} ({r['files']} files) -> {r['path']}")
        if args.dest and Path(rep["dest"]).resolve() != dl.default_dest().resolve():
            print(f"erf-lab looks there when ERF_LAB_DATA={rep['dest']} is set (or pass --stimuli "
                  f"{rep['dest']}/cue-conflict)")
        print(dl.CREDIT)
        return 0
    if args.data_command == "info":
        from erf_lab.paths import check_erf_lab_data

        check_erf_lab_data()
        i = dl.info()
        if i["root"] is None:
            print(f"no data found; run 'erf-lab data download' (into {i['cache']}) or set ERF_LAB_DATA")
            return 0
        print(f"data root: {i['root']}" + (" (from $ERF_LAB_DATA)" if i["env_ERF_LAB_DATA"] else ""))
        for name, s in i["sets"].items():
            print(f"  {name}: {'%d files' % s['files'] if s['present'] else 'missing'}")
        return 0
    raise ErfLabError("choose an action: 'erf-lab data download' or 'erf-lab data info'")
