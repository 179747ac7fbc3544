"""evaluate end to end on a tiny random model over a tiny splits CSV; label checks; calibration storage."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae.data import Record, write_records
from cxrcae.errors import DataError
from cxrcae.eval.evaluation import evaluate
from cxrcae.models import build_model
from cxrcae.models.checkpoint import read_config, save_checkpoint

NAMES = ["COVID", "NORMAL"]
PNGS = (
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "roc_curves.png",
    "reliability_diagram.png",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = {"kind": "classifier", "head": "dense5", "image_size": 32, "class_names": NAMES}
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("m") / "clf", config)


@pytest.fixture(scope="module")
def splits_csv(tmp_path_factory):
    """24 synthetic images: 2 classes, 2 sources, patients with 2 images each, train/val/test."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    records = []
    for i in range(24):
        label = NAMES[i % 2]
        arr = (rng.random((40, 40)) * (80 if label == "COVID" else 255)).astype(np.uint8)
        path = root / f"img{i:02d}.png"
        Image.fromarray(arr).save(path)
        split = ("train", "val", "test")[(i // 2) % 3]
        source = "site-a" if i % 4 < 2 else "site-b"
        records.append(Record(path=path, label=label, patient_id=f"p{i // 2}", source=source, split=split))
    return write_records(records, root / "splits.csv")


def test_evaluate_writes_everything(model_dir, splits_csv, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(model_dir, splits_csv, "test", out_dir=out, n_bootstrap=200)
    for name in ("metrics.json", "predictions.csv", "report.html", *PNGS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in PNGS:
        assert Image.open(out / name).size[0] > 100
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["n"] == 8 and metrics["split"] == "test"
    assert metrics["precision"] == "fp32" and metrics["device"] == "cpu"  # same numbers on every machine
    assert sum(metrics["per_class"][c]["support"] for c in NAMES) == 8
    assert set(metrics["per_source"]) == {"site-a", "site-b"}
    assert metrics["ci"]["unit"] == "patient" and metrics["ci"]["n_units"] == 4
    lo, hi = metrics["ci"]["accuracy"]
    assert lo <= metrics["accuracy"] <= hi
    assert 0 <= metrics["calibration"]["ece"] <= 1
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["label"] for r in rows} == set(NAMES)
    assert all(r["status"] == "ok" and r["predicted"] in NAMES for r in rows)
    acc = np.mean([r["predicted"] == r["label"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(acc)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PNGS) and "site-b" in html


def test_default_out_dir_and_bad_file_rows(model_dir, splits_csv, tmp_path):
    rows = list(csv.DictReader(open(splits_csv, newline="")))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows.append({**rows[-1], "path": str(broken), "split": "val"})
    data = splits_csv.parent / "with_broken.csv"  # paths in the CSV are relative to its folder
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = evaluate(model_dir, data, "val", n_bootstrap=0)
    assert result.out_dir == model_dir / "eval-val"
    assert result.metrics["n"] == 8 and result.metrics["n_errors"] == 1
    assert "ci" not in result.metrics
    errors = [r for r in result.predictions if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["path"] == str(broken) and errors[0]["reason"]
    assert any("could not be read" in n for n in result.notes)


def test_unknown_labels_are_refused(model_dir, tmp_path):
    folder = tmp_path / "folder"
    for label in ("COVID", "TUBERCULOSIS"):
        (folder / label).mkdir(parents=True)
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / label / "x.png")
    with pytest.raises(DataError, match="TUBERCULOSIS"):
        evaluate(model_dir, folder, write=False, n_bootstrap=0)


def test_folder_data_is_evaluated_whole_and_says_so(model_dir, tmp_path):
    folder = tmp_path / "folder"
    (folder / "COVID").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(folder / "COVID" / f"{i}.png")
    result = evaluate(model_dir, folder, write=False, n_bootstrap=50)
    assert result.metrics["split"] is None and result.metrics["n"] == 3
    assert any("no split column" in n for n in result.notes)
    assert any("NORMAL" in n for n in result.notes)  # absent class is called out
    assert result.out_dir is None and result.files == {}


def test_missing_split_is_a_clear_error(model_dir, splits_csv):
    with pytest.raises(DataError, match="split='holdout'"):
        evaluate(model_dir, splits_csv, "holdout", write=False)


def test_calibrate_stores_temperature(model_dir, splits_csv, tmp_path):
    import shutil

    local = tmp_path / "clf"
    shutil.copytree(model_dir, local)
    result = evaluate(local, splits_csv, "test", calibrate=True, out_dir=tmp_path / "e", n_bootstrap=0)
    config = read_config(local)
    fit = result.metrics["calibration"]["fit"]
    assert config["temperature"] == pytest.approx(fit["temperature"])
    assert config["calibration"]["split"] == "val" and config["calibration"]["n"] == 8
    assert fit["nll_after"] <= fit["nll_before"] + 1e-9
    assert result.metrics["calibration"]["temperature"] == pytest.approx(fit["temperature"])
    # the weights are untouched: the calibrated folder still loads strictly
    from cxrcae.hub.resolve import load_checkpoint

    load_checkpoint(local)


def test_cli_evaluate_and_calibrate(cli, model_dir, splits_csv, tmp_path):
    import shutil

    out = tmp_path / "cli-eval"
    result = cli("evaluate", model_dir, splits_csv, "--out", out, "--bootstrap", "100", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    assert "macro avg" in result.output and "site-a" in result.output and "95% CIs" in result.output
    assert (out / "metrics.json").is_file()

    local = tmp_path / "clf"
    shutil.copytree(model_dir, local)
    cal = cli("calibrate", local, splits_csv, "--json", "--num-workers", "0")
    assert cal.exit_code == 0, cal.output
    assert read_config(local)["temperature"] == pytest.approx(json.loads(cal.stdout)["temperature"])

    folder_data = cli("calibrate", local, tmp_path / "nope.csv")
    assert folder_data.exit_code == 1 and "Traceback" not in folder_data.output
