"""load_xray on generated raster files: every PNG/JPEG/TIFF/BMP mode, orientation, bomb guard, bad input."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from PIL import Image

import cxrcae.io.decode as decode_module
from cxrcae.errors import CxrcaeError, ImageLoadError
from cxrcae.io import DEFAULT_MAX_PIXELS, load_xray

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture
def gray8() -> np.ndarray:
    return (np.random.default_rng(0).random((24, 36)) * 255).astype(np.uint8)


def _save(tmp_path, arr_or_img, name, **kw):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    path = tmp_path / name
    img.save(path, **kw)
    return path


def _check(out: np.ndarray, shape):
    assert out.dtype == np.float32 and out.shape == shape
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", ["g.png", "g.tif", "g.bmp"])
def test_lossless_gray8_exact(tmp_path, gray8, name):
    out = load_xray(_save(tmp_path, gray8, name))
    _check(out, gray8.shape)
    np.testing.assert_allclose(out, gray8 / 255.0, atol=1e-6)


def test_png_16bit_keeps_precision(tmp_path):
    arr = np.random.default_rng(1).integers(0, 65536, (20, 30), dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 1000, 1001  # neighbours an 8-bit path would merge
    for name in ("g16.png", "g16.tif"):
        out = load_xray(_save(tmp_path, arr, name))
        _check(out, arr.shape)
        np.testing.assert_allclose(out, arr / 65535.0, atol=1e-7)
        assert out[0, 1] > out[0, 0]


def test_png_rgb_becomes_luminance(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    out = load_xray(_save(tmp_path, rgb, "c.png"))
    _check(out, (16, 20))
    np.testing.assert_allclose(out, rgb @ LUMA / 255.0, atol=1e-5)


def test_gray_stored_as_rgb_equals_gray(tmp_path, gray8):
    rgb = np.repeat(gray8[..., None], 3, axis=2)
    np.testing.assert_array_equal(
        load_xray(_save(tmp_path, rgb, "c.png")), load_xray(_save(tmp_path, gray8, "g.png"))
    )


def test_alpha_opaque_is_ignored_and_transparent_is_black(tmp_path, gray8):
    la = np.stack([gray8, np.full_like(gray8, 255)], axis=-1)
    np.testing.assert_allclose(
        load_xray(_save(tmp_path, Image.fromarray(la, "LA"), "la.png")), gray8 / 255, atol=1e-6
    )
    rgba = np.stack([gray8, gray8, gray8, np.full_like(gray8, 255)], axis=-1)
    rgba[:, :10, 3] = 0
    out = load_xray(_save(tmp_path, rgba, "rgba.png"))
    assert np.all(out[:, :10] == 0)
    np.testing.assert_allclose(out[:, 10:], gray8[:, 10:] / 255, atol=1e-6)


def test_palette_png(tmp_path, gray8):
    img = Image.fromarray(gray8).convert("P")
    path = _save(tmp_path, img, "p.png")
    assert Image.open(path).mode == "P"
    expected = np.asarray(img.convert("L")) / 255.0
    np.testing.assert_allclose(load_xray(path), expected, atol=1e-6)


def test_int32_and_float_tiff_minmax(tmp_path):
    arr = np.linspace(-5000, 200000, 12 * 10).reshape(12, 10).astype(np.int32)
    out = load_xray(_save(tmp_path, Image.fromarray(arr, "I"), "i.tif"))
    assert out.min() == 0.0 and out.max() == 1.0
    flt = np.linspace(0.0, 1.0, 60, dtype=np.float32).reshape(6, 10) * 0.5
    np.testing.assert_allclose(load_xray(_save(tmp_path, Image.fromarray(flt, "F"), "f.tif")), flt, atol=1e-7)
    wide = flt * 1000 - 20
    np.testing.assert_allclose(
        load_xray(_save(tmp_path, Image.fromarray(wide, "F"), "w.tif")), flt / 0.5, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes(tmp_path, mode):
    base = np.zeros((32, 48), dtype=np.uint8)
    base[:, 24:] = 200
    img = Image.fromarray(base).convert(mode)
    path = _save(tmp_path, img, f"j_{mode}.jpg", quality=95)
    assert Image.open(path).mode == mode
    out = load_xray(path)
    _check(out, (32, 48))
    assert out[:, :20].mean() < 0.05 and abs(out[:, 28:].mean() - 200 / 255) < 0.03


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
def test_jpeg_exif_orientation_applied(tmp_path, orientation, k):
    arr = np.zeros((32, 48), dtype=np.uint8)
    arr[:16, :16] = 255  # bright block top-left: any rotation or flip moves it
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path, arr, "o.jpg", quality=98, exif=exif)
    out = load_xray(path)
    expected = np.rot90(arr, k) / 255.0
    assert out.shape == expected.shape
    assert np.abs(out - expected).mean() < 0.02


def test_jpeg_draft_decodes_smaller_but_not_below_target(tmp_path):
    arr = (np.indices((800, 1200)).sum(0) % 256).astype(np.uint8)
    path = _save(tmp_path, arr, "big.jpg", quality=90)
    assert load_xray(path).shape == (800, 1200)
    small = load_xray(path, target_size=100)
    assert min(small.shape) >= 100 and small.shape[0] < 800
    assert small.shape[1] * 800 == small.shape[0] * 1200  # aspect kept
    png = load_xray(_save(tmp_path, arr, "big.png"), target_size=100)  # no DCT draft: box-reduced, >= 3x
    assert png.shape == (400, 600)


def _bmp_header(width: int, height: int) -> bytes:
    """A BMP that claims a huge size but holds no pixels: what a decompression bomb looks like to a reader."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


