"""The Gradio demo in a real browser: headless Chromium (the OS package) driven by Playwright opens the demo,
uploads the bundled sample photo, restores it with the tiny model and finds the output on the page; the
screenshot is saved in the test's temp folder. Every request the page makes must stay on this machine
(the demo runs offline: no CDN scripts, no web fonts, no analytics)."""

from __future__ import annotations

import shutil
import socket
from urllib.parse import urlparse

import pytest
from _serve_helpers import SAMPLE, load_test_engine

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("no Chromium found: apt-get install chromium (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tiny_model_dir):
    from osdface.serve.demo import build_demo, launch_demo

    engine = load_test_engine(tiny_model_dir, max_batch=4)
    demo = build_demo(engine)
    port = free_port()
    launch_demo(demo, "127.0.0.1", port, engine.config.max_upload_bytes, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    demo.osdface_downloads.cleanup()


def test_demo_restores_the_sample_in_chromium(demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("request", lambda r: requested.append(r.url))
            page.goto(demo_url, wait_until="load", timeout=120_000)
            page.locator("#input-image input[type=file]").set_input_files(str(SAMPLE))
            page.locator("#input-image img").first.wait_for(state="visible", timeout=120_000)
            page.locator("#restore-button").click()
            # the restored face crop appears in the gallery and the slider shows two images
            page.locator("#faces img").first.wait_for(state="visible", timeout=180_000)
            page.locator("#before-after img").nth(1).wait_for(state="attached", timeout=60_000)
            status = page.locator("#status").inner_text()
            page.locator("#download a, #download [download]").first.wait_for(state="attached", timeout=60_000)
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert "1 face(s) restored" in status
    assert shot.stat().st_size > 10_000
    hosts = {urlparse(u).hostname for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page fetched from outside the machine: {sorted(hosts)}"
