"""cxrcae serve: the JSON API through FastAPI's test client, on a tiny classifier and real X-rays.

The same answers as ``cxrcae predict`` (PNG, JPEG, DICOM), the limits (413, 415, a bounded queue with 503 +
Retry-After), the API key, the page's assets served locally, no patient data in logs or answers.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch import nn

from conftest import FIXTURE_DATA
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import load_model
from cxrcae.infer.prediction import predict
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.checkpoint import read_config, save_checkpoint
from cxrcae.ood.guard import save_guard
from cxrcae.serve import ModelRunner, ServerInfo, binding_warnings, create_app, is_loopback
from cxrcae.serve.server import bind
from cxrcae.serve.uploads import private_copy, sniff_format
from cxrcae.tasks import build_model

NAMES = ["COVID", "NORMAL", "PNEUMONIA"]
SIZE = 32
CARD = "# tiny test classifier\n\nNot a real model.\n"
PATIENT = ("Doe^Jane", "PID-0042-XYZ")
WAIT = 60.0  # generous deadline for a condition to become true (not a timing assertion)
TOL = 1e-4  # the server computes on its own thread, where the CPU kernels may split sums differently


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = {
        "kind": "classifier",
        "head": "dense5",
        "image_size": SIZE,
        "class_names": NAMES,
        "resize_mode": "pad",
    }
    return save_checkpoint(
        build_model(config), tmp_path_factory.mktemp("model") / "tiny-clf", config, card=CARD
    )


@pytest.fixture(scope="module")
def runner(classifier):
    runner = ModelRunner(str(classifier), device="cpu", workers=2, queue_size=20)
    yield runner
    runner.close()


@pytest.fixture
def client(runner):
    with TestClient(create_app(runner)) as client:
        yield client


@pytest.fixture(scope="module")
def xray_files(fixture_rows, tmp_path_factory) -> dict[str, Path]:
    """A real chest X-ray from the shipped set as JPEG (as shipped) and as 8-bit PNG and TIFF copies."""
    row = next(r for r in fixture_rows if r["label"] == "PNEUMONIA")
    jpeg = FIXTURE_DATA / "cxr" / row["path"]
    out = tmp_path_factory.mktemp("xray")
    gray = Image.open(jpeg).convert("L")
    gray.save(out / "xray.png")
    gray.save(out / "xray.tif")
    return {"JPEG": jpeg, "PNG": out / "xray.png", "TIFF": out / "xray.tif"}


@pytest.fixture(scope="module")
def dicom_file(xray_files, tmp_path_factory) -> Path:
    """The same X-ray as a 12-bit DX DICOM with a window and patient identifiers that must never leak."""
    pixels = np.asarray(Image.open(xray_files["PNG"]), dtype=np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "2000", "3600"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    path = tmp_path_factory.mktemp("dicom") / "Doe_Jane_chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _post(client, path: Path, query: str = "", name: str | None = None, **kwargs):
    files = {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}
    return client.post(f"/predict{query}", files=files, **kwargs)


def _expected(path: Path, model) -> dict:
    return predict([path], model, device="cpu")[0].to_dict()


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_raster_upload_answers_what_predict_answers(client, classifier, xray_files, fmt):
    path = xray_files[fmt]
    res = _post(client, path)
    assert res.status_code == 200, res.text
    got, want = res.json(), _expected(path, classifier)
    assert got["input"]["format"] == fmt and got["input"]["bytes"] == path.stat().st_size
    assert got["label"] == want["label"] and got["top_class"] == want["top_class"] in NAMES
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=TOL)
    assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # every other field of predict's row is passed through (the out-of-distribution screen's among them)
    for key in set(want) - {"path", "explanation", "probabilities", "top_k", "probability", "ood_score"}:
        assert got[key] == want[key], key
    config = read_config(classifier)
    assert got["model"] == {"id": "tiny-clf", "version": config["weights_sha256"][:12]}
    assert "path" not in got and "preview_png" not in got and "overlay_png" not in got
    assert res.headers["cache-control"] == "no-store"


def test_raw_body_works_like_a_form(client, classifier, xray_files):
    data = xray_files["JPEG"].read_bytes()
    res = client.post("/predict", content=data, headers={"content-type": "application/octet-stream"})
    assert res.status_code == 200, res.text
    assert res.json()["probabilities"] == pytest.approx(
        _expected(xray_files["JPEG"], classifier)["probabilities"], abs=TOL
    )


def test_dicom_answer_shows_its_window_and_nothing_about_the_patient(client, classifier, dicom_file, caplog):
    caplog.set_level(logging.INFO, logger="cxrcae.serve")
    res = _post(client, dicom_file, "?explain=1&preview=1", name="Doe_Jane_chest.dcm")
    assert res.status_code == 200, res.text
    got = res.json()
    assert got["input"]["format"] == "DICOM"
    dicom = got["input"]["dicom"]
    assert dicom["window"]["center"] == 2000 and dicom["window"]["width"] == 3600
    assert dicom["photometric_interpretation"] == "MONOCHROME2" and dicom["bits_stored"] == 12
    assert "window from the file" in dicom["intensity"]
    assert got["probabilities"] == pytest.approx(_expected(dicom_file, classifier)["probabilities"], abs=TOL)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "predict 200 DICOM" in logged
    for secret in (*PATIENT, "Doe", "Jane", "PID-0042"):
        assert secret not in res.text and secret not in logged


def test_real_cr_dicom_from_pydicom_data(client, classifier):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")  # a real CR chest radiograph, MONOCHROME1, window 15000/30000
    if path is None:
        pytest.skip("pydicom test file RG1_UNCR.dcm unavailable (install pydicom-data)")
    res = _post(client, Path(path), name="scan.txt")  # the name says text: the content decides
    assert res.status_code == 200, res.text
    got = res.json()
    assert got["input"]["format"] == "DICOM"
    assert got["input"]["dicom"]["window"] == {"center": 15000.0, "width": 30000.0, "function": "LINEAR"}
    assert "MONOCHROME1 inverted" in got["input"]["dicom"]["intensity"]
    assert got["probabilities"] == pytest.approx(_expected(Path(path), classifier)["probabilities"], abs=TOL)


def test_explain_adds_an_overlay_the_size_of_the_preview(client, xray_files):
    res = _post(client, xray_files["PNG"], "?explain=1&preview=1")
    assert res.status_code == 200, res.text
    got = res.json()
    overlay, preview = _png(got["overlay_png"]), _png(got["preview_png"])
    source = Image.open(xray_files["PNG"])
    assert overlay.format == preview.format == "PNG"
    assert overlay.size == preview.size == tuple(got["input"]["preview_size"])
    assert max(overlay.size) == min(512, max(source.size))
    assert abs(overlay.size[0] / overlay.size[1] - source.size[0] / source.size[1]) < 0.02  # aspect kept
    rgb = np.asarray(overlay.convert("RGB"), dtype=np.int16)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50  # coloured heat map, not the gray image
    assert preview.mode == "L"
    only_preview = _post(client, xray_files["PNG"], "?preview=1").json()
    assert "overlay_png" not in only_preview and only_preview["preview_png"] == got["preview_png"]


def test_refused_and_flagged_rows_pass_through_with_the_guard(classifier, xray_files, tmp_path):
    """A model with an OOD guard: serve loads it once and answers exactly as predict does."""
    folder = tmp_path / "guarded"
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "README.md"):
        (folder / name).write_bytes((classifier / name).read_bytes())
    torch.manual_seed(0)
    block = {"threshold": 1e-9, "quantile": 0.995, "n_images": 1, "image_size": SIZE, "resize_mode": "pad"}
    save_guard(folder, ConvAutoencoder(CAEEncoder(), CAEDecoder()), block)  # so tight every image is flagged
    runner = ModelRunner(str(folder), device="cpu")
    try:
        with TestClient(create_app(runner)) as client:
            got = _post(client, xray_files["PNG"]).json()
    finally:
        runner.close()
    want = _expected(xray_files["PNG"], folder)
    assert want["out_of_distribution"] is True and want["label"] == "uncertain"  # the guard ran in predict
    for key in ("label", "top_class", "out_of_distribution", "ood_reason", "status"):
        assert got[key] == want[key], key
    assert got["ood_score"] == pytest.approx(want["ood_score"], rel=1e-3)


# ------------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    "name, content",
    [
        ("scan.png", b"this is not an image\n" * 20),
        ("scan.dcm", b"%PDF-1.7\n" + bytes(300)),
        ("scan.jpg", b"PK\x03\x04" + bytes(300)),  # a zip
    ],
)
def test_non_image_is_415_whatever_its_name(client, runner, name, content):
    served = runner.stats()["served"]
    res = client.post("/predict", files={"file": (name, content, "image/png")})
    assert res.status_code == 415
    assert "not a PNG, JPEG, TIFF or DICOM image" in res.json()["detail"]
    assert runner.stats()["served"] == served  # refused before the model


def test_empty_or_fileless_requests_are_400(client):
    assert (
        client.post("/predict", content=b"", headers={"content-type": "application/octet-stream"}).status_code
        == 400
    )
    res = client.post("/predict", data={"note": "no file here"}, files={"other": ("a", b"", "text/plain")})
    assert res.status_code == 400 and "empty upload" in res.json()["detail"]
    res = client.post("/predict", data={"note": "no file here"})
    assert res.status_code == 415  # a urlencoded form is a body like any other: not an image


def test_oversized_upload_is_413_declared_or_streamed(runner, xray_files):
    data = xray_files["PNG"].read_bytes()
    limit = len(data) - 1
    with TestClient(create_app(runner, max_upload=limit)) as client:
        served = runner.stats()["served"]
        declared = client.post("/predict", files={"file": ("x.png", data + bytes(70_000), "image/png")})
        assert declared.status_code == 413 and "too large" in declared.json()["detail"]
        # just over the limit: passes the Content-Length check (form slack), caught on the file itself
        assert client.post("/predict", files={"file": ("x.png", data, "image/png")}).status_code == 413
        # no Content-Length at all (chunked): counted as it streams in
        chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))
        streamed = client.post("/predict", content=iter([*chunks, bytes(70_000)]))
        assert streamed.status_code == 413
        assert runner.stats()["served"] == served
        small = client.post("/predict", files={"file": ("x.png", data[: len(data) // 2], "image/png")})
        assert small.status_code == 422  # within the limit but cut short: the decoder's one-line reason
        assert small.json()["detail"].startswith("cannot read the image:")


class Gate(nn.Module):
    """The tiny classifier behind a gate: forward waits until the test opens it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.cxrcae_config = inner.cxrcae_config
        self.entered = threading.Event()
        self.open = threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.open.wait(WAIT), "the test never opened the gate"
        return self.inner(x)


