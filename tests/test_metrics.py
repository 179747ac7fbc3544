"""Metrics against hand-computed values; the bootstrap replicate path, ECE and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrcae import metrics as M
from cxrcae.eval.calibration import fit_temperature, nll
from cxrcae.metrics import softmax
from cxrcae.models.checkpoint import model_temperature

NAMES = ["COVID", "NORMAL", "PNEUMONIA"]


def _example(n: int, seed: int = 0, signal: float = 1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    return y, softmax(logits)


@pytest.fixture(scope="module")
def fixed():
    # a hand-written 3-class example with ties and mistakes in every class
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    p = np.array(
        [
            [0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.4, 0.2, 0.4],
            [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.1, 0.5, 0.4],
            [0.1, 0.1, 0.8], [0.3, 0.2, 0.5], [0.2, 0.5, 0.3],
        ]
    )  # fmt: skip
    return y, p


# Worked out by hand for ``fixed``. argmax takes the first of tied columns (row 3 -> 0, row 7 -> 1), so the
# predictions are 0 0 1 0 | 1 1 0 1 1 | 2 2 1 and the confusion matrix (rows true, columns predicted) is:
FIXED_CM = [[3, 1, 0], [1, 4, 0], [0, 1, 2]]
FIXED_SUPPORT = np.array([4, 5, 3])
FIXED_PER_CLASS = {
    "precision": [3 / 4, 4 / 6, 2 / 2],  # diagonal / column sum
    "recall": [3 / 4, 4 / 5, 2 / 3],  # diagonal / row sum
    "specificity": [7 / 8, 5 / 7, 9 / 9],  # TN / (TN + FP)
    "f1": [3 / 4, 8 / 11, 4 / 5],  # 2PR / (P + R)
    # one-vs-rest AUC: positive/negative pairs ranked right, ties counting one half, over all pairs
    "auc": [28.5 / (4 * 8), 28 / (5 * 7), 24 / (3 * 9)],
}
FIXED_ACCURACY = 9 / 12


def _pairwise_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUC by brute force over every positive/negative pair: independent of the code under test."""
    diff = np.subtract.outer(scores[positive], scores[~positive])
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _replicate_row(weights: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """The bootstrap path (``_replicate_metrics``) for a single resample given as per-sample counts."""
    return {k: v[0] for k, v in M._replicate_metrics(np.asarray(weights, float)[None], y, p).items()}


def test_hand_computed_auc_is_the_pairwise_count(fixed):
    y, p = fixed
    for c in range(3):
        assert FIXED_PER_CLASS["auc"][c] == pytest.approx(_pairwise_auc(y == c, p[:, c]))


def test_point_metrics_hand_computed(fixed):
    y, p = fixed
    r = M.classification_metrics(y, p, NAMES)
    assert r["n"] == 12
    assert r["accuracy"] == pytest.approx(FIXED_ACCURACY)
    assert r["confusion_matrix"] == FIXED_CM
    for m, want in FIXED_PER_CLASS.items():
        got = [r["per_class"][name][m] for name in NAMES]
        np.testing.assert_allclose(got, want, err_msg=m)
        assert r["macro"][m] == pytest.approx(np.mean(want)), m
        assert r["weighted"][m] == pytest.approx(np.average(want, weights=FIXED_SUPPORT)), m
    assert [r["per_class"][name]["support"] for name in NAMES] == FIXED_SUPPORT.tolist()


def test_unit_weight_replicate_is_the_point_estimate(fixed):
    # a resample that draws every image exactly once is the data set itself
    y, p = fixed
    rep = _replicate_row(np.ones(y.size), y, p)
    point = M.classification_metrics(y, p, NAMES)
    assert rep["accuracy"] == pytest.approx(FIXED_ACCURACY)
    for m, want in FIXED_PER_CLASS.items():
        np.testing.assert_allclose(rep[f"class:{m}"], want, err_msg=m)
        np.testing.assert_allclose(rep[f"class:{m}"], [point["per_class"][n][m] for n in NAMES], err_msg=m)
        for kind in ("macro", "weighted"):
            assert rep[f"{kind}:{m}"] == pytest.approx(point[kind][m]), (kind, m)
    assert rep["macro:auc"] == pytest.approx(np.mean(FIXED_PER_CLASS["auc"]))


@pytest.mark.parametrize(
    "counts",
    [
        [2, 0, 1, 3, 1, 0, 2, 1, 1, 0, 3, 1],  # duplicates and drops, every class present
        [1, 2, 0, 1, 3, 1, 1, 0, 2, 0, 0, 0],  # class 2 drawn zero times: its recall/F1/AUC are undefined
    ],
)
def test_count_weights_equal_the_repeated_data_set(fixed, counts):
    # a resample's counts must give the metrics of the data set with each image repeated that often
    y, p = fixed
    counts = np.array(counts)
    rep = _replicate_row(counts, y, p)
    yr, pr = np.repeat(y, counts), np.repeat(p, counts, axis=0)
    point = M.classification_metrics(yr, pr, NAMES)
    assert rep["accuracy"] == pytest.approx(point["accuracy"])
    for m in M.CLASS_METRICS:
        np.testing.assert_allclose(rep[f"class:{m}"], [point["per_class"][n][m] for n in NAMES], err_msg=m)
        for kind in ("macro", "weighted"):
            assert rep[f"{kind}:{m}"] == pytest.approx(point[kind][m], nan_ok=True), (kind, m)
    for c in range(3):
        if (yr == c).any():
            assert rep["class:auc"][c] == pytest.approx(_pairwise_auc(yr == c, pr[:, c]))
        else:
            assert np.isnan(rep["class:auc"][c]) and np.isnan(rep["class:recall"][c])


def test_absent_class_is_undefined_not_zero(fixed):
    y, p = fixed
    keep = y != 2
    r = M.classification_metrics(y[keep], p[keep], NAMES)
    assert np.isnan(r["per_class"]["PNEUMONIA"]["recall"])
    assert np.isnan(r["per_class"]["PNEUMONIA"]["auc"])
    present = [r["per_class"][n]["recall"] for n in NAMES[:2]]
    assert r["macro"]["recall"] == pytest.approx(np.mean(present))


def test_weighted_auc_equals_sklearn_sample_weight(fixed):
    y, p = fixed
    w = np.random.default_rng(3).integers(0, 4, (5, y.size)).astype(float)
    w[:, [0, 4]] += 1  # both sides present in every row
    got = M._weighted_auc(w, y == 1, p[:, 1])
    want = [roc_auc_score(y == 1, p[:, 1], sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want)


def test_bootstrap_contains_point_and_shrinks_with_n():
    widths = []
    for n in (100, 2000):
        y, p = _example(n)
        point = M.classification_metrics(y, p, NAMES)
        ci = M.bootstrap_intervals(y, p, NAMES, n_resamples=400, seed=1)
        for kind in ("macro", "weighted"):
            for m in ("accuracy", *M.CLASS_METRICS):
                lo, hi = ci[kind][m]
                assert lo <= point[kind][m] <= hi, (n, kind, m)
        for name in NAMES:
            lo, hi = ci["per_class"][name]["f1"]
            assert lo <= point["per_class"][name]["f1"] <= hi
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
        assert ci["unit"] == "image" and ci["n_units"] == n
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(20) in theory


def test_bootstrap_is_seeded():
    y, p = _example(200)
    a = M.bootstrap_intervals(y, p, NAMES, n_resamples=200, seed=5)
    b = M.bootstrap_intervals(y, p, NAMES, n_resamples=200, seed=5)
    c = M.bootstrap_intervals(y, p, NAMES, n_resamples=200, seed=6)
    assert a["macro"] == b["macro"]
    assert a["macro"] != c["macro"]


def test_patient_bootstrap_resamples_whole_patients():
    groups = ["p1", "p1", "p1", "p2", "p2", None, None, "p3"]
    w = M.resample_weights(len(groups), 500, seed=0, groups=groups)
    assert w.shape == (500, 8)
    # images of one patient always share a count; images without id are drawn independently
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 3] == w[:, 4]).all()
    assert (w[:, 5] != w[:, 6]).any()
    # 5 units drawn per resample: p1, p2, p3, and the two unidentified images
    unit_counts = w[:, [0, 3, 5, 6, 7]].sum(axis=1)
    assert (unit_counts == 5).all()


