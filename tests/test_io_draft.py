"""Decoding shortcuts that keep the pixel contract: JPEG drafting with a margin, gray RGB seen in Pillow."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrcae.io import load_for_model, load_xray, resize_xray
from cxrcae.io.decode import decode_native
from cxrcae.io.native import collapse_gray
from cxrcae.io.raster import DRAFT_MARGIN, REDUCE_MARGIN


def _xray_like(h: int, w: int) -> np.ndarray:
    """Smooth anatomy-like shading plus fine texture, so a careless downscale would show."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(0)
    arr = 120 + 80 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 12, (h, w))
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_draft_keeps_twice_the_target_and_the_model_input_close(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_xray_like(1000, 1600)).save(path, quality=92)
    small = load_xray(path, target_size=100)
    assert min(small.shape) >= DRAFT_MARGIN * 100 and small.shape[0] < 1000  # drafted, but not too far
    full = resize_xray(load_xray(path), 100)
    drafted = load_for_model(path, 100)
    assert drafted.shape == (3, 100, 100) and drafted.dtype == np.float32
    assert np.abs(drafted[0] - full).max() < 0.05 and np.abs(drafted[0] - full).mean() < 0.005
    assert load_xray(path, target_size=400).shape == (1000, 1600)  # too small to draft at all


def test_gray_saved_as_rgb_is_collapsed_exactly_and_colour_is_kept(tmp_path):
    gray = _xray_like(300, 200)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "gray.png")
    native, _ = decode_native(tmp_path / "gray.png")
    assert native.pixels.shape == (300, 200) and native.pixels.dtype == np.uint8
    assert np.array_equal(native.pixels, gray)

    colour = np.stack([gray, gray, gray], axis=-1)
    colour[150, 100, 2] ^= 1  # one blue value off: no longer gray
    Image.fromarray(colour).save(tmp_path / "colour.png")
    native, _ = decode_native(tmp_path / "colour.png")
    assert native.pixels.shape == (300, 200, 3) and np.array_equal(native.pixels, collapse_gray(colour))


def test_large_png_is_box_reduced_before_the_resize_but_16_bit_is_not(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_xray_like(1400, 2000)).save(path)
    small = load_xray(path, target_size=100)
    assert REDUCE_MARGIN * 100 <= min(small.shape) < 2 * REDUCE_MARGIN * 100
    assert small.shape[1] / small.shape[0] == pytest.approx(2000 / 1400, rel=0.01)
    full = resize_xray(load_xray(path), 100)
    assert np.abs(load_for_model(path, 100)[0] - full).mean() < 0.005

    deep = tmp_path / "deep.png"
    Image.fromarray(_xray_like(1400, 2000).astype(np.uint16) * 257).save(deep)
    assert load_xray(deep, target_size=100).shape == (1400, 2000)  # only 8-bit gray or RGB is averaged
