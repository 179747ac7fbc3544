"""The CLI as a whole: version, help without heavy imports, clean one-line errors."""

from __future__ import annotations

import subprocess
import sys

from cxrcae import __version__


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


def test_every_command_has_help(cli):
    import typer.main

    from cxrcae.cli import app

    group = typer.main.get_command(app)
    names = sorted(group.commands)
    assert "split" in names
    for name in names:
        result = cli(name, "--help")
        assert result.exit_code == 0, name
        assert "Usage" in result.output


def test_core_error_is_one_clean_line(cli, tmp_path):
    result = cli("split", tmp_path / "missing", "--out", tmp_path / "s.csv")
    assert result.exit_code == 1
    text = result.output.strip()
    assert text.startswith("Error:") and "Traceback" not in text and len(text.splitlines()) == 1


def test_usage_error_exits_2(cli):
    assert cli("split").exit_code == 2
    assert cli("no-such-command").exit_code == 2
