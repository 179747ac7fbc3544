"""cxrcae serve end to end: the real CLI and uvicorn on 127.0.0.1, the page driven in headless Chromium.

The server is ``python -m cxrcae serve --port 0`` with the bundled model (what a user starts); the browser is
Debian's ``chromium`` through Playwright (``executable_path``), or Playwright's own Chromium where that is
installed. The test skips only when no Chromium can be launched at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cxrcae.bundled import sample_files
from cxrcae.serve.launch import ServerStartError, serve_in_subprocess

playwright = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)

START_TIMEOUT = 180.0  # loading torch and the model on a busy 2-core machine; a deadline, not a measurement
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _launch(p):
    """Debian's Chromium (or any Chrome on PATH, or $CXRCAE_CHROMIUM), else Playwright's own download."""
    candidates = [os.environ.get("CXRCAE_CHROMIUM"), *(shutil.which(name) for name in BROWSERS)]
    tried = []
    for exe in filter(None, candidates):
        try:
            return p.chromium.launch(executable_path=exe, headless=True)
        except playwright.Error as exc:
            tried.append(f"{exe}: {str(exc).splitlines()[0]}")
    try:
        return p.chromium.launch(headless=True)
    except playwright.Error as exc:
        tried.append(f"playwright's chromium: {str(exc).splitlines()[0]}")
    pytest.skip("no Chromium to drive the page (apt-get install chromium): " + "; ".join(tried))


@pytest.fixture(scope="module")
def server():
    """``cxrcae serve --port 0``: its URL once /health answers; stopped with Ctrl-C (SIGINT) afterwards."""
    try:
        with serve_in_subprocess(timeout=START_TIMEOUT, env={"CXRCAE_PROBE": "off"}) as url:
            yield url
    except ServerStartError as exc:
        pytest.fail(str(exc))


def _dicom(path: Path, source: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(Image.open(source).convert("L"), dtype=np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "2048", "4000"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_page_shows_the_prediction_and_the_heat_map(server, tmp_path):
    sample = sample_files()[0]
    expected = httpx.post(f"{server}/predict", files={"file": (sample.name, sample.read_bytes())}, timeout=60)
    assert expected.status_code == 200, expected.text
    label, top = expected.json()["label"], expected.json()["top_class"]
    dicom = _dicom(tmp_path / "scan", sample)  # no extension: recognised by content

    with playwright.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            elsewhere, problems = [], []
            page.on(
                "request", lambda r: None if r.url.startswith((server, "data:")) else elsewhere.append(r.url)
            )
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(f"{server}/")
            playwright.expect(page.locator("#model-name")).to_contain_text("bundled:default", timeout=30_000)

            # pick a file: the answer, its bars and the overlay appear
            page.set_input_files("#file", str(sample))
            playwright.expect(page.locator("#result")).to_be_visible(timeout=60_000)
            playwright.expect(page.locator("#label")).to_have_text(label)
            assert page.locator("#bars li").count() == 3
            assert page.locator(f'#bars li.top[data-class="{top}"]').count() == 1
            overlay = page.locator("#overlay")
            playwright.expect(overlay).to_be_visible()
            page.wait_for_function("() => document.getElementById('overlay').naturalWidth > 0")
            size = page.evaluate(
                "() => ['overlay', 'preview', 'preview'].map((id, i) => "
                "document.getElementById(id)[i < 2 ? 'naturalWidth' : 'naturalHeight'])"
            )
            assert size[0] == size[1] > 0 and size[2] > 0

            # the slider sets the overlay's opacity
            page.locator("#opacity").fill("30")
            assert (
                page.evaluate("() => getComputedStyle(document.getElementById('overlay')).opacity") == "0.3"
            )
            playwright.expect(page.locator("#opacity-value")).to_have_text("30%")

            # drop a DICOM on the page: its window settings are shown
            data = dicom.read_bytes()
            page.evaluate(
                """([bytes, name]) => {
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([new Uint8Array(bytes)], name));
                    document.getElementById("drop").dispatchEvent(
                        new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
                }""",
                [list(data), dicom.name],
            )
            details = page.locator("#details")
            playwright.expect(details).to_contain_text("DICOM", timeout=60_000)
            playwright.expect(details).to_contain_text("centre 2048, width 4000")
            playwright.expect(page.locator("#status")).to_contain_text("answered")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert elsewhere == [], f"the page loaded something from elsewhere: {elsewhere}"
    assert problems == [], problems
