"""The app in a real browser: `streamlit run app/main.py` in a subprocess, Debian's headless Chromium via
playwright; the landing page must show the ERF heatmap and metrics without any exception element."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import stop_process

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "app" / "main.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    # No PYTHONPATH and another working directory: app/main.py alone must make the package ``app`` importable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_") and k != "PYTHONPATH"}
    env["ERF_LAB_APP_RUNS"] = str(tmp_path / "app-runs")
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                             "--server.address", "127.0.0.1", "--server.port", str(port),
                             "--browser.gatherUsageStats", "false"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail("streamlit did not start:\n" + (tmp_path / "streamlit.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc)
        log.close()


def test_landing_page_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is required (apt-get install -y chromium)"
    shot = tmp_path / "erf_explorer.png"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 2200})
        try:
            page = ctx.new_page()
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            # The ERF figure is the first image of the main area; metrics follow it.
            heatmap = page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first
            heatmap.wait_for(state="visible", timeout=240_000)
            page.locator('[data-testid="stMetric"]').first.wait_for(state="visible", timeout=60_000)
            box = heatmap.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100
            natural = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert natural[0] > 200 and natural[1] > 100  # a decoded PNG, not a broken image
            labels = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
            assert any("Area @20%" in t for t in labels), labels
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
            for title in ("ERF explorer", "Growth", "Re-parameterization", "Shape bias", "Kernels", "Results"):
                assert title in nav
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    assert shot.stat().st_size > 10_000
    out = os.environ.get("ERF_LAB_SCREENSHOT_DIR")
    if out:  # keep the screenshot for a human look
        shutil.copy(shot, Path(out) / shot.name)
