"""The ``segment`` task on synthetic X-rays: a bright disc (structure ``a``) on the left and a dimmer
rectangle (``b``) on the right, with their exact masks. Fine-tuning learns them, checkpoints round-trip,
metrics and the cardiothoracic ratio agree with hand-made answers, bad masks are one-line errors. No
../shared data: everything is drawn here at 64 px and trained at 32 px."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Interrupt, stop_at_epoch
from cxrcae import bundled
from cxrcae.data import load_records, write_records
from cxrcae.data.masks import mask_columns, resize_mask, restore_mask
from cxrcae.errors import CheckpointError, DataError
from cxrcae.hub.resolve import load, load_checkpoint
from cxrcae.io import resize_xray
from cxrcae.models import CXRClassifier, CXRSegmenter
from cxrcae.models.cae import CAEEncoder
from cxrcae.tasks import TASKS, get_task
from cxrcae.tasks.segment import MaskDataset
from cxrcae.tasks.segment_metrics import cardiothoracic_ratio, dice, hd95, iou
from cxrcae.train import FinetuneConfig, finetune, resume_run
from cxrcae.train.data import augmentation
from cxrcae.train.features import use_cached_features
from cxrcae.train.finetuning import apply_stage

SIDE = 64
SIZE = 32
FAST = {"precision": "fp32", "num_workers": 0, "image_size": SIZE}
TASK = get_task("segment")


def _draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:SIDE, :SIDE]
    img = 0.15 + 0.05 * rng.standard_normal((SIDE, SIDE))
    r = int(rng.integers(SIDE // 8, SIDE // 5))
    cy, cx = int(rng.integers(r + 2, SIDE - r - 2)), int(rng.integers(r + 2, SIDE // 2 - r))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    h, w = (int(v) for v in rng.integers(SIDE // 5, SIDE // 3, 2))
    y0, x0 = int(rng.integers(2, SIDE - h - 2)), int(rng.integers(SIDE // 2 + 2, SIDE - w - 2))
    rect = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
    img[rect] += 0.4
    img[disc] += 0.7
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), disc, rect


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """``images/`` + ``masks/{a,b}/`` (20 images) and ``manifest.csv`` with relative mask paths and a split
    column: 12 train, 2 val, 6 test."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(20):
        img, disc, rect = _draw(rng)
        name = f"im{i:02d}.png"
        _png(root / "images" / name, img)
        _png(root / "masks" / "a" / name, disc * 255)
        _png(root / "masks" / "b" / name, rect * 255)
        split = "train" if i < 12 else "val" if i < 14 else "test"
        rows.append({"path": f"images/{name}", "a": f"masks/a/{name}", "b": f"masks/b/{name}"})
        rows[-1]["split"] = split
    _write_manifest(root / "manifest.csv", rows)
    return root


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """Decoder-only fine-tuning over the bundled encoder: 3 epochs of 6 steps (batch 2) at 32 px."""
    out = tmp_path_factory.mktemp("runs") / "seg"
    cfg = FinetuneConfig(
        task="segment",
        masks=("a", "b"),
        encoder=str(bundled.ENCODER_DIR),
        stages=("head",),
        epochs=3,
        batch_size=2,
        lr=3e-3,
        **FAST,
    )
    return finetune(shapes / "manifest.csv", out, cfg)


def _test_rows(shapes: Path):
    return [r for r in load_records(shapes / "manifest.csv", labeled=False) if r.split == "test"]


# ----------------------------------------------------------------------------------------------- the task


def test_task_is_registered_and_builds_a_unet_on_the_encoder():
    assert TASKS["segment"] is TASK and TASK.labelled and not TASK.uses_label_column
    model = TASK.build({"structures": ["a", "b", "c"], "image_size": SIZE})
    assert isinstance(model, CXRSegmenter) and not isinstance(model, CXRClassifier)
    assert isinstance(model.encoder, CAEEncoder)
    out = model(torch.rand(2, 3, SIZE, SIZE))
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()
    trainable = apply_stage(model, "head")  # the classifier's stage freezing, unchanged
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert {id(p) for p in trainable} == {id(p) for p in model.decoder.parameters()}
    assert not use_cached_features(model, FinetuneConfig(**FAST))  # cached features are for classifiers
    out.sum().backward()  # every decoder parameter gets a gradient
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_finetune_learns_masks_far_better_than_empty_ones(trained, shapes):
    assert trained.history[-1]["val_mean_dice"] > 0.3
    model, config = load_checkpoint(trained.best_dir)
    records = _test_rows(shapes)
    refs = TASK.targets(records, config)
    images = torch.stack([TASK.dataset(records, config)[i]["image"] for i in range(len(records))])
    with torch.no_grad():
        probs = TASK.probabilities(model(images), config)
    metrics = TASK.score(probs, refs, [""] * len(records), config, n_boot=50)
    empty = TASK.score(np.zeros_like(probs), refs, [""] * len(records), config, n_boot=0)
    assert empty["mean"]["dice"] == 0.0  # every test image has both structures
    assert metrics["a"]["dice"] > 0.6 and metrics["b"]["dice"] > 0.4, metrics["mean"]


