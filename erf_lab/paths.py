"""Where erf-lab finds its shipped data and the shape-bias data sets."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The project's ``data/`` folder (id tables, built-in default images, reference numbers)."""
    local = REPO_ROOT / "data"
    if (local / "paper_reference.json").is_file():  # the checkout's own (an installed copy's parent is
        return local                                   # site-packages, whose data/ may be another package's)
    import erf_lab_data  # installed copy of data/ (see setup.py)

    return Path(erf_lab_data.__file__).resolve().parent


def datasets_root() -> Path | None:
    """Root holding ``cue-conflict/``, ``edges/``, ... : ``$ERF_LAB_DATA``, else the download cache
    (``<cache>/datasets``, filled by ``erf-lab data download``). ``None`` when neither is a folder.
    Commands also take an explicit ``--stimuli DIR``, which wins over both."""
    candidates = [cache_dir() / "datasets"]
    if os.environ.get("ERF_LAB_DATA"):
        candidates.insert(0, Path(os.environ["ERF_LAB_DATA"]).expanduser())
    return next((c for c in candidates if c.is_dir()), None)


def check_erf_lab_data() -> None:
    """ErfLabError (one line) when ``$ERF_LAB_DATA`` is set but is not a folder: :func:`datasets_root` passes over
    it to the download cache, and a command would read other stimuli and human data than the ones pointed at."""
    env = os.environ.get("ERF_LAB_DATA")
    if env and not Path(env).expanduser().is_dir():
        from erf_lab.errors import ErfLabError

        raise ErfLabError(f"ERF_LAB_DATA={env} is not a folder; point it at the folder holding cue-conflict/ or "
                          "unset it")


def cache_dir() -> Path:
    """User cache: ``$ERF_LAB_CACHE`` (unless empty), else ``erf-lab`` in the user's cache folder, ``$XDG_CACHE_HOME``
    where that is an absolute path, else ``~/.cache`` (fastconv's :func:`~fastconv.config.user_cache_home`: the two
    caches side by side; the CLI, the app and the tests read this one function). A user without a home folder
    (``$HOME`` unset and no entry in the password database: a container run under an arbitrary user id) gets a private
    temporary folder for this process, removed at exit, with one warning (as fastconv's cache); a ``~`` there that
    names no home folder is an ErfLabError."""
    from fastconv.config import user_cache_home

    given = os.environ.get("ERF_LAB_CACHE")
    try:
        return Path(given).expanduser() if given else user_cache_home() / "erf-lab"
    except RuntimeError:  # no home folder to expand "~" to
        if given:
            from erf_lab.errors import ErfLabError

            raise ErfLabError(f"ERF_LAB_CACHE={given} starts with a ~ that names no home folder (no such user, or "
                              "this user has none); give a full path") from None
    return _private_cache()


@functools.cache
def _private_cache() -> Path:
    """The process's own cache folder where the user has no home folder (see :func:`cache_dir`), made once."""
    folder = tempfile.mkdtemp(prefix="erf-lab-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    warnings.warn(f"erf-lab: this user has no home folder ($HOME unset); downloaded data sets and caches are kept in "
                  f"{folder} for this process only: set ERF_LAB_CACHE to a folder to keep them", RuntimeWarning,
                  stacklevel=3)
    return Path(folder)


#: the yes / no settings of erf-lab's environment (fastconv's FASTCONV_* switches take the same words)
ENV_FLAGS = {"ERF_LAB_KEEP_FREED_MEMORY": True, "ERF_LAB_ALLOW_TF32": False}


def env_flag(name: str) -> bool:
    """The yes / no environment setting ``name`` (one of ``ENV_FLAGS``, whose value is its default when unset or
    empty): 1 / true / yes / on or 0 / false / no / off, any case, as fastconv reads its own; anything else is one
    ErfLabError line (``ERF_LAB_KEEP_FREED_MEMORY=false`` used to keep the setting on, as every value but ``0`` did)."""
    from fastconv.config import _OFF, _ON

    from erf_lab.errors import ErfLabError

    value = os.environ.get(name, "").strip().lower()
    if not value:
        return ENV_FLAGS[name]
    if value not in _ON + _OFF:
        raise ErfLabError(f"{name}={os.environ[name]} is not a yes or no; set it to 1 or 0 (true / false, yes / no, "
                          f"on / off) or unset it")
    return value in _ON
