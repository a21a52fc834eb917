"""`synthmed ui` and the HTML report in a real browser: Debian's chromium driven by Playwright (no browser download).

Runs with the end-to-end tests; skips with one line when chromium or playwright is absent. Screenshots go to
$SYNTHMED_SCREENSHOTS (default: the test's tmp folder) and their paths are printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from synthmed.data.metadata import read_metadata

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SYNTHMED_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(quick, tmp_path_factory):
    """`synthmed ui` as a user starts it, on a free port; stopped after the module."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "synthmed.cli", "ui", "--model", str(quick / "controlnet"), "--synthetic", str(quick / "synthetic"),
                                 "--results", str(quick / "evaluation" / "results.json"), "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_generate_browse_and_results_in_the_browser(browser, server, quick, direct, tmp_path):
    from synthmed.ui.session import Session

    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(server, wait_until="domcontentloaded", timeout=120_000)
    thumbs = page.locator("#mask-picker button.thumbnail-item")
    thumbs.first.wait_for(timeout=120_000)
    validation = read_metadata(quick / "data" / "validation" / "metadata.jsonl")
    assert thumbs.count() == min(48, len(validation))
    thumbs.nth(2).click()
    page.wait_for_selector("#picked", timeout=60_000)
    sid = validation[2]["id"]
    assert page.locator("#picked").inner_text() == f"picked validation/{sid}"
    assert page.locator("#prompt textarea").input_value() == validation[2]["text"]  # the model's own prompt rule
    page.locator("#steps input[type=number]").fill("3")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#seed input").fill("11")
    page.locator("#seed input").press("Tab")
    page.locator("#generate-button").click()
    page.wait_for_selector("#mean-dice", timeout=300_000)
    shown = float(page.locator("#mean-dice").inner_text())
    _, dice = direct(sid, 11, 3)  # the same seed and settings from the Python API
    assert shown == pytest.approx(dice, abs=5e-5)
    assert "seed 11" in page.locator("#verdict").inner_text() and "steps 3" in page.locator("#verdict").inner_text()
    shots = _shots(tmp_path)
    page.screenshot(path=str(shots / "ui-generate.png"), full_page=True)

    page.get_by_role("tab", name="Browse").click()
    page.wait_for_selector("#browse-n", timeout=60_000)
    rows = Session(quick / "controlnet", synthetic=quick / "synthetic").synthetic_rows()
    kept = read_metadata(quick / "synthetic" / "train" / "metadata.jsonl")
    assert len(rows) >= len(kept) > 0
    assert int(page.locator("#browse-n").inner_text()) == len(rows)
    assert page.locator("#browse-gallery button.thumbnail-item").count() == len(rows)
    page.locator("#browse-gallery button.thumbnail-item").first.click()
    page.wait_for_function("document.querySelector('#provenance') && document.querySelector('#provenance').innerText.includes('source_mask_id')", timeout=60_000)
    assert rows[0]["provenance"]["source_mask_id"] in page.locator("#provenance").inner_text()
    page.screenshot(path=str(shots / "ui-browse.png"), full_page=True)

    page.get_by_role("tab", name="Results").click()
    frame = page.frame_locator("#results-frame")
    frame.locator("h1").wait_for(timeout=60_000)
    assert frame.locator("img").count() > 0
    broken = frame.locator("img").evaluate_all("imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert broken == 0
    assert not page.locator(".synthmed-error").count()
    page.screenshot(path=str(shots / "ui-results.png"), full_page=True)
    print(f"screenshots: {shots}")


def test_bad_upload_shows_one_line_in_the_page(browser, server, tmp_path):
    import numpy as np
    from PIL import Image

    bad = tmp_path / "wrong-size.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(bad)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(server, wait_until="domcontentloaded", timeout=120_000)
    page.locator("#mask-picker button.thumbnail-item").first.wait_for(timeout=120_000)
    page.get_by_role("radio", name="upload").check()
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(1500)
    page.locator("#generate-button").click()
    page.wait_for_selector("#status-error", timeout=60_000)
    text = page.locator("#status-error").inner_text()
    assert text.startswith("Error: uploaded file wrong-size.png: size 40x40, but the model's data set is 64x64"), text
    assert "Traceback" not in page.content()


def test_html_report_loads_every_figure_and_link(browser, quick, tmp_path):
    report = quick / "report.html"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(report.as_uri(), wait_until="load")
    imgs = page.locator("img")
    assert imgs.count() > 0
    assert imgs.evaluate_all("imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length") == 0
    hrefs = page.locator("a[href]").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    for href in hrefs:
        if href.startswith(("#", "http://", "https://", "data:")):
            continue
        assert (report.parent / href.split("#")[0]).exists(), f"broken link {href} in {report}"
    page.screenshot(path=str(_shots(tmp_path) / "report.png"), full_page=True)
