"""resize_xray modes, load_for_model's model-input contract, pixel_hash equalities, hash_files' pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrcae.errors import CxrcaeError, ImageLoadError
from cxrcae.io import FileHashes, hash_files, load_for_model, load_xray, pixel_hash, resize_xray
from cxrcae.io.hashing import failure_reason


@pytest.fixture
def wide() -> np.ndarray:
    """A 40x80 image, white everywhere: letterboxing must show up as black rows."""
    return np.ones((40, 80), dtype=np.float32)


def test_stretch_fills_square(wide):
    out = resize_xray(wide, 32, "stretch")
    assert out.shape == (32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_pad_keeps_aspect_with_black_letterbox(wide):
    out = resize_xray(wide, 32, "pad")
    assert out.shape == (32, 32)
    assert np.all(out[:8] == 0) and np.all(out[24:] == 0)
    np.testing.assert_allclose(out[8:24], 1.0, atol=1e-6)
    tall = resize_xray(wide.T.copy(), 32, "pad")
    assert np.all(tall[:, :8] == 0) and np.all(tall[:, 24:] == 0)


def test_resize_is_antialiased():
    stripes = np.zeros((256, 256), dtype=np.float32)
    stripes[:, ::2] = 1.0  # one-pixel stripes alias to solid black or white without antialiasing
    out = resize_xray(stripes, 32)
    np.testing.assert_allclose(out, 0.5, atol=0.02)


def test_resize_keeps_range_and_upscales():
    img = np.zeros((10, 10), dtype=np.float32)
    img[3:7, 3:7] = 1.0  # hard edges: bicubic overshoot must be clipped
    out = resize_xray(img, 64, "stretch")
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.shape == (64, 64)


@pytest.mark.parametrize(("args", "match"), [((16, "crop"), "resize mode"), ((0, "pad"), "positive")])
def test_resize_invalid(args, match):
    with pytest.raises(CxrcaeError, match=match):
        resize_xray(np.zeros((4, 4), np.float32), *args)


def test_load_for_model(tmp_path):
    arr = (np.random.default_rng(0).random((30, 50)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    for mode in ("stretch", "pad"):
        out = load_for_model(tmp_path / "x.png", 24, mode)
        assert out.shape == (3, 24, 24) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        np.testing.assert_array_equal(out[0], out[1])
        np.testing.assert_array_equal(out[0], out[2])
        np.testing.assert_array_equal(out[0], resize_xray(load_xray(tmp_path / "x.png"), 24, mode))
        out[0, 0, 0] = 5.0  # channels are real copies, not views of one buffer
        assert out[1, 0, 0] != 5.0
    with pytest.raises(CxrcaeError, match="resize mode"):
        load_for_model(tmp_path / "x.png", 24, "squash")
    with pytest.raises(ImageLoadError, match="no such file"):
        load_for_model(tmp_path / "missing.png", 24)


def test_pixel_hash_same_pixels_across_formats(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    for stem, arr in (("g", gray), ("c", rgb)):
        for ext in ("png", "tif", "bmp"):
            Image.fromarray(arr).save(tmp_path / f"{stem}.{ext}")
        hashes = {pixel_hash(tmp_path / f"{stem}.{ext}") for ext in ("png", "tif", "bmp")}
        assert len(hashes) == 1 and len(next(iter(hashes))) == 64
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "g_as_rgb.png")
    assert pixel_hash(tmp_path / "g_as_rgb.png") == pixel_hash(tmp_path / "g.png")
    img16 = rng.integers(0, 65536, (17, 23), dtype=np.uint16)
    Image.fromarray(img16).save(tmp_path / "w.png")
    Image.fromarray(img16).save(tmp_path / "w.tif")
    assert pixel_hash(tmp_path / "w.png") == pixel_hash(tmp_path / "w.tif")


def test_pixel_hash_differs(tmp_path):
    gray = np.random.default_rng(4).integers(0, 255, (16, 16), dtype=np.uint8)
    variants = {
        "base": gray,
        "one_pixel": np.where(np.arange(gray.size).reshape(gray.shape) == 0, gray + 1, gray).astype(np.uint8),
        "transposed": gray.T.copy(),
        "reshaped": gray.reshape(8, 32),  # same bytes, other shape
        "sixteen_bit": gray.astype(np.uint16),  # same values, other precision
    }
    hashes = {}
    for name, arr in variants.items():
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        hashes[name] = pixel_hash(tmp_path / f"{name}.png")
    assert len(set(hashes.values())) == len(variants)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert pixel_hash(tmp_path / "opaque.png") == hashes["base"]  # fully opaque alpha carries nothing
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holed.png")
    assert pixel_hash(tmp_path / "holed.png") != hashes["base"]


def test_pixel_hash_lossy_jpeg_is_not_png(tmp_path):
    gray = np.random.default_rng(5).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(gray).save(tmp_path / "a.jpg", quality=75)
    assert pixel_hash(tmp_path / "a.png") != pixel_hash(tmp_path / "a.jpg")
    with pytest.raises(ImageLoadError, match="empty file"):
        (tmp_path / "e.png").write_bytes(b"")
        pixel_hash(tmp_path / "e.png")


def test_hash_files_hashes_each_distinct_path_once_and_collects_failures(tmp_path):
    rng = np.random.default_rng(6)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (6, 9), dtype=np.uint8)).save(paths[-1])
    broken, missing = tmp_path / "broken.png", tmp_path / "missing.png"
    broken.write_bytes(b"")
    listed = [paths[3], broken, *paths, missing, paths[0]]  # repeats are hashed once
    calls: list[tuple] = []
    result = hash_files(listed, workers=3, progress=lambda *a: calls.append(a))
    assert isinstance(result, FileHashes)
    assert list(result.hashes) == [
        paths[3],
        *(p for p in paths if p != paths[3]),
    ]  # input order, not threads'
    assert result.hashes == {p: pixel_hash(p) for p in paths}
    assert result.errors == {broken: "empty file", missing: "no such file"}
    assert result.error_list() == [(broken, "empty file"), (missing, "no such file")]
    assert calls[0] == ("hashing pixels", 0, 7) and calls[-1] == ("hashing pixels", 7, 7, "2 unreadable")
    assert len(calls) == 8

    seen: list[Path] = []

    def size(path: Path) -> int:
        seen.append(path)
        return path.stat().st_size

    sizes = hash_files([*paths, paths[1]], size, workers=2, task="measuring")
    assert sorted(seen) == sorted(paths) and sizes.hashes == {p: p.stat().st_size for p in paths}
    assert hash_files([]) == FileHashes()

    def bug(path: Path) -> int:
        raise RuntimeError("a bug, not a bad file")

    with pytest.raises(RuntimeError, match="a bug"):
        hash_files(paths[:1], bug)


def test_failure_reason():
    assert failure_reason(ImageLoadError("x.png", "truncated image")) == "truncated image"
    assert failure_reason(CxrcaeError("no reason attribute")) == "no reason attribute"
    assert failure_reason(ValueError("bad value")) == "ValueError: bad value"


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    size=st.integers(1, 48),
    mode=st.sampled_from(["stretch", "pad"]),
    seed=st.integers(0, 2**16),
)
def test_resize_contract_any_shape(h, w, size, mode, seed):
    img = np.random.default_rng(seed).random((h, w), dtype=np.float32)
    out = resize_xray(img, size, mode)
    assert out.shape == (size, size) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
