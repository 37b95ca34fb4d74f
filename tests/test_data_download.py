"""`erf-lab data download` against a local HTTP server on 127.0.0.1 only (never the real network)."""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
import warnings
from functools import partial
from pathlib import Path

import pytest

from erf_lab import paths
from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.io import sha256_file
from erf_lab.shape_bias import download as dl
from erf_lab.shape_bias.stimuli import parse_name


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range ``Range: bytes=N-`` support (206), like GitHub's raw server."""
    requests_seen: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        type(self).requests_seen.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def mirror(tmp_path, fixture_datasets):
    """A temporary upstream-layout copy of a few fixture files, served on 127.0.0.1; yields (url, manifest)."""
    full = dl.load_manifest()
    manifest = {}
    root = tmp_path / "www"
    for name, n in (("edges", 3), ("human-cue-conflict", 1)):
        files = dict([kv for kv in full[name]["files"].items() if (fixture_datasets / name / kv[0]).is_file()][:n])
        assert len(files) == n
        manifest[name] = {"upstream": full[name]["upstream"], "files": files}
        for rel in files:
            target = root / full[name]["upstream"] / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fixture_datasets / name / rel, target)
    RangeHandler.requests_seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", manifest, root
    server.shutdown()
    server.server_close()


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def test_manifest_entries_are_well_formed():
    m = dl.load_manifest()
    assert {k: len(v["files"]) for k, v in m.items()} == {"cue-conflict": 1280, "edges": 160, "silhouettes": 160,
                                                           "human-cue-conflict": 10, "human-edge": 10,
                                                           "human-silhouette": 10}
    assert m["silhouettes"]["upstream"].endswith("texture-vs-shape/master/stimuli/filled-silhouettes")
    assert m["human-cue-conflict"]["upstream"] == "bethgelab/model-vs-human/master/raw-data/cue-conflict"
    assert m["human-edge"]["upstream"] == "bethgelab/model-vs-human/master/raw-data/edge"
    assert m["human-silhouette"]["upstream"] == "bethgelab/model-vs-human/master/raw-data/silhouette"
    assert set(dl.SETS) == set(m)  # every set that shape-bias reads is downloaded
    for name, entry in m.items():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+/master/[\w./-]+", entry["upstream"]), entry["upstream"]
        for rel, value in entry["files"].items():
            sha, size = value
            assert len(value) == 2 and SHA256.match(sha) and type(size) is int and size > 0, (name, rel)
            parts = rel.split("/")
            assert ".." not in parts and not rel.startswith("/") and "\\" not in rel, rel
            if name.startswith("human-"):
                assert re.fullmatch(name[6:] + r"_subject-\d\d_session_1\.csv", rel), rel
            else:  # <category>/<name>.png and the name says that category (see stimuli.parse_name)
                assert len(parts) == 2 and parts[1].endswith(".png") and parse_name(parts[1])[0] == parts[0], rel
    shas = [v[0] for e in m.values() for v in e["files"].values()]
    assert len(set(shas)) == len(shas)  # no file listed twice


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_fixture_files_are_unmodified_upstream_files(fixture_datasets):
    m = dl.load_manifest()
    seen = 0
    for name, entry in m.items():
        for rel, p in _files(fixture_datasets / name).items():
            assert entry["files"][rel] == [sha256_file(p), p.stat().st_size], rel
            seen += 1
    assert seen == 29


def test_manifest_matches_shared_data(shared_datasets):
    """Every file of the full sets, and nothing else, with its size and SHA-256 (regenerated from disk)."""
    assert dl.build_manifest(shared_datasets) == dl.load_manifest()


def test_data_found_only_through_documented_places(tmp_path, monkeypatch):
    """$ERF_LAB_DATA, else the download cache; never a folder beside the source tree (../shared/datasets)."""
    from erf_lab.paths import datasets_root

    monkeypatch.delenv("ERF_LAB_DATA", raising=False)
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    assert datasets_root() is None
    (tmp_path / "cache" / "datasets").mkdir(parents=True)
    assert datasets_root() == tmp_path / "cache" / "datasets"
    monkeypatch.setenv("ERF_LAB_DATA", str(tmp_path / "mine"))
    assert datasets_root() == tmp_path / "cache" / "datasets"  # not a folder: falls back to the cache
    (tmp_path / "mine").mkdir()
    assert datasets_root() == tmp_path / "mine"


