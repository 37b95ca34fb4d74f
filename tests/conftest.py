"""Shared fixtures.

Data: ``tests/fixtures/datasets`` (a small byte-identical subset, always present) for what must always run;
the full sets in ``../shared/datasets`` beside the repository (development machines and CI) for what needs them,
skipped with a reason when absent. The library itself never looks there: the tests point ``$ERF_LAB_DATA`` at
the data or pass ``--stimuli``.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DATASETS = REPO_ROOT / "tests" / "fixtures" / "datasets"
SHARED = REPO_ROOT.parent / "shared" / "datasets"
_SESSION_CACHE: list[str] = []
NO_FULL_DATA = f"needs the full shape-bias data sets at {SHARED} (CI has them; or run 'erf-lab data download')"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size checks (parameter counts, 31B equivalence)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    # Library code finds data only through $ERF_LAB_DATA / --stimuli / the download cache: point it at the full
    # sets when they are beside the repository, else at the shipped fixture (unless the caller chose a folder).
    os.environ.setdefault("ERF_LAB_DATA", str(SHARED if SHARED.is_dir() else FIXTURE_DATASETS))
    # The erf-lab cache (FLOP and geometry tables, rendered cue-world splits, decoded stimuli: ~250 MB for the
    # full sets) goes to a folder of this session, not the user's ($XDG_CACHE_HOME or ~/.cache)/erf-lab (unless the
    # caller chose one): $ERF_LAB_CACHE wins over both, for the CLI and the app alike.
    if "ERF_LAB_CACHE" not in os.environ:
        _SESSION_CACHE.append(tempfile.mkdtemp(prefix="erf-lab-test-cache-"))
        os.environ["ERF_LAB_CACHE"] = _SESSION_CACHE[0]


def pytest_unconfigure(config):
    for folder in _SESSION_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


def need_compiler() -> str:
    """The C++ compiler fastconv would run; fails (not skips) where there is none, as :func:`need_cpp`."""
    from fastconv import cpu_kernels

    cxx = cpu_kernels._compiler()
    assert cxx, "no C++ compiler here: the tests need one (g++)"
    return cxx


def need_cpp() -> None:
    """Fail (not skip) where fastconv's C++ kernel cannot be built: the suite tests it wherever it runs, and a
    machine without a C++ compiler would otherwise pass without testing it."""
    from fastconv import cpu_kernels

    reason = cpu_kernels.cpp_unavailable_reason()
    assert reason is None, f"fastconv's cpp backend cannot be built here ({reason}): the tests need a C++ compiler (g++)"


@pytest.fixture(autouse=True)
def _no_stub_kept_by_a_module_imported_under_it():
    """A module first imported while a test had patched a function it imports by name at its top (``from erf_lab.io
    import save_figure`` under ``monkeypatch.setattr(erf_lab.io, "save_figure", stub)``) keeps the test's stub for the
    rest of the process: later tests of the same run wrote no figures. Such a test fails at its teardown (after
    monkeypatch's), naming the module; import that module before the patch, or patch the name there."""
    import sys

    before = set(sys.modules)
    yield
    tests = str(REPO_ROOT / "tests")
    new = [name for name in set(sys.modules) - before if name.split(".")[0] in ("erf_lab", "app", "fastconv")]
    kept = [f"{name}.{attr}" for name in new for attr, value in list(vars(sys.modules[name]).items())
            if getattr(getattr(value, "__code__", None), "co_filename", "").startswith(tests)]
    if kept:
        pytest.fail(f"first imported under a test's patch, {', '.join(sorted(kept))} keep(s) the test's stub for the "
                    f"rest of the process: import the module before patching", pytrace=False)


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The figures erf-lab saves, collected here instead of written (``erf_lab.io.save_figure`` stubbed for the test).
    The modules that import save_figure by name are imported first, so none keeps the stub afterwards."""
    import erf_lab.erf.plotting  # noqa: F401 - binds save_figure at its import
    import erf_lab.io

    figs = []
    monkeypatch.setattr(erf_lab.io, "save_figure", lambda fig, stem, formats=(): figs.append(fig) or [])
    return figs


@pytest.fixture(scope="session")
def fixture_datasets() -> Path:
    """The small subset shipped in tests/fixtures/datasets (see its README for contents and credit)."""
    return FIXTURE_DATASETS


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The full data sets; skips the test when they are not beside the repository."""
    if not SHARED.is_dir():
        pytest.skip(NO_FULL_DATA)
    return SHARED


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The full sets when present, else the fixture: for tests whose assertions hold on either."""
    return SHARED if SHARED.is_dir() else FIXTURE_DATASETS


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core box: OpenMP hand-offs dominate, one thread is fastest."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_HOLD = ("import sys\nfrom erf_lab.io import hold_folder\nwith hold_folder(sys.argv[1]):\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n")


@contextlib.contextmanager
def held_by_another_process(folder):
    """``folder`` (which exists) held by another erf-lab process (:func:`erf_lab.io.hold_folder`, this checkout's)
    until the block ends, as a run of another shell holds its ``--out``."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("", timeout=60)


def stop_process(proc, timeout: float = 15) -> None:
    """Terminate a server subprocess started by a test; kill it if it does not exit in ``timeout`` s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    """App run directories go to tmp; tmp is an allowed root for typed paths."""
    monkeypatch.setenv("ERF_LAB_APP_RUNS", str(tmp_path / "app-runs"))
    monkeypatch.setenv("ERF_LAB_APP_ROOTS", str(tmp_path))
    return tmp_path


@pytest.fixture
def backend_spy(monkeypatch):
    """The names of the backends ``fastconv.depthwise_conv2d`` runs, one per call, in call order: every runner is
    made through the spy (the dispatcher's per-signature memo starts empty, and is restored afterwards), so calls
    the memo serves are counted too."""
    from fastconv import backends, dispatch

    ran, real = [], backends.backend_runner

    def spy(name, *args):
        run = real(name, *args)
        return lambda *a: ran.append(name) or run(*a)

    monkeypatch.setattr(backends, "backend_runner", spy)
    monkeypatch.setattr(dispatch, "backend_runner", spy)
    monkeypatch.setattr(dispatch, "_fast", {})
    return ran


@pytest.fixture
def fastconv_isolated(tmp_path, monkeypatch):
    """fastconv as a fresh process sees it: auto backend, autotune on, an empty cache folder, no lane override;
    the settings and the dispatcher's memory are restored afterwards. Returns ``fastconv``."""
    import fastconv
    from fastconv import dispatch

    monkeypatch.delenv("FASTCONV_CPU_LANES", raising=False)
    before = fastconv.settings()
    fastconv.configure(backend="auto", autotune=True, cache_dir=tmp_path / "fc")
    dispatch.clear_cache(memory_only=True)
    yield fastconv
    fastconv.configure(backend=before.backend, autotune=before.autotune, cache_dir=before.cache_dir)
    dispatch.clear_cache(memory_only=True)


def torchrun_restart(argv: list[str], env: dict | None = None, restart_count: int = 1) -> list[tuple[int, str]]:
    """What ``torchrun --nproc_per_node 2 --max-restarts N`` runs after a failed try: ``python ARGV`` in 2 gloo
    processes on 127.0.0.1 with ``TORCHELASTIC_RESTART_COUNT`` = ``restart_count``, started here
    (:func:`two_processes`). torchrun's own restart of 2 gloo ranks on one host fails now and then to join or hangs
    (its store shared with the rendezvous, pytorch/pytorch#135712; 2 of 2 CI runs), which is torch's, not what
    erf-lab's tests test. Returns (exit status, stderr) per rank."""
    tries = two_processes(argv, {**(env or {}), "TORCHELASTIC_RESTART_COUNT": str(restart_count)})
    return [(code, err) for code, _, err in tries]


def two_processes(argv: list[str], env: dict | None = None, timeout: float = 300) -> list[tuple[int, str, str]]:
    """``python ARGV`` in 2 gloo processes of one node on 127.0.0.1, with the variables torchrun
    ``--nproc_per_node 2`` sets, started here (no torchrun agent ends one when the other exits: each says what it
    says). Returns (exit status, stdout, stderr) per rank."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in (0, 1):
        penv = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *argv], env=penv, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        said = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, said)]
    finally:
        for p in procs:
            p.kill()


_KILL_AT_WRITE = """
import os, signal, sys
from pathlib import Path

name, nth, code, children = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
real_replace, seen = os.replace, []


def replace(src, dst, *args, **kwargs):  # atomic_path's rename: the temporary is written, the file not yet there
    if Path(dst).name == name:
        seen.append(dst)
        if len(seen) == nth:
            me, kids = os.getpid(), []
            for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():  # no /proc (macOS): none known
                try:  # /proc/PID/stat: "PID (name) STATE PPID ..."
                    if pid.isdigit() and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                        kids.append(pid)
                except (OSError, ValueError, IndexError):
                    pass
            children.write_text(" ".join(kids))
            os.kill(me, signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace
exec(compile(code, "<killed>", "exec"), {"__name__": "__main__"})
"""


def killed_at_write(code: str, name: str, nth: int = 1, env: dict | None = None, timeout: float = 300) -> list[int]:
    """Run ``code`` in a Python process of this checkout (one thread) that SIGKILLs itself at its ``nth`` atomic
    write of a file called ``name``: after the temporary file was written, before its rename (what a kill, the OOM
    killer or a power cut does there: no except, finally or lock release of ours runs). Fails unless it died so.
    Returns the ids of the child processes it had then (Linux; its output goes to files: children it left running
    would hold pipes open)."""
    import signal
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    penv = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as d:
        children, log = Path(d) / "children", Path(d) / "log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", _KILL_AT_WRITE, name, str(nth), code, str(children)],
                                    env=penv, stdout=out, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            finally:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL, f"not killed at write {nth} of {name}: exit " \
                                                   f"{proc.returncode}\n{log.read_text()[-3000:]}"
        return [int(pid) for pid in children.read_text().split()]


def write_leftovers(folder) -> list[str]:
    """What writes that did not finish left anywhere under ``folder`` (relative paths): :func:`erf_lab.io.atomic_path`
    temporaries, :func:`erf_lab.io.hold_file` locks and :func:`erf_lab.io.prepare_out_dir` write probes."""
    from erf_lab.io import _write_target

    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*") if
                  _write_target(p.name) is not None or p.name.endswith(".lock") or p.name.startswith(".write-test."))


def bad_idat_png(path):
    """A PNG whose chunks are whole (their CRCs hold: it passes the scan's verify()) but whose pixel data is no zlib
    stream: it fails only when loaded ("OSError: broken data stream ...")."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    i = png.index(b"IDAT")
    n = struct.unpack(">I", png[i - 4:i])[0]
    junk = b"\x07" * n
    path.write_bytes(png[:i + 4] + junk + struct.pack(">I", zlib.crc32(b"IDAT" + junk)) + png[i + 8 + n:])
