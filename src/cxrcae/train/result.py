"""What a training run returns (and ``--json`` prints), plus the run-folder guard shared by both tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxrcae.errors import CxrcaeError


@dataclass
class TrainResult:
    """Summary of a finished run; the files it lists are in the run folder."""

    task: str  # "pretrain" | "finetune"
    out_dir: str
    best_dir: str
    device: str
    precision: str
    epochs_run: int
    best_epoch: int | None
    best_val_loss: float | None
    best_metrics: dict[str, Any]
    stages: list[dict[str, Any]]
    history: list[dict[str, Any]]
    train_images: int
    val_images: int
    seconds: float
    files: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    skipped_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_out_dir(out_dir: str | Path) -> Path:
    """Create OUT, refusing one that already holds a run (it would mix two runs' files)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CxrcaeError(f"{out}: exists and is not a folder")
    if any((out / name).exists() for name in ("best", "last", ".last-tmp", "history.csv")):
        raise CxrcaeError(
            f"{out}: already holds a training run; continue it with --resume {out} or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out
