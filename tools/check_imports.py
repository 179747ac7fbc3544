"""Fail when cxrcae's modules import each other in a circle, or when the core hides imports in functions.

Every ``import`` statement counts, including those inside functions and ``if TYPE_CHECKING`` blocks, so a
cycle cannot be dodged by moving an import out of sight. ``from pkg import name`` is an edge to
``pkg.name`` when that is a module and to ``pkg`` (its ``__init__``) otherwise. Implicit parent-package
imports are not edges: a package's ``__init__`` re-exporting its own modules is the normal shape.

Imports inside functions are allowed only in ``cxrcae.cli`` (lazy, to keep ``--help`` fast) and in the
lazy re-export hook of ``cxrcae/__init__.py``; anywhere else they are reported too.

Usage: python tools/check_imports.py [SRC_DIR]   (exit 1 and a list of problems, or exit 0)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# where an import inside a function is a deliberate choice, not a hidden cycle
LAZY_ALLOWED = ("cxrcae.cli",)
# optional third-party packages imported where they are used (an extra may be missing)
OPTIONAL_THIRD_PARTY = {"kagglehub", "fastapi", "uvicorn", "pyarrow", "tensorflow", "onnxruntime"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect(root: Path) -> tuple[dict[str, Path], dict[str, set[str]], list[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}
    edges: dict[str, set[str]] = {name: set() for name in files}
    hidden: list[str] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if name in packages else name.rpartition(".")[0]
        for node, in_function in walk(tree):
            targets = import_targets(node, package, files)
            internal = [t for t in targets if t in files]
            edges[name].update(t for t in internal if t != name)
            if in_function and not name.startswith(LAZY_ALLOWED):
                external = {t.split(".")[0] for t in targets} - {"cxrcae"}
                if internal or (external - OPTIONAL_THIRD_PARTY):
                    hidden.append(f"{path}:{node.lineno}: import inside a function in {name}")
    return files, edges, hidden


def walk(tree: ast.AST):
    """Yield (import node, whether it sits inside a function body)."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function
            stack.append((child, inside))


def import_targets(node: ast.Import | ast.ImportFrom, package: str, files: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    out = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        out.append(candidate if candidate in files else base)
    return out


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "src"
    _, edges, hidden = collect(src)
    cycles = find_cycles(edges)
    for cycle in cycles:
        print("import cycle: " + " <-> ".join(cycle))
    for line in hidden:
        print(line)
    if cycles or hidden:
        print(f"{len(cycles)} import cycle(s), {len(hidden)} hidden import(s)")
        return 1
    print(f"no import cycles among {len(edges)} cxrcae modules; no hidden imports outside cxrcae.cli")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
