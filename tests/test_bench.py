"""`cxrcae bench` plumbing at tiny size (the figures themselves are never asserted: machines are noisy)."""

from __future__ import annotations

import functools
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import cxrcae.bench.prediction
import cxrcae.bench.suite
import cxrcae.bench.training
import cxrcae.io.decoded
from cxrcae.bench import (
    MIN_RUNS,
    KerasPeer,
    bench_pipeline,
    bench_predict,
    bench_train_step,
    best_of,
    count_flops,
    keras_reference,
    run_bench,
    train_flops,
)
from cxrcae.bench.keras_peer import keras_train_args
from cxrcae.errors import CxrcaeError
from cxrcae.models import CAEEncoder, CXRClassifier, build_head
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import build_model
from cxrcae.tasks.classify import Classification
from cxrcae.tasks.reconstruct import Reconstruction
from cxrcae.train.finetuning import apply_stage

# The paper's CAE at 224 px, from its layer shapes (models/cae.py), in multiply-adds (MACs) per image.
# Encoder: 3x3 'same' convolutions, H_out*W_out*C_out*C_in*9; (C_in, C_out, output side).
ENCODER = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 256, 56), (256, 512, 28), (512, 512, 14)]
ENCODER_MACS = [side * side * c_out * c_in * 9 for c_in, c_out, side in ENCODER]
# Decoder: 3x3 stride-2 transposed convolutions, H_in*W_in*C_in*C_out*9 (each input pixel spreads over a
# 3x3 window); (C_in, C_out, input side).
DECODER = [(512, 512, 7), (512, 256, 14), (256, 128, 28), (128, 64, 56), (64, 3, 112)]
DECODER_MACS = [side * side * c_in * c_out * 9 for c_in, c_out, side in DECODER]
# = 5,173,346,304 + 830,914,560 MACs: 12.0 GFLOP per forward pass (FLOPs = 2 x MACs)
CAE_FORWARD = 2 * (sum(ENCODER_MACS) + sum(DECODER_MACS))
# Training: forward + weight gradient + input gradient, 3x forward, for every layer but conv1, whose input
# (the image) needs no gradient: 35.85 GFLOP, the "about 36 GFLOP per 224 px training image".
CAE_TRAIN = 3 * CAE_FORWARD - 2 * ENCODER_MACS[0]
# The proposed head at 224 px: LSTM(512) over 7*7 = 49 tokens of 512 features (4 gates, input and
# recurrent products), then Dense(25088 -> 64) and Dense(64 -> 3).
TOKENS = 7 * 7
LSTM_INPUT_MACS = TOKENS * 4 * 512 * 512  # W_ih x_t
LSTM_RECURRENT_MACS = TOKENS * 4 * 512 * 512  # W_hh h_(t-1)
DENSE_MACS = TOKENS * 512 * 64 + 64 * 3
HEAD_FORWARD = 2 * (LSTM_INPUT_MACS + LSTM_RECURRENT_MACS + DENSE_MACS)

# (forward, training step) FLOPs per image of the hand counter that FlopCounterMode replaced: printed by
# `cxrcae.bench.train_flops(task, size)` and `count_flops(CAEEncoder(), 224)` of src/cxrcae/bench.py at
# commit ca19250 (conv: H_out*W_out*C_out*C_in*k*k MACs; transposed conv: H_in*W_in*C_in*C_out*k*k; LSTM:
# T*4H*(I+H); dense: in*out; x2, and x3 in training where both gradients flow).
HAND_COUNTED = {
    ("pretrain", 224): (12_008_521_728, 35_852_156_928),
    ("finetune-frozen", 224): (10_555_425_152, 10_870_129_792),
    ("finetune", 224): (10_555_425_152, 31_492_867_200),
    ("pretrain", 64): (980_287_488, 2_926_706_688),
    ("finetune-frozen", 64): (861_667_712, 887_358_592),
    ("finetune", 64): (861_667_712, 2_570_847_360),
}
HAND_COUNTED_ENCODER_224 = (10_346_692_608, 30_866_669_568)

flops_of = functools.cache(train_flops)  # the classifier at 224 px takes seconds to count (its LSTM's steps)