def test_checkpoint_round_trips_and_records_the_task(trained, tmp_path):
    config = json.loads((Path(trained.best_dir) / "config.json").read_text())
    assert (config["task"], config["kind"], config["structures"]) == ("segment", "segmenter", ["a", "b"])
    assert config["head"] == "unet" and config["image_size"] == SIZE
    loaded = load(trained.best_dir, task="segment")
    assert loaded.task is TASK and isinstance(loaded.net, CXRSegmenter)
    again, _ = load_checkpoint(trained.best_dir)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), again(x))
    with pytest.raises(CheckpointError, match="a 'segment' model, but this needs a 'classify' model"):
        load(trained.best_dir, task="classify")

    for i, (field, value, message) in enumerate(
        [
            ("structures", ["a", "a"], "distinct names"),
            ("structures", ["a", "../b"], "structure name"),
            ("structures", ["mean"], "structure name"),
            ("decoder_channels", [8, 8], "decoder_channels"),
            ("mask_threshold", 1.5, "mask_threshold"),
        ]
    ):  # refused from config.json alone, before any tensor is read
        bad = tmp_path / str(i)
        bad.mkdir()
        (bad / "model.safetensors").symlink_to(Path(trained.best_dir) / "model.safetensors")
        (bad / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(bad)


def test_folder_layout_trains_and_an_interrupted_run_resumes_to_the_same_weights(shapes, tmp_path):
    # images/ + masks/<structure>/ without --masks, split on the fly (OUT/splits.csv keeps the mask
    # paths), augmented (image and masks moved together by the global RNG)
    cfg = dict(task="segment", epochs=2, batch_size=4, stages=("head",), augment=True, limit_batches=1)
    full = finetune(shapes, tmp_path / "full", FinetuneConfig(**cfg, **FAST))
    with pytest.raises(Interrupt):
        finetune(shapes, tmp_path / "cut", FinetuneConfig(**cfg, **FAST), progress=stop_at_epoch(2))
    resumed = resume_run(tmp_path / "cut", task="finetune")
    assert resumed.resumed and resumed.epochs_run == full.epochs_run == 2
    assert [r["val_loss"] for r in resumed.history] == pytest.approx([r["val_loss"] for r in full.history])
    a, _ = load_checkpoint(full.best_dir)
    b, config = load_checkpoint(resumed.best_dir)
    assert config["structures"] == ["a", "b"]
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=0), key


# ----------------------------------------------------------------------------------------------- metrics


def test_dice_iou_hd95_by_hand():
    ref = np.zeros((10, 10), bool)
    ref[2:4, 2:5] = True  # 2 x 3
    pred = np.zeros((10, 10), bool)
    pred[2:4, 2:4] = True  # 2 x 2, inside
    assert dice(pred, ref) == pytest.approx(2 * 4 / (4 + 6))
    assert iou(pred, ref) == pytest.approx(4 / 6)
    assert hd95(pred, ref) == pytest.approx(1.0)  # the reference's last column is 1 px from the prediction
    shifted = np.zeros((10, 10), bool)
    shifted[2:5, 6:9] = True
    square = np.zeros((10, 10), bool)
    square[2:5, 2:5] = True
    assert hd95(shifted, square) == pytest.approx(4.0)  # every border pixel moved 4 columns
    assert dice(square, square) == 1.0 and hd95(square, square) == 0.0
    empty = np.zeros((10, 10), bool)
    assert (dice(empty, empty), iou(empty, empty), hd95(empty, empty)) == (1.0, 1.0, 0.0)
    assert (dice(square, empty), iou(empty, square)) == (0.0, 0.0)
    assert hd95(square, empty) == hd95(empty, square) == pytest.approx(np.hypot(10, 10))


