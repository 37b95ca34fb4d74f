"""Small widget helpers shared by the pages: readable errors, command hints, uploads and
downloads, integer lists."""
from __future__ import annotations

import contextlib
import logging
import shlex

import streamlit as st

from app import safety
from app.runs import DOWNLOAD_SUFFIXES
from erf_lab.errors import OUT_OF_MEMORY_HINT, ErfLabError, FolderInUseError, out_of_memory

log = logging.getLogger("erf_lab.app")


@contextlib.contextmanager
def guard(what: str):
    """Show a failure inside this block as one readable message; the rest of the page keeps working."""
    try:
        yield
    except FolderInUseError as e:  # the CLI's line ends "or choose another --out": the app's folders are its own
        st.error(f"{what}: the output folder {e.folder} is in use: another erf-lab process is writing a run there "
                 f"now; wait for it to end (or stop it) and try again", icon=":material/error:")
    except ErfLabError as e:
        st.error(f"{what}: {e}", icon=":material/error:")
    except Exception as e:  # noqa: BLE001 - shown to the user instead of a traceback
        if (memory := out_of_memory(e)) is not None:
            st.error(f"{what}: out of memory ({memory}); {OUT_OF_MEMORY_HINT}", icon=":material/error:")
            return
        log.exception("%s failed", what)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        st.error(f"{what} failed: {type(e).__name__}: {first}", icon=":material/error:")


def cli_hint(args: list[str], note: str = "Full-size protocol from the command line:", prog: str | None = "erf-lab") -> None:
    """Show the exact ``erf-lab`` command reproducing (or scaling up) what the page shows."""
    st.caption(note)
    st.code(shlex.join(([prog] if prog else []) + [str(a) for a in args]), language="bash")


def checkpoint_upload(key: str, label: str = "Checkpoint (optional)") -> tuple[bytes | None, str]:
    """A checkpoint uploader: (bytes, the user's file name), or (None, "") before an upload; refusals raise."""
    ck = st.file_uploader(label, type=["pth", "pt", "bin", "safetensors"], max_upload_size=safety.MAX_CHECKPOINT_MB,
                          key=key)
    if ck is None:
        return None, ""
    safety.check_checkpoint_upload(ck.name, ck.size)
    return ck.getvalue(), ck.name


def model_options_input(key: str) -> dict:
    """An optional "Model options" field (:func:`app.models.parse_model_options`): the architecture of a checkpoint
    trained with other options than the page's settings (width, depth, kernels), which take second place to it."""
    from app.models import parse_model_options

    return parse_model_options(st.text_input(
        "Model options (optional)", key=key, placeholder="e.g. channels=(16,32,64,128) layers=(1,1,1,1)",
        help="key=value items as erf-lab's --override takes them (or a JSON object), over the settings above: the "
             "architecture an uploaded checkpoint was trained with (its erf-lab train run's options)"))


def file_downloads(paths, key: str, ncols: int = 4) -> None:
    """One download button per file, labelled with its name (the file is read on click)."""
    cols = st.columns(ncols)
    for i, p in enumerate(paths):
        cols[i % ncols].download_button(p.name, data=(lambda p=p: p.read_bytes()), file_name=p.name,
                                        mime=DOWNLOAD_SUFFIXES.get(p.suffix.lower()), key=f"{key}-{p.name}",
                                        icon=":material/download:", on_click="ignore")


def parse_int_tuple(text: str, n: int | None = None, what: str = "values") -> tuple[int, ...]:
    """``"31, 29, 27, 13"`` -> ``(31, 29, 27, 13)``; a single number is repeated ``n`` times."""
    try:
        vals = tuple(int(v) for v in text.replace(";", ",").replace(" ", ",").split(",") if v.strip())
    except ValueError:
        raise ErfLabError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if n is not None and len(vals) == 1:
        vals = vals * n
    if not vals or (n is not None and len(vals) != n):
        count = "" if n is None else f"{n} "
        raise ErfLabError(f"{what}: expected {count}comma-separated integers, got {text!r}")
    if any(v <= 0 for v in vals):
        raise ErfLabError(f"{what}: values must be positive, got {text!r}")
    return vals
