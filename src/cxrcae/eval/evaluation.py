"""Evaluate a fine-tuned model on labelled data: its task's metrics with 95% CIs, subgroups, figures, report.

``evaluate(model, data, split="test")`` resolves the model once (``cxrcae.hub.resolve``), runs it over the
split (streamed, a bad file is an error row excluded from the metrics) and hands everything task-specific to
the model's task (``cxrcae.tasks``): which records can be scored and what their answers are (``targets``),
the metrics with patient-level bootstrap intervals (``score_outputs``), the table and headline figures, the
rows of predictions.csv and any files of its own. What is the same for every task stays here: per-subgroup
metrics for each ``by`` spec (``cxrcae.eval.subgroups``; by default per ``source``, because shortcut learning
across sources is the known failure of X-ray models), the check against the model's own test split, the
figures that metrics of the right shape allow (confusion matrices, ROC curves, reliability diagram: a
classifier's) and ``report.html``. It writes ``metrics.json``, ``predictions.csv``, those figures and the
report into ``MODEL_DIR/eval-<split>`` (or ``out_dir``).

Data without a split column (a manifest, a class folder) is evaluated whole as an **external** set and every
output says so (``"set": "external"``). When the model folder lists its own held-out images
(``test_split.csv`` with sha256, as the bundled model does), the images are matched against it by content,
so an "external" evaluation that is really run on the model's training images is called out, and
``--by in_model_test_split`` separates the two.

With ``calibrate=True`` (classify: temperature scaling) a temperature is first fitted on the ``val`` split and
stored in the model's config.json; the test metrics then use it, and the uncalibrated ECE is reported
alongside.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrcae._atomic import atomic_open, atomic_write_text
from cxrcae.data import dataset_fingerprint, load_records
from cxrcae.data.records import Record, select_records
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.eval import report
from cxrcae.eval.calibration import fit_and_store
from cxrcae.eval.report import write_html
from cxrcae.eval.subgroups import (
    FEW_CLASS_N,
    SMALL_GROUP_N,
    GroupBy,
    parse_specs,
    subgroup_labels,
    subgroup_metrics,
    subgroup_table,
)
from cxrcae.hub.resolve import in_hub_cache
from cxrcae.infer.batches import answering_model, collect_outputs
from cxrcae.io import hash_files
from cxrcae.locking import hold
from cxrcae.metrics import fmt_ci
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import precision_name, resolve_device, resolve_precision
from cxrcae.tasks import Task


@dataclass
class EvaluationResult:
    """What ``evaluate`` measured; ``metrics`` is exactly what ``metrics.json`` holds."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    out_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    task: Task | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.metrics.get("class_names") or [])

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(columns, rows) of the task's metric table (a classifier's: per class, then macro and weighted,
        each value with its 95% CI)."""
        return self._task().metric_rows(self.metrics)

    def summary(self) -> list[tuple[str, str]]:
        """The task's headline figures: (name, text) pairs."""
        return self._task().summary(self.metrics)

    def subgroup_tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """(title, columns, rows) per ``by`` breakdown, in the order asked."""
        return subgroup_tables(self.metrics, self.task)

    def _task(self) -> Task:
        if self.task is None:
            raise CxrcaeError("this EvaluationResult was made without its task")
        return self.task

    def __repr__(self) -> str:
        m = self.metrics
        head = "".join(f", {k}={v}" for k, v in self.summary()[:2])
        return f"EvaluationResult(set={m['set']!r}, n={m['n']}{head}, out_dir={str(self.out_dir)!r})"


EXTERNAL = "external"
"""The ``set`` of data without a split column: evaluated whole, not a held-out split of a training run."""
MODEL_TEST_SPLIT = "test_split.csv"
"""A model folder's list of its own held-out test images (path, label, ..., sha256 of the file)."""
IN_MODEL_TEST = "in_model_test_split"
"""Derived column (yes/no) on an external set when the model lists its test images: usable with ``by``."""


