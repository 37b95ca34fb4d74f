"""Training: ERF and cue-world shape bias across training (``erf-lab timeline``), for the shipped run or any
``erf-lab train`` run folder, and the shipped kernel-family table (``erf-lab study kernel-family``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import streamlit as st

from app import safety
from app.erf_maps import NOT_REACHED_NOTE, metrics_table
from app.runs import app_runs_dir
from app.ui import cli_hint, file_downloads, guard
from erf_lab.io import read_json_or_none, record_complete
from erf_lab.paths import data_dir

SHIPPED = data_dir() / "trained" / "cue-world"

st.title("Training")
st.caption("How the effective receptive field and the cue-world shape bias change while a network learns: "
           "every saved checkpoint, epoch 0 (the initialisation) included, measured with the same ERF runner "
           "and probes as the CLI.")


def show_timeline(folder: Path, key: str) -> None:
    data = json.loads((folder / "timeline.json").read_text(encoding="utf-8"))
    if (folder / "timeline.png").is_file():  # a timeline made with --formats pdf has no PNG to show
        st.image(str(folder / "timeline.png"), caption=f"{data['model']}: ERF at {data['erf_input_size']} px on "
                                                       f"{data['num_images']} cue-world val images; probes at "
                                                       f"{data['train_input_size']} px")
    table = metrics_table(data["rows"]).drop(columns=["checkpoint"], errors="ignore")  # n/r: not reached, as elsewhere
    st.dataframe(table, hide_index=True, key=f"{key}-table")
    if (table == "n/r").any().any():
        st.caption(NOT_REACHED_NOTE)
    if any(r.get("untrained") for r in data["rows"]):
        from erf_lab.train.timeline import UNTRAINED_NOTE

        st.caption(UNTRAINED_NOTE.replace("†: ", "untrained = True: ", 1))
    if data.get("weights_note"):  # a run that kept an EMA: its raw weights were measured
        st.caption(f"Note: {data['weights_note']}")
    file_downloads([p for p in (folder / n for n in ("timeline.png", "timeline.pdf", "timeline.csv",
                                                     "timeline.json")) if p.is_file()], key=key)


tab_shipped, tab_run, tab_family = st.tabs(["shipped run", "your training run", "kernel family"])

with tab_shipped:
    timelines = sorted(p.parent for p in (SHIPPED / "timeline").glob("*/timeline.json")
                       if record_complete(read_json_or_none(p)))  # a finished timeline only
    if not timelines:
        st.info("No shipped timeline in data/trained/cue-world/timeline.")
    else:
        name = st.selectbox("Shipped run", [p.name for p in timelines], key="tr-shipped")
        with guard("Shipped timeline"):
            show_timeline(SHIPPED / "timeline" / name, "tr-shipped-files")

with tab_run:
    text = st.text_input("Training run folder (made by erf-lab train on cue-world)", key="tr-run")
    c1, c2, c3 = st.columns(3)
    size = c1.number_input("ERF input size (px, 0 = training size)", 0, 1024, 0, step=16, key="tr-size")
    n_img = c2.number_input("ERF images", 1, 50, 4, key="tr-nimg")
    n_probe = c3.number_input("Probe images per split", 10, 2000, 100, step=10, key="tr-probe")
    if text:
        with guard("Timeline"):
            from erf_lab.train.timeline import cue_world_run, timeline

            from erf_lab.checkpoint import ema_decay_of

            run = safety.safe_directory(text, "training run folder")
            # a folder that is no training run, or not on cue-world, is refused before any button
            decay = ema_decay_of(cue_world_run(run).settings)
            ema = decay is not None and st.checkbox(
                f"Measure the EMA of the weights (decay {decay:g}) instead of the raw weights",
                key="tr-ema", help="the run was trained with --ema: each checkpoint also holds the EMA of its weights")
            settings = dict(input_size=int(size) or None, num_images=int(n_img), probe_size=int(n_probe), ema=ema)
            if st.button("Measure the timeline", type="primary", key="tr-measure", icon=":material/play_arrow:"):
                st.session_state["tr-confirmed"] = repr((str(run), settings))
            if st.session_state.get("tr-confirmed") != repr((str(run), settings)):
                st.info("Press **Measure the timeline**: every checkpoint of the run gets an ERF and the probes.")
            else:
                # into the app's run area (the user's run folder is only read), one folder per run: reused
                out = app_runs_dir() / (f"timeline-{hashlib.sha256(str(run).encode()).hexdigest()[:12]}"
                                        + ("-ema" if ema else ""))
                bar = st.progress(0.0, text="measuring new checkpoints (cached ones are reused)")
                try:
                    res = timeline(run, **settings, show_progress=False, out=out,
                                   on_progress=lambda done, total: bar.progress(
                                       done / max(total, 1), text=f"checkpoint {done} of {total} measured"))
                finally:
                    bar.empty()
                st.caption(f"measured {res['measured']['erf']} ERF(s) and {res['measured']['probe']} probe(s) now; "
                           f"the rest came from the cache in {res['out_dir']}")
                show_timeline(res["out_dir"], "tr-run-files")
            cli_hint(["timeline", str(run), "--num-images", "20", *(["--ema"] if ema else [])])

with tab_family:
    results = SHIPPED / "results.md"
    if results.is_file():
        if (SHIPPED / "family.png").is_file():
            st.image(str(SHIPPED / "family.png"))
        st.markdown(results.read_text(encoding="utf-8").split("\n", 1)[-1])
        file_downloads([p for p in (SHIPPED / n for n in ("family.png", "family.pdf", "family.csv", "guidelines.csv",
                                                           "results.md")) if p.is_file()], key="tr-family-files")
        cli_hint(["study", "kernel-family", "--out", "runs/kernel-family", "--jobs", "3", "--threads", "1"],
                 note="Reproduce (the shipped weights load as --weights builtin:cue-world/NAME):")
    else:
        st.info("The kernel-family study is not shipped in this installation.")