def test_patient_bootstrap_is_wider_for_correlated_images():
    # 40 patients x 10 identical-outcome images: the honest interval is that of 40 samples, not 400
    rng = np.random.default_rng(0)
    y_pat = rng.integers(0, 3, 40)
    right = rng.random(40) < 0.7
    y = np.repeat(y_pat, 10)
    pred = np.repeat(np.where(right, y_pat, (y_pat + 1) % 3), 10)
    p = np.full((400, 3), 0.1)
    p[np.arange(400), pred] = 0.8
    groups = [f"p{i // 10}" for i in range(400)]
    by_image = M.bootstrap_intervals(y, p, NAMES, n_resamples=500, seed=0)
    by_patient = M.bootstrap_intervals(y, p, NAMES, groups=groups, n_resamples=500, seed=0)
    assert by_patient["unit"] == "patient" and by_patient["n_units"] == 40
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    assert width(by_patient) > 2 * width(by_image)


def test_ece_known_example():
    # bin (0.8, 0.867]: 4 samples at conf 0.85, 2 right -> gap 0.35; bin (0.6, 0.667]: 2 at 0.65 both right
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.85, 0.15]] * 4 + [[0.65, 0.35], [0.35, 0.65]])
    ece = M.expected_calibration_error(y, p, n_bins=15)
    assert ece == pytest.approx(4 / 6 * abs(0.5 - 0.85) + 2 / 6 * abs(1.0 - 0.65))
    bins = M.calibration_bins(y, p, n_bins=15)
    assert sum(bins["count"]) == 6
    perfect = M.expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect == pytest.approx(0.0)


def test_temperature_scaling_lowers_nll_keeps_argmax():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3))
    logits[np.arange(600), y] += 1.0
    logits *= 4.0  # over-confident
    t = fit_temperature(logits, y)
    assert t > 1.5
    assert nll(logits, y, t) < nll(logits, y) - 0.1
    ece_before = M.expected_calibration_error(y, softmax(logits))
    assert M.expected_calibration_error(y, softmax(logits, t)) < ece_before
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_model_temperature_validates():
    from cxrcae.errors import CheckpointError

    assert model_temperature({}) == 1.0
    assert model_temperature({"temperature": 2.5}) == 2.5
    with pytest.raises(CheckpointError):
        model_temperature({"temperature": -1})
