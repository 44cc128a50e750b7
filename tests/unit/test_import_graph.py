"""The package's import graph has no cycle, and the public layer imports downward only.

Every `import` and `from ... import` in aiovfio's modules counts, including
those inside functions; what sits under `if TYPE_CHECKING:` is left out (it
never runs). A module importing a package also runs the package's `__init__`, so
`from .kernel import X` is an edge to `aiovfio.kernel` (whose `__init__`
imports its own modules in turn); an edge to a module's own package is not one
(the package is always imported first).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import aiovfio

ROOT = Path(aiovfio.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level and inside functions."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the aiovfio modules it imports (run-time imports only)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join([*base, node.module] if node.module else base)
                else:
                    stem = node.module or ""
                targets = [stem]
                # `from . import errors`: a submodule, when one exists by that name
                targets += [f"{stem}.{a.name}" for a in node.names if f"{stem}.{a.name}" in modules]
            for target in targets:
                # the nearest module that exists (`aiovfio.kernel.linux` or its package)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # a package is always imported before its modules: never a cycle
                ancestor = name.startswith(target + ".")
                if target.startswith("aiovfio") and target != name and not ancestor:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that starts and ends at the same module), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, black) == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if colour.get(nxt) == white:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "aiovfio.device" in graph and "aiovfio.container" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_an_import_inside_a_function_counts(tmp_path: Path) -> None:
    tree = ast.parse("def f():\n    from .device import Device\nif TYPE_CHECKING:\n    import x\n")
    names = [n.module for n in _imports(tree) if isinstance(n, ast.ImportFrom)]
    assert names == ["device"]


#: the public layer, top to bottom: a module imports only modules below it
LAYERS = [
    ["aiovfio._open"],
    ["aiovfio.container"],
    ["aiovfio.group"],
    ["aiovfio.device"],
    ["aiovfio.pci"],
    ["aiovfio.region", "aiovfio.irq", "aiovfio.dma"],
    ["aiovfio._iova", "aiovfio._resource", "aiovfio._util"],
    ["aiovfio.kernel", "aiovfio.kernel.linux", "aiovfio.kernel.protocol"],
    ["aiovfio._uapi", "aiovfio.errors", "aiovfio._log"],
]


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_the_public_layer_imports_only_downward(layer: int) -> None:
    graph = import_graph()
    above = {m for upper in LAYERS[: layer + 1] for m in upper}
    for module in LAYERS[layer]:
        upward = sorted(t for t in graph[module] if t in above and t not in LAYERS[layer])
        assert not upward, f"{module} imports {upward}, which sit above it"


def test_nothing_in_the_public_layer_imports_cli_testing_or_open() -> None:
    graph = import_graph()
    public = {m for layer in LAYERS[1:] for m in layer}
    for module in public:
        bad = sorted(
            t
            for t in graph[module]
            if t.startswith(("aiovfio.cli", "aiovfio.testing", "aiovfio.sim", "aiovfio.repl"))
            or t == "aiovfio._open"
        )
        assert not bad, f"{module} imports {bad}"
