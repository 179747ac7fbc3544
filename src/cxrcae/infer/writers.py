"""Prediction rows to CSV, JSON or JSONL, streamed into a temp file and renamed into place at the end.

A row is ``Prediction.to_dict()``: JSON and JSONL hold it as it is; a CSV has the columns of its model's
``RowLayout``: path, status, the task's CSV columns (``Task.prediction_columns``, cells from
``Task.prediction_cells``), reason, the files predict features wrote, and the screen's three columns.

Streaming keeps memory flat for any number of rows; the rename means a reader never sees half a file and
an interrupted run leaves the previous output (if any) untouched. ``read_predictions`` reads any of the
three formats back to the same dicts, which is what the round-trip tests check.

Interrupted runs lose no finished row: ``RowJournal`` appends each row, as it is computed, to
``OUTPUT.partial`` beside the output (with the input file's size and modification time), and removes it
once the output is complete. After Ctrl-C, a SIGKILL or a full disk, running the same command with
``--resume`` takes the rows of unchanged files (same path, size and mtime) from there and computes only the
rest; the output then equals an uninterrupted run's, row order included. ``locked_output`` makes one command
at a time the writer of an output file (``cxrcae.locking``). ``predict`` and ``embed`` use both.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrcae._atomic import AtomicFile, WriteError, as_write_error, sweep_temporaries
from cxrcae.errors import CxrcaeError, add_note
from cxrcae.locking import hold
from cxrcae.tasks import get_task

FORMATS = (".csv", ".json", ".jsonl")
HEAD_COLUMNS = ("path", "status")
SCREEN_COLUMNS = ("out_of_distribution", "ood_score", "ood_reason")


def output_format(path: str | Path) -> str:
    """The format of ``path`` from its suffix (``.csv``, ``.json``, ``.jsonl``); a one-line error else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CxrcaeError(f"{path}: output must end in {', '.join(FORMATS)} (got {suffix or 'no extension'})")
    return suffix


def prob_column(name: str) -> str:
    """The column holding the probability of class ``name`` in a classifier's prediction files."""
    return f"prob_{name}"


@dataclass(frozen=True)
class RowLayout:
    """The CSV columns of one model's prediction rows and how a row's task values become their cells."""

    task_columns: tuple[str, ...]
    cells: Callable[[dict[str, Any]], dict[str, Any]]
    file_columns: tuple[str, ...] = ()

    @classmethod
    def of(cls, task: Any, config: dict[str, Any], file_columns: Sequence[str] = ()) -> RowLayout:
        """The layout of a task (``cxrcae.tasks.Task``) and its model's config."""
        return cls(
            tuple(task.prediction_columns(config)),
            lambda values: task.prediction_cells(values, config),
            tuple(file_columns),
        )

    @property
    def columns(self) -> list[str]:
        return [*HEAD_COLUMNS, *self.task_columns, "reason", *self.file_columns, *SCREEN_COLUMNS]

    def flat(self, row: dict[str, Any]) -> dict[str, Any]:
        fixed = {*HEAD_COLUMNS, "reason", *self.file_columns, *SCREEN_COLUMNS}
        values = {k: v for k, v in row.items() if k not in fixed}
        cells = {c: row.get(c) for c in (*HEAD_COLUMNS, "reason", *self.file_columns, *SCREEN_COLUMNS)}
        task_cells = self.cells(values)
        cells.update({c: task_cells.get(c, values.get(c)) for c in self.task_columns})
        return {c: _cell(cells.get(c)) for c in self.columns}


def _classifier_layout(class_names: Sequence[str]) -> RowLayout:
    """A classifier's layout from its class names alone (what ``PredictionWriter`` took before layouts)."""
    return RowLayout.of(get_task("classify"), {"class_names": list(class_names)}, ("explanation",))


class PredictionWriter:
    """``with PredictionWriter(path, layout) as w: w.write(row)``; rows shaped like ``Prediction.to_dict``.

    ``layout`` is the model's ``RowLayout`` (a list of class names is a classifier's)."""

    def __init__(
        self, path: str | Path, layout: RowLayout | Sequence[str], journal: RowJournal | None = None
    ):
        self.path = Path(path).expanduser()
        self.journal = journal  # every row also goes there (unless it came from there), for --resume
        self.format = output_format(self.path)
        self.layout = layout if isinstance(layout, RowLayout) else _classifier_layout(layout)
        self.columns = self.layout.columns
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
        if self.journal is not None:
            self.journal.record(row["path"], {"row": row})
        if self.format == ".csv":
            self._csv.writerow(self.layout.flat(row))
        else:
            text = json.dumps(row, allow_nan=False, default=str)
            if self.format == ".json":
                self._file.write(("," if self.count else "") + "\n  " + text)
            else:
                self._file.write(text + "\n")
        self.count += 1

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
    """Rows of a predictions file as dicts shaped like ``Prediction.to_dict()`` (a CSV in a classifier's
    layout; JSON and JSONL of any task)."""
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
                    "out_of_distribution": _bool(raw.get("out_of_distribution")),
                    "ood_score": _float(raw.get("ood_score")),
                    "ood_reason": raw.get("ood_reason") or "",
                }
            )
        return rows


def _float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def _bool(text: str | None) -> bool | None:
    """A CSV cell written from a bool (``True``/``False``) or left empty (None: not screened)."""
    return None if text in ("", None) else text.strip().lower() == "true"


# ----------------------------------------------------------------------------------------------- resume

PARTIAL_SUFFIX = ".partial"
JOURNAL_VERSION = 1


def partial_path(output: str | Path) -> Path:
    """Where the finished rows of an unfinished ``output`` are kept: ``OUTPUT.partial`` beside it."""
    output = Path(output).expanduser()
    return output.with_name(output.name + PARTIAL_SUFFIX)


