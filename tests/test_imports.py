"""No import cycles between encoder_probe's top-level modules and subpackages.

A cycle makes what works depend on which module happened to be imported first (a half-initialised
module's missing name), and keeps a low layer (data, features) from being used without the high
ones (runner, report). The graph is read from the source with ``ast``, so it sees every import:
relative ones and those inside functions, which a run may never reach.
"""
from __future__ import annotations

import ast
from pathlib import Path

import encoder_probe

PACKAGE = Path(encoder_probe.__file__).parent
ROOT = "encoder_probe"


def _node(dotted: str) -> str | None:
    """encoder_probe.<x>[.…] -> "encoder_probe.<x>" for a module or subpackage x; the package itself
    stays "encoder_probe"; anything outside the package is None."""
    parts = dotted.split(".")
    if parts[0] != ROOT:
        return None
    if len(parts) == 1:
        return ROOT
    return f"{ROOT}.{parts[1]}" if _exists(parts[1]) else ROOT


def _exists(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def _module_name(file: Path) -> tuple[str, str]:
    """(the file's module name, the package its relative imports start from)."""
    parts = [ROOT, *file.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imported(tree: ast.AST, package: str):
    """Every dotted name an import statement anywhere in ``tree`` reads, relative ones resolved:
    ``from M import n`` reads M.n (a submodule, or a name of M: ``_node`` tells them apart)."""
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.Import):
            yield from (alias.name for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - stmt.level + 1] if stmt.level else []
            module = ".".join(base + ([stmt.module] if stmt.module else []))
            yield from (module if alias.name == "*" else f"{module}.{alias.name}" for alias in stmt.names)


def import_graph() -> dict[str, set[str]]:
    """node -> the nodes its files import (itself left out)."""
    graph: dict[str, set[str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        name, package = _module_name(file)
        here = _node(name)
        edges = graph.setdefault(here, set())
        for dotted in _imported(ast.parse(file.read_text(), filename=str(file)), package):
            target = _node(dotted)
            if target is not None and target != here:
                edges.add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "encoder_probe.errors" in graph["encoder_probe.features"]  # from .errors import ... (relative)
    assert "encoder_probe.encoders" in graph["encoder_probe.features"]  # inside extract()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_top_level_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(n.removeprefix(ROOT + ".") for n in cycle)