@pytest.mark.parametrize(("task", "size"), list(HAND_COUNTED))
def test_flop_counter_agrees_with_the_hand_counter_within_2_percent(task, size):
    forward, train = HAND_COUNTED[(task, size)]
    count = flops_of(task, size)
    assert count.forward == pytest.approx(forward, rel=0.02)
    assert count.train == pytest.approx(train, rel=0.02)
    # the one difference: FlopCounterMode follows autograd, which computes no gradient for the LSTM's zero
    # initial state, so the head's backward skips one recurrent product (2 x 4*512*512 at either size)
    assert train - count.train == (0 if task == "pretrain" else 2 * 4 * 512 * 512)
    assert count.forward == forward


def test_flop_counter_agrees_with_the_hand_counter_on_the_encoder():
    count = count_flops(CAEEncoder(), 224)
    assert (count.forward, count.train) == pytest.approx(HAND_COUNTED_ENCODER_224, rel=0.02)
    assert list(count.layers) == [f"stages.conv{i}" for i in range(1, 7)]


def test_cae_flops_at_224_follow_from_the_layer_shapes():
    count = flops_of("pretrain", 224)
    assert count.forward == pytest.approx(CAE_FORWARD, rel=0.01)
    assert count.train == pytest.approx(CAE_TRAIN, rel=0.01)
    assert count.train / 1e9 == pytest.approx(36, rel=0.01)
    assert count.forward / 1e9 == pytest.approx(12.0, rel=0.01)
    assert list(count.layers) == [f"encoder.stages.conv{i}" for i in range(1, 7)] + [
        f"decoder.stages.deconv{i}" for i in range(1, 6)
    ]
    assert list(count.layers.values()) == [2 * m for m in ENCODER_MACS + DECODER_MACS]
    assert sum(count.layers.values()) == count.forward
    # every layer 3x its forward (weight and input gradients) but conv1: the image needs no gradient
    assert count.train == 3 * count.forward - count.layers["encoder.stages.conv1"]


def test_a_frozen_encoder_costs_its_forward_pass_only():
    encoder_forward = 2 * sum(ENCODER_MACS)
    frozen = flops_of("finetune-frozen", 224)
    assert frozen.forward == pytest.approx(encoder_forward + HEAD_FORWARD, rel=0.01)
    # frozen encoder: forward only; the LSTM's input (the features) needs no gradient, but the gradient
    # still runs back through time (recurrent products); the dense layers get all three
    head_train = 2 * (2 * (LSTM_INPUT_MACS + LSTM_RECURRENT_MACS) + LSTM_RECURRENT_MACS + 3 * DENSE_MACS)
    assert frozen.train == pytest.approx(encoder_forward + head_train, rel=0.01)
    everything = flops_of("finetune", 224)
    assert everything.train == pytest.approx(
        3 * (encoder_forward + HEAD_FORWARD) - 2 * ENCODER_MACS[0], rel=0.01
    )

    # gradual unfreezing, stage conv5, against the head stage: conv1-4 stay forward only; conv5 adds its
    # weight gradient (its input needs none), conv6 both gradients, and the LSTM now also the gradient of
    # its input, the features (2 tokens x 2 at 64 px)
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 64))
    apply_stage(model, "conv5")
    staged, head_stage = count_flops(model, 64), flops_of("finetune-frozen", 64)
    conv = staged.layers
    lstm_input_grad = 2 * (2 * 2) * 4 * 512 * 512
    assert staged.train - staged.forward == (
        head_stage.train
        - head_stage.forward
        + conv["encoder.stages.conv5"]
        + 2 * conv["encoder.stages.conv6"]
        + lstm_input_grad
    )


