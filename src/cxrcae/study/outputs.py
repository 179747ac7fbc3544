"""A study's files: ``<kind>.json`` (everything), ``<kind>.csv`` (one row per fraction x arm),
``comparisons.csv`` (one row per fraction x comparison x metric) and ``<kind>.png`` (the label-efficiency
curve), each written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cxrcae._atomic import atomic_open, atomic_write_bytes, atomic_write_text

ROW_FIELDS = ("recipe", "lr", "best_val_loss", "epochs_run")
HEADLINE = ("macro_auc", "dice")
SECOND = ("accuracy", "macro_ap")


def metric_names(points: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics the arms' test figures report (every arm of a study reports the same ones)."""
    for point in points:
        for arm in point["arms"].values():
            test = arm["test"]
            return [k for k in test if f"{k}_ci" in test]
    return []


def headline_metrics(points: Sequence[dict[str, Any]]) -> list[str]:
    """The one or two metrics a study's table and plot lead with: macro AUC (single- and multi-label) or
    mean Dice (masks), then accuracy or macro AP when reported."""
    reported = metric_names(points)
    first = [m for m in HEADLINE if m in reported][:1] or reported[:1]
    return first + [m for m in SECOND if m in reported][:1]


def arm_rows(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per fraction x arm: what ``<kind>.csv`` holds and the commands' tables show."""
    metrics = metric_names(points)
    rows = []
    for point in points:
        for name, arm in point["arms"].items():
            test = arm["test"]
            rows.append(
                {
                    "fraction": point["fraction"],
                    "train_images": point["train_images"],
                    "arm": name,
                    "mode": arm.get("mode"),
                    "encoder": arm.get("encoder"),
                    **{k: arm.get(k) for k in ROW_FIELDS},
                    "n": test["n"],
                    **{k: test[k] for k in metrics},
                    **{f"{k}_lo": (test[f"{k}_ci"] or [None, None])[0] for k in metrics},
                    **{f"{k}_hi": (test[f"{k}_ci"] or [None, None])[1] for k in metrics},
                }
            )
    return rows


def comparison_rows(
    points: Sequence[dict[str, Any]], names: tuple[str, str] = ("a", "b")
) -> list[dict[str, Any]]:
    """One row per fraction x comparison x metric: ``a - b`` with its paired 95% CI; ``names`` label the
    two figures' columns (and ``p_<a>_not_better``)."""
    a, b = names
    rows = []
    for point in points:
        for name, comp in point["comparisons"].items():
            for metric, m in comp.items():
                if not isinstance(m, dict):
                    continue
                rows.append(
                    {
                        "fraction": point["fraction"],
                        "comparison": name,
                        "metric": metric,
                        a: m["a"],
                        b: m["b"],
                        "difference": m["difference"],
                        "ci_lo": m["ci"][0],
                        "ci_hi": m["ci"][1],
                        f"p_{a}_not_better": m["p_a_not_better"],
                        "n": comp["n"],
                        "unit": comp["unit"],
                    }
                )
    return rows


def write_outputs(
    out: Path,
    kind: str,
    study: dict[str, Any],
    points: Sequence[dict[str, Any]],
    *,
    panels: Sequence[str],
    difference: str,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, str]:
    """The four files of a study in ``out``; ``study`` is the JSON body (``points`` and ``files`` are
    added). ``panels``: the metrics plotted per arm; ``difference``: the metric of the paired panel."""
    files = {
        "json": out / f"{kind}.json",
        "csv": out / f"{kind}.csv",
        "comparisons": out / "comparisons.csv",
        "plot": out / f"{kind}.png",
    }
    named = {k: str(v) for k, v in files.items()}
    body = {**study, "points": list(points), "files": named}
    atomic_write_text(files["json"], json.dumps(_clean(body), indent=2, default=str) + "\n")
    _write_csv(files["csv"], arm_rows(points))
    _write_csv(files["comparisons"], comparison_rows(points, names))
    efficiency_plot(points, files["plot"], panels=panels, difference=difference)
    return named


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------------------------- plot


def efficiency_plot(
    points: Sequence[dict[str, Any]], path: Path, *, panels: Sequence[str], difference: str
) -> Path:
    """Each of ``panels`` (a test metric with its 95% CI) per arm against the labelled fraction, and the
    paired ``difference`` of every comparison: the label-efficiency curve at a glance."""
    fractions = [p["fraction"] for p in points]
    arms = list(points[0]["arms"]) if points else []
    comparisons = list(points[0]["comparisons"]) if points else []
    fig = Figure(figsize=(4.7 * (len(panels) + 1), 4))
    axes = list(fig.subplots(1, len(panels) + 1))
    for ax, metric in zip(axes, panels, strict=False):
        for k, arm in enumerate(arms):
            tests = [p["arms"][arm]["test"] for p in points]
            _errorbar(
                ax, fractions, [t.get(metric) for t in tests], [t.get(f"{metric}_ci") for t in tests], arm, k
            )
        ax.set_title(f"test {metric.replace('_', ' ')}")
    ax = axes[-1]
    pairs = [name.split("-vs-") for name in comparisons]
    side = 1 if len({a for a, _ in pairs}) == 1 else 0  # colour by the arm that differs between the lines
    for name, pair in zip(comparisons, pairs, strict=True):
        k = arms.index(pair[side]) if pair[side] in arms else len(arms)
        comps = [p["comparisons"][name].get(difference) or {} for p in points]
        _errorbar(
            ax,
            fractions,
            [c.get("difference") for c in comps],
            [c.get("ci") for c in comps],
            name.replace("-vs-", " - "),
            k,
        )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_title(f"paired {difference.replace('_', ' ')} difference (95% CI)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("labelled fraction of the training images")
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _errorbar(ax, xs, values, cis, label: str, k: int) -> None:
    """Arm ``k`` in its own colour (``C<k>``) in every panel, shifted so that bars do not overlap."""
    shift = [x * (1 + 0.04 * (k - 1)) for x in xs]
    ys = [math.nan if v is None else float(v) for v in values]
    lo = [_half(y, c, 0) for y, c in zip(ys, cis, strict=True)]
    hi = [_half(y, c, 1) for y, c in zip(ys, cis, strict=True)]
    ax.errorbar(shift, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=label, color=f"C{k % 10}")


def _half(y: float, ci: Sequence[float | None] | None, side: int) -> float:
    """One side of an error bar; 0 where there is no interval."""
    if ci is None or ci[side] is None or math.isnan(y):
        return 0.0
    return abs(y - float(ci[side]))
