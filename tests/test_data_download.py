"""`erf-lab data download` against a local HTTP server on 127.0.0.1 only (never the real network)."""
from __future__ import annotations

import http.server
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.io import sha256_file
from erf_lab.shape_bias import download as dl


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
def mirror(tmp_path, shared_datasets):
    """A temporary upstream-layout copy of a few shared files, served on 127.0.0.1; yields (url, manifest)."""
    full = dl.load_manifest()
    manifest = {}
    root = tmp_path / "www"
    for name, n in (("edges", 3), ("human-cue-conflict", 2)):
        files = dict(list(full[name]["files"].items())[:n])
        manifest[name] = {"upstream": full[name]["upstream"], "files": files}
        for rel in files:
            target = root / full[name]["upstream"] / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_datasets / name / rel, target)
    RangeHandler.requests_seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", manifest, root
    server.shutdown()
    server.server_close()


def test_manifest_matches_shared_data(shared_datasets):
    m = dl.load_manifest()
    assert {k: len(v["files"]) for k, v in m.items()} == {"cue-conflict": 1280, "edges": 160, "silhouettes": 160,
                                                           "human-cue-conflict": 10}
    rel, (sha, size) = next(iter(m["cue-conflict"]["files"].items()))
    assert sha256_file(shared_datasets / "cue-conflict" / rel) == sha
    assert m["silhouettes"]["upstream"].endswith("texture-vs-shape/master/stimuli/filled-silhouettes")


def test_full_download_then_idempotent(mirror, tmp_path, shared_datasets):
    url, manifest, _ = mirror
    dest = tmp_path / "dest"
    rep = dl.download(dest, base_url=url, sets=list(manifest), manifest=manifest, show_progress=False)
    for name, entry in manifest.items():
        assert rep["sets"][name]["status"] == "installed"
        assert rep["sets"][name]["downloaded"] == len(entry["files"])
        for rel, (sha, size) in entry["files"].items():
            got = dest / name / rel
            assert got.read_bytes() == (shared_datasets / name / rel).read_bytes()
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


def test_resume_truncated_partial_with_range(mirror, tmp_path, shared_datasets):
    url, manifest, _ = mirror
    entry = manifest["human-cue-conflict"]
    rel, (sha, size) = next(iter(entry["files"].items()))
    dest = tmp_path / "dest"
    part = dest / ".incoming" / "human-cue-conflict" / (rel + ".part")
    part.parent.mkdir(parents=True)
    original = (shared_datasets / "human-cue-conflict" / rel).read_bytes()
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
