"""The package's import graph: no cycles, and no format module imports another (ruff has no cycle rule).

Every module of lorabridge is parsed with ``ast``; every import counts, wherever it is: module level,
inside a function (the lazy imports that keep the CLI fast), under ``if TYPE_CHECKING:``. An import is
an edge to the lorabridge module it names: ``from .x import y`` points at module ``x.y`` when ``y`` is a
module, else at ``x``. Importing a module also runs its parent packages' ``__init__``; those implicit
edges are left out, since a package whose ``__init__`` imports its own modules is not a cycle to fix.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Collection, Iterator


import lorabridge

PACKAGE_DIR = Path(lorabridge.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(name: str, is_package: bool, source: str, known: Collection[str] = MODULES.keys()) -> set[str]:
    """The ``known`` modules that module ``name``'s source imports anywhere in it (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in found if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    """lorabridge module -> the lorabridge modules it imports."""
    return {name: imports_of(name, path.name == "__init__.py", path.read_text("utf-8")) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Per strongly connected component of more than one module: one cycle in it (a path back to its start),
    and all its modules (each reaches every other)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(_cycle_in(graph, component), component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, inside the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def format_modules() -> set[str]:
    """The modules converters/registry.py's FORMATS point at ("module" or "module:attribute")."""
    from lorabridge.converters.registry import FORMATS

    return {spec.partition(":")[0] for spec in FORMATS.values()}


def _cross_format_imports(graph: dict[str, set[str]]) -> Iterator[str]:
    formats = format_modules()
    for name in sorted(formats):
        for target in sorted(graph[name] & formats):
            yield f"{name} -> {target}"


def test_the_graph_sees_every_kind_of_import():
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
              "from . import sibling\nfrom .sub import thing\n"
              "if TYPE_CHECKING:\n    from ..top import Name\n"
              "def f():\n    import pkg.lazy\n    from pkg.sub.mod import g\n")
    known = {"pkg", "pkg.top", "pkg.inner", "pkg.inner.sibling", "pkg.inner.sub", "pkg.lazy", "pkg.sub.mod"}
    assert imports_of("pkg.inner.here", False, source, known) == {"pkg.inner.sibling", "pkg.inner.sub", "pkg.top",
                                                                  "pkg.lazy", "pkg.sub.mod"}
    assert imports_of("pkg.inner", True, "from .sub import x\nfrom .. import top", known) == {"pkg.inner.sub", "pkg.top"}
    graph = import_graph()
    assert "lorabridge.io.protobuf_wire" in graph["lorabridge.io.ms_ckpt"]
    assert "lorabridge.adapters.infer" in graph["lorabridge.cli"]  # imported inside infer_command
    assert format_modules() <= set(graph) and "lorabridge.formats.neutral" in format_modules()


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(f"{' -> '.join(cycle)}  (mutually reachable: {', '.join(sorted(members))})"
                                                     for cycle, members in found)


def test_no_format_module_imports_another():
    found = list(_cross_format_imports(import_graph()))
    assert not found, "format modules importing other format modules:\n" + "\n".join(found)
