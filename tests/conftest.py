"""Shared fixtures: an isolated home for caches, the real shared X-rays, and a CLI runner."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXRCAE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches or reaches a real Hub."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("CXRCAE_HOME", str(home / "cxrcae"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("CXRCAE_MIRROR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: keep rows on one line for assertions
    yield home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real chest X-rays); a user's clone has none, so the test skips with the reason."""
    if not (SHARED_DATA / "cxr" / "manifest.csv").is_file():
        pytest.skip(f"shared X-ray data not found at {SHARED_DATA} (set CXRCAE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_manifest_rows(shared_data) -> list[dict]:
    with open(shared_data / "cxr" / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def tiny_labelled_folder(tmp_path_factory, shared_data, shared_manifest_rows) -> Path:
    """``root/<CLASS>/*.jpg``: 30 real images per class (one per patient where known), symlinked."""
    root = tmp_path_factory.mktemp("tiny") / "covid_normal_pneumonia"
    per_class: dict[str, int] = {}
    seen_patients: set[str] = set()
    for row in shared_manifest_rows:
        label = row["label"]
        if label == "UNLABELED" or per_class.get(label, 0) >= 30:
            continue
        pid = row["patient_id"]
        if pid and pid in seen_patients:
            continue
        seen_patients.add(pid)
        dest = root / label / Path(row["path"]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(shared_data / "cxr" / row["path"])
        per_class[label] = per_class.get(label, 0) + 1
    return root


@pytest.fixture(scope="session")
def mini_folder(tiny_labelled_folder, tmp_path_factory) -> Path:
    """4 images per class (symlinks into ``tiny_labelled_folder``): for tests of mechanics, not learning."""
    root = tmp_path_factory.mktemp("mini") / "data"
    for class_dir in sorted(tiny_labelled_folder.iterdir()):
        for src in sorted(class_dir.iterdir())[:4]:
            dest = root / class_dir.name / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(src.resolve())
    return root


@pytest.fixture
def cli():
    """Invoke the real Typer app in-process: ``cli("split", str(path))`` -> click Result."""
    from typer.testing import CliRunner

    from cxrcae.cli import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return invoke
