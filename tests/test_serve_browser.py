"""The web UI in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

The fast test generates from the UI, reads a result's settings back from its PNG, and checks that the
page made no request outside the server; the others paint a mask and inpaint, and cancel a job.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import build_tiny_model

from latentdiff.serve.load import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium package")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("ui-model"), num_train_steps=1000)
    with running_server(model, tmp_path_factory.mktemp("ui-out")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                   executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": 1200, "height": 760})
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield page
    outside = [u for u in page.requests if not u.startswith((server + "/", "data:", "blob:"))]
    assert not outside, f"the page reached outside the server: {outside}"
    page.close()


def test_generate_from_the_ui(page, server, tmp_path):
    assert page.locator("#error").is_hidden()
    page.select_option("#class", "1")
    page.fill("#n", "4")
    page.fill("#steps", "20")
    page.fill("#seed", "42")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result img').length === 4", timeout=60_000)
    assert page.locator("#status").inner_text() == "done"
    assert page.locator("#preview").is_visible()
    page.locator("#gallery img").first.click()
    settings = page.locator("#settings").inner_text()  # read back from the PNG's text chunk
    assert "seed: 42" in settings and "labels: 1" in settings and "steps: 20" in settings
    page.check("#random-seed")
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "42" and not page.is_checked("#random-seed")
    page.screenshot(path=str(tmp_path / "ui.png"))  # docs/img's screenshots: scripts/serve_screenshots.py
    # an API error is shown, and the page stays usable
    page.fill("#steps", "5000")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "steps" in page.locator("#error").inner_text()
    page.fill("#steps", "5")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#status').textContent === 'done' && "
                           "document.querySelector('#error').hidden", timeout=60_000)


def test_paint_a_mask_and_inpaint(page, tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    img = np.full((28, 28), 200, np.uint8)
    Image.fromarray(img).save(src)
    page.check("input[value=inpaint]")
    page.set_input_files("#image-file", str(src))
    page.fill("#steps", "20")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 140)
    page.mouse.down()
    page.mouse.move(box["x"] + 180, box["y"] + 140, steps=8)
    page.mouse.up()
    page.mouse.move(box["x"] + 40, box["y"] + 40)  # a stray stroke, then undo
    page.mouse.down()
    page.mouse.up()
    page.click("#undo")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result img').length === 1", timeout=60_000)
    page.screenshot(path=str(tmp_path / "inpaint.png"))
    page.locator("#result img").first.click()
    assert "kind: \"inpaint\"" in page.locator("#settings").inner_text()


def test_cancel_from_the_ui(page):
    page.fill("#steps", "1000")
    page.fill("#n", "8")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('step')", timeout=60_000)
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#status').textContent === 'cancelled'", timeout=30_000)


def test_img2img_upload_and_interpolation_animation(page, tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.tile(np.arange(0, 252, 9, dtype=np.uint8), (28, 1))).save(src)
    page.check("input[value=edit]")
    page.set_input_files("#image-file", str(src))
    page.fill("#steps", "10")
    page.fill("#strength", "0.5")
    page.wait_for_timeout(200)  # the FileReader
    page.click("#submit")
    page.wait_for_function("document.querySelector('#status').textContent === 'done'", timeout=60_000)
    page.locator("#result img").first.click()
    assert 'kind: "edit"' in page.locator("#settings").inner_text()
    assert "strength: 0.5" in page.locator("#settings").inner_text()
    page.check("input[value=interpolate]")
    page.fill("#frames", "4")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result img').length === 4", timeout=60_000)
    anim = page.locator("#anim")
    first = anim.get_attribute("src")
    page.wait_for_function(f"document.querySelector('#anim').src !== {first!r}", timeout=5_000)  # it plays


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory):
    with running_server("pretrained:spoken-digits", tmp_path_factory.mktemp("ui-audio-out")) as (url, _):
        yield url


def test_audio_model_plays_in_the_browser(browser, audio_server, tmp_path):
    page = browser.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(audio_server + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert page.evaluate("document.body.dataset.modality") == "audio"
    page.fill("#n", "2")
    page.fill("#steps", "2")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result figure.sound audio').length === 2", timeout=120_000)
    assert page.locator("#result figure.sound img").count() == 2  # each sound with its spectrogram
    durations = page.evaluate("""Promise.all([...document.querySelectorAll('#result audio')].map((a) =>
        new Promise((ok) => { if (a.readyState >= 1) ok(a.duration);
                              else a.addEventListener('loadedmetadata', () => ok(a.duration)); })))""")
    assert durations == [pytest.approx(1.0, abs=0.01)] * 2  # 16000 samples at 16 kHz
    assert all(page.locator("#result audio").nth(i).get_attribute("controls") is not None for i in range(2))
    page.screenshot(path=str(tmp_path / "audio.png"))
    outside = [u for u in page.requests if not u.startswith((audio_server + "/", "data:", "blob:"))]
    assert not outside and sum("/v1/audio/" in u for u in page.requests) == 2
    page.close()
