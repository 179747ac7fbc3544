"""The model, encoder and samples shipped inside the package: offline, deterministic, and as good as the card
says on the test split recorded with them."""

from __future__ import annotations

import csv
import hashlib
import json

import huggingface_hub
import pytest
import torch

from conftest import HAVE_SHARED, SHARED_DATA
from cxrcae import bundled
from cxrcae.models.checkpoint import read_config, read_weights


def test_bundled_folders_are_complete_checkpoints():
    clf, enc = bundled.bundled_classifier(), bundled.bundled_encoder()
    assert clf is not None and enc is not None
    clf_cfg, enc_cfg = read_config(clf), read_config(enc)
    assert clf_cfg["kind"] == "classifier" and clf_cfg["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert enc_cfg["kind"] == "encoder" and enc_cfg["image_size"] == clf_cfg["image_size"]
    for folder in (clf, enc):
        weights = read_weights(folder, read_config(folder))  # sha256-checked
        assert {t.dtype for t in weights.values()} == {torch.float16}
        card = (folder / "README.md").read_text()
        assert "research use only" in card.lower() and "not a medical device" in card.lower()
    card = (clf / "README.md").read_text()
    metrics = json.loads((clf / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.4f}" in card and "Test results by source" in card
    assert "scripts/train_bundled_model.sh" in card


def test_samples_cli_then_predict_without_model_is_deterministic(cli, tmp_path):
    out = tmp_path / "samples"
    result = cli("samples", "--out", out)
    assert result.exit_code == 0, result.output
    images = sorted(p for p in out.iterdir() if p.suffix == ".jpg")
    assert len(images) >= 6 and (out / "ATTRIBUTION.md").is_file()
    assert "CC BY" in (out / "ATTRIBUTION.md").read_text()
    runs = []
    for name in ("a.json", "b.json"):
        result = cli("predict", out, "--output", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs.append(json.loads((tmp_path / name).read_text()))
    assert runs[0] == runs[1]
    rows = [r for r in runs[0] if r["status"] == "ok"]
    assert len(rows) == len(images)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    # file names start with the true label; the shipped model gets most of its own samples right
    right = sum(r["label"].lower() == r["path"].rsplit("/", 1)[-1].split("_")[0] for r in rows)
    assert right >= len(rows) // 2, rows


def test_load_encoder_and_timm_use_the_bundled_encoder_offline(monkeypatch):
    import timm

    import cxrcae

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    encoder = cxrcae.load_encoder()
    model = timm.create_model("cxrcae_vgg_cae", pretrained=True)
    size = read_config(bundled.bundled_encoder())["image_size"]
    assert model.pretrained_cfg["input_size"] == (3, size, size) and encoder.image_size == size
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), encoder(x), atol=1e-5)
    assert encoder.stages.conv1.weight.dtype == torch.float32  # stored as fp16, computed in fp32


@pytest.mark.skipif(not HAVE_SHARED, reason="shared X-ray data absent: the recorded test split is not here")
def test_bundled_classifier_scores_what_its_card_says(tmp_path):
    from cxrcae.eval.evaluation import evaluate

    folder = bundled.bundled_classifier()
    card = json.loads((folder / "metrics.json").read_text())
    rows = []
    with open(folder / "test_split.csv", newline="") as f:
        for r in csv.DictReader(f):
            path = SHARED_DATA / "cxr" / r["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"], path
            rows.append(
                {
                    "path": str(path),
                    "label": r["label"],
                    "source": r["source"],
                    "patient_id": r["patient_id"],
                    "split": "test",
                }
            )
    assert len(rows) == card["n"]
    splits = tmp_path / "test.csv"
    with open(splits, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = evaluate(folder, splits, split="test", precision="fp32", n_bootstrap=0, write=False)
    metrics = result.metrics
    assert metrics["accuracy"] == pytest.approx(card["accuracy"], abs=0.005)
    assert metrics["macro"]["auc"] == pytest.approx(card["macro"]["auc"], abs=0.005)
