"""Evaluation figures (confusion matrices, ROC curves, reliability diagram) and a single-file HTML report.

Figures use matplotlib's object API (``Figure``, no pyplot), so nothing global is switched and no display
is needed. The HTML report embeds the PNGs as base64 and the tables as plain HTML: one file to attach to an
email or a lab notebook.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from cxrcae._atomic import atomic_write_bytes, atomic_write_text


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_confusion(
    cm: Sequence[Sequence[int]], names: Sequence[str], path: Path, normalize: bool = False
) -> Path:
    """Counts, or rows normalised to recall per true class (so imbalanced classes read alike)."""

    counts = np.asarray(cm, dtype=np.float64)
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    else:
        values = counts
    k = len(names)
    fig = Figure(figsize=(1.2 * k + 2.5, 1.1 * k + 2))
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    threshold = (1 if normalize else max(values.max(), 1)) / 2
    for i in range(k):
        for j in range(k):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
            color = "white" if values[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=10)
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)")
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, names: Sequence[str], aucs: dict, path: Path) -> Path:
    """One-vs-rest ROC curve per class with its AUC (and CI when given) in the legend."""

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    y = np.asarray(y_true)
    for c, name in enumerate(names):
        positive = y == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name}: AUC {aucs.get(name, '')}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC, one class vs rest")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(bins: dict, ece: float, path: Path, title_extra: str = "") -> Path:
    """Accuracy vs confidence per bin (bars) against the diagonal, with the count histogram underneath."""

    edges = np.asarray(bins["edges"])
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    acc = np.asarray(bins["accuracy"], dtype=np.float64)
    conf = np.asarray(bins["confidence"], dtype=np.float64)
    count = np.asarray(bins["count"])
    fig = Figure(figsize=(5, 6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    ax.bar(centers[filled], acc[filled], width=width * 0.95, color="tab:blue", label="accuracy")
    ax.bar(
        centers[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width * 0.95,
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.3f}){title_extra}")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, count, width=width * 0.95, color="0.5")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence (top-class probability)")
    hist.set_ylabel("images")
    return _save(fig, path)


MARKED_COLUMN = "marked"
"""A table column of this name says why a row is to be read with care (a small subgroup); such rows are
shaded in the HTML report, so they stay visible but do not read like the others."""


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    flag = list(columns).index(MARKED_COLUMN) if MARKED_COLUMN in columns else None
    body = "".join(
        ("<tr class='marked'>" if flag is not None and r[flag] else "<tr>")
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(
    path: Path,
    title: str,
    summary: Sequence[tuple[str, str]],
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
    images: Sequence[Path],
    notes: Sequence[str] = (),
) -> Path:
    """A self-contained HTML page: key/value summary, tables, notes, and the PNGs inlined as base64."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:48%;margin:0.5%;border:1px solid #eee}.notes li{color:#8a5a00}"
        "tr.marked td{background:#fff4dc;color:#6b4a00}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _table(["", ""], summary),
    ]
    if notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for caption, columns, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>" + _table(columns, rows))
    parts.append("<h2>Figures</h2>")
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode("ascii")
        parts.append(f"<img alt='{html.escape(Path(img).stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path
