"""Keras .h5 import: layouts checked against an independent NumPy forward pass, and against real Keras.

Real Keras without TensorFlow in CI: ``tests/fixtures/keras/`` holds the paper's CAE and classifier as Keras 2
(tf-keras) and Keras 3 wrote them (legacy .h5, gzipped byte for byte) with the Keras outputs on a stored input
batch; ``make_fixtures.py`` there rebuilds them where TensorFlow is installed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cxrcae.errors import CheckpointError
from cxrcae.hub.keras import import_keras, read_keras_h5
from cxrcae.hub.resolve import load_checkpoint

ENC = (64, 64, 128, 256, 512, 512)
DEC = (512, 256, 128, 64, 3)
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------- NumPy reference


def conv_same(x, k, b):  # x (H, W, C), k (3, 3, C, O): Keras Conv2D(padding="same"), cross-correlation
    h, w, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, k.shape[3]))
    for i in range(3):
        for j in range(3):
            out += xp[i : i + h, j : j + w] @ k[i, j]
    return out + b


def pool(x):
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


def deconv_same(x, k, b):  # k (3, 3, O, C): Keras Conv2DTranspose(strides=2, padding="same")
    h, w, _ = x.shape
    full = np.zeros((2 * h + 1, 2 * w + 1, k.shape[2]))
    for i in range(3):
        for j in range(3):
            full[i : i + 2 * h : 2, j : j + 2 * w : 2] += x @ k[i, j].T
    return full[: 2 * h, : 2 * w] + b


def lstm(seq, kernel, recurrent, bias):  # Keras LSTM, return_sequences=True, gates i, f, c, o
    u = recurrent.shape[0]
    h, c, out = np.zeros(u), np.zeros(u), []
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for x in seq:
        z = x @ kernel + h @ recurrent + bias
        i, f, g, o = sig(z[:u]), sig(z[u : 2 * u]), np.tanh(z[2 * u : 3 * u]), sig(z[3 * u :])
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out)


def encoder_np(x, convs):
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    for n, (k, b) in enumerate(convs):
        x = relu(conv_same(x, k, b))
        if n >= 1:
            x = pool(x)
    return x


# ---------------------------------------------------------------------------------- Keras-layout files


def he(*shape, fan_in):
    return (RNG.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def encoder_weights():
    convs, prev = [], 3
    for ch in ENC:
        convs.append(
            (he(3, 3, prev, ch, fan_in=9 * prev), (RNG.standard_normal(ch) * 0.05).astype(np.float32))
        )
        prev = ch
    return convs


def decoder_weights():
    deconvs, prev = [], 512
    for ch in DEC:
        deconvs.append(
            (he(3, 3, ch, prev, fan_in=9 * prev), (RNG.standard_normal(ch) * 0.05).astype(np.float32))
        )
        prev = ch
    return deconvs


def write_keras_h5(path: Path, layers: list[tuple[str, list[tuple[str, np.ndarray]]]], model_config: dict):
    """The layout Keras' legacy ``model.save('x.h5')`` writes: model_weights/<layer>/<weight name>."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.4.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config)
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [name.encode() for name, _ in layers]
        for name, weights in layers:
            lg = g.create_group(name)
            lg.attrs["weight_names"] = [w.encode() for w, _ in weights]
            for w, arr in weights:
                lg.create_dataset(w, data=arr)
        f.create_group("optimizer_weights")  # present in real files; must be ignored


def cae_file(path: Path, convs, deconvs):
    """Sequential(encoder Sequential, decoder Sequential), Keras 3 naming (no ':0')."""
    enc = [
        (f"encoder/conv2d_{i}/{n}", a)
        for i, (k, b) in enumerate(convs)
        for n, a in (("kernel", k), ("bias", b))
    ]
    dec = [
        (f"decoder/conv2d_transpose_{i}/{n}", a)
        for i, (k, b) in enumerate(deconvs)
        for n, a in (("kernel", k), ("bias", b))
    ]
    config = {
        "class_name": "Sequential",
        "config": {"layers": [{"config": {"batch_input_shape": [None, 32, 32, 3]}}]},
    }
    write_keras_h5(path, [("encoder", enc), ("decoder", dec)], config)