def test_empty_cache_variable_is_unset_and_a_foreign_data_folder_is_ignored(tmp_path, monkeypatch):
    """ERF_LAB_CACHE="" is no cache in the working directory; an installed copy (whose parent, site-packages, may
    hold another package's data/) reads its own shipped data."""
    import erf_lab.paths as paths

    monkeypatch.setenv("ERF_LAB_CACHE", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.cache_dir() == Path.home() / ".cache" / "erf-lab"
    fake_root = tmp_path / "site-packages"
    (fake_root / "data").mkdir(parents=True)  # some other package's data folder
    monkeypatch.setattr(paths, "REPO_ROOT", fake_root)
    shipped = paths.data_dir()
    assert shipped != fake_root / "data" and (shipped / "paper_reference.json").is_file()


def test_full_download_then_idempotent(mirror, tmp_path, fixture_datasets):
    url, manifest, _ = mirror
    dest = tmp_path / "dest"
    rep = dl.download(dest, base_url=url, sets=list(manifest), manifest=manifest, show_progress=False)
    for name, entry in manifest.items():
        assert rep["sets"][name]["status"] == "installed"
        assert rep["sets"][name]["downloaded"] == len(entry["files"])
        for rel, (sha, size) in entry["files"].items():
            got = dest / name / rel
            assert got.read_bytes() == (fixture_datasets / name / rel).read_bytes()
            assert sha256_file(got) == sha and got.stat().st_size == size
        assert (dest / name / "MANIFEST.json").is_file()
    assert not (dest / ".incoming").exists()
    n = len(RangeHandler.requests_seen)
    rep2 = dl.download(dest, base_url=url, sets=list(manifest), manifest=manifest, show_progress=False)
    assert all(r["status"] == "present" for r in rep2["sets"].values())
    assert len(RangeHandler.requests_seen) == n  # nothing fetched again


def test_checksum_mismatch_leaves_nothing(mirror, tmp_path):
    url, manifest, root = mirror
    entry = manifest["edges"]
    rel = next(iter(entry["files"]))
    served = root / entry["upstream"] / rel
    served.write_bytes(served.read_bytes()[:-10] + b"tampered!!")  # same size, wrong bytes
    dest = tmp_path / "dest"
    with pytest.raises(ErfLabError, match="checksum mismatch"):
        dl.download(dest, base_url=url, sets=["edges"], manifest=manifest, workers=1, show_progress=False)
    assert not (dest / "edges").exists()
    assert not list((dest / ".incoming").rglob(Path(rel).name + "*"))  # bad file and its .part removed


def test_resume_truncated_partial_with_range(mirror, tmp_path, fixture_datasets):
    url, manifest, _ = mirror
    entry = manifest["human-cue-conflict"]
    rel, (sha, size) = next(iter(entry["files"].items()))
    dest = tmp_path / "dest"
    part = dest / ".incoming" / "human-cue-conflict" / (rel + ".part")
    part.parent.mkdir(parents=True)
    original = (fixture_datasets / "human-cue-conflict" / rel).read_bytes()
    part.write_bytes(original[: size // 3])
    rep = dl.download(dest, base_url=url, sets=["human-cue-conflict"], manifest=manifest, workers=1,
                      show_progress=False)
    assert rep["sets"]["human-cue-conflict"]["resumed"] == 1
    assert (dest / "human-cue-conflict" / rel).read_bytes() == original
    ranges = [r for p, r in RangeHandler.requests_seen if p.endswith(rel)]
    assert ranges == [f"bytes={size // 3}-"]


def test_unreachable_server_is_one_line_error(tmp_path, capsys):
    rc = main(["data", "download", "--dest", str(tmp_path / "d"), "--base-url", "http://127.0.0.1:9",
               "--sets", "human-cue-conflict", "--workers", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1 and "download failed" in errors[0]
    assert not (tmp_path / "d" / "human-cue-conflict").exists()


@pytest.mark.parametrize("record", [b'{"files": ', b"[1]", b"\xff\xfe not text"],
                         ids=["truncated-json", "not-an-object", "not-utf8"])
def test_a_set_with_a_corrupt_manifest_record_is_one_error_line(tmp_path, capsys, record):
    """A <dest>/<set>/MANIFEST.json that is no record of 'erf-lab data download' (damaged, edited) is the same
    one-line refusal as a folder without one, not a traceback; the folder is left as it was."""
    (tmp_path / "d" / "human-cue-conflict").mkdir(parents=True)
    (tmp_path / "d" / "human-cue-conflict" / "MANIFEST.json").write_bytes(record)
    rc = main(["data", "download", "--dest", str(tmp_path / "d"), "--base-url", "http://127.0.0.1:9",
               "--sets", "human-cue-conflict", "--workers", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and errors == [
        f"erf-lab data: error: {tmp_path / 'd' / 'human-cue-conflict'} exists but was not made by 'erf-lab data "
        f"download'; remove it or use --dest"], errors
    assert (tmp_path / "d" / "human-cue-conflict" / "MANIFEST.json").read_bytes() == record


def test_cli_download_and_info(mirror, tmp_path, capsys, monkeypatch):
    url, manifest, _ = mirror
    monkeypatch.setattr(dl, "load_manifest", lambda: manifest)
    dest = tmp_path / "dest"
    assert main(["data", "download", "--dest", str(dest), "--base-url", url, "--sets", "edges"]) == 0
    assert "edges: installed (3 files)" in capsys.readouterr().out
    monkeypatch.setenv("ERF_LAB_DATA", str(dest))
    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert str(dest) in out and "edges: 3 files" in out


def test_the_cache_honours_xdg_cache_home_as_fastconv_does(mirror, tmp_path, capsys, monkeypatch):
    """erf-lab's cache was always ~/.cache/erf-lab while fastconv's followed $XDG_CACHE_HOME: a user who moved the
    caches off a small home found the data sets, cue-world splits and app runs still there. Now both read the same
    base (an absolute $XDG_CACHE_HOME, else ~/.cache: an empty or relative one is ignored, as the spec says), and
    `data download` writes where `data info` and every command then look."""
    from fastconv import config

    url, manifest, _ = mirror
    monkeypatch.setattr(dl, "load_manifest", lambda: manifest)
    for name in ("ERF_LAB_CACHE", "ERF_LAB_DATA", "FASTCONV_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for ignored in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert paths.cache_dir() == tmp_path / "home" / ".cache" / "erf-lab"
        assert config._env_cache_dir() == tmp_path / "home" / ".cache" / "fastconv"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "erf-lab"
    assert config._env_cache_dir() == tmp_path / "xdg" / "fastconv"
    assert main(["data", "download", "--base-url", url, "--sets", "edges", "--quiet"]) == 0
    assert (tmp_path / "xdg" / "erf-lab" / "datasets" / "edges").is_dir()
    assert not (tmp_path / "home" / ".cache").exists()
    assert paths.datasets_root() == tmp_path / "xdg" / "erf-lab" / "datasets"
    capsys.readouterr()
    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "xdg" / "erf-lab" / "datasets") in out and "edges: 3 files" in out


def test_cli_download_quiet_shows_no_progress_bar(mirror, tmp_path, capsys, monkeypatch):
    """``data download --quiet``, as the other long commands: its per-set bars had no off switch."""
    url, manifest, _ = mirror
    monkeypatch.setattr(dl, "load_manifest", lambda: manifest)
    argv = ["data", "download", "--base-url", url, "--sets", "edges"]
    assert main([*argv, "--dest", str(tmp_path / "bars")]) == 0
    assert "download edges" in capsys.readouterr().err
    assert main([*argv, "--quiet", "--dest", str(tmp_path / "quiet")]) == 0
    out, err = capsys.readouterr()
    assert "download edges" not in err and "edges: installed (3 files)" in out
    assert sorted(p.name for p in (tmp_path / "quiet" / "edges").rglob("*.png")) == sorted(
        p.name for p in (tmp_path / "bars" / "edges").rglob("*.png"))


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """A server that closes the connection halfway (once), or answers with no HTTP at all."""
    data = bytes(range(256)) * 400
    mode = "truncate"
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_headers_from(self, start: int, rng) -> bytes:
        """The status and headers of ``data[start:]`` (206 for a Range request); returns that body."""
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return body

    def do_GET(self):
        rng = self.headers.get("Range")
        start = int(rng[6:].split("-")[0]) if rng else 0
        if type(self).mode == "garbage":
            self.wfile.write(b"garbage\r\n\r\n")
            self.close_connection = True
            return
        body = self.send_headers_from(start, rng)
        if type(self).mode == "truncate":
            type(self).mode = "ok"
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def misbehaving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/f.bin"
    server.shutdown()
    server.server_close()


def test_a_connection_cut_short_keeps_the_partial_file_and_resumes(misbehaving, tmp_path):
    import hashlib

    data = _Misbehaving.data
    sha, target = hashlib.sha256(data).hexdigest(), tmp_path / "f.bin"
    _Misbehaving.mode = "truncate"
    with pytest.raises(ErfLabError, match=r"download (incomplete|failed).*rerun to resume"):
        dl.fetch(misbehaving, target, sha, len(data))
    part = tmp_path / "f.bin.part"
    assert part.is_file() and 0 < part.stat().st_size < len(data) and not target.exists()
    assert dl.fetch(misbehaving, target, sha, len(data)) == "resumed" and target.read_bytes() == data
    # a partial file as long as the whole one but wrong is started over (not a Range past the end)
    target.unlink()
    part.write_bytes(b"x" * len(data))
    assert dl.fetch(misbehaving, target, sha, len(data)) == "downloaded" and target.read_bytes() == data


def test_a_reply_that_is_no_http_is_one_error_line(misbehaving, tmp_path):
    _Misbehaving.mode = "garbage"
    with pytest.raises(ErfLabError) as e:
        dl.fetch(misbehaving, tmp_path / "f.bin", "0" * 64, 10)
    assert "download failed" in str(e.value) and "\n" not in str(e.value)


def _ctrl_c_stops_at_once(download) -> None:
    """Ctrl-C (KeyboardInterrupt from a timer signal) 1.5 s into ``download()``: it must stop within 10 s."""
    import signal
    import time

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            download()
        assert time.monotonic() - t0 < 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Stalling(_Misbehaving):
    """Sends the first half of the file, then stalls (until ``release`` is set) without closing the connection."""
    release = threading.Event()
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        rng = self.headers.get("Range")
        start = int(rng[6:].split("-")[0]) if rng else 0
        body = self.send_headers_from(start, rng)
        if not rng:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            type(self).release.wait(120)
            return
        self.wfile.write(body)


def test_ctrl_c_on_a_stalled_server_stops_at_once_and_the_rerun_resumes(tmp_path):
    """Ctrl-C while the server stalled mid-file waited for every blocked read's 60 s timeout before the command
    ended (the thread pool joins its workers); the reads are now stopped, the bytes that came are kept."""
    import hashlib

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Stalling.release.clear()
    data = _Stalling.data
    manifest = {"cue-conflict": {"upstream": "up", "files": {"f.bin": [hashlib.sha256(data).hexdigest(), len(data)]}}}
    url = f"http://127.0.0.1:{server.server_address[1]}"
    part = tmp_path / ".incoming" / "cue-conflict" / "f.bin.part"

    try:
        _ctrl_c_stops_at_once(lambda: dl.download(tmp_path, base_url=url, sets=["cue-conflict"], manifest=manifest,
                                                  show_progress=False))
    finally:
        _Stalling.release.set()
    assert part.stat().st_size == len(data) // 2 and not (tmp_path / "cue-conflict").exists()
    rep = dl.download(tmp_path, base_url=url, sets=["cue-conflict"], manifest=manifest, show_progress=False)
    assert rep["sets"]["cue-conflict"]["resumed"] == 1
    assert (tmp_path / "cue-conflict" / "f.bin").read_bytes() == data
    server.shutdown()
    server.server_close()


def test_a_bad_base_url_leaves_no_dest_folder_behind(tmp_path, capsys):
    """`data download --base-url ftp://...` was refused only after --dest had been created (an empty folder left
    behind by a command that did nothing); the URL is now checked first."""
    dest = tmp_path / "new" / "data"
    assert main(["data", "download", "--dest", str(dest), "--base-url", "ftp://mirror.example/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base-url must be an http(s):// or file: URL" in err, err
    assert not (tmp_path / "new").exists()


class _Mute(http.server.BaseHTTPRequestHandler):
    """Takes the request and never answers (until ``release``)."""
    release = threading.Event()

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).release.wait(120)


def test_ctrl_c_on_a_server_that_never_answers_stops_at_once(tmp_path):
    """A server that stalls before its headers: Ctrl-C waited for the 60 s timeout of every waiting request."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mute)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Mute.release.clear()
    manifest = {"cue-conflict": {"upstream": "up", "files": {f"f{i}.bin": ["0" * 64, 10] for i in range(3)}}}

    try:
        _ctrl_c_stops_at_once(lambda: dl.download(tmp_path, base_url=f"http://127.0.0.1:{server.server_address[1]}",
                                                  sets=["cue-conflict"], manifest=manifest, show_progress=False))
    finally:
        _Mute.release.set()
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "cue-conflict").exists()


def test_a_user_without_a_home_folder_gets_a_private_cache_not_an_error(monkeypatch):
    """$HOME unset and a user id without a password entry (a container run as ``-u 12345``): every command that
    touched the cache raised Path.home()'s "Could not determine home directory" traceback. Now the process caches in
    a private folder (made once, warned once); a "~" in $ERF_LAB_CACHE that names no home is one ErfLabError."""
    import pwd

    from erf_lab.errors import ErfLabError

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("ERF_LAB_CACHE", "")
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    monkeypatch.setattr(paths, "_private_cache", functools.cache(paths._private_cache.__wrapped__))
    with pytest.warns(RuntimeWarning, match=r"no home folder .* set ERF_LAB_CACHE"):
        first = paths.cache_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither warns nor makes another folder
        assert paths.cache_dir() == first
    assert first.is_dir() and os.access(first, os.W_OK) and first.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("ERF_LAB_CACHE", "~/erf")
    with pytest.raises(ErfLabError, match=r"ERF_LAB_CACHE=~/erf starts with a ~ that names no home folder"):
        paths.cache_dir()


def test_a_download_holds_its_dest(mirror, tmp_path, capsys, monkeypatch):
    """Two downloads into one --dest at once (a second shell, a second `erf-lab data download` while the first still
    ran) wrote the same partial files under .incoming/ and raced to move the set into place. The download now holds
    --dest: the second gets one line, exit 2, and fetches nothing; once the first is done the same command runs."""
    from conftest import held_by_another_process

    url, manifest, _ = mirror
    monkeypatch.setattr(dl, "load_manifest", lambda: manifest)
    dest = tmp_path / "dest"
    dest.mkdir()
    argv = ["data", "download", "--dest", str(dest), "--base-url", url, "--sets", "edges"]
    with held_by_another_process(dest):
        assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"erf-lab data: error: --dest {dest} is in use: another erf-lab process is writing a run there "
                     "now; wait for it to end (or stop it) and run the command again, or choose another --dest"], lines
    assert list(dest.iterdir()) == [] and RangeHandler.requests_seen == []
    assert main(argv) == 0
    assert "edges: installed (3 files)" in capsys.readouterr().out


def test_a_failed_download_leaves_no_empty_folder_behind(tmp_path, capsys):
    """Every file failing (no server) left the --dest folder it made behind, empty, with empty staging folders
    in a --dest the user had. Now a failed download removes the empty folders it made; a --dest that was there
    stays, and a partial file (which resumes) keeps its folders."""
    args = ["--base-url", "http://127.0.0.1:9", "--sets", "human-cue-conflict", "--workers", "1"]
    assert main(["data", "download", "--dest", str(tmp_path / "new" / "d"), *args]) == 2
    assert list(tmp_path.iterdir()) == []
    had = tmp_path / "had"
    had.mkdir()
    assert main(["data", "download", "--dest", str(had), *args]) == 2
    assert had.is_dir() and list(had.iterdir()) == []
    part = had / ".incoming" / "human-cue-conflict" / "some" / "file.csv.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"partial")
    assert main(["data", "download", "--dest", str(had), *args]) == 2
    assert part.read_bytes() == b"partial" and "download failed" in capsys.readouterr().err
