"""predict and evaluate drive any task through its hooks: multi-label and segmentation models end to end
through the CLI, classify-only switches refused in one line, and a model given data of another task's
shape."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae.errors import CxrcaeError
from cxrcae.eval.calibration import calibrate
from cxrcae.infer.onnx import HAVE_ONNX, HAVE_ONNXRUNTIME, export_onnx
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.serve.runner import ModelRunner
from cxrcae.tasks import build_model, get_task

LABELS = ["Effusion", "Narrowing", "Normal"]
SCREEN = ["out_of_distribution", "ood_score", "ood_reason"]


@pytest.fixture(scope="module")
def multilabel_model(tmp_path_factory):
    config, _ = get_task("multilabel").example(32)
    config = {**config, "label_names": LABELS, "thresholds": [0.5, 0.5, 0.5]}
    torch.manual_seed(0)
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("ml") / "model", config)


@pytest.fixture(scope="module")
def small_manifest(knee_findings_manifest, tmp_path_factory):
    """The first 12 knees of the multi-label manifest (6 patients), paths absolute."""
    with open(knee_findings_manifest, newline="") as f:
        rows = list(csv.DictReader(f))[:12]
    for row in rows:
        row["path"] = str(knee_findings_manifest.parent / row["path"])
    out = tmp_path_factory.mktemp("ml-data") / "manifest.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _images(manifest) -> list[str]:
    with open(manifest, newline="") as f:
        return [r["path"] for r in csv.DictReader(f)][:4]


def test_predict_writes_the_tasks_columns(cli, multilabel_model, small_manifest, tmp_path):
    out = tmp_path / "rows.csv"
    args = ["-m", multilabel_model, "--num-workers", "0", "--no-ood"]
    result = cli("predict", *_images(small_manifest), *args, "-o", out)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    probs = [f"p_{n}" for n in LABELS]
    assert reader.fieldnames == ["path", "status", "findings", *probs, "reason", *SCREEN]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert all(0 <= float(row[p]) <= 1 for p in probs)
        found = {n for n in LABELS if float(row[f"p_{n}"]) >= 0.5}
        assert set(filter(None, row["findings"].split("|"))) == found
    assert "findings" in result.output and "p_Effusion" in result.output  # the task's terminal cells

    listed = cli("predict", *_images(small_manifest), *args, "--json")
    assert listed.exit_code == 0, listed.output
    (first, *_) = json.loads(listed.stdout)
    assert set(first) == {"path", "status", "findings", *probs, "reason", *SCREEN}
    assert "label" not in first and "explanation" not in first  # nothing of a classifier's rows


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--top-k", "2"], "--top-k"),
        (["--threshold", "0.5"], "--threshold"),
        (["--explain", "cams"], "--explain"),
    ],
)
def test_classify_only_predict_switches_are_refused(cli, multilabel_model, small_manifest, extra, flag):
    result = cli("predict", _images(small_manifest)[0], "-m", multilabel_model, "--num-workers", "0", *extra)
    assert result.exit_code == 1
    assert f"{flag} is not available for a 'multilabel' model" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2


def test_classify_only_commands_are_refused(cli, multilabel_model, small_manifest, tmp_path):
    with pytest.raises(CxrcaeError, match="not available for a 'multilabel' model"):
        calibrate(multilabel_model, small_manifest, device="cpu")
    with pytest.raises(CxrcaeError, match="serve is not available for a 'multilabel' model"):
        ModelRunner(multilabel_model, device="cpu")
    if HAVE_ONNX and HAVE_ONNXRUNTIME:
        with pytest.raises(CxrcaeError, match="ONNX export is not available for a 'multilabel' model"):
            export_onnx(multilabel_model, tmp_path / "m.onnx")
    result = cli("evaluate", multilabel_model, small_manifest, "--bins", "10", "--out", tmp_path / "e")
    assert result.exit_code == 1 and "--bins is not available" in result.output
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_evaluate_scores_any_task(cli, multilabel_model, small_manifest, tmp_path):
    out = tmp_path / "eval"
    args = ["--out", out, "--bootstrap", "20", "--num-workers", "0", "--device", "cpu"]
    result = cli("evaluate", multilabel_model, small_manifest, *args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["set"] == "external"
    assert set(metrics["per_label"]) == set(LABELS) and {"macro", "micro"} <= set(metrics)
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "ok" and r["findings"] is not None for r in rows)
    assert "Effusion" in result.output and "AUC" in result.output  # the task's own table
    assert (out / "report.html").is_file() and not (out / "confusion_matrix.png").exists()


def test_a_model_given_data_of_another_shape_says_which_column(
    cli, multilabel_model, small_manifest, tmp_path
):
    config, _ = get_task("classify").example(32)
    torch.manual_seed(0)
    classifier = save_checkpoint(build_model(config), tmp_path / "clf", config)
    no_labels = cli("evaluate", classifier, small_manifest, "--out", tmp_path / "a")
    assert no_labels.exit_code == 1 and "label" in no_labels.output
    assert "Traceback" not in no_labels.output

    other = tmp_path / "other.csv"
    with open(small_manifest, newline="") as f:
        rows = [{"path": r["path"], "label": "Normal"} for r in csv.DictReader(f)]
    with open(other, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    wrong = cli("evaluate", multilabel_model, other, "--out", tmp_path / "b")
    assert wrong.exit_code == 1 and "finding" in wrong.output and "Traceback" not in wrong.output


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    config, _ = get_task("segment").example(32)
    config = {**config, "structures": ["a", "b"]}
    torch.manual_seed(0)
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("seg") / "model", config)


@pytest.fixture(scope="module")
def shapes_manifest(tmp_path_factory):
    """6 gray images with a bright disc (structure ``a``) and rectangle (``b``) and their mask PNGs."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    rows = []
    for i in range(6):
        cy, cx = (int(v) for v in rng.integers(10, 20, 2))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
        rect = (yy >= 28) & (yy < 40) & (xx >= 26 + i) & (xx < 40)
        image = (0.2 + 0.5 * disc + 0.3 * rect + 0.05 * rng.random((48, 48))) * 255
        names = {"path": f"im{i}.png", "a": f"a{i}.png", "b": f"b{i}.png"}
        for key, array in (("path", image), ("a", disc * 255), ("b", rect * 255)):
            Image.fromarray(np.asarray(array, dtype=np.uint8)).save(root / names[key])
        rows.append({**names, "patient_id": f"p{i // 2}"})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def test_segmenter_predicts_areas_and_writes_its_files(cli, segmenter, shapes_manifest, tmp_path):
    out, files = tmp_path / "rows.csv", tmp_path / "masks"
    images = sorted(str(p) for p in shapes_manifest.parent.glob("im*.png"))
    args = ["-m", segmenter, "--num-workers", "0", "--no-ood", "-o", out, "--files", files]
    result = cli("predict", *images, *args)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    areas = ["a_area_fraction", "a_area_px", "b_area_fraction", "b_area_px"]
    assert reader.fieldnames == ["path", "status", *areas, "a_mask", "b_mask", "overlay", "reason", *SCREEN]
    assert len(rows) == 6 and all(0 <= int(r["a_area_px"]) <= 32 * 32 for r in rows)
    for row in rows:
        for column in ("a_mask", "b_mask", "overlay"):
            assert Path(row[column]).parent == files and Image.open(row[column]).size[0] > 0
    assert len({r["overlay"] for r in rows}) == 6  # one set of files per input


def test_segmenter_evaluates_with_its_own_metrics_and_files(cli, segmenter, shapes_manifest, tmp_path):
    out = tmp_path / "eval"
    args = ["--out", out, "--bootstrap", "10", "--num-workers", "0", "--device", "cpu", "--by", "patient_id"]
    result = cli("evaluate", segmenter, shapes_manifest, *args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and {"a", "b"} <= set(metrics)
    groups = metrics["subgroups"]["patient_id"]["groups"]
    assert set(groups) == {"p0", "p1", "p2"} and all(g["n"] == 2 and "a" in g for g in groups.values())
    assert "By patient_id" in result.output and "mean Dice" in result.output  # its own summary row
    assert (out / "overlays" / "worst_1.png").is_file() and (out / "report.html").is_file()
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["status"] == "ok" and r["a_area_px"] != "" for r in rows)
    no_masks = cli("evaluate", segmenter, shapes_manifest.parent, "--out", tmp_path / "x")
    assert no_masks.exit_code == 1 and "Traceback" not in no_masks.output
