"""Metrics per subgroup (source, view, sex, an age band, a site...): for whom does the model work?

A breakdown is named by a spec, ``--by`` on the command line:

- ``source``: one subgroup per value of a manifest column (any column, core or extra); images with no value
  form the ``(none)`` subgroup, so nothing is silently dropped;
- ``age:10``: a numeric column cut into bands of width 10 (``40-49``); ``age:18,65``: cut at those points
  (``<18``, ``18-64``, ``>=65``);
- ``source+view``: the crossing of several terms (``radiography-db / PA``).

Each subgroup gets the full metric set of its model's task (``Task.score``; for a classifier
``cxrcae.metrics.full_report``), with patient-grouped bootstrap intervals resampled within the subgroup, so
the intervals honestly widen where a subgroup is small. Small subgroups (fewer than ``SMALL_GROUP_N``
images, or, where the scores are per class, a class with fewer than ``FEW_CLASS_N`` images) are kept and
flagged, never hidden: an absent row reads as "fine" while a flagged one reads as "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrcae._parse import comma_list
from cxrcae.data.records import Record, record_columns
from cxrcae.errors import CxrcaeError, DataError, OptionError
from cxrcae.eval.report import MARKED_COLUMN
from cxrcae.metrics import fmt_ci, full_report

SMALL_GROUP_N = 30
"""A subgroup with fewer images is flagged: its intervals are wide and its point values unstable."""
FEW_CLASS_N = 5
"""A class with fewer images than this (but some) in a subgroup is flagged: its recall rests on a handful."""
MISSING = "(none)"
_SEP = " / "
Score = Callable[[np.ndarray, np.ndarray, "list[str | None] | None"], dict[str, Any]]
"""(targets, probabilities, patient ids or None) of one subgroup -> its metrics (``Task.score``)."""


@dataclass(frozen=True)
class Term:
    """One column of a spec, optionally cut into numeric bands (``width`` or ``cuts``)."""

    column: str
    width: float | None = None
    cuts: tuple[float, ...] = ()
    text: str = ""

    @property
    def banded(self) -> bool:
        return self.width is not None or bool(self.cuts)


@dataclass(frozen=True)
class GroupBy:
    """A parsed ``--by`` spec: ``COLUMN``, ``COLUMN:WIDTH``, ``COLUMN:CUT,CUT`` and ``+`` to cross them."""

    spec: str
    terms: tuple[Term, ...]

    @classmethod
    def parse(cls, spec: str) -> GroupBy:
        parts = [p.strip() for p in str(spec).split("+")]
        if not spec or not all(parts):
            raise CxrcaeError(f"--by {spec!r}: expected COLUMN, COLUMN:WIDTH, COLUMN:CUT,CUT or A+B")
        terms = tuple(_parse_term(p) for p in parts)
        return cls(spec="+".join(t.text for t in terms), terms=terms)

    @property
    def columns(self) -> list[str]:
        return [t.column for t in self.terms]


def _parse_term(text: str) -> Term:
    column, sep, arg = (s.strip() for s in text.partition(":"))
    if not column:
        raise CxrcaeError(f"--by {text!r}: no column name")
    if not sep:
        return Term(column, text=column)
    try:
        numbers = comma_list(arg, float, f"--by {text!r}")
    except OptionError:
        numbers = ()
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise CxrcaeError(f"--by {text!r}: after ':' give a band width (age:10) or cut points (age:18,65)")
    if "," in arg:
        if any(b <= a for a, b in zip(numbers, numbers[1:])):
            raise CxrcaeError(f"--by {text!r}: cut points must increase")
        return Term(column, cuts=tuple(numbers), text=f"{column}:{arg.replace(' ', '')}")
    if numbers[0] <= 0:
        raise CxrcaeError(f"--by {text!r}: a band width must be positive")
    return Term(column, width=numbers[0], text=f"{column}:{arg}")


def parse_specs(specs: Sequence[str]) -> list[GroupBy]:
    """Parse every spec; a spec given twice is kept once (same key in metrics.json)."""
    out: dict[str, GroupBy] = {}
    for spec in specs:
        by = GroupBy.parse(spec)
        out.setdefault(by.spec, by)
    return list(out.values())


def subgroup_labels(
    records: Sequence[Record], by: GroupBy, derived: Mapping[str, Sequence[str | None]] | None = None
) -> list[tuple[tuple, str]]:
    """(sort key, subgroup name) of each record under ``by``.

    ``derived`` adds columns computed by the caller (one value per record), such as ``in_model_test_split``.
    A column no record has a value in is an error naming the columns that do.
    """
    derived = dict(derived or {})
    per_term = [_term_labels(records, t, derived) for t in by.terms]
    return [
        (tuple(k for k, _ in labels), _SEP.join(name for _, name in labels))
        for labels in zip(*per_term, strict=True)
    ]


def _term_labels(
    records: Sequence[Record], term: Term, derived: Mapping[str, Sequence[str | None]]
) -> list[tuple[tuple, str]]:
    if term.column in derived:
        values = [v or None for v in derived[term.column]]
    else:
        values = [r.value(term.column) for r in records]
    if not any(v is not None for v in values):
        known = [*record_columns(records), *(c for c, v in derived.items() if any(v))]
        raise DataError(
            f"--by {term.text}: no image has a value in column {term.column!r} "
            f"(columns with values: {', '.join(known) or 'none'})"
        )
    if not term.banded:
        return [((1, "") if v is None else (0, v), MISSING if v is None else v) for v in values]
    numbers = [_number(v, term) for v in values]
    integral = all(x is None or float(x).is_integer() for x in numbers)
    return [((1, 0.0, ""), MISSING) if x is None else _band(x, term, integral) for x in numbers]


def _number(value: str | None, term: Term) -> float | None:
    if value is None or value.strip().lower() in ("", "na", "n/a", "nan", "?", "unknown"):
        return None
    try:
        x = float(value)
    except ValueError:
        raise DataError(f"--by {term.text}: {term.column} value {value!r} is not a number") from None
    return x if math.isfinite(x) else None


def _fmt(x: float) -> str:
    return f"{x:g}"


def _band(x: float, term: Term, integral: bool) -> tuple[tuple, str]:
    """(sort key, name) of the band holding x; bands are [lo, hi), named ``40-49`` when all values are
    integers and the edges too, else ``[40.5, 50.5)``."""
    if term.width is not None:
        lo = math.floor(x / term.width) * term.width
        return (0, lo, ""), _range(lo, lo + term.width, integral)
    cuts = term.cuts
    i = int(np.searchsorted(cuts, x, side="right"))
    if i == 0:
        return (0, -math.inf, ""), f"<{_fmt(cuts[0])}"
    if i == len(cuts):
        return (0, cuts[-1], ""), f">={_fmt(cuts[-1])}"
    return (0, cuts[i - 1], ""), _range(cuts[i - 1], cuts[i], integral)


def _range(lo: float, hi: float, integral: bool) -> str:
    if integral and float(lo).is_integer() and float(hi).is_integer():
        return f"{int(lo)}-{int(hi) - 1}"
    return f"[{_fmt(lo)}, {_fmt(hi)})"


# ---------------------------------------------------------------------------------------------------------
# Metrics per subgroup
# ---------------------------------------------------------------------------------------------------------


def subgroup_metrics(
    labels: Sequence[tuple[tuple, str]],
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str] = (),
    *,
    by: GroupBy,
    groups: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    min_n: int = SMALL_GROUP_N,
    min_class_n: int = FEW_CLASS_N,
    score: Score | None = None,
) -> dict[str, Any]:
    """One breakdown: ``{"by": [columns], "min_n", "min_class_n", "groups": {name: report}}``.

    ``labels`` are ``subgroup_labels`` of the evaluated images (aligned with ``y``/``probs``/``groups``).
    Each report is ``score`` of that subgroup (by default ``full_report`` over ``class_names``: bootstrap
    over its own patients) without reliability bins or class names, plus ``small`` (bool) and ``flags``
    (why it is marked).
    """
    if score is None:

        def score(targets: np.ndarray, p: np.ndarray, units: list[str | None] | None) -> dict[str, Any]:
            return full_report(
                targets, p, class_names, groups=units, n_resamples=n_resamples, seed=seed, n_bins=n_bins
            )

    names = [name for _, name in labels]
    order = sorted({(key, name) for key, name in labels})
    out: dict[str, Any] = {}
    for _, name in order:
        idx = np.flatnonzero(np.array([n == name for n in names]))
        report = score(y[idx], probs[idx], None if groups is None else [groups[i] for i in idx])
        report.setdefault("n", len(idx))
        if isinstance(report.get("calibration"), dict):
            report["calibration"].pop("bins", None)
        report.pop("class_names", None)
        report["flags"] = _flags(report, min_n, min_class_n)
        report["small"] = bool(report["flags"])
        out[name] = report
    return {"by": by.columns, "min_n": min_n, "min_class_n": min_class_n, "groups": out}


def _per_class(report: dict) -> dict[str, Any]:
    """The per-class block of a report that has one with supports (classification), else empty."""
    per_class = report.get("per_class")
    if isinstance(per_class, dict) and all(
        isinstance(v, dict) and "support" in v for v in per_class.values()
    ):
        return per_class
    return {}


def _flags(report: dict, min_n: int, min_class_n: int) -> list[str]:
    flags = []
    if report["n"] < min_n:
        flags.append(f"n={report['n']} < {min_n}")
    for c, values in _per_class(report).items():
        support = values["support"]
        if 0 < support < min_class_n:
            flags.append(f"{c}: {support} < {min_class_n}")
    return flags


def subgroup_table(
    breakdown: dict,
    class_names: Sequence[str],
    title: str = "subgroup",
    metric_rows: Callable[[dict], tuple[list[str], list[list[str]]]] | None = None,
) -> tuple[list, list]:
    """(columns, rows): per subgroup its n (and per class), accuracy, macro recall and AUC, per-class
    recall, each with its 95% CI, and a ``marked`` column saying why a small subgroup is flagged. Scores
    that are not per class (another task's) get n and the summary row of their task's table
    (``metric_rows``: its ``macro`` or ``mean`` row, else its last) instead."""
    reports = list(breakdown["groups"].values())
    if not all(_per_class(m) and "accuracy" in m and "macro" in m for m in reports):
        return _task_table(breakdown, title, metric_rows)
    columns = [title, "n", *(f"n {c}" for c in class_names), "accuracy", "macro recall", "macro AUC"]
    columns += [f"recall {c}" for c in class_names] + [MARKED_COLUMN]
    rows = []
    for name, m in breakdown["groups"].items():
        ci = m.get("ci") or {}
        per_class_ci = ci.get("per_class") or {}
        rows.append(
            [
                name,
                str(m["n"]),
                *(str(m["per_class"][c]["support"]) for c in class_names),
                fmt_ci(m["accuracy"], ci.get("accuracy")),
                fmt_ci(m["macro"]["recall"], (ci.get("macro") or {}).get("recall")),
                fmt_ci(m["macro"]["auc"], (ci.get("macro") or {}).get("auc")),
                *(
                    fmt_ci(m["per_class"][c]["recall"], (per_class_ci.get(c) or {}).get("recall"))
                    for c in class_names
                ),
                _marked(m, breakdown.get("min_n", SMALL_GROUP_N), breakdown.get("min_class_n", FEW_CLASS_N)),
            ]
        )
    return columns, rows


_SUMMARY_ROWS = ("macro", "mean")


def _task_table(
    breakdown: dict, title: str, metric_rows: Callable[[dict], tuple[list[str], list[list[str]]]] | None
) -> tuple[list, list]:
    rows, headers = [], ["metrics"]
    for name, m in breakdown["groups"].items():
        marked = _marked(m, breakdown.get("min_n", SMALL_GROUP_N), breakdown.get("min_class_n", FEW_CLASS_N))
        cells: list[str] = []
        if metric_rows is not None:
            headers, table = metric_rows(m)
            chosen = next((r for r in table if str(r[0]) in _SUMMARY_ROWS), table[-1] if table else [])
            cells = [str(c) for c in chosen[1:]]
            headers = [f"{chosen[0]} {h}" if chosen else h for h in headers[1:]]
        rows.append([name, str(m["n"]), *cells, marked])
    return [title, "n", *(headers if metric_rows is not None else []), MARKED_COLUMN], rows


def _marked(report: dict, min_n: int, min_class_n: int) -> str:
    """The flags in a table cell's few words: ``n<30; <5: COVID, NORMAL``."""
    parts = [f"n<{min_n}"] if report["n"] < min_n else []
    few = [c for c, v in _per_class(report).items() if 0 < v["support"] < min_class_n]
    if few:
        parts.append(f"<{min_class_n}: {', '.join(few)}")
    return "; ".join(parts)
