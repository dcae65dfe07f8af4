"""The package's import graph: no cycles anywhere in ``src/osdface``, and layers point down.

Every ``import`` statement counts, also those inside functions (a lazy import that closes a cycle is
still a cycle: it only moves the failure from import time to call time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "osdface"

#: layer (package prefix) → packages it must never import
FORBIDDEN = {
    "osdface.models": ("osdface.pipelines", "osdface.face", "osdface.evaluation", "osdface.training", "osdface.cli",
                       "osdface.losses", "osdface.data"),
    "osdface.io": ("osdface.pipelines", "osdface.face", "osdface.evaluation", "osdface.training", "osdface.cli",
                   "osdface.losses", "osdface.data"),
    "osdface.losses": ("osdface.evaluation", "osdface.training", "osdface.cli", "osdface.face"),
    "osdface.pipelines": ("osdface.evaluation", "osdface.training", "osdface.cli", "osdface.face", "osdface.losses"),
    "osdface.face": ("osdface.evaluation", "osdface.training", "osdface.cli", "osdface.batch"),
    "osdface.batch": ("osdface.evaluation", "osdface.training", "osdface.cli"),
    "osdface.export": ("osdface.face", "osdface.evaluation", "osdface.training", "osdface.cli", "osdface.runtime"),
    "osdface.runtime": ("osdface.face", "osdface.evaluation", "osdface.training", "osdface.cli", "osdface.export"),
    "osdface.data": ("osdface.evaluation", "osdface.training", "osdface.cli"),
    "osdface.evaluation": ("osdface.training", "osdface.cli"),
    "osdface.training": ("osdface.cli",),
    # a program beside training/evaluation; the CLI imports it, not the other way round (tests/serve checks
    # that nothing below the programs imports it)
    "osdface.serve": ("osdface.cli", "osdface.training", "osdface.evaluation", "osdface.export"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                # `import osdface.x.y` also imports the packages above it; only edges to modules count here
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_init_edge(a: str, b: str) -> bool:
    # a package's __init__ re-exporting its own submodules (lazily or not) is not a layering cycle
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_finder_sees_a_known_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50
    pruned = {a: {b for b in bs if not _is_package_init_edge(a, b)} for a, bs in graph.items()}
    assert cycles(pruned) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_point_down(layer):
    graph = import_graph()
    bad = sorted(f"{a} -> {b}" for a, bs in graph.items() if a == layer or a.startswith(layer + ".")
                 for b in bs if any(b == f or b.startswith(f + ".") for f in FORBIDDEN[layer]))
    assert bad == []
