"""Turn each source's own metadata (or folder layout) into manifest records with one label vocabulary.

Labels: COVID, NORMAL, PNEUMONIA (non-COVID pneumonia) and UNLABELED (``Record.label is None``: no finding
recorded, "todo", inconclusive, or a finding that is neither, such as ARDS without pneumonia or lung
opacity). CT slices and lateral views are excluded unless asked for, and every exclusion is counted so the
user sees what was dropped and why. Metadata CSVs are read by column name (upstream files gain columns,
e.g. ieee8023's ``RT_PCR_positive``) and in UTF-8 or, failing that, Windows-1252 (Figure1's file).

Each record's ``extra`` holds, in this order: ``view``, ``license``, ``finding`` (the original text) and
``original_dataset``; a manifest written from them has the columns
``path,label,patient_id,source,view,license,finding,original_dataset``. Sources for other tasks add columns
after these: ``sex`` and ``age`` (NIH, Montgomery, Shenzhen), the lung mask paths ``left_lung`` and
``right_lung`` (Montgomery), and ``split`` (NIH's official patient-level split).

NIH ChestX-ray14's ``finding`` is its ``Finding Labels`` as published (``Effusion|Infiltration``,
``No Finding``): read it as multi-label with ``--labels finding --label-sep '|'``. Its single ``label`` keeps
the COVID task's vocabulary: ``No Finding`` is NORMAL, any finding list with ``Pneumonia`` is PNEUMONIA, and
every other image (other findings only) is unlabeled. Montgomery and Shenzhen are labelled TB or NORMAL
from the ``_1`` / ``_0`` at the end of each file name, as their publisher defines it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cxrcae.data import Record
from cxrcae.errors import DataError
from cxrcae.io import find_images

COVID, NORMAL, PNEUMONIA, TB = "COVID", "NORMAL", "PNEUMONIA", "TB"
RESEARCH_ONLY = "research use only (README)"

_UNLABELED_FINDINGS = {"", "todo", "unknown", "inconclusive"}
_PNEUMONIA_TERMS = (
    "pneumonia",
    "pneumonitis",
    "pneumocystis",
    "sars",
    "mers",
    "streptococcus",
    "staphylococcus",
    "klebsiella",
    "mycoplasma",
    "legionella",
    "chlamydophila",
    "chlamydia",
    "e.coli",
    "e. coli",
    "influenza",
    "varicella",
    "herpes",
    "lipoid",
    "aspiration",
    "bacteria",
    "viral",
    "virus",
    "fungal",
    "nocardia",
    "aspergillosis",
    "histoplasmosis",
    "moraxella",
    "h1n1",
)
_CT_VIEWS = {"ct", "axial", "coronal", "sagittal"}
_LATERAL_VIEWS = {"l", "lateral", "ll", "rl", "lat"}


@dataclass
class Parsed:
    """Records kept, plus how many rows were left out and why (``{"CT": 84, "lateral view": 57}``)."""

    records: list[Record]
    excluded: Counter = field(default_factory=Counter)


def finding_to_label(finding: str) -> str | None:
    """COVID / NORMAL / PNEUMONIA, or None (unlabeled), from a free-text finding.

    Any mention of COVID wins ("Pneumonia/Viral/COVID-19", "COVID-19, ARDS"); "No Finding" is NORMAL (it
    means no radiographic finding, not a healthy patient); pneumonias by pathogen or kind are PNEUMONIA; an
    empty, "todo" or unknown finding and findings that are not pneumonia (ARDS, tuberculosis) are unlabeled.
    """
    text = finding.strip().lower()
    if "covid" in text:
        return COVID
    if text in ("no finding", "normal", "no findings"):
        return NORMAL
    if text in _UNLABELED_FINDINGS:
        return None
    if any(term in text for term in _PNEUMONIA_TERMS):
        return PNEUMONIA
    return None


def is_lateral(view: str) -> bool:
    return view.strip().lower() in _LATERAL_VIEWS


def is_ct(modality: str, view: str = "") -> bool:
    """CT by modality, or by view where the (older) metadata has no modality column."""
    return modality.strip().lower() == "ct" or view.strip().lower() in _CT_VIEWS


def read_metadata(path: Path) -> list[dict[str, str]]:
    """Rows of a metadata CSV with stripped, lower-cased column names; UTF-8 or Windows-1252."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty metadata file")
    reader.fieldnames = [(c or "").strip().lower() for c in reader.fieldnames]
    return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _require(rows: list[dict[str, str]], path: Path, *columns: str) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if rows and missing:
        raise DataError(f"{path}: metadata lacks column(s) {', '.join(missing)}")


