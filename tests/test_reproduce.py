"""`cxrcae reproduce`: the whole method on a tiny real dataset, in one run folder."""

from __future__ import annotations

import json

from cxrcae.data import load_records


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

    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    lo, hi = summary["test"]["accuracy_ci"]
    assert lo <= summary["test"]["accuracy"] <= hi
    assert summary["audit"]["leakage"] is False
    assert (out / "clf" / "best" / "eval-test" / "metrics.json").is_file()


def test_reproduce_refuses_an_existing_run(cli, tiny_labelled_folder, tmp_path):
    (tmp_path / "run" / "cae").mkdir(parents=True)
    result = cli("reproduce", tiny_labelled_folder, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "already holds" in result.output