def classifier_file(path: Path, convs, lstm_w, denses):
    """Flat functional model, Keras 2 naming ('conv2d/kernel:0', 'lstm/lstm_cell/kernel:0')."""
    layers = [("input_1", [])]
    for i, (k, b) in enumerate(convs):
        name = "conv2d" if i == 0 else f"conv2d_{i}"
        layers.append((name, [(f"{name}/kernel:0", k), (f"{name}/bias:0", b)]))
        if i >= 1:
            layers.append((f"max_pooling2d_{i}", []))
    layers.append(("reshape", []))
    kern, rec, bias = lstm_w
    layers.append(
        (
            "lstm",
            [
                ("lstm/lstm_cell/kernel:0", kern),
                ("lstm/lstm_cell/recurrent_kernel:0", rec),
                ("lstm/lstm_cell/bias:0", bias),
            ],
        )
    )
    layers.append(("flatten", []))
    for i, (k, b) in enumerate(denses):
        name = "dense" if i == 0 else f"dense_{i}"
        layers.append((name, [(f"{name}/kernel:0", k), (f"{name}/bias:0", b)]))
    write_keras_h5(path, layers, {"class_name": "Functional", "config": {}})


# ----------------------------------------------------------------------------------------------- tests


def test_cae_conversion_matches_numpy_reference(tmp_path):
    convs, deconvs = encoder_weights(), decoder_weights()
    cae_file(tmp_path / "cae.h5", convs, deconvs)
    result = import_keras(tmp_path / "cae.h5", tmp_path / "cae")
    assert result.kind == "autoencoder" and result.config["image_size"] == 32
    assert result.config["resize_mode"] == "pad"  # the authors pretrained the CAE on letterboxed images
    with pytest.raises(CheckpointError, match="unknown resize mode"):
        import_keras(tmp_path / "cae.h5", tmp_path / "bad", resize_mode="crop")
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    model, config = load_checkpoint(result.out)
    assert config["source"]["format"] == "keras-h5" and config["source"]["keras_version"] == "2.4.0"

    x = RNG.random((32, 32, 3))
    z = encoder_np(x, convs)
    y = z
    for n, (k, b) in enumerate(deconvs):
        y = deconv_same(y, k, b)
        if n < len(deconvs) - 1:
            y = np.maximum(y, 0)
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))
        z_t = model.encode(t)[0].numpy().transpose(1, 2, 0)
        y_t = model(t)[0].numpy().transpose(1, 2, 0)
    assert np.abs(z).max() > 0.1  # activations are not trivially zero
    np.testing.assert_allclose(z_t, z, rtol=1e-4, atol=1e-4 * np.abs(z).max())
    np.testing.assert_allclose(y_t, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())
    # the flip check: a flipped transposed-conv kernel would give a clearly different reconstruction
    flipped = deconv_same(z, deconvs[0][0][::-1, ::-1], deconvs[0][1])
    assert not np.allclose(flipped, deconv_same(z, *deconvs[0]), atol=1e-3)


