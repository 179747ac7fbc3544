"""Training on real X-rays at tiny sizes: learning happens, resume is exact, NaN stops cleanly, configs record
everything. The slow fixtures (a real pretraining and fine-tuning) run once per module."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import Interrupt, stop_at_epoch
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import load_checkpoint
from cxrcae.models.checkpoint import read_weights
from cxrcae.train import FinetuneConfig, NonFiniteLossError, PretrainConfig, finetune, pretrain, resume_run

FAST = {"precision": "fp32", "num_workers": 0}


@pytest.fixture(scope="module")
def pretrained(tiny_labelled_folder, tmp_path_factory):
    """A real CAE pretraining at 64 px on 90 images (8 epochs of ~20 optimiser steps)."""
    out = tmp_path_factory.mktemp("runs") / "cae"
    cfg = PretrainConfig(image_size=64, epochs=8, batch_size=4, **FAST)
    return pretrain(tiny_labelled_folder, out, cfg)


@pytest.fixture(scope="module")
def finetuned(pretrained, tiny_labelled_folder, tmp_path_factory):
    """Head-only fine-tuning over the pretrained (frozen) encoder; ``head_init`` keeps the head's initial
    weights so a test can tell that the head trained.

    Batch 4 (~17 steps an epoch): the LSTM head starts on a plateau near the class priors and needs some
    50-100 Adam steps to leave it; at batch 8 (8 steps an epoch) that took up to the last of 8 epochs, and
    early stopping then kept a prior-only epoch on some CPUs (one class for every image)."""
    import cxrcae.models
    import cxrcae.tasks.classify

    out = tmp_path_factory.mktemp("runs") / "clf"
    cfg = FinetuneConfig(
        image_size=64, epochs=10, batch_size=4, stages=("head",), encoder=pretrained.best_dir, **FAST
    )
    initial: dict[str, torch.Tensor] = {}
    build_head = cxrcae.models.build_head

    def recording_build_head(*args, **kwargs):
        head = build_head(*args, **kwargs)
        initial.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        return head

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cxrcae.tasks.classify, "build_head", recording_build_head)
        result = finetune(tiny_labelled_folder, out, cfg)
    result.head_init = initial
    return result


def _config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


# --- learning ------------------------------------------------------------------------------------------


def test_pretrain_beats_mean_image_baseline(pretrained):
    baseline = pretrained.baseline["val_mse_mean_image"]
    assert pretrained.best_val_loss < baseline, (pretrained.best_val_loss, baseline, pretrained.history)
    assert pretrained.history[0]["val_loss"] > pretrained.best_val_loss  # it improved while training
    assert not pretrained.notes


def test_pretrain_run_folder(pretrained):
    out = Path(pretrained.out_dir)
    for name in ("best/model.safetensors", "best/config.json", "last/state.json", "last/state.safetensors"):
        assert (out / name).is_file(), name
    for name in ("loss_curve.png", "reconstructions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    best_rows = [r for r in rows if r["best"] == "1"]
    assert int(best_rows[-1]["epoch"]) == pretrained.best_epoch
    # the hold-out was made on the fly and written down; train and val are disjoint
    with open(out / "splits.csv") as f:
        splits = list(csv.DictReader(f))
    assert {r["split"] for r in splits} == {"train", "val"}
    assert sum(r["split"] == "val" for r in splits) == pretrained.val_images


def test_pretrain_config_records_everything(pretrained):
    cfg = _config(pretrained.best_dir)
    assert cfg["kind"] == "autoencoder" and cfg["resize_mode"] == "pad" and cfg["image_size"] == 64
    assert cfg["mean"] == [0.0, 0.0, 0.0] and cfg["std"] == [1.0, 1.0, 1.0]
    training = cfg["training"]
    assert training["lr"] == 1e-3 and training["batch_size"] == 4 and training["patience"] == 20
    assert training["epochs_run"] == 8 and training["best_epoch"] == pretrained.best_epoch
    assert training["best_val_loss"] == pytest.approx(pretrained.best_val_loss)
    assert training["augment"] is False and training["used"]["precision"] == "fp32"
    assert len(cfg["dataset"]["fingerprint"]) == 64
    assert cfg["dataset"]["counts"]["val"] == {"images": pretrained.val_images}
    card = (Path(pretrained.best_dir) / "README.md").read_text()  # model card: this checkpoint's facts
    assert card.startswith("---") and "# cxrcae autoencoder" in card
    assert "| **Input size** | 64 x 64 |" in card
    assert cfg["baseline"]["val_mse_mean_image"] == pytest.approx(pretrained.baseline["val_mse_mean_image"])
    assert cfg["metrics"]["val"]["mse"] == pytest.approx(pretrained.best_val_loss)
    assert "torch" in cfg["versions"]
    model, _ = load_checkpoint(pretrained.best_dir)  # strict, sha-checked
    assert type(model).__name__ == "ConvAutoencoder"


def _predict(model_dir: str, images: list[tuple[Path, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Plain torch: the checkpoint's own preprocessing, argmax of the logits; (predicted, true, names)."""
    from cxrcae.io import load_for_model

    model, cfg = load_checkpoint(model_dir)
    size, mode = cfg["image_size"], cfg["resize_mode"]
    x = torch.stack([torch.from_numpy(load_for_model(path, size, mode)) for path, _ in images])
    y = torch.tensor([cfg["class_names"].index(label) for _, label in images])
    with torch.no_grad():
        pred = model(x).argmax(1)
    return pred, y, cfg["class_names"]


