"""Architecture facts at 224 px by shapes and parameter counts; behaviour at tiny sizes (timm style)."""

from __future__ import annotations

import pytest
import torch

from cxrcae.models import (
    HEADS,
    CAEDecoder,
    CAEEncoder,
    ConvAutoencoder,
    CXRClassifier,
    build_head,
    count_parameters,
)


def test_paper_parameter_counts_at_224():
    enc, dec = CAEEncoder(), CAEDecoder()
    assert count_parameters(enc) == 3_947_712
    assert count_parameters(dec) == 3_910_275
    clf = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 224))
    # Keras reports 7,652,803; PyTorch's LSTM keeps a second bias vector: 4 gates x 512 = 2,048 more.
    assert count_parameters(clf) == 7_652_803 + 2_048


def test_paper_layer_counts_and_shapes_at_224():
    enc = CAEEncoder()
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in enc.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 256, 512, 512] and len(pools) == 5
    with torch.no_grad():
        z = enc(torch.zeros(1, 3, 224, 224))
        assert z.shape == (1, 512, 7, 7)
        assert CAEDecoder()(z).shape == (1, 3, 224, 224)


def test_decoder_last_layer_is_linear():
    dec = CAEDecoder()
    last = list(dec.stages.children())[-1]
    assert isinstance(last, torch.nn.ConvTranspose2d)
    # a strongly negative bias shows through only if no ReLU follows the last layer
    with torch.no_grad():
        last.bias.fill_(-10.0)
        out = dec(torch.rand(2, 512, 2, 2))
    assert (out < -5).all()


@pytest.mark.parametrize("size", [32, 64])
def test_autoencoder_shapes_and_gradients(size):
    torch.manual_seed(0)
    cae = ConvAutoencoder()
    x = torch.rand(2, 3, size, size)
    out = cae(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.nn.functional.mse_loss(out, x).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cae.parameters())


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("size", [32, 64])
def test_every_head_shape_no_nan_all_params_get_gradients(head, size):
    torch.manual_seed(0)
    clf = CXRClassifier(CAEEncoder(), build_head(head, 3, size)).train()
    x = torch.rand(2, 3, size, size)
    logits = clf(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    missing = [n for n, p in clf.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_classifier_encoder_keys_are_the_autoencoders():
    cae = ConvAutoencoder()
    clf = CXRClassifier(CAEEncoder(), build_head("lstm", 3, 64))
    cae_keys = {k for k in cae.state_dict() if k.startswith("encoder.")}
    clf_keys = {k for k in clf.state_dict() if k.startswith("encoder.")}
    assert cae_keys == clf_keys and len(cae_keys) == 12
    clf.encoder.load_state_dict(cae.encoder.state_dict())
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(clf.forward_features(x), cae.encode(x))


def test_bad_input_sizes_are_refused():
    from cxrcae.errors import CxrcaeError

    with pytest.raises(ValueError, match="divisible by 32"):
        CAEEncoder()(torch.zeros(1, 3, 40, 40))
    with pytest.raises(CxrcaeError, match="divisible by 32"):
        build_head("lstm", 3, 100)
    with pytest.raises(CxrcaeError, match="unknown head"):
        build_head("resnet", 3, 64)


def test_transposed_conv_matches_keras_same_geometry():
    """Keras 'same' stride-2 k=3: input pixel i lands on outputs 2i, 2i+1, 2i+2 (last one cropped)."""
    from cxrcae.models.cae import KerasSameConvTranspose2d

    layer = KerasSameConvTranspose2d(1, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
        x = torch.zeros(1, 1, 3, 3)
        x[0, 0, 0, 0] = 1.0
        y = layer(x)[0, 0]
    assert y.shape == (6, 6)
    assert y[:3, :3].sum() == 9 and y.sum() == 9  # the 3x3 footprint starts at (0, 0)


def _outputs_and_grads(model, x, fast: bool, monkeypatch):
    from cxrcae.models import cae

    monkeypatch.setattr(cae, "FAST_PATHS", fast)
    model.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), xx.grad.clone(), grads


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_fast_paths_equal_the_plain_layer_order(channels_last, monkeypatch):
    """Strided-input-gradient deconvolutions and pool-before-ReLU: same outputs and gradients as plain."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = ConvAutoencoder().to(memory_format=fmt)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=fmt)
    plain = _outputs_and_grads(model, x, False, monkeypatch)
    fast = _outputs_and_grads(model, x, True, monkeypatch)
    assert fast[0].is_contiguous(memory_format=fmt)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-7)
    for name, grad in plain[2].items():
        torch.testing.assert_close(fast[2][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_transposed_conv_fast_path_matches_the_layer_at_odd_sizes(monkeypatch):
    from cxrcae.models import cae

    torch.manual_seed(1)
    layer = cae.KerasSameConvTranspose2d(5, 4)
    x = torch.randn(3, 5, 7, 5)
    monkeypatch.setattr(cae, "FAST_PATHS", False)
    ref = layer(x)
    monkeypatch.setattr(cae, "FAST_PATHS", True)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    assert layer(x).shape == (3, 4, 14, 10)


def test_hooks_and_export_see_the_documented_layer_order(monkeypatch):
    """A hook on relu2 sees the full-resolution activation: the fast path steps aside for it."""
    from cxrcae.models import cae

    enc = CAEEncoder()
    seen = []
    handle = enc.stages.relu2.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    enc(torch.rand(1, 3, 64, 64))
    handle.remove()
    assert seen == [torch.Size([1, 64, 64, 64])]
    assert cae._hooked(enc) is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cae._fast_path(torch.rand(1)) is False
    assert cae._fast_path(torch.rand(1)) is True
