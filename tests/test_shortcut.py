"""Shortcut check: Cramer's V, a patient-grouped linear probe, the warning, and `cxrcae audit --model`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import FIXTURE_DATA
from cxrcae import bundled
from cxrcae.data import Record, load_records
from cxrcae.eval.shortcut import (
    ProbeScore,
    ShortcutReport,
    cramers_v,
    probe,
    resolve_model,
    sample_records,
)
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import build_model


def test_cramers_v():
    assert cramers_v(["C"] * 5 + ["N"] * 5, ["a"] * 5 + ["b"] * 5) == pytest.approx(1.0)
    assert cramers_v(["C", "C", "N", "N"], ["a", "b", "a", "b"]) == pytest.approx(0.0)
    assert cramers_v(["C", "N"], ["a", "a"]) is None  # one source: nothing to associate


def test_probe_scores_signal_and_keeps_patients_together():
    rng = np.random.default_rng(0)
    # 60 patients x 4 images; each patient has its own feature vector and a random target
    patients = np.repeat(np.arange(60), 4)
    targets = [str(t) for t in np.repeat(rng.integers(0, 2, 60), 4)]
    per_patient = rng.normal(size=(60, 64))  # more dimensions than patients: a linear probe can memorise
    noise = per_patient[patients] + 0.01 * rng.normal(size=(240, 64))
    grouped = probe(noise, targets, [f"p{p}" for p in patients], target="t")
    assert grouped is not None and grouped.units == 60 and grouped.chance == 0.5
    assert grouped.balanced_accuracy < 0.75  # nothing to learn about unseen patients
    # the same features scored with images as units: a patient's twin images leak the answer
    leaky = probe(noise, targets, [str(i) for i in range(240)], target="t")
    assert leaky.balanced_accuracy > 0.9

    signal = noise.copy()
    signal[:, :8] += 3 * np.array([int(t) for t in targets])[:, None]
    found = probe(signal, targets, [f"p{p}" for p in patients], target="t")
    assert found.balanced_accuracy > 0.9 and found.macro_auc > 0.95

    notes: list[str] = []
    rare = [*targets[:-2], "rare", "rare"]
    score = probe(signal, rare, [f"p{p}" for p in patients], target="t", notes=notes)
    assert score.classes == ["0", "1"] and "left out rare (1)" in notes[0]


def _score(target: str, auc: float, k: int = 3) -> ProbeScore:
    classes = [f"c{i}" for i in range(k)]
    return ProbeScore(target, classes, 100, 100, 5, 0.7, auc)


def test_warning_needs_a_high_source_score_on_confounded_data():
    def report(source_auc: float, v: float) -> ShortcutReport:
        return ShortcutReport(
            model="m",
            images=100,
            features=512,
            source=_score("source", source_auc),
            label=_score("label", 0.9),
            within_class={"NORMAL": _score("source within NORMAL", 0.85, 2)},
            cramers_v=v,
        )

    (warning,) = report(0.95, 0.6).warnings
    assert "macro AUC 0.95" in warning and "Cramer's V 0.60" in warning
    assert "instead of the disease" in warning and "one class" in warning and "(macro AUC 0.85)" in warning
    assert report(0.95, 0.1).warnings == []  # sources differ, but do not give the class away
    assert report(0.5, 0.6).warnings == []  # confounded, but the features do not see the source
    text = report(0.95, 0.6).markdown()
    assert "> Warning:" in text and "| source, within NORMAL | 2 | 100 | 0.700 | 0.500 | 0.850 |" in text
    assert report(0.95, 0.6).as_dict()["source_probe"]["macro_auc"] == 0.95


def test_bundled_model_is_named_bundled(tmp_path, monkeypatch):
    if bundled.bundled_classifier() is not None:
        assert resolve_model("bundled") == bundled.bundled_classifier()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundled").mkdir()
    assert resolve_model("bundled") == "bundled"  # a folder of that name wins


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = {
        "kind": "classifier",
        "head": "dense5",
        "image_size": 32,
        "class_names": ["COVID", "NORMAL", "PNEUMONIA"],
    }
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("m") / "clf", config)


@pytest.fixture(scope="module")
def confounded_csv(tmp_path_factory, fixture_rows):
    """36 shipped X-rays, one per patient: COVID all from ieee8023, NORMAL and PNEUMONIA all from kermany."""
    wanted = {("ieee8023", "COVID"): 12, ("kermany", "NORMAL"): 12, ("kermany", "PNEUMONIA"): 12}
    seen, rows = set(), []
    for row in fixture_rows:
        key = (row["source"], row["label"])
        if wanted.get(key) and row["patient_id"] not in seen:
            wanted[key] -= 1
            seen.add(row["patient_id"])
            rows.append({**row, "path": str(FIXTURE_DATA / "cxr" / row["path"])})
    path = tmp_path_factory.mktemp("data") / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cli_audit_with_model_reports_the_probe(cli, tiny_model, confounded_csv, tmp_path):
    md = tmp_path / "audit.md"
    args = ("--near-threshold", "-1", "--report", md, "--json")
    result = cli("audit", confounded_csv, "--model", tiny_model, *args)
    assert result.exit_code == 0, result.output
    shortcut = json.loads(result.stdout)["shortcut"]
    assert shortcut["cramers_v"] == pytest.approx(1.0) and shortcut["images"] == 36
    source, label = shortcut["source_probe"], shortcut["label_probe"]
    assert source["classes"] == ["ieee8023", "kermany"] and source["support"] == {
        "ieee8023": 12,
        "kermany": 24,
    }
    assert label["classes"] == ["COVID", "NORMAL", "PNEUMONIA"] and label["patients_or_images"] == 36
    # adults' and children's X-rays from two archives: even a random encoder's features tell them apart
    # (measured: balanced accuracy 0.92 against chance 0.5, source AUC 1.00, label AUC 0.98, also on AVX2)
    assert source["chance"] == 0.5 and source["balanced_accuracy"] > 0.75 and source["macro_auc"] > 0.85
    assert label["chance"] == pytest.approx(1 / 3, abs=1e-3) and label["macro_auc"] > 0.75
    assert shortcut["source_probe_within_class"] == {}  # one source per class: nothing to separate
    text = md.read_text()
    assert "## Shortcut check" in text and "Cramer's V): 1.000" in text and "| label | 3 | 36 |" in text

    missing = cli("audit", confounded_csv, "--model", tmp_path / "nope")
    assert missing.exit_code == 1 and "Traceback" not in missing.output


def test_sample_records_takes_whole_patients(confounded_csv):
    records = load_records(confounded_csv)
    twins = [Record(path=r.path, label=r.label, patient_id="same", source=r.source) for r in records[:6]]
    sample = sample_records(twins + records[6:], 8, seed=1)
    assert 8 <= len(sample) <= 13 and sample == sample_records(twins + records[6:], 8, seed=1)
    assert sum(r.patient_id == "same" for r in sample) in (0, 6)  # a patient is never split
