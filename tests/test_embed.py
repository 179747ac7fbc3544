"""cxrcae embed: streamed features equal load_encoder's, bad files become index rows, exit code 3."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import load_encoder
from cxrcae.infer.embed import embed
from cxrcae.models import CAEEncoder
from cxrcae.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = {"kind": "encoder", "image_size": 32, "resize_mode": "pad"}
    return save_checkpoint(CAEEncoder(), tmp_path_factory.mktemp("enc") / "enc", config)


@pytest.fixture
def images(tiny_labelled_folder, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    real = sorted(tiny_labelled_folder.rglob("*.jpg"))[:4]
    for i, src in enumerate(real):
        shutil.copy(src, folder / f"{i}_{src.name}")
    (folder / "2b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorts between the real ones
    (folder / "notes.txt").write_text("not an image")
    return folder


def _index(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_embed_npy_matches_load_encoder_and_reports_bad_file(encoder_dir, images, tmp_path, cli):
    out = tmp_path / "feats.npy"
    res = cli(
        "embed", images, "--model", encoder_dir, "--output", out, "--batch-size", "2", "--num-workers", "0"
    )
    assert res.exit_code == 3, res.output
    assert "2b_broken.png" in res.output
    feats = np.load(out)
    rows = _index(tmp_path / "feats.index.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert feats.shape == (4, 512) and len(ok) == 4
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["path"].endswith("2b_broken.png") and bad[0]["reason"]
    assert [r["status"] for r in rows if r["status"] == "skipped"] == ["skipped"]  # notes.txt
    assert [int(r["index"]) for r in rows if r["index"]] == list(range(5))  # input order kept
    encoder = load_encoder(encoder_dir, pooled=True)
    with torch.no_grad():
        for r in ok:
            expected = encoder(encoder.preprocess(r["path"])[None])[0].numpy()
            np.testing.assert_allclose(feats[int(r["row"])], expected, rtol=1e-5, atol=1e-6)


def test_embed_safetensors_unpooled_and_parquet(encoder_dir, images, tmp_path):
    result = embed(
        [images], encoder_dir, tmp_path / "maps.safetensors", pooled=False, batch_size=3, device="cpu"
    )
    tensors = load_file(str(tmp_path / "maps.safetensors"))
    assert tensors["features"].shape == (4, 512, 1, 1) and result.feature_shape == (512, 1, 1)
    assert tensors["input_index"].tolist() == [0, 1, 2, 4]  # row -> input position (3 is the broken file)
    assert len(result.failures) == 1 and result.failures[0][0] == 3

    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(CxrcaeError, match="pip install pyarrow"):
            embed([images], encoder_dir, tmp_path / "f.parquet")
    else:
        embed([images], encoder_dir, tmp_path / "f.parquet", device="cpu")
        table = pq.read_table(tmp_path / "f.parquet")
        assert table.num_rows == 4 and len(table.column("features")[0]) == 512
    with pytest.raises(CxrcaeError, match="unsupported output"):
        embed([images], encoder_dir, tmp_path / "f.csv")