def _recall_per_class(model_dir: str, images: list[tuple[Path, str]]) -> dict[str, float]:
    pred, y, names = _predict(model_dir, images)
    return {name: (pred[y == i] == i).float().mean().item() for i, name in enumerate(names) if (y == i).any()}


def test_finetune_beats_chance_on_held_out_images(finetuned, tiny_labelled_folder, fixture_rows):
    """Held out: the run's test split (never loaded by training) plus every image of the shipped set whose
    patient is not in the tiny training folder (~250 images), scored by balanced accuracy (chance 1/3).

    Measured while writing this (seeds 0-2, AVX2-only CPU, and with ATEN/oneDNN limited to AVX2): see the
    margin in the assertion; a model that gives every image one class scores exactly 1/3.
    """
    from conftest import FIXTURE_DATA

    splits = Path(finetuned.out_dir) / "splits.csv"
    with open(splits) as f:
        held = [(splits.parent / r["path"], r["label"]) for r in csv.DictReader(f) if r["split"] == "test"]
    tiny = {p.name for p in tiny_labelled_folder.rglob("*") if p.is_file()}
    seen_patients = {r["patient_id"] for r in fixture_rows if Path(r["path"]).name in tiny}
    for row in fixture_rows:
        if row["label"] in finetuned.class_names and row["patient_id"] not in seen_patients:
            held.append((FIXTURE_DATA / "cxr" / row["path"], row["label"]))
    assert len(held) >= 200
    recall = _recall_per_class(finetuned.best_dir, held)
    balanced = sum(recall.values()) / len(recall)
    assert balanced > 1 / 3 + 0.15, (recall, finetuned.history)


def test_frozen_stage_leaves_encoder_unchanged_and_trains_the_head(pretrained, finetuned):
    cae = read_weights(Path(pretrained.best_dir))
    clf = read_weights(Path(finetuned.best_dir))
    enc_keys = [k for k in clf if k.startswith("encoder.")]
    assert len(enc_keys) == 12
    for key in enc_keys:
        assert torch.equal(clf[key], cae[key]), key
    head_keys = sorted(k for k in clf if k.startswith("head."))
    assert head_keys == sorted(finetuned.head_init)
    unchanged = [k for k in head_keys if torch.equal(clf[k], finetuned.head_init[k])]
    assert not unchanged, f"head tensors never updated: {unchanged}"