def test_count_flops_leaves_the_model_alone():
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = count_flops(model, 64)
    assert count.image_size == 64 and count.forward > 0
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("task", "objective"),
    [("pretrain", Reconstruction), ("finetune-frozen", Classification), ("finetune", Classification)],
)
def test_train_step_rows(monkeypatch, task, objective):
    steps, real = [], cxrcae.bench.training.train_one_epoch

    def engine_step(model, loader, objective, optimizer, rt, **kwargs):
        stats = real(model, loader, objective, optimizer, rt, **kwargs)
        steps.append((type(objective), len(loader), rt.dtype, stats.loss))
        return stats

    monkeypatch.setattr(cxrcae.bench.training, "train_one_epoch", engine_step)
    rows = bench_train_step(
        32, 2, steps=2, warmup=1, settings=[("fp32", False), ("fp16", True)], device="cpu", task=task
    )
    # each step, warm-up included, is the training engine's on one in-memory batch, with training's objective
    assert [s[:3] for s in steps] == [(objective, 1, None)] * 3
    assert rows[0]["loss"] == steps[-1][3] and math.isfinite(rows[0]["loss"])
    assert rows[0]["images_per_s"] > 0 and rows[0]["speedup"] == 1.0
    assert "error" in rows[1]  # fp16 autocast is refused on CPU with a reason
    row, flops = rows[0], train_flops(task, 32)
    assert row["train_gflop"] == flops.train / 1e9 and row["forward_gflop"] == flops.forward / 1e9
    assert row["gflops"] == pytest.approx(row["images_per_s"] * flops.train / 1e9)
    assert row["forward_images_per_s"] == pytest.approx(2 / row["forward_s"])
    assert row["forward_gflops"] == pytest.approx(row["forward_images_per_s"] * flops.forward / 1e9)
    assert row["forward_fraction"] == pytest.approx(row["gflops"] / row["forward_gflops"])


def test_pipeline_passes_decode_once_then_read_the_cache(monkeypatch, mini_folder):
    decoded = []
    real = cxrcae.io.decoded.load_for_model

    def counting(path, *args, **kwargs):
        decoded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cxrcae.io.decoded, "load_for_model", counting)
    rows = bench_pipeline(
        mini_folder,
        32,
        4,
        settings=[("fp32", True), ("fp16", True)],
        device="cpu",
        in_memory={("fp32", True): 10.0},
    )
    cold, warm, *refused = rows
    assert (cold["task"], cold["cache"], warm["task"], warm["cache"]) == (
        "pretrain-epoch",
        "cold",
        "pretrain-epoch",
        "warm",
    )
    assert 0 < cold["images"] == warm["images"] <= 12 and cold["skipped"] == warm["skipped"] == 0
    # a full epoch: the cold pass decodes each training image once, the warm pass none
    assert len(decoded) == len(set(decoded)) == cold["images"]
    for row in (cold, warm):
        assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert row["gflops"] == pytest.approx(row["images_per_s"] * train_flops("pretrain", 32).train / 1e9)
        assert row["in_memory_images_per_s"] == 10.0
        assert row["pipeline_fraction"] == pytest.approx(row["images_per_s"] / 10.0)
    assert [(r["cache"], "error" in r) for r in refused] == [("cold", True), ("warm", True)]


def test_run_bench_measures_the_in_memory_reference_for_the_pipeline(monkeypatch, tmp_path):
    calls = []

    def fake_train(*args, task, **kwargs):
        calls.append(task)
        return [{"task": task, "precision": "fp32", "channels_last": True, "images_per_s": 20.0}]

    def fake_pipeline(data, image_size, batch_size, settings, device, steps, num_workers, in_memory, **kw):
        calls.append(("pipeline", data, image_size, batch_size, steps, num_workers, in_memory))
        return [{"task": "pretrain-epoch", "cache": "warm", "images_per_s": 19.0}]

    monkeypatch.setattr(cxrcae.bench.suite, "bench_train_step", fake_train)
    monkeypatch.setattr(cxrcae.bench.suite, "bench_pipeline", fake_pipeline)
    report = run_bench(["finetune"], 64, 4, data=tmp_path, data_steps=3, num_workers=2)
    assert calls == ["finetune", "pretrain", ("pipeline", tmp_path, 64, 4, 3, 2, {("fp32", True): 20.0})]
    assert [(r["task"], r["impl"]) for r in report.rows] == [
        ("finetune", "cxrcae"),
        ("pretrain", "cxrcae"),
        ("pretrain-epoch", "cxrcae"),
    ]
    calls.clear()
    run_bench(["pretrain"], 64, 4)  # without data: no pipeline, as before
    assert calls == ["pretrain"]
    with pytest.raises(CxrcaeError, match="no such file"):
        run_bench(["pretrain"], data=tmp_path / "missing")