def subgroup_tables(metrics: dict, task: Task | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """One (title, columns, rows) table per ``--by`` breakdown in ``metrics`` (a task's own metrics are shown
    through its ``metric_rows``)."""
    names = metrics.get("class_names") or []
    rows_of = task.metric_rows if task is not None else None
    tables = []
    for spec, breakdown in (metrics.get("subgroups") or {}).items():
        title = f"By {spec}" + (" (shortcut check)" if spec == "source" else "")
        tables.append((title, *subgroup_table(breakdown, names, spec, rows_of)))
    return tables


def describe_set(metrics: dict) -> str:
    """``split 'test'`` or ``external set (all rows)``: how every output names what was evaluated."""
    if metrics.get("set", EXTERNAL) == EXTERNAL:
        return "external set, all rows"
    return f"split {metrics['split']!r}"


def _one_writer(evaluate_fn):
    """``evaluate`` keeps its output folder to itself (``cxrcae.locking``, as training runs do): a given
    ``out_dir`` (``evaluate --out``) is held for the whole run, so a second evaluate into it is refused at
    once, naming this one; the default folder, known only once the data is read, while it is written."""

    @functools.wraps(evaluate_fn)
    def run(*args: Any, out_dir: str | Path | None = None, write: bool = True, **kwargs: Any):
        held = hold(out_dir, folder=True) if write and out_dir is not None else nullcontext()
        with held:
            return evaluate_fn(*args, out_dir=out_dir, write=write, **kwargs)

    return run


@_one_writer
def evaluate(
    model_ref: Any,
    data: str | Path,
    split: str | None = "test",
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int | None = None,
    calibrate: bool = False,
    by: Sequence[str] | None = None,
    html: bool = True,
    write: bool = True,
    progress: ProgressFn = no_progress,
) -> EvaluationResult:
    """Evaluate a checkpoint (folder, Hub id, ``load_model`` object or ``LoadedModel``) on ``data``.

    ``data`` is a splits CSV (its ``split`` rows are used), or a class folder / manifest (all rows, as an
    external set; the result says so). ``n_bootstrap`` resamples (patients when the data has patient ids)
    give 95% CIs; 0 turns them off. ``by`` lists subgroup specs (``"source"``, ``"view"``, ``"age:10"``,
    ``"source+view"``; see ``cxrcae.eval.subgroups``); None means per source when the data has sources, an
    empty list no breakdown. ``n_bins`` (calibration bins) and ``calibrate`` are a classifier's (refused in
    one line for a task without them; None: the task's default). ``write=False`` computes without touching
    the disk.
    """

    dev = resolve_device(device)
    loaded = answering_model(model_ref, dev)  # resolved once: everything below uses this one object
    task, config, folder = loaded.task, loaded.config, loaded.folder
    options: dict[str, Any] = {}
    if n_bins is not None:
        task.require_option("bins", "--bins")
        options["bins"] = int(n_bins)
    if calibrate:
        task.require_option("calibrate", "--calibrate")
    dtype = resolve_precision(precision, dev)
    records = load_records(data, labeled=task.uses_label_column)
    chosen, used_split, notes = select_records(records, split, data)
    chosen, task_notes = task.evaluation_records(chosen, config, data)
    notes += task_notes
    set_name = used_split or EXTERNAL
    derived: dict[str, list[str | None]] = {}
    model_test = None
    if set_name == EXTERNAL and folder is not None:
        model_test = _model_test_overlap(folder, chosen, notes, progress)
        if model_test:
            derived[IN_MODEL_TEST] = model_test.pop("values")
    breakdowns = _breakdowns(chosen, by)
    # subgroup names now, so that a bad --by fails before any image goes through the model
    labels = {b.spec: subgroup_labels(chosen, b, derived) for b in breakdowns}

    calibration_info = None
    if calibrate:
        calibration_info = fit_and_store(
            loaded,
            records,
            data,
            dev,
            dtype,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
        config["temperature"] = calibration_info["temperature"]

    paths = [str(r.path) for r in chosen]
    outputs, ok, errors = collect_outputs(
        loaded.net,
        config,
        paths,
        dev,
        dtype,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        task=f"evaluate {used_split or 'all'}",
    )
    if errors:
        notes.append(f"{len(errors)} file(s) could not be read and are excluded from the metrics")
    if not ok:
        raise DataError(f"{data}: none of the {len(paths)} images could be read")
    kept = [chosen[i] for i in ok]
    targets = task.targets(kept, config)
    probs = task.probabilities(outputs, config)
    groups = [r.patient_id for r in kept]

    metrics = task.score_outputs(outputs, targets, groups, config, n_boot=n_bootstrap, seed=seed, **options)
    metrics.setdefault("n", len(kept))  # images scored: every metrics.json says it, whatever the task
    if calibration_info:
        metrics["calibration"]["fit"] = calibration_info

    def score(y: np.ndarray, p: np.ndarray, units: list[str | None] | None) -> dict[str, Any]:
        return task.score(p, y, units, config, n_boot=n_bootstrap, seed=seed, **options)

    metrics["subgroups"] = {
        b.spec: subgroup_metrics(
            [labels[b.spec][i] for i in ok], targets, probs, by=b, groups=groups, score=score
        )
        for b in breakdowns
    }
    if "source" in metrics["subgroups"]:  # the layout model cards and earlier readers of metrics.json know
        metrics["per_source"] = metrics["subgroups"]["source"]["groups"]
    if model_test:
        metrics["model_test_split"] = model_test
    metrics.update(
        {
            "model": str(folder) if folder else "(in-memory model)",
            "data": str(data),
            "set": set_name,
            "split": used_split,
            "n_requested": len(paths),
            "n_errors": len(errors),
            "data_fingerprint": dataset_fingerprint(chosen),
            "image_size": int(config["image_size"]),
            "device": str(dev),
            "precision": precision_name(dtype),
            "resize_mode": config.get("resize_mode", "stretch"),
            "notes": notes,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    columns = {spec: [name for _, name in values] for spec, values in labels.items() if spec != "source"}
    columns.update({c: v for c, v in derived.items() if c not in columns})
    rows = _prediction_rows(task, config, chosen, ok, errors, probs, set_name, columns)
    out = None
    files: dict[str, Path] = {}
    if write:
        out = Path(out_dir).expanduser() if out_dir else _default_out(folder, set_name)
        with nullcontext() if out_dir else hold(out, folder=True):  # a given out_dir: held by _one_writer
            files = _write_outputs(out, task, config, metrics, rows, kept, targets, probs, html)
    return EvaluationResult(
        metrics=_clean(metrics), predictions=rows, out_dir=out, files=files, notes=notes, task=task
    )


def _default_out(folder: Path | None, set_name: str) -> Path:
    name = f"eval-{set_name}"
    if folder is None:
        return Path.cwd() / name
    if not os.access(folder, os.W_OK) or in_hub_cache(folder):
        return Path.cwd() / f"{folder.name}-{name}"  # a Hub download lives in the read-only cache
    return folder / name


def _breakdowns(records: Sequence[Record], by: Sequence[str] | None) -> list[GroupBy]:
    """The ``by`` specs parsed; by default per source, when the data has sources (the shortcut check)."""
    if by is None:
        by = ["source"] if any(r.source for r in records) else []
    return parse_specs(by)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _model_test_overlap(
    folder: Path, records: Sequence[Record], notes: list[str], progress: ProgressFn = no_progress
) -> dict[str, Any] | None:
    """Which of ``records`` are in the model's own recorded test split, matched by file content.

    Only a model folder with ``test_split.csv`` (a ``sha256`` column) can say; otherwise None. Returns
    ``{"file", "images", "in_test_split", "values": ["yes"/"no"/None per record]}`` and adds a note: an
    "external" set that holds images the model was trained on overstates how well it generalises.
    """
    listed = folder / MODEL_TEST_SPLIT
    if not listed.is_file():
        return None
    with open(listed, newline="", encoding="utf-8") as f:
        digests = {row["sha256"] for row in csv.DictReader(f) if row.get("sha256")}
    if not digests:
        return None
    found = hash_files(
        [Path(r.path) for r in records], _sha256, progress=progress, task="matching the model's test split"
    )
    values = [
        None
        if Path(r.path) not in found.hashes
        else ("yes" if found.hashes[Path(r.path)] in digests else "no")
        for r in records
    ]
    inside = values.count("yes")
    outside = len(values) - inside
    if outside == 0:
        notes.append(f"all {inside} images are in the model's own held-out test split ({listed})")
    else:
        notes.append(
            f"only {inside} of {len(values)} images are in the model's own held-out test split ({listed}); "
            f"the other {outside} may be images it was trained or validated on, so these figures overstate "
            f"how it does on unseen data; --by {IN_MODEL_TEST} separates them"
        )
    return {"file": str(listed), "images": len(values), "in_test_split": inside, "values": values}


def _prediction_rows(
    task: Task,
    config: dict[str, Any],
    chosen: Sequence[Record],
    ok: Sequence[int],
    errors: Sequence[tuple[int, str, str]],
    probs: np.ndarray,
    set_name: str,
    columns: dict[str, list[str | None]],
) -> list[dict[str, Any]]:
    """One row per image (unreadable ones too): ``set``, each subgroup column the ``by`` specs made, and the
    task's cells (``Task.evaluation_row``)."""
    by_index = {i: row for row, i in enumerate(ok)}
    reasons = {i: reason for i, _, reason in errors}
    rows = []
    for i, r in enumerate(chosen):
        answered = i in by_index
        row: dict[str, Any] = {
            "path": str(r.path),
            "patient_id": r.patient_id or "",
            "source": r.source or "",
            "set": set_name,
            **{c: values[i] or "" for c, values in columns.items()},
            "status": "ok" if answered else "error",
            "reason": "" if answered else reasons.get(i, ""),
        }
        rows.append(task.evaluation_row(row, r, probs[by_index[i]] if answered else None, config))
    return rows


def _clean(value: Any) -> Any:
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_outputs(
    out: Path,
    task: Task,
    config: dict[str, Any],
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    kept: Sequence[Record],
    targets: np.ndarray,
    probs: np.ndarray,
    html: bool,
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(metrics)
    files = {
        "metrics": out / "metrics.json",
        "predictions": _write_csv(out / "predictions.csv", rows),
        **_figures(out, metrics, targets, probs),
    }
    paths = [str(r.path) for r in kept]
    files.update(task.evaluation_files(out, paths, probs, targets, clean, config))
    atomic_write_text(files["metrics"], json.dumps(clean, indent=2, allow_nan=False) + "\n")
    if html:
        files["report"] = _write_html(
            out / "report.html", task, clean, [p for k, p in files.items() if p.suffix == ".png"]
        )
    return files


def _figures(out: Path, metrics: dict[str, Any], targets: np.ndarray, probs: np.ndarray) -> dict[str, Path]:
    """The figures metrics of a classifier's shape allow: confusion matrices (counts and row-normalised),
    one-vs-rest ROC curves and the reliability diagram; none for metrics of another shape."""
    names = metrics.get("class_names")
    files: dict[str, Path] = {}
    if names and "confusion_matrix" in metrics:
        cm = metrics["confusion_matrix"]
        files["confusion_matrix"] = report.plot_confusion(cm, names, out / "confusion_matrix.png")
        files["confusion_matrix_normalized"] = report.plot_confusion(
            cm, names, out / "confusion_matrix_normalized.png", normalize=True
        )
    per_class = metrics.get("per_class") or {}
    if names and targets.ndim == 1 and probs.ndim == 2 and all("auc" in per_class.get(n, {}) for n in names):
        ci = metrics.get("ci", {}).get("per_class", {})
        aucs = {n: fmt_ci(per_class[n]["auc"], ci.get(n, {}).get("auc")) for n in names}
        files["roc_curves"] = report.plot_roc(targets, probs, names, aucs, out / "roc_curves.png")
    cal = metrics.get("calibration") or {}
    if "bins" in cal and "ece" in cal:
        extra = f", T={cal['temperature']:.2f}" if cal.get("temperature", 1.0) != 1.0 else ""
        files["reliability_diagram"] = report.plot_reliability(
            cal["bins"], cal["ece"], out / "reliability_diagram.png", extra
        )
    return files


def _write_html(path: Path, task: Task, metrics: dict, images: list[Path]) -> Path:
    ci = metrics.get("ci") or {}
    summary = [
        ("model", metrics["model"]),
        ("data", f"{metrics['data']} ({describe_set(metrics)})"),
        ("set", _set_text(metrics)),
        ("images", f"{metrics['n']} evaluated, {metrics['n_errors']} unreadable"),
        *task.summary(metrics),
        (
            "bootstrap",
            f"{ci.get('n_resamples', 0)} resamples of {ci.get('unit', '-')}s (seed {ci.get('seed', '-')})",
        ),
    ]
    tables = [("Metrics (95% CI)", *task.metric_rows(metrics))]
    tables += subgroup_tables(metrics, task)
    notes = list(metrics["notes"])
    if any(g.get("small") for b in (metrics.get("subgroups") or {}).values() for g in b["groups"].values()):
        notes.append(
            f"Subgroups marked in the last column have fewer than {SMALL_GROUP_N} images or a class with "
            f"fewer than {FEW_CLASS_N}: their intervals are wide; read them as unknown, not as good or bad."
        )
    title = f"cxrcae evaluation: {Path(metrics['model']).name}"
    if metrics.get("set") == EXTERNAL:
        title += " on an external set"
    return write_html(path, title, summary, tables, images, notes)


def _set_text(metrics: dict) -> str:
    if metrics.get("set") != EXTERNAL:
        return f"{metrics['set']} (split of {Path(metrics['data']).name})"
    text = "external: the data has no split column, every row was evaluated"
    overlap = metrics.get("model_test_split")
    if overlap:
        text += (
            f"; {overlap['in_test_split']} of {overlap['images']} images are in the model's own test split"
        )
    return text