def _record(
    path: Path,
    label: str | None,
    patient: str,
    source: str,
    view: str,
    license_: str,
    finding: str,
    dataset: str,
    **more: str,
) -> Record:
    extra = {"view": view, "license": license_, "finding": finding, "original_dataset": dataset, **more}
    return Record(
        path=Path(os.path.abspath(path)), label=label, patient_id=patient or None, source=source, extra=extra
    )


def _keep(view: str, modality: str, include_ct: bool, include_lateral: bool) -> str | None:
    """None to keep the row, else the reason it is excluded."""
    if not include_ct and is_ct(modality, view):
        return "CT"
    if not include_lateral and is_lateral(view):
        return "lateral view"
    return None


def ieee8023_records(
    metadata_csv: Path,
    repo_root: Path,
    *,
    source: str = "ieee8023",
    include_ct: bool = False,
    include_lateral: bool = False,
) -> Parsed:
    """ieee8023/covid-chestxray-dataset ``metadata.csv``: images at ``<repo_root>/<folder>/<filename>``."""
    rows = read_metadata(metadata_csv)
    _require(rows, metadata_csv, "patientid", "finding", "view", "filename")
    parsed = Parsed([])
    seen: set[Path] = set()
    for row in rows:
        view, modality = row.get("view", ""), row.get("modality", "")
        reason = _keep(view, modality, include_ct, include_lateral)
        if reason is None and not include_ct and row.get("folder") == "volumes":
            reason = "CT"
        if reason:
            parsed.excluded[reason] += 1
            continue
        path = Path(repo_root) / (row.get("folder") or "images") / row["filename"]
        if path in seen:
            parsed.excluded["duplicate metadata row"] += 1
            continue
        seen.add(path)
        finding = row["finding"]
        parsed.records.append(
            _record(
                path,
                finding_to_label(finding),
                row["patientid"],
                source,
                view,
                row.get("license", ""),
                finding,
                "ieee8023 covid-chestxray-dataset",
            )
        )
    return parsed


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def figure1_records(
    metadata_csv: Path,
    images_dir: Path,
    *,
    source: str = "figure1",
    include_ct: bool = False,
    include_lateral: bool = False,
) -> Parsed:
    """Figure1-COVID-chestxray-dataset: one row per image, file ``images/<patientid>.(jpg|png)``.

    Images of one patient carry a letter suffix (``COVID-00003a``, ``COVID-00003b``); the patient id drops
    it, so a patient-level split keeps them together.
    """
    rows = read_metadata(metadata_csv)
    _require(rows, metadata_csv, "patientid", "finding")
    images = _images_by_stem(Path(images_dir))
    parsed = Parsed([])
    for row in rows:
        image_id = row["patientid"]
        if not image_id:
            parsed.excluded["no image id"] += 1
            continue
        view = row.get("view", "")
        reason = _keep(view, row.get("modality", ""), include_ct, include_lateral)
        if reason:
            parsed.excluded[reason] += 1
            continue
        path = images.get(image_id, Path(images_dir) / f"{image_id}.jpg")
        patient = re.sub(r"(?<=\d)[a-z]$", "", image_id)
        finding = row["finding"]
        parsed.records.append(
            _record(path, finding_to_label(finding), patient, source, view, RESEARCH_ONLY, finding, "Figure1")
        )
    return parsed


