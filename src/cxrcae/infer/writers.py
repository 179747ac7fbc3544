"""Prediction rows to CSV, JSON or JSONL, streamed into a temp file and renamed into place at the end.

Streaming keeps memory flat for any number of rows; the rename means a reader never sees half a file and
an interrupted run leaves the previous output (if any) untouched. ``read_predictions`` reads any of the
three formats back to the same dicts, which is what the round-trip tests check.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrcae._atomic import AtomicFile
from cxrcae.errors import CxrcaeError

FORMATS = (".csv", ".json", ".jsonl")
BASE_COLUMNS = ("path", "status", "label", "probability", "top_class")
TAIL_COLUMNS = ("top_k", "reason", "explanation")


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CxrcaeError(f"{path}: output must end in {', '.join(FORMATS)} (got {suffix or 'no extension'})")
    return suffix


def prob_column(name: str) -> str:
    return f"prob_{name}"


class PredictionWriter:
    """``with PredictionWriter(path, names) as w: w.write(row)``; rows shaped like ``Prediction.to_dict``."""

    def __init__(self, path: str | Path, class_names: Sequence[str]):
        self.path = Path(path).expanduser()
        self.format = output_format(self.path)
        self.class_names = list(class_names)
        self.columns = [*BASE_COLUMNS, *(prob_column(c) for c in self.class_names), *TAIL_COLUMNS]
        self.count = 0
        self._target: AtomicFile | None = None
        self._file: Any = None
        self._csv: Any = None

    def __enter__(self) -> PredictionWriter:
        self._target = AtomicFile(self.path, "w", newline="")
        self._file = self._target.file
        if self.format == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=self.columns, lineterminator="\n")
            self._csv.writeheader()
        elif self.format == ".json":
            self._file.write("[")
        return self

    def write(self, row: dict[str, Any]) -> None:
        if self.format == ".csv":
            self._csv.writerow(self._flat(row))
        else:
            text = json.dumps(row, allow_nan=False, default=str)
            if self.format == ".json":
                self._file.write(("," if self.count else "") + "\n  " + text)
            else:
                self._file.write(text + "\n")
        self.count += 1

    def _flat(self, row: dict[str, Any]) -> dict[str, Any]:
        probs = row.get("probabilities") or {}
        flat = {c: _cell(row.get(c)) for c in (*BASE_COLUMNS, *TAIL_COLUMNS)}
        flat["top_k"] = ";".join(f"{name}:{p!r}" for name, p in row.get("top_k") or [])
        for name in self.class_names:
            flat[prob_column(name)] = _cell(probs.get(name))
        return flat

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # an interrupted run leaves the previous output (if any) untouched
            self._target.discard()
            return
        if self.format == ".json":
            self._file.write("\n]\n" if self.count else "]\n")
        self._target.commit()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions file as dicts shaped like ``Prediction.to_dict()``."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == ".json":
        return json.loads(path.read_text("utf-8"))
    if fmt == ".jsonl":
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = [c[len("prob_") :] for c in reader.fieldnames or [] if c.startswith("prob_")]
        rows = []
        for raw in reader:
            rows.append(
                {
                    "path": raw["path"],
                    "status": raw["status"],
                    "label": raw["label"] or None,
                    "probability": _float(raw["probability"]),
                    "top_class": raw["top_class"] or None,
                    "probabilities": {n: _float(raw[prob_column(n)]) for n in names if raw[prob_column(n)]},
                    "top_k": [
                        [name, float(p)]
                        for name, p in (t.rsplit(":", 1) for t in raw["top_k"].split(";") if t)
                    ],
                    "reason": raw["reason"],
                    "explanation": raw["explanation"] or None,
                }
            )
        return rows


def _float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None
