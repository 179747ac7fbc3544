"""The int8 fast path: agreement figures, the int8 export, and predict refusing it below the bar."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from cxrcae.errors import CheckpointError, CxrcaeError  # noqa: E402
from cxrcae.infer import quantize as q  # noqa: E402
from cxrcae.infer.prediction import predict  # noqa: E402
from cxrcae.infer.quantize import INT8_NAME, agreement, int8_cache_path, quantize_onnx  # noqa: E402
from cxrcae.models.checkpoint import read_config, save_checkpoint  # noqa: E402
from cxrcae.tasks import build_model  # noqa: E402

NAMES = ["COVID", "NORMAL", "PNEUMONIA"]
CONFIG = {"kind": "classifier", "head": "lstm", "image_size": 64, "class_names": NAMES, "resize_mode": "pad"}


def _checkpoint(folder, seed: int):
    torch.manual_seed(seed)
    return save_checkpoint(build_model(CONFIG), folder, dict(CONFIG))


def _images(folder):
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory, mini_folder):
    """A checkpoint with its int8 graph: 4 calibration images, agreement on 4 others."""
    folder = _checkpoint(tmp_path_factory.mktemp("int8") / "clf", seed=0)
    return folder, quantize_onnx(folder, calibrate=mini_folder, calibration_images=4, agreement_images=4)


def test_agreement_counts_top1_and_the_largest_difference():
    ref = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    got = np.array([[0.69, 0.21, 0.1], [0.34, 0.41, 0.25], [0.1, 0.1, 0.8]])
    found = agreement(ref, got, ["a.png", "b.png", "c.png"])
    assert found.images == 3 and found.top1 == pytest.approx(2 / 3)
    assert found.max_prob_diff == pytest.approx(0.06) and found.disagreements == ["b.png"]
    assert found.worst[0] == ("b.png", pytest.approx(0.06)) and not found.within_bar

    same = agreement(ref, ref + 0.019)
    assert same.top1 == 1.0 and same.within_bar and not same.meets_bar  # 3 images are too few to trust
    many = agreement(np.tile(ref, (100, 1)), np.tile(ref, (100, 1)))
    assert many.images == 300 and many.meets_bar
    assert not agreement(ref, np.full_like(ref, np.nan)).within_bar  # NaN never passes
    with pytest.raises(CxrcaeError, match="one shape"):
        agreement(ref, ref[:2])
    assert q.Agreement.from_dict(found.to_dict()) == found


def test_int8_export_writes_the_graph_and_its_agreement(built, mini_folder):
    folder, result = built
    assert result.path == folder / INT8_NAME and result.path.stat().st_size == result.size_bytes
    assert result.calibration_images == 4 and result.agreement.images == 4
    assert result.agreement_source == "held-out calibration data"
    assert result.agreement.within_bar and not result.meets_bar  # an untrained model; too few images

    model = onnx.load(str(result.path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["cxrcae.precision"] == "int8"
    assert meta["cxrcae.weights_sha256"] == read_config(folder)["weights_sha256"]
    recorded = json.loads(meta["cxrcae.agreement"])
    assert recorded["images"] == 4 and recorded["meets_bar"] is False
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "LSTM"} <= ops  # encoder int8, head fp32
    side = json.loads(result.agreement_path.read_text())
    assert result.agreement_path.name == "model.int8.agreement.json" and side["file"] == INT8_NAME
    assert side["tried"][-1]["fp32_layers"] == result.fp32_layers


def test_predict_int8_refuses_unverified_unless_forced(built, mini_folder, monkeypatch):
    folder, _ = built
    paths = _images(mini_folder)[:6]
    with pytest.raises(CxrcaeError, match="misses the bar.*--force-int8"):
        predict(paths, folder, backend="onnxruntime-int8")
    forced = predict(paths, folder, backend="onnxruntime-int8", force_int8=True, batch_size=4)
    ref = predict(paths, folder, precision="fp32", batch_size=4)
    assert [p.path for p in forced] == [p.path for p in ref] and all(p.ok for p in forced)
    assert (
        max(abs(a.probabilities[n] - b.probabilities[n]) for a, b in zip(forced, ref) for n in NAMES) < 0.02
    )

    monkeypatch.setitem(q.AGREEMENT_BAR, "min_images", 4)  # the same figures, on a bar they meet
    assert [p.label for p in predict(paths, folder, backend="onnxruntime-int8")] == [p.label for p in forced]


def test_int8_from_elsewhere_is_found_or_refused(built, tmp_path, mini_folder):
    folder, result = built
    image = _images(mini_folder)[:1]
    other = _checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match=r"no int8 model.*--int8 --calibrate"):
        predict(image, other, backend="onnxruntime-int8")
    shutil.copyfile(result.path, other / INT8_NAME)
    with pytest.raises(CheckpointError, match="another checkpoint"):
        predict(image, other, backend="onnxruntime-int8", force_int8=True)

    # a folder cxrcae may not write into keeps its int8 graph in the cache, by weights hash
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.onnx", "*.agreement.json"))
    cached = int8_cache_path(read_config(copy)["weights_sha256"])
    cached.parent.mkdir(parents=True)
    shutil.copyfile(result.path, cached)
    assert predict(image, copy, backend="onnxruntime-int8", force_int8=True)[0].ok


def test_calibration_never_uses_the_check_images(tmp_path, mini_folder, monkeypatch):
    folder = _checkpoint(tmp_path / "clf", seed=2)
    seen = []
    real = q._decode
    monkeypatch.setattr(q, "FP32_TAILS", (0,))

    def spy(paths, *args, **kwargs):
        seen.append(list(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(q, "_decode", spy)
    images = _images(mini_folder)
    result = quantize_onnx(
        folder, tmp_path, calibrate=images[:8], check_images=images[5:], calibration_images=8
    )
    calibrated, checked = seen
    assert not set(calibrated) & set(checked) and len(calibrated) == 5 and len(checked) == 7
    assert result.agreement_source == "check images" and result.path == tmp_path / INT8_NAME
    with pytest.raises(CxrcaeError, match="no calibration images"):
        quantize_onnx(folder, tmp_path, calibrate=images[:3], check_images=images[:3])


def test_cli_int8_export_and_predict(cli, built, mini_folder, tmp_path):
    folder = tmp_path / "clf"
    shutil.copytree(built[0], folder, ignore=shutil.ignore_patterns("*.onnx", "*.agreement.json"))
    args = ("export", folder, "--onnx", "--int8", "--calibrate", mini_folder)
    result = cli(*args, "--calibration-images", "4", "--agreement-images", "4")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "--force-int8" in result.output
    side = json.loads((folder / "model.int8.agreement.json").read_text())
    assert side["file"] == INT8_NAME and side["images"] == 4  # --agreement-images
    meta = {p.key: p.value for p in onnx.load(str(folder / INT8_NAME)).metadata_props}
    assert meta["cxrcae.precision"] == "int8" and json.loads(meta["cxrcae.agreement"])["images"] == 4
    assert cli("export", folder, "--onnx", "--int8").exit_code == 2  # nothing to calibrate on
    assert cli("export", folder, "--onnx", "--calibrate", mini_folder).exit_code == 2  # without --int8

    run = ("predict", *_images(mini_folder)[:3], "--model", folder, "--json", "--num-workers", "0")
    refused = cli(*run, "--backend", "onnxruntime-int8")
    assert refused.exit_code == 1 and "misses the bar" in refused.output and "Traceback" not in refused.output
    forced = cli(*run, "--backend", "onnxruntime-int8", "--force-int8")
    assert forced.exit_code == 0, forced.output
    assert [r["status"] for r in json.loads(forced.stdout)] == ["ok"] * 3
