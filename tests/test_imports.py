"""The packages import without circles: no module of ``orchestrator`` or ``trainables`` reaches
itself through its imports, counting every import statement (those inside functions and under
``TYPE_CHECKING`` too) and the package ``__init__`` an import runs first. A circle at module level
works only by import order, and breaks when someone imports a module first that nobody imported
first before; one hidden in a function is still a knot a reader has to untie.
(``../shared/tools/import_circles.py`` counts the same way.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "trainables")


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _targets(node: ast.AST, package: str) -> list[str]:
    """The modules an import statement may load (before its packages' ``__init__``s)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        return [target, *(f"{target}.{a.name}" for a in node.names)]
    return []


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules its imports load, wherever in the file they stand (an ancestor
    package of the importing module is loaded already, and a package's ``__init__`` importing its
    own modules is how a package fills its registries, not a circle of design)."""
    mods = _modules(root, packages)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _targets(node, package):
                for loaded in {target} | _ancestors(target):
                    if loaded not in mods or loaded == name or loaded in _ancestors(name):
                        continue
                    if is_package and loaded.startswith(name + "."):
                        continue
                    graph[name].add(loaded)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                    found.append(sorted(component))
    return found


def circles_in(package: str) -> list[str]:
    """Each circle touching ``package``, with the imports that tie it."""
    graph = import_graph()
    out = []
    for comp in cycles(graph):
        if any(m == package or m.startswith(package + ".") for m in comp):
            members = set(comp)
            ties = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
            out.append(f"{len(comp)} modules: " + "; ".join(ties))
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_counts_imports_inside_functions_and_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a, b  # filling the package is no circle\n")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f  # late, still a circle\n    return f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..d import D\n")
    (pkg / "d.py").write_text("import pkg.sub.c\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg"] == set() and graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.d", "pkg.sub.c"]]


def test_no_import_circles_in_trainables():
    found = circles_in("trainables")
    assert not found, "import circles in trainables (every import counted):\n" + "\n".join(found)


def test_no_import_circles_in_orchestrator():
    found = circles_in("orchestrator")
    assert not found, "import circles in orchestrator (every import counted):\n" + "\n".join(found)


def test_the_orchestrator_imports_only_its_own_and_lower_layers():
    """Each module of ``orchestrator`` stands in one layer of ``orchestrator.LAYERS`` and imports
    (anywhere in the file) only modules of its own layer or a lower one."""
    from orchestrator import LAYERS

    layer_of = {f"orchestrator.{m}": i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    graph = import_graph()
    modules = {m for m in graph if m.startswith("orchestrator.")}
    assert modules == set(layer_of), (f"not in a layer: {sorted(modules - set(layer_of))}; "
                                      f"listed but missing: {sorted(set(layer_of) - modules)}")
    upward = [f"{a} ({LAYERS[layer_of[a]][0]}) imports {b} ({LAYERS[layer_of[b]][0]})"
              for a in sorted(modules) for b in sorted(graph[a]) if b in layer_of and layer_of[b] > layer_of[a]]
    assert not upward, "imports into a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_finds_an_upward_import(tmp_path):
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rules.py").write_text("def f():\n    from .sweep import run_sweep  # late, still upward\n")
    (pkg / "sweep.py").write_text("from .rules import f\n")
    graph = import_graph(tmp_path, ("orchestrator",))
    assert graph["orchestrator.rules"] == {"orchestrator.sweep"}  # what the layer test reads as upward


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_short(package):
    """No module over 450 lines: a longer one holds more than one thing, split by what it holds."""
    long = {str(f.relative_to(ROOT)): n for f in sorted((ROOT / package).rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"
