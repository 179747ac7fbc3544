"""Evaluate a fine-tuned classifier on a labelled split: metrics with 95% CIs, calibration, subgroups.

``evaluate(model, data, split="test")`` runs the model over the split (streamed, a bad file is an error row
excluded from the metrics), computes the paper's metrics per class and macro/weighted with patient-level
bootstrap intervals, the expected calibration error, and per-subgroup metrics for each ``by`` spec
(``cxrcae.eval.subgroups``; by default per ``source``, because shortcut learning across sources is the
known failure of COVID X-ray models). It writes ``metrics.json``, ``predictions.csv``, PNG figures and
``report.html`` into ``MODEL_DIR/eval-<split>`` (or ``out_dir``).

Data without a split column (a manifest, a class folder) is evaluated whole as an **external** set and every
output says so (``"set": "external"``). When the model folder lists its own held-out images
(``test_split.csv`` with sha256, as the bundled model does), the images are matched against it by content,
so an "external" evaluation that is really run on the model's training images is called out, and
``--by in_model_test_split`` separates the two.

With ``calibrate=True`` a temperature is first fitted on the ``val`` split and stored in the model's
config.json; the test metrics then use it, and the uncalibrated ECE is reported alongside.
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
from torch import nn

from cxrcae._atomic import atomic_open, atomic_write_text
from cxrcae.data import dataset_fingerprint, load_records
from cxrcae.data.records import Record, check_labels, select_records
from cxrcae.errors import DataError
from cxrcae.eval import report
from cxrcae.eval.calibration import fit_and_store
from cxrcae.eval.report import fmt_ci, write_html
from cxrcae.eval.subgroups import (
    FEW_CLASS_N,
    SMALL_GROUP_N,
    GroupBy,
    parse_specs,
    subgroup_labels,
    subgroup_metrics,
    subgroup_table,
)
from cxrcae.hub.resolve import in_hub_cache, resolve_checkpoint
from cxrcae.infer.batches import collect_logits, load_for_inference
from cxrcae.io import hash_files
from cxrcae.locking import hold
from cxrcae.metrics import expected_calibration_error, full_report, softmax
from cxrcae.models.checkpoint import model_temperature
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import precision_name, resolve_device, resolve_precision


@dataclass
class EvaluationResult:
    """What ``evaluate`` measured; ``metrics`` is exactly what ``metrics.json`` holds."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    out_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return list(self.metrics["class_names"])

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(columns, rows): per class, then macro and weighted, each value with its 95% CI."""
        return metrics_table(self.metrics)

    def subgroup_tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """(title, columns, rows) per ``by`` breakdown, in the order asked."""
        return subgroup_tables(self.metrics)

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"EvaluationResult(set={m['set']!r}, n={m['n']}, accuracy={m['accuracy']:.4f}, "
            f"macro_f1={m['macro']['f1']:.4f}, out_dir={str(self.out_dir)!r})"
        )


METRIC_COLUMNS = ("precision", "recall", "specificity", "f1", "auc")
EXTERNAL = "external"
"""The ``set`` of data without a split column: evaluated whole, not a held-out split of a training run."""
MODEL_TEST_SPLIT = "test_split.csv"
"""A model folder's list of its own held-out test images (path, label, ..., sha256 of the file)."""
IN_MODEL_TEST = "in_model_test_split"
"""Derived column (yes/no) on an external set when the model lists its test images: usable with ``by``."""


