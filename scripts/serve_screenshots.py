"""Screenshots of the web UI for the README and docs/serve.md: `latentdiff serve` with the pretrained
Fashion-MNIST model, driven by headless Chromium (Playwright + Debian's chromium).

    python scripts/serve_screenshots.py          # writes docs/img/serve-*.png
"""

import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from latentdiff.serve.load import running_server

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, running_server("pretrained:fashion-mnist", Path(tmp) / "out") as (
            url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 720})
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.select_option("#class", "7")
        page.fill("#n", "8")
        page.fill("#steps", "20")
        page.fill("#seed", "3")
        page.click("#submit")
        page.wait_for_function("document.querySelectorAll('#result img').length === 8", timeout=120_000)
        page.locator("#gallery img").nth(2).click()
        page.screenshot(path=str(IMG / "serve-generate.png"))
        page.click("#use-input")
        page.check("input[value=inpaint]")
        page.select_option("#class", "5")
        page.wait_for_timeout(300)
        box = page.locator("#mask-canvas").bounding_box()
        page.mouse.move(box["x"] + 60, box["y"] + 150)
        page.mouse.down()
        page.mouse.move(box["x"] + 220, box["y"] + 150, steps=12)
        page.mouse.move(box["x"] + 220, box["y"] + 250, steps=12)
        page.mouse.up()
        page.click("#submit")
        page.wait_for_function("document.querySelectorAll('#result img').length === 1", timeout=120_000)
        page.locator("#gallery img").first.click()
        page.screenshot(path=str(IMG / "serve-inpaint.png"))
        page.check("input[value=interpolate]")
        page.select_option("#class", "9")
        page.click("#submit")
        page.wait_for_function("document.querySelectorAll('#result img').length === 8", timeout=120_000)
        page.screenshot(path=str(IMG / "serve-interpolate.png"))
        browser.close()
    if outside:
        sys.exit(f"the page reached outside the server: {outside}")
    print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in sorted(IMG.glob('serve-*.png')))}")


if __name__ == "__main__":
    main()
