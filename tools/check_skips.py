"""Fail CI when a test skipped for a reason other than the allowed ones (real TensorFlow not installed,
the bundled model's test split without ../shared).

    pytest -q -rs | tee pytest.log && python tools/check_skips.py pytest.log

Why: a suite that skips its training tests goes green without a single optimiser step.
"""

from __future__ import annotations

import re
import sys

ALLOWED = (
    re.compile(r"tensorflow", re.IGNORECASE),
    # the bundled model's card check needs the exact test images, which only ../shared holds
    re.compile(r"shared X-ray data absent: the recorded test split is not here"),
)


def unexpected_skips(log: str) -> list[str]:
    lines = [line for line in log.splitlines() if line.startswith("SKIPPED")]
    return [line for line in lines if not any(p.search(line) for p in ALLOWED)]


def main(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        bad = unexpected_skips(f.read())
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} unexpected skip(s): only the real-TensorFlow tests may skip")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