def test_cli_compares_with_a_keras_peer(cli, tmp_path, shared_data):
    """The peer is any Python running a script that prints the reference's JSON line."""
    peer = write_peer(tmp_path, [2.0, 3.0, 1.0, 2.5])
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
    # four runs per task (the default), each listed; the ratio uses the best
    for task in ("pretrain", "predict"):
        assert by[(task, "keras")]["keras_runs"] == [2.0, 3.0, 1.0, 2.5]
        assert by[(task, "keras")]["images_per_s"] == 3.0
    assert ours["vs_keras"] == pytest.approx(ours["images_per_s"] / 3.0)
    n_images = sum(1 for p in images.iterdir() if p.is_file())
    predicted = [r for r in rows if r["task"] == "predict" and r["impl"] == "cxrcae"]
    assert [r["backend"] for r in predicted] == ["torch", "onnxruntime", "onnxruntime-int8"]
    assert all(r["ok"] == r["images"] == n_images for r in predicted)
    assert [r["vs_keras"] for r in predicted] == pytest.approx([r["images_per_s"] / 3.0 for r in predicted])
    assert [r["precision"] for r in predicted] == ["fp32", "fp32", "int8"]
    for r in predicted[1:]:  # each fast path against torch fp32 on the same files; 40 files are too few
        assert r["agreement_images"] == n_images and r["meets_bar"] is False
        agreeing = r["top1_agreement"] * n_images  # a share of those files: a whole number of them
        assert agreeing == pytest.approx(round(agreeing), abs=1e-9) and 0 <= round(agreeing) <= n_images
    # onnxruntime fp32 is the same function: every file agrees, to float rounding
    assert predicted[1]["top1_agreement"] == 1.0 and predicted[1]["max_prob_diff"] < 1e-4
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
    assert cli("bench", "--predict-backends", "tensorrt").exit_code == 2
    assert cli("bench", "--keras-runs", "3").exit_code == 2  # fewer than 4 runs cannot see both modes


