"""Results shared by all sessions of the app (models and computed maps outlive one script run)."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import streamlit as st


def sha(data: bytes | None) -> str:
    """SHA-256 of uploaded bytes ("" for none): the cache key of an upload."""
    return hashlib.sha256(data).hexdigest() if data else ""


_MISSING = object()  # no stored value for a key


@st.cache_resource(show_spinner=False)
def _store() -> tuple[OrderedDict, threading.Lock]:
    return OrderedDict(), threading.Lock()


def cached(key: str, compute, max_entries: int = 32, valid=None):
    """``compute()`` once per ``key`` in a small LRU shared by all sessions; a stored value for which ``valid(value)``
    is false (e.g. its run folder was deleted since) is computed again.

    Used instead of ``st.cache_data`` where the computation drives an ``st.progress`` bar: element calls
    inside a ``cache_data`` function would be recorded and replayed against a bar that no longer exists."""
    data, lock = _store()
    with lock:
        value = data.get(key, _MISSING)
    if value is not _MISSING and (valid is None or valid(value)):
        with lock:
            if key in data:
                data.move_to_end(key)
        return value
    value = compute()
    with lock:
        data[key] = value
        while len(data) > max_entries:
            data.popitem(last=False)
    return value
