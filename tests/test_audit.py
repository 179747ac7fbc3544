"""audit: planted exact and near duplicates, a planted patient leak, unreadable files, source dominance."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcae.data import Record, load_records
from cxrcae.data.audit import (
    LEAKAGE_EXIT_CODE,
    audit_records,
    class_source_table,
    dominant_sources,
    near_pairs,
)
from cxrcae.io import hash_files
from cxrcae.io import hashing as io_hashing


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def planted(tmp_path, shared_data, shared_manifest_rows) -> dict:
    """A 16-image splits CSV of distinct real images (distinct patients), then four planted problems."""
    picked, patients = [], set()
    sources = {r["source"] for r in shared_manifest_rows}
    per_source = {"radiography-db": 6, "ieee8023": 5, "kermany": 5}
    if "radiography-db" not in sources:  # the shipped fixture set: Kermany and ieee8023 only
        per_source["kermany"] += per_source.pop("radiography-db")
    images_of = Counter(r["patient_id"] for r in shared_manifest_rows if r["source"] == "ieee8023")
    for row in shared_manifest_rows:
        src = row["source"]
        if src == "ieee8023" and images_of[row["patient_id"]] < 2:
            continue  # ieee8023 patients with a second image, for the planted patient leak
        if per_source.get(src, 0) and row["label"] != "UNLABELED" and row["patient_id"] not in patients:
            per_source[src] -= 1
            patients.add(row["patient_id"])
            picked.append(row)
    splits = ["train", "val", "test", "train"]
    rows = [
        {
            "path": str(shared_data / "cxr" / r["path"]),
            "label": r["label"],
            "patient_id": r["patient_id"],
            "source": r["source"],
            "split": splits[i % 4],
        }
        for i, r in enumerate(picked)
    ]
    # 1. exact duplicate: a lossless PNG of a train JPEG's decoded pixels, listed in test under another source
    original = rows[0]
    exact = tmp_path / "exact_copy.png"
    Image.open(original["path"]).save(exact)
    rows.append({**original, "path": str(exact), "source": "elsewhere", "patient_id": "", "split": "test"})
    # 2. near duplicate: resized and re-encoded at lower quality, in val
    near_src = rows[3]
    near = tmp_path / "near_copy.jpg"
    img = Image.open(near_src["path"])
    img.resize((img.width * 7 // 8, img.height * 7 // 8)).save(near, quality=75)
    rows.append({**near_src, "path": str(near), "patient_id": "", "split": "val"})
    # 3. patient leak: another image of a test patient, put in train
    ieee_test = next(r for r in rows if r["source"] == "ieee8023" and r["split"] == "test")
    other = next(
        m
        for m in shared_manifest_rows
        if m["source"] == "ieee8023"
        and m["patient_id"] == ieee_test["patient_id"]
        and str(shared_data / "cxr" / m["path"]) != ieee_test["path"]
    )
    rows.append({**ieee_test, "path": str(shared_data / "cxr" / other["path"]), "split": "train"})
    # 4. an unreadable (truncated) file
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(rows[5]["path"]).read_bytes()[:300])
    rows.append({**rows[5], "path": str(broken), "patient_id": "", "split": "train"})
    return {
        "csv": _write_csv(tmp_path / "splits.csv", rows),
        "exact": (original["path"], str(exact)),
        "near": (near_src["path"], str(near)),
        "patient": ieee_test["patient_id"],
        "broken": str(broken),
    }


def _paths(group) -> set[str]:
    return {str(group.records[i].path) for i in group.members}


def test_audit_finds_planted_duplicates_leak_and_unreadable(planted):
    records = load_records(planted["csv"], labeled=False)
    report = audit_records(records, workers=2)
    assert [_paths(g) for g in report.exact_groups] == [set(planted["exact"])]
    exact = report.exact_groups[0]
    assert exact.cross_split and exact.cross_source and exact.splits == ["test", "train"]
    assert [_paths(g) for g in report.near_groups] == [set(planted["near"])]
    assert report.near_groups[0].max_distance <= report.near_threshold
    assert [leak["patient_id"] for leak in report.patient_leaks] == [planted["patient"]]
    assert report.patient_leaks[0]["splits"] == {"test": 1, "train": 1}
    assert [p for p, _ in report.unreadable] == [planted["broken"]]
    assert report.leakage and report.images == len(records)


def test_audit_reuses_precomputed_pixel_hashes(planted, monkeypatch):
    records = load_records(planted["csv"], labeled=False)
    fresh = audit_records(records, workers=2).as_dict()
    known = hash_files([r.path for r in records], workers=2)
    assert Path(planted["broken"]) in known.errors

    decoded: list[Path] = []
    decode = io_hashing.decode_native

    def counting_decode(path, **kwargs):
        decoded.append(Path(path))
        return decode(path, **kwargs)

    monkeypatch.setattr(io_hashing, "decode_native", counting_decode)  # every pixel_hash decodes through it
    reused = audit_records(records, workers=2, pixel_hashes=known).as_dict()
    assert decoded == []  # no file was pixel-hashed again, the unreadable one included
    assert reused == fresh

    partial = type(known)(hashes=dict(list(known.hashes.items())[:5]), errors={})
    assert audit_records(records, workers=2, pixel_hashes=partial).as_dict() == fresh
    assert sorted(decoded) == sorted({r.path for r in records} - set(partial.hashes))  # only the rest


def test_cli_audit_exits_3_on_leakage_with_reports(cli, planted, tmp_path):
    md = tmp_path / "report.md"
    result = cli("audit", planted["csv"], "--report", md, "--workers", "2")
    assert result.exit_code == LEAKAGE_EXIT_CODE, result.output
    assert "Audit failed" in result.output and "Traceback" not in result.output
    assert f"patient {planted['patient']}" in result.output
    text = md.read_text()
    assert "Patients in more than one split" in text and planted["exact"][1] in text

    result = cli("audit", planted["csv"], "--json", "--near-threshold", "-1", "--workers", "2")
    assert result.exit_code == LEAKAGE_EXIT_CODE
    payload = json.loads(result.stdout)
    assert payload["near_duplicate_groups"] == [] and payload["near_threshold"] is None
    assert payload["summary"]["patients_in_several_splits"] == 1
    assert payload["unreadable"][0]["path"] == planted["broken"]


def test_cli_audit_clean_split_passes_and_strict_fails_on_duplicates(cli, planted, tmp_path):
    rows = list(csv.DictReader(open(planted["csv"], newline="")))
    leak_free = [r for r in rows if r["path"] not in (planted["broken"],)]
    for r in leak_free:
        r["split"] = "train"  # one split: nothing can leak, the duplicates remain
    path = _write_csv(tmp_path / "one_split.csv", leak_free)
    result = cli("audit", path, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "Exact duplicates: 1 group(s)" in result.stdout
    assert cli("audit", path, "--strict", "--workers", "2").exit_code == LEAKAGE_EXIT_CODE


def _rec(label: str | None, source: str, n: int) -> list[Record]:
    return [Record(path=Path(f"/x/{source}/{label}/{i}.png"), label=label, source=source) for i in range(n)]


def test_class_source_table_warns_when_one_source_supplies_a_class():
    records = _rec("COVID", "a", 9) + _rec("COVID", "b", 1) + _rec("NORMAL", "a", 5) + _rec("NORMAL", "b", 5)
    records += _rec(None, "c", 4)
    table = class_source_table(records)
    assert table == {"COVID": {"a": 9, "b": 1}, "NORMAL": {"a": 5, "b": 5}, "UNLABELED": {"c": 4}}
    assert dominant_sources(table, 0.8) == [{"label": "COVID", "source": "a", "share": 0.9, "images": 10}]
    assert dominant_sources(table, 0.95) == []
    assert (
        dominant_sources(class_source_table(_rec("COVID", "a", 3)), 0.8) == []
    )  # one source: nothing to compare


@pytest.mark.parametrize("fallback", [False, True])
def test_near_pairs_matches_brute_force(fallback, monkeypatch):
    if fallback:
        monkeypatch.delattr(np, "bitwise_count", raising=False)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    values = np.concatenate([base, base[:10] ^ np.uint64(0b101)])  # ten planted pairs 2 bits apart
    expected = {
        (i, j, bin(int(values[i]) ^ int(values[j])).count("1"))
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if bin(int(values[i]) ^ int(values[j])).count("1") <= 3
    }
    assert set(near_pairs(values, 3, block=7)) == expected and len(expected) >= 10


def test_cli_audit_class_folder_keeps_labels(cli, tiny_labelled_folder):
    result = cli("audit", tiny_labelled_folder, "--json", "--workers", "2")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {label: sum(row.values()) for label, row in payload["class_source"].items()} == {
        "COVID": 30,
        "NORMAL": 30,
        "PNEUMONIA": 30,
    }
    assert payload["has_splits"] is False and payload["leakage"] is False


def test_checks_from_higher_layers_add_sections():
    from cxrcae.data.audit import ImageHash, to_markdown

    class Section:
        key, title, notes = "probe", "A model check", ["sampled"]
        warnings = ["the features see the source"]

        def as_dict(self):
            return {"score": 0.9}

        def markdown(self):
            return "## A model check\n\nscore 0.9\n"

        def table(self):
            return ["what", "score"], [["source", 0.9]]

    seen = []

    def check(records, progress):
        seen.append(len(records))
        return Section()

    records = _rec("COVID", "a", 3) + _rec("NORMAL", "b", 3)
    hashes = [ImageHash(exact=str(i), phash=i << 20) for i in range(len(records))]
    report = audit_records(records, hashes=hashes, checks=[check])
    assert seen == [6] and report.section_warnings == ["the features see the source"]
    payload = report.as_dict()
    assert payload["probe"] == {"score": 0.9} and payload["summary"]["check_warnings"] == 1
    assert "## A model check" in to_markdown(report)
    assert "check_warnings" not in audit_records(records, hashes=hashes).summary()
