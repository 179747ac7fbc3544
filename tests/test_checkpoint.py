"""Checkpoint folders: round trip, strict loading, atomic writes, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from cxrcae.errors import CheckpointError
from cxrcae.hub.resolve import encoder_state, load_checkpoint, load_model
from cxrcae.models import ConvAutoencoder
from cxrcae.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_checkpoint
from cxrcae.tasks import build_model

CLF = {
    "kind": "classifier",
    "head": "lstm",
    "image_size": 64,
    "class_names": ["COVID", "NORMAL", "PNEUMONIA"],
    "resize_mode": "stretch",
}


@pytest.mark.parametrize(
    "config",
    [
        CLF,
        {**CLF, "head": "dense5"},
        {"kind": "autoencoder", "image_size": 64},
        {"kind": "encoder", "image_size": 64},
    ],
)
def test_round_trip_every_kind(tmp_path, config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_checkpoint(model, tmp_path / "ckpt", config)
    loaded, cfg = load_checkpoint(tmp_path / "ckpt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert cfg["kind"] == config["kind"] and cfg["architecture"] == "cxrcae_vgg_cae"
    assert cfg["versions"]["torch"] == torch.__version__ and cfg["num_parameters"] > 0
    assert not loaded.training
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_load_model_attaches_config_and_accepts_weights_path(tmp_path):
    save_checkpoint(build_model(CLF), tmp_path / "c", CLF)
    model = load_model(tmp_path / "c" / WEIGHTS_NAME)
    assert model.cxrcae_config["class_names"] == CLF["class_names"]


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import save_file

    save_checkpoint(build_model(CLF), tmp_path / "c", CLF)
    cfg = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    cfg.pop("weights_sha256")
    (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(cfg))
    state = build_model(CLF).state_dict()
    state.pop("head.classifier.0.weight")
    state["head.extra"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "c" / WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "c")
    assert "missing keys: head.classifier.0.weight" in str(err.value)
    assert "unexpected keys: head.extra" in str(err.value)


def test_weights_from_another_save_are_refused(tmp_path):
    save_checkpoint(build_model(CLF), tmp_path / "a", CLF)
    save_checkpoint(build_model(CLF), tmp_path / "b", CLF)
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "a")


def test_pickles_are_never_loaded(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps(CLF))
    torch.save(build_model(CLF).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loaded"):
        load_checkpoint(folder)


def test_missing_folder_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(tmp_path / "bad")


def test_atomic_write_keeps_old_checkpoint_when_save_crashes(tmp_path, monkeypatch):
    import cxrcae._atomic as ck

    first = build_model(CLF)
    save_checkpoint(first, tmp_path / "c", CLF)
    before = (tmp_path / "c" / WEIGHTS_NAME).read_bytes()

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", crash)
    with pytest.raises(OSError):
        save_checkpoint(build_model(CLF), tmp_path / "c", CLF)
    assert (tmp_path / "c" / WEIGHTS_NAME).read_bytes() == before
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]
    load_checkpoint(tmp_path / "c")  # still loads


def test_atomic_writes_get_ordinary_permissions_and_keep_existing_ones(tmp_path):
    import os

    from cxrcae._atomic import atomic_open, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not 0600
        (tmp_path / "kept.txt").write_text("old")
        (tmp_path / "kept.txt").chmod(0o604)
        atomic_write_text(tmp_path / "kept.txt", "new")
        assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "half.txt") as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt", "new.txt"]


def test_encoder_state_from_autoencoder_and_classifier(tmp_path):
    cae = ConvAutoencoder()
    save_checkpoint(cae, tmp_path / "cae", {"kind": "autoencoder", "image_size": 64})
    enc, cfg = encoder_state(tmp_path / "cae")
    assert set(enc) == set(cae.encoder.state_dict()) and cfg["kind"] == "autoencoder"
    assert all(torch.equal(enc[k], v) for k, v in cae.encoder.state_dict().items())
