"""ONNX export and the onnxruntime backend: checked export, metadata, same rows as torch, clear refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from cxrcae.errors import CheckpointError, CxrcaeError  # noqa: E402
from cxrcae.infer import onnx as cx_onnx  # noqa: E402
from cxrcae.infer.onnx import ONNX_NAME, OnnxClassifier, export_onnx  # noqa: E402
from cxrcae.infer.prediction import predict  # noqa: E402
from cxrcae.models.checkpoint import read_config, save_checkpoint  # noqa: E402
from cxrcae.tasks import build_model  # noqa: E402

NAMES = ["COVID", "NORMAL", "PNEUMONIA"]
SIZE = 64  # 2 x 2 feature tokens: the LSTM head runs over a real sequence
CONFIG = {
    "kind": "classifier",
    "head": "lstm",
    "image_size": SIZE,
    "class_names": NAMES,
    "resize_mode": "pad",
    "temperature": 1.7,
}


def _checkpoint(folder, seed: int):
    torch.manual_seed(seed)
    return save_checkpoint(build_model(CONFIG), folder, dict(CONFIG))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A checkpoint folder with its model.onnx exported beside it (the default output)."""
    return _checkpoint(tmp_path_factory.mktemp("onnx") / "clf", seed=0)


@pytest.fixture(scope="module")
def exported(classifier):
    return export_onnx(classifier)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another checkpoint (other weights, same config), without a model.onnx."""
    return _checkpoint(tmp_path_factory.mktemp("onnx") / "other", seed=1)


def _images(mini_folder):
    return sorted(str(p) for p in mini_folder.rglob("*") if p.is_file())


def test_export_round_trip(classifier, exported):
    assert exported.path == classifier / ONNX_NAME and exported.path.is_file()
    assert exported.size_bytes == exported.path.stat().st_size
    assert exported.max_abs_diff_logits < 1e-4 and exported.max_abs_diff_probabilities < 1e-4
    assert exported.random_checked == 3 and exported.images_checked == 0

    model = onnx.load(str(exported.path))
    meta = {p.key: p.value for p in model.metadata_props}
    config = read_config(classifier)
    assert meta["cxrcae.weights_sha256"] == config["weights_sha256"] == exported.weights_sha256
    assert json.loads(meta["cxrcae.class_names"]) == NAMES
    assert meta["cxrcae.image_size"] == str(SIZE) and meta["cxrcae.resize_mode"] == "pad"
    assert float(meta["cxrcae.temperature"]) == 1.7
    assert json.loads(meta["cxrcae.preprocessing"])["intensity_range"] == [0.0, 1.0]
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert (
        inp.name == "image"
        and dims[0].dim_param == "batch"
        and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    )

    runner = OnnxClassifier(exported.path)  # any batch size runs
    for n in (1, 5):
        assert runner(np.random.default_rng(n).random((n, 3, SIZE, SIZE), dtype=np.float32)).shape == (n, 3)


def test_export_checks_real_images(classifier, mini_folder, tmp_path):
    result = export_onnx(classifier, tmp_path, check_images=[mini_folder, tmp_path / "missing.png"])
    assert result.path == tmp_path / ONNX_NAME
    assert result.images_checked == len(_images(mini_folder)) == 12
    assert [p for p, _ in result.check_failures] == [str(tmp_path / "missing.png")]
    assert result.max_abs_diff_logits < 1e-4


def test_onnxruntime_rows_match_torch(classifier, exported, mini_folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    paths = [*_images(mini_folder)[:7], str(bad), *_images(mini_folder)[7:]]
    ours = predict(paths, classifier, backend="onnxruntime", batch_size=5, top_k=2)
    ref = predict(paths, classifier, precision="fp32", batch_size=5, top_k=2)
    assert [(p.path, p.status, p.label) for p in ours] == [(p.path, p.status, p.label) for p in ref]
    assert ours[7].status == "error" and ours[7].reason == ref[7].reason
    for a, b in zip(ours, ref):
        if a.ok:
            assert [n for n, _ in a.top_k] == [n for n, _ in b.top_k]
            assert max(abs(a.probabilities[n] - b.probabilities[n]) for n in NAMES) < 1e-4


def test_missing_onnx_is_exported_on_the_fly(other, mini_folder):
    from cxrcae.hub.resolve import load_model

    paths = _images(mini_folder)[:4]
    ref = predict(paths, other, precision="fp32")
    for model in (other, load_model(other)):
        ours = predict(paths, model, backend="onnxruntime")
        assert [p.label for p in ours] == [p.label for p in ref]
        assert max(abs(a.probability - b.probability) for a, b in zip(ours, ref)) < 1e-4
    assert not (other / ONNX_NAME).exists()  # a temporary file, not written into the checkpoint


def test_onnx_from_another_checkpoint_is_refused(exported, other, mini_folder, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(other, folder)
    shutil.copyfile(exported.path, folder / ONNX_NAME)
    with pytest.raises(CheckpointError, match="another checkpoint"):
        predict(_images(mini_folder)[:1], folder, backend="onnxruntime")
    (folder / ONNX_NAME).write_bytes(b"not onnx")
    with pytest.raises(CxrcaeError, match="onnxruntime cannot load it"):
        predict(_images(mini_folder)[:1], folder, backend="onnxruntime")


def test_refusals(classifier, exported, mini_folder, tmp_path, monkeypatch):
    image = _images(mini_folder)[:1]
    with pytest.raises(CxrcaeError, match="Grad-CAM"):
        predict(image, classifier, backend="onnxruntime", explain_dir=tmp_path / "cams")
    assert not (tmp_path / "cams").exists()
    with pytest.raises(CxrcaeError, match="unknown backend"):
        predict(image, classifier, backend="tensorrt")
    with pytest.raises(CxrcaeError, match="CPU"):
        predict(image, classifier, backend="onnxruntime", device="cuda")

    # logits that drift from PyTorch: nothing is written
    real_call = OnnxClassifier.__call__
    monkeypatch.setattr(OnnxClassifier, "__call__", lambda self, x: real_call(self, x) + 0.01)
    with pytest.raises(CxrcaeError, match="nothing written"):
        export_onnx(classifier, tmp_path / "drift.onnx")
    assert not (tmp_path / "drift.onnx").exists()
    monkeypatch.undo()

    monkeypatch.setattr(cx_onnx, "HAVE_ONNXRUNTIME", False)
    with pytest.raises(CxrcaeError, match=r'pip install "cxrcae\[onnx\]"'):
        predict(image, classifier, backend="onnxruntime")
    with pytest.raises(CxrcaeError, match=r'pip install "cxrcae\[onnx\]"'):
        export_onnx(classifier, tmp_path / "x.onnx")


def test_default_output_needs_a_writable_local_folder():
    from cxrcae import bundled

    if bundled.bundled_classifier() is None:
        pytest.skip("this build ships no bundled classifier")
    with pytest.raises(CxrcaeError, match="--output"):
        export_onnx(None)


def test_cli_export_then_predict(cli, other, mini_folder, tmp_path):
    folder = tmp_path / "clf"
    shutil.copytree(other, folder)
    result = cli("export", folder, "--onnx", "--check", mini_folder, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(folder / ONNX_NAME) and info["images_checked"] == 12
    assert info["max_abs_diff_logits"] < 1e-4 and info["opset"] == 17

    table = cli("export", folder, "--onnx", "--output", tmp_path / "m.onnx", "--opset", "18")
    assert table.exit_code == 0, table.output
    assert "max |diff| logits" in table.output
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert max(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 18

    args = ("predict", *_images(mini_folder)[:3], "--model", folder, "--json", "--num-workers", "0")
    ours = cli(*args, "--backend", "onnxruntime")
    ref = cli(*args, "--precision", "fp32")
    assert ours.exit_code == 0 and ref.exit_code == 0, ours.output + ref.output
    a, b = json.loads(ours.stdout), json.loads(ref.stdout)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert max(abs(x["probability"] - y["probability"]) for x, y in zip(a, b)) < 1e-4

    refused = cli(*args, "--backend", "onnxruntime", "--explain", tmp_path / "cams")
    assert refused.exit_code == 1 and "Grad-CAM" in refused.output and "Traceback" not in refused.output
    assert cli("export", folder).exit_code == 2  # no format chosen


def test_workers_chosen_after_the_first_batch_rebuild_the_session(
    classifier, exported, mini_folder, monkeypatch
):
    """Auto workers: the session's threads follow the choice; the rows stay those of a fixed run."""
    from cxrcae.infer import onnx as onnx_module
    from cxrcae.infer import workers

    paths = _images(mini_folder)
    fixed = predict(paths, classifier, backend="onnxruntime", batch_size=2, num_workers=0)
    built = []
    real = onnx_module.OnnxClassifier.__init__

    def spy(self, *args, **kwargs):
        built.append(kwargs.get("threads", args[-1] if args else None))
        real(self, *args, **kwargs)

    monkeypatch.setattr(onnx_module.OnnxClassifier, "__init__", spy)
    monkeypatch.setattr(workers, "choose_workers", lambda *a: 1)
    auto = predict(paths, classifier, backend="onnxruntime", batch_size=2)
    assert len(built) == 2  # the first batch's session, then one sharing the cores with 1 worker
    assert [(p.path, p.label) for p in auto] == [(p.path, p.label) for p in fixed]
