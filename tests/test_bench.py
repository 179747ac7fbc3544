"""`cxrcae bench` plumbing at tiny size (the figures themselves are never asserted: machines are noisy)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import cxrcae.bench
import cxrcae.io.decoded
from cxrcae.bench import (
    bench_pipeline,
    bench_predict,
    bench_train_step,
    count_flops,
    keras_reference,
    run_bench,
    train_flops,
)
from cxrcae.errors import CxrcaeError
from cxrcae.models import CAEEncoder, CXRClassifier, build_head
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import build_model
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


def test_cae_flops_at_224_follow_from_the_layer_shapes():
    count = train_flops("pretrain", 224)
    assert count.forward == pytest.approx(CAE_FORWARD, rel=0.01)
    assert count.train == pytest.approx(CAE_TRAIN, rel=0.01)
    assert count.train / 1e9 == pytest.approx(36, rel=0.01)
    assert count.forward / 1e9 == pytest.approx(12.0, rel=0.01)
    assert [layer.kind for layer in count.layers] == ["Conv2d"] * 6 + ["ConvTranspose2d"] * 5
    conv1 = count.layers[0]
    assert conv1.weight_grad == conv1.forward and conv1.input_grad == 0
    assert all(layer.train == 3 * layer.forward for layer in count.layers[1:])


def test_a_frozen_encoder_costs_its_forward_pass_only():
    encoder_forward = 2 * sum(ENCODER_MACS)
    frozen = train_flops("finetune-frozen", 224)
    assert frozen.forward == pytest.approx(encoder_forward + HEAD_FORWARD, rel=0.01)
    # frozen encoder: forward only; the LSTM's input (the features) needs no gradient, but the gradient
    # still runs back through time (recurrent products); the dense layers get all three
    head_train = 2 * (2 * (LSTM_INPUT_MACS + LSTM_RECURRENT_MACS) + LSTM_RECURRENT_MACS + 3 * DENSE_MACS)
    assert frozen.train == pytest.approx(encoder_forward + head_train, rel=0.01)
    assert all(
        layer.weight_grad == layer.input_grad == 0
        for layer in frozen.layers
        if layer.name.startswith("encoder.")
    )
    everything = train_flops("finetune", 224)
    assert everything.train == pytest.approx(
        3 * (encoder_forward + HEAD_FORWARD) - 2 * ENCODER_MACS[0], rel=0.01
    )

    # gradual unfreezing, stage conv5: conv1-4 forward only; conv5 gets its weight gradient, not its input's
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 224))
    apply_stage(model, "conv5")
    by_name = {layer.name: layer for layer in count_flops(model, 224).layers}
    grads = {
        n: (by_name[f"encoder.stages.{n}"].weight_grad > 0, by_name[f"encoder.stages.{n}"].input_grad > 0)
        for n in ("conv4", "conv5", "conv6")
    }
    assert grads == {"conv4": (False, False), "conv5": (True, False), "conv6": (True, True)}


def test_count_flops_leaves_the_model_alone():
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = count_flops(model, 64)
    assert count.image_size == 64 and count.forward > 0
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("task", ["pretrain", "finetune-frozen", "finetune"])
def test_train_step_rows(task):
    rows = bench_train_step(
        32, 2, steps=1, warmup=0, settings=[("fp32", False), ("fp16", True)], device="cpu", task=task
    )
    assert rows[0]["images_per_s"] > 0 and rows[0]["speedup"] == 1.0 and rows[0]["loss"] == rows[0]["loss"]
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

    monkeypatch.setattr(cxrcae.bench, "bench_train_step", fake_train)
    monkeypatch.setattr(cxrcae.bench, "bench_pipeline", fake_pipeline)
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
    predicted = [r for r in rows if r["task"] == "predict" and r["impl"] == "cxrcae"]
    assert [r["backend"] for r in predicted] == ["torch", "onnxruntime", "onnxruntime-int8"]
    assert all(r["ok"] == r["images"] == n_images and r["vs_keras"] > 0 for r in predicted)
    assert [r["precision"] for r in predicted] == ["fp32", "fp32", "int8"]
    for r in predicted[1:]:  # each fast path against torch fp32 on the same files; 40 files are too few
        assert r["agreement_images"] == n_images and r["meets_bar"] is False
        assert r["top1_agreement"] <= 1.0 and r["max_prob_diff"] >= 0.0
    assert predicted[1]["max_prob_diff"] < 1e-4  # onnxruntime fp32 is the same function
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
    keras = {"pretrain": 12.0, "finetune": 16.0, "predict": 60.0}
    calls = []

    def fake_train(*args, task, **kwargs):
        return [dict(r) for r in ours[task]]

    def fake_predict(inputs, *args, **kwargs):
        return [
            {"task": "decode only", "images": 9, "images_per_s": 300.0},
            {"task": "predict", "backend": "torch", "images": 9, "images_per_s": 90.0, "ok": 9},
            {"task": "predict", "backend": "onnxruntime-int8", "images": 9, "images_per_s": 150.0, "ok": 9},
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

    frozen = ("tfpython", "keras_reference.py", "finetune", "--size", "64", "--batch", "4", "--steps", "3")
    assert calls == [
        ("tfpython", "keras_reference.py", "pretrain", "--size", "64", "--batch", "4", "--steps", "3"),
        ("tfpython", "keras_reference.py", "pretrain", "--size", "64", "--batch", "4", "--steps", "3"),
        (*frozen, "--frozen"),
        (*frozen, "--frozen"),
        ("tfpython", "keras_reference.py", "predict", str(tmp_path), "--size", "64", "--batch", "8"),
        ("tfpython", "keras_reference.py", "predict", str(tmp_path), "--size", "64", "--batch", "8"),
    ]  # each training peer runs twice, the predict peer before and after ours
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
        "runs_images_per_s": [12.0, 12.0],
        "image_size": 64,
        "batch_size": 4,
        "tf": "2.x",
    }
    assert keras_rows[2] == {
        "impl": "keras",
        "task": "predict",
        "images_per_s": 60.0,
        "runs_images_per_s": [60.0, 60.0],
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
