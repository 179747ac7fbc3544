"""Splits: stratified, grouped by patient and by identical pixels, seeded and order-free."""

from __future__ import annotations

import random
import shutil
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcae.data import Record, load_records
from cxrcae.data.groups import UnionFind
from cxrcae.data.splits import check_ratios, make_splits, split_records, split_summary
from cxrcae.errors import DataError


@pytest.fixture(scope="module")
def manifest_records(shared_data) -> list[Record]:
    return load_records(shared_data / "cxr" / "manifest.csv")


def _split_of(records: list[Record]) -> dict[Path, str]:
    return {r.path: r.split for r in records}


def test_shared_manifest_stratified_and_patient_grouped(manifest_records):
    out = make_splits(manifest_records, seed=0, dedupe=False)
    assert [r.path for r in out] == [r.path for r in manifest_records]  # input order kept
    totals = Counter(r.label for r in out)
    targets = dict(zip(("train", "val", "test"), (0.73, 0.135, 0.135), strict=True))
    for split, target in targets.items():
        counts = Counter(r.label for r in out if r.split == split)
        for label, total in totals.items():  # UNLABELED (None) included
            assert abs(counts[label] / total - target) <= 0.02, (split, label, counts[label], total)

    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for r in out:
        if r.patient_id:
            splits_of_patient[r.patient_id].add(r.split)
    assert len(splits_of_patient) == len({r.patient_id for r in manifest_records if r.patient_id})
    assert len(splits_of_patient) > 200  # 935 in ../shared, 345 in the shipped set
    assert all(len(s) == 1 for s in splits_of_patient.values())
    # patients really are spread over all three splits (not all dumped into train)
    assert {next(iter(s)) for s in splits_of_patient.values()} == {"train", "val", "test"}


def test_seeded_order_free_and_independent_of_global_rng(manifest_records):
    a = _split_of(make_splits(manifest_records, seed=3, dedupe=False))
    random.seed(123)
    np.random.seed(123)
    shuffled = list(manifest_records)
    random.Random(7).shuffle(shuffled)
    b = _split_of(make_splits(shuffled, seed=3, dedupe=False))
    random.seed(999)
    np.random.seed(999)
    c = _split_of(make_splits(manifest_records, seed=3, dedupe=False))
    assert a == b == c
    other = _split_of(make_splits(manifest_records, seed=4, dedupe=False))
    moved = sum(a[p] != other[p] for p in a)
    assert moved > 0.05 * len(a)  # a different seed is a genuinely different split


def test_existing_split_is_replaced_and_ratio_zero_split_stays_empty(manifest_records):
    subset = [replace(r, split="test") for r in manifest_records[:400]]
    out = make_splits(subset, ratios=(0.8, 0.2, 0.0), seed=1, dedupe=False)
    counts = Counter(r.split for r in out)
    assert counts["test"] == 0 and counts["train"] > counts["val"] > 0


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ((0.5, 0.5, 0.5), "must sum to 1"),
        ((0.7, 0.3), "three values"),
        ((1.2, -0.1, -0.1), "non-negative"),
        ((0.0, 0.5, 0.5), "train ratio must be above 0"),
        ((float("nan"), 0.5, 0.5), "non-negative numbers"),
    ],
)
def test_bad_ratios(ratios, message):
    with pytest.raises(DataError, match=message):
        check_ratios(ratios)
    with pytest.raises(DataError, match=message):
        make_splits([Record(Path("/x.png"), "A")], ratios=ratios, dedupe=False)


def test_empty_input():
    with pytest.raises(DataError, match="no records"):
        make_splits([], dedupe=False)


@pytest.fixture
def planted(tmp_path, shared_data, shared_manifest_rows):
    """60 distinct images, 9 planted duplicate pairs (other names, patients, formats), 1 broken file."""
    rng = np.random.default_rng(0)
    records, pairs = [], []
    for i in range(60):
        path = tmp_path / "img" / f"u{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
        records.append(Record(path, "COVID" if i % 3 else "NORMAL", patient_id=f"u{i}"))
    for k in range(8):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        a = tmp_path / "site_a" / f"scan{k}.png"
        b = tmp_path / "site_b" / f"IMG_{k:04d}.{'bmp' if k % 2 else 'png'}"  # same pixels, other format
        for p in (a, b):
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(p)
        label = "COVID" if k % 2 else "NORMAL"
        records += [Record(a, label, patient_id=f"a{k}"), Record(b, label, patient_id=f"b{k}")]
        pairs.append((a, b))
    # a real X-ray copied under a new name for a different patient (and a different label: a conflict)
    real = shared_data / "cxr" / shared_manifest_rows[0]["path"]
    copy = tmp_path / "site_b" / "copy_of_real.jpg"
    shutil.copyfile(real, copy)
    records += [Record(real, "PNEUMONIA", patient_id="r1"), Record(copy, "COVID", patient_id="r2")]
    pairs.append((real, copy))
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records.append(Record(broken, "NORMAL", patient_id="x"))
    return records, pairs, broken