def test_score_names_structures_with_patient_bootstrap_and_rows_fit_80_columns():
    rng = np.random.default_rng(1)
    refs = np.zeros((6, 2, 16, 16), np.uint8)
    refs[:, 0, 4:12, 2:7] = 1
    refs[:, 1, 5:10, 9:14] = 1
    probs = np.clip(refs + rng.normal(0, 0.3, refs.shape), 0, 1).astype(np.float32)
    config = {"structures": ["left_lung", "right_clavicle"], "image_size": 16}
    metrics = TASK.score(probs, refs, ["p1", "p1", "p2", "p2", "p3", ""], config, n_boot=200)
    assert metrics["structures"] == ["left_lung", "right_clavicle"] and metrics["images"] == 6
    for name in ("left_lung", "right_clavicle", "mean"):
        for figure in ("dice", "iou", "hd95"):
            lo, hi = metrics[name]["ci"][figure]
            assert lo <= metrics[name][figure] <= hi
    assert metrics["bootstrap"]["unit"] == "patient" and metrics["bootstrap"]["n_units"] == 4
    hand = np.mean([dice(p >= 0.5, r) for p, r in zip(probs[:, 0], refs[:, 0], strict=True)])
    assert metrics["left_lung"]["dice"] == pytest.approx(hand)
    json.dumps(metrics)  # metrics.json's body
    headers, rows = TASK.metric_rows(metrics)
    assert [r[0] for r in rows] == ["left_lung", "right_clavicle", "mean"]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    assert sum(widths) + 3 * len(widths) + 1 <= 80  # a rich table's borders and padding included


def test_cardiothoracic_ratio_of_known_widths():
    heart, left, right = (np.zeros((100, 120), bool) for _ in range(3))
    right[20:80, 10:45] = True  # the patient's right lung, on the image's left
    left[20:80, 60:100] = True
    heart[50:75, 40:70] = True  # 30 columns wide, overlapping both lungs' edges
    assert cardiothoracic_ratio(heart, left, right) == pytest.approx(30 / 90)
    heart[5, 0] = True  # a stray speck is not part of the heart
    assert cardiothoracic_ratio(heart, left, right) == pytest.approx(30 / 90)
    assert cardiothoracic_ratio(heart, left, right, largest_component=False) == pytest.approx(70 / 90)
    assert cardiothoracic_ratio(np.zeros_like(heart), left, right) is None

    config = {"structures": ["left_lung", "right_lung", "heart"], "image_size": 120}
    probs = np.zeros((3, 120, 120), np.float32)
    probs[0, 20:80, 60:100] = probs[1, 20:80, 10:45] = probs[2, 50:75, 40:70] = 0.9
    row = TASK.prediction_row(probs, config)
    assert row["cardiothoracic_ratio"] == pytest.approx(30 / 90, abs=1e-4)
    assert row["heart_area_px"] == 25 * 30
    assert row["heart_area_fraction"] == pytest.approx(750 / 120**2, abs=1e-6)
    assert set(row) <= set(TASK.prediction_columns(config))
    assert "cardiothoracic_ratio" not in TASK.prediction_columns({"structures": ["heart"]})


# ----------------------------------------------------------------------------------------------- files


def test_prediction_files_write_masks_and_overlay_at_the_image_size(tmp_path):
    config = {"structures": ["a", "b"], "image_size": 32, "resize_mode": "pad"}
    probs = np.zeros((2, 32, 32), np.float32)
    probs[0, 8:16, 4:12] = probs[1, 10:20, 18:28] = 1.0
    files = TASK.prediction_files(tmp_path, "x1", np.zeros((3, 32, 32), np.float32), probs, config)
    assert set(files) == {"a_mask", "b_mask", "overlay"} <= set(TASK.prediction_columns(config))
    a = np.asarray(Image.open(files["a_mask"]))
    assert a.dtype == np.uint8 and set(np.unique(a)) == {0, 255} and np.array_equal(a == 255, probs[0] > 0.5)
    assert Image.open(files["overlay"]).mode == "RGB"

    original = np.zeros((64, 128), np.float32)  # 2:1, letterboxed into rows 8..23 of the 32 px input
    files = TASK.prediction_files(tmp_path, "wide", original, probs, config)
    back = np.asarray(Image.open(files["a_mask"])) > 0
    assert back.shape == (64, 128)
    assert np.array_equal(back, restore_mask(probs[0] > 0.5, (64, 128), "pad"))
    assert back[:, 16:48].any() and not back[:, 48:].any()  # columns 4..12 of 32 -> 16..48 of 128


def test_evaluation_files_draw_the_worst_and_best_images(tmp_path, shapes):
    config = {"structures": ["a", "b"], "image_size": SIZE, "resize_mode": "stretch"}
    records = _test_rows(shapes)
    refs = TASK.targets(records, config)
    probs = refs.astype(np.float32)
    probs[0] = 0  # the worst: nothing found
    metrics = TASK.score(probs, refs, [""] * len(refs), config, n_boot=0)
    files = TASK.evaluation_files(tmp_path, [str(r.path) for r in records], probs, refs, metrics, config)
    assert set(files) == {f"overlay_{w}_{i}" for w in ("worst", "best") for i in (1, 2, 3)}
    assert all(Path(p).is_file() for p in files.values())
    worst = np.asarray(Image.open(files["overlay_worst_1"]))
    assert worst.shape[1] >= 256  # enlarged from 32 px to be readable


# ----------------------------------------------------------------------------------------------- data


