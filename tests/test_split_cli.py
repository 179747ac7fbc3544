"""``cxrcae split`` end to end on real X-rays: table, JSON, the written CSV, and clean errors."""

from __future__ import annotations

import csv
import json
from collections import Counter

from cxrcae.data import load_records


def test_split_folder_writes_portable_csv_and_table(cli, tiny_labelled_folder, tmp_path):
    out = tmp_path / "splits" / "s.csv"
    result = cli("split", tiny_labelled_folder, "--out", out, "--seed", "1")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for word in ("COVID", "NORMAL", "PNEUMONIA", "train", "val", "test", "patients", "duplicate group"):
        assert word in text
    assert str(out) in text

    records = load_records(out)
    assert len(records) == 90
    assert {r.split for r in records} == {"train", "val", "test"}
    assert Counter(r.label for r in records) == {"COVID": 30, "NORMAL": 30, "PNEUMONIA": 30}
    assert [r.path for r in records] == [r.path for r in load_records(tiny_labelled_folder)]
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "label", "patient_id", "source", "split"]


def test_split_manifest_json(cli, shared_data, shared_manifest_rows, tmp_path):
    n = len(shared_manifest_rows)
    out = tmp_path / "s.csv"
    manifest = shared_data / "cxr" / "manifest.csv"
    result = cli("split", manifest, "--out", out, "--no-dedupe", "--ratios", "0.8,0.1,0.1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == n and summary["dedupe"] is False
    assert summary["ratios"] == [0.8, 0.1, 0.1]
    assert summary["classes"] == ["COVID", "NORMAL", "PNEUMONIA", "UNLABELED"]
    assert sum(s["images"] for s in summary["splits"].values()) == n
    assert abs(summary["splits"]["train"]["classes"]["COVID"]["percent"] - 80) <= 2
    assert summary["splits"]["test"]["patients"] > 0

    with open(manifest, newline="") as f:
        manifest_header = next(csv.reader(f))
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*manifest_header, "split"]  # every manifest column kept
    assert len(rows) == n


def test_split_is_reproducible_from_the_cli(cli, tiny_labelled_folder, tmp_path):
    a, b, c = (tmp_path / n for n in ("a.csv", "b.csv", "c.csv"))
    for out, seed in ((a, "5"), (b, "5"), (c, "6")):
        assert cli("split", tiny_labelled_folder, "--out", out, "--seed", seed, "--quiet").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_quiet_prints_nothing(cli, tiny_labelled_folder, tmp_path):
    result = cli("split", tiny_labelled_folder, "--out", tmp_path / "s.csv", "--quiet", "--no-dedupe")
    assert result.exit_code == 0 and result.stdout == ""


def _one_line_error(result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert "Error" in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_data_is_a_clean_error(cli, tmp_path):
    result = cli("split", tmp_path / "nope", "--out", tmp_path / "s.csv")
    _one_line_error(result, 1, "nope", "no such file or folder")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.csv").exists()


def test_bad_ratios_are_a_usage_error(cli, tiny_labelled_folder, tmp_path):
    result = cli("split", tiny_labelled_folder, "--out", tmp_path / "s.csv", "--ratios", "0.5,0.5,0.5")
    _one_line_error(result, 2, "must sum to 1")
    result = cli("split", tiny_labelled_folder, "--out", tmp_path / "s.csv", "--ratios", "seventy,30")
    _one_line_error(result, 2, "--ratios", "'seventy' is not a number")
    assert not (tmp_path / "s.csv").exists()


def test_manifest_with_missing_files_is_a_clean_error(cli, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimages/a.png,COVID\nimages/b.png,NORMAL\n")
    result = cli("split", manifest, "--out", tmp_path / "s.csv")
    _one_line_error(result, 1, "2 of 2 listed file(s) not found", "a.png")
