"""Multi-label metrics (cxrcae.metrics): scikit-learn's figures, F1-best thresholds, vectorised bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrcae.metrics import (
    _weighted_ap,
    choose_thresholds,
    multilabel_metrics,
    multilabel_report,
    resample_weights,
)


def _data(n: int = 80, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.35).astype(np.uint8)
    p = np.clip(0.35 * y + 0.65 * rng.random((n, k)), 0, 1).round(2)  # rounded: ties, as real scores have
    return y, p


def test_weighted_average_precision_matches_sklearn():
    y, p = _data(60, 1)
    w = resample_weights(60, 6, seed=1)
    ours = _weighted_ap(w, y[:, 0].astype(bool), p[:, 0])
    theirs = [average_precision_score(y[:, 0], p[:, 0], sample_weight=row) for row in w]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_thresholds_maximise_validation_f1():
    y, p = _data(90, 3, seed=2)
    thresholds = choose_thresholds(y, p)
    for k in range(3):
        best = max(f1_score(y[:, k], p[:, k] >= c) for c in np.unique(p[:, k]))
        assert f1_score(y[:, k], p[:, k] >= thresholds[k]) == pytest.approx(best)
    no_positive = choose_thresholds(np.zeros((4, 1)), np.array([[0.1], [0.9], [0.3], [0.2]]))
    assert no_positive[0] == 0.5


def test_point_metrics_are_sklearns():
    y, p = _data()
    thr = [0.5, 0.4, 0.6]
    m = multilabel_metrics(y, p, ["A", "B", "C"], thr)
    for k, name in enumerate("ABC"):
        assert m["per_label"][name]["auc"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]))
        assert m["per_label"][name]["ap"] == pytest.approx(average_precision_score(y[:, k], p[:, k]))
        assert m["per_label"][name]["f1"] == pytest.approx(f1_score(y[:, k], p[:, k] >= thr[k]))
        assert m["per_label"][name]["support"] == int(y[:, k].sum())
    pred = p >= np.array(thr)
    assert m["macro"]["auc"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert m["micro"]["auc"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert m["micro"]["ap"] == pytest.approx(average_precision_score(y, p, average="micro"))
    assert m["micro"]["f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["macro"]["f1"] == pytest.approx(f1_score(y, pred, average="macro"))


def test_a_label_without_positives_is_left_out_of_macro():
    y, p = _data()
    y[:, 2] = 0
    m = multilabel_metrics(y, p, ["A", "B", "C"], [0.5] * 3)
    assert np.isnan(m["per_label"]["C"]["auc"]) and np.isnan(m["per_label"]["C"]["f1"])
    assert m["macro"]["auc"] == pytest.approx(np.mean([m["per_label"][n]["auc"] for n in "AB"]))


def test_bootstrap_intervals_bracket_the_estimate_and_group_patients(monkeypatch):
    y, p = _data(120)
    thr = choose_thresholds(y, p)
    groups = [f"p{i // 3}" for i in range(120)]
    r = multilabel_report(y, p, ["A", "B", "C"], thr, groups=groups, n_resamples=300, seed=0)
    ci = r["ci"]
    assert ci["unit"] == "patient" and ci["n_units"] == 40
    for avg in ("macro", "micro"):
        for metric in ("auc", "ap", "f1"):
            lo, hi = ci[avg][metric]
            assert lo < r[avg][metric] < hi
    # the micro bootstrap is chunked over resamples: the same intervals whatever the chunk size
    monkeypatch.setattr("cxrcae.metrics._CELLS_PER_CHUNK", 1000)
    again = multilabel_report(y, p, ["A", "B", "C"], thr, groups=groups, n_resamples=300, seed=0)
    assert again["ci"] == ci
    assert "ci" not in multilabel_report(y, p, ["A", "B", "C"], thr, n_resamples=0)
