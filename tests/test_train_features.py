"""Frozen-encoder stages on cached features (``cxrcae.train.features``): the same run as on the images.

Tiny real X-rays (mini_folder: 12 images at 32 px) with one unreadable file in train and one in val, the
bundled X-ray-pretrained encoder, fp32 on the CPU. Each run takes a few seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import Interrupt, stop_at_epoch
from cxrcae import bundled
from cxrcae.data import load_records, write_records
from cxrcae.data.splits import make_splits
from cxrcae.errors import ImageLoadError
from cxrcae.hub.resolve import encoder_state
from cxrcae.models import CAEEncoder, CXRClassifier, build_head
from cxrcae.models.checkpoint import read_weights
from cxrcae.runtime import reproducible
from cxrcae.train import FinetuneConfig, engine, resume_run
from cxrcae.train.data import finetune_data
from cxrcae.train.engine import check_out_dir
from cxrcae.train.features import CachedFeatures, HeadOnly, use_cached_features
from cxrcae.train.finetuning import apply_stage, run_finetune

ENCODER = bundled.bundled_encoder()
SETTINGS = dict(image_size=32, epochs=3, batch_size=4, stages=("head",), precision="fp32", num_workers=0)


@pytest.fixture(scope="module")
def splits(mini_folder, tmp_path_factory) -> Path:
    """mini_folder split 2:1 into train/val, plus one corrupt file in each."""
    root = tmp_path_factory.mktemp("features")
    records = make_splits(load_records(mini_folder), (0.67, 0.33, 0.0), seed=0, dedupe=False)
    for split in ("train", "val"):
        bad = root / f"corrupt-{split}.jpg"
        bad.write_bytes(b"not an image")
        records.append(replace(records[0], path=bad, split=split))
    return write_records(records, root / "splits.csv")


def _finetune(data: Path, out: Path, *, cache: bool, progress=None, **overrides):
    """``finetune`` with the choice of path that ``run_finetune`` offers tests."""
    cfg = FinetuneConfig(**{**SETTINGS, "encoder": str(ENCODER), **overrides})
    cfg.validate()
    out = check_out_dir(out)
    extra = {"progress": progress} if progress else {}
    with reproducible(cfg.seed):
        return run_finetune(finetune_data(data, out, cfg.seed), out, cfg, cache_features=cache, **extra)


def _head(folder: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_weights(Path(folder)).items() if k.startswith("head.")}


@pytest.mark.parametrize(
    "overrides",
    [
        {"head": "lstm-dense3"},  # dropout in the head: the global RNG is drawn in the same order
        {"balance": "sampler", "batch_size": 3},  # weighted sampling with replacement, a short last batch
    ],
    ids=["dropout", "sampler"],
)
def test_cached_features_give_the_same_run(splits, tmp_path, overrides):
    images = _finetune(splits, tmp_path / "images", cache=False, **overrides)
    cached = _finetune(splits, tmp_path / "cached", cache=True, **overrides)

    assert [s["features_cached"] for s in images.stages] == [False]
    assert [s["features_cached"] for s in cached.stages] == [True]
    assert cached.stages[0]["features_mb"] > 0
    assert len(cached.history) == len(images.history) == 3
    for a, b in zip(images.history, cached.history):
        assert b["train_images"] == a["train_images"] and b["best"] == a["best"]
        for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a, b)
    assert cached.best_epoch == images.best_epoch
    assert cached.skipped_files == images.skipped_files
    # every epoch lists the unreadable files it met (the sampler may never draw the train one)
    expected = {"corrupt-val.jpg"} | (set() if "balance" in overrides else {"corrupt-train.jpg"})
    assert {Path(s.split(":")[0]).name for s in cached.skipped_files} == expected
    a, b = _head(images.best_dir), _head(cached.best_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    # the run records which path it took
    stages_run = json.loads((Path(cached.best_dir) / "config.json").read_text())["training"]["stages_run"]
    assert stages_run[0]["features_cached"] is True


def test_best_checkpoint_holds_the_full_classifier_with_the_initial_encoder(splits, tmp_path):
    result = _finetune(splits, tmp_path / "run", cache=True, epochs=2)
    assert result.stages[0]["features_cached"]
    initial, _ = encoder_state(ENCODER)
    for folder in ("best", "last"):
        saved = read_weights(tmp_path / "run" / folder)
        encoder = {k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")}
        assert encoder.keys() == initial.keys()
        for key, value in initial.items():
            assert torch.equal(encoder[key], value.to(encoder[key].dtype)), (folder, key)
        assert any(k.startswith("head.") for k in saved)


def _never_encode(*args, **kwargs):
    raise AssertionError("the features were cached")


def test_augmentation_and_unfrozen_stages_stay_on_the_images(splits, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "encode", _never_encode)
    augmented = _finetune(splits, tmp_path / "augmented", cache=True, epochs=1, augment=True)
    assert [s["features_cached"] for s in augmented.stages] == [False]
    staged = _finetune(splits, tmp_path / "staged", cache=True, epochs=1, stages=("conv6", "all"))
    assert [s["features_cached"] for s in staged.stages] == [False, False]
    smoke = _finetune(splits, tmp_path / "smoke", cache=True, epochs=1, limit_batches=1)
    assert [s["features_cached"] for s in smoke.stages] == [False]


def test_use_cached_features_decides_per_stage():
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 32))
    cfg = FinetuneConfig(image_size=32)
    apply_stage(model, "head")
    assert use_cached_features(model, cfg)
    assert not use_cached_features(model, replace(cfg, augment=True))
    assert not use_cached_features(model, replace(cfg, limit_batches=2))
    apply_stage(model, "conv6")
    assert not use_cached_features(model, cfg)
    assert not use_cached_features(CAEEncoder(), cfg)  # not a classifier (e.g. pretraining)


def test_head_only_applies_the_head_of_the_classifier():
    torch.manual_seed(0)
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 32)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(HeadOnly(model)(features), model(x))
    cache = CachedFeatures([features[0], None], [1, -1], ["a.png", "b.png"], {1: "cannot decode"})
    assert cache[0]["label"] == 1 and torch.equal(cache[0]["image"], features[0])
    with pytest.raises(ImageLoadError, match="b.png: cannot decode"):
        cache[1]


def test_resumed_cached_stage_reaches_the_same_weights(splits, tmp_path):
    overrides = {"head": "lstm-dense3", "stages": ("head", "all"), "epochs": 2, "lr_unfrozen": 1e-3}
    full = _finetune(splits, tmp_path / "full", cache=True, **overrides)
    with pytest.raises(Interrupt):
        _finetune(splits, tmp_path / "cut", cache=True, progress=stop_at_epoch(2), **overrides)
    resumed = resume_run(tmp_path / "cut")
    assert [s["features_cached"] for s in resumed.stages] == [True, False]
    assert [r["val_loss"] for r in resumed.history] == pytest.approx([r["val_loss"] for r in full.history])
    for folder in ("best", "last"):
        a, b = read_weights(tmp_path / "full" / folder), read_weights(tmp_path / "cut" / folder)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (folder, key)