def test_finetune_config_records_everything(pretrained, finetuned):
    cfg = _config(finetuned.best_dir)
    assert cfg["kind"] == "classifier" and cfg["head"] == "lstm" and cfg["resize_mode"] == "stretch"
    assert cfg["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"]
    training = cfg["training"]
    assert training["stages"] == ["head"] and training["balance"] == "none" and training["augment"] is False
    assert training["lr"] == 1e-3 and training["lr_unfrozen"] == 1e-5 and training["batch_size"] == 4
    assert training["stages_run"][0]["name"] == "head"
    assert training["best_epoch"] == finetuned.best_epoch
    enc = cfg["encoder_init"]
    assert enc["weights_sha256"] == _config(pretrained.best_dir)["weights_sha256"]
    assert enc["kind"] == "autoencoder" and enc["resize_mode"] == "pad"
    counts = cfg["dataset"]["counts"]
    assert set(counts) == {"train", "val"}  # the test split is never part of training provenance
    assert sum(counts["train"].values()) == finetuned.train_images
    assert set(counts["val"]) == {"COVID", "NORMAL", "PNEUMONIA"}
    assert cfg["dataset"]["excluded_test_images"] > 0
    assert cfg["metrics"]["val"]["accuracy"] == pytest.approx(finetuned.best_metrics["val_accuracy"])
    # the recorded val accuracy is the saved checkpoint's own score on the run's val images
    splits = Path(finetuned.out_dir) / "splits.csv"
    with open(splits) as f:
        val = [(splits.parent / r["path"], r["label"]) for r in csv.DictReader(f) if r["split"] == "val"]
    pred, y, _ = _predict(finetuned.best_dir, val)
    assert cfg["metrics"]["val"]["accuracy"] == pytest.approx((pred == y).float().mean().item())


