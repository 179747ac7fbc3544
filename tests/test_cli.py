"""The CLI as a whole: version, help without heavy imports, clean one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxrcae import __version__
from cxrcae.cli.common import comma_list
from cxrcae.errors import OptionError


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"cxrcae {__version__}"


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "cxrcae", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"cxrcae {__version__}"


def test_help_imports_no_heavy_libraries():
    """`cxrcae --help` stays fast because no command imports torch & co. at module level."""
    code = (
        "import sys; from cxrcae.cli import app; import cxrcae;"
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'sklearn', 'matplotlib', 'pydicom', 'h5py')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_command_and_option_documents_itself(cli):
    """Each command's --help renders, opens with its docstring and explains every argument and option."""
    import typer.main

    from cxrcae.cli import app

    group = typer.main.get_command(app)
    assert {"split", "predict", "evaluate", "finetune"} <= set(group.commands)
    for name, command in sorted(group.commands.items()):
        undocumented = [p.name for p in command.params if not getattr(p, "help", None)]
        assert not undocumented, f"{name}: no help for {undocumented}"
        result = cli(name, "--help")
        assert result.exit_code == 0, name
        shown = " ".join(result.output.split())  # rich wraps long lines
        assert shown.startswith(f"Usage: cxrcae {name} "), name
        assert " ".join(command.help.split())[:60] in shown, name


def test_core_error_is_one_clean_line(cli, tmp_path):
    result = cli("split", tmp_path / "missing", "--out", tmp_path / "s.csv")
    assert result.exit_code == 1
    text = result.output.strip()
    assert text.startswith("Error:") and "Traceback" not in text and len(text.splitlines()) == 1


def test_usage_error_exits_2(cli):
    assert cli("split").exit_code == 2
    assert cli("no-such-command").exit_code == 2


def test_comma_list_strips_drops_empties_converts_and_names_the_bad_item():
    assert comma_list(" 0.05, 0.25,,1 ", float, "--fractions") == (0.05, 0.25, 1.0)
    assert comma_list("head, all,", what="--stages") == ("head", "all")
    assert comma_list(" , ") == ()
    with pytest.raises(OptionError, match=r"^--fractions: 'x' is not a number$"):
        comma_list("0.5, x", float, "--fractions")
    with pytest.raises(OptionError, match=r"^--tasks: unknown 'fly'; use walk, run$"):
        comma_list("walk,fly", what="--tasks", choices=("walk", "run"))
    assert OptionError("").exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ablate", ".", "--out", "o", "--fractions", "0.5,half"), "--fractions: 'half' is not a number"),
        (("ablate", ".", "--out", "o", "--plain-lrs", "1e-3,,fast"), "--plain-lrs: 'fast' is not a number"),
        (("split", ".", "--out", "s.csv", "--ratios", "0.8,x,0.1"), "--ratios: 'x' is not a number"),
        (("bench", "--tasks", "pretrain,fly"), "--tasks: unknown 'fly'"),
        (("bench", "--settings", "fp32:nchw,FP8:nhwc"), "--settings: unknown 'fp8:nhwc'"),
    ],
)
def test_a_bad_list_item_is_a_one_line_usage_error(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("Error:") and message in text and len(text.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
