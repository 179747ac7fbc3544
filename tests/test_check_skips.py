"""tools/check_skips.py, the CI log checker: a green log passes, a failing, erroring, cut or over-skipping one
does not."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_skips.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_skips", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load()

GREEN = """\
........................................................................ [ 50%]
..............s.........................................................  [100%]
=========================== short test summary info ============================
SKIPPED [1] tests/test_keras_import.py:301: tensorflow not installed
140 passed, 1 skipped, 3 warnings in 41.20s
"""


def _log(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pytest.log"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_green_log_passes(tmp_path, capsys):
    assert check.problems(GREEN) == []
    assert check.main(_log(tmp_path, GREEN)) == 0
    assert capsys.readouterr().out == ""


def test_the_summary_line_is_parsed_with_or_without_its_rule():
    counts = check.summary_counts("=== 1 failed, 10 passed, 1 error in 2.31s (0:00:02) ===\n")
    assert counts == {"failed": 1, "passed": 10, "errors": 1}


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        # a failing test: tee made the step green, the checker must not
        ("..F.......\nFAILED tests/test_x.py::test_y - assert 0\n1 failed, 10 passed in 3.02s\n", "1 failed"),
        # an error (fixture or collection) counts as much as a failure
        ("..E\nERROR tests/test_x.py::test_y - RuntimeError\n5 passed, 1 error in 1.10s\n", "1 error"),
        (
            "ERROR tests/test_x.py - ImportError\n!!!! Interrupted: 1 error during collection !!!!\n"
            "1 error in 0.50s\n",
            "interrupted",
        ),
        # the run died or the log was cut before pytest's summary
        ("", "no pytest summary line"),
        (
            "........................................................................ [ 50%]\n....",
            "no pytest summary",
        ),
        ("Killed\n", "no pytest summary line"),
        # nothing ran
        ("no tests ran in 0.01s\n", "no pytest summary line"),
        ("3 deselected in 0.20s\n", "no test passed"),
        # a skip the suite does not allow (training tests silently off)
        (
            "SKIPPED [2] tests/test_train.py:40: no shared data\n120 passed, 2 skipped in 30.00s\n",
            "unexpected skip",
        ),
    ],
    ids=[
        "failed",
        "error",
        "collection-error",
        "empty",
        "truncated",
        "killed",
        "no-tests",
        "none-passed",
        "skip",
    ],
)
def test_a_bad_log_fails(tmp_path, capsys, log, expected):
    found = check.problems(log)
    assert any(expected in line for line in found), found
    assert check.main(_log(tmp_path, log)) == 1
    assert expected in capsys.readouterr().out


def test_the_allowed_skips_stay_allowed():
    log = (
        "SKIPPED [1] tests/test_keras_import.py:301: TensorFlow not installed\n"
        "SKIPPED [1] tests/test_bundled.py:50: "
        "shared X-ray data absent: the recorded test split is not here\n"
        "100 passed, 2 skipped in 9.00s\n"
    )
    assert check.problems(log) == []


def test_the_command_line_exit_code(tmp_path):
    bad = _log(tmp_path, "1 failed, 10 passed in 3.02s\n")
    run = subprocess.run([sys.executable, str(TOOL), bad], capture_output=True, text=True)
    assert run.returncode == 1 and "1 failed" in run.stdout
