"""Records from folders and CSVs, the portable splits CSV, fingerprints and the torch dataset."""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae.data import (
    Record,
    XrayDataset,
    class_names,
    dataset_fingerprint,
    load_records,
    write_records,
)
from cxrcae.data.dataset import SafeDataset, Unreadable, collate_with_errors, failure_reason
from cxrcae.errors import DataError, ImageLoadError


def _png(path: Path, value: int = 0, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- class folders ----------------------------------------------------------------------------------------


def test_class_folder_layout(tiny_labelled_folder):
    records = load_records(tiny_labelled_folder)
    assert len(records) == 90
    assert class_names(records) == ["COVID", "NORMAL", "PNEUMONIA"]
    for r in records:
        assert r.path.is_absolute() and r.path.is_file()
        assert r.label == r.path.parent.name
        assert r.patient_id is None and r.split is None
    # symlinks are kept (not resolved), so paths still show the user's layout
    assert all(tiny_labelled_folder in r.path.parents for r in records)


def test_folder_nested_hidden_and_unlabeled(tmp_path):
    root = tmp_path / "data"
    _png(root / "COVID" / "a.png", 1)
    _png(root / "COVID" / "site2" / "deep" / "b.png", 2)
    _png(root / "NORMAL" / "c.png", 3)
    _png(root / "NORMAL" / ".hidden.png", 4)
    _png(root / ".cache" / "d.png", 5)
    _png(root / "UNLABELED" / "e.png", 6)
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    records = load_records(root)
    names = {r.path.name: r.label for r in records}
    assert names == {"a.png": "COVID", "b.png": "COVID", "c.png": "NORMAL", "e.png": None}
    assert class_names(records) == ["COVID", "NORMAL"]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_records(tmp_path / "empty")
    flat = tmp_path / "flat"
    _png(flat / "x.png")
    _png(flat / "COVID" / "y.png")
    with pytest.raises(DataError, match=r"1 image\(s\) directly in the dataset root.*x\.png"):
        load_records(flat)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="expected a folder of images or a manifest"):
        load_records(tmp_path / "weights.bin")


def test_unlabeled_folder_is_recursive(tmp_path):
    root = tmp_path / "pretrain"
    _png(root / "x.png", 1)
    _png(root / "a" / "b" / "y.png", 2)
    _png(root / ".trash" / "z.png", 3)
    records = load_records(root, labeled=False)
    assert sorted(r.path.name for r in records) == ["x.png", "y.png"]
    assert all(r.label is None for r in records)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_records(tmp_path / "nothing", labeled=False)


# --- manifest and splits CSVs -----------------------------------------------------------------------------


def test_shared_manifest(shared_data, shared_manifest_rows):
    from conftest import HAVE_SHARED

    records = load_records(shared_data / "cxr" / "manifest.csv")
    rows = shared_manifest_rows
    assert len(records) == len(rows) == (8559 if HAVE_SHARED else 374)
    assert class_names(records) == ["COVID", "NORMAL", "PNEUMONIA"]
    assert sum(r.label is None for r in records) == (48 if HAVE_SHARED else 23)
    first = records[0]
    assert first.path == shared_data.absolute() / "cxr" / rows[0]["path"]
    assert (first.label, first.patient_id, first.source) == (
        rows[0]["label"],
        rows[0]["patient_id"],
        "ieee8023",
    )
    assert first.extra["finding"] == rows[0]["finding"] and len(first.extra["orig_sha256"]) == 64
    assert all(r.patient_id is None for r in records if r.source == "radiography-db")
    assert all(r.patient_id for r in records if r.source == "kermany")  # parsed from the file names


def test_relative_paths_resolve_against_csv_folder(tmp_path, monkeypatch):
    _png(tmp_path / "ds" / "img" / "a.png", 1)
    _png(tmp_path / "elsewhere.png", 2)
    manifest = _write_csv(
        tmp_path / "ds" / "manifest.csv",
        ["path", "label", "patient_id", "source", "site"],
        [["img/a.png", "COVID", "p1", "s1", "north"], [str(tmp_path / "elsewhere.png"), "", "", "", ""]],
    )
    monkeypatch.chdir(tmp_path)
    a, b = load_records(manifest)
    assert a == Record(tmp_path / "ds" / "img" / "a.png", "COVID", "p1", "s1", None, {"site": "north"})
    assert b == Record(tmp_path / "elsewhere.png", None, None, None, None, {"site": ""})


