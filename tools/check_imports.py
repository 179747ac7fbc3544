"""Fail when cxrcae's modules import each other in a circle, when a lower package imports a higher one, or
when the core hides imports in functions.

Every ``import`` statement counts, including those inside functions and ``if TYPE_CHECKING`` blocks, so a
cycle or a back edge cannot be dodged by moving an import out of sight. ``from pkg import name`` is an edge
to ``pkg.name`` when that is a module and to ``pkg`` (its ``__init__``) otherwise. Implicit parent-package
imports are not edges: a package's ``__init__`` re-exporting its own modules is the normal shape.

Package order: ``ORDER`` lists cxrcae's packages (and top-level modules) lowest first. A module may import
its own package and anything on a lower line, never a higher line (a back edge) and never another package of
its own line (peers stay independent), except on the base line, whose small modules import one another (the
cycle check keeps them acyclic). A package or top-level module missing from ``ORDER`` is reported too, so a
new one has to be placed. One exemption: the public facade ``cxrcae/__init__.py`` re-exports the top-level
API (``cxrcae.predict``, ``cxrcae.evaluate``, ...) lazily, so its ``__getattr__`` hook and its
``if TYPE_CHECKING`` names may reach up; what it imports when loaded is checked like everything else.

Imports inside functions are allowed only in ``cxrcae.cli`` (lazy, to keep ``--help`` fast) and in the module
``__getattr__`` hooks listed in ``LAZY_HOOKS`` (lazy re-exports that keep torch out of a light import);
anywhere else they are reported too. Optional third-party packages (an extra may be missing) may be imported
where they are used.

Usage: python tools/check_imports.py [SRC_DIR]   (exit 1 and a list of problems, or exit 0)
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT_PACKAGE = "cxrcae"
# cxrcae's packages and top-level modules, lowest first; "cxrcae" is cxrcae/__init__.py. The first line is
# the base: small helpers every layer may use (they import one another). study (the machinery of transfer
# and ablate) sits below ablation, its preset; __main__ (``python -m cxrcae``) starts the CLI, so it is
# above it.
ORDER: tuple[tuple[str, ...], ...] = (
    (
        "cxrcae",
        "errors",
        "_atomic",
        "progress",
        "locking",
        "allocator",
        "bundled",
        "paths",
        "runtime",
        "_timm_hook",
        "_parse",
    ),
    ("io",),
    ("data",),
    ("fetch",),
    ("metrics",),
    ("models",),
    ("tasks",),
    ("hub",),
    ("ood",),
    ("train",),
    ("infer",),
    ("eval",),
    ("pipeline",),
    ("study",),
    ("ablation", "bench", "serve"),
    ("cli",),
    ("__main__",),
)
# where an import inside a function is a deliberate choice, not a hidden cycle
LAZY_ALLOWED = ("cxrcae.cli",)
# modules whose module-level ``__getattr__`` may import lazily (a light import stays torch-free)
LAZY_HOOKS = {"cxrcae", "cxrcae.data"}
# the public facade: its lazy hook and TYPE_CHECKING names re-export the API from above
FACADE = "cxrcae"
# optional third-party packages imported where they are used (an extra may be missing)
OPTIONAL_THIRD_PARTY = {"kagglehub", "fastapi", "uvicorn", "pyarrow", "tensorflow", "onnxruntime"}

LEVEL = {name: i for i, line in enumerate(ORDER) for name in line}


@dataclass(frozen=True)
class Import:
    """One ``import`` statement of ``module`` at ``path:line``, reaching ``targets`` (dotted names)."""

    module: str
    path: Path
    line: int
    targets: tuple[str, ...]
    where: str  # "top", "type-checking", "function" or "lazy-hook"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str:
    """The ``ORDER`` entry of a module: ``cxrcae.infer.batches`` -> ``infer``, ``cxrcae`` -> ``cxrcae``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def collect(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every module under ``root`` and every import statement in them."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}
    imports: list[Import] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if name in packages else name.rpartition(".")[0]
        for node, where in walk(tree, lazy_hook=name in LAZY_HOOKS):
            targets = tuple(import_targets(node, package, files))
            imports.append(Import(name, path, node.lineno, targets, where))
    return files, imports


def walk(tree: ast.AST, lazy_hook: bool = False):
    """Yield (import node, where): ``top`` at module level, ``type-checking`` in the body of a module-level
    ``if TYPE_CHECKING``, ``lazy-hook`` in a module-level ``__getattr__`` (when ``lazy_hook``), else
    ``function`` for any other function body."""
    stack: list[tuple[ast.AST, str]] = [(tree, "top")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, where
            continue
        if where == "top" and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [(child, "type-checking") for child in node.body]
            stack += [(child, where) for child in node.orelse]
            continue
        for child in ast.iter_child_nodes(node):
            inside = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                hook = lazy_hook and node is tree and getattr(child, "name", "") == "__getattr__"
                inside = "lazy-hook" if hook else "function" if where in ("top", "type-checking") else where
            stack.append((child, inside))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


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


def module_edges(files: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    """module -> the cxrcae modules it imports (every statement, wherever it sits)."""
    edges: dict[str, set[str]] = {name: set() for name in files}
    for imp in imports:
        edges[imp.module].update(t for t in imp.targets if t in files and t != imp.module)
    return edges


def hidden_imports(files: dict[str, Path], imports: list[Import]) -> list[str]:
    """Imports inside functions outside ``cxrcae.cli`` (third-party extras excepted)."""
    out = []
    for imp in imports:
        if imp.where != "function" or imp.module.startswith(LAZY_ALLOWED):
            continue
        internal = [t for t in imp.targets if t in files]
        external = {t.split(".")[0] for t in imp.targets} - {ROOT_PACKAGE}
        if internal or (external - OPTIONAL_THIRD_PARTY):
            out.append(f"{imp.path}:{imp.line}: import inside a function in {imp.module}")
    return out


def order_problems(files: dict[str, Path], imports: list[Import]) -> list[str]:
    """Back edges (a lower package importing a higher one), peer edges and packages missing from ORDER."""
    out, edges = [], []
    for name in sorted({package_of(m) for m in files} - set(LEVEL)):
        out.append(f"{name}: not in the package order table (tools/check_imports.py ORDER): place it")
    for imp in imports:
        if imp.module == FACADE and imp.where in ("lazy-hook", "type-checking"):
            continue
        source = package_of(imp.module)
        for target in sorted({t for t in imp.targets if t in files}):
            dest = package_of(target)
            if dest == source or source not in LEVEL or dest not in LEVEL:
                continue
            here, there = LEVEL[source], LEVEL[dest]
            if here < there:
                problem = f"lower package {source} imports higher package {dest}"
            elif here == there and here != 0:
                problem = f"package {source} imports its peer {dest}"
            else:
                continue
            edges.append((str(imp.path), imp.line, f"{imp.module} imports {target}: {problem}"))
    return out + [f"{path}:{line}: {text}" for path, line, text in sorted(edges)]


def order_line() -> str:
    """The table as one line, lowest first: ``base < io < data < ... < cli``."""
    return " < ".join("base" if i == 0 else " / ".join(line) for i, line in enumerate(ORDER))


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
    files, imports = collect(src)
    cycles = find_cycles(module_edges(files, imports))
    hidden = hidden_imports(files, imports)
    order = order_problems(files, imports)
    for cycle in cycles:
        print("import cycle: " + " <-> ".join(cycle))
    for line in [*order, *hidden]:
        print(line)
    print(f"package order, lowest first: {order_line()}")
    if cycles or order or hidden:
        print(
            f"{len(cycles)} import cycle(s), {len(order)} package order problem(s), "
            f"{len(hidden)} hidden import(s)"
        )
        return 1
    print(
        f"no import cycles among {len(files)} cxrcae modules; no package back edges; "
        "no hidden imports outside cxrcae.cli"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
