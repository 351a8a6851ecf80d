"""The `vgen stream` page in a real browser: headless Chromium (Debian's, at /usr/bin/chromium or on PATH, driven by
Playwright; .ci/run installs both) opens the page served by uvicorn on 127.0.0.1 with a tiny random video model,
starts a stream, waits for 10 frames, reads the FPS readouts and saves a screenshot whose canvas is not blank.
Skipped, with the reason, only where no browser or no Playwright can be had."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stream_server import running_server
from test_video_pipeline import tiny_pipeline

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                     "'vgen[test]')")

from vgen.stream.app import StreamSettings, create_app  # noqa: E402

# Chromium as a test browser: no sandbox (CI runs as root), nothing fetched or synced in the background
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("VGEN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_page_streams_frames_shows_fps_and_draws_the_canvas(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or on PATH): .ci/run installs Debian's 'chromium' where "
                    "apt-get works; set VGEN_CHROMIUM to another binary")
    app = create_app(tiny_pipeline(), StreamSettings(max_sessions=2))
    with running_server(app) as url, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            console_errors = []
            page.on("pageerror", lambda err: console_errors.append(str(err)))
            page.goto(url + "/", timeout=30_000)
            page.wait_for_function("document.getElementById('connection').textContent === 'connected'",
                                   timeout=20_000)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')",
                                   timeout=20_000)
            page.fill("#prompt", "a red circle moving right and a blue square moving up")
            page.click("#start")
            page.wait_for_function("window.vgenStats.framesReceived >= 10 && window.vgenStats.framesDrawn >= 3",
                                   timeout=30_000)
            readout = {key: page.text_content(f"#{key}") for key in ("gen-fps", "delivered-fps", "latency", "frames")}
            assert float(readout["gen-fps"]) > 0 and float(readout["delivered-fps"]) > 0
            assert readout["latency"].endswith(" ms") and float(readout["latency"][:-3]) > 0
            assert int(readout["frames"]) >= 10
            assert page.text_content("#cache-mode") == "sink_window"
            # the canvas holds a decoded frame: its pixels vary (a blank canvas is uniform)
            spread = page.evaluate("""() => {
                const c = document.getElementById('canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let lo = 255, hi = 0;
                for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2];
                    lo = Math.min(lo, v / 3); hi = Math.max(hi, v / 3); }
                return hi - lo; }""")
            assert spread > 20
            shot = tmp_path / "stream_page.png"
            page.locator("#canvas").screenshot(path=str(shot))
            pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
            assert pixels.shape[0] >= 200 and pixels.std() > 5  # not a blank canvas
            page.screenshot(path=str(tmp_path / "stream_page_full.png"))
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')",
                                   timeout=20_000)
            assert not console_errors
        finally:
            browser.close()
    out = os.environ.get("VGEN_STREAM_SCREENSHOT")  # keep the screenshot when asked
    if out:
        shutil.copy(tmp_path / "stream_page_full.png", out)