def test_bench_predict_leaves_a_given_model_untouched(tmp_path, mini_folder):
    """The ONNX files a run exports go into a temporary copy, and the torch row is the reference."""
    pytest.importorskip("onnxruntime")
    config = {"kind": "classifier", "head": "lstm", "image_size": 32, "class_names": ["A", "B", "C"]}
    torch.manual_seed(0)
    folder = save_checkpoint(build_model(config), tmp_path / "clf", dict(config))
    before = sorted(p.name for p in folder.iterdir())
    rows = bench_predict([mini_folder], folder, batch_size=4, backends=("torch", "onnxruntime"))
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [(r["task"], r.get("backend")) for r in rows] == [
        ("decode only", None),
        ("predict", "torch"),
        ("predict", "onnxruntime"),
    ]
    assert all(r["image_size"] == 32 and r["ok" if r["task"] == "predict" else "images"] == 12 for r in rows)
    assert rows[2]["top1_agreement"] == 1.0 and rows[2]["max_prob_diff"] < 1e-4
    with pytest.raises(CxrcaeError, match="unknown backend"):
        bench_predict([mini_folder], folder, backends=("tensorrt",))


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
    # each peer's runs in turn, bimodal as TensorFlow can be: the best is the figure compared
    keras = {
        "pretrain": [6.0, 12.0, 6.0, 6.1],
        "finetune": [8.0, 8.0, 8.0, 16.0],
        "predict": [30.0, 31.0, 60.0, 30.0],
    }
    calls = []

    def fake_train(*args, task, **kwargs):
        return [dict(r) for r in ours[task]]

    predicted = []

    def fake_predict(inputs, *args, **kwargs):
        predicted.append(len(calls) - 8)  # the predict peer's runs so far
        return [
            {"task": "decode only", "images": 9, "images_per_s": 300.0},
            {"task": "predict", "backend": "torch", "images": 9, "images_per_s": 90.0, "ok": 9},
            {"task": "predict", "backend": "onnxruntime-int8", "images": 9, "images_per_s": 150.0, "ok": 9},
        ]

    def fake_keras(python, script, task, *args):
        calls.append((python, script, task, *args))
        figure = keras[task][sum(c[2] == task for c in calls) - 1]
        return {"task": task, "images_per_s": figure, "tf": "2.x", "images": 9}

    monkeypatch.setattr(cxrcae.bench.suite, "bench_train_step", fake_train)
    monkeypatch.setattr(cxrcae.bench.suite, "bench_predict", fake_predict)
    monkeypatch.setattr(cxrcae.bench.suite, "keras_reference", fake_keras)
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

    pretrain = ("tfpython", "keras_reference.py", "pretrain", "--size", "64", "--batch", "4", "--steps", "3")
    frozen = ("tfpython", "keras_reference.py", "finetune", "--size", "64", "--batch", "4", "--steps", "3")
    predict = ("tfpython", "keras_reference.py", "predict", str(tmp_path), "--size", "64", "--batch", "8")
    assert calls == [pretrain] * 4 + [(*frozen, "--frozen")] * 4 + [predict] * 4
    assert predicted == [
        2
    ]  # each training peer runs 4 times, the predict peer twice before ours, twice after
    assert [(r["task"], r["impl"], r.get("vs_keras")) for r in report.rows] == [
        ("pretrain", "cxrcae", 2.5),  # 30 / 12
        ("pretrain", "cxrcae", None),  # no figure, no ratio
        ("pretrain", "cxrcae", 3.75),  # 45 / 12
        ("pretrain", "keras", None),
        ("finetune-frozen", "cxrcae", 0.5),  # 8 / 16
        ("finetune-frozen", "keras", None),
        ("decode only", "cxrcae", None),  # the peer has no decode-only figure
        ("predict", "cxrcae", 1.5),  # 90 / 60
        ("predict", "cxrcae", 2.5),  # 150 / 60: each backend against the same peer
        ("predict", "keras", None),
    ]
    assert report.keras_figures == {"pretrain": 12.0, "finetune-frozen": 16.0, "predict": 60.0}
    assert [c["keras_runs"] for c in report.comparisons] == [keras["pretrain"]] * 2 + [keras["finetune"]] + [
        keras["predict"]
    ] * 2
    assert [
        (c["task"], c["precision"], c["images_per_s"], c["keras_images_per_s"], c["vs_keras"])
        for c in report.comparisons
    ] == [
        ("pretrain", "fp32", 30.0, 12.0, 2.5),
        ("pretrain", "bf16", 45.0, 12.0, 3.75),
        ("finetune-frozen", "fp32", 8.0, 16.0, 0.5),
        ("predict", None, 90.0, 60.0, 1.5),
        ("predict", None, 150.0, 60.0, 2.5),
    ]
    assert [c["backend"] for c in report.comparisons if c["task"] == "predict"] == [
        "torch",
        "onnxruntime-int8",
    ]
    keras_rows = [r for r in report.rows if r["impl"] == "keras"]
    assert keras_rows[0] == {
        "impl": "keras",
        "task": "pretrain",
        "precision": "fp32",
        "images_per_s": 12.0,
        "keras_runs": [6.0, 12.0, 6.0, 6.1],
        "image_size": 64,
        "batch_size": 4,
        "tf": "2.x",
    }
    assert keras_rows[2] == {
        "impl": "keras",
        "task": "predict",
        "images_per_s": 60.0,
        "keras_runs": [30.0, 31.0, 60.0, 30.0],
        "images": 9,
        "image_size": 64,
    }


def test_run_bench_without_a_peer_has_no_ratios(monkeypatch):
    monkeypatch.setattr(
        cxrcae.bench.suite, "bench_train_step", lambda *a, task, **k: [{"task": task, "images_per_s": 5.0}]
    )
    monkeypatch.setattr(
        cxrcae.bench.suite, "keras_reference", lambda *a, **k: pytest.fail("no peer was asked for")
    )
    report = run_bench(["finetune"])
    assert report.rows == [{"impl": "cxrcae", "task": "finetune", "images_per_s": 5.0}]
    assert report.comparisons == [] and report.keras_figures == {}