def test_classifier_conversion_matches_numpy_reference(tmp_path):
    convs = encoder_weights()
    u, tokens, n_classes = 512, 4, 3  # 64 px input -> 2x2 = 4 tokens (token order matters)
    lstm_w = (
        he(512, 4 * u, fan_in=512),
        he(u, 4 * u, fan_in=u),
        (RNG.standard_normal(4 * u) * 0.1).astype(np.float32),
    )
    denses = [
        (he(tokens * u, 64, fan_in=tokens * u), (RNG.standard_normal(64) * 0.1).astype(np.float32)),
        (he(64, n_classes, fan_in=64), (RNG.standard_normal(n_classes) * 0.1).astype(np.float32)),
    ]
    classifier_file(tmp_path / "covid_classification.h5", convs, lstm_w, denses)
    result = import_keras(
        tmp_path / "covid_classification.h5", tmp_path / "cls", class_names=["COVID", "NORMAL", "PNEUMONIA"]
    )
    assert (result.kind, result.head, result.config["image_size"]) == ("classifier", "lstm", 64)
    assert result.config["resize_mode"] == "stretch"  # the authors' fine-tuning stretched
    with pytest.raises(CheckpointError, match="distinct"):
        import_keras(tmp_path / "covid_classification.h5", tmp_path / "x", class_names=["A", "A", "B"])
    model, config = load_checkpoint(result.out)
    assert config["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"]

    x = RNG.random((64, 64, 3))
    feats = encoder_np(x, convs)  # (2, 2, 512), Keras Reshape -> (4, 512) row-major
    seq = lstm(feats.reshape(tokens, 512), *lstm_w)
    hidden = np.maximum(seq.reshape(-1) @ denses[0][0] + denses[0][1], 0)
    logits = hidden @ denses[1][0] + denses[1][1]
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(out, logits, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(logits).max()))
    card = (result.out / "README.md").read_text()
    assert "keras-h5" in card and "covid_classification.h5" in card and "COVID, NORMAL, PNEUMONIA" in card


def test_cli_import_keras_and_errors(tmp_path, cli):
    convs = encoder_weights()
    enc_only = [
        (f"conv2d_{i}", [(f"conv2d_{i}/kernel:0", k), (f"conv2d_{i}/bias:0", b)])
        for i, (k, b) in enumerate(convs)
    ]
    write_keras_h5(tmp_path / "encoder.h5", enc_only, {})
    res = cli("import-keras", tmp_path / "encoder.h5", "--out", tmp_path / "enc", "--image-size", "64")
    assert res.exit_code == 0, res.output
    assert "encoder" in res.output
    _, config = load_checkpoint(tmp_path / "enc")
    assert config["kind"] == "encoder" and config["image_size"] == 64

    # a wrong architecture is refused with a one-line reason, no traceback
    bad = [
        (
            "conv2d",
            [
                ("conv2d/kernel:0", np.zeros((5, 5, 3, 8), np.float32)),
                ("conv2d/bias:0", np.zeros(8, np.float32)),
            ],
        )
    ]
    write_keras_h5(tmp_path / "other.h5", bad, {})
    res = cli("import-keras", tmp_path / "other.h5", "--out", tmp_path / "x")
    assert res.exit_code == 1 and "Traceback" not in res.output
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match="not a readable HDF5"):
        read_keras_h5(tmp_path / "text.h5")


# ------------------------------------------------------------------------------ committed real-Keras files

KERAS_FIXTURES = Path(__file__).parent / "fixtures" / "keras"
FLAVOURS = ["tf_keras", "keras3"]  # Keras 2 (the authors' generation) and Keras 3, both via TensorFlow 2.21


@pytest.fixture(scope="module")
def keras_reference() -> dict:
    """The stored input batch (NCHW tensor, pixels / 255 as the authors scaled them) and the Keras outputs."""
    with np.load(KERAS_FIXTURES / "reference.npz") as ref:
        data = {k: ref[k] for k in ref.files}
    data["x"] = torch.from_numpy(
        (data["x_uint8"].astype(np.float32) / np.float32(255.0)).transpose(0, 3, 1, 2)
    )
    data["versions"] = json.loads(str(data["versions"]))
    return data


def keras_file(tmp_path: Path, flavour: str, name: str) -> Path:
    """The .h5 exactly as Keras wrote it, unzipped to ``tmp_path/<name>.h5``."""
    dest = tmp_path / f"{name}.h5"
    with gzip.open(KERAS_FIXTURES / flavour / f"{name}.h5.gz") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest


def assert_close(torch_out: torch.Tensor, keras_out: np.ndarray, nchw: bool = True) -> None:
    got = torch_out.numpy()
    if nchw and got.ndim == 4:
        got = got.transpose(0, 2, 3, 1)
    assert got.shape == keras_out.shape
    np.testing.assert_allclose(got, keras_out, rtol=1e-4, atol=1e-4 * np.abs(keras_out).max())