def test_pixel_limit(tmp_path, gray8, monkeypatch):
    path = _save(tmp_path, gray8, "g.png")
    with pytest.raises(ImageLoadError, match="too large"):
        load_xray(path, max_pixels=100)
    monkeypatch.setenv("CXRCAE_MAX_PIXELS", "100")
    with pytest.raises(ImageLoadError, match="CXRCAE_MAX_PIXELS"):
        load_xray(path)
    assert load_xray(path, max_pixels=None).shape == gray8.shape  # explicit argument wins over env
    monkeypatch.setenv("CXRCAE_MAX_PIXELS", "none")
    assert load_xray(path).shape == gray8.shape
    monkeypatch.setenv("CXRCAE_MAX_PIXELS", "lots")
    with pytest.raises(CxrcaeError, match="CXRCAE_MAX_PIXELS"):
        load_xray(path)
    assert int(DEFAULT_MAX_PIXELS) == 100_000_000


def test_bomb_header_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.bmp"
    bomb.write_bytes(_bmp_header(30000, 30000))
    with pytest.raises(ImageLoadError, match="too large"):
        load_xray(bomb)
    with pytest.raises(ImageLoadError, match="too large"):  # PIL's own DecompressionBombError, converted
        load_xray(bomb, max_pixels=None)


def test_bad_inputs(tmp_path, gray8):
    png = _save(tmp_path, gray8, "g.png").read_bytes()
    jpg = _save(tmp_path, gray8, "g.jpg").read_bytes()
    cases = {
        "empty.png": (b"", "empty file"),
        "text.png": (b"patient,label\n1,COVID\n", "not an image or unsupported format"),
        "cut.png": (png[: len(png) // 2], "truncated image"),
        "cut.jpg": (jpg[: len(jpg) // 2], "truncated image"),
        "header_only.png": (png[:40], "truncated image"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageLoadError) as info:
            load_xray(path)
        assert info.value.reason == reason, name
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_xray(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_xray(tmp_path)


def test_permission_denied(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode_module, "open", denied, raising=False)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_xray(tmp_path / "x.png")


def test_pil_bomb_limit_defers_to_ours(tmp_path, gray8, monkeypatch):
    path = _save(tmp_path, gray8, "g.png")  # 864 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # PIL would warn: ours (100 MP) decides, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_xray(path).shape == gray8.shape
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL raises DecompressionBombError above 2x
    with pytest.raises(ImageLoadError, match="too large"):
        load_xray(path)
