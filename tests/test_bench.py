"""`cxrcae bench` plumbing at tiny size (the figures themselves are never asserted: machines are noisy)."""

from __future__ import annotations

import json
import sys

import pytest

import cxrcae.bench
from cxrcae.bench import bench_train_step, keras_reference, run_bench
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


def test_run_bench_ratios_against_a_fake_keras(monkeypatch, tmp_path):
    """Fixed figures for us and the peer, so each ratio is checked against a hand-computed value."""
    ours = {
        "pretrain": [
            {"task": "pretrain", "precision": "fp32", "channels_last": False, "images_per_s": 30.0},
            {"task": "pretrain", "precision": "fp16", "channels_last": True, "error": "no fp16 here"},
            {"task": "pretrain", "precision": "bf16", "channels_last": True, "images_per_s": 45.0},
        ],
        "finetune-frozen": [
            {"task": "finetune-frozen", "precision": "fp32", "channels_last": False, "images_per_s": 8.0}
        ],
    }
    keras = {"pretrain": 12.0, "finetune": 16.0, "predict": 60.0}
    calls = []

    def fake_train(*args, task, **kwargs):
        return [dict(r) for r in ours[task]]

    def fake_predict(inputs, *args, **kwargs):
        return [
            {"task": "decode only", "images": 9, "images_per_s": 300.0},
            {"task": "predict", "images": 9, "images_per_s": 90.0, "ok": 9},
        ]

    def fake_keras(python, script, task, *args):
        calls.append((python, script, task, *args))
        return {"task": task, "images_per_s": keras[task], "tf": "2.x", "images": 9}

    monkeypatch.setattr(cxrcae.bench, "bench_train_step", fake_train)
    monkeypatch.setattr(cxrcae.bench, "bench_predict", fake_predict)
    monkeypatch.setattr(cxrcae.bench, "keras_reference", fake_keras)
    report = run_bench(
        ["pretrain", "finetune-frozen"],
        image_size=64,
        batch_size=4,
        steps=3,
        predict=[tmp_path],
        predict_batch_size=8,
        keras_python="tfpython",
        keras_script="keras_reference.py",
    )

    assert calls == [
        ("tfpython", "keras_reference.py", "pretrain", "--size", "64", "--batch", "4", "--steps", "3"),
        (
            "tfpython",
            "keras_reference.py",
            "finetune",
            "--size",
            "64",
            "--batch",
            "4",
            "--steps",
            "3",
            "--frozen",
        ),
        ("tfpython", "keras_reference.py", "predict", str(tmp_path), "--size", "64", "--batch", "8"),
    ]
    assert [(r["task"], r["impl"], r.get("vs_keras")) for r in report.rows] == [
        ("pretrain", "cxrcae", 2.5),  # 30 / 12
        ("pretrain", "cxrcae", None),  # no figure, no ratio
        ("pretrain", "cxrcae", 3.75),  # 45 / 12
        ("pretrain", "keras", None),
        ("finetune-frozen", "cxrcae", 0.5),  # 8 / 16
        ("finetune-frozen", "keras", None),
        ("decode only", "cxrcae", None),  # the peer has no decode-only figure
        ("predict", "cxrcae", 1.5),  # 90 / 60
        ("predict", "keras", None),
    ]
    assert report.keras_figures == {"pretrain": 12.0, "finetune-frozen": 16.0, "predict": 60.0}
    assert [
        (c["task"], c["precision"], c["images_per_s"], c["keras_images_per_s"], c["vs_keras"])
        for c in report.comparisons
    ] == [
        ("pretrain", "fp32", 30.0, 12.0, 2.5),
        ("pretrain", "bf16", 45.0, 12.0, 3.75),
        ("finetune-frozen", "fp32", 8.0, 16.0, 0.5),
        ("predict", None, 90.0, 60.0, 1.5),
    ]
    keras_rows = [r for r in report.rows if r["impl"] == "keras"]
    assert keras_rows[0] == {
        "impl": "keras",
        "task": "pretrain",
        "precision": "fp32",
        "images_per_s": 12.0,
        "image_size": 64,
        "batch_size": 4,
        "tf": "2.x",
    }
    assert keras_rows[2] == {
        "impl": "keras",
        "task": "predict",
        "images_per_s": 60.0,
        "images": 9,
        "image_size": 64,
    }


def test_run_bench_without_a_peer_has_no_ratios(monkeypatch):
    monkeypatch.setattr(
        cxrcae.bench, "bench_train_step", lambda *a, task, **k: [{"task": task, "images_per_s": 5.0}]
    )
    monkeypatch.setattr(cxrcae.bench, "keras_reference", lambda *a, **k: pytest.fail("no peer was asked for"))
    report = run_bench(["finetune"])
    assert report.rows == [{"impl": "cxrcae", "task": "finetune", "images_per_s": 5.0}]
    assert report.comparisons == [] and report.keras_figures == {}


def test_run_bench_refuses_bad_arguments_before_measuring(monkeypatch):
    monkeypatch.setattr(cxrcae.bench, "bench_train_step", lambda *a, **k: pytest.fail("measured anyway"))
    with pytest.raises(CxrcaeError, match="resnet"):
        run_bench(["pretrain", "resnet"])
    with pytest.raises(CxrcaeError, match="both"):
        run_bench(["pretrain"], keras_python=sys.executable)
