"""evaluate end to end on a tiny random model over a tiny splits CSV; label checks; calibration storage."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae.data import Record, write_records
from cxrcae.errors import DataError
from cxrcae.eval.evaluation import evaluate
from cxrcae.locking import LockedError, hold
from cxrcae.models.checkpoint import read_config, save_checkpoint
from cxrcae.tasks import build_model

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
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["label"] for r in rows} == set(NAMES)
    assert all(r["status"] == "ok" and r["predicted"] in NAMES for r in rows)
    acc = np.mean([r["predicted"] == r["label"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(acc)
    # ECE recomputed from the rows: 15 equal-width confidence bins, |accuracy - confidence| weighted by size
    bins: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        confidence = float(r["confidence"])
        bins.setdefault(min(int(confidence * 15), 14), []).append((r["correct"] == "True", confidence))
    ece = sum(abs(sum(c for c, _ in b) - sum(p for _, p in b)) for b in bins.values()) / len(rows)
    assert metrics["calibration"]["ece"] == pytest.approx(ece)
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
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["split"] == "test" and metrics["ci"]["n_units"] == 4
    assert f"{metrics['accuracy']:.3f}" in result.output  # the table shows what metrics.json holds

    local = tmp_path / "clf"
    shutil.copytree(model_dir, local)
    cal = cli("calibrate", local, splits_csv, "--json", "--num-workers", "0")
    assert cal.exit_code == 0, cal.output
    assert read_config(local)["temperature"] == pytest.approx(json.loads(cal.stdout)["temperature"])

    folder_data = cli("calibrate", local, tmp_path / "nope.csv")
    assert folder_data.exit_code == 1 and "Traceback" not in folder_data.output


@pytest.fixture(scope="module")
def external_csv(splits_csv):
    """The same 24 images as a manifest: no split column, extra view and age columns."""
    rows = list(csv.DictReader(open(splits_csv, newline="")))
    for i, row in enumerate(rows):
        del row["split"]
        row["view"] = "PA" if i % 3 else "AP"
        row["age"] = str(20 + 3 * i)
    path = splits_csv.parent / "external.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_without_split_is_external_with_subgroups(model_dir, external_csv, tmp_path):
    import shutil

    local = tmp_path / "clf"
    shutil.copytree(model_dir, local)
    result = evaluate(local, external_csv, by=["view", "age:20", "source+view"], n_bootstrap=100)
    m = result.metrics
    assert result.out_dir == local / "eval-external"
    assert m["set"] == "external" and m["split"] is None and m["n"] == 24
    assert list(m["subgroups"]) == ["view", "age:20", "source+view"] and "per_source" not in m
    assert list(m["subgroups"]["age:20"]["groups"]) == ["20-39", "40-59", "60-79", "80-99"]
    views = m["subgroups"]["view"]["groups"]
    assert {k: g["n"] for k, g in views.items()} == {"AP": 8, "PA": 16}
    assert all(g["small"] and g["flags"][0].startswith("n=") for g in views.values())  # all under 30
    assert views["PA"]["ci"]["unit"] == "patient"
    assert set(m["subgroups"]["source+view"]["groups"]) == {
        f"site-{s} / {v}" for s in "ab" for v in ("AP", "PA")
    }
    with open(result.files["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert (
        {r["set"] for r in rows} == {"external"} and rows[1]["age:20"] == "20-39" and rows[0]["view"] == "AP"
    )
    html = (local / "eval-external" / "report.html").read_text()
    assert "external set" in html and "By age:20" in html and "fewer than 30 images" in html
    assert "<tr class='marked'>" in html  # small subgroups stay in the table, shaded
    assert json.loads((local / "eval-external" / "metrics.json").read_text())["set"] == "external"

    with pytest.raises(DataError, match="'sex'"):  # before any image is run through the model
        evaluate(local, external_csv, by=["sex"], write=False)


def test_external_set_is_matched_against_the_models_own_test_split(model_dir, external_csv, tmp_path):
    import hashlib
    import shutil

    local = tmp_path / "clf"
    shutil.copytree(model_dir, local)
    rows = list(csv.DictReader(open(external_csv, newline="")))
    held = [external_csv.parent / r["path"] for r in rows[:5]]
    with open(local / "test_split.csv", "w", newline="") as f:
        f.write("path,label,sha256\n")
        f.writelines(f"{p.name},COVID,{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in held)
    result = evaluate(local, external_csv, by=["in_model_test_split"], n_bootstrap=0, write=False)
    assert result.metrics["model_test_split"]["in_test_split"] == 5
    assert any("only 5 of 24 images" in n for n in result.notes)
    groups = result.metrics["subgroups"]["in_model_test_split"]["groups"]
    assert {k: g["n"] for k, g in groups.items()} == {"no": 19, "yes": 5}
    assert [r["in_model_test_split"] for r in result.predictions[:6]] == ["yes"] * 5 + ["no"]
    # a splits CSV is not an external set: no matching, the split is named
    test = evaluate(local, external_csv.parent / "splits.csv", "test", n_bootstrap=0, write=False)
    assert test.metrics["set"] == "test" and "model_test_split" not in test.metrics


def test_cli_evaluate_by(cli, model_dir, external_csv, tmp_path):
    out = tmp_path / "e"
    args = ("--bootstrap", "50", "--num-workers", "0", "--out", out)
    result = cli("evaluate", model_dir, external_csv, "--by", "source", "--by", "age:30", *args)
    assert result.exit_code == 0, result.output
    assert "external set" in result.output and "By source" in result.output and "By age:30" in result.output
    assert "marked:" in result.output
    bad = cli("evaluate", model_dir, external_csv, "--by", "age:x", *args)
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "--by 'age:x'" in bad.output


def test_evaluate_out_is_one_writers(cli, model_dir, splits_csv, tmp_path):
    """While another evaluate writes OUT (here: this process holds its lock), evaluate --out OUT is refused
    at once in one line naming the holder; the default folder is held while written."""
    out, fast = tmp_path / "e", ("--bootstrap", "0", "--num-workers", "0")
    with hold(out, folder=True):
        result = cli("evaluate", model_dir, splits_csv, "--out", out, *fast)
        assert result.exit_code == 1, result.output
        assert result.output.strip().startswith(f"Error: {out}: in use by process {os.getpid()} (")
        assert len(result.output.strip().splitlines()) == 1
        assert [p.name for p in out.iterdir()] == [".cxrcae.lock"]  # nothing written beside the holder
        with hold(model_dir / "eval-val", folder=True), pytest.raises(LockedError, match="eval-val"):
            evaluate(model_dir, splits_csv, "val", n_bootstrap=0)
    assert cli("evaluate", model_dir, splits_csv, "--out", out, *fast).exit_code == 0
    assert (out / "metrics.json").is_file() and not (out / ".cxrcae.lock").exists()