def test_masks_resize_without_blurring_and_follow_the_image_geometry():
    mask = np.zeros((60, 90), bool)
    mask[10:40, 20:70] = True
    for mode in ("stretch", "pad"):
        small = resize_mask(mask, 32, mode)
        assert small.dtype == bool and small.shape == (32, 32)
        image = resize_xray(mask.astype(np.float32), 32, mode)  # the image path, antialiased
        assert np.mean(small == (image >= 0.5)) > 0.97
    padded = resize_mask(mask, 32, "pad")
    assert not padded[:5].any() and not padded[-5:].any()  # the letterbox border (rows 0..5, 26..32)


def test_relative_mask_paths_and_folder_layout(shapes, tmp_path):
    records = load_records(shapes / "manifest.csv", labeled=False)
    assert Path(records[0].extra["a"]) == shapes / "masks" / "a" / "im00.png"  # against the manifest
    assert mask_columns(records) == ["a", "b"]
    elsewhere = write_records(records, tmp_path / "sub" / "splits.csv")  # written from another folder
    assert load_records(elsewhere, labeled=False) == records
    folder = load_records(shapes, labeled=False)  # images/ + masks/<structure>/
    assert len(folder) == 20 and all(r.path.parent.name == "images" for r in folder)
    assert folder[3].extra == {"a": str(shapes / "masks/a/im03.png"), "b": str(shapes / "masks/b/im03.png")}


def test_augmentation_moves_masks_with_their_image(shapes):
    records = _test_rows(shapes)[:2]
    ds = MaskDataset(records, ["a", "b"], SIZE, "stretch", transform=augmentation())
    torch.manual_seed(0)
    item = ds[0]
    masks = item["label"]
    assert masks.shape == (2, SIZE, SIZE) and set(masks.unique().tolist()) <= {0, 1}
    inside, outside = item["image"][0][masks[0] > 0], item["image"][0][masks[0] == 0]
    assert inside.mean() > outside.mean() + 0.3  # the disc's mask still covers the bright disc


def _bad_manifest(shapes: Path, tmp_path: Path, mask_b: str) -> Path:
    rows = [
        {"path": str(shapes / "images" / f"im{i:02d}.png"), "a": str(shapes / "masks/a" / f"im{i:02d}.png"),
         "b": str(shapes / "masks/b" / f"im{i:02d}.png")}
        for i in range(8)
    ]  # fmt: skip
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 6 else "val"
    rows[5]["b"] = mask_b
    return _write_manifest(tmp_path / "bad.csv", rows)


def test_missing_mask_file_is_a_one_line_error(shapes, tmp_path):
    data = _bad_manifest(shapes, tmp_path, str(tmp_path / "gone.png"))
    cfg = FinetuneConfig(task="segment", masks=("a", "b"), epochs=1, **FAST)
    with pytest.raises(DataError) as info:
        finetune(data, tmp_path / "run", cfg)
    message = str(info.value)
    assert "gone.png: mask file not found (column 'b'" in message and "\n" not in message
    with pytest.raises(DataError, match="no mask column 'c'"):
        finetune(data, tmp_path / "run2", FinetuneConfig(task="segment", masks=("a", "c"), **FAST))


def test_mask_of_another_aspect_ratio_is_an_error_naming_both_sizes(shapes, tmp_path):
    _png(tmp_path / "tall.png", np.zeros((64, 32), np.uint8))
    half = tmp_path / "half.png"  # the same aspect at half the resolution is fine
    _png(half, np.full((32, 32), 255, np.uint8))
    records = load_records(_bad_manifest(shapes, tmp_path, str(half)), labeled=False)
    assert MaskDataset(records, ["a", "b"], SIZE).masks(5)[1].all()
    records = load_records(_bad_manifest(shapes, tmp_path, str(tmp_path / "tall.png")), labeled=False)
    with pytest.raises(DataError) as info:
        MaskDataset(records, ["a", "b"], SIZE)
    assert "tall.png: mask is 32x64 but its image" in str(info.value)
    assert "im05.png is 64x64 (column 'b')" in str(info.value)


# ----------------------------------------------------------------------------------------------- CLI


def test_finetune_cli_trains_a_segmenter(cli, shapes, tmp_path):
    out = tmp_path / "run"
    result = cli(
        "finetune", shapes / "manifest.csv", "--task", "segment", "--masks", "a,b",
        "--encoder", bundled.ENCODER_DIR, "--out", out, "--image-size", SIZE, "--epochs", 1,
        "--batch-size", 4, "--limit-batches", 1, "--stages", "head", "--precision", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean dice" in result.output
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["task"] == "segment" and config["structures"] == ["a", "b"]

    bad = cli("finetune", shapes, "--task", "reconstruct", "--encoder", "none", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "choose classify, multilabel, segment" in bad.output
