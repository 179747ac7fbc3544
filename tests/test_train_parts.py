"""The training building blocks on small tensors: stages, early stopping, resume state, runtime, weights."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae import runtime
from cxrcae.data import XrayDataset, load_records
from cxrcae.data.dataset import SafeDataset, collate_with_errors
from cxrcae.data.stream import iter_batches
from cxrcae.errors import CxrcaeError
from cxrcae.models import CAEEncoder, ConvAutoencoder, CXRClassifier, build_head
from cxrcae.runtime import reproducible, resolve_device, resolve_precision
from cxrcae.tasks.reconstruct import Reconstruction
from cxrcae.train import speed
from cxrcae.train.config import expand_stages
from cxrcae.train.data import make_loader
from cxrcae.train.engine import EarlyStopping, Runtime, train_mode, validate
from cxrcae.train.finetuning import apply_stage


def _classifier() -> CXRClassifier:
    torch.manual_seed(0)
    return CXRClassifier(CAEEncoder(), build_head("lstm-dense3", 3, 32))


def test_expand_stages():
    assert expand_stages("head,all") == ("head", "all")
    assert expand_stages(["head", "gradual"]) == ("head", "conv6", "conv5", "conv4", "conv3", "conv2", "all")
    with pytest.raises(CxrcaeError, match="unknown stage 'encoder'"):
        expand_stages("head,encoder")
    with pytest.raises(CxrcaeError):
        expand_stages("")


@pytest.mark.parametrize(
    ("stage", "trainable_blocks"),
    [("head", set()), ("conv5", {"conv5", "conv6"}), ("all", {f"conv{i}" for i in range(1, 7)})],
)
def test_apply_stage_freezes_the_right_blocks(stage, trainable_blocks):
    model = _classifier()
    params = apply_stage(model, stage)
    trained = {
        n.split(".")[2] for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad
    }
    assert trained == trainable_blocks
    assert all(p.requires_grad for p in model.head.parameters())
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_frozen_encoder_stays_in_eval_mode_and_gets_no_gradient():
    model = _classifier()
    apply_stage(model, "head")
    train_mode(model)
    assert not model.encoder.training and model.head.training
    # dropout is live in the head, the encoder gets no gradient
    loss = model(torch.rand(2, 3, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    apply_stage(model, "all")
    train_mode(model)
    assert model.encoder.training


def test_early_stopping_semantics():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert stop.update(1.0, 1)
    assert not stop.update(0.95, 2)  # not better by min_delta
    assert stop.update(0.8, 3) and stop.bad_epochs == 0
    assert not stop.update(0.8, 4) and not stop.stopped
    assert not stop.update(0.9, 5) and stop.stopped
    assert (stop.best, stop.best_epoch) == (0.8, 3)
    again = EarlyStopping.from_dict(stop.to_dict())
    assert again == stop
    fresh = EarlyStopping(patience=3)
    assert EarlyStopping.from_dict(fresh.to_dict()).best == math.inf


def test_optimizer_state_round_trips_without_pickle():
    from cxrcae.train.state import optimizer_from_flat, optimizer_to_flat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, meta = optimizer_to_flat(opt)
    assert all(torch.is_tensor(v) for v in tensors.values())
    import json

    meta = json.loads(json.dumps(meta))  # really JSON
    twin = torch.optim.Adam(model.parameters(), lr=0.5)
    twin.load_state_dict(optimizer_from_flat(tensors, meta))
    assert twin.param_groups[0]["lr"] == 0.01 and tuple(twin.param_groups[0]["betas"]) == (0.8, 0.95)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], twin.state[p][key])


def test_rng_state_round_trips():
    from cxrcae.train.state import capture_rng, restore_rng

    with reproducible(3):
        tensors, meta = capture_rng()
        expected = (torch.rand(3), random.random(), np.random.rand())
        torch.rand(10), random.random(), np.random.rand()
        restore_rng(tensors, meta)
        got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_resume_state_refuses_mixed_files(tmp_path):
    from cxrcae.errors import CheckpointError
    from cxrcae.train.state import load_resume_state, save_resume_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    save_resume_state(tmp_path, model, {"kind": "encoder"}, opt, {"epoch": 1})
    state, tensors, weights = load_resume_state(tmp_path)
    assert state["epoch"] == 1 and "rng.torch" in tensors and set(weights) == {"weight", "bias"}
    (tmp_path / "last" / "state.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="does not match"):
        load_resume_state(tmp_path)
    with pytest.raises(CheckpointError, match="no resume state"):
        load_resume_state(tmp_path / "elsewhere")


def test_class_weights_balance_the_loss():
    from cxrcae.data.balance import class_weights

    w = class_weights([0, 0, 0, 1, 2, 2], 3)
    assert torch.allclose(w, torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    with pytest.raises(CxrcaeError, match="no training images"):
        class_weights([0, 0, 1], 3)


def test_validation_metrics_of_a_classifier():
    import numpy as np

    from cxrcae.tasks.classify import Classification
    from cxrcae.train.engine import EpochStats

    # confusion (true rows): a: 3 a + 1 b; b: 2 b; c: 2 b + 2 c
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), pred] = 0.8
    objective = Classification(["a", "b", "c"])
    objective.start_validation()
    for rows in (slice(0, 4), slice(4, 10)):  # two validation batches, as ``validate`` feeds them
        objective.observe(torch.log(torch.from_numpy(probs[rows])), torch.from_numpy(y[rows]))
    m = objective.epoch_metrics(EpochStats(1.0, 10, 1.0))
    assert m["val_accuracy"] == pytest.approx(7 / 10)
    assert m["val_balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    f1 = [2 * 1 * 0.75 / 1.75, 2 * 0.4 * 1 / 1.4, 2 * 1 * 0.5 / 1.5]  # precision a 3/3, b 2/5, c 2/2
    assert m["val_macro_f1"] == pytest.approx(sum(f1) / 3)


def test_mean_image_baseline_comes_from_the_first_epoch():
    from cxrcae.train.engine import EpochStats

    torch.manual_seed(0)
    train, val = torch.rand(6, 3, 8, 8), torch.rand(3, 3, 8, 8)
    objective = Reconstruction()
    model = torch.nn.Identity()
    for chunk in train.split(4):
        objective(model.train(), chunk, torch.zeros(len(chunk)))
    objective(model.eval(), val, torch.zeros(3))
    objective.epoch_metrics(EpochStats(0.0, 3, 1.0))
    expected = ((val - train.mean(0)) ** 2).mean().item()
    assert objective.baseline["val_mse_mean_image"] == pytest.approx(expected, rel=1e-6)
    assert objective.baseline["train_images"] == 6 and objective.baseline["val_images"] == 3
    objective(model.eval(), torch.ones(2, 3, 8, 8), torch.zeros(2))  # later epochs do not change it
    objective.epoch_metrics(EpochStats(0.0, 2, 1.0))
    assert objective.baseline["val_mse_mean_image"] == pytest.approx(expected, rel=1e-6)


def test_reproducible_leaves_the_process_as_it_found_it():
    import os
    import random

    from cxrcae.runtime import CUBLAS_ENV, reproducible

    torch.use_deterministic_algorithms(False)
    before = (torch.get_rng_state(), random.getstate(), os.environ.get(CUBLAS_ENV))
    with reproducible(3):
        assert torch.are_deterministic_algorithms_enabled()
        first = torch.rand(3)
    with reproducible(3):
        assert torch.equal(torch.rand(3), first)  # the same seed gives the same numbers
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert os.environ.get(CUBLAS_ENV) == before[2]


def test_runtime_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    # auto on this CPU: bf16 exactly when the runtime finds AMX-backed bf16, else plain fp32 (None)
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if runtime.cpu_bf16_fast() else None)
    with pytest.raises(CxrcaeError, match="fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(CxrcaeError, match="unknown precision"):
        resolve_precision("int8", cpu)
    with pytest.raises(CxrcaeError, match="unknown device|unsupported device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CxrcaeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_auto_precision_follows_the_bf16_speed_check(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_fast", lambda size=None: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_bf16_fast", lambda size=None: False)
    assert resolve_precision("auto", cpu) is None
    assert runtime.precision_name(None) == "fp32" and runtime.precision_name(torch.bfloat16) == "bf16"


def test_config_validation_names_the_option():
    from cxrcae.train import FinetuneConfig, PretrainConfig

    with pytest.raises(CxrcaeError, match="--image-size"):
        PretrainConfig(image_size=100).validate()
    with pytest.raises(CxrcaeError, match="--balance"):
        FinetuneConfig(balance="oversample").validate()
    with pytest.raises(CxrcaeError, match="unknown head"):
        FinetuneConfig(head="transformer").validate()
    cfg = FinetuneConfig(stages=("head", "gradual"), augment=True)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


def test_bench_train_step_reports_each_setting():
    from cxrcae.bench import bench_train_step

    rows = bench_train_step(
        32, 2, steps=1, warmup=0, device="cpu", settings=[("fp32", False), ("fp16", True)]
    )
    assert rows[0]["images_per_s"] > 0 and rows[0]["speedup"] == 1.0
    assert "fp16" in rows[1]["error"]


def test_training_and_inference_report_a_bad_file_through_the_same_wrapper(tmp_path):
    """One wrapper and one collate: a corrupt file in a training folder is skipped with the reason text
    that ``iter_batches`` (predict, embed, reconstruct, evaluate) gives for the same file."""
    folder = tmp_path / "data" / "NORMAL"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = load_records(tmp_path / "data")
    assert str(bad) in [str(r.path) for r in records]

    loader = make_loader(XrayDataset(records, 32), 2, shuffle=False, seed=0)
    assert isinstance(loader.dataset, SafeDataset) and loader.collate_fn is collate_with_errors
    batches = list(loader)
    skipped = [s for b in batches for s in b["skipped"]]
    assert sum(len(b["image"]) for b in batches) == 3
    assert [lab for b in batches for lab in b["label"].tolist()] == [0, 0, 0]

    errors = [e for b in iter_batches([r.path for r in records], 32, batch_size=2) for e in b.errors]
    assert len(errors) == 1 and errors[0][1] == str(bad)
    reason = errors[0][2]
    assert reason and "\n" not in reason
    assert skipped == [f"{bad}: {reason}"]

    # the engine collects it while scoring the readable images
    torch.manual_seed(0)
    stats = validate(ConvAutoencoder(), loader, Reconstruction(), Runtime(torch.device("cpu")))
    assert stats.skipped == skipped and stats.images == 3


def test_speed_probe_chooses_by_measurement_not_flags(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    times = {(None, False): 1.0, (None, True): 2.0, (torch.bfloat16, True): 0.9}
    choice = speed.probe_cpu(64, timer=lambda dtype, cl, size: times[(dtype, cl)])
    assert choice["precision"] == "fp32" and choice["channels_last"] is False  # bf16 only 1.11x: not enough
    times[(torch.bfloat16, True)] = 0.5
    choice = speed.probe_cpu(64, timer=lambda dtype, cl, size: times[(dtype, cl)])
    assert choice["precision"] == "bf16" and choice["channels_last"] is True


def test_speed_probe_runs_once_per_machine_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("CXRCAE_HOME", str(tmp_path))
    monkeypatch.delenv("CXRCAE_PROBE", raising=False)
    calls = []

    def fake_probe(size):
        calls.append(size)
        return {
            "version": runtime.PROBE_VERSION,
            "precision": "fp32",
            "channels_last": size < 200,
            "seconds": {},
        }

    cpu = torch.device("cpu")
    monkeypatch.setattr(speed, "probe_cpu", fake_probe)
    assert runtime.cpu_choice(None)["precision"] == "fp32" and calls == []  # inference never probes
    assert runtime.cpu_choice(224)["source"] == "default" and calls == []  # reading never measures
    first = speed.measure_cpu(224)
    again = speed.measure_cpu(224)
    assert calls == [224] and first["channels_last"] is False and again["source"].endswith(".json")
    assert runtime.resolve_channels_last(None, cpu, 224) is False
    assert runtime.resolve_channels_last(None, cpu, 64) is False  # not measured at 64: the nearest size's
    assert speed.training_precision("fp32", None, cpu, 64) == (None, True)  # training measures its size
    assert calls == [224, 64] and runtime.cpu_choice(224)["channels_last"] is False
    assert speed.training_precision("fp32", True, cpu, 32) == (None, True) and len(calls) == 2  # no auto
    assert runtime.resolve_channels_last(True, cpu) is True  # the user's choice wins
    key = runtime.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # narrower kernels are another machine for the probe
    assert runtime.machine_key() != key
    assert (
        runtime.cpu_choice(None)["channels_last"] is True and len(calls) == 2
    )  # inference: nearest, no probe
    monkeypatch.setenv("CXRCAE_PROBE", "off")
    assert speed.measure_cpu(224)["channels_last"] is True and len(calls) == 2


def test_speed_probe_times_the_real_step():
    seconds = speed._time_setting(None, False, 32, reps=1)
    assert 0 < seconds < 60
