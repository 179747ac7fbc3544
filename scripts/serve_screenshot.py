"""The docs' screenshot of ``cxrcae serve`` (docs/assets/serve-page.png): the page after an X-ray was dropped.

    python scripts/serve_screenshot.py IMAGE OUT.png [--opacity 60] [--model M] [--chromium /usr/bin/chromium]

Starts the real server (``scripts/bench_serve.py``'s ``start_server``, bundled model unless ``--model``),
opens the page in headless Chromium through Playwright, picks IMAGE, sets the heat-map opacity and saves a
PNG of the page (palette-quantised, so it stays a few hundred KB).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from bench_serve import start_server
from PIL import Image
from playwright.sync_api import expect, sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--opacity", type=int, default=60)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=820)
    args = parser.parse_args()
    serve_args = ["--model", args.model] if args.model else []
    with start_server(*serve_args) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(f"{url}/")
        expect(page.locator("#model-name")).to_contain_text("model ", timeout=30_000)
        page.set_input_files("#file", str(args.image))
        expect(page.locator("#result")).to_be_visible(timeout=120_000)
        page.wait_for_function("() => document.getElementById('overlay').naturalWidth > 0")
        page.locator("#opacity").fill(str(args.opacity))
        shot = page.screenshot(full_page=False)
        browser.close()
    image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
