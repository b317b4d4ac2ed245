"""Data flows one way: no module of benchkit imports, directly or through others, a module that imports it
back — not even with an import inside a function (which only hides a cycle from the interpreter). The lower
layers never import the higher ones (pruning/ knows nothing of metrics, latency, timings or experiments;
config knows no registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "benchkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The benchkit modules ``path`` imports anywhere (module level or inside functions), except under
    ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    tree = ast.parse(path.read_text())
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != this}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def path_between(graph: dict[str, set[str]], a: str, b: str, within: set[str]) -> list[str]:
    """One import chain a → … → b inside a cycle, for the failure message."""
    todo, seen = [[a]], {a}
    while todo:
        chain = todo.pop(0)
        for nxt in sorted(graph[chain[-1]] & within):
            if nxt == b:
                return [*chain, b]
            if nxt not in seen:
                seen.add(nxt)
                todo.append([*chain, nxt])
    return [a, b]


def test_benchkit_has_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for comp in found:
        a = comp[0]
        b = sorted(graph[a] & set(comp))[0]
        lines.append(" -> ".join(path_between(graph, a, b, set(comp)) + path_between(graph, b, a, set(comp))[1:]))
    assert not found, "import cycles (a lower layer imports a higher one):\n  " + "\n  ".join(lines)


LAYERS = {  # module prefix -> benchkit modules it must never import (the layers above it)
    "benchkit.config": ("benchkit.models", "benchkit.validation", "benchkit.timing", "benchkit.pruning",
                        "benchkit.data", "benchkit.training", "benchkit.experiment"),
    "benchkit.pruning": ("benchkit.metrics", "benchkit.latency", "benchkit.timing", "benchkit.experiment",
                         "benchkit.tracking", "benchkit.sweep", "benchkit.deploy"),
    "benchkit.registry": ("benchkit.config", "benchkit.pruning", "benchkit.models", "benchkit.data", "benchkit.timing",
                          "benchkit.training", "benchkit.experiment", "benchkit.sweep", "benchkit.tracking"),
    "benchkit.plugins": ("benchkit.",),  # below everything: the registry loads entry points through it
}


@pytest.mark.parametrize("lower", sorted(LAYERS))
def test_lower_layers_never_import_higher_ones(lower):
    graph = import_graph()
    bad = {m: sorted(i for i in imports if i.startswith(LAYERS[lower]) and not i.startswith(lower))
           for m, imports in graph.items() if m == lower or m.startswith(lower + ".")}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"{lower} imports a layer above it: {bad}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import inside a function counts, one under TYPE_CHECKING does not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import thing\n    from . import a\n")
    globals()["PACKAGE"] = pkg
    try:
        graph = import_graph()
    finally:
        globals()["PACKAGE"] = Path(__file__).resolve().parents[1] / "benchkit"
    assert graph == {"pkg": set(), "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
    assert cycles({"x": {"y"}, "y": set()}) == []