def metrics_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the per-class, macro and weighted table, each value with its interval."""
    ci = metrics.get("ci") or {}
    columns = ["class", "n", "precision", "recall (sens.)", "specificity", "F1", "ROC AUC"]
    rows = []
    for name, values in metrics["per_class"].items():
        cis = (ci.get("per_class") or {}).get(name, {})
        rows.append([name, str(values["support"]), *(fmt_ci(values[m], cis.get(m)) for m in METRIC_COLUMNS)])
    for kind in ("macro", "weighted"):
        cis = ci.get(kind, {})
        rows.append(
            [
                f"{kind} avg",
                str(metrics["n"]),
                *(fmt_ci(metrics[kind][m], cis.get(m)) for m in METRIC_COLUMNS),
            ]
        )
    return columns, rows


def subgroup_tables(metrics: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """One (title, columns, rows) table per ``--by`` breakdown in ``metrics``."""
    names = metrics["class_names"]
    tables = []
    for spec, breakdown in (metrics.get("subgroups") or {}).items():
        title = f"By {spec}" + (" (shortcut check)" if spec == "source" else "")
        tables.append((title, *subgroup_table(breakdown, names, spec)))
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
    n_bins: int = 15,
    calibrate: bool = False,
    by: Sequence[str] | None = None,
    html: bool = True,
    write: bool = True,
    progress: ProgressFn = no_progress,
) -> EvaluationResult:
    """Evaluate a classifier checkpoint (folder, Hub id or ``load_model`` object) on ``data``.

    ``data`` is a splits CSV (its ``split`` rows are used), or a class folder / manifest (all rows, as an
    external set; the result says so). ``n_bootstrap`` resamples (patients when the data has patient ids)
    give 95% CIs; 0 turns them off. ``by`` lists subgroup specs (``"source"``, ``"view"``, ``"age:10"``,
    ``"source+view"``; see ``cxrcae.eval.subgroups``); None means per source when the data has sources, an
    empty list no breakdown. ``write=False`` computes without touching the disk.
    """

    dev = resolve_device(device)
    folder = _local_folder(model_ref)
    net, config = load_for_inference(folder or model_ref, dev, kind="classifier")
    dtype = resolve_precision(precision, dev)
    names = list(config["class_names"])
    records = load_records(data, labeled=True)
    chosen, used_split, notes = select_records(records, split, data)
    chosen, label_notes = check_labels(chosen, names, data)
    notes += label_notes
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
            net,
            config,
            folder,
            records,
            data,
            dev,
            dtype,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
        config["temperature"] = calibration_info["temperature"]
    temperature = model_temperature(config)

    paths = [str(r.path) for r in chosen]
    logits, ok, errors = collect_logits(
        net,
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
    index = {n: i for i, n in enumerate(names)}
    kept = [chosen[i] for i in ok]
    y = np.array([index[r.label] for r in kept])
    probs = softmax(logits, temperature)
    groups = [r.patient_id for r in kept]

    metrics = full_report(y, probs, names, groups=groups, n_resamples=n_bootstrap, seed=seed, n_bins=n_bins)
    metrics["calibration"]["temperature"] = temperature
    if temperature != 1.0:
        metrics["calibration"]["ece_uncalibrated"] = expected_calibration_error(y, softmax(logits), n_bins)
    if calibration_info:
        metrics["calibration"]["fit"] = calibration_info
    metrics["subgroups"] = {
        b.spec: subgroup_metrics(
            [labels[b.spec][i] for i in ok],
            y,
            probs,
            names,
            by=b,
            groups=groups,
            n_resamples=n_bootstrap,
            seed=seed,
            n_bins=n_bins,
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
    rows = _prediction_rows(chosen, ok, errors, probs, names, set_name, columns)
    out = None
    files: dict[str, Path] = {}
    if write:
        out = Path(out_dir).expanduser() if out_dir else _default_out(folder, set_name)
        with nullcontext() if out_dir else hold(out, folder=True):  # a given out_dir: held by _one_writer
            files = _write_outputs(out, metrics, rows, y, probs, names, html)
    return EvaluationResult(metrics=_clean(metrics), predictions=rows, out_dir=out, files=files, notes=notes)


def _local_folder(model_ref: Any) -> Path | None:

    if isinstance(model_ref, nn.Module):
        return None
    return resolve_checkpoint(model_ref)


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


def _prediction_rows(chosen, ok, errors, probs, names, set_name, columns) -> list[dict[str, Any]]:
    """One row per image (unreadable ones too): ``set``, then each subgroup column the ``by`` specs made."""
    by_index = {i: row for row, i in enumerate(ok)}
    reasons = {i: reason for i, _, reason in errors}
    rows = []
    for i, r in enumerate(chosen):
        row: dict[str, Any] = {
            "path": str(r.path),
            "label": r.label,
            "patient_id": r.patient_id or "",
            "source": r.source or "",
            "set": set_name,
            **{c: values[i] or "" for c, values in columns.items()},
        }
        if i in by_index:
            p = probs[by_index[i]]
            pred = names[int(p.argmax())]
            row.update(
                status="ok", predicted=pred, correct=pred == r.label, confidence=float(p.max()), reason=""
            )
            row.update({f"prob_{n}": float(p[c]) for c, n in enumerate(names)})
        else:
            row.update(status="error", predicted="", correct="", confidence="", reason=reasons.get(i, ""))
            row.update({f"prob_{n}": "" for n in names})
        rows.append(row)
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


def _write_outputs(out: Path, metrics, rows, y, probs, names, html: bool) -> dict[str, Path]:

    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(metrics)
    files = {
        "metrics": out / "metrics.json",
        "predictions": _write_csv(out / "predictions.csv", rows),
        "confusion_matrix": report.plot_confusion(
            metrics["confusion_matrix"], names, out / "confusion_matrix.png"
        ),
        "confusion_matrix_normalized": report.plot_confusion(
            metrics["confusion_matrix"], names, out / "confusion_matrix_normalized.png", normalize=True
        ),
    }
    ci = metrics.get("ci", {}).get("per_class", {})
    aucs = {n: report.fmt_ci(metrics["per_class"][n]["auc"], ci.get(n, {}).get("auc")) for n in names}
    files["roc_curves"] = report.plot_roc(y, probs, names, aucs, out / "roc_curves.png")
    cal = metrics["calibration"]
    extra = f", T={cal['temperature']:.2f}" if cal.get("temperature", 1.0) != 1.0 else ""
    files["reliability_diagram"] = report.plot_reliability(
        cal["bins"], cal["ece"], out / "reliability_diagram.png", extra
    )
    atomic_write_text(files["metrics"], json.dumps(clean, indent=2, allow_nan=False) + "\n")
    if html:
        files["report"] = _write_html(
            out / "report.html", clean, [p for k, p in files.items() if p.suffix == ".png"]
        )
    return files


def _write_html(path: Path, metrics: dict, images: list[Path]) -> Path:

    ci = metrics.get("ci") or {}
    cal = metrics["calibration"]
    summary = [
        ("model", metrics["model"]),
        ("data", f"{metrics['data']} ({describe_set(metrics)})"),
        ("set", _set_text(metrics)),
        ("images", f"{metrics['n']} evaluated, {metrics['n_errors']} unreadable"),
        ("accuracy", fmt_ci(metrics["accuracy"], ci.get("accuracy"))),
        ("ECE", fmt_ci(cal["ece"], ci.get("ece"))),
        ("temperature", f"{cal.get('temperature', 1.0):.3f}"),
        (
            "bootstrap",
            f"{ci.get('n_resamples', 0)} resamples of {ci.get('unit', '-')}s (seed {ci.get('seed', '-')})",
        ),
    ]
    tables = [("Metrics (95% CI)", *metrics_table(metrics))]
    tables += subgroup_tables(metrics)
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
