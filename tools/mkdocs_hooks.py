"""MkDocs hooks (``hooks:`` in mkdocs.yml): add the generated command and API pages, and fail a strict build
on what would otherwise go unseen.

- ``docs/commands/<name>.md`` for every command of the Typer app and ``docs/api/<module>.md`` for every
  API module are generated at build time by ``tools/docs_pages.py`` and put in the nav where mkdocs.yml
  has ``commands/index.md`` and ``api/index.md``;
- the ``<!-- commands -->`` marker of ``commands/index.md`` becomes the table of commands;
- a warning (an error under ``mkdocs build --strict``) for help text that rich markup would swallow, a
  top-level module that is neither API nor declared internal, and a public function, class or module on an
  API page without a docstring (mkdocstrings would leave it out silently).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import griffe
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
COMMANDS_MARKER = "<!-- commands -->"

log = logging.getLogger("mkdocs.hooks.cxrcae")


def _load_pages_module() -> Any:
    spec = importlib.util.spec_from_file_location("cxrcae_docs_pages", ROOT / "tools" / "docs_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pages = _load_pages_module()


def _app() -> Any:
    # the commands of the source being documented (mkdocstrings reads src/ too), not of an older install
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from cxrcae.cli.app import app

    return app


def _splice(nav: list[Any], index: str, entries: list[dict[str, str]]) -> bool:
    """Replace the nav entry pointing at ``index`` by a section: the index page, then ``entries``."""
    for i, item in enumerate(nav):
        title, target = next(iter(item.items())) if isinstance(item, dict) else (None, item)
        if target == index:
            nav[i] = {title or index: [index, *entries]}
            return True
        if isinstance(target, list) and _splice(target, index, entries):
            return True
    return False


def on_config(config: Any) -> Any:
    commands = pages.command_pages(_app())
    api = pages.api_pages(SRC)
    for problem in commands.problems + api.problems:
        log.warning(problem)
    nav = config.nav or []
    for index, section in (("commands/index.md", commands), ("api/index.md", api)):
        if not _splice(nav, index, section.nav):
            log.warning(f"mkdocs.yml nav has no entry for {index}: its generated pages would be unreachable")
    config["_cxrcae_generated"] = {**commands.files, **api.files}
    return config


def on_files(files: Files, config: Any) -> Files:
    for path, content in config["_cxrcae_generated"].items():
        if files.get_file_from_path(path) is not None:
            log.warning(f"docs/{path} is generated at build time; remove the hand-written copy")
            files.remove(files.get_file_from_path(path))
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri == "commands/index.md":
        if COMMANDS_MARKER not in markdown:
            log.warning(f"commands/index.md lost its {COMMANDS_MARKER} marker")
        return markdown.replace(COMMANDS_MARKER, pages.command_table(_app()))
    return markdown


def on_pre_build(config: Any) -> None:
    for problem in missing_docstrings():
        log.warning(problem)


def missing_docstrings() -> list[str]:
    """Public objects shown on the API pages that have no docstring."""
    package = griffe.load("cxrcae", search_paths=[str(SRC)], resolve_aliases=True, resolve_external=False)
    problems = []
    for path, with_members in pages.api_objects(SRC):
        try:
            obj = package[path.removeprefix("cxrcae.")] if path != "cxrcae" else package
        except KeyError:
            problems.append(f"{path}: on an API page but not found in src/")
            continue
        target = obj.final_target if obj.is_alias else obj
        if (target.is_function or target.is_class or target.is_module) and not target.docstring:
            problems.append(f"{path}: no docstring (API pages show only documented objects)")
        if with_members:
            exported = target.exports if target.is_module else None
            for name, member in target.members.items():
                if name.startswith("_") or member.is_alias or (exported is not None and name not in exported):
                    continue
                if (member.is_function or member.is_class) and not member.docstring:
                    problems.append(f"{member.path}: no docstring (API pages show only documented objects)")
    return problems
