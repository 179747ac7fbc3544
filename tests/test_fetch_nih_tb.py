"""fetch for other tasks: NIH ChestX-ray14 (multi-label, 12 archives + label files) and the NLM tuberculosis
sets (Montgomery with its lung masks, Shenzhen), through the real download / extract / parse pipeline.

Every archive is made here from a few synthetic PNGs and fake label files, and served by the test's own
HTTP server on 127.0.0.1 (``test_fetch.Mirror``); nothing of the real datasets is used or needed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcae.data import load_records
from cxrcae.errors import DataError, DownloadError
from cxrcae.fetch import SOURCES, fetch_source
from cxrcae.fetch import cache as fetch_cache
from cxrcae.fetch.parsers import (
    NIH_VAL_EVERY,
    nih_label,
    nih_records,
    nih_split,
    nlm_tb_records,
    read_clinical_reading,
)
from test_fetch import Mirror

NIH = "nih-cxr14"


@pytest.fixture
def mirror():
    m = Mirror()
    yield m
    m.close()


def _png(value: int, size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _targz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- NIH ChestX-ray14 ---------------------------------------------------------------------------------

# image -> (Finding Labels, Patient ID, official list); one image per archive, two in the first
_NIH_ROWS = {
    "00000001_000.png": ("No Finding", "1", "train_val"),
    "00000001_001.png": ("Effusion|Pneumonia", "1", "train_val"),
    "00000002_000.png": ("Cardiomegaly|Effusion", "2", "test"),
    "00000003_000.png": ("Pneumonia", "3", "train_val"),
    "00000004_000.png": ("Hernia", "4", "train_val"),
    "00000005_000.png": ("No Finding", "5", "test"),
    "00000006_000.png": ("Atelectasis|Infiltration|Mass", "6", "train_val"),
    "00000007_000.png": ("No Finding", "7", "train_val"),
    "00000008_000.png": ("Pneumothorax", "8", "train_val"),
    "00000009_000.png": ("Nodule", "9", "test"),
    "00000010_000.png": ("No Finding", "10", "train_val"),
    "00000011_000.png": ("Edema|Consolidation", "11", "train_val"),
    "00000012_000.png": ("Emphysema|Fibrosis|Pleural_Thickening", "12", "test"),
}
_NIH_MISSING = "00000099_000.png"  # a CSV row whose image is in no archive


def _nih_csv(rows: dict[str, tuple[str, str, str]]) -> bytes:
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
    )
    lines = [
        f"{name},{finding},0,{pid},{40 + int(pid)},{'MF'[int(pid) % 2]},PA,12,10,0.143,0.143\n"
        for name, (finding, pid, _) in rows.items()
    ]
    return (header + "".join(lines)).encode()


def _nih_files(*, lists: bool = True, labels: bool = True) -> dict[str, bytes]:
    names = list(_NIH_ROWS)
    per_archive = [names[:2], *[[n] for n in names[2:]]]
    assert len(per_archive) == 12
    files = {
        f"images_{i:03d}.tar.gz": _targz({f"images/{n}": _png(17 * i) for n in group})
        for i, group in enumerate(per_archive, start=1)
    }
    if labels:
        files["Data_Entry_2017_v2020.csv"] = _nih_csv({**_NIH_ROWS, _NIH_MISSING: ("Mass", "99", "test")})
    if lists:
        for list_name, filename in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
            listed = [n for n, (_, _, where) in _NIH_ROWS.items() if where == list_name]
            files[filename] = "\n".join([*listed, *([_NIH_MISSING] if list_name == "test" else [])]).encode()
    return files


def _serve_nih(mirror: Mirror, monkeypatch, files: dict[str, bytes], *, pin_md5: bool = True) -> None:
    """Serve the fake files; ``pin_md5``: the registry's MD5s (NIH's real ones) become the fakes'."""
    for filename, data in files.items():
        mirror.serve(NIH, data, filename)
    if pin_md5:
        _pin_md5(monkeypatch, files)


def _pin_md5(monkeypatch, files: dict[str, bytes]) -> None:
    parts = tuple(
        replace(p, md5=hashlib.md5(files[p.filename]).hexdigest()) if p.md5 else p for p in SOURCES[NIH].parts
    )
    monkeypatch.setitem(SOURCES, NIH, replace(SOURCES[NIH], parts=parts))


