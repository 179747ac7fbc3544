"""Multi-label targets from a manifest (cxrcae.data.labels): both layouts, and each one-line error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cxrcae.data import load_records
from cxrcae.data.labels import LabelSource, check_train_labels, read_multilabels
from cxrcae.errors import DataError


def _manifest(folder: Path, columns: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["path", *columns])
        for i, row in enumerate(rows):
            (folder / f"{i}.png").write_bytes(b"")  # load_records checks existence only
            writer.writerow([f"{i}.png", *row])
    return folder / "m.csv"


def _read(path: Path, source: LabelSource):
    return read_multilabels(load_records(path, labeled=False), source, path)


def test_separated_names_column(tmp_path):
    path = _manifest(
        tmp_path,
        ["patient_id", "finding"],
        [["p1", "Pneumonia/Viral/COVID-19"], ["p2", "Pneumonia/Bacterial"], ["p3", ""], ["p4", " Normal "]],
    )
    ml = _read(path, LabelSource(column="finding", sep="/"))
    assert ml.names == ("Bacterial", "COVID-19", "Normal", "Pneumonia", "Viral")
    assert ml.unlabelled == 1 and [r.path.name for r in ml.records] == ["0.png", "1.png", "3.png"]
    np.testing.assert_array_equal(ml.targets, [[0, 1, 0, 1, 1], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    assert ml.strata() == ["COVID-19+Pneumonia+Viral", "Bacterial+Pneumonia", "Normal"]


def test_zero_one_columns_keep_the_given_order(tmp_path):
    path = _manifest(
        tmp_path, ["Mass", "Effusion"], [["1", "0"], ["0.0", "1.0"], ["0", ""], ["0", "0"]], "\t"
    )
    ml = _read(path, LabelSource(columns=("Mass", "Effusion")))
    assert ml.names == ("Mass", "Effusion") and ml.unlabelled == 1
    np.testing.assert_array_equal(ml.targets, [[1, 0], [0, 1], [0, 0]])
    assert ml.strata()[-1] == "(none)"


def test_nih_style_pipe_separator_is_the_default(tmp_path):
    path = _manifest(tmp_path, ["Finding Labels"], [["Effusion|Mass"], ["No Finding"]])
    ml = _read(path, LabelSource.from_options(None, "Finding Labels"))
    assert ml.names == ("Effusion", "Mass", "No Finding")


@pytest.mark.parametrize(
    ("columns", "rows", "source", "expected"),
    [
        (["finding"], [["A"]], LabelSource(column="findings"), "no column 'findings'"),
        (["A", "B"], [["1", "0"]], LabelSource(columns=("A", "C")), "no column 'C'"),
        (
            ["finding", "x"],
            [["", "1"], ["", "2"]],
            LabelSource(column="finding"),
            "'finding' is empty in every",
        ),
        (
            ["A", "B"],
            [["1", "0"], ["2", "1"]],
            LabelSource(columns=("A", "B")),
            "'A' must hold 0 or 1 .*; found '2' \\(1.png\\)",
        ),
        (["A", "B"], [["1", "-1"]], LabelSource(columns=("A", "B")), "'B' must hold 0 or 1 .*; found '-1'"),
    ],
)
def test_errors_name_file_and_column(tmp_path, columns, rows, source, expected):
    path = _manifest(tmp_path, columns, rows)
    with pytest.raises(DataError, match=expected) as err:
        _read(path, source)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_label_in_test_but_never_in_train():
    targets = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    check_train_labels(targets, ["A", "B"], ["train", "train", "train", "test"], "m.csv")  # fine
    with pytest.raises(DataError, match=r"'B' is in val \(1\) and test \(1\) but never in train") as err:
        check_train_labels(targets, ["A", "B"], ["train", "train", "val", "test"], "m.csv")
    assert str(err.value).startswith("m.csv: label")
    with pytest.raises(DataError, match="'B' has no positive image"):
        check_train_labels(np.array([[1, 0], [0, 0]]), ["A", "B"], ["train", "test"], "m.csv")


def test_source_options(tmp_path):
    assert LabelSource.from_options(None, None) is None
    assert LabelSource.from_options("A, B,", None).columns == ("A", "B")
    assert LabelSource.from_options(None, "finding", "/").sep == "/"
    with pytest.raises(DataError, match="not both"):
        LabelSource.from_options("A", "finding")
    with pytest.raises(DataError, match="--label-sep needs --labels"):
        LabelSource.from_options(None, None, "/")
    with pytest.raises(DataError, match="more than once"):
        LabelSource(columns=("A", "A"))
    folder = tmp_path / "classes"
    (folder / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="read from a manifest CSV"):
        read_multilabels([], LabelSource(column="finding"), folder)
