"""Small UI helpers shared by the pages: readable errors, optional library parts, figure downloads."""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import shlex

import streamlit as st

from erf_lab.errors import ErfLabError

log = logging.getLogger("erf_lab.app")


class MissingFeature(Exception):
    """A library function this page needs is not available (module not written yet or failed to import)."""


def need(module: str, *names: str):
    """Import ``module`` and return the requested attributes (or the module); ``MissingFeature`` if absent."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # a sibling module still being written must not break the page
        raise MissingFeature(f"`{module}` is not available ({type(e).__name__}: {e})") from None
    if not names:
        return mod
    out = []
    for n in names:
        if not hasattr(mod, n):
            raise MissingFeature(f"`{module}.{n}` is not available")
        out.append(getattr(mod, n))
    return out[0] if len(out) == 1 else tuple(out)


@contextlib.contextmanager
def guard(what: str):
    """Show a failure inside this block as one readable message; the rest of the page keeps working."""
    try:
        yield
    except ErfLabError as e:
        st.error(f"{what}: {e}", icon=":material/error:")
    except MissingFeature as e:
        st.warning(f"{what} is unavailable: {e}", icon=":material/construction:")
    except Exception as e:  # noqa: BLE001 - shown to the user instead of a traceback
        log.exception("%s failed", what)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        st.error(f"{what} failed: {type(e).__name__}: {first}", icon=":material/error:")


def cli_hint(args: list[str], note: str = "Full-size protocol from the command line:", prog: str | None = "erf-lab") -> None:
    """Show the exact ``erf-lab`` command reproducing (or scaling up) what the page shows."""
    st.caption(note)
    st.code(shlex.join(([prog] if prog else []) + [str(a) for a in args]), language="bash")


_MIME = {"png": "image/png", "pdf": "application/pdf", "svg": "image/svg+xml"}


def figure_bytes(fig, fmt: str) -> bytes:
    """A matplotlib figure as ``fmt`` bytes (for figures the library does not draw itself)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=200 if fmt == "png" else None, bbox_inches="tight")
    return buf.getvalue()


def show_figure(kind: str, args: tuple, stem: str, key: str, kwargs: dict | None = None,
                caption: str | None = None, width: int | str = "stretch") -> None:
    """Render a library figure (PNG shown) with PNG / PDF / SVG downloads (PDF / SVG made on click)."""
    import json

    import loaders

    kw = json.dumps(kwargs or {}, sort_keys=True)
    png = loaders.render_figure(kind, "png", args, kw)
    st.image(png, caption=caption, width=width)
    cols = st.columns(3)
    for col, fmt in zip(cols, ("png", "pdf", "svg")):
        data = png if fmt == "png" else (lambda fmt=fmt: loaders.render_figure(kind, fmt, args, kw))
        col.download_button(fmt.upper(), data=data, file_name=f"{stem}.{fmt}", mime=_MIME[fmt],
                            key=f"{key}-{fmt}", icon=":material/download:", on_click="ignore")


def matplotlib_downloads(fig, stem: str, key: str) -> None:
    """PNG / PDF / SVG download buttons for a matplotlib figure drawn by the page."""
    cols = st.columns(3)
    for col, fmt in zip(cols, ("png", "pdf", "svg")):
        col.download_button(fmt.upper(), data=figure_bytes(fig, fmt), file_name=f"{stem}.{fmt}",
                            mime=_MIME[fmt], key=f"{key}-{fmt}", icon=":material/download:", on_click="ignore")


def parse_int_tuple(text: str, n: int | None = None, what: str = "values") -> tuple[int, ...]:
    """``"31, 29, 27, 13"`` -> ``(31, 29, 27, 13)``; a single number is repeated ``n`` times."""
    try:
        vals = tuple(int(v) for v in text.replace(";", ",").replace(" ", ",").split(",") if v.strip())
    except ValueError:
        raise ErfLabError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if n is not None and len(vals) == 1:
        vals = vals * n
    if not vals or (n is not None and len(vals) != n):
        raise ErfLabError(f"{what}: expected {n} comma-separated integers, got {text!r}")
    if any(v <= 0 for v in vals):
        raise ErfLabError(f"{what}: values must be positive, got {text!r}")
    return vals