def test_run_bench_refuses_bad_arguments_before_measuring(monkeypatch):
    monkeypatch.setattr(
        cxrcae.bench.suite, "bench_train_step", lambda *a, **k: pytest.fail("measured anyway")
    )
    with pytest.raises(CxrcaeError, match="resnet"):
        run_bench(["pretrain", "resnet"])
    with pytest.raises(CxrcaeError, match="both"):
        run_bench(["pretrain"], keras_python=sys.executable)
    with pytest.raises(CxrcaeError, match="at least 4 times"):
        run_bench(["pretrain"], keras_python=sys.executable, keras_script="peer.py", keras_runs=3)


def write_peer(folder, figures):
    """A stand-in for keras_reference.py: its n-th run prints figures[n % len(figures)] (a log line first)."""
    peer = folder / "peer.py"
    peer.write_text(
        "import json, pathlib, sys\n"
        "count = pathlib.Path(__file__).with_name('runs')\n"
        "n = int(count.read_text()) if count.exists() else 0\n"
        "count.write_text(str(n + 1))\n"
        "print('log line')\n"
        f"print(json.dumps({{'task': sys.argv[1], 'images_per_s': {list(figures)}[n % {len(figures)}]}}))\n"
    )
    return peer


def test_keras_peer_lists_every_run_and_keeps_the_best():
    """TensorFlow can be bimodal (3.9 or 6.9 images/s, same command): the one fast run is the figure."""
    figures = iter([3.91, 3.91, 6.9, 3.91, 6.8, 3.9])
    calls = []

    def runner(python, script, *args):
        calls.append((python, script, *args))
        return {"task": args[0], "images_per_s": next(figures), "tf": "2.21"}

    peer = KerasPeer("tfpython", "keras_reference.py", runner=runner)
    assert peer.runs == MIN_RUNS == 4
    row = peer.train_row("finetune-frozen", 64, 4, 3)
    assert row["keras_runs"] == [3.91, 3.91, 6.9, 3.91] and row["images_per_s"] == 6.9
    assert row["tf"] == "2.21" and row["task"] == "finetune-frozen"
    assert calls == [("tfpython", "keras_reference.py", *keras_train_args("finetune-frozen", 64, 4, 3))] * 4
    assert calls[0][-1] == "--frozen"
    # predict: per folder, half the runs before ours and half after; one row from all of them
    assert KerasPeer("p", "s", runs=5, runner=runner).split_runs() == (3, 2)
    assert KerasPeer.predict_row([{"images_per_s": 2.0, "images": 9}, {"images_per_s": 5.0}], 64) == {
        "impl": "keras",
        "task": "predict",
        "images_per_s": 5.0,
        "keras_runs": [2.0, 5.0],
        "images": 9,
        "image_size": 64,
    }
    assert best_of([{"images_per_s": 1}, {"images_per_s": 7}, {"images_per_s": 3}]) == {
        "images_per_s": 7.0,
        "keras_runs": [1.0, 7.0, 3.0],
    }
    with pytest.raises(CxrcaeError, match="at least 4 times"):
        KerasPeer("tfpython", "keras_reference.py", runs=3, runner=runner)
    with pytest.raises(CxrcaeError, match="no run"):
        best_of([])


