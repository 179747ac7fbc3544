"""``cxrcae predict`` as one call: rows counted, kept for the terminal and written to a file, for any task.

``run_predict`` resolves the model once (``prediction_model``), runs ``iter_predictions`` and streams every
row to ``output`` (.csv, .json or .jsonl) through ``PredictionWriter`` in the model's ``RowLayout``. One
command at a time writes an output (``locked_output``); every finished row is also kept in
``OUTPUT.partial`` (``RowJournal``), so an interrupted run continues with ``resume=True`` and ends with the
very file an uninterrupted run writes. The output file is opened at the first row: a run that finds no
files writes nothing and raises a one-line error. What the terminal shows (``PredictRun.display``) is the
task's (``Task.prediction_display``), so the command itself never asks which task it runs.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcae.errors import CxrcaeError
from cxrcae.infer.prediction import (
    Prediction,
    RowShape,
    check_backend,
    iter_predictions,
    prediction_model,
    task_options,
)
from cxrcae.infer.writers import PredictionWriter, RowJournal, RowLayout, locked_output, output_format
from cxrcae.progress import ProgressFn, no_progress

STATUSES = ("ok", "error", "skipped", "refused")


@dataclass
class PredictRun:
    """What ``run_predict`` did: rows by status (``flagged``: answered but out of distribution), the rows
    kept for display (all of them when asked), the unreadable ones, where it wrote, and notes to show."""

    counts: dict[str, int]
    rows: list[Prediction]
    errors: list[Prediction]
    output: Path | None
    explain_dir: Path | None = None
    files_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    shape: RowShape | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        """Every input row (a flagged row is also an ``ok`` one)."""
        return sum(self.counts[s] for s in STATUSES)

    def display(self, row: Prediction) -> dict[str, Any]:
        """The terminal cells of an answered row (``Task.prediction_display``: a classifier's prediction,
        its class probabilities and a note)."""
        shape = self.shape
        return shape.task.prediction_display(row.values, shape.config, **shape.options)

    def summary(self) -> str:
        c = self.counts
        text = f"{c['ok']} predicted, {c['error']} unreadable, {c['skipped']} skipped (not images)"
        if c["flagged"] or c["refused"]:
            text += (
                f"; {c['flagged']} of the predicted flagged out of distribution, "
                f"{c['refused']} refused (not a chest radiograph)"
            )
        return text


def run_predict(
    paths: list[str | Path],
    model: Any = None,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    keep: int | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    top_k: int | None = None,
    threshold: float | None = None,
    explain_dir: str | Path | None = None,
    files_dir: str | Path | None = None,
    recursive: bool = True,
    backend: str = "torch",
    ood: bool = True,
    force_int8: bool = False,
    progress: ProgressFn = no_progress,
) -> PredictRun:
    """Predict every file in ``paths`` (files, folders, globs) with ``model`` and write the rows to
    ``output`` (see the module docstring). ``keep``: how many rows to keep in the result (None: all).
    The other arguments are ``iter_predictions``'s. Raises ``CxrcaeError`` when no file was found."""
    if output is not None:
        output_format(output)  # fail before any work on a bad extension
    elif resume:
        raise CxrcaeError("--resume continues an --output run; give that --output")
    backend = check_backend(backend, device, precision, explain_dir)
    loaded = prediction_model(model, device, backend, ood=ood)  # resolved once, handed down as is
    shape = RowShape.of(loaded, **task_options(loaded.task, top_k=top_k, threshold=threshold))
    counts = dict.fromkeys((*STATUSES, "flagged"), 0)
    kept: list[Prediction] = []
    errors: list[Prediction] = []
    with ExitStack() as stack:
        writer = None
        journal = None
        if output is not None:  # one writer per output file; finished rows kept for --resume
            stack.enter_context(locked_output(output))
            settings = {"model": loaded.weights_sha256, "top_k": top_k, "threshold": threshold}
            settings |= {"explain": explain_dir, "device": device, "precision": precision}
            settings |= {"backend": backend, "ood": ood}
            if files_dir is not None:
                settings["files"] = files_dir
            journal = stack.enter_context(RowJournal(output, settings, resume=resume))
        stream = iter_predictions(
            paths,
            loaded,
            batch_size=batch_size,
            num_workers=num_workers,  # None: chosen by timing the first batch
            device=device,
            precision=precision,
            top_k=top_k,
            threshold=threshold,
            explain_dir=explain_dir,
            files_dir=files_dir,
            recursive=recursive,
            backend=backend,
            ood=ood,
            progress=progress,
            force_int8=force_int8,
            reuse=journal.saved_row if journal is not None else None,
        )
        for pred in stream:
            counts[pred.status] += 1
            counts["flagged"] += pred.ok and bool(pred.out_of_distribution)
            if pred.status == "error":
                errors.append(pred)
            if keep is None or len(kept) < keep:
                kept.append(pred)
            if output is not None:
                if writer is None:  # opened on the first row: no output file when there is nothing to write
                    layout = RowLayout.of(loaded.task, loaded.config, shape.file_fields)
                    writer = stack.enter_context(PredictionWriter(output, layout, journal))
                writer.write(pred.to_dict())
    notes = []
    if ood and (loaded.guard is None or loaded.guard.guard is None):
        notes.append(
            "this model has no OOD guard (ood.safetensors): only the DICOM header, colour and blank-image "
            "checks ran; fit one with `cxrcae calibrate-ood MODEL DATA`"
        )
    run = PredictRun(
        counts=counts,
        rows=kept,
        errors=errors,
        output=Path(output) if output is not None else None,
        explain_dir=Path(explain_dir) if explain_dir is not None else None,
        files_dir=Path(files_dir) if files_dir is not None else None,
        notes=notes,
        shape=shape,
    )
    if run.total == 0:
        raise CxrcaeError(f"no files found in {', '.join(map(str, paths))}")
    return run
