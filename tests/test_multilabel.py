"""The ``multilabel`` task end to end on synthetic knees (two findings, ``/``-separated like ieee8023's):
fine-tuning learns, thresholds chosen on validation land in config.json, the checkpoint loads as its task,
and evaluation and prediction read it through the task's hooks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cxrcae.data.records import load_records
from cxrcae.errors import DataError
from cxrcae.hub.resolve import load
from cxrcae.tasks import get_task
from cxrcae.train.config import FinetuneConfig
from cxrcae.train.finetuning import finetune

FAST = {"num_workers": 0, "device": "cpu", "precision": "fp32", "cache_decoded": False}


def _config(**over):
    base = {
        "task": "multilabel",
        "labels": "finding",
        "label_sep": "/",
        "image_size": 32,
        "head": "dense5",
        "stages": ("all",),
        "epochs": 12,
        "batch_size": 8,
        "lr_unfrozen": 3e-3,
        "patience": 12,
        **FAST,
    }
    return FinetuneConfig(**{**base, **over})


def test_multilabel_finetune_learns_and_stores_thresholds(knee_findings_manifest, tmp_path):
    result = finetune(knee_findings_manifest, tmp_path / "run", _config())
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["task"] == "multilabel" and config["kind"] == "multilabel"
    assert config["label_names"] == ["Effusion", "Narrowing", "Normal"]
    assert config["label_source"] == {"column": "finding", "sep": "/"}
    assert len(config["thresholds"]) == 3 and all(0 <= t <= 1 for t in config["thresholds"])
    history = result.history
    assert {"val_macro_auc", "val_micro_auc", "val_macro_f1"} <= set(history[0])
    # it learns: the training loss falls well below where it started, validation ranks findings
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert result.best_metrics["val_macro_auc"] > 0.6

    model = load(tmp_path / "run" / "best")
    assert model.task is get_task("multilabel")
    records = load_records(knee_findings_manifest, labeled=False)[:6]
    images = torch.stack([model.task.dataset(records, config)[i]["image"] for i in range(6)])
    with torch.no_grad():
        probs = model.probabilities(model.net(images))
    assert probs.shape == (6, 3) and ((probs >= 0) & (probs <= 1)).all()
    row = model.task.prediction_row(probs[0], config)
    assert set(row) == {"findings", "p_Effusion", "p_Narrowing", "p_Normal"}


def test_scores_and_rows_from_hand_made_outputs():
    task = get_task("multilabel")
    config, _ = task.example(32)
    config = {**config, "thresholds": [0.5, 0.4, 0.5]}
    y = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    p = np.array([[0.9, 0.8, 0.7], [0.2, 0.45, 0.1], [0.1, 0.2, 0.3], [0.6, 0.1, 0.2]])
    metrics = task.score(p, y, ["a", "b", "c", "d"], config, n_boot=50)
    assert metrics["per_label"]["COVID-19"]["auc"] == pytest.approx(1.0)
    assert metrics["per_label"]["Pneumonia"]["f1"] == pytest.approx(1.0)  # 0.45 >= 0.4: both positives
    headers, rows = task.metric_rows(metrics)
    assert headers == ["label", "AUC", "AP", "F1"] and [r[0] for r in rows[-2:]] == ["macro", "micro"]
    row = task.prediction_row(p[1], config)
    assert row["findings"] == "Pneumonia" and row["p_Viral"] == pytest.approx(0.1)


def test_bad_label_setups_are_one_line_errors(knee_findings_manifest, tmp_path):
    with pytest.raises(DataError, match="needs --labels COLUMN"):
        finetune(knee_findings_manifest, tmp_path / "a", _config(labels=None, label_sep=None))
    with pytest.raises(DataError, match="no column 'findings'|'findings'"):
        finetune(knee_findings_manifest, tmp_path / "b", _config(labels="findings"))
    # a finding only the validation split has cannot be learned
    rows = list(csv.DictReader(open(knee_findings_manifest)))
    for i, row in enumerate(rows):
        row["path"] = str(knee_findings_manifest.parent / row["path"])
        row["split"] = "val" if i % 8 in (1, 2) else "train"
    rows[1]["finding"] = "Fracture"
    odd = tmp_path / "odd.csv"
    with open(odd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=r"'Fracture' is in val \(1\) but never in train"):
        finetune(odd, tmp_path / "c", _config())
