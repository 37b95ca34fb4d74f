"""Results shared by all sessions of the app (models and computed maps outlive one script run)."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import streamlit as st


def sha(data: bytes | None) -> str:
    """SHA-256 of uploaded bytes ("" for none): the cache key of an upload."""
    return hashlib.sha256(data).hexdigest() if data else ""


@st.cache_resource(show_spinner=False)
def _store() -> tuple[OrderedDict, threading.Lock]:
    return OrderedDict(), threading.Lock()


def cached(key: str, compute, max_entries: int = 32):
    """``compute()`` once per ``key`` in a small LRU shared by all sessions.

    Used instead of ``st.cache_data`` where the computation drives an ``st.progress`` bar: element calls
    inside a ``cache_data`` function would be recorded and replayed against a bar that no longer exists."""
    data, lock = _store()
    with lock:
        if key in data:
            data.move_to_end(key)
            return data[key]
    value = compute()
    with lock:
        data[key] = value
        while len(data) > max_entries:
            data.popitem(last=False)
    return value
