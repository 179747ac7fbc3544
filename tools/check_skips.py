"""Fail CI unless a pytest log shows a complete, green run that skipped only for the allowed reasons.

    pytest -q -rs | tee pytest.log; python tools/check_skips.py pytest.log

The log fails when:
- pytest's closing summary line ("N passed ... in Xs") is missing: the run crashed, was killed or cut short,
  or the log is not pytest's;
- that line counts any failed test or error (errors during collection included), or nothing passed;
- pytest reports the session interrupted (KeyboardInterrupt, "Interrupted: ... during collection");
- a test skipped for a reason other than the allowed ones (real TensorFlow not installed, the bundled
  model's test split without ../shared): a suite that skips its training tests goes green without a single
  optimiser step.

A green step before this one is not enough: ``pytest | tee`` reports tee's status unless the shell runs with
pipefail, and a skip is never a failure to pytest.
"""

from __future__ import annotations

import re
import sys

ALLOWED = (
    re.compile(r"tensorflow", re.IGNORECASE),
    # the bundled model's card check needs the exact test images, which only ../shared holds
    re.compile(r"shared X-ray data absent: the recorded test split is not here"),
)

# "12 passed, 2 skipped, 3 warnings in 41.20s (0:00:41)", with or without the ===== rule around it
SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in \d+(?:\.\d+)?s\b.*$")
COUNT = re.compile(r"(\d+) ([a-z]+)")
INTERRUPTED = re.compile(r"^!{3,}.*\b(Interrupted|KeyboardInterrupt)\b")


def unexpected_skips(log: str) -> list[str]:
    """``SKIPPED`` lines (from ``-rs``) whose reason is not one of ``ALLOWED``."""
    lines = [line for line in log.splitlines() if line.startswith("SKIPPED")]
    return [line for line in lines if not any(p.search(line) for p in ALLOWED)]


def summary_counts(log: str) -> dict[str, int] | None:
    """The counts of pytest's closing summary line (``{"passed": 12, "skipped": 2, ...}``), or None."""
    found = None
    for line in log.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            found = match.group(1)
    if found is None:
        return None
    counts: dict[str, int] = {}
    for number, word in COUNT.findall(found):
        key = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[key] = counts.get(key, 0) + int(number)
    return counts


def problems(log: str) -> list[str]:
    """Everything wrong with the run the log records; empty when it is green."""
    found = []
    counts = summary_counts(log)
    if counts is None:
        found.append("no pytest summary line ('N passed in Xs'): the run crashed, was cut short or never ran")
    else:
        if counts.get("failed", 0) or counts.get("errors", 0):
            found.append(f"{counts.get('failed', 0)} failed, {counts.get('errors', 0)} error(s)")
        if not counts.get("passed", 0):
            found.append("no test passed")
    if any(INTERRUPTED.match(line) for line in log.splitlines()):
        found.append("the pytest session was interrupted")
    bad = unexpected_skips(log)
    found += bad
    if bad:
        found.append(
            f"{len(bad)} unexpected skip(s): only the real-TensorFlow tests and the test-split check skip"
        )
    return found


def main(path: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            found = problems(f.read())
    except FileNotFoundError:
        found = [f"{path}: no such log (pytest did not run)"]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