def actualmed_records(
    metadata_csv: Path,
    images_dir: Path,
    *,
    source: str = "actualmed",
    include_ct: bool = False,
    include_lateral: bool = False,
) -> Parsed:
    """Actualmed-COVID-chestxray-dataset: ``imagename`` names the file; an empty finding is inconclusive."""
    rows = read_metadata(metadata_csv)
    _require(rows, metadata_csv, "patientid", "finding", "imagename")
    parsed = Parsed([])
    for row in rows:
        view = row.get("view", "")
        reason = _keep(view, row.get("modality", ""), include_ct, include_lateral)
        if reason:
            parsed.excluded[reason] += 1
            continue
        finding = row["finding"]
        parsed.records.append(
            _record(
                Path(images_dir) / row["imagename"],
                finding_to_label(finding),
                row["patientid"],
                source,
                view,
                RESEARCH_ONLY,
                finding,
                "Actualmed",
            )
        )
    return parsed


# Folder names (lower-cased, "_"/"-" as spaces) that name a class in folder-organised datasets.
FOLDER_LABELS: dict[str, str | None] = {
    "covid": COVID,
    "covid 19": COVID,
    "covid19": COVID,
    "covid positive": COVID,
    "normal": NORMAL,
    "no finding": NORMAL,
    "pneumonia": PNEUMONIA,
    "viral pneumonia": PNEUMONIA,
    "bacterial pneumonia": PNEUMONIA,
    "non covid pneumonia": PNEUMONIA,
    "lung opacity": None,
    "unlabeled": None,
    "unlabelled": None,
}
_SKIP_DIRS = {"masks", "mask", "__macosx"}
_SPLIT_DIRS = {"train", "training", "test", "testing", "val", "valid", "validation"}


def _folder_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def folder_records(
    root: Path,
    *,
    source: str,
    dataset: str = "",
    license_: str = "",
    patient_from_name: Callable[[str], str] | None = None,
) -> Parsed:
    """Any tree whose folder names carry the class (``COVID/``, ``Viral Pneumonia/``, ``train/NORMAL/``).

    The class is the nearest enclosing folder with a known name (``FOLDER_LABELS``); images under none are
    UNLABELED. ``masks/`` folders are skipped; a ``train``/``test``/``val`` folder is kept as
    ``original_split``. The same split/class/file found twice (archives that nest a copy of themselves) is
    counted once.
    """

    root = Path(root)
    files, _ = find_images([root], recursive=True)
    parsed = Parsed([])
    kept: dict[tuple[str, ...], Record] = {}
    for path in sorted(files, key=lambda p: (len(p.parts), p)):  # the least nested copy wins
        rel_folders = path.relative_to(root).parts[:-1]
        folders = [_folder_key(p) for p in rel_folders]
        if any(f in _SKIP_DIRS for f in folders):
            parsed.excluded["mask or resource fork"] += 1
            continue
        label, finding, split = None, "", ""
        for folder, original in zip(reversed(folders), reversed(rel_folders), strict=True):
            if folder in FOLDER_LABELS and not finding:
                label, finding = FOLDER_LABELS[folder], original
            if folder in _SPLIT_DIRS and not split:
                split = folder
        key = (split, finding.lower(), path.name)
        if key in kept:
            parsed.excluded["nested duplicate copy"] += 1
            continue
        patient = patient_from_name(path.name) if patient_from_name else ""
        dataset_name = dataset or source
        kept[key] = _record(
            path, label, patient, source, "", license_, finding, dataset_name, original_split=split
        )
    parsed.records = sorted(kept.values(), key=lambda r: r.path)
    return parsed


_KERMANY_PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d*-)?IM-\d+)", re.IGNORECASE)


