"""Results: open run directories written by the CLI (or by this app), compare ERF runs on one colour scale,
and download their figures (PNG / PDF / SVG) and data (npy / CSV / JSON)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app import runs as runs_module
from app import safety
from app.erf_maps import EMPTY_MAP_NOTE, nr_columns_as_text
from app.figures import show_figure
from app.runs import app_runs_dir, downloadable_files, find_runs, incomplete_note, read_csv_table
from app.ui import file_downloads, guard
from erf_lab.checkpoint import selection_text
from erf_lab.erf.analysis import comparison_table
from erf_lab.erf.rundir import load_run, read_json
from erf_lab.errors import ErfLabError

TABLE_KINDS = ("sweep", "benchmark", "compare", "timeline", "study")  # result kinds whose CSV tables are shown

st.title("Results")
st.caption("Run directories of `erf-lab compute`, `sweep`, `compare`, `shape-bias`, `timeline`, `study` and the "
           "kernel benchmark. Folders are "
           "confined to the working directory, your home, data/ and the datasets root "
           "(extend with $ERF_LAB_APP_ROOTS).")

default_root = str(app_runs_dir())
root_text = st.text_input("Folder holding run directories", value=default_root, key="res-root")
runs = []
with guard("Folder"):
    root = safety.safe_directory(root_text, "results folder")
    runs = find_runs(root)
    if len(runs) >= runs_module.MAX_RUNS:  # breadth first: the deepest ones are the ones left out
        st.info(f"Listing the first {len(runs)} result directories under {root} (breadth first); there may be more: "
                "type a sub-folder to see its runs.")
    if st.session_state.get("res-root-shown") != str(root):  # another folder: its first run chosen, as on first load
        st.session_state["res-root-shown"] = str(root)       # (the old choices are not among its runs: none was)
        for k in [k for k in st.session_state if str(k).startswith("res-chosen-")]:
            del st.session_state[k]
    if not runs:
        st.info(f"No result directories (erf.npy, sweep.json, summary.json, compare.json, timeline.json, "
                f"study.json or run.json) under {root}.")

if runs:
    kinds = sorted({r["kind"] for r in runs})
    kind = st.segmented_control("Kind", kinds, default="erf" if "erf" in kinds else kinds[0], key="res-kind")
    names = [r["name"] for r in runs if r["kind"] == kind]
    chosen = []
    if kind is None:  # the selected segment clicked again
        st.info("Choose a kind of result above.")
    else:
        captions = {r["name"]: runs_module.listed_caption(r["path"]) for r in runs if r["kind"] == kind}
        chosen = st.multiselect(f"{kind} runs ({len(names)})", names, default=names[:1], key=f"res-chosen-{kind}",
                                format_func=lambda n: f"{n} · {captions[n]}" if captions.get(n) else n)
    by_name = {r["name"]: r for r in runs}

    if kind == "erf" and chosen:
        with guard("ERF runs"):
            loaded = [load_run(str(by_name[n]["path"])) for n in chosen]
            for n, r in zip(chosen, loaded):
                if not r.erf.any():  # metrics flag it 'empty_map'; the table would show n/r and blanks
                    st.warning(f"{n}: {EMPTY_MAP_NOTE}", icon=":material/warning:")
            table = comparison_table(loaded)  # erf-lab compare's table: labels, metrics and n/c as the CLI writes
            if table["mixed"]:
                st.info(table["note"])
            else:
                show_figure("erf_comparison", ([r.erf for r in loaded], [r.label for r in loaded]), stem="comparison",
                            key="res-cmp", caption="log10(A+1) / max of each map, one colour scale")
            info = [r.run_info or {} for r in loaded] + [{}] * (len(table["rows"]) - len(loaded))  # paper rows last
            def cell(row, c):  # a threshold not reached inside the image: "n/r", as erf-lab compare writes it
                v = row.get(c)
                reached = v is not None or row.get("source") != "measured" or not c.startswith(("area@", "side@"))
                return v if reached else "n/r"

            st.dataframe(nr_columns_as_text(pd.DataFrame(
                [{**{c: cell(row, c) for c in table["columns"]}, "images": i.get("num_used"),
                  "input": i.get("input_size")} for row, i in zip(table["rows"], info)]
            ).astype({"images": "Int64", "input": "Int64"})), hide_index=True)
            if not table["mixed"]:
                st.caption(table["note"])
    for n in chosen:
        r = by_name[n]
        with st.expander(f"{n} ({r['kind']})", expanded=len(chosen) == 1):
            with guard(f"Run {n}"):
                d = Path(r["path"])
                if note := incomplete_note(d):  # an interrupted sweep: no finished results to present
                    st.warning(note)
                if runs_module.is_untrained(d):  # a shape-bias run's figure alone said so, in its legend
                    st.warning(runs_module.UNTRAINED_NOTE)
                info_file = d / ("run.json" if (d / "run.json").is_file() else "summary.json")
                if info_file.is_file():
                    info = read_json(info_file)  # a corrupt file: one readable line (ErfLabError), not a traceback
                    argv = info.get("argv") or info.get("command")
                    if argv:
                        st.code(" ".join(map(str, argv)) if isinstance(argv, list) else str(argv), language="bash")
                    if loaded := selection_text(info.get("weights_selection")):  # the raw weights beside an EMA, ...
                        st.caption(f"Weights loaded: {loaded} (weights_selection)")
                    with st.popover("run record"):
                        st.json(info, expanded=False)
                pngs = [p for p in downloadable_files(d) if p.suffix == ".png"]
                if pngs and r["kind"] != "erf":  # each figure (a shape-bias run: model vs humans and error
                    for png in pngs[:4]:          # consistency; a sweep: growth and grid), not the first by name
                        st.image(str(png), caption=png.name, width="stretch")
                for p in downloadable_files(d):
                    if p.suffix == ".csv" and p.stat().st_size < 2 * 2**20 and r["kind"] in TABLE_KINDS:
                        try:  # a damaged table: one line naming it, the rest of the run still shown
                            table = read_csv_table(p, f"{n}/{p.name}")
                        except ErfLabError as e:
                            st.error(str(e), icon=":material/error:")
                        else:
                            st.dataframe(table, hide_index=True)
                file_downloads(downloadable_files(d), key=f"res-dl-{n}")
