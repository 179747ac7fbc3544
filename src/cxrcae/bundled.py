"""What ships inside the package: the default classifier, its X-ray-pretrained encoder and sample X-rays.

They make the main jobs work offline on a fresh install: ``cxrcae predict folder/`` without ``--model``,
``cxrcae.load_encoder()`` without an argument, ``timm.create_model("cxrcae_vgg_cae", pretrained=True)`` and
``cxrcae samples --out DIR``. Each weights folder is an ordinary checkpoint folder (model.safetensors,
config.json, README.md model card), so it can be copied, evaluated or pushed to the Hub as is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cxrcae.errors import CheckpointError, CxrcaeError

PACKAGE_DIR = Path(__file__).resolve().parent
CLASSIFIER_DIR = PACKAGE_DIR / "weights" / "default"
ENCODER_DIR = PACKAGE_DIR / "weights" / "encoder"
SAMPLES_DIR = PACKAGE_DIR / "samples"
ATTRIBUTION = "ATTRIBUTION.md"


def _present(folder: Path) -> Path | None:
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def bundled_classifier() -> Path | None:
    """The shipped COVID / NORMAL / PNEUMONIA classifier folder, or None in a build without weights."""
    return _present(CLASSIFIER_DIR)


def bundled_encoder() -> Path | None:
    """The shipped CAE-pretrained encoder folder (before fine-tuning), or None."""
    return _present(ENCODER_DIR)


def require(folder: Path | None, what: str, hint: str) -> Path:
    if folder is None:
        raise CheckpointError(f"no {what} given and no bundled default is installed; {hint}")
    return folder


def sample_files() -> list[Path]:
    """The shipped sample X-rays (licenses allow redistribution; see ATTRIBUTION.md beside them)."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def write_samples(out: str | Path) -> list[Path]:
    """Copy the sample X-rays and their attribution into ``out``; returns the image paths written."""
    files = sample_files()
    if not files:
        raise CxrcaeError("this build of cxrcae ships no sample X-rays")
    dest = Path(out).expanduser()
    if dest.exists() and not dest.is_dir():
        raise CxrcaeError(f"{dest}: exists and is not a folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for src in files:
            shutil.copyfile(src, dest / src.name)
            written.append(dest / src.name)
        if (SAMPLES_DIR / ATTRIBUTION).is_file():
            shutil.copyfile(SAMPLES_DIR / ATTRIBUTION, dest / ATTRIBUTION)
    except OSError as exc:
        raise CxrcaeError(f"{dest}: cannot write samples ({exc.strerror or exc})") from None
    return written
