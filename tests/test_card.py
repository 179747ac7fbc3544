"""Model cards carry the checkpoint's real numbers, omit what is unknown, and have valid Hub front matter."""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import yaml

from cxrcae.hub.card import build_card, metric_rows
from cxrcae.metrics import full_report

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


def test_front_matter_round_trips_through_huggingface_hub():
    metrics = _evaluate_metrics()
    metrics["data"] = "/data/cxr/test_split.csv"
    card = build_card({**CLASSIFIER, "license": "cc-by-nc-4.0"}, metrics, repo_id="me/cxr")
    parsed = huggingface_hub.ModelCard(card)
    assert str(parsed) == card  # what the Hub re-renders is what was written
    data = parsed.data
    assert data.library_name == "cxrcae" and data.license == "cc-by-nc-4.0"
    assert data.pipeline_tag == "image-classification"
    assert data.tags == [
        "cxrcae",
        "chest-x-ray",
        "medical-imaging",
        "autoencoder",
        "covid-19",
        "pytorch",
        "safetensors",
    ]
    assert data.model_name == "cxr"
    results = {(r.metric_config, r.metric_type): r for r in data.eval_results}
    first = data.eval_results[0]
    assert (first.metric_type, first.metric_config) == ("accuracy", None)
    assert first.metric_value == metrics["accuracy"]  # the metrics.json value, exactly
    assert results[("macro", "f1")].metric_value == metrics["macro"]["f1"]
    assert results[("macro", "auc")].metric_value == metrics["macro"]["auc"]
    assert results[(None, "ece")].metric_value == metrics["calibration"]["ece"]
    for r in data.eval_results:
        assert r.task_type == "image-classification" and r.dataset_type == "cxr"
        assert r.dataset_name == "test_split.csv" and r.dataset_split == "test"
    # headline numbers only: overall and macro, never per-class or weighted rows
    assert {c for c, _ in results} == {None, "macro"}
    assert len(data.eval_results) == len(results) == 2 + len(metrics["macro"]) - 1
    # the hand-written body is untouched by the round trip
    assert parsed.text.startswith("\n# cxrcae classifier\n") and parsed.text.endswith("}\n```\n")


def test_generic_metrics_and_hub_dataset_become_eval_results():
    metrics = {
        "split": "test",
        "n": 120,
        "metrics": {"macro": {"accuracy": {"value": 0.9123, "ci_low": 0.87}}},
    }
    config = {**CLASSIFIER, "hub_datasets": ["someone/covid-cxr"]}
    data = huggingface_hub.ModelCard(build_card(config, metrics)).data
    assert data.datasets == ["someone/covid-cxr"] and data.metrics == ["accuracy"]
    assert data.model_name == "cxrcae-classifier"
    (result,) = data.eval_results
    assert (result.dataset_type, result.dataset_name, result.dataset_split) == ("someone/covid-cxr",) * 2 + (
        "test",
    )
    assert (result.metric_type, result.metric_config, result.metric_value) == ("accuracy", "macro", 0.9123)
    # a value that is not a finite number is never published as a result
    nan = {"metrics": {"accuracy": 0.8, "auc": float("nan")}}
    assert [
        r.metric_type for r in huggingface_hub.ModelCard(build_card(CLASSIFIER, nan)).data.eval_results
    ] == ["accuracy"]


@pytest.mark.parametrize("metrics", [None, {}, {"split": "test", "n": 10}])
def test_card_without_metrics_has_no_eval_results(metrics):
    card = build_card(CLASSIFIER, metrics, repo_id="me/cxr")
    data = huggingface_hub.ModelCard(card).data
    assert data.eval_results is None and data.model_name is None and data.metrics is None
    assert data.library_name == "cxrcae" and data.pipeline_tag == "image-classification"
    assert "model-index" not in _front_matter(card) and "## Evaluation" not in card


def test_generic_metrics_layout_is_read():
    rows = list(metric_rows({"metrics": {"auc": {"value": 0.81, "ci": [0.7, 0.9]}, "f1": 0.5, "n": 10}}))
    assert rows == [
        {"scope": "", "metric": "auc", "value": 0.81, "low": 0.7, "high": 0.9},
        {"scope": "", "metric": "f1", "value": 0.5, "low": None, "high": None},
    ]
