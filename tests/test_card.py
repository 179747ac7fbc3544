"""Model cards carry the checkpoint's real numbers, omit what is unknown, and have valid Hub front matter."""

from __future__ import annotations

import numpy as np
import yaml

from cxrcae.eval.metrics import full_report
from cxrcae.hub.card import build_card, metric_rows

CLASSIFIER = {
    "kind": "classifier",
    "architecture": "cxrcae_vgg_cae",
    "head": "lstm",
    "image_size": 224,
    "resize_mode": "pad",
    "in_chans": 3,
    "class_names": ["COVID", "NORMAL", "PNEUMONIA"],
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
    "intensity_range": [0.0, 1.0],
    "num_parameters": 7654851,
    "weights_sha256": "0123abcd" * 8,
    "data": {"counts": {"train": {"COVID": 73, "NORMAL": 146}, "val": {"COVID": 13, "NORMAL": 27}}},
    "training": {"lr": 0.001, "best_epoch": 13, "batch_size": 16},
}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _evaluate_metrics() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet([1, 1, 1], 90)
    probs[np.arange(30), y[:30]] += 1.5  # better than chance, not perfect
    probs /= probs.sum(1, keepdims=True)
    report = full_report(y, probs, ["COVID", "NORMAL", "PNEUMONIA"], n_resamples=200, seed=0)
    report["split"] = "test"
    return report


def test_classifier_card_has_real_numbers_and_cis():
    metrics = _evaluate_metrics()
    card = build_card(CLASSIFIER, metrics, repo_id="me/cxr")
    meta = _front_matter(card)
    assert meta["library_name"] == "cxrcae" and meta["pipeline_tag"] == "image-classification"
    assert {"chest-x-ray", "medical-imaging", "autoencoder"} <= set(meta["tags"])
    assert "accuracy" in meta["metrics"]
    assert "7,654,851" in card and "224 x 224" in card and "`pad`" in card and "512 x 7 x 7" in card
    assert "| COVID | 73 | 13 | 86 |" in card  # counts per class and split, with totals
    assert "| best_epoch | 13 |" in card
    lo, hi = metrics["ci"]["accuracy"]
    assert f"| overall | accuracy | {metrics['accuracy']:.4f} | {lo:.4f} - {hi:.4f} |" in card
    auc_lo, auc_hi = metrics["ci"]["per_class"]["NORMAL"]["auc"]
    auc = metrics["per_class"]["NORMAL"]["auc"]
    assert f"| class NORMAL | auc | {auc:.4f} | {auc_lo:.4f} - {auc_hi:.4f} |" in card
    assert "200 bootstrap resamples" in card
    assert 'cxrcae.load_model("me/cxr")' in card and "not a medical device" in card.lower()
    assert "10.18280/ria.350509" in card
    for placeholder in ("TODO", "[More Information Needed]", "| None", "| nan", "NaN"):
        assert placeholder not in card


def test_unknown_sections_are_left_out_and_encoder_card():
    config = {"kind": "encoder", "image_size": 32, "resize_mode": "stretch", "num_parameters": 3947712}
    card = build_card(config)
    assert _front_matter(card)["pipeline_tag"] == "image-feature-extraction"
    for section in ("## Evaluation", "## Training data", "## Training settings"):
        assert section not in card
    assert "3,947,712" in card and "512 x 1 x 1" in card and "license" not in _front_matter(card)
    assert "cxrcae.load_encoder(" in card and "## Citation" in card


def test_generic_metrics_layout_is_read():
    rows = list(metric_rows({"metrics": {"auc": {"value": 0.81, "ci": [0.7, 0.9]}, "f1": 0.5, "n": 10}}))
    assert rows == [
        {"scope": "", "metric": "auc", "value": 0.81, "low": 0.7, "high": 0.9},
        {"scope": "", "metric": "f1", "value": 0.5, "low": None, "high": None},
    ]