def test_csv_missing_columns_and_files(tmp_path):
    _png(tmp_path / "a.png")
    no_path = _write_csv(tmp_path / "m1.csv", ["file", "label"], [["a.png", "COVID"]])
    with pytest.raises(DataError, match=r"missing column\(s\) path \(found: file, label\)"):
        load_records(no_path)
    no_label = _write_csv(tmp_path / "m2.csv", ["path", "patient_id"], [["a.png", "p"]])
    with pytest.raises(DataError, match=r"missing column\(s\) label"):
        load_records(no_label)
    assert [r.label for r in load_records(no_label, labeled=False)] == [None]

    rows = [["a.png", "COVID"]] + [[f"gone/{i}.png", "NORMAL"] for i in range(7)]
    absent = _write_csv(tmp_path / "m3.csv", ["path", "label"], rows)
    with pytest.raises(DataError) as info:
        load_records(absent)
    message = str(info.value)
    assert "7 of 8 listed file(s) not found" in message
    assert str(tmp_path / "gone" / "0.png") in message and "(2 more)" in message
    assert "\n" not in message


def test_csv_bad_split_and_empty_path(tmp_path):
    _png(tmp_path / "a.png")
    bad = _write_csv(tmp_path / "s.csv", ["path", "label", "split"], [["a.png", "COVID", "training"]])
    with pytest.raises(DataError, match="split must be one of train, val, test; got line 2: 'training'"):
        load_records(bad)
    empty = _write_csv(tmp_path / "e.csv", ["path", "label"], [["a.png", "COVID"], ["", "COVID"]])
    with pytest.raises(DataError, match="line 3: empty path"):
        load_records(empty)
    header_only = _write_csv(tmp_path / "h.csv", ["path", "label"], [])
    with pytest.raises(DataError, match="no images found"):
        load_records(header_only)


def test_write_read_round_trip_is_portable(tmp_path):
    inside = [_png(tmp_path / "ds" / "COVID" / f"{i}.png", i) for i in range(3)]
    outside = _png(tmp_path / "other" / "x.png", 9)
    records = [
        Record(inside[0], "COVID", "p1", "src", "train", {"view": "PA", "note": 'a, "quoted" note'}),
        Record(inside[1], "NORMAL", None, None, "val", {"view": "AP"}),
        Record(inside[2], None, "p2", None, "test", {}),
        Record(outside, "COVID", None, None, "train", {"view": "PA"}),
    ]
    out = write_records(records, tmp_path / "ds" / "splits.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "patient_id", "source", "view", "note", "split"]
    assert [r["path"] for r in rows[:3]] == ["COVID/0.png", "COVID/1.png", "COVID/2.png"]
    assert rows[3]["path"] == str(outside)  # not under the CSV's folder: absolute
    assert rows[2]["label"] == "UNLABELED"

    back = load_records(out)
    expected = [
        replace(r, extra={"view": r.extra.get("view", ""), "note": r.extra.get("note", "")}) for r in records
    ]
    assert back == expected

    # the folder (CSV + images) can move and still load
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "ds", moved)
    assert [r.path for r in load_records(moved / "splits.csv")][:3] == [
        moved / "COVID" / f"{i}.png" for i in range(3)
    ]