@contextmanager
def locked_output(output: str | Path, *companions: str | Path) -> Iterator[None]:
    """This process is the one writer of ``output`` (and the ``companions`` written with it) for the block;
    the temporaries a killed writer left beside them are removed first."""
    output = Path(output).expanduser()
    with hold(output, folder=False):
        for path in (output, *map(Path, companions)):
            sweep_temporaries(path.parent, path.name)
        yield


def file_key(path: str | Path) -> list[int] | None:
    """What identifies a version of an input file: [size, mtime in ns] (None when it cannot be read)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return [info.st_size, info.st_mtime_ns]


class RowJournal:
    """The rows already computed for ``output``, one JSON line each, in ``OUTPUT.partial``.

    ``with RowJournal(output, settings, resume=...) as journal``: ``record(path, data)`` appends a row as
    soon as it is computed; ``saved(path)`` gives back the row of an input whose size and mtime are
    unchanged since (None otherwise). The first line holds ``settings`` (model, options): a journal written
    with other settings is refused rather than mixed in. When the block ends normally the file is removed
    (the output is complete); after Ctrl-C or a failed write (a full disk) it stays, with only complete
    rows, and the exception gets a note saying how to continue; after any other error it is removed.
    Without ``resume`` an existing journal is refused, so an interrupted run is never overwritten silently.
    """

    def __init__(self, output: str | Path, settings: dict[str, Any], *, resume: bool = False):
        self.output = Path(output).expanduser()
        self.path = partial_path(self.output)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
        self.resume = resume
        self._index: dict[str, tuple[list[int] | None, int]] = {}  # path -> (file key, line offset)
        self._checked: dict[str, bool] = {}
        self._fd: int | None = None
        self._reader: Any = None
        self._end = 0

    def __len__(self) -> int:
        return len(self._index)

    def __enter__(self) -> RowJournal:
        exists = self.path.exists() or self.path.is_symlink()
        if exists and not self.resume:
            raise CxrcaeError(
                f"{self.path}: an interrupted run left its finished rows here; run the same command with "
                "--resume to continue it, or delete that file to start over"
            )
        try:
            if exists:
                self._load()
            else:
                header = {"cxrcae_partial": JOURNAL_VERSION, "output": self.output.name}
                self._open(truncate=True)
                self._append((json.dumps({**header, "settings": self.settings}) + "\n").encode())
        except OSError as exc:
            self._close()
            raise as_write_error(self.path, exc) from None
        return self

    def _open(self, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags | (os.O_TRUNC if truncate else 0), 0o644)
        self._reader = open(self.path, "rb")  # noqa: SIM115 - kept open for saved(), closed in _close

    def _load(self) -> None:
        """Index the complete rows; a row cut short (SIGKILL, full disk) and anything after it is dropped."""
        with open(self.path, "rb") as f:
            first = f.readline()
            try:
                header = json.loads(first)
                ok = header.get("cxrcae_partial") == JOURNAL_VERSION and isinstance(
                    header.get("settings"), dict
                )
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                raise CxrcaeError(f"{self.path}: not a cxrcae partial-results file; delete it to start over")
            if header["settings"] != self.settings:
                changed = sorted(
                    k
                    for k in {*header["settings"], *self.settings}
                    if header["settings"].get(k) != self.settings.get(k)
                )
                raise CxrcaeError(
                    f"{self.path}: was written with other settings ({', '.join(changed)}); resume with the "
                    "same ones, or delete that file to start over"
                )
            offset = len(first)
            for line in f:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError
                    record = json.loads(line)
                    path, key = record["path"], record["key"]
                except (ValueError, KeyError, TypeError):
                    break
                self._index[path] = (key, offset)
                offset += len(line)
        os.truncate(self.path, offset)
        self._open(truncate=False)
        self._end = offset

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._end += len(data)

    def has(self, path: str) -> bool:
        """Whether the interrupted run computed ``path`` and the file is unchanged since; one answer per
        path for the life of the journal (a file edited meanwhile is not half taken from here)."""
        entry = self._index.get(path)
        if entry is None:
            return False
        if path not in self._checked:
            self._checked[path] = entry[0] is not None and file_key(path) == entry[0]
        return self._checked[path]

    def saved(self, path: str) -> dict[str, Any] | None:
        """The record of ``path`` from the interrupted run when ``has(path)``, else None."""
        if not self.has(path):
            return None
        self._reader.seek(self._index[path][1])
        return json.loads(self._reader.readline())

    def saved_row(self, path: str) -> dict[str, Any] | None:
        """``saved(path)["row"]``: a prediction row as ``Prediction.to_dict`` made it."""
        record = self.saved(path)
        return None if record is None else record["row"]

    def record(self, path: str, data: dict[str, Any]) -> None:
        """Append the row of ``path`` (a no-op for a row that came from here); complete lines only."""
        if self._checked.get(path):
            return
        key = file_key(path)
        line = (json.dumps({"path": path, "key": key, **data}, allow_nan=False) + "\n").encode()
        start = self._end
        try:
            self._append(line)
        except OSError as exc:
            self._end = start
            try:
                os.ftruncate(self._fd, start)  # no half row: a full disk still leaves complete lines
            except OSError:
                pass
            raise as_write_error(self.path, exc) from None
        self._index[path] = (key, start)
        self._checked[path] = False  # computed now, not taken from here

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close()
        keep = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, OSError)) and self._index
        if keep:
            done = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "stopped"
            add_note(
                exc,
                f"{done}: {len(self._index)} finished row(s) are kept in {self.path}; run the same command "
                "with --resume to continue",
            )
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            if exc_type is None:
                raise WriteError(self.path, error) from None
