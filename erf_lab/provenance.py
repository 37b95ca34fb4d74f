"""How a result was made: versions, time and command line, recorded by every output directory."""
from __future__ import annotations

import datetime as _dt
import os
import sys
from typing import Sequence

#: packages whose versions shape the numbers and figures; recorded when already imported or cheap to import
_PACKAGES = ("torch", "captum", "numpy", "scipy", "matplotlib", "PIL", "safetensors", "timm")


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """``{"erf_lab": ..., "python": ..., <package>: <version>}`` for the packages in use (never imports torch)."""
    import erf_lab

    out = {"erf_lab": erf_lab.__version__, "python": sys.version.split()[0]}
    for name in _PACKAGES:
        mod = sys.modules.get(name)
        if mod is None and name in ("numpy", "matplotlib", "scipy"):
            try:
                mod = __import__(name)
            except ImportError:
                mod = None
        if mod is not None:
            out[name] = getattr(mod, "__version__", None)
    return out


def provenance(command: str, params: dict, argv: Sequence[str] | None = None) -> dict:
    """The record every output directory carries: command, parameters, argv, cwd, versions, time."""
    return {"command": command, "argv": list(argv) if argv is not None else list(sys.argv), "cwd": os.getcwd(),
            "parameters": params, "versions": versions(), "time": now()}
