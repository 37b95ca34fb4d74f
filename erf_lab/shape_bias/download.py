"""Download the public cue-conflict / edge / silhouette stimuli and the human responses from their upstream
repositories: rgeirhos/texture-vs-shape (``stimuli/``; Geirhos et al., ICLR 2019, CC BY 4.0) and
bethgelab/model-vs-human (``raw-data/cue-conflict``, ``edge``, ``silhouette``; Geirhos et al., NeurIPS 2021).

Every file is checked against the SHA-256 in the shipped manifest ``data/shape_bias_sha256.json`` (package
``erf_lab_data`` once installed); partial files resume with
HTTP ``Range``; a set is staged under ``<dest>/.incoming/`` and moved into place with one atomic rename once all
its files verify, so ``<dest>/<set>`` is either complete or absent.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from erf_lab.errors import ErfLabError

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
SETS = ("cue-conflict", "edges", "silhouettes", "human-cue-conflict", "human-edge", "human-silhouette")
CHUNK = 1 << 16
CREDIT = ("Stimuli: Geirhos et al., ICLR 2019 (github.com/rgeirhos/texture-vs-shape), CC BY 4.0; "
          "human data: Geirhos et al., NeurIPS 2021 (github.com/bethgelab/model-vs-human).")
"""Credit shown wherever results on these sets are shown (CC BY 4.0 asks for it)."""


def default_dest() -> Path:
    """``<cache>/datasets`` — the last place :func:`erf_lab.paths.datasets_root` looks."""
    from erf_lab.paths import cache_dir

    return cache_dir() / "datasets"


MANIFEST_FILE = "shape_bias_sha256.json"


def load_manifest() -> dict:
    """``{set: {"upstream": path under the base URL, "files": {rel: [sha256, size]}}}`` from the shipped JSON."""
    from erf_lab.paths import data_dir

    return json.loads((data_dir() / MANIFEST_FILE).read_text(encoding="utf-8"))["sets"]


def build_manifest(root: str | os.PathLike) -> dict:
    """The ``sets`` part of the manifest for a local copy of the sets under ``root`` (same upstream paths as the
    shipped one); used to regenerate ``data/shape_bias_sha256.json`` from a verified copy."""
    from erf_lab.io import sha256_file

    root = Path(root)
    out = {}
    for name, entry in load_manifest().items():
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        out[name] = {"upstream": entry["upstream"],
                     "files": {p.relative_to(root / name).as_posix(): [sha256_file(p), p.stat().st_size]
                               for p in files}}
    return out


def _abort(responses: set) -> None:
    """Shut down the sockets of the responses still being read (``fetch``'s ``active``): a read blocked on a
    stalled server returns at once instead of after its timeout, so Ctrl-C ends the download promptly."""
    for resp in list(responses):
        sock = resp if isinstance(resp, socket.socket) else \
            getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _urlopen(req, timeout: float, active: set | None):
    """``urllib.request.urlopen``; with ``active``, an http:// connection's socket joins it as soon as it is
    connected, so :func:`_abort` also stops a server that stalls before it answers (not only one that stalls in the
    body: the response joins ``active`` in :func:`fetch`)."""
    if active is None or req.type != "http":
        return urllib.request.urlopen(req, timeout=timeout)
    import http.client

    class Connection(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            active.add(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, r):
            return self.do_open(Connection, r)

    return urllib.request.build_opener(Handler).open(req, timeout=timeout)


def fetch(url: str, target: Path, sha256: str, size: int | None = None, timeout: float = 60.0,
          active: set | None = None) -> str:
    """Download ``url`` to ``target`` via ``target.part`` (resumed with HTTP Range), verify SHA-256, rename.

    Returns ``"present"``, ``"downloaded"`` or ``"resumed"``. A response cut short (fewer bytes than ``size``)
    keeps the partial file and raises ``ErfLabError`` (rerun to resume); on a checksum mismatch of a whole file
    the partial file is deleted and ``ErfLabError`` raised; ``target`` is never created with wrong contents.
    """
    import http.client

    from erf_lab.io import sha256_file

    if target.is_file() and sha256_file(target) == sha256:
        return "present"
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have >= size and sha256_file(part) != sha256:
        part.unlink()  # as long as the whole file or longer, and wrong: start over, not a Range past its end
        have = 0
    status = "downloaded"
    req = urllib.request.Request(url, headers={"User-Agent": "erf-lab"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    resp = None
    try:
        with _urlopen(req, timeout, active) as resp:
            if active is not None:  # download() shuts it down on Ctrl-C
                active.add(resp)
            code = resp.status
            mode = "ab" if (have and code == 206) else "wb"
            status = "resumed" if mode == "ab" else "downloaded"
            with open(part, mode) as f:
                while block := resp.read(CHUNK):
                    f.write(block)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416: the partial file is already complete
            raise ErfLabError(f"download failed: {url}: HTTP {e.code} {e.reason}") from None
        status = "resumed"
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
        reason = " ".join(str(getattr(e, "reason", None) or f"{type(e).__name__}: {e}").split())  # one line
        raise ErfLabError(f"download failed: {url}: {reason} (rerun to resume)") from None
    finally:
        if active is not None:
            active.discard(resp)
            for sock in list(active):  # the connections of finished files (closed with their response)
                if isinstance(sock, socket.socket) and sock.fileno() == -1:
                    active.discard(sock)
    got = part.stat().st_size if part.is_file() else 0
    if size is not None and got < size:  # the server closed the connection early: keep what came, resume later
        raise ErfLabError(f"download incomplete: {url}: {got} of {size} bytes (rerun to resume)")
    digest = sha256_file(part)
    if digest != sha256:
        part.unlink()
        raise ErfLabError(f"checksum mismatch for {url}: expected sha256 {sha256[:12]}…, got {digest[:12]}…; "
                          f"the file was discarded and nothing was installed")
    os.replace(part, target)
    return status


def download(dest: str | os.PathLike | None = None, base_url: str = DEFAULT_BASE_URL, sets=SETS,
             manifest: dict | None = None, workers: int = 4, show_progress: bool = True) -> dict:
    """Fetch ``sets`` into ``dest`` (default: the cache); returns a report per set. Idempotent: complete sets
    are skipped, interrupted ones resume."""
    from erf_lab.io import remove_empty_folders

    manifest = manifest or load_manifest()
    dest = Path(dest).expanduser() if dest else default_dest()
    unknown = [s for s in sets if s not in manifest]
    if unknown:
        raise ErfLabError(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(manifest)}")
    if not str(base_url).startswith(("http://", "https://", "file:")):
        raise ErfLabError(f"--base-url must be an http(s):// or file: URL, got {base_url!r}")
    base_url = base_url.rstrip("/")
    try:
        return {"dest": str(dest), "sets": _download_sets(dest, base_url, sets, manifest, workers, show_progress)}
    finally:  # what a failed file left is kept (its .part resumes), its empty folders not
        incoming = dest / ".incoming"
        remove_empty_folders([*sorted((p for p in incoming.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)),
                              incoming] if incoming.is_dir() else [])


def _download_sets(dest: Path, base_url: str, sets, manifest: dict, workers: int, show_progress: bool) -> dict:
    """:func:`download`'s work: each set fetched into ``dest/.incoming/<set>``, then moved to ``dest/<set>``."""
    from erf_lab.io import progress, write_json
    from erf_lab.provenance import finished, provenance

    report = {}
    for name in sets:
        entry = manifest[name]
        final = dest / name
        record = final / "MANIFEST.json"
        if final.exists():
            from erf_lab.io import read_json_or_none

            made = read_json_or_none(record) if record.is_file() else None  # None: missing or corrupt
            if isinstance(made, dict) and made.get("files") == entry["files"]:
                report[name] = {"status": "present", "path": str(final), "files": len(entry["files"])}
                continue
            raise ErfLabError(f"{final} exists but was not made by 'erf-lab data download'; remove it or use --dest")
        staging = dest / ".incoming" / name
        made_by, started = provenance("data download", {"set": name, "base_url": base_url, "workers": workers}), \
            time.monotonic()
        counts = {"present": 0, "downloaded": 0, "resumed": 0}
        files = list(entry["files"].items())
        active: set = set()
        total = sum(size for _, (_, size) in files)

        def one(item):
            rel, (sha, size) = item
            url = f"{base_url}/{entry['upstream']}/{rel}"
            return fetch(url, staging / rel, sha, size, active=active), size

        with progress(total=total, desc=f"download {name}", unit="B", unit_scale=True,
                      disable=not show_progress) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
            try:
                for status, size in pool.map(one, files):
                    counts[status] += 1
                    bar.update(size)
            except KeyboardInterrupt:  # not a wait for every stalled read's timeout: stop them, keep the .part files
                pool.shutdown(wait=False, cancel_futures=True)
                _abort(active)
                raise
        write_json(staging / "MANIFEST.json", {"set": name, "source": f"{base_url}/{entry['upstream']}",
                                               "files": entry["files"], "downloaded_utc":
                                                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               "provenance": {**made_by, **finished(started)}})
        os.replace(staging, final)  # atomic: the set appears complete or not at all
        report[name] = {"status": "installed", "path": str(final), "files": len(files), **counts}
    return report


def info() -> dict:
    """Where the data sets are found (``$ERF_LAB_DATA`` or the download cache) and what is there."""
    from erf_lab.paths import cache_dir, datasets_root

    root = datasets_root()
    sets = {}
    if root is not None:
        for name in SETS:
            d = root / name
            n = sum(1 for p in d.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".csv")) \
                if d.is_dir() else 0
            sets[name] = {"present": d.is_dir(), "files": n}
    return {"root": None if root is None else str(root), "env_ERF_LAB_DATA": os.environ.get("ERF_LAB_DATA"),
            "cache": str(cache_dir() / "datasets"), "sets": sets}