def test_planted_duplicates_share_a_split(planted):
    records, pairs, broken = planted
    calls = []
    for seed in range(3):
        result = split_records(records, seed=seed, workers=2, progress=lambda *a, **k: calls.append(a))
        where = _split_of(result.records)
        assert all(where[a] == where[b] for a, b in pairs), seed
        assert sorted(map(sorted, result.duplicate_groups)) == sorted(sorted(p) for p in pairs)
        # the unreadable file is reported, still split, and does not stop the run
        assert [p for p, _ in result.hash_errors] == [broken] and where[broken] in {"train", "val", "test"}
        summary = result.summary()
        assert summary["duplicate_groups"] == 9 and summary["duplicate_files"] == 18
        assert summary["duplicate_groups_conflicting_labels"] == 1
        assert summary["hash_errors"][0]["path"] == str(broken)
    assert calls[-1][1] == calls[-1][2] == len(records)  # progress reached the end

    # without dedupe the pairs are independent, so some are torn apart: the check above can fail
    torn = 0
    for seed in range(3):
        where = _split_of(make_splits(records, seed=seed, dedupe=False))
        torn += sum(where[a] != where[b] for a, b in pairs)
    assert torn > 0


def test_hashing_threads_do_not_change_the_split(planted):
    records, _, _ = planted
    one = split_records(records, seed=5, workers=1)
    four = split_records(records, seed=5, workers=4)
    assert one.records == four.records and one.duplicate_groups == four.duplicate_groups


def test_split_keeps_its_pixel_hashes_for_the_audit(planted):
    records, pairs, broken = planted
    result = split_records(records, seed=0, workers=2)
    hashed = result.pixel_hashes
    assert hashed is not None
    assert set(hashed.hashes) | set(hashed.errors) == {r.path for r in records}
    assert hashed.error_list() == result.hash_errors and list(hashed.errors) == [broken]
    assert all(hashed.hashes[a] == hashed.hashes[b] for a, b in pairs)
    assert split_records(records, seed=0, dedupe=False).pixel_hashes is None


def test_union_find_roots_are_smallest_members_whatever_the_join_order():
    for pairs in ([(0, 3), (3, 5), (6, 2)], [(5, 3), (2, 6), (3, 0)]):
        uf = UnionFind(7)
        for a, b in pairs:
            uf.union(a, b)
        assert uf.groups() == [[0, 3, 5], [1], [2, 6], [4]]
        assert [uf.find(i) for i in range(7)] == [0, 1, 2, 0, 4, 0, 2]
    chain = UnionFind(1000)
    for i in range(999, 0, -1):  # a long chain: path compression keeps find fast and correct
        chain.union(i, i - 1)
    assert chain.groups() == [list(range(1000))] and chain.find(999) == 0


def test_same_path_listed_twice_stays_together(tmp_path):
    recs = [Record(tmp_path / f"{i}.png", "A") for i in range(30)]
    recs.append(Record(tmp_path / "7.png", "A"))
    for seed in range(5):
        out = make_splits(recs, seed=seed, dedupe=False)
        assert out[7].split == out[-1].split


def test_split_summary_counts():
    recs = [
        Record(Path("/a"), "COVID", "p1", split="train"),
        Record(Path("/b"), "COVID", "p1", split="train"),
        Record(Path("/c"), "NORMAL", None, split="val"),
        Record(Path("/d"), None, "p2", split="test"),
    ]
    s = split_summary(recs)
    assert s["images"] == 4 and s["classes"] == ["COVID", "NORMAL", "UNLABELED"]
    train = s["splits"]["train"]
    assert (train["images"], train["percent"]) == (2, 50.0)
    assert (train["patients"], train["without_patient_id"]) == (1, 0)
    assert train["classes"]["COVID"] == {"count": 2, "percent": 100.0}
    assert s["splits"]["val"]["without_patient_id"] == 1
    assert s["splits"]["test"]["classes"]["UNLABELED"] == {"count": 1, "percent": 100.0}
    assert set(split_summary([Record(Path("/a"), "A")])["splits"]) == {"unassigned"}