def check_source(config: dict, path: Path, flavour: str, versions: dict) -> None:
    source = config["source"]
    assert source["format"] == "keras-h5" and source["file"] == path.name
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["keras_version"] == versions[flavour] and source["backend"] == "tensorflow"


def test_keras_fixtures_are_nontrivial(keras_reference):
    """The stored outputs exercise every layer: live activations, distinct images, unsaturated classes."""
    ref = keras_reference
    assert ref["x_uint8"].shape == (2, 64, 64, 3) and ref["cae_out"].shape == (2, 64, 64, 3)
    assert ref["cae_latent"].shape == (2, 2, 2, 512) and 0.3 < np.mean(ref["cae_latent"] > 0) < 0.95
    assert 0.2 < np.mean(ref["cls_hidden"] > 0) < 0.9
    assert np.abs(ref["cae_out"][0] - ref["cae_out"][1]).max() > 0.1
    prob = ref["cls_prob"]
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)
    assert 0.02 < prob.min() and prob.max() < 0.98 and np.ptp(prob, axis=1).min() > 0.2
    assert set(ref["versions"]) >= {"tensorflow", *FLAVOURS}
    assert ref["versions"]["tf_keras"].startswith("2.") and ref["versions"]["keras3"].startswith("3.")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_real_keras_cae_file_matches_keras_outputs(tmp_path, flavour, keras_reference):
    path = keras_file(tmp_path, flavour, "cae")
    result = import_keras(path, tmp_path / "cae")
    assert result.kind == "autoencoder" and result.config["image_size"] == 64  # read from model_config
    model, config = load_checkpoint(result.out)
    check_source(config, path, flavour, keras_reference["versions"])
    x = keras_reference["x"]
    with torch.no_grad():
        assert_close(model.encode(x), keras_reference["cae_latent"])
        assert_close(model(x), keras_reference["cae_out"])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_real_keras_classifier_file_matches_keras_outputs(tmp_path, flavour, keras_reference):
    path = keras_file(tmp_path, flavour, "covid_classification")
    names = ["COVID", "NORMAL", "PNEUMONIA"]
    result = import_keras(path, tmp_path / "cls", class_names=names)
    assert (result.kind, result.head, result.config["image_size"]) == ("classifier", "lstm", 64)
    assert result.config["resize_mode"] == "stretch"  # the authors' fine-tuning stretched
    with pytest.raises(CheckpointError, match="distinct"):
        import_keras(tmp_path / "covid_classification.h5", tmp_path / "x", class_names=["A", "A", "B"])
    model, config = load_checkpoint(result.out)
    assert config["class_names"] == names
    check_source(config, path, flavour, keras_reference["versions"])
    # Keras' Dense(64, relu) output is the input of the head's last Linear layer
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    x = keras_reference["x"]
    with torch.no_grad():
        assert_close(model.forward_features(x), keras_reference["cae_latent"])  # the CAE's encoder weights
        prob = torch.softmax(model(x), dim=1)
    hook.remove()
    assert_close(seen[0], keras_reference["cls_hidden"])
    np.testing.assert_allclose(prob.numpy(), keras_reference["cls_prob"], rtol=1e-4, atol=1e-5)


