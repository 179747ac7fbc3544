"""`cxrcae ablate`: paired bootstrap maths, nested label fractions, and a tiny study end to end."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest

from cxrcae.data import Record, label_fraction, load_records
from cxrcae.eval.paired import paired_bootstrap
from cxrcae.locking import hold


def _scores(n: int, strength: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    p = rng.dirichlet([1, 1, 1], n)
    p[np.arange(n), y] += strength
    return y, p / p.sum(1, keepdims=True)


def test_paired_bootstrap_of_a_model_with_itself_is_exactly_zero():
    y, p = _scores(90, 0.5, 0)
    out = paired_bootstrap(y, p, p, n_resamples=200)
    for metric in ("accuracy", "macro_f1", "macro_auc"):
        assert out[metric]["difference"] == 0.0
        assert out[metric]["ci"] == [0.0, 0.0]
        assert out[metric]["p_a_not_better"] == 1.0


def test_paired_bootstrap_finds_the_better_model_and_is_narrower_than_unpaired():
    y, strong = _scores(300, 1.0, 1)
    _, weak = _scores(300, 0.2, 2)
    out = paired_bootstrap(y, strong, weak, n_resamples=400, seed=3)
    acc = out["accuracy"]
    expected = (strong.argmax(1) == y).mean() - (weak.argmax(1) == y).mean()
    assert acc["difference"] == pytest.approx(expected)
    assert 0 < acc["ci"][0] < acc["difference"] < acc["ci"][1]
    assert acc["p_a_not_better"] == 0.0
    assert out["unit"] == "image"
    # swapping the models mirrors the interval
    back = paired_bootstrap(y, weak, strong, n_resamples=400, seed=3)["accuracy"]
    assert back["ci"] == pytest.approx([-acc["ci"][1], -acc["ci"][0]])


def test_paired_bootstrap_resamples_patients_together():
    y, a = _scores(60, 0.8, 4)
    _, b = _scores(60, 0.3, 5)
    groups = [f"p{i // 6}" for i in range(60)]  # 10 patients of 6 images
    by_patient = paired_bootstrap(y, a, b, groups=groups, n_resamples=300)
    by_image = paired_bootstrap(y, a, b, n_resamples=300)
    assert by_patient["unit"] == "patient"
    assert by_patient["accuracy"]["difference"] == by_image["accuracy"]["difference"]
    assert by_patient["accuracy"]["ci"] != by_image["accuracy"]["ci"]
    with pytest.raises(ValueError):
        paired_bootstrap(y, a, b[:-1])


def _records() -> list[Record]:
    out = []
    for i in range(200):
        label = ("COVID", "NORMAL", "PNEUMONIA")[i % 3]
        split = "train" if i < 150 else ("val" if i < 175 else "test")
        out.append(Record(path=f"/x/{i}.png", label=label, patient_id=f"p{i // 2}", split=split))
    out.append(Record(path="/x/unlabelled.png", split="train"))
    return out


def test_label_fractions_are_nested_patient_grouped_and_keep_every_class():
    records = _records()
    kept = {f: {r.path for r in label_fraction(records, f, seed=7)} for f in (0.05, 0.25, 1.0)}
    assert kept[0.05] < kept[0.25] < kept[1.0] == {r.path for r in records}
    for f in (0.05, 0.25):
        subset = label_fraction(records, f, seed=7)
        train = [r for r in subset if r.split == "train" and r.label]
        assert abs(len(train) - f * 150) <= 3 * 2  # within a patient per class
        assert set(Counter(r.label for r in train)) == {"COVID", "NORMAL", "PNEUMONIA"}
        # whole patients only: every kept patient has all of its training images
        per_patient = Counter(r.patient_id for r in train)
        full = Counter(r.patient_id for r in records if r.split == "train" and r.label)
        assert all(per_patient[p] == full[p] for p in per_patient)
        # validation, test and unlabelled rows are untouched
        assert {r.path for r in subset if r.split != "train" or not r.label} == {
            r.path for r in records if r.split != "train" or not r.label
        }
    assert kept[0.25] != {r.path for r in label_fraction(records, 0.25, seed=8)}
    with pytest.raises(Exception, match="fraction"):
        label_fraction(records, 0.0)


def test_ablate_end_to_end_and_continues(cli, tiny_labelled_folder, tmp_path, monkeypatch):
    out = tmp_path / "study"
    args = [
        "ablate",
        tiny_labelled_folder,
        "--out",
        out,
        "--fractions",
        "0.5",
        "--image-size",
        "32",
        "--pretrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--plain-lrs",
        "1e-3,1e-4",
        "--bootstrap",
        "50",
        "--limit-batches",
        "2",
        "--num-workers",
        "0",
        "--json",
    ]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    study = json.loads(result.stdout)
    assert [p["fraction"] for p in study["points"]] == [0.5]
    for point in study["points"]:
        assert set(point["arms"]) == {"cae", "random", "random-plain"}
        assert point["arms"]["cae"]["encoder"].endswith("best")
        assert point["arms"]["random"]["encoder"] == "random"
        plain = point["arms"]["random-plain"]
        assert plain["recipe"] == "all" and len(plain["chosen_from"]) == 2
        chosen = min(plain["chosen_from"].values(), key=lambda c: c["best_val_loss"])
        assert plain["lr"] == chosen["lr"]
        n = {arm["test"]["n"] for arm in point["arms"].values()}
        assert len(n) == 1  # every arm scored on the same test images
        comp = point["comparisons"]["cae-vs-random"]["accuracy"]
        a, b = point["arms"]["cae"]["test"]["accuracy"], point["arms"]["random"]["test"]["accuracy"]
        assert comp["difference"] == pytest.approx(a - b)
        assert comp["ci"][0] <= comp["difference"] <= comp["ci"][1]
    all_train = sum(1 for r in load_records(out / "splits.csv") if r.split == "train")
    assert 0 < study["points"][0]["train_images"] < all_train
    with open(out / "comparisons.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3  # baselines x metrics
    assert (out / "ablation.png").stat().st_size > 1000

    # rerunning continues: nothing is trained again
    def no_training(*a, **k):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr("cxrcae.study.cells.finetune", no_training)
    monkeypatch.setattr("cxrcae.ablation.pretrain", no_training)
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["points"] == study["points"]

    other = cli(*[a if a != "1e-3,1e-4" else "1e-3" for a in args])
    assert other.exit_code == 1 and "other settings (plain_lrs)" in other.output


def test_ablate_out_is_one_writers(cli, tiny_labelled_folder, tmp_path):
    """While another ablate runs (or continues) OUT (here: this process holds its lock), a second one is
    refused at once in one line naming the holder, before splitting anything."""
    out = tmp_path / "study"
    with hold(out, folder=True):
        result = cli("ablate", tiny_labelled_folder, "--out", out)
        assert result.exit_code == 1, result.output
        assert result.output.strip().startswith(f"Error: {out}: in use by process {os.getpid()} (")
        assert len(result.output.strip().splitlines()) == 1
        assert [p.name for p in out.iterdir()] == [".cxrcae.lock"]
