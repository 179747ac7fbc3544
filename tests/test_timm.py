"""timm integration: registered after `import cxrcae`, same features as load_encoder, timm backbone API."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

from cxrcae import bundled
from cxrcae.errors import CheckpointError
from cxrcae.hub.resolve import load_encoder
from cxrcae.models.checkpoint import read_config, save_checkpoint
from cxrcae.tasks import build_model


def _seeded(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    config = {"kind": "classifier", "head": "lstm", "image_size": 64, "class_names": ["A", "B"]}
    return save_checkpoint(_seeded(build_model(config), 3), tmp_path_factory.mktemp("ckpt") / "cls", config)


def test_registration_is_lazy_and_does_not_import_torch():
    code = (
        "import sys, cxrcae\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
        "import timm\n"
        "print(timm.list_models('cxrcae*'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cxrcae_vgg_cae" in out.stdout


def test_pretrained_file_gives_load_encoder_features(classifier_dir):
    import cxrcae  # noqa: F401  (registers the model)

    model = timm.create_model(
        "cxrcae_vgg_cae",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(classifier_dir / "model.safetensors")),
    ).eval()
    cfg = model.pretrained_cfg
    bundled_size = read_config(bundled.bundled_encoder())["image_size"]  # the default cfg is the shipped one
    assert cfg["input_size"] == (3, bundled_size, bundled_size) and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == (0.0, 0.0, 0.0) and tuple(cfg["std"]) == (1.0, 1.0, 1.0)
    assert cfg["num_classes"] == 0 and model.num_features == 512
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["mean"] == (0.0, 0.0, 0.0) and data_cfg["crop_pct"] == 1.0

    encoder = load_encoder(classifier_dir)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), encoder(x))
        assert torch.equal(model(x), load_encoder(classifier_dir, pooled=True)(x))
        assert model(x).shape == (2, 512)
    assert model.forward_features(torch.rand(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_new_head_features_only_and_bad_weights(classifier_dir, tmp_path):
    import cxrcae  # noqa: F401

    file = str(classifier_dir / "model.safetensors")
    model = timm.create_model(
        "cxrcae_vgg_cae", pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=file)
    )
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    reference = load_encoder(classifier_dir).state_dict()
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in reference.items()
    )  # encoder loaded, head new

    feats = timm.create_model("cxrcae_vgg_cae", features_only=True)
    outs = feats(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512, 512, 512]
    assert feats.feature_info.reduction() == [1, 2, 4, 8, 16, 32]

    from safetensors.torch import save_file

    save_file({"something.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a cxrcae encoder"):
        timm.create_model(
            "cxrcae_vgg_cae",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "other.safetensors")),
        )
