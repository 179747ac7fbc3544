"""``cxrcae pretrain`` / ``cxrcae finetune`` through the real Typer app, as smoke runs (--limit-batches)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cxrcae import bundled

SMOKE = ["--image-size", "32", "--batch-size", "4", "--limit-batches", "1", "--num-workers", "0"]


def test_pretrain_then_finetune_cli(cli, mini_folder, tmp_path):
    res = cli(
        "pretrain",
        mini_folder,
        "--out",
        tmp_path / "cae",
        "--epochs",
        "1",
        "--precision",
        "fp32",
        *SMOKE,
        "--json",
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["task"] == "pretrain" and summary["epochs_run"] == 1
    assert summary["baseline"]["val_mse_mean_image"] > 0
    with Image.open(summary["files"]["reconstructions"]) as figure:
        assert figure.format == "PNG" and min(figure.size) > 100

    res = cli(
        "finetune", mini_folder, "--encoder", tmp_path / "cae" / "best", "--out", tmp_path / "clf",
        "--epochs", "1", "--stages", "head,conv6", "--balance", "loss", "--augment", "--precision", "fp32",
        *SMOKE,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Best epoch" in res.stdout and "conv6" in res.stdout  # history table with both stages
    cfg = json.loads((tmp_path / "clf" / "best" / "config.json").read_text())
    assert cfg["training"]["balance"] == "loss" and cfg["training"]["augment"] is True
    assert len(cfg["training"]["class_weights"]) == 3
    assert cfg["training"]["stages"] == ["head", "conv6"]


@pytest.mark.skipif(bundled.bundled_encoder() is None, reason="build without bundled weights")
def test_finetune_defaults_to_the_bundled_encoder(cli, mini_folder, tmp_path):
    res = cli("finetune", mini_folder, "--out", tmp_path / "clf", "--stages", "head", "--epochs", "1", *SMOKE)
    assert res.exit_code == 0, res.output
    init = json.loads((tmp_path / "clf" / "best" / "config.json").read_text())["encoder_init"]
    assert init["ref"] == "bundled" and init["resolved"] == str(bundled.bundled_encoder())
    res = cli("finetune", mini_folder, "--out", tmp_path / "t", "--encoder", "timm:resnet18", *SMOKE)
    assert res.exit_code == 1 and "a timm model can be probed" in res.output


def test_finetune_encoder_none_and_resume_cli(cli, mini_folder, tmp_path):
    out = tmp_path / "clf"
    args = [
        "finetune",
        mini_folder,
        "--encoder",
        "none",
        "--out",
        out,
        "--stages",
        "all",
        "--epochs",
        "1",
        *SMOKE,
    ]
    res = cli(*args, "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == ""  # --quiet: nothing on stdout
    again = cli(*args)
    assert again.exit_code == 1 and "already holds a training run" in again.output
    # a finished run resumes to the same end (nothing left to do) and says so in its summary
    res = cli("finetune", "--resume", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["resumed"] is True and summary["epochs_run"] == 1
    res = cli("pretrain", "--resume", out)
    assert res.exit_code == 1 and "not a pretrain run" in res.output


def test_cli_errors_are_one_line(cli, mini_folder, tmp_path):
    res = cli(
        "pretrain", mini_folder, "--out", tmp_path / "a", "--precision", "fp16", "--device", "cpu", *SMOKE
    )
    assert res.exit_code == 1
    assert "Error:" in res.output and "fp16" in res.output and "Traceback" not in res.output
    res = cli("finetune", mini_folder, "--encoder", tmp_path / "missing", "--out", tmp_path / "b", *SMOKE)
    assert res.exit_code == 1 and "no such checkpoint" in res.output
    res = cli("pretrain", tmp_path / "nowhere", "--out", tmp_path / "c", *SMOKE)
    assert res.exit_code == 1 and "no such file" in res.output
    res = cli("pretrain", "--out", tmp_path / "d")
    assert res.exit_code == 2 and "DATA" in res.output