def test_nih_through_mirror_multilabel_findings_patients_and_official_split(mirror, monkeypatch):
    _serve_nih(mirror, monkeypatch, _nih_files())
    result = fetch_source(NIH, mirror=mirror.url)
    assert len(mirror.log) == 15 and all(rng is None for _, rng in mirror.log)  # 12 archives, CSV, 2 lists
    assert result.downloaded and result.extracted
    assert result.excluded == {"image file missing": 1}
    by_name = {r.path.name: r for r in result.records}
    assert set(by_name) == set(_NIH_ROWS)
    for name, (finding, pid, where) in _NIH_ROWS.items():
        r = by_name[name]
        assert r.extra["finding"] == finding and r.patient_id == pid and r.source == NIH
        assert (r.split == "test") == (where == "test") and r.split in ("train", "val", "test")
    assert by_name["00000001_000.png"].label == "NORMAL"
    assert by_name["00000001_001.png"].label == "PNEUMONIA"  # Pneumonia among other findings
    assert by_name["00000003_000.png"].label == "PNEUMONIA"
    assert by_name["00000002_000.png"].label is None  # findings, none of them pneumonia: not the 3-class task
    # one patient, one split: patient 1's two images together
    assert by_name["00000001_000.png"].split == by_name["00000001_001.png"].split
    six = by_name["00000006_000.png"].extra
    assert (six["sex"], six["age"], six["view"]) == ("M", "46", "PA")
    assert result.counts()["NORMAL"] == 4 and result.counts()["PNEUMONIA"] == 2
    assert [f["filename"] for f in result.files][-3:] == [
        "Data_Entry_2017_v2020.csv",
        "train_val_list.txt",
        "test_list.txt",
    ]

    # the manifest: finding as published (split on '|' for multi-label), patient ids, split column
    with open(result.manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == [
        "path",
        "label",
        "patient_id",
        "source",
        "view",
        "license",
        "finding",
        "original_dataset",
    ]
    assert {"sex", "age", "split"} <= set(rows[0])
    findings = Counter(f for r in rows for f in r["finding"].split("|"))
    assert (
        findings["Effusion"] == 2 and findings["No Finding"] == 4 and len(findings) == 15
    )  # 14 + No Finding
    back = load_records(result.manifest, labeled=False)
    assert sorted(r.split for r in back) == sorted(r.split for r in result.records)

    # cached: the second fetch asks the server for nothing; the listing knows the exact size
    second = fetch_source(NIH, mirror=mirror.url)
    assert len(mirror.log) == 15 and not second.downloaded and not second.extracted
    assert [r.path for r in second.records] == [r.path for r in result.records]


def test_nih_val_is_one_patient_in_eight_of_train_val():
    got = Counter(nih_split(str(pid), "train_val") for pid in range(1, 30_806))
    assert set(got) == {"train", "val"}
    assert abs(got["val"] / 30_805 - 1 / NIH_VAL_EVERY) < 0.01
    assert nih_split("17", "test") == "test"
    assert len({nih_split("17", "train_val") for _ in range(3)}) == 1  # stable


@pytest.mark.parametrize(
    ("findings", "label"),
    [
        ("No Finding", "NORMAL"),
        ("Pneumonia", "PNEUMONIA"),
        ("Infiltration|Pneumonia", "PNEUMONIA"),
        ("Pneumothorax", None),
        ("Effusion|Infiltration", None),
        ("Hernia", None),
    ],
)
def test_nih_label_for_the_three_class_task(findings, label):
    assert nih_label(findings) == label


def test_nih_md5_from_the_publisher_is_checked(mirror, monkeypatch):
    _serve_nih(mirror, monkeypatch, _nih_files(), pin_md5=False)  # NIH's real MD5s: the fakes mismatch
    with pytest.raises(
        DownloadError, match=r"images_001\.tar\.gz: checksum mismatch \(expected md5 fe8ed0a6"
    ):
        fetch_source(NIH, mirror=mirror.url)
    downloads = fetch_cache.archive_path(NIH, "x").parent
    assert not any(downloads.iterdir())  # the bad file was deleted, nothing cached


def test_nih_resumes_at_the_file_it_stopped_in(mirror, monkeypatch):
    files = _nih_files()
    _serve_nih(mirror, monkeypatch, files)
    mirror.cut[f"/{NIH}/images_003.tar.gz"] = 40
    with pytest.raises(DownloadError, match="run the command again to resume"):
        fetch_source(NIH, mirror=mirror.url, retries=0)
    assert fetch_cache.archive_path(NIH, "images_002.tar.gz").is_file()
    listed = {s["name"]: s for s in _list()}
    assert listed[NIH]["cached"] == "partial (2 of 15 files, 0.0 MB of the next)"
    mirror.log.clear()
    result = fetch_source(NIH, mirror=mirror.url, retries=0)
    assert mirror.log[0] == (f"/{NIH}/images_003.tar.gz", "bytes=40-")  # 001 and 002 not asked again
    assert len(mirror.log) == 13 and len(result.records) == len(_NIH_ROWS)
    listed = {s["name"]: s for s in _list()}
    assert listed[NIH]["cached"] == "yes"
    assert listed[NIH]["size_exact"] and listed[NIH]["size"] == sum(len(b) for b in files.values())


def _list():
    from cxrcae.fetch import list_sources

    return list_sources()


def test_nih_without_split_lists_has_no_split(mirror, monkeypatch):
    _serve_nih(mirror, monkeypatch, _nih_files(lists=False))
    result = fetch_source(NIH, mirror=mirror.url)
    assert len(result.records) == len(_NIH_ROWS) and all(r.split is None for r in result.records)
    assert [f["absent"] for f in result.files][-2:] == [True, True]
    with open(result.manifest, newline="") as f:
        assert "split" not in next(csv.reader(f))
    requests = len(mirror.log)
    fetch_source(NIH, mirror=mirror.url)
    assert len(mirror.log) == requests  # the absence is remembered: no request (until --force)


def test_nih_from_a_local_copy_through_a_file_mirror(tmp_path, monkeypatch):
    """A user's own copy, laid out as <MIRROR>/<name>/<file>, is fetched with --mirror file://...; a missing
    optional list is absent, not an error retried."""
    files = _nih_files(lists=False)
    _pin_md5(monkeypatch, files)
    for filename, data in files.items():
        (tmp_path / "copy" / NIH).mkdir(parents=True, exist_ok=True)
        (tmp_path / "copy" / NIH / filename).write_bytes(data)
    result = fetch_source(NIH, mirror=(tmp_path / "copy").as_uri(), retries=0)
    assert len(result.records) == len(_NIH_ROWS) and all(r.split is None for r in result.records)
    assert [f["absent"] for f in result.files][-2:] == [True, True]


def test_nih_missing_label_csv_is_one_line_error(mirror, monkeypatch, cli, tmp_path):
    _serve_nih(mirror, monkeypatch, _nih_files(labels=False))
    with pytest.raises(DownloadError, match=r"Data_Entry_2017_v2020\.csv: HTTP 404"):
        fetch_source(NIH, mirror=mirror.url)
    out = cli("fetch", NIH, "--mirror", mirror.url, "--retries", "0")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "Data_Entry_2017_v2020.csv: HTTP 404" in " ".join(out.output.split())

    # the parser on its own, given a tree without the CSV
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00000001_000.png").write_bytes(_png(1))
    from cxrcae.fetch.parsers import parse_source

    with pytest.raises(DataError, match="no Data_Entry_2017 label CSV"):
        parse_source("nih-cxr14", tmp_path, source=NIH)


def test_nih_label_csv_that_is_a_web_page_or_lacks_columns(tmp_path):
    page = tmp_path / "Data_Entry_2017_v2020.csv"
    page.write_text("<!DOCTYPE html><html><body>Box: sign in</body></html>\n")
    with pytest.raises(DataError, match="a web page"):
        nih_records(page, tmp_path)
    page.write_text("Image Index,Patient ID\n00000001_000.png,1\n")
    with pytest.raises(DataError, match="lacks column.*finding labels"):
        nih_records(page, tmp_path)
    page.write_bytes(_nih_csv(_NIH_ROWS))
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    with pytest.raises(DataError, match=r"needs both lists; train_val_list\.txt is missing"):
        nih_records(page, tmp_path, test_list=tmp_path / "test_list.txt")


# --- NLM tuberculosis sets ----------------------------------------------------------------------------

_MONTGOMERY_READINGS = {
    "MCUCXR_0001_0": "Patient's Sex: M\nPatient's Age: 049Y\nnormal\n",
    "MCUCXR_0002_0": "Patient's Sex: F\nPatient's Age: 033Y\n\nnormal \n",
    "MCUCXR_0104_1": "Patient's Sex: F\nPatient's Age: 052Y\nright upper lobe cavitary infiltrate\n",
}


def _montgomery_zip(*, drop_image: str | None = None, drop_mask: str | None = None) -> bytes:
    top = "MontgomerySet"
    entries = {f"{top}/NLM-MontgomeryCXRSet-ReadMe.pdf": b"%PDF-1.4 cite Jaeger et al. 2014\n"}
    for i, (stem, reading) in enumerate(_MONTGOMERY_READINGS.items()):
        if stem != drop_image:
            entries[f"{top}/CXR_png/{stem}.png"] = _png(60 + i, (20, 16))
        entries[f"{top}/ClinicalReadings/{stem}.txt"] = reading.encode()
        for side in ("leftMask", "rightMask"):
            if stem != drop_mask:
                entries[f"{top}/ManualMask/{side}/{stem}.png"] = _png(255, (20, 16))
    entries[f"__MACOSX/{top}/CXR_png/._MCUCXR_0001_0.png"] = b"junk"
    return _zip(entries)


def _shenzhen_zip() -> bytes:
    top = "ChinaSet_AllFiles"
    readings = {
        "CHNCXR_0001_0": "male 45yrs\nnormal\n",
        "CHNCXR_0002_0": "female 32yrs\nnormal\n",
        "CHNCXR_0327_1": "male 35yrs\nSTB,ATB in left upper field\n",
        "CHNCXR_0328_1": "female 026yrs  bilateral PTB, right pleural thickening\n",
    }
    entries = {f"{top}/NLM-ChinaCXRSet-ReadMe.docx": b"cite Jaeger et al. 2014"}
    for i, (stem, reading) in enumerate(readings.items()):
        entries[f"{top}/CXR_png/{stem}.png"] = _png(80 + i)
        entries[f"{top}/ClinicalReadings/{stem}.txt"] = reading.encode()
    entries[f"{top}/CXR_png/Thumbs.db"] = b"windows thumbnails"
    return _zip(entries)


def test_montgomery_labels_patients_readings_and_lung_masks(mirror):
    mirror.serve("montgomery", _montgomery_zip())
    result = fetch_source("montgomery", mirror=mirror.url)
    by_stem = {r.path.stem: r for r in result.records}
    assert set(by_stem) == set(_MONTGOMERY_READINGS)
    assert {s: r.label for s, r in by_stem.items()} == {
        "MCUCXR_0001_0": "NORMAL",
        "MCUCXR_0002_0": "NORMAL",
        "MCUCXR_0104_1": "TB",
    }
    tb = by_stem["MCUCXR_0104_1"]
    assert tb.patient_id == "MCUCXR_0104" and tb.extra["view"] == "PA"
    assert tb.extra["finding"] == "right upper lobe cavitary infiltrate"
    assert (tb.extra["sex"], tb.extra["age"]) == ("F", "52")
    assert tb.extra["license"] == SOURCES["montgomery"].license
    left, right = Path(tb.extra["left_lung"]), Path(tb.extra["right_lung"])
    assert left.is_file() and left.parts[-3:] == ("ManualMask", "leftMask", "MCUCXR_0104_1.png")
    assert right.is_file() and right.parts[-2:] == ("rightMask", "MCUCXR_0104_1.png")
    assert result.counts()["TB"] == 1 and result.counts()["NORMAL"] == 2

    with open(result.manifest, newline="") as f:
        header = next(csv.reader(f))
    assert header[-4:] == ["sex", "age", "left_lung", "right_lung"]
    back = {r.path.stem: r for r in load_records(result.manifest)}
    assert Path(back["MCUCXR_0001_0"].extra["left_lung"]).is_file()  # the mask columns survive the CSV
    assert back["MCUCXR_0104_1"].label == "TB"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"drop_image": "MCUCXR_0002_0"}, r"leftMask/MCUCXR_0002_0\.png: lung mask without its image"),
        ({"drop_mask": "MCUCXR_0104_1"}, r"MCUCXR_0104_1\.png: no left lung mask in"),
    ],
    ids=["mask-without-image", "image-without-mask"],
)
def test_montgomery_broken_masks_are_one_line_errors(mirror, cli, broken, message):
    mirror.serve("montgomery", _montgomery_zip(**broken))
    with pytest.raises(DataError, match=message):
        fetch_source("montgomery", mirror=mirror.url)
    out = cli("fetch", "montgomery", "--mirror", mirror.url)
    assert out.exit_code == 1 and "Traceback" not in out.output
    error_lines = [line for line in out.output.splitlines() if "Error:" in line]
    assert len(error_lines) == 1