def test_cli_imports_real_keras_classifier(tmp_path, cli, keras_reference):
    path = keras_file(tmp_path, "tf_keras", "covid_classification")
    res = cli("import-keras", path, "--out", tmp_path / "ckpt", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["kind"], summary["head"], summary["image_size"]) == ("classifier", "lstm", 64)
    assert summary["class_names"] == ["class_0", "class_1", "class_2"]  # Keras files carry no class names
    model, config = load_checkpoint(tmp_path / "ckpt")
    assert config["class_names_known"] is False
    with torch.no_grad():
        prob = torch.softmax(model(keras_reference["x"]), dim=1).numpy()
    np.testing.assert_allclose(prob, keras_reference["cls_prob"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ real Keras, built on the spot

KERAS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import importlib
    import numpy as np
    out, flavour = sys.argv[1], sys.argv[2]
    try:  # "keras": Keras 3; "tf_keras": Keras 2 (what the authors' 2021 files were written with)
        keras = importlib.import_module(flavour)
    except ImportError:
        sys.exit(42)
    layers = keras.layers
    keras.utils.set_random_seed(0)
    size = 64
    enc = keras.Sequential([keras.Input((size, size, 3))], name="encoder")
    for i, ch in enumerate((64, 64, 128, 256, 512, 512)):
        enc.add(layers.Conv2D(ch, 3, padding="same", activation="relu"))
        if i >= 1:
            enc.add(layers.MaxPooling2D(2))
    dec = keras.Sequential([keras.Input((size // 32, size // 32, 512))], name="decoder")
    for ch in (512, 256, 128, 64):
        dec.add(layers.Conv2DTranspose(ch, 3, strides=2, padding="same", activation="relu"))
    dec.add(layers.Conv2DTranspose(3, 3, strides=2, padding="same"))
    cae = keras.Sequential([keras.Input((size, size, 3)), enc, dec])
    # random, non-zero biases so the bias layout is exercised too
    for layer in enc.layers + dec.layers:
        if layer.weights:
            k, b = layer.get_weights()
            layer.set_weights([k, np.random.default_rng(1).normal(0, 0.05, b.shape).astype("float32")])
    cls = keras.Sequential([
        keras.Input((size, size, 3)), enc, layers.Reshape(((size // 32) ** 2, 512)),
        layers.LSTM(512, return_sequences=True), layers.Flatten(),
        layers.Dense(64, activation="relu"), layers.Dense(3, activation="softmax"),
    ])
    lstm = cls.layers[2]
    k, r, b = lstm.get_weights()
    lstm.set_weights([k, r, np.random.default_rng(2).normal(0, 0.1, b.shape).astype("float32")])
    x = np.random.default_rng(3).random((2, size, size, 3)).astype("float32")
    cae.save(os.path.join(out, "cae.h5"))
    cls.save(os.path.join(out, "covid_classification.h5"))
    np.save(os.path.join(out, "x.npy"), x)
    np.save(os.path.join(out, "cae_out.npy"), np.asarray(cae(x)))
    np.save(os.path.join(out, "cls_prob.npy"), np.asarray(cls(x)))
    """
)


def _keras_python() -> str | None:
    """This interpreter if it has TensorFlow, else CXRCAE_KERAS_PYTHON (a Python with tensorflow)."""
    try:
        import tensorflow  # noqa: F401

        return sys.executable
    except ImportError:
        other = os.environ.get("CXRCAE_KERAS_PYTHON")
        return shutil.which(other) if other else None


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["keras", "tf_keras"])
def test_real_keras_files_agree(tmp_path, flavour):
    python = _keras_python()
    if python is None:
        pytest.skip("tensorflow not importable (set CXRCAE_KERAS_PYTHON to a Python that has it)")
    script = tmp_path / "make_keras.py"
    script.write_text(KERAS_SCRIPT)
    proc = subprocess.run(
        [python, str(script), str(tmp_path), flavour], capture_output=True, text=True, timeout=600
    )
    if proc.returncode == 42:
        pytest.skip(f"{flavour} is not installed next to tensorflow")
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.from_numpy(np.load(tmp_path / "x.npy").transpose(0, 3, 1, 2).copy())

    cae = import_keras(tmp_path / "cae.h5", tmp_path / "cae_ckpt")
    model, _ = load_checkpoint(cae.out)
    with torch.no_grad():
        y = model(x).numpy().transpose(0, 2, 3, 1)
    ref = np.load(tmp_path / "cae_out.npy")
    np.testing.assert_allclose(y, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=1e-4)

    cls = import_keras(tmp_path / "covid_classification.h5", tmp_path / "cls_ckpt")
    model, _ = load_checkpoint(cls.out)
    with torch.no_grad():
        prob = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(prob, np.load(tmp_path / "cls_prob.npy"), atol=1e-4)
