"""The package's imports go one way: from the public API down to the backends, never back up.

The graph is read from the source (every ``import`` / ``from ... import`` of a ``gala_kernels``
module, at module level or inside a function, except under ``if TYPE_CHECKING:``), so a lazy
import that only hides a cycle still counts.
"""

import ast
import pathlib
from typing import Dict, List, Set

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gala_kernels"

# What the library must never import: the command line, the benchmarks and the demo sit above it.
TOOLS = ("gala_kernels.benchmark", "gala_kernels.demo", "gala_kernels.__main__")


def module_files() -> Dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(name: str, path: pathlib.Path, modules: Dict[str, pathlib.Path]) -> Set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()

    def add(candidate: str) -> None:
        while candidate and candidate not in modules:  # an attribute of a module: that module
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            found.add(candidate)

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for statement in node.orelse:
                    self.visit(statement)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.startswith("gala_kernels"):
                    add(alias.name)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0:
                if not (node.module or "").startswith("gala_kernels"):
                    return
                base = node.module
            else:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            for alias in node.names:
                if alias.name == "_C":  # the compiled extension: no Python imports of its own
                    continue
                add(f"{base}.{alias.name}")

    Visitor().visit(ast.parse(path.read_text()))
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_library_does_not_import_its_tools():
    graph = import_graph()
    library = [name for name in graph if not name.startswith(TOOLS)]
    offending = {name: sorted(d for d in graph[name] if d.startswith(TOOLS)) for name in library}
    assert {name: deps for name, deps in offending.items() if deps} == {}


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
