"""Checkpoints written by earlier versions keep loading, predicting and evaluating exactly as they did.

``tests/fixtures/checkpoints`` holds a small classifier written before evaluate and predict went through the
task registry (``classify/``), the same checkpoint without config.json's ``task`` (``classify-notask/``, as
every checkpoint written before tasks existed is), and what ``predict`` and ``evaluate`` answered with it
then; ``expected/bundled.json`` is what the bundled model answered on the shipped samples. Rebuilt by
``tests/fixtures/make_checkpoints.py``.
"""

from __future__ import annotations

import csv
import json
import math
import tarfile
from pathlib import Path

import pytest

from cxrcae.eval.evaluation import evaluate
from cxrcae.hub.resolve import load_encoder
from cxrcae.hub.transfer import prepare_upload
from cxrcae.infer.prediction import predict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HERE = FIXTURES / "checkpoints"
EXPECTED = HERE / "expected"
SPLITS = HERE / "splits.csv"
ORIGINALS = ["kermany_IM-0236-0001.png", "kermany_person311_virus_634.jpg"]
SAMPLES = Path(__file__).resolve().parents[1] / "src" / "cxrcae" / "samples"
TOL = 1e-6
VOLATILE = {"model", "data", "created"}
"""metrics.json keys that name where and when it ran, not what it measured."""
CPU = {"device": "cpu", "precision": "fp32", "num_workers": 0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compat")
    with tarfile.open(HERE / "classify.tar.xz") as tar:
        tar.extractall(root, filter="data")
    return root


def _close(got, want, where: str = "") -> None:
    """Equal, floats within ``TOL`` (NaN equal to NaN); dict keys and list lengths exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {set(got) ^ set(want)}"
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= TOL, f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _cells(row: dict[str, str], path_key: str) -> dict:
    """A CSV row with its path reduced to the file name and numbers read as floats."""
    out: dict = {}
    for key, value in row.items():
        if key == path_key:
            out[key] = Path(value).name
            continue
        if key == "top_k":  # class:p;class:p
            out[key] = [[n, float(p)] for n, p in (t.rsplit(":", 1) for t in value.split(";") if t)]
            continue
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _inputs() -> list[Path]:
    _, rows = _read_csv(SPLITS)
    tests = [HERE / r["path"] for r in rows if r["split"] == "test"]
    return [*tests, *(FIXTURES / "xrays" / "originals" / "images" / n for n in ORIGINALS)]


@pytest.mark.parametrize("name", ["classify", "classify-notask"])
def test_predict_csv_is_unchanged(cli, checkpoints, tmp_path, name):
    out = tmp_path / "predict.csv"
    args = ["--top-k", "2", "--device", "cpu", "--precision", "fp32", "--num-workers", "0", "-q"]
    result = cli("predict", *_inputs(), "-m", checkpoints / name, "-o", out, *args)
    assert result.exit_code == 0, result.output
    got_columns, got = _read_csv(out)
    want_columns, want = _read_csv(EXPECTED / "predict.csv")
    assert got_columns == want_columns
    assert len({r["top_class"] for r in want}) == 3  # the fixture is not a constant model
    _close([_cells(r, "path") for r in got], [_cells(r, "path") for r in want])


@pytest.mark.parametrize("name", ["classify", "classify-notask"])
def test_evaluate_outputs_are_unchanged(checkpoints, tmp_path, name):
    result = evaluate(checkpoints / name, SPLITS, "test", out_dir=tmp_path, n_bootstrap=200, **CPU)
    want = json.loads((EXPECTED / "metrics.json").read_text())
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got == result.metrics
    _close(
        {k: v for k, v in got.items() if k not in VOLATILE},
        {k: v for k, v in want.items() if k not in VOLATILE},
    )
    got_columns, got_rows = _read_csv(tmp_path / "predictions.csv")
    want_columns, want_rows = _read_csv(EXPECTED / "predictions.csv")
    assert got_columns == want_columns
    _close([_cells(r, "path") for r in got_rows], [_cells(r, "path") for r in want_rows])


def test_bundled_model_answers_as_before():
    rows = [p.to_dict() for p in predict([SAMPLES], **CPU)]
    for row in rows:
        row["path"] = Path(row["path"]).name
        row["top_k"] = [list(t) for t in row["top_k"]]
    want = json.loads((EXPECTED / "bundled.json").read_text())
    assert sum(r["status"] == "ok" for r in want) == 6
    _close(rows, want)


def test_encoder_taken_out_of_todays_checkpoint_loads(checkpoints, tmp_path):
    """``push --encoder-only`` stages an encoder config without the task its classifier had."""
    config = prepare_upload(checkpoints / "classify", tmp_path, encoder_only=True)
    assert config["kind"] == "encoder" and "task" not in config
    assert config["extracted_from"]["task"] == "classify"
    encoder = load_encoder(tmp_path)
    assert encoder.cxrcae_config["kind"] == "encoder"
