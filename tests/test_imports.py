"""The package's import graph: no cycles, and every module imports on its own.

The graph counts every import of a package module, at module level and inside functions
(a lazy import is still a dependency: it only moves the failure to the first call). A
call travels one way, down; the one edge that goes up is named in ``ALLOWED_UP``.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fmm_attention"

#: Edges that point up on purpose, with the reason. The public functions hand Dask inputs
#: to the Dask adapter, whose tasks call the same public functions on NumPy chunks.
ALLOWED_UP = {("fmm_attention.distributed.dask", "fmm_attention.api")}


def _modules():
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[:-1]
        if parts[-1] == "__init__":
            parts = package = parts[:-1]
        mods[".".join(parts)] = (path, package)
    return mods


def import_graph():
    """``{module: {package modules it imports}}``, every import statement counted."""
    mods = _modules()
    graph = {}
    for name, (path, package) in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                # `from . import _config` depends on the submodule, not on the package's __init__
                edges.update(subs if len(subs) == len(node.names) else subs + [target])
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {t for t in edges if t in mods and t != name}
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "fmm_attention._validate" in graph and "fmm_attention.cuda._device" in graph
    for source, target in ALLOWED_UP:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from ALLOWED_UP"
        graph[source] = graph[source] - {target}
    assert cycles(graph) == []


def test_the_cycle_check_sees_lazy_imports():
    # the check can fail: a function-level import back into a module is a cycle
    graph = import_graph()
    graph["fmm_attention._validate"] = graph["fmm_attention._validate"] | {"fmm_attention.coarsening"}
    assert ["fmm_attention._validate", "fmm_attention.coarsening"] in cycles(graph)


def test_the_layers_below_import_nothing_above():
    graph = import_graph()
    assert not graph["fmm_attention._validate"] & {"fmm_attention.coarsening", "fmm_attention.options",
                                                  "fmm_attention.api", "fmm_attention.backends"}
    assert not graph["fmm_attention.cuda._device"] - {"fmm_attention._config"}


_ISOLATED = """
import importlib, sys
name = sys.argv[1]
try:
    importlib.import_module(name)
except ImportError as exc:  # an optional package (numba-cuda, dask, torch) this machine lacks
    missing = (exc.name or "").split(".")[0]
    if missing in ("", "fmm_attention"):
        raise
    print("missing", exc.name)
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(set(_modules()) - {"fmm_attention.__main__"}))  # importing it runs the CLI
def test_each_module_imports_in_a_fresh_interpreter(module):
    result = subprocess.run([sys.executable, "-c", _ISOLATED, module], capture_output=True, text=True, timeout=300,
                            cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr
