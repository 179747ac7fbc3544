"""Encoders by name (cxrcae.hub.encoders) and ``cxrcae probe`` on a non-chest body part and multi-label data.

The datasets are synthetic knee radiographs (``draw_knee`` in conftest): class folders ``0``/``1``/``2`` by
joint-space width, and a manifest whose ``finding`` column holds ``Narrowing/Effusion``-style strings.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from cxrcae import bundled
from cxrcae.data.labels import LabelSource
from cxrcae.errors import CheckpointError, CxrcaeError
from cxrcae.eval.probe import _fraction_mask, encode_records, fit_probe, probe_data
from cxrcae.hub.encoders import cae_encoder_ref, resolve_encoder
from cxrcae.hub.resolve import load_encoder

FAST = ["--image-size", "32", "--bootstrap", "200", "--batch-size", "32"]
needs_bundled = pytest.mark.skipif(bundled.bundled_encoder() is None, reason="build without bundled weights")


# ----------------------------------------------------------------------------------------------- resolver


@needs_bundled
def test_bundled_and_random_are_the_same_architecture():
    shipped, rand = resolve_encoder("bundled"), resolve_encoder("random", seed=3)
    assert shipped.kind == "bundled" and rand.kind == "random"
    assert shipped.backbone.state_dict().keys() == rand.backbone.state_dict().keys()
    assert (shipped.image_size, shipped.resize_mode) == (rand.image_size, rand.resize_mode)
    same_seed = resolve_encoder("random", seed=3).backbone.state_dict()
    for key, value in rand.backbone.state_dict().items():
        assert torch.equal(value, same_seed[key])  # seeded
    assert not torch.equal(rand.backbone.stages.conv1.weight, shipped.backbone.stages.conv1.weight)
    before = torch.random.get_rng_state()
    resolve_encoder("random", seed=5)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is left alone
    with torch.no_grad():
        features = shipped.pooled()(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 512) and torch.isfinite(features).all()
    by_name = load_encoder("bundled").state_dict()  # every place that takes an encoder knows the name
    for key, value in load_encoder().state_dict().items():
        assert torch.equal(value, by_name[key]) and torch.equal(value, shipped.backbone.state_dict()[key])


def test_timm_models_random_or_strictly_loaded(tmp_path):
    enc = resolve_encoder("timm:test_resnet")
    assert enc.kind == "timm" and enc.image_size == 160 and enc.mean == (0.5, 0.5, 0.5)  # its pretrained_cfg
    with torch.no_grad():
        assert enc.pooled()(torch.rand(2, 3, 64, 64)).shape == (2, enc.num_features)
    # a headless .safetensors and a .pth with a 10-class head both load strictly, into the same features
    import timm

    source = timm.create_model("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    source.reset_classifier(0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = resolve_encoder(f"timm:test_resnet:{tmp_path / 'w.pth'}").pooled()(x)
        b = resolve_encoder(f"timm:test_resnet:{tmp_path / 'w.safetensors'}").pooled()(x)
        c = resolve_encoder("timm:test_resnet", seed=1).pooled()(x)
    assert torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(CheckpointError, match="weights do not fit the model; missing keys"):
        resolve_encoder(f"timm:test_efficientnet:{tmp_path / 'w.safetensors'}")
    with pytest.raises(CxrcaeError, match="timm has no model 'no_such_net'"):
        resolve_encoder("timm:no_such_net")
    with pytest.raises(CheckpointError, match="no such weights file"):
        resolve_encoder(f"timm:test_resnet:{tmp_path / 'missing.pth'}")


def test_unknown_encoder_lists_the_choices(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder") as err:
        resolve_encoder(str(tmp_path / "nowhere"))
    assert "timm:NAME" in " ".join(getattr(err.value, "__notes__", []))


@needs_bundled
def test_finetune_encoder_refs():
    assert cae_encoder_ref("bundled") == "bundled"
    assert cae_encoder_ref("random") is None and cae_encoder_ref("none") is None
    with pytest.raises(CxrcaeError, match="a timm model can be probed"):
        cae_encoder_ref("timm:resnet18")


# ----------------------------------------------------------------------------------------------- probe


@pytest.mark.parametrize("encoder", ["random", pytest.param("bundled", marks=needs_bundled)])
def test_probe_knee_class_folders(cli, knee_folder, tmp_path, encoder):
    out = tmp_path / "probe"
    res = cli("probe", encoder, knee_folder, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert "Skipped unreadable file" in res.output and "broken.png" in res.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "classify" and summary["names"] == ["0", "1", "2"]
    assert summary["encoder"]["spec"] == encoder and summary["split_origin"] == "made"
    assert summary["counts"]["skipped_files"] == 1
    assert sum(summary["counts"][s] for s in ("train", "val", "test")) == 60  # 61 files, one unreadable
    assert summary["C"] in [row["C"] for row in summary["c_search"]]
    assert summary["test"]["accuracy"] >= 0.75  # chance is 1/3: the joint gap is learned, not guessed
    assert summary["headline"]["macro_auc"]["value"] >= 0.9
    lo, hi = summary["headline"]["macro_auc"]["ci"]
    assert lo <= summary["headline"]["macro_auc"]["value"] <= hi
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"0", "1", "2", "macro", "weighted", "all"} <= {r["label"] for r in rows}
    with open(out / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == summary["counts"]["test"] and "prob_2" in preds[0]


def test_probe_multilabel_manifest(cli, knee_findings_manifest, tmp_path):
    out = tmp_path / "ml"
    res = cli(
        "probe",
        "random",
        knee_findings_manifest,
        "--labels",
        "finding",
        "--label-sep",
        "/",
        "--out",
        out,
        *FAST,
    )
    assert res.exit_code == 0, res.output
    assert "micro" in res.output and "Effusion" in res.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "multilabel" and summary["names"] == ["Effusion", "Narrowing", "Normal"]
    assert summary["labels"] == {"column": "finding", "sep": "/"}
    assert len(summary["thresholds"]) == 3
    test = summary["test"]
    assert test["per_label"]["Narrowing"]["auc"] >= 0.9 and test["macro"]["auc"] >= 0.8
    assert set(test["ci"]["micro"]) == {"auc", "ap", "f1", "precision", "recall"}
    assert test["ci"]["unit"] == "patient"  # two knees per patient, resampled together
    with open(out / "metrics.csv", newline="") as f:
        rows = {(r["label"], r["metric"]) for r in csv.DictReader(f)}
    assert ("Narrowing", "ap") in rows and ("micro", "f1") in rows and ("Normal", "threshold") in rows


def test_probe_errors_are_one_line(cli, knee_findings_manifest, knee_folder, tmp_path):
    res = cli("probe", "random", knee_findings_manifest, "--labels", "findings", *FAST)
    assert res.exit_code == 1 and "no column 'findings'" in res.output and "Traceback" not in res.output
    res = cli("probe", "random", knee_folder, "--labels", "finding", *FAST)
    assert res.exit_code == 1 and "read from a manifest CSV" in res.output
    # a manifest split that puts a finding in test only
    rows = list(csv.DictReader(open(knee_findings_manifest, newline="")))
    for i, row in enumerate(rows):
        row["path"] = str(knee_findings_manifest.parent / row["path"])
        row["split"] = "test" if "Effusion" in row["finding"] else ("val" if i % 5 == 0 else "train")
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    res = cli("probe", "random", bad, "--labels", "finding", "--label-sep", "/", *FAST)
    assert res.exit_code == 1 and "'Effusion' is in test" in res.output and "never in train" in res.output
    res = cli("probe", "timm:no_such_net", knee_folder, *FAST)
    assert res.exit_code == 1 and "timm has no model" in res.output


@pytest.fixture(scope="module")
def knee_findings_encoded(knee_findings_manifest):
    """The benchmark's way: the data read and split, and every image encoded, once."""
    pdata = probe_data(knee_findings_manifest, LabelSource(column="finding", sep="/"), seed=0)
    return pdata, encode_records(resolve_encoder("random"), [r.path for r in pdata.records], image_size=32)


def test_fractions_are_nested_and_share_features(knee_findings_encoded):
    """Fit per fraction on the same features; smaller train sets lie inside larger ones."""
    pdata, feats = knee_findings_encoded
    masks = {f: _fraction_mask(pdata, f, seed=0) for f in (0.25, 0.5, 1.0)}
    assert masks[0.25].sum() < masks[0.5].sum() < masks[1.0].sum()
    assert not (masks[0.25] & ~masks[0.5]).any() and not (masks[0.5] & ~masks[1.0]).any()
    val_test = pdata.split_of() != "train"
    assert masks[0.25][val_test].all()  # val and test are never thinned
    small = fit_probe(pdata, feats, fraction=0.5, n_bootstrap=0)
    full = fit_probe(pdata, feats, fraction=1.0, n_bootstrap=0)
    assert small.counts["train"] < full.counts["train"] and small.counts["test"] == full.counts["test"]
    assert "ci" not in full.metrics and np.isfinite(full.test_probs).all()


def test_probe_table_fits_80_columns(knee_findings_encoded, monkeypatch):
    from cxrcae.cli.commands import probe as command

    pdata, feats = knee_findings_encoded
    result = fit_probe(pdata, feats, n_bootstrap=50)
    narrow = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(command, "console", narrow)
    command._render(result)
    text = narrow.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    cells = re.findall(r"\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", text)
    assert len(cells) == 3 * 5  # AUC, AP, F1 with whole CIs for 3 labels, macro and micro