def test_cli_table_lists_each_keras_run(cli, tmp_path):
    peer = write_peer(tmp_path, [3.91, 6.9, 3.92, 3.9, 6.85])
    args = ["bench", "--tasks", "pretrain", "--image-size", "32", "--batch-size", "2", "--steps", "1"]
    args += ["--warmup", "0", "--settings", "fp32:nchw", "--device", "cpu"]
    args += ["--keras-python", sys.executable, "--keras-script", peer, "--keras-runs", "5"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "keras runs" in result.stdout
    rows = [[c.strip() for c in line.split("│")] for line in result.stdout.splitlines()]
    cells = next(c for c in rows if c[2:3] == ["keras"])
    assert cells[4].strip() == "6.90"  # images/s: the best run
    assert cells[-2].strip() == "3.91, 6.90, 3.92, 3.90, 6.85"  # every run, in order


def test_cli_prints_the_new_columns(cli, mini_folder):
    args = ["bench", "--tasks", "finetune-frozen", "--image-size", "32", "--batch-size", "4"]
    args += ["--steps", "1", "--warmup", "0", "--settings", "fp32:nhwc", "--device", "cpu"]
    args += ["--data", mini_folder, "--num-workers", "0"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    for column in ("GFLOP/s", "fwd GFLOP/s", "% of fwd", "pipeline/in-mem"):
        assert column in result.stdout
    lines = result.stdout.splitlines()
    for task in ("finetune-frozen ", "pretrain ", "pretrain-epoch (cold)", "pretrain-epoch (warm)"):
        assert any(line.strip("│ ").startswith(task) for line in lines), task

    rows = json.loads(cli(*args, "--data-steps", "1", "--json").stdout)
    by = {(r["task"], r.get("cache")): r for r in rows}
    assert set(by) == {
        ("finetune-frozen", None),
        ("pretrain", None),
        ("pretrain-epoch", "cold"),
        ("pretrain-epoch", "warm"),
    }
    for key in ("gflops", "forward_gflops", "forward_fraction", "train_gflop", "forward_gflop"):
        assert by[("pretrain", None)][key] > 0 and by[("finetune-frozen", None)][key] > 0
    warm = by[("pretrain-epoch", "warm")]
    assert warm["images"] == 4  # one batch
    assert warm["pipeline_fraction"] == pytest.approx(
        warm["images_per_s"] / by[("pretrain", None)]["images_per_s"]
    )
    assert "pipeline_fraction" not in by[("pretrain", None)]


def test_cli_without_data_has_no_pipeline_rows(cli):
    result = cli(
        "bench", "--tasks", "pretrain", "--image-size", "32", "--batch-size", "2", "--steps", "1",
        "--warmup", "0", "--settings", "fp32:nchw", "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["task"] for r in rows] == ["pretrain"] and "forward_gflops" in rows[0]
    assert cli("bench", "--data", "/no/such/folder", "--device", "cpu").exit_code == 1


def test_each_fast_path_is_scored_against_the_torch_row_on_the_files_both_classified(
    monkeypatch, mini_folder
):
    """Fake backends with known probabilities: the int8 row disagrees on one file's top class, by 0.3, and
    fails another file, so its agreement is over the other 11 files: 10 of them agree."""
    names = ["COVID", "NORMAL", "PNEUMONIA"]
    first, second = None, None

    def fake_predictions(files, *, batch_size, model, backend, force_int8, ood, **options):
        nonlocal first, second
        first, second = str(files[0]), str(files[-1])
        for path in map(str, files):
            probs = [0.6, 0.3, 0.1]
            if backend == "onnxruntime-int8" and path == first:
                probs = [0.3, 0.6, 0.1]
            elif backend != "torch":
                probs = [0.6 - 0.01, 0.3 + 0.01, 0.1]
            ok = not (backend == "onnxruntime-int8" and path == second)
            yield SimpleNamespace(path=path, ok=ok, probabilities=dict(zip(names, probs)))

    monkeypatch.setattr(cxrcae.bench.prediction, "iter_predictions", fake_predictions)
    monkeypatch.setattr(cxrcae.bench.prediction, "export_onnx", lambda folder, progress: None)
    monkeypatch.setattr(
        cxrcae.bench.prediction, "quantize_onnx", lambda *a, **k: SimpleNamespace(fp32_layers=["conv1"])
    )
    rows = bench_predict([mini_folder], image_size=32, batch_size=4)
    torch_row, fp32, int8 = rows[1:]
    assert (torch_row["backend"], fp32["backend"], int8["backend"]) == (
        "torch",
        "onnxruntime",
        "onnxruntime-int8",
    )
    assert "top1_agreement" not in torch_row  # the reference itself
    assert (fp32["agreement_images"], fp32["top1_agreement"]) == (12, 1.0)
    assert fp32["max_prob_diff"] == pytest.approx(0.01)
    assert (int8["ok"], int8["agreement_images"]) == (11, 11)
    assert int8["top1_agreement"] == pytest.approx(10 / 11)
    assert int8["max_prob_diff"] == pytest.approx(0.3)
    assert int8["meets_bar"] is False and int8["fp32_layers"] == ["conv1"]
