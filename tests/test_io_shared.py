"""The real chest X-rays: every published original and a fixed sample of the re-encoded set must decode."""

from __future__ import annotations

import csv
import random

import numpy as np

from conftest import HAVE_SHARED
from cxrcae.io import find_images, load_for_model, load_xray


def test_all_originals_load(shared_data):
    root = shared_data / "originals"
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (40 if HAVE_SHARED else 9)
    for row in rows:
        path = root / row["path"]
        img = load_xray(path)
        assert img.dtype == np.float32 and img.ndim == 2, path
        assert min(img.shape) >= 64 and 0.0 <= img.min() and img.max() <= 1.0, path
        assert img.max() - img.min() > 0.2, path  # a real radiograph, not a blank decode
        small = load_xray(path, target_size=224)
        assert min(small.shape) >= min(224, *img.shape), path
        assert abs(small.mean() - img.mean()) < 0.03, path  # the draft path sees the same image


def test_reencoded_sample_loads(shared_data, shared_manifest_rows):
    rows = random.Random(0).sample(shared_manifest_rows, 300)
    for row in rows:
        path = shared_data / "cxr" / row["path"]
        img = load_xray(path)
        assert img.dtype == np.float32 and max(img.shape) <= 256, path
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.02, path
    x = load_for_model(shared_data / "cxr" / rows[0]["path"], 64, "pad")
    assert x.shape == (3, 64, 64) and 0.0 <= x.min() and x.max() <= 1.0


def test_find_images_on_originals(shared_data):
    files, skipped = find_images([shared_data / "originals"])
    assert len(files) == (40 if HAVE_SHARED else 9)
    assert [(p.name, r) for p, r in skipped] == [("manifest.csv", "not an image file (.csv)")]
