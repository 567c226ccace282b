"""The import graph of the natskv package, read from the source (nothing is imported).

    python tools/import_graph.py            # one line per module: what it imports at run time
    python tools/import_graph.py --cycles   # the run-time import cycles (exit 1 if any)

Each ``import`` / ``from ... import`` of a natskv module is classified by where it sits:

- ``runtime``: at module level, executed when the module is imported;
- ``lazy``: inside a function body, executed on first call;
- ``typing``: under ``if TYPE_CHECKING:``, never executed.

A cycle counts only through ``runtime`` and ``lazy`` edges: a type-only import cannot deadlock
module initialisation or leave a half-initialised module behind. ``tests/test_layers.py`` uses
:func:`build_graph` to hold the layering rules of docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "natskv"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # "runtime", "lazy" or "typing"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, source: str, is_package: bool, modules: set[str]) -> None:
        self.source = source
        self.is_package = is_package
        self.modules = modules
        self.edges: list[Edge] = []
        self.external: set[str] = set()  # top-level names of non-natskv imports (any kind)
        self._kind = ["runtime"]

    def _add(self, target: str) -> None:
        if not target.startswith(PACKAGE):
            self.external.add(target.split(".")[0])
            return
        # `from natskv.x import y` names module natskv.x.y when that is a module, else natskv.x.
        while target and target not in self.modules:
            target = target.rpartition(".")[0]
        if target and target != self.source:
            self.edges.append(Edge(self.source, target, self._kind[-1]))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.source, self.is_package, node)
        for alias in node.names:
            self._add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.modules else base)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._kind.append("typing")
            for child in node.body:
                self.visit(child)
            self._kind.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._kind.append("typing" if self._kind[-1] == "typing" else "lazy")
        self.generic_visit(node)
        self._kind.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function


def build_graph(root: Path = ROOT) -> tuple[list[Edge], dict[str, set[str]]]:
    """Every natskv-to-natskv import edge, and each module's external top-level imports."""
    files = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    # Compiled modules (natskv._core) are import targets too, though their source is not parsed.
    modules = set(files) | {module_name(p, root) for p in (root / PACKAGE).rglob("*.pyx")}
    edges: list[Edge] = []
    external: dict[str, set[str]] = {}
    for name, path in files.items():
        visitor = _Visitor(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        edges.extend(visitor.edges)
        external[name] = visitor.external
    return edges, external


def cycles(edges: list[Edge], kinds: frozenset[str] = frozenset({"runtime", "lazy"})) -> list[list[str]]:
    """The strongly connected components of more than one module, through edges of ``kinds``."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.kind in kinds:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def main(argv: list[str]) -> int:
    edges, _ = build_graph()
    if "--cycles" in argv:
        found = cycles(edges)
        for component in found:
            print("cycle:", " <-> ".join(component))
        print(f"{len(found)} run-time import cycle(s)")
        return 1 if found else 0
    by_source: dict[str, list[str]] = {}
    for e in edges:
        if e.kind != "typing":
            mark = "" if e.kind == "runtime" else " (lazy)"
            by_source.setdefault(e.source, []).append(e.target + mark)
    for source in sorted(by_source):
        print(f"{source} -> {', '.join(sorted(set(by_source[source])))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
