"""Imports go one way.

The import graph of the package is read from the source (ast: module-level imports and those inside
functions alike, since a deferred import is still a dependency). Between subpackages (and the
top-level modules) there is no cycle, the core layers keep their order (data <- models <- training <-
evaluation; the numpy/numba kernels import nothing of MindSpore or of the rest), and between modules
there is no cycle either.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "ds2exp"
# lower layers first: a layer imports only layers before it
LAYERS = ["kernels", "data", "models", "training", "evaluation"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path):
    """(imported module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            # `from ds2exp.checkpoints import io` imports the module ds2exp.checkpoints.io
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return out


def module_graph(package: Path = PACKAGE):
    modules = {module_name(p): p for p in package.rglob("*.py")}
    graph = defaultdict(dict)
    for name, path in modules.items():
        for target, line in imports_of(path):
            if target in modules and target != name and target != package.name:
                graph[name].setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return modules, graph


def unit(module: str) -> str:
    """ds2exp.training.trainer -> training; ds2exp.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def unit_graph():
    _, graph = module_graph()
    units = defaultdict(dict)
    for a, targets in graph.items():
        for b, where in targets.items():
            if unit(a) != unit(b):
                units[unit(a)].setdefault(unit(b), f"{where} ({a} -> {b})")
    return units


def find_cycle(graph):
    """One cycle as a list of nodes, or None (iterative depth-first search)."""
    state, stack = {}, []
    for root in sorted(graph):
        if state.get(root):
            continue
        state[root] = 1
        stack = [(root, iter(sorted(graph.get(root, {}))))]
        path = [root]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, {})))))
                path.append(nxt)
    return None


def _describe(graph, cycle):
    return " -> ".join(cycle) + "\n" + "\n".join(f"  {a} -> {b}: {graph[a][b]}" for a, b in zip(cycle, cycle[1:]))


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {}}) is None
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]


def test_relative_and_deferred_imports_are_seen(tmp_path):
    src = PACKAGE / "training" / "run.py"
    targets = {t for t, _ in imports_of(src)}
    assert "ds2exp.training.setup" in targets  # imported inside a function
    assert "ds2exp.config" in targets


def test_no_import_cycle_between_subpackages():
    graph = unit_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between parts of ds2exp: " + _describe(graph, cycle)


def test_no_import_cycle_between_modules():
    _, graph = module_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + _describe(graph, cycle)


def test_core_layers_import_only_lower_layers():
    graph = unit_graph()
    wrong = []
    for i, layer in enumerate(LAYERS):
        for target, where in graph.get(layer, {}).items():
            if target in LAYERS[i + 1:]:
                wrong.append(f"{layer} imports {target}: {where}")
    assert not wrong, "\n".join(wrong)


def test_kernels_need_no_mindspore():
    found = [f"{p.relative_to(ROOT)}:{line}" for p in (PACKAGE / "kernels").rglob("*.py")
             for target, line in imports_of(p) if target.split(".")[0] == "mindspore"]
    assert not found, found


def test_tracking_can_be_imported_before_mindspore():
    """MLflow loads protobuf; MindSpore then fails to import unless ds2exp chose the pure-Python
    implementation first. Importing the tracking module first, in a fresh interpreter, must work."""
    code = ("import ds2exp.tracking.mlflow_tracker, mlflow, mindspore; "
            "print(mindspore.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("2.8")


def test_no_import_cycle_between_bench_modules():
    _, graph = module_graph(ROOT / "bench")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between bench modules: " + _describe(graph, cycle)


def test_bench_imports_nothing_of_tests():
    found = [f"{p.relative_to(ROOT)}:{line} imports {target}" for p in (ROOT / "bench").rglob("*.py")
             for target, line in imports_of(p) if target.split(".")[0] == "tests"]
    assert not found, found
