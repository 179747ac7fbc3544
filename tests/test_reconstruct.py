"""reconstruct: grids and the per-image error CSV from a tiny autoencoder; bad files are error rows."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcae.infer.reconstruct import reconstruct, triptych
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import build_model

SIZE = 32


@pytest.fixture(scope="module")
def cae(tmp_path_factory):
    torch.manual_seed(0)
    config = {"kind": "autoencoder", "image_size": SIZE, "resize_mode": "stretch"}
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("cae") / "cae", config)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / "in" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    return tmp_path / "in", paths


def test_reconstruct_writes_grids_and_csv(cae, images, tmp_path):
    folder, paths = images
    out = tmp_path / "out"
    result = reconstruct(cae, [folder], out, batch_size=2)
    assert len(result.rows) == 4 and result.n_errors == 1
    assert result.overview == out / "reconstructions.png"
    overview = np.asarray(Image.open(result.overview).convert("L"))
    assert min(overview.shape) > 100 and overview.std() > 10  # a drawn figure, not an empty canvas
    for row in result.rows:
        if row.status == "ok":
            grid = np.asarray(Image.open(row.image))
            assert grid.shape == (SIZE, 3 * SIZE + 4, 3)  # input | recon | error, 2-px separators
            assert row.mse > 0 and row.psnr == pytest.approx(10 * np.log10(1 / row.mse))
        else:
            assert row.path.endswith("broken.png") and row.reason
    with open(result.csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == [r.path for r in result.rows]
    assert float(table[-1]["mse"]) == pytest.approx(result.rows[-1].mse)


def test_mse_matches_the_model(cae, images, tmp_path):
    from cxrcae.hub.resolve import load_checkpoint
    from cxrcae.io import load_for_model

    _, paths = images
    result = reconstruct(cae, [paths[0]], tmp_path / "out")
    net, _ = load_checkpoint(cae)
    x = torch.from_numpy(load_for_model(paths[0], SIZE, "stretch"))[None]
    with torch.no_grad():
        mse = float(((net(x) - x) ** 2).mean())
    assert result.rows[0].mse == pytest.approx(mse, rel=1e-4)


def test_triptych_error_panel_scale():
    img = np.zeros((4, 4), np.float32)
    strip = triptych(img, img + 0.25, error_max=0.25)
    err = strip[:, -4:]
    assert (err == err[0, 0]).all() and err[0, 0].tolist() != [0, 0, 0]  # full-scale colour
    same = triptych(img, img, error_max=0.25)
    assert (same[:, -4:] == triptych(img, img, 1.0)[:, -4:]).all()


def test_cli_reconstruct(cli, cae, images, tmp_path):
    folder, _ = images
    result = cli("reconstruct", cae, folder, "--out", tmp_path / "o", "--num-workers", "0")
    assert result.exit_code == 3, result.output
    assert "img0.png" in result.output and "mean MSE" in result.output
    with open(tmp_path / "o" / "reconstruction.csv", newline="") as f:
        table = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert sorted(table) == ["broken.png", "img0.png", "img1.png", "img2.png"]
    assert table["broken.png"]["status"] == "error" and table["broken.png"]["reason"]
    assert all(float(table[f"img{i}.png"]["mse"]) > 0 for i in range(3))

    clf_config = {"kind": "classifier", "head": "dense5", "image_size": SIZE, "class_names": ["A", "B"]}
    clf = save_checkpoint(build_model(clf_config), tmp_path / "clf", clf_config)
    refused = cli("reconstruct", clf, folder, "--out", tmp_path / "o2")
    assert refused.exit_code == 1 and "autoencoder" in refused.output
