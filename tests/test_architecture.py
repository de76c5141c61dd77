"""The package's shape (docs/architecture.md): no import circles, dependencies point down, files stay short.

The import graph is read from the source with `ast`, imports inside functions included (a circle hidden in a
function is still a circle), so the test needs no imports of its own and cannot be fooled by lazy imports.
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "svi_jax")
MAX_LINES = 600


def _modules() -> dict[str, str]:
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the svi_jax modules it imports (`from a import b` counts a.b when b is a module, else a)."""
    mods = _modules()
    graph = defaultdict(set)
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return {m: graph[m] for m in mods}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import circles in svi_jax: " + "; ".join(" <-> ".join(c) for c in found)


def _reaches(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _in(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


@pytest.mark.parametrize("low, forbidden", [
    ("svi_jax.sharding", ("svi_jax",)),
    # (models may use the param-tree utilities below them: checkpoint/trees/integrity and lora's merge)
    ("svi_jax.models", ("svi_jax.train", "svi_jax.erft", "svi_jax.data", "svi_jax.sample", "svi_jax.encoders",
                        "svi_jax.conditioners", "svi_jax.sharding", "svi_jax.long_video", "svi_jax.pipeline")),
    ("svi_jax.erft", ("svi_jax.data", "svi_jax.train")),
    ("svi_jax.encoders", ("svi_jax.train", "svi_jax.data", "svi_jax.sample", "svi_jax.erft")),
])
def test_dependencies_point_down(low, forbidden):
    graph = import_graph()
    bad = []
    for mod in graph:
        if not _in(mod, low):
            continue
        for dep in graph[mod]:
            if any(_in(dep, f) for f in forbidden) and not _in(dep, low):
                bad.append(f"{mod} -> {dep}")
    assert not bad, f"{low} must not import {forbidden}: " + ", ".join(sorted(bad))


def test_files_stay_short():
    long = sorted((sum(1 for _ in open(p)), m) for m, p in _modules().items())
    over = {m: n for n, m in long if n > MAX_LINES}
    assert not over, f"files over {MAX_LINES} lines: " + ", ".join(f"{m} ({n} lines)" for m, n in over.items())