def _post_in_thread(client, data: bytes, results: list) -> threading.Thread:
    def run():
        res = client.post("/predict", files={"file": ("x.png", data, "image/png")})
        results.append((res.status_code, res.headers.get("retry-after"), res.json()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_answers_503_with_retry_after(classifier, xray_files):
    gate = Gate(load_model(classifier))
    runner = ModelRunner(gate, device="cpu", workers=1, queue_size=1)
    data = xray_files["PNG"].read_bytes()
    try:
        with TestClient(create_app(runner)) as client:
            first: list = []
            thread = _post_in_thread(client, data, first)
            assert gate.entered.wait(WAIT), "the first request never reached the model"
            busy = client.post("/predict", files={"file": ("x.png", data, "image/png")})
            assert busy.status_code == 503
            assert int(busy.headers["retry-after"]) >= 1
            assert "busy" in busy.json()["detail"]
            gate.open.set()
            thread.join(WAIT)
            assert first[0][0] == 200 and first[0][2]["model"]["id"] == "in-memory"
            assert client.post("/predict", files={"file": ("x.png", data, "image/png")}).status_code == 200
    finally:
        gate.open.set()
        runner.close()


def test_twenty_concurrent_requests_past_the_bound_all_get_an_answer(classifier, xray_files):
    """Queue of 5, model held: exactly 5 are admitted and served, 15 are told to retry, none hangs."""
    gate = Gate(load_model(classifier))
    runner = ModelRunner(gate, device="cpu", workers=1, queue_size=5)
    data = xray_files["PNG"].read_bytes()
    results: list = []
    try:
        with TestClient(create_app(runner)) as client:
            threads = [_post_in_thread(client, data, results) for _ in range(20)]
            _wait_until(lambda: runner.stats()["rejected"] == 15, "15 requests refused")
            assert runner.stats()["in_flight"] == 5
            gate.open.set()
            for thread in threads:
                thread.join(WAIT)
    finally:
        gate.open.set()
        runner.close()
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [503] * 15
    assert all(int(retry) >= 1 for status, retry, _ in results if status == 503)
    assert runner.peak == 5 and runner.served == 5 and runner.in_flight == 0


def test_twenty_concurrent_requests_within_the_bound_are_all_served_alike(client, runner, xray_files):
    data = xray_files["PNG"].read_bytes()
    before = runner.stats()
    results: list = []
    threads = [_post_in_thread(client, data, results) for _ in range(20)]
    for thread in threads:
        thread.join(WAIT)
    assert [status for status, _, _ in results] == [200] * 20
    first = results[0][2]["probabilities"]
    assert all(answer["probabilities"] == pytest.approx(first, abs=TOL) for _, _, answer in results)
    after = runner.stats()
    assert after["served"] - before["served"] == 20 and after["rejected"] == before["rejected"]
    assert after["peak"] <= runner.capacity == 20 and after["in_flight"] == 0


def test_uploads_are_deleted_and_private(client, xray_files, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with private_copy(b"\x89PNG\r\n\x1a\n", "PNG") as path:
        assert path.read_bytes() == b"\x89PNG\r\n\x1a\n" and path.name == "upload.png"
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert not path.exists() and list(scratch.iterdir()) == []
    assert _post(client, xray_files["PNG"], "?explain=1").status_code == 200
    assert _post(client, xray_files["JPEG"]).status_code == 200
    assert list(scratch.iterdir()) == []  # nothing left behind after the answers


def test_sniffing_puts_dicom_before_its_tiff_preamble():
    dual = b"II*\x00" + bytes(124) + b"DICM" + bytes(10)  # DICOM preamble holding a TIFF header
    assert sniff_format(dual) == "DICOM"
    assert sniff_format(b"II*\x00" + bytes(200)) == "TIFF"
    assert sniff_format(b"\xff\xd8\xff\xe0" + bytes(10)) == "JPEG"
    assert sniff_format(b"GIF89a" + bytes(200)) is None


# ---------------------------------------------------------------------------------- key, health, model, page


def test_api_key_is_required_on_every_request_when_set(runner, xray_files):
    key = "s3cret-key"
    data = xray_files["PNG"].read_bytes()
    with TestClient(create_app(runner, api_key=key)) as client:
        for path in ("/", "/health", "/model", "/docs", "/openapi.json", "/static/app.js"):
            res = client.get(path)
            assert res.status_code == 401, path
            assert res.headers["www-authenticate"].startswith("Basic")
        assert client.post("/predict", files={"file": ("x.png", data, "image/png")}).status_code == 401
        basic = base64.b64encode(f"anyone:{key}".encode()).decode()
        for headers in (
            {"X-API-Key": key},
            {"Authorization": f"Bearer {key}"},
            {"Authorization": f"Basic {basic}"},
        ):
            assert client.get("/health", headers=headers).status_code == 200, headers
        good = client.post(
            "/predict", files={"file": ("x.png", data, "image/png")}, headers={"X-API-Key": key}
        )
        assert good.status_code == 200
        for wrong in (
            {"X-API-Key": "s3cret"},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Basic !!"},
        ):
            assert client.get("/health", headers=wrong).status_code == 401, wrong


def test_health_and_model(client, runner, classifier):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"]["id"] == "tiny-clf"
    assert health["queue"]["capacity"] == 20 and health["queue"]["workers"] == 2
    assert health["max_upload_bytes"] == 64 * 1024 * 1024
    model = client.get("/model").json()
    assert model["class_names"] == NAMES and model["image_size"] == SIZE and model["resize_mode"] == "pad"
    assert model["card"] == CARD and model["config"] == read_config(classifier)
    assert model["explain"] is True and model["version"] == health["model"]["version"]


def test_page_and_every_asset_are_served_by_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assets = ["static/app.js", "static/app.css", "static/favicon.svg"]
    for asset in assets:
        assert f'"{asset}"' in html
        res = client.get("/" + asset)
        assert res.status_code == 200 and res.content, asset
        text = res.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert "http://" not in text and "https://" not in text, asset
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "https://" not in docs
    urls = re.findall(r"[\"'](/static-offline-docs/[^\"']+)[\"']", docs)
    assert any(u.endswith(".js") for u in urls) and any(u.endswith(".css") for u in urls)
    for url in urls:
        assert client.get(url).status_code == 200, url
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


# ------------------------------------------------------------------------------------------------ server


def test_binding_beyond_loopback_is_warned():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    assert binding_warnings("127.0.0.1", None) == []
    (open_warning,) = binding_warnings("0.0.0.0", None)
    assert "no authentication" in open_warning and "--api-key" in open_warning
    (http_warning,) = binding_warnings("0.0.0.0", "key")
    assert "plain HTTP" in http_warning


def test_a_taken_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CxrcaeError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)


def test_cli_wires_options_env_key_and_warnings(cli, monkeypatch):
    import cxrcae.serve

    seen = {}

    def fake_run_server(model, **kwargs):
        seen.update(kwargs, model=model)
        warnings = binding_warnings(kwargs["host"], kwargs["api_key"])
        info = ServerInfo("http://0.0.0.0:8123", "bundled:default", "abc", "cpu", 1, 8, False, warnings)
        kwargs["on_ready"](info)

    monkeypatch.setattr(cxrcae.serve, "run_server", fake_run_server)
    result = cli("serve", "--host", "0.0.0.0", "--port", "8123", "--max-upload-mb", "2", "--queue", "3")
    assert result.exit_code == 0, result.output
    assert "no authentication" in result.output and "Open http://0.0.0.0:8123/" in result.output
    assert seen["model"] is None and seen["port"] == 8123 and seen["queue_size"] == 3
    assert seen["max_upload"] == 2 * 1024 * 1024 and seen["api_key"] is None
    monkeypatch.setenv("CXRCAE_API_KEY", "from-env")
    assert cli("serve").exit_code == 0 and seen["api_key"] == "from-env" and seen["host"] == "127.0.0.1"


def test_missing_extra_is_a_one_line_install_hint():
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from cxrcae.cli.app import main; sys.argv = ['cxrcae', 'serve']; main()"
    )
    env = {**os.environ, "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "cxrcae[serve]"' in lines[0] and "Traceback" not in res.stderr


def test_launcher_reports_a_server_that_does_not_start(tmp_path):
    from cxrcae.serve.launch import ServerStartError, serve_in_subprocess

    with pytest.raises(ServerStartError, match="did not start") as caught:
        with serve_in_subprocess("--model", str(tmp_path / "missing"), timeout=120):
            pytest.fail("a server without a model must not come up")
    assert "missing" in str(caught.value)  # the server's own one-line error travels with it
