"""The web demo end to end in headless Chromium (Debian's chromium driven by Playwright, no browser download): start
``python -m svi_jax.demo`` on the tiny config, load the page, upload an image, start a 2-clip generation, stop it in
clip 2 (held there by SVI_DEMO_HOLD_AT), resume, see both clips arrive, check the served mp4, and take a
screenshot: into tmp_path, or, with SVI_UPDATE_SCREENSHOT=1, over the tracked docs/demo/screenshot.png that
docs/demo.md shows (a test run must not modify the checkout)."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_demo_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    ref = tmp_path / "ref.png"
    yy, xx = np.mgrid[0:64, 0:96]
    Image.fromarray(np.stack([xx * 2, yy * 3, 255 - xx], -1).astype(np.uint8)).save(ref)
    env = dict(os.environ, PYTHONPATH=ROOT, SVI_DEMO_HOLD_AT="1:0")
    server = subprocess.Popen([sys.executable, "-m", "svi_jax.demo", "--config", os.path.join(ROOT, "configs/tiny.py"),
                               "--port", "0", "--workdir", str(tmp_path / "runs"), "--num_steps", "2",
                               "--cfg_scale", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"serving (http://\S+)", line).group(1)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(   # a fresh --user-data-dir
                tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1200, "height": 860})
            page = browser.new_page()
            page.goto(url)
            page.set_input_files("#image", str(ref))
            page.fill("#prompts", "A gradient drifts to the right.\nThe gradient keeps drifting.")
            page.click("#generate")
            page.wait_for_selector("#clips li[data-clip='0']", timeout=240_000)
            page.wait_for_function("document.getElementById('progress-text').textContent.includes('clip 2 of 2')",
                                   timeout=60_000)
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=60_000)
            assert page.locator("#clips li").count() == 1
            page.click("#resume")
            page.wait_for_selector("#clips li[data-clip='1']", timeout=120_000)
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
            assert page.locator("#clips li").count() == 2
            assert "2. The gradient keeps drifting." in page.inner_text("#clips")
            assert "s/step" in page.inner_text("#clips")
            src = page.get_attribute("#video", "src")
            assert src.endswith("video.mp4?clips=2")
            mp4 = page.request.get(url.rstrip("/") + src).body()
            out = tmp_path / "got.mp4"
            out.write_bytes(mp4)
            from svi_jax import video_io

            assert video_io.count_frames(str(out)) == 2 * (17 - 1) + 1
            page.wait_for_timeout(500)
            shot = (os.path.join(ROOT, "docs", "demo", "screenshot.png") if os.environ.get("SVI_UPDATE_SCREENSHOT")
                    else str(tmp_path / "screenshot.png"))
            page.screenshot(path=shot, full_page=True)
            assert os.path.getsize(shot) > 10_000
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
