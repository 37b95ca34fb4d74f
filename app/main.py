"""erf-lab interactive app: ``streamlit run app/main.py`` (serves on 127.0.0.1, see app/.streamlit/config.toml).

A thin layer over the ``erf_lab`` library: every number and figure comes from the same functions the CLI
calls. Pages live in ``app/views/`` (never ``app/pages/``, which Streamlit would auto-register).
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# Streamlit runs this file as a script with only app/ on sys.path; the pages import the package ``app``,
# so the repository root (this checkout, whose erf_lab the pages should use) must be importable too: once,
# here; nowhere else touches sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

st.set_page_config(page_title="erf-lab", page_icon=":material/blur_on:", layout="wide")

PAGES = [
    st.Page("views/erf_explorer.py", title="ERF explorer", icon=":material/blur_on:", default=True),
    st.Page("views/growth.py", title="Growth", icon=":material/trending_up:"),
    st.Page("views/reparam.py", title="Re-parameterization", icon=":material/merge:"),
    st.Page("views/shape_bias.py", title="Shape bias", icon=":material/pets:"),
    st.Page("views/training.py", title="Training", icon=":material/model_training:"),
    st.Page("views/kernels.py", title="Kernels", icon=":material/speed:"),
    st.Page("views/results.py", title="Results", icon=":material/folder_open:"),
]

page = st.navigation(PAGES)
with st.sidebar:
    st.caption("erf-lab · RepLKNet (Ding et al., CVPR 2022) · "
               "[paper](https://arxiv.org/abs/2203.06717)")
page.run()