def test_shenzhen_labels_patients_and_readings(mirror):
    mirror.serve("shenzhen", _shenzhen_zip())
    result = fetch_source("shenzhen", mirror=mirror.url)
    by_stem = {r.path.stem: r for r in result.records}
    assert {s: (r.label, r.patient_id) for s, r in by_stem.items()} == {
        "CHNCXR_0001_0": ("NORMAL", "CHNCXR_0001"),
        "CHNCXR_0002_0": ("NORMAL", "CHNCXR_0002"),
        "CHNCXR_0327_1": ("TB", "CHNCXR_0327"),
        "CHNCXR_0328_1": ("TB", "CHNCXR_0328"),
    }
    r = by_stem["CHNCXR_0328_1"]
    assert (r.extra["sex"], r.extra["age"]) == ("F", "26")
    assert r.extra["finding"] == "bilateral PTB, right pleural thickening"
    assert "left_lung" not in r.extra


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Patient's Sex: M\nPatient's Age: 049Y\nnormal\n", ("M", "49", "normal")),
        (
            "Patient's Sex: F\r\nPatient's Age: 071Y\r\nleft\r\napical scarring\r\n",
            ("F", "71", "left apical scarring"),
        ),
        ("male 35yrs\nSTB,ATB in left upper field\n", ("M", "35", "STB,ATB in left upper field")),
        ("female 1yr\nnormal", ("F", "1", "normal")),
        ("", ("", "", "")),
    ],
)
def test_clinical_readings(tmp_path, text, expected):
    path = tmp_path / "r.txt"
    path.write_text(text, newline="")
    got = read_clinical_reading(path)
    assert (got["sex"], got["age"], got["finding"]) == expected
    assert read_clinical_reading(tmp_path / "absent.txt") == {"sex": "", "age": "", "finding": ""}


