"""The package's import graph (read with ``ast``, every import including the ones inside functions): no
circle between modules, and no entry point imports another entry point (they all build through
:mod:`userllm.factory` and the library modules)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where the modules of ``userllm`` live: the package, and the two top-level folders it links to.
ROOTS = {"userllm": REPO / "userllm", "userllm.kernels": REPO / "kernels", "userllm.profiling": REPO / "profiling"}
# The stage commands. Each is a thin script over the library; none may import another, and nothing in the
# package imports one (``python -m userllm COMMAND`` dispatches by name, with importlib).
ENTRY_POINTS = {"userllm.train", "userllm.pretrain", "userllm.evaluate", "userllm.generate", "userllm.diagnose",
                "userllm.profiling.compare"}


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "userllm" and parts and parts[0] in ("kernels", "profiling"):
                continue                                      # the symlinks: counted under their own root
            mods[".".join([prefix, *parts])] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:                    # `import userllm.x.y` names module userllm.x.y
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("userllm"):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert ENTRY_POINTS <= set(graph)
    assert "userllm.factory" in graph["userllm.train"] and "userllm.kernels.dispatch" in graph
    assert "userllm.profiling.measure" in graph["userllm.profiling.compare"]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_entry_point_is_imported():
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() for t in ts if t in ENTRY_POINTS)
    assert bad == [], f"modules importing an entry point: {bad}"


def test_a_circle_and_an_entry_point_import_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