def test_write_is_atomic(tmp_path, monkeypatch):
    img = _png(tmp_path / "a.png")
    out = write_records([Record(img, "COVID")], tmp_path / "m.csv")
    before = out.read_bytes()

    def boom(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerow", boom)
    with pytest.raises(OSError, match="No space"):
        write_records([Record(img, "NORMAL")], out)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.png", "m.csv"]  # no temp file left behind


def test_class_names_order_is_stable():
    recs = [Record(Path(f"/x/{i}"), label) for i, label in enumerate(["b", None, "a", "c", "a"])]
    assert class_names(recs) == ["a", "b", "c"]
    assert class_names(reversed(recs)) == ["a", "b", "c"]


def test_dataset_fingerprint(tmp_path):
    def dataset(root: Path) -> list[Record]:
        return [
            Record(root / "COVID" / "a.png", "COVID", split="train"),
            Record(root / "NORMAL" / "b.png", "NORMAL", split="test"),
        ]

    fp = dataset_fingerprint(dataset(tmp_path / "one"))
    assert len(fp) == 64
    assert fp == dataset_fingerprint(reversed(dataset(tmp_path / "one")))  # order-free
    assert fp == dataset_fingerprint(dataset(tmp_path / "two" / "deeper"))  # location-free
    changed_split = [dataset(tmp_path)[0], replace(dataset(tmp_path)[1], split="val")]
    changed_label = [dataset(tmp_path)[0], replace(dataset(tmp_path)[1], label="COVID")]
    assert len({fp, dataset_fingerprint(changed_split), dataset_fingerprint(changed_label)}) == 3


# --- torch dataset ----------------------------------------------------------------------------------------


def test_xray_dataset_items(tiny_labelled_folder):
    import torch

    records = load_records(tiny_labelled_folder)
    ds = XrayDataset(records, image_size=32)
    assert len(ds) == 90 and ds.class_names == ["COVID", "NORMAL", "PNEUMONIA"]
    assert ds.labels == [ds.class_names.index(r.label) for r in records]
    item = ds[0]
    assert set(item) == {"image", "label", "path", "patient_id"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert float(item["image"].std()) > 0.01  # a real X-ray, not a blank
    assert item["path"] == str(records[0].path) and item["patient_id"] == ""

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == ds.labels[:4]


def test_xray_dataset_labels_transform_and_pad(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (10, 1))).save(wide)
    records = [
        Record(wide, "PNEUMONIA", patient_id="p7"),
        Record(wide, None),
        Record(wide, "UNSEEN"),
    ]
    ds = XrayDataset(
        records,
        16,
        resize_mode="pad",
        class_names=["COVID", "NORMAL", "PNEUMONIA"],
        transform=lambda t: 1.0 - t,
    )
    assert ds.labels == [2, -1, -1]
    item = ds[0]
    assert item["patient_id"] == "p7" and item["label"] == 2
    # "pad" keeps the 4:1 aspect: the top row is flat padding, the middle row the (inverted) gradient
    img = item["image"]
    assert img.shape == (3, 16, 16)
    assert float(img[0, 0].std()) == pytest.approx(0.0, abs=1e-6)
    assert float(img[0, 8, 0]) > float(img[0, 8, -1]) + 0.5  # inverted: dark end now bright
    with pytest.raises(DataError, match="image size"):
        XrayDataset(records, 0)


def test_safe_dataset_turns_a_bad_file_into_a_marker_and_collate_lists_it(tmp_path):
    import torch

    good = _png(tmp_path / "good.png", 1)
    records = [Record(good, "A"), Record(tmp_path / "missing.png", "A"), Record(good, None)]
    ds = SafeDataset(XrayDataset(records, 16, class_names=["A"]))
    assert len(ds) == 3
    marker = ds[1]
    assert marker == Unreadable(1, str(tmp_path / "missing.png"), "no such file")
    assert ds[0]["index"] == 0 and ds[0]["path"] == str(good)

    batch = collate_with_errors([ds[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["label"].tolist() == [0, -1] and batch["index"] == [0, 2]
    assert batch["path"] == [str(good), str(good)]
    assert batch["errors"] == [(1, marker.path, "no such file")]
    assert batch["skipped"] == [f"{marker.path}: no such file"]

    nothing = collate_with_errors([marker], image_size=16)
    assert nothing["image"].shape == (0, 3, 16, 16) and nothing["image"].dtype == torch.float32
    assert nothing["label"].tolist() == [] and nothing["path"] == [] and len(nothing["skipped"]) == 1
    assert collate_with_errors([marker])["image"].shape == (0,)


def test_failure_reason_is_one_line_without_the_path():
    assert failure_reason(ImageLoadError("/x/a.png", "truncated image")) == "truncated image"
    assert failure_reason(DataError("bad manifest")) == "bad manifest"
    assert failure_reason(MemoryError()) == "out of memory while decoding"
    assert failure_reason(KeyError("k")) == "unexpected KeyError: 'k'"


def test_decoded_cache_decodes_each_file_once_and_matches_the_decoder(tmp_path, monkeypatch):
    import numpy as np

    import cxrcae.io.decoded as decoded_module
    from conftest import FIXTURE_DATA
    from cxrcae.data import XrayDataset, load_records
    from cxrcae.io import load_for_model
    from cxrcae.io.decoded import DecodedCache

    records = load_records(FIXTURE_DATA / "cxr" / "manifest.csv")[:4]
    calls = []
    real = decoded_module.load_for_model
    monkeypatch.setattr(decoded_module, "load_for_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cache = DecodedCache(tmp_path / "decoded")
    data = XrayDataset(records, 64, "pad", decoded=cache)
    first = [data[i]["image"] for i in range(len(data))]
    again = [data[i]["image"] for i in range(len(data))]
    assert len(calls) == len(records)  # the second epoch never decoded
    for rec, a, b in zip(records, first, again):
        assert torch.equal(a, b)  # epoch 1 already sees the cached (uint16) values
        np.testing.assert_allclose(a.numpy(), load_for_model(rec.path, 64, "pad"), atol=1 / 65535)
    # another size (or resize mode, or a modified file) is another entry
    DecodedCache(tmp_path / "decoded").load(records[0].path, 32, "pad")
    assert len(calls) == len(records) + 1
