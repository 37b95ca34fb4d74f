"""Options and parsers shared by several ``erf-lab`` commands."""
from __future__ import annotations

import ast

from erf_lab.errors import ErfLabError


def parse_overrides(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are Python literals when they parse as one (``channels=(8,8,8,8)``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ErfLabError(f"--override expects key=value (a Python identifier as key), got {item!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out
