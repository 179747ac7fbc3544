"""Subgroup specs (columns, numeric bands, crossings) and per-subgroup metrics with flags for small groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrcae.data import Record, load_records, write_records
from cxrcae.data.records import record_columns
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.eval.subgroups import GroupBy, parse_specs, subgroup_labels, subgroup_metrics, subgroup_table

NAMES = ["COVID", "NORMAL"]


def _rec(i: int, **extra: str) -> Record:
    source = extra.pop("source", None)
    return Record(path=Path(f"/x/{i}.png"), label="COVID", patient_id=f"p{i}", source=source, extra=extra)


def _names(records, spec, derived=None) -> list[str]:
    return [name for _, name in subgroup_labels(records, GroupBy.parse(spec), derived)]


def test_specs_parse_columns_widths_cuts_and_crossings():
    assert GroupBy.parse(" source ").columns == ["source"]
    assert GroupBy.parse("age:10").terms[0].width == 10
    assert GroupBy.parse("age: 18, 65").terms[0].cuts == (18.0, 65.0)
    crossed = GroupBy.parse("source + age:10")
    assert crossed.spec == "source+age:10" and crossed.columns == ["source", "age"]
    assert [b.spec for b in parse_specs(["view", "view", "age:5"])] == ["view", "age:5"]
    for bad in ("", "source+", "age:", "age:ten", "age:0", "age:65,18", ":5"):
        with pytest.raises(CxrcaeError):
            GroupBy.parse(bad)


def test_labels_bands_missing_values_and_crossing():
    ages = ["4", "17", "18", "64", "65", "", "40"]
    views = ["PA", "AP", "PA", "", "AP", "PA", "PA"]
    records = [_rec(i, age=a, view=v, source="s") for i, (a, v) in enumerate(zip(ages, views, strict=True))]
    assert _names(records, "age:10") == ["0-9", "10-19", "10-19", "60-69", "60-69", "(none)", "40-49"]
    assert _names(records, "age:18,65") == ["<18", "<18", "18-64", "18-64", ">=65", "(none)", "18-64"]
    assert _names(records, "view")[3] == "(none)"
    assert _names(records, "view+age:18,65")[:2] == ["PA / <18", "AP / <18"]
    halves = [_rec(0, score="0.5"), _rec(1, score="1.25")]
    assert _names(halves, "score:1") == ["[0, 1)", "[1, 2)"]  # not integers: half-open intervals
    # bands sort by value, the missing group last
    labels = subgroup_labels(records, GroupBy.parse("age:10"))
    assert [name for _, name in sorted(set(labels))] == ["0-9", "10-19", "40-49", "60-69", "(none)"]


def test_unknown_column_and_non_numbers_are_one_line_errors():
    records = [_rec(0, view="PA", source="s"), _rec(1, view="AP", source="s")]
    with pytest.raises(DataError, match=r"'sex'.*columns with values: path, label, patient_id, source, view"):
        _names(records, "sex")
    with pytest.raises(DataError, match="'PA' is not a number"):
        _names(records, "view:10")
    # a derived column (computed by the caller) is a column like any other
    assert _names(records, "held", {"held": ["yes", None]}) == ["yes", "(none)"]


def test_extra_manifest_columns_are_kept_on_records(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,source,view,age\na.png,COVID,s1,PA,41\n", encoding="utf-8")
    (record,) = load_records(csv_path)
    assert record.value("view") == "PA" and record.value("age") == "41" and record.value("source") == "s1"
    assert record.value("sex") is None and record.value("patient_id") is None
    assert record_columns([record]) == ["path", "label", "source", "view", "age"]
    assert load_records(write_records([record], tmp_path / "back.csv")) == [record]


def test_subgroup_metrics_values_ci_and_flags():
    rng = np.random.default_rng(0)
    n_big, n_small = 40, 6
    y = np.r_[np.arange(n_big) % 2, [0, 0, 0, 0, 0, 1]]
    probs = np.full((y.size, 2), 0.2)
    probs[np.arange(y.size), y] = 0.8
    wrong = rng.choice(n_big, 8, replace=False)  # 8 errors in the big group, none in the small one
    probs[wrong] = probs[wrong][:, ::-1]
    names = ["big"] * n_big + ["small"] * n_small
    labels = [((0, n), n) for n in names]
    patients = [f"p{i // 2}" for i in range(y.size)]  # two images per patient
    out = subgroup_metrics(
        labels, y, probs, NAMES, by=GroupBy.parse("site"), groups=patients, n_resamples=200, seed=0
    )
    assert out["by"] == ["site"] and list(out["groups"]) == ["big", "small"]
    big, small = out["groups"]["big"], out["groups"]["small"]
    assert big["n"] == 40 and big["accuracy"] == pytest.approx(32 / 40)
    assert big["ci"]["unit"] == "patient" and big["ci"]["n_units"] == 20
    lo, hi = big["ci"]["accuracy"]
    assert lo < 0.8 < hi
    assert not big["small"] and big["flags"] == []
    assert small["small"] and small["flags"] == ["n=6 < 30", "NORMAL: 1 < 5"]
    assert small["accuracy"] == 1.0 and "bins" not in small["calibration"]

    only_covid = subgroup_metrics(
        [((0, "a"), "a")] * 3,
        np.zeros(3, int),
        np.tile([0.9, 0.1], (3, 1)),
        NAMES,
        by=GroupBy.parse("x"),
        n_resamples=0,
    )["groups"]["a"]
    assert np.isnan(only_covid["macro"]["auc"])  # one class present: no AUC
    columns, rows = subgroup_table(out, NAMES, "site")
    assert columns[0] == "site" and columns[-1] == "marked"
    assert rows[1][0] == "small" and rows[1][-1] == "n<30; <5: NORMAL" and rows[0][-1] == ""
    assert rows[0][columns.index("accuracy")].startswith("0.800 (")
