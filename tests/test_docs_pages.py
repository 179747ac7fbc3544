"""tools/docs_pages.py: the docs site's command pages come from the Typer app itself, so they say what
``--help`` says; a new command or module gets its page; help text that rich markup would swallow is caught."""

# no `from __future__ import annotations`: typer reads the tiny apps' Annotated hints at run time, and those
# refer to the enclosing function's variables
import importlib.util
import sys
from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("docs_pages", ROOT / "tools" / "docs_pages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pages = _load()


def test_every_command_has_its_page_in_help_order(cli):
    result = pages.command_pages(app)
    listed = cli("--help").output
    names = [next(iter(entry))[len("cxrcae ") :] for entry in result.nav]
    assert names and sorted(names) == sorted(p[len("commands/") : -3] for p in result.files)
    assert [n for n in names if f" {n} " in listed] == names  # `cxrcae --help` lists the same commands
    assert result.problems == []


def test_a_page_says_what_help_says():
    page = pages.command_pages(app).files["commands/split.md"]
    assert page.startswith("# cxrcae split\n")
    assert "Split DATA into train/val/test, stratified by class" in page
    assert "Usage: cxrcae split [OPTIONS]" in page
    assert "| `--ratios <str>` | Train,val,test fractions summing to 1 (paper: 73/13.5/13.5). " in page
    assert "\\[default: 0.73,0.135,0.135\\]" in page
    assert "| `-o, --out <path>` |" in page and "\\[required\\]" in page
    assert "Threads for pixel hashing. \\[default: (CPUs, max 8); x&gt;=1\\]" in page


def _tiny_app(workers_help: str, **option: object) -> typer.Typer:
    tiny = typer.Typer()

    @tiny.command("first")
    def first(workers: Annotated[int, typer.Option("--workers", help=workers_help, **option)] = 1) -> None:
        """Do the first thing."""

    @tiny.command("second")
    def second(path: Annotated[Path, typer.Argument(help="A <file> with *stars* | pipes.")]) -> None:
        """Do the second thing."""

    return tiny


def test_a_new_command_gets_a_page_and_markdown_is_escaped():
    result = pages.command_pages(_tiny_app("Threads."))
    assert set(result.files) == {"commands/first.md", "commands/second.md"}
    second = result.files["commands/second.md"]
    assert "Do the second thing." in second
    assert "A &lt;file&gt; with \\*stars\\* \\| pipes." in second


def test_help_that_rich_markup_would_swallow_is_reported():
    swallowed = pages.command_pages(_tiny_app("Threads [default: CPUs, max 8]."))
    assert any("--workers" in p and "[default: CPUs, max 8]" in p for p in swallowed.problems)
    fixed = pages.command_pages(_tiny_app("Threads.", show_default="CPUs, max 8"))
    assert fixed.problems == []


def test_api_pages_cover_the_package():
    src = ROOT / "src"
    result = pages.api_pages(src)
    assert result.problems == []
    assert "::: cxrcae.io" in result.files["api/io.md"]
    assert "::: cxrcae.eval.evaluation" in result.files["api/eval.md"]  # a package without __all__
    top = result.files["api/cxrcae.md"]
    assert "[`cxrcae.load_encoder`][cxrcae.hub.load_encoder]" in top  # linked where it is documented
    assert "::: cxrcae.pipeline.run_pipeline" in top  # documented here: no API page shows it


def test_a_top_level_module_must_be_api_or_internal(tmp_path):
    for package in ("cxrcae", "cxrcae/io", "cxrcae/newthing"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text('"""Doc."""\n')
    (tmp_path / "cxrcae" / "cli.py").write_text('"""Doc."""\n')
    problems = pages.unclassified_modules(tmp_path)
    assert len(problems) == 1 and "cxrcae.newthing" in problems[0]
