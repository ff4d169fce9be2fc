"""hub_peft's imports flow one way: no cycle between its modules, and no module imports a package above it.

The graph is read from the source (every ``import`` statement, those inside functions and under
``TYPE_CHECKING`` included), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hub_peft"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str, known: dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The hub_peft modules ``name`` imports (a ``from package import submodule`` counts as the submodule)."""
    package = name if is_package(name, known) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hub_peft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "hub_peft":
                continue
            subs = {f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known}
            found |= subs
            if len(subs) < len(node.names):  # names defined in the module (or package __init__) itself
                found.add(source)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_a_cycle_and_an_upward_import():
    """The checks below can fail: a planted cycle and a planted upward import are found."""
    edges = {"hub_peft.a": {"hub_peft.b"}, "hub_peft.b": {"hub_peft.a"}, "hub_peft.c": set()}
    assert cycles(edges) == [["hub_peft.a", "hub_peft.b"]]
    known = modules()
    edges = imports_of("hub_peft.serving.engine", known["hub_peft.serving.engine"], known)
    assert "hub_peft.errors" in edges and "hub_peft.serving.kv_cache" in edges and "hub_peft.serving" not in edges


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_module_imports_a_package_above_it():
    upward = sorted(
        (name, target)
        for name, targets in graph().items()
        for target in targets
        if is_package(target, modules()) and name.startswith(target + ".")
    )
    assert upward == []


def test_every_package_ships_in_the_wheel():
    """A sub-package missing from pyproject's list works in the editable checkout and is absent when installed."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert {name for name, path in modules().items() if path.name == "__init__.py"} <= listed