def kermany_patient(filename: str) -> str:
    """``person1_bacteria_1.jpeg`` -> ``person1``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``; anything else -> "" (unknown)."""
    match = _KERMANY_PATIENT.match(filename)
    return match.group(1) if match else ""


# --- NIH ChestX-ray14 ------------------------------------------------------------------------------------

NIH_DATASET = "NIH ChestX-ray14"
NIH_FINDING_SEP = "|"
NIH_VAL_EVERY = 8
"""One train_val patient in this many goes to ``val`` (chosen by a hash of the patient id: stable)."""
_NIH_LABELS_GLOB = "Data_Entry_2017*.csv"


def nih_label(findings: str) -> str | None:
    """The COVID task's label of an NIH ``Finding Labels`` value: NORMAL, PNEUMONIA or None (unlabeled)."""
    names = {f.strip().lower() for f in findings.split(NIH_FINDING_SEP)}
    if "pneumonia" in names:
        return PNEUMONIA
    if names == {"no finding"}:
        return NORMAL
    return None


def nih_split(patient: str, list_name: str) -> str:
    """``test`` for test_list.txt; for train_val_list.txt ``val`` for one patient in ``NIH_VAL_EVERY``
    (by the sha256 of the patient id), else ``train``. The same patient always lands in the same split."""
    if list_name == "test":
        return "test"
    digest = int(hashlib.sha256(patient.encode("utf-8")).hexdigest()[:8], 16)
    return "val" if digest % NIH_VAL_EVERY == 0 else "train"


def _not_html(path: Path, what: str) -> None:
    """Box answers a refused download with a web page; say so instead of failing on its columns."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith(b"<"):
        raise DataError(
            f"{path}: a web page (HTML), not {what}; the server refused the download. Fetch the file from "
            "the NIH page, serve it with --mirror and run again with --force"
        )


def _read_list(path: Path) -> set[str]:
    _not_html(path, "a list of image names")
    return {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}


def nih_records(
    labels_csv: Path,
    images_root: Path,
    *,
    train_val_list: Path | None = None,
    test_list: Path | None = None,
    source: str = "nih-cxr14",
    license_: str = "",
) -> Parsed:
    """``Data_Entry_2017[_v2020].csv``: one row per image, found by name anywhere under ``images_root``.

    With both split lists, images in neither are left out (counted); with one list only it is an error.
    """
    _not_html(labels_csv, "the Data_Entry_2017 label CSV")
    rows = read_metadata(labels_csv)
    if not rows:
        raise DataError(f"{labels_csv}: no rows in the label CSV")
    _require(rows, labels_csv, "image index", "finding labels", "patient id")
    if (train_val_list is None) != (test_list is None):
        have, lacking = (
            (train_val_list, "test_list.txt") if test_list is None else (test_list, "train_val_list.txt")
        )
        raise DataError(f"{have}: the official split needs both lists; {lacking} is missing")
    splits: dict[str, str] = {}
    if train_val_list is not None and test_list is not None:
        train_val, test = _read_list(train_val_list), _read_list(test_list)
        splits = dict.fromkeys(train_val, "train_val") | dict.fromkeys(test, "test")
        splits |= dict.fromkeys(train_val & test, "both")
    images = {p.name: p for p in _pngs(Path(images_root))}
    parsed = Parsed([])
    for row in rows:
        name = row["image index"]
        listed = splits.get(name, "")
        if splits and listed in ("", "both"):
            parsed.excluded["in neither split list" if not listed else "in both split lists"] += 1
            continue
        patient = row["patient id"]
        finding = row["finding labels"]
        record = _record(
            images.get(name, Path(images_root) / "images" / name),
            nih_label(finding),
            patient,
            source,
            row.get("view position", ""),
            license_,
            finding,
            NIH_DATASET,
            sex=row.get("patient sex") or row.get("patient gender", ""),
            age=_age(row.get("patient age", "")),
        )
        if listed:
            record = replace(record, split=nih_split(patient, listed))
        parsed.records.append(record)
    return parsed


def _age(text: str) -> str:
    """Age in years as a plain number: ``058Y`` (the 2017 CSV, Montgomery) and ``58`` -> ``58``."""
    match = re.match(r"\s*0*(\d+)", text)
    return match.group(1) if match else text.strip()


def _pngs(root: Path) -> list[Path]:
    """Every PNG under ``root`` (macOS ``._`` forks skipped), sorted."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        found += [
            Path(dirpath) / n for n in filenames if n.lower().endswith(".png") and not n.startswith(".")
        ]
    return sorted(found)


