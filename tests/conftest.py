"""Shared fixtures: an isolated home for caches, real X-rays, and a CLI runner.

Real X-rays come from ../shared/data when it is there (or CXRCAE_SHARED_DATA), otherwise from the
redistributable copies shipped in tests/fixtures/xrays (same layout: cxr/, originals/, metadata/), so no test
skips for want of data. The learning tests always use the shipped set: the same images on every machine.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "xrays"
_SHARED = Path(os.environ.get("CXRCAE_SHARED_DATA", REPO.parent / "shared" / "data"))
HAVE_SHARED = (_SHARED / "cxr" / "manifest.csv").is_file()
SHARED_DATA = _SHARED if HAVE_SHARED else FIXTURE_DATA
"""../shared/data (8,559 images) where present, else the shipped fixture set (374 images)."""


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches or reaches a real Hub."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("CXRCAE_HOME", str(home / "cxrcae"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("CXRCAE_PROBE", "off")  # auto = fp32 + NHWC; the probe itself is tested on its own
    # huggingface_hub reads its settings once, at import, into huggingface_hub.constants (which cxrcae uses)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("CXRCAE_MIRROR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: keep rows on one line for assertions
    yield home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real chest X-rays: ../shared/data, or the shipped fixture set where that is absent."""
    return SHARED_DATA


def _manifest_rows(root: Path) -> list[dict]:
    with open(root / "cxr" / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def fixture_rows() -> list[dict]:
    """Rows of the shipped fixture set (tests/fixtures/xrays/cxr/manifest.csv)."""
    return _manifest_rows(FIXTURE_DATA)


@pytest.fixture(scope="session")
def shared_manifest_rows(shared_data) -> list[dict]:
    return _manifest_rows(shared_data)


TINY_PER_CLASS = 30
"""Images per class in ``tiny_labelled_folder``; the rest of the shipped set stays unseen (held out)."""


@pytest.fixture(scope="session")
def tiny_labelled_folder(tmp_path_factory, fixture_rows) -> Path:
    """``root/<CLASS>/*.jpg``: 30 real images per class from the shipped set (one per patient), symlinked.

    COVID is ieee8023 (adults), NORMAL and PNEUMONIA are Kermany (children): the same images everywhere.
    """
    root = tmp_path_factory.mktemp("tiny") / "covid_normal_pneumonia"
    per_class: dict[str, int] = {}
    seen_patients: set[str] = set()
    for row in fixture_rows:
        label = row["label"]
        if label == "UNLABELED" or per_class.get(label, 0) >= TINY_PER_CLASS:
            continue
        pid = row["patient_id"]
        if pid and pid in seen_patients:
            continue
        seen_patients.add(pid)
        dest = root / label / Path(row["path"]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(FIXTURE_DATA / "cxr" / row["path"])
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


class Interrupt(KeyboardInterrupt):
    """What a Ctrl-C looks like to a training run (raised by ``stop_at_epoch``)."""


def stop_at_epoch(n: int):
    """A progress callback that interrupts a run as epoch ``n`` starts."""

    def progress(task: str, done: int, total=None, info: str = "") -> None:
        if task.startswith(f"epoch {n}") and done == 0:
            raise Interrupt

    return progress


def draw_knee(rng, gap: int, effusion: bool = False, size: int = 64):
    """A synthetic knee radiograph (uint8 HxW): femur above, tibia below, a joint gap of ``gap`` pixels
    (the class of a 'joint-space narrowing' grade) and, with ``effusion``, a bright blob beside the joint.
    Positions, widths and noise vary per image, so a probe has to read the anatomy, not the pixels."""
    import numpy as np

    img = rng.normal(0.15, 0.04, (size, size))
    cx, half = size // 2 + int(rng.integers(-5, 6)), size // 5 + int(rng.integers(-2, 3))
    mid, gap = size // 2 + int(rng.integers(-4, 5)), max(0, gap + int(rng.integers(-1, 2)))
    top, bottom = mid - gap // 2, mid + (gap - gap // 2)
    img[:top, cx - half : cx + half] += 0.6
    img[bottom:, cx - half - 2 : cx + half + 2] += 0.55
    if effusion:
        yy, xx = np.mgrid[:size, :size]
        side = cx + half + 6 if rng.random() < 0.5 else cx - half - 6
        img[(yy - mid) ** 2 + (xx - side) ** 2 < 25] += 0.45
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


KNEE_GAPS = (12, 6, 1)
"""Joint gap (pixels) of the synthetic knee classes ``0``, ``1``, ``2``."""


@pytest.fixture(scope="session")
def knee_folder(tmp_path_factory) -> Path:
    """``root/{0,1,2}/*.png``: 20 synthetic knee radiographs per joint-space class (``draw_knee``), plus one
    unreadable file in class ``1``: a non-chest body part with numeric class names."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("knees") / "knees"
    rng = np.random.default_rng(0)
    for label, gap in enumerate(KNEE_GAPS):
        (root / str(label)).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(draw_knee(rng, gap)).save(root / str(label) / f"knee_{label}_{i:02d}.png")
    (root / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


@pytest.fixture(scope="session")
def knee_findings_manifest(tmp_path_factory) -> Path:
    """A multi-label manifest of 64 synthetic knees (two per patient) whose ``finding`` column holds
    ``Narrowing/Effusion``, ``Narrowing``, ``Effusion`` or ``Normal``, separated by ``/`` like ieee8023's."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("knee_findings")
    (root / "images").mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(64):
        narrow, effusion = bool(i % 2), bool((i // 2) % 2)
        name = f"images/k{i:03d}.png"
        Image.fromarray(draw_knee(rng, 2 if narrow else 11, effusion)).save(root / name)
        found = [n for n, on in (("Narrowing", narrow), ("Effusion", effusion)) if on]
        rows.append({"path": name, "patient_id": f"p{i // 2}", "finding": "/".join(found) or "Normal"})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "patient_id", "finding"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"