# --- resume, NaN, precision ------------------------------------------------------------------------------


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {
        **read_weights(folder / "best"),
        **{f"last.{k}": v for k, v in read_weights(folder / "last").items()},
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def test_finetune_resume_reaches_same_weights(mini_folder, tmp_path):
    # crosses a stage boundary, with augmentation (global RNG) and a weighted sampler (loader generator)
    cfg = dict(image_size=32, epochs=1, batch_size=4, stages=("head", "all"), lr_unfrozen=1e-3, **FAST)
    cfg |= dict(augment=True, balance="sampler", limit_batches=2)
    full = finetune(mini_folder, tmp_path / "full", FinetuneConfig(**cfg))
    with pytest.raises(Interrupt):
        finetune(mini_folder, tmp_path / "cut", FinetuneConfig(**cfg), progress=stop_at_epoch(2))
    assert json.loads((tmp_path / "cut" / "last" / "state.json").read_text())["epoch"] == 1
    resumed = resume_run(tmp_path / "cut")
    assert resumed.resumed and resumed.epochs_run == full.epochs_run == 2
    _assert_same(_all_tensors(tmp_path / "full"), _all_tensors(tmp_path / "cut"))
    assert [r["val_loss"] for r in resumed.history] == pytest.approx([r["val_loss"] for r in full.history])
    assert _config(resumed.best_dir)["encoder_init"] is None  # --encoder none


def test_pretrain_resume_reaches_same_weights(mini_folder, tmp_path):
    cfg = dict(image_size=32, epochs=3, batch_size=4, limit_batches=2, **FAST)
    pretrain(mini_folder, tmp_path / "full", PretrainConfig(**cfg))
    with pytest.raises(Interrupt):
        pretrain(mini_folder, tmp_path / "cut", PretrainConfig(**cfg), progress=stop_at_epoch(3))
    resume_run(tmp_path / "cut", task="pretrain")
    _assert_same(_all_tensors(tmp_path / "full"), _all_tensors(tmp_path / "cut"))
    with pytest.raises(CxrcaeError, match="holds a pretrain run"):
        resume_run(tmp_path / "cut", task="finetune")


def test_new_run_refuses_existing_run_folder(mini_folder, tmp_path):
    cfg = PretrainConfig(image_size=32, epochs=1, batch_size=4, limit_batches=1, **FAST)
    pretrain(mini_folder, tmp_path / "run", cfg)
    with pytest.raises(CxrcaeError, match="--resume"):
        pretrain(mini_folder, tmp_path / "run", cfg)


def test_nan_loss_stops_naming_epoch_and_keeps_checkpoint(mini_folder, tmp_path, monkeypatch):
    from cxrcae.tasks.reconstruct import Reconstruction

    calls = {"n": 0}
    original = Reconstruction.__call__

    def poisoned(self, model, images, labels):
        loss, out = original(self, model, images, labels)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] > 4 else loss), out  # epoch 1 has 2 train + 1-2 val steps

    monkeypatch.setattr(Reconstruction, "__call__", poisoned)
    cfg = PretrainConfig(image_size=32, epochs=3, batch_size=4, limit_batches=2, **FAST)
    message = r"loss became nan at epoch 2, training step \d.*best checkpoint \(epoch 1\)"
    with pytest.raises(NonFiniteLossError, match=message):
        pretrain(mini_folder, tmp_path / "run", cfg)
    model, cfg_saved = load_checkpoint(tmp_path / "run" / "best")  # the last good weights, intact
    assert cfg_saved["training"]["best_epoch"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_learning_rate_stops_with_clean_error(mini_folder, tmp_path):
    cfg = FinetuneConfig(image_size=32, epochs=2, batch_size=4, stages=("all",), lr_unfrozen=1e30, **FAST)
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+ \(stage all\)"):
        finetune(mini_folder, tmp_path / "run", cfg)


def test_bf16_validation_loss_matches_fp32(mini_folder):
    from cxrcae.data import XrayDataset, load_records
    from cxrcae.models import ConvAutoencoder
    from cxrcae.tasks.reconstruct import Reconstruction
    from cxrcae.train.data import make_loader
    from cxrcae.train.engine import Runtime
    from cxrcae.train.engine import validate as evaluate

    torch.manual_seed(0)
    model = ConvAutoencoder()
    records = load_records(mini_folder)[:8]
    loader = make_loader(XrayDataset(records, 64, "pad"), 4, shuffle=False, seed=0)
    cpu = torch.device("cpu")
    fp32 = evaluate(model, loader, Reconstruction(), Runtime(cpu, None, False)).loss
    bf16 = evaluate(model, loader, Reconstruction(), Runtime(cpu, torch.bfloat16, True)).loss
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert fp32 > 0


def test_bf16_training_run_records_precision(mini_folder, tmp_path):
    cfg = PretrainConfig(image_size=32, epochs=1, batch_size=4, limit_batches=1, precision="bf16")
    result = pretrain(mini_folder, tmp_path / "run", cfg)
    assert result.precision == "bf16"
    assert _config(result.best_dir)["training"]["used"]["precision"] == "bf16"
    assert math.isfinite(result.best_val_loss)


def test_fp16_on_cpu_is_a_clear_error(mini_folder, tmp_path):
    cfg = PretrainConfig(image_size=32, epochs=1, device="cpu", precision="fp16")
    with pytest.raises(CxrcaeError, match="fp16 autocast is only supported on GPUs"):
        pretrain(mini_folder, tmp_path / "run", cfg)


def test_splits_csv_test_rows_are_never_loaded(mini_folder, tmp_path):
    """A test row pointing at a corrupt file would fail decoding if training ever touched it."""
    from cxrcae.data import load_records, write_records
    from cxrcae.data.splits import make_splits

    records = make_splits(load_records(mini_folder), (0.5, 0.25, 0.25), seed=0, dedupe=False)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image")
    from dataclasses import replace

    records.append(replace(records[0], path=bad, split="test"))
    splits = write_records(records, tmp_path / "splits.csv")
    cfg = FinetuneConfig(image_size=32, epochs=1, batch_size=4, encoder=None, stages=("head",), **FAST)
    result = finetune(splits, tmp_path / "run", cfg)
    assert not result.skipped_files
    assert not (tmp_path / "run" / "splits.csv").exists()  # the given split is used, not re-made
    assert result.train_images + result.val_images == len(records) - sum(r.split == "test" for r in records)
