"""Evaluate a fine-tuned classifier on a labelled split: metrics with 95% CIs, calibration, per-source view.

``evaluate(model, data, split="test")`` runs the model over the split (streamed, a bad file is an error row
excluded from the metrics), computes the paper's metrics per class and macro/weighted with patient-level
bootstrap intervals, the expected calibration error, a per-source breakdown (shortcut learning across
sources is the known failure of COVID X-ray models), and writes ``metrics.json``, ``predictions.csv``, PNG
figures and ``report.html`` into ``MODEL_DIR/eval-<split>`` (or ``out_dir``).

With ``calibrate=True`` a temperature is first fitted on the ``val`` split and stored in the model's
config.json; the test metrics then use it, and the uncalibrated ECE is reported alongside.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cxrcae._atomic import atomic_open, atomic_write_text
from cxrcae.data import dataset_fingerprint, load_records
from cxrcae.data.records import check_labels, select_records
from cxrcae.errors import DataError
from cxrcae.eval import report
from cxrcae.eval.calibration import fit_and_store, model_temperature, softmax
from cxrcae.eval.metrics import expected_calibration_error, full_report
from cxrcae.eval.report import fmt_ci, write_html
from cxrcae.hub.resolve import in_hub_cache, resolve_checkpoint
from cxrcae.infer.batches import collect_logits, load_for_inference
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

    def source_table(self) -> tuple[list[str], list[list[str]]] | None:
        return source_table(self.metrics.get("per_source"), self.class_names)

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"EvaluationResult(split={m['split']!r}, n={m['n']}, accuracy={m['accuracy']:.4f}, "
            f"macro_f1={m['macro']['f1']:.4f}, out_dir={str(self.out_dir)!r})"
        )


METRIC_COLUMNS = ("precision", "recall", "specificity", "f1", "auc")


def metrics_table(metrics: dict) -> tuple[list[str], list[list[str]]]:

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


def source_table(
    per_source: dict | None, class_names: Sequence[str]
) -> tuple[list[str], list[list[str]]] | None:

    if not per_source:
        return None
    columns = ["source", "n", *(f"n {c}" for c in class_names), "accuracy", "macro recall", "macro AUC"]
    columns += [f"recall {c}" for c in class_names]
    rows = []
    for source, m in per_source.items():
        ci = m.get("ci") or {}
        rows.append(
            [
                source,
                str(m["n"]),
                *(str(m["per_class"][c]["support"]) for c in class_names),
                fmt_ci(m["accuracy"], ci.get("accuracy")),
                fmt_ci(m["macro"]["recall"], ci.get("macro", {}).get("recall")),
                fmt_ci(m["macro"]["auc"], ci.get("macro", {}).get("auc")),
                *(fmt_ci(m["per_class"][c]["recall"]) for c in class_names),
            ]
        )
    return columns, rows


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
    html: bool = True,
    write: bool = True,
    progress: ProgressFn = no_progress,
) -> EvaluationResult:
    """Evaluate a classifier checkpoint (folder, Hub id or ``load_model`` object) on ``data``.

    ``data`` is a splits CSV (its ``split`` rows are used), or a class folder / manifest (all rows; the
    result says so). ``n_bootstrap`` resamples (patients when the data has patient ids) give 95% CIs; 0
    turns them off. ``write=False`` computes without touching the disk.
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
    metrics["per_source"] = _per_source(kept, y, probs, names, n_bootstrap, seed, n_bins)
    metrics.update(
        {
            "model": str(folder) if folder else "(in-memory model)",
            "data": str(data),
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
    rows = _prediction_rows(chosen, ok, errors, probs, names)
    out = None
    files: dict[str, Path] = {}
    if write:
        out = Path(out_dir).expanduser() if out_dir else _default_out(folder, used_split)
        files = _write_outputs(out, metrics, rows, y, probs, names, html)
    return EvaluationResult(metrics=_clean(metrics), predictions=rows, out_dir=out, files=files, notes=notes)


def _local_folder(model_ref: Any) -> Path | None:

    if isinstance(model_ref, nn.Module):
        return None
    return resolve_checkpoint(model_ref)


def _default_out(folder: Path | None, split: str | None) -> Path:
    name = f"eval-{split or 'all'}"
    if folder is None:
        return Path.cwd() / name
    if not os.access(folder, os.W_OK) or in_hub_cache(folder):
        return Path.cwd() / f"{folder.name}-{name}"  # a Hub download lives in the read-only cache
    return folder / name


def _per_source(kept, y, probs, names, n_bootstrap, seed, n_bins) -> dict[str, Any]:
    """Metrics per ``source`` (when the data has one): the shortcut-learning check."""

    sources = [r.source for r in kept]
    if not any(sources):
        return {}
    out = {}
    for source in sorted({s or "(none)" for s in sources}):
        mask = np.array([(s or "(none)") == source for s in sources])
        report = full_report(
            y[mask],
            probs[mask],
            names,
            groups=[kept[i].patient_id for i in np.flatnonzero(mask)],
            n_resamples=n_bootstrap,
            seed=seed,
            n_bins=n_bins,
        )
        report["calibration"].pop("bins", None)
        report.pop("class_names", None)
        out[source] = report
    return out


def _prediction_rows(chosen, ok, errors, probs, names) -> list[dict[str, Any]]:
    by_index = {i: row for row, i in enumerate(ok)}
    reasons = {i: reason for i, _, reason in errors}
    rows = []
    for i, r in enumerate(chosen):
        row: dict[str, Any] = {
            "path": str(r.path),
            "label": r.label,
            "patient_id": r.patient_id or "",
            "source": r.source or "",
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
        ("data", f"{metrics['data']} (split: {metrics['split'] or 'all rows'})"),
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
    sources = source_table(metrics.get("per_source"), metrics["class_names"])
    if sources:
        tables.append(("Per source", *sources))
    return write_html(
        path, f"cxrcae evaluation: {Path(metrics['model']).name}", summary, tables, images, metrics["notes"]
    )