def test_nlm_tree_without_images_folder(tmp_path):
    (tmp_path / "MontgomerySet" / "ClinicalReadings").mkdir(parents=True)
    with pytest.raises(DataError, match="expected one CXR_png folder"):
        nlm_tb_records(tmp_path, source="montgomery", dataset="x", masks=True)


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_lists_and_merges_the_new_sources(cli, mirror, tmp_path):
    listed = cli("fetch", "--list")
    assert listed.exit_code == 0
    for name in (NIH, "montgomery", "shenzhen"):
        assert name in listed.stdout
    rows = {s["name"]: s for s in json.loads(cli("fetch", "--list", "--json").stdout)}
    assert rows[NIH]["images"] == 112_120 and len(rows[NIH]["files"]) == 15
    assert rows[NIH]["size"] > 40e9 and not rows[NIH]["size_exact"] and rows[NIH]["cached"] == "no"
    assert rows["montgomery"]["classes"] == ["NORMAL", "TB"]

    mirror.serve("montgomery", _montgomery_zip())
    mirror.serve("shenzhen", _shenzhen_zip())
    out = tmp_path / "tb.csv"
    result = cli("fetch", "montgomery", "shenzhen", "--mirror", mirror.url, "--merge", out)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "source" in line and "images" in line)
    assert "TB" in header.split() and header.split().index("TB") < header.split().index("UNLABELED")
    merged = load_records(out)
    assert Counter(r.label for r in merged) == {"NORMAL": 4, "TB": 3}
    assert sum(bool(r.extra.get("left_lung")) for r in merged) == 3  # Montgomery's rows only
