"""Push/pull through the real huggingface_hub client against a local Hub (test_hub_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch

from cxrcae.errors import CheckpointError, DownloadError
from cxrcae.hub.resolve import download_checkpoint, load_checkpoint, load_encoder
from cxrcae.hub.transfer import PushError, pull, push_checkpoint
from cxrcae.models import CAEEncoder
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import build_model
from test_hub_server import FakeHub, start_hub

TOKEN = "hf_cxrcaeTestSecret0123456789abcdef"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    server = start_hub({TOKEN}, lfs_threshold=100_000)  # small text files inline, weights via LFS
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # huggingface_hub reads these at import time; timm's downloads use the module constants
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS protocol, which the local server speaks
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture
def autoencoder_dir(tmp_path) -> Path:
    config = {"kind": "autoencoder", "image_size": 32, "resize_mode": "pad", "in_chans": 3}
    return save_checkpoint(_seeded(build_model(config), 1), tmp_path / "cae", config)


@pytest.fixture
def classifier_dir(tmp_path) -> Path:
    config = {
        "kind": "classifier",
        "head": "dense5",
        "image_size": 32,
        "resize_mode": "stretch",
        "class_names": ["COVID", "NORMAL", "PNEUMONIA"],
    }
    folder = save_checkpoint(_seeded(build_model(config), 2), tmp_path / "cls", config)
    metrics = {
        "split": "test",
        "n": 120,
        "metrics": {"macro": {"accuracy": {"value": 0.9123, "ci_low": 0.871, "ci_high": 0.948}}},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _all_text_under(*roots: Path) -> bytes:
    blob = b""
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                blob += path.read_bytes()
    return blob


def test_push_encoder_only_then_pull_roundtrip(hub: FakeHub, autoencoder_dir, tmp_path, cli, _isolated_home):
    res = cli("push", autoencoder_dir, "user/xray-encoder", "--encoder-only", "--token", TOKEN)
    assert res.exit_code == 0, res.output
    assert hub.commit_posts == 1  # one commit for weights + config + card
    files = hub.files("user/xray-encoder")
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
    assert list(hub.lfs_store.values()) == [files["model.safetensors"]]  # weights via LFS batch API + PUT
    remote_config = json.loads(files["config.json"])
    assert remote_config["kind"] == "encoder" and remote_config["resize_mode"] == "pad"
    assert remote_config["extracted_from"]["kind"] == "autoencoder"
    assert "pipeline_tag: image-feature-extraction" in files["README.md"].decode()

    out = tmp_path / "pulled"
    res = cli("pull", "user/xray-encoder", "--out", out)
    assert res.exit_code == 0, res.output
    original = load_encoder(autoencoder_dir)
    pulled = load_encoder(out)
    for key, value in original.state_dict().items():
        assert torch.equal(value, pulled.state_dict()[key]), key
    # and a Hub id works wherever a model is accepted
    from_hub = load_encoder("user/xray-encoder", pooled=True)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(from_hub(x), original(x).mean(dim=(2, 3)))

    # the token reached the server, and nowhere else: not in output, not in any written file
    assert f"Bearer {TOKEN}" in hub.auth_seen
    assert TOKEN not in res.output
    assert TOKEN.encode() not in _all_text_under(tmp_path, _isolated_home)


def test_push_classifier_private_branch_and_card(
    hub: FakeHub, classifier_dir, monkeypatch, cli, _isolated_home
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # token from the environment this time
    res = cli("push", classifier_dir, "user/cxr-cls", "--private", "--branch", "v1", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["revision"] == "v1" and info["kind"] == "classifier"
    assert TOKEN not in res.output
    repo = hub.repos["user/cxr-cls"]
    assert repo.private and set(repo.branches) == {"main", "v1"}
    assert "model.safetensors" not in hub.files("user/cxr-cls", "main")
    card = hub.files("user/cxr-cls", "v1")["README.md"].decode()
    assert "pipeline_tag: image-classification" in card
    assert "| macro | accuracy | 0.9123 | 0.8710 - 0.9480 |" in card  # the real numbers with their CI
    # the pushed weights are byte-identical to the local ones
    assert (
        hub.files("user/cxr-cls", "v1")["model.safetensors"]
        == (classifier_dir / "model.safetensors").read_bytes()
    )

    # private: an anonymous pull is refused cleanly; with the token it loads strictly
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DownloadError, match="not found"):
        download_checkpoint("user/cxr-cls@v1")
    result = pull("user/cxr-cls@v1", token=TOKEN)
    assert result.kind == "classifier" and result.commit == repo.branches["v1"]
    model, config = load_checkpoint(result.folder)
    assert config["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert TOKEN.encode() not in _all_text_under(_isolated_home)


def test_offline_mode_serves_from_cache(hub: FakeHub, autoencoder_dir, monkeypatch):
    push_checkpoint(autoencoder_dir, "user/cae", token=TOKEN)
    online = download_checkpoint("user/cae")
    hub.stop()  # no server any more: offline must not need it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert download_checkpoint("user/cae") == online
    model, config = load_checkpoint("user/cae")
    assert config["kind"] == "autoencoder"
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE=1"):
        download_checkpoint("user/never-pulled")


def test_refuses_repo_without_safetensors_or_with_wrong_keys(hub: FakeHub, cli, tmp_path):
    config = {"kind": "encoder", "image_size": 32, "architecture": "cxrcae_vgg_cae"}
    hub.add_repo(
        "user/pickled", {"config.json": json.dumps(config).encode(), "pytorch_model.bin": b"\x80\x04pickle"}
    )
    res = cli("pull", "user/pickled")
    assert res.exit_code == 1
    assert "no model.safetensors" in res.output and "pytorch_model.bin" in res.output
    assert "Traceback" not in res.output

    # encoder weights under a classifier config: strict loading names the missing keys
    enc = save_checkpoint(CAEEncoder(), tmp_path / "enc", {"kind": "encoder", "image_size": 32})
    wrong = {"kind": "classifier", "head": "lstm", "image_size": 32, "class_names": ["A", "B"]}
    hub.add_repo(
        "user/mismatch",
        {
            "config.json": json.dumps(wrong).encode(),
            "model.safetensors": (enc / "model.safetensors").read_bytes(),
        },
    )
    with pytest.raises(CheckpointError, match="missing keys"):
        pull("user/mismatch")
    with pytest.raises(DownloadError, match="not found"):
        pull("user/does-not-exist")
    with pytest.raises(DownloadError, match="revision"):
        pull("user/pickled@nope")


def test_push_auth_failures_are_clean(hub: FakeHub, autoencoder_dir, monkeypatch, cli):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(autoencoder_dir / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(autoencoder_dir / "no-stored-tokens"))
    res = cli("push", autoencoder_dir, "user/x")
    assert res.exit_code == 1 and "no Hugging Face token" in res.output

    wrong = "hf_wrongTokenValue987654321"
    res = cli("push", autoencoder_dir, "user/x", "--token", wrong)
    assert res.exit_code == 1 and "not allowed to write" in res.output
    assert wrong not in res.output and "user/x" not in hub.repos
    with pytest.raises(PushError):
        push_checkpoint(autoencoder_dir, "user/x", token=wrong)


def test_push_refuses_a_broken_folder_before_uploading(hub: FakeHub, autoencoder_dir):
    (autoencoder_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="sha256"):
        push_checkpoint(autoencoder_dir, "user/broken", token=TOKEN)
    assert "user/broken" not in hub.repos


def test_timm_loads_from_the_hub(hub: FakeHub, autoencoder_dir):
    import timm

    import cxrcae  # noqa: F401  (registers cxrcae_vgg_cae)

    push_checkpoint(autoencoder_dir, "user/cae-timm", token=TOKEN)
    x = torch.rand(1, 3, 32, 32)
    expected = load_encoder(autoencoder_dir)(x)
    by_overlay = timm.create_model(
        "cxrcae_vgg_cae", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="user/cae-timm")
    )
    by_name = timm.create_model("hf-hub:user/cae-timm", pretrained=True)  # reads the repo's config.json
    assert by_name.pretrained_cfg["input_size"] == (3, 32, 32)  # the checkpoint's own input contract
    with torch.no_grad():
        assert torch.equal(by_overlay.eval().forward_features(x), expected)
        assert torch.equal(by_name.eval().forward_features(x), expected)


def test_the_ood_guard_travels_with_its_classifier(hub: FakeHub, classifier_dir, tmp_path):
    from cxrcae.models import ConvAutoencoder
    from cxrcae.models.checkpoint import GUARD_NAME
    from cxrcae.ood.guard import load_guard, save_guard

    save_guard(
        classifier_dir,
        _seeded(ConvAutoencoder(), 3),
        {"threshold": 0.01, "image_size": 32, "resize_mode": "stretch"},
    )
    push_checkpoint(classifier_dir, "user/guarded", token=TOKEN)
    assert hub.files("user/guarded", "main")[GUARD_NAME] == (classifier_dir / GUARD_NAME).read_bytes()

    result = pull("user/guarded", tmp_path / "pulled", token=TOKEN)
    assert GUARD_NAME in result.files
    guard = load_guard(result.folder, result.config)  # sha256 and shapes checked against config.json
    assert guard is not None and guard.block["threshold"] == 0.01

    encoder_only = push_checkpoint(classifier_dir, "user/guarded-encoder", encoder_only=True, token=TOKEN)
    assert encoder_only.kind == "encoder"
    assert GUARD_NAME not in hub.files("user/guarded-encoder", "main")  # the guard belongs to the classifier
    assert "ood" not in json.loads(hub.files("user/guarded-encoder", "main")["config.json"])

    (classifier_dir / GUARD_NAME).write_bytes(b"\0" * 64)  # altered after its config was written
    with pytest.raises(CheckpointError, match="sha256"):
        push_checkpoint(classifier_dir, "user/guarded", token=TOKEN)
