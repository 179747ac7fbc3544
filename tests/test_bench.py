"""`cxrcae bench` plumbing at tiny size (the figures themselves are never asserted: machines are noisy)."""

from __future__ import annotations

import json
import sys

import pytest

from cxrcae.bench import bench_train_step, keras_reference
from cxrcae.errors import CxrcaeError


@pytest.mark.parametrize("task", ["pretrain", "finetune-frozen", "finetune"])
def test_train_step_rows(task):
    rows = bench_train_step(
        32, 2, steps=1, warmup=0, settings=[("fp32", False), ("fp16", True)], device="cpu", task=task
    )
    assert rows[0]["images_per_s"] > 0 and rows[0]["speedup"] == 1.0 and rows[0]["loss"] == rows[0]["loss"]
    assert "error" in rows[1]  # fp16 autocast is refused on CPU with a reason


def test_cli_compares_with_a_keras_peer(cli, tmp_path, shared_data):
    """The peer is any Python running a script that prints the reference's JSON line."""
    peer = tmp_path / "peer.py"
    peer.write_text(
        "import json, sys\nprint('log line')\nprint(json.dumps({'task': sys.argv[1], 'images_per_s': 2.0}))\n"
    )
    images = shared_data / "originals" / "images"
    result = cli(
        "bench",
        "--tasks",
        "pretrain",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--settings",
        "fp32:nhwc",
        "--predict",
        images,
        "--predict-batch-size",
        "8",
        "--keras-python",
        sys.executable,
        "--keras-script",
        peer,
        "--json",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    by = {(r["task"], r["impl"]): r for r in rows}
    ours = by[("pretrain", "cxrcae")]
    assert by[("pretrain", "keras")]["images_per_s"] == 2.0
    assert ours["vs_keras"] == pytest.approx(ours["images_per_s"] / 2.0)
    n_images = sum(1 for p in images.iterdir() if p.is_file())
    assert by[("predict", "cxrcae")]["ok"] == by[("predict", "cxrcae")]["images"] == n_images
    assert by[("decode only", "cxrcae")]["images_per_s"] > 0


def test_failing_peer_is_one_clean_error(tmp_path):
    peer = tmp_path / "peer.py"
    peer.write_text("raise SystemExit('no tensorflow here')\n")
    with pytest.raises(CxrcaeError, match="no tensorflow here"):
        keras_reference(sys.executable, peer, "pretrain")


def test_bad_options_are_usage_errors(cli):
    assert cli("bench", "--tasks", "resnet").exit_code == 2
    assert cli("bench", "--settings", "fp8:nhwc").exit_code == 2
    assert cli("bench", "--keras-python", sys.executable).exit_code == 2
