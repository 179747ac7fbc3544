"""predict: a row per input file, in order; error rows for bad files; exit code 3; outputs round trip."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae.errors import EXIT_SOME_FAILED
from cxrcae.infer.prediction import UNCERTAIN, collect_inputs, predict
from cxrcae.infer.writers import PredictionWriter, read_predictions
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import build_model

NAMES = ["COVID", "NORMAL", "PNEUMONIA"]
SIZE = 32


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    config = {
        "kind": "classifier",
        "head": "dense5",
        "image_size": SIZE,
        "class_names": NAMES,
        "resize_mode": "pad",
    }
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("model") / "clf", config)


def _png(path, seed, size=(40, 52), mode="L"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    img = Image.fromarray(arr)
    (img.convert(mode) if mode != "L" else img).save(path)
    return path


def _dicom(path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CR", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 48, 40
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(48 * 40, dtype="<u2") % 4096).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    """Good PNGs (gray, RGB), a DICOM without extension, a truncated PNG, text posing as PNG, an empty
    file, a notes.txt and a hidden file, one of them in a sub-folder."""
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    _png(root / "a_good.png", 1)
    _png(root / "sub" / "b_rgb.png", 2, mode="RGB")
    _dicom(root / "c_scan")  # sniffed by its DICM magic
    full = _png(tmp_path / "full.png", 3, size=(64, 64)).read_bytes()
    (root / "d_truncated.png").write_bytes(full[: len(full) // 2])
    (root / "e_text.png").write_text("this is not an image\n")
    (root / "f_empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("lab notes")
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_mixed_folder_one_row_per_file(classifier, mixed_folder):
    rows = predict([mixed_folder], model=classifier)
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == sorted(
        ["a_good.png", "b_rgb.png", "c_scan", "d_truncated.png", "e_text.png", "f_empty.png", "notes.txt"]
    )
    for name in ("a_good.png", "b_rgb.png", "c_scan"):
        r = by_name[name]
        assert r.status == "ok" and r.label in NAMES and r.top_class == r.label
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert r.probability == pytest.approx(max(r.probabilities.values()))
    assert by_name["d_truncated.png"].status == "error" and "truncat" in by_name["d_truncated.png"].reason
    assert by_name["e_text.png"].status == "error" and "not an image" in by_name["e_text.png"].reason
    assert by_name["f_empty.png"].status == "error" and by_name["f_empty.png"].reason == "empty file"
    assert by_name["notes.txt"].status == "skipped"
    assert all(r.reason for r in rows if not r.ok)


def test_rows_keep_input_order(classifier, tmp_path):
    files = [_png(tmp_path / f"{name}.png", i) for i, name in enumerate(["zeta", "alpha", "mid"])]
    order = [files[0], tmp_path / "missing.png", files[1], files[2], files[0]]
    rows = predict(order, model=classifier, batch_size=2)
    assert [r.path for r in rows] == [
        str(files[0]),
        str(tmp_path / "missing.png"),
        str(files[1]),
        str(files[2]),
    ]
    assert rows[1].status == "error" and "no such file" in rows[1].reason
    # batching does not change results
    again = predict(order, model=classifier, batch_size=1)
    for a, b in zip(rows, again):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_threshold_and_top_k(classifier, tmp_path):
    path = _png(tmp_path / "x.png", 7)
    (row,) = predict(path, model=classifier, top_k=2, threshold=1.0)
    assert row.label == UNCERTAIN and row.top_class in NAMES
    assert len(row.top_k) == 2 and row.top_k[0][0] == row.top_class
    assert row.top_k[0][1] >= row.top_k[1][1]


def test_temperature_from_config_is_applied(classifier, tmp_path):
    import shutil

    from cxrcae.eval.calibration import store_temperature

    hot = tmp_path / "hot"
    shutil.copytree(classifier, hot)
    store_temperature(hot, 100.0, {"split": "val"})
    path = _png(tmp_path / "x.png", 8)
    (plain,) = predict(path, model=classifier)
    (flat,) = predict(path, model=hot)
    assert flat.top_class == plain.top_class
    assert max(flat.probabilities.values()) < max(plain.probabilities.values())
    assert max(flat.probabilities.values()) == pytest.approx(1 / 3, abs=0.02)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_output_round_trips(classifier, mixed_folder, tmp_path, suffix):
    rows = predict([mixed_folder], model=classifier, top_k=3)
    out = tmp_path / f"preds{suffix}"
    with PredictionWriter(out, NAMES) as writer:
        for r in rows:
            writer.write(r.to_dict())
    back = read_predictions(out)
    assert len(back) == len(rows)
    for r, b in zip(rows, back):
        want = r.to_dict()
        for key in ("path", "status", "label", "top_class", "reason", "explanation"):
            assert b[key] == want[key], key
        assert b["probability"] == want["probability"]
        assert b["probabilities"] == want["probabilities"]
        assert [list(t) for t in b["top_k"]] == want["top_k"]
    if suffix == ".json":
        json.loads(out.read_text())  # strict JSON array


def test_writer_is_atomic_on_failure(tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("previous\n")
    with pytest.raises(RuntimeError):
        with PredictionWriter(out, NAMES) as writer:
            writer.write({"path": "a", "status": "ok"})
            raise RuntimeError("interrupted")
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]


def test_cli_exit_code_and_output(cli, classifier, mixed_folder, tmp_path):
    out = tmp_path / "preds.csv"
    result = cli("predict", mixed_folder, "--model", classifier, "--output", out, "--num-workers", "0")
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "a_good.png" in result.output and "empty file" in result.output
    rows = read_predictions(out)
    assert len(rows) == 7 and sum(r["status"] == "error" for r in rows) == 3

    good = tmp_path / "good.png"
    _png(good, 4)
    ok = cli("predict", good, "--model", classifier, "--json", "--num-workers", "0")
    assert ok.exit_code == 0, ok.output
    (row,) = json.loads(ok.stdout)
    assert row["status"] == "ok" and set(row["probabilities"]) == set(NAMES)


def test_cli_without_model_says_how(cli, tmp_path, monkeypatch):
    from cxrcae import bundled

    monkeypatch.setattr(bundled, "CLASSIFIER_DIR", tmp_path / "no-weights")  # a build without weights
    result = cli("predict", _png(tmp_path / "x.png", 1))
    assert result.exit_code == 1
    assert "--model" in result.output and "Traceback" not in result.output


def test_cli_bad_output_extension(cli, classifier, tmp_path):
    result = cli(
        "predict", _png(tmp_path / "x.png", 1), "--model", classifier, "--output", tmp_path / "p.xlsx"
    )
    assert result.exit_code == 1 and ".csv" in result.output


def test_autoencoder_is_refused(tmp_path):
    from cxrcae.errors import CheckpointError

    config = {"kind": "autoencoder", "image_size": SIZE}
    cae = save_checkpoint(build_model(config), tmp_path / "cae", config)
    with pytest.raises(CheckpointError, match="reconstruct"):
        predict(_png(tmp_path / "x.png", 1), model=cae)


def test_explain_writes_gradcam_overlays(classifier, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the same file name twice: the overlays must not overwrite each other
    files = [_png(tmp_path / "a" / "x.png", 1), _png(tmp_path / "b" / "x.png", 2)]
    rows = predict(files, model=classifier, explain_dir=tmp_path / "cam")
    paths = [r.explanation for r in rows]
    assert len(set(paths)) == 2
    for p in paths:
        img = np.asarray(Image.open(p))
        assert img.shape == (SIZE, 2 * SIZE, 3)


def test_gradcam_on_the_classifier_keeps_logits_and_weights(classifier):
    from cxrcae.hub.resolve import load_checkpoint
    from cxrcae.infer.explain import GradCAM

    net, _ = load_checkpoint(classifier)
    images = torch.rand(3, 3, SIZE, SIZE)
    logits, cams = GradCAM(net)(images)  # the default layer exists in the real model
    assert logits.shape == (3, 3)
    assert torch.allclose(logits, net(images), atol=1e-5)
    assert cams.shape == (3, SIZE, SIZE)
    assert not any(p.grad is not None for p in net.parameters())


# Toy model for Grad-CAM: 4x4 average pooling then an identity 1x1 convolution give an 8x8 map whose
# channel c is the pooled image channel c; the logit of class c is the mean of channel c over its own
# patch of that map (rows, cols below, 8x8 cells), so only that patch of that channel matters to it.
# Class 2 also counts class 0's evidence against it: a negative channel weight that the ReLU must drop.
PATCHES = {0: (slice(0, 2), slice(5, 7)), 1: (slice(5, 7), slice(1, 3)), 2: (slice(3, 5), slice(3, 5))}


class _PatchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3)[:, :, None, None])
        stages = OrderedDict(pool=torch.nn.AvgPool2d(4), conv6=conv, relu6=torch.nn.ReLU())
        self.encoder = torch.nn.Module()
        self.encoder.stages = torch.nn.Sequential(stages)  # GradCAM's default layer: encoder.stages.relu6

    def forward(self, x):
        a = self.encoder.stages(x)
        m = [a[:, c, rows, cols].mean(dim=(1, 2)) for c, (rows, cols) in PATCHES.items()]
        return torch.stack([m[0], m[1], m[2] - m[0]], 1)


def _pixels(cls: int) -> tuple[slice, slice]:
    rows, cols = PATCHES[cls]
    return slice(rows.start * 4, rows.stop * 4), slice(cols.start * 4, cols.stop * 4)


def test_gradcam_peaks_on_the_patch_that_drives_the_class():
    from cxrcae.infer.explain import GradCAM

    model = _PatchModel()
    image = torch.zeros(1, 3, SIZE, SIZE)
    for c, value in ((0, 1.0), (1, 0.6), (2, 0.3)):  # each class's channel hot on its own patch only
        image[0, c][_pixels(c)] = value
    images = image.repeat(3, 1, 1, 1)
    logits, cams = GradCAM(model)(images, torch.tensor([0, 1, 2]))
    assert cams.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(logits, torch.tensor([[1.0, 0.6, 0.3 - 1.0]] * 3))
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for c in range(3):
        rows, cols = _pixels(c)
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[rows, cols] = True
        peak = divmod(int(cams[c].argmax()), SIZE)
        assert inside[peak], (c, peak)
        assert cams[c][inside].max() == pytest.approx(1.0)
        # more than 4 pixels (one feature cell) from the patch, the map is zero: the other classes' hot
        # patches live in channels whose Grad-CAM weight is zero, or negative (class 0's, for class 2)
        far = (yy < rows.start - 4) | (yy >= rows.stop + 4) | (xx < cols.start - 4) | (xx >= cols.stop + 4)
        assert cams[c][far].abs().max() < 1e-6, c
    # with no class given, the predicted class (0, the hottest logit) is explained
    _, default = GradCAM(model)(image)
    torch.testing.assert_close(default[0], cams[0])


def test_collect_inputs_globs_and_missing(tmp_path):
    _png(tmp_path / "one.png", 1)
    _png(tmp_path / "two.png", 2)
    entries = collect_inputs([str(tmp_path / "*.png"), str(tmp_path / "nope*.png")])
    assert [(e[0].rsplit("/", 1)[-1], e[1]) for e in entries] == [
        ("one.png", "ok"),
        ("two.png", "ok"),
        ("nope*.png", "error"),
    ]


def test_iter_batches_contract(tmp_path):
    from cxrcae.data.stream import iter_batches

    paths = [_png(tmp_path / f"{i}.png", i) for i in range(5)]
    paths.insert(2, tmp_path / "missing.png")
    seen = []
    for batch in iter_batches(paths, 16, "stretch", batch_size=4, num_workers=0):
        assert batch.images.shape == (len(batch.indices), 3, 16, 16)
        assert batch.images.dtype == torch.float32 and 0 <= batch.images.min() and batch.images.max() <= 1
        seen += batch.indices + [i for i, _, _ in batch.errors]
        for i, p, reason in batch.errors:
            assert i == 2 and p == str(paths[2]) and reason == "no such file"
    assert sorted(seen) == list(range(6))


def test_cli_exit_code_constant_matches_core():
    from cxrcae.cli.commands import predict as cli_predict

    assert cli_predict.EXIT_SOME_FAILED == EXIT_SOME_FAILED == 3