# --- NLM tuberculosis sets (Montgomery County, Shenzhen) -----------------------------------------------

_NLM_TB_NAME = re.compile(r"^(?P<patient>[A-Za-z]+_\d+)_(?P<tb>[01])$")
_NLM_MASKS = {"left_lung": "leftMask", "right_lung": "rightMask"}
_MONTGOMERY_DEMOGRAPHY = re.compile(r"^patient'?s\s+(sex|age)\s*:\s*(.*)$", re.IGNORECASE)
_SHENZHEN_DEMOGRAPHY = re.compile(
    r"^(male|female)\s*,?\s*(\d+)\s*(?:yrs?|y|years?)?\b\s*(.*)$", re.IGNORECASE
)


def read_clinical_reading(path: Path) -> dict[str, str]:
    """``sex``, ``age`` and the reading (``finding``) from a ClinicalReadings text file.

    Montgomery: ``Patient's Sex: M`` / ``Patient's Age: 049Y`` lines, then the reading; Shenzhen: a first
    line ``male 35yrs`` (the reading may follow on it), then the reading. Missing file: all empty.
    """
    out = {"sex": "", "age": "", "finding": ""}
    if not path.is_file():
        return out
    text = path.read_bytes().decode("utf-8", errors="replace")
    reading = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line:
            continue
        if match := _MONTGOMERY_DEMOGRAPHY.match(line):
            key, value = match.group(1).lower(), match.group(2).strip()
            out[key] = value.upper() if key == "sex" else _age(value)
        elif not reading and not out["sex"] and (match := _SHENZHEN_DEMOGRAPHY.match(line)):
            out["sex"] = "M" if match.group(1).lower() == "male" else "F"
            out["age"] = _age(match.group(2))
            if match.group(3):
                reading.append(match.group(3).strip())
        else:
            reading.append(line)
    out["finding"] = " ".join(reading)
    return out


def nlm_tb_records(
    root: Path, *, source: str, dataset: str, license_: str = "", masks: bool = False
) -> Parsed:
    """A tree with ``CXR_png/<ID>_<0|1>.png`` (1 = tuberculosis) and ``ClinicalReadings/<ID>_<0|1>.txt``.

    With ``masks``: ``ManualMask/leftMask`` and ``ManualMask/rightMask`` hold one mask per image, same name;
    their paths go into the ``left_lung`` / ``right_lung`` columns. A mask without its image, or an image
    without a mask, is an error naming the file (a changed or broken archive).
    """
    folders = sorted(p for p in Path(root).rglob("CXR_png") if p.is_dir() and "__MACOSX" not in p.parts)
    if len(folders) != 1:
        found = ", ".join(str(f) for f in folders) or "none"
        raise DataError(
            f"{root}: expected one CXR_png folder of images, found {found} (is this the archive?)"
        )
    top = folders[0].parent
    images = {p.stem: p for p in _pngs(folders[0])}
    mask_files: dict[str, dict[str, Path]] = {}
    if masks:
        for column, folder in _NLM_MASKS.items():
            where = top / "ManualMask" / folder
            if not where.is_dir():
                raise DataError(f"{top}: no ManualMask/{folder} folder of lung masks (is this the archive?)")
            mask_files[column] = {p.stem: p for p in _pngs(where)}
            orphan = sorted(set(mask_files[column]) - set(images))
            if orphan:
                stem = orphan[0]
                raise DataError(
                    f"{mask_files[column][stem]}: lung mask without its image "
                    f"({folders[0] / (stem + '.png')} is missing; {len(orphan)} such mask(s))"
                )
            unmasked = sorted(set(images) - set(mask_files[column]))
            if unmasked:
                raise DataError(
                    f"{images[unmasked[0]]}: no {column.replace('_', ' ')} mask in {where} "
                    f"({len(unmasked)} image(s) without one)"
                )
    parsed = Parsed([])
    for stem, path in images.items():
        match = _NLM_TB_NAME.match(stem)
        label = (TB if match.group("tb") == "1" else NORMAL) if match else None
        reading = read_clinical_reading(top / "ClinicalReadings" / f"{stem}.txt")
        extra = {column: os.path.abspath(files[stem]) for column, files in mask_files.items()}
        parsed.records.append(
            _record(
                path,
                label,
                match.group("patient") if match else "",
                source,
                "PA",
                license_,
                reading["finding"],
                dataset,
                sex=reading["sex"],
                age=reading["age"],
                **extra,
            )
        )
    return parsed


