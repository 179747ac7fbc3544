"""`cxrcae reproduce`: the whole method on a tiny real dataset, in one run folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from cxrcae import pipeline
from cxrcae.data import load_records
from cxrcae.data.audit import audit_records
from cxrcae.hub.resolve import load_checkpoint
from cxrcae.io import hashing as io_hashing
from cxrcae.io import load_for_model
from cxrcae.locking import hold


def test_reproduce_end_to_end_keeps_test_unseen(cli, tiny_labelled_folder, tmp_path):
    out = tmp_path / "run"
    result = cli(
        "reproduce",
        tiny_labelled_folder,
        "--out",
        out,
        "--image-size",
        "32",
        "--pretrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--bootstrap",
        "20",
        "--num-workers",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())

    splits = {r.path: r.split for r in load_records(out / "splits.csv")}
    test_images = {p for p, s in splits.items() if s == "test"}
    assert test_images and summary["test"]["n"] == len(test_images)
    # the autoencoder was trained and validated on train/val images only
    cae_cfg = json.loads((out / "cae" / "best" / "config.json").read_text())
    counts = cae_cfg["dataset"]["counts"]
    assert counts["train"]["images"] + counts["val"]["images"] == len(splits) - len(test_images)
    # the classifier started from that autoencoder's encoder
    clf_cfg = json.loads((out / "clf" / "best" / "config.json").read_text())
    assert clf_cfg["encoder_init"]["weights_sha256"] == cae_cfg["weights_sha256"]

    # the reported test accuracy is the shipped classifier's own score on exactly the test images: its
    # probabilities recomputed here in plain torch match predictions.csv, whose hits give the accuracy
    with open(out / "clf" / "best" / "eval-test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} == {str(p) for p in test_images}
    assert all(r["status"] == "ok" for r in rows)
    model, cfg = load_checkpoint(out / "clf" / "best")
    size, mode = cfg["image_size"], cfg["resize_mode"]
    x = torch.stack([torch.from_numpy(load_for_model(r["path"], size, mode)) for r in rows])
    with torch.no_grad():
        probs = torch.softmax(model(x).double() / cfg.get("temperature", 1.0), dim=1)
    saved = [[float(r[f"prob_{n}"]) for n in cfg["class_names"]] for r in rows]
    assert torch.allclose(probs, torch.tensor(saved, dtype=torch.double), atol=1e-4)
    hits = [r["predicted"] == r["label"] for r in rows]
    assert summary["test"]["accuracy"] == pytest.approx(sum(hits) / len(rows))
    lo, hi = summary["test"]["accuracy_ci"]
    assert lo <= summary["test"]["accuracy"] <= hi
    assert summary["audit"]["leakage"] is False
    metrics = json.loads((out / "clf" / "best" / "eval-test" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["accuracy"] == summary["test"]["accuracy"]


def test_reproduce_refuses_an_existing_run(cli, tiny_labelled_folder, tmp_path):
    (tmp_path / "run" / "cae").mkdir(parents=True)
    result = cli("reproduce", tiny_labelled_folder, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "already holds" in result.output


class _StopAfterAudit(Exception):
    """Raised in place of pretraining: the test only needs the split and audit steps."""


def test_reproduce_pixel_hashes_each_image_once(mini_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(mini_folder, data, symlinks=True)
    covid = sorted((data / "COVID").iterdir())[0]
    Image.open(covid).save(data / "NORMAL" / "copy_of_covid.png")  # an exact duplicate across classes
    (data / "PNEUMONIA" / "broken.jpg").write_bytes(covid.read_bytes()[:300])  # unreadable

    decoded: Counter[Path] = Counter()
    decode = io_hashing.decode_native

    def counting_decode(path, **kwargs):
        decoded[Path(path)] += 1
        return decode(path, **kwargs)

    def stop(*args, **kwargs):
        raise _StopAfterAudit

    monkeypatch.setattr(io_hashing, "decode_native", counting_decode)  # every pixel_hash decodes through it
    monkeypatch.setattr(pipeline, "pretrain", stop)
    out = tmp_path / "run"
    with pytest.raises(_StopAfterAudit):
        pipeline.run_pipeline(data, out)

    images = {r.path for r in load_records(out / "splits.csv")}
    assert len(images) == 14 and set(decoded) == images
    assert set(decoded.values()) == {1}  # split and audit shared one hashing pass

    audit = json.loads((out / "audit.json").read_text())
    assert (audit["images"], audit["unreadable"], audit["exact_duplicate_groups"]) == (14, 1, 1)
    monkeypatch.setattr(io_hashing, "decode_native", decode)
    fresh = audit_records(load_records(out / "splits.csv", labeled=False))  # hashing everything itself
    assert audit == {"leakage": fresh.leakage, **fresh.summary(), "dominant_sources": fresh.dominant}


def test_reproduce_out_is_one_writers(cli, tiny_labelled_folder, tmp_path):
    """While another reproduce runs in OUT (here: this process holds its lock), a second one is refused at
    once in one line naming the holder, before splitting anything."""
    out = tmp_path / "run"
    with hold(out, folder=True):
        result = cli("reproduce", tiny_labelled_folder, "--out", out)
        assert result.exit_code == 1, result.output
        assert result.output.strip().startswith(f"Error: {out}: in use by process {os.getpid()} (")
        assert len(result.output.strip().splitlines()) == 1
        assert [p.name for p in out.iterdir()] == [".cxrcae.lock"]