def _find(root: Path, filename: str) -> Path:
    """``filename`` at the root or one folder down (GitHub archives unpack into ``<repo>-<commit>/``)."""
    for candidate in [Path(root) / filename, *sorted(Path(root).glob(f"*/{filename}"))]:
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: no {filename} found (is this the right archive?)")


def _find_glob(root: Path, pattern: str, what: str) -> Path:
    """The one file matching ``pattern`` at the root or one folder down (the newest name if several)."""
    found = sorted([*Path(root).glob(pattern), *Path(root).glob(f"*/{pattern}")])
    found = [p for p in found if p.is_file()]
    if not found:
        raise DataError(f"{root}: no {what} ({pattern}) found")
    return found[-1]


def _find_optional(root: Path, filename: str) -> Path | None:
    try:
        return _find(root, filename)
    except DataError:
        return None


def parse_source(
    parser: str,
    root: Path,
    *,
    source: str,
    license_: str = "",
    include_ct: bool = False,
    include_lateral: bool = False,
) -> Parsed:
    """Run the registry's named parser on an extracted download at ``root``."""
    opts = {"source": source, "include_ct": include_ct, "include_lateral": include_lateral}
    if parser == "ieee8023":
        meta = _find(root, "metadata.csv")
        return ieee8023_records(meta, meta.parent, **opts)
    if parser in ("figure1", "actualmed"):
        meta = _find(root, "metadata.csv")
        parse = figure1_records if parser == "figure1" else actualmed_records
        return parse(meta, meta.parent / "images", **opts)
    if parser == "radiography-db":
        return folder_records(root, source=source, dataset="COVID-19 Radiography Database", license_=license_)
    if parser == "kermany":
        return folder_records(
            root,
            source=source,
            dataset="Kermany chest-xray-pneumonia",
            license_=license_,
            patient_from_name=kermany_patient,
        )
    if parser == "folders":
        return folder_records(root, source=source, license_=license_)
    if parser == "nih-cxr14":
        return nih_records(
            _find_glob(root, _NIH_LABELS_GLOB, "Data_Entry_2017 label CSV"),
            root,
            train_val_list=_find_optional(root, "train_val_list.txt"),
            test_list=_find_optional(root, "test_list.txt"),
            source=source,
            license_=license_,
        )
    if parser in ("montgomery", "shenzhen"):
        dataset = "NLM Montgomery County CXR" if parser == "montgomery" else "NLM Shenzhen CXR"
        return nlm_tb_records(
            root, source=source, dataset=dataset, license_=license_, masks=parser == "montgomery"
        )
    raise DataError(f"unknown parser {parser!r}")
