"""The import graph of `gateway`: no cycles, and `gateway.keys` a leaf.

Read from the source (an AST walk), not from `sys.modules`: every import counts, at module
level, inside a function (a lazy import is a dependency all the same) or under
`TYPE_CHECKING` (a cycle through types is a cycle in the design). `from gateway import x`
counts as the module `gateway.x` when there is one; a module's own package is not an edge
(Python imports it first whoever asks).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST, *, type_checking: bool) -> Iterator[ast.AST]:
    """Every node; the bodies of `if TYPE_CHECKING:` only when `type_checking`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node.test) and not type_checking:
            for child in node.orelse:
                yield child
                yield from _nodes(child, type_checking=type_checking)
            continue
        yield node
        yield from _nodes(node, type_checking=type_checking)


def imports(module: str, *, type_checking: bool = True) -> set[str]:
    """The gateway modules `module` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()), type_checking=type_checking):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def graph() -> dict[str, set[str]]:
    return {module: imports(module) for module in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it began, or None (depth-first, colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_keys_imports_nothing_of_the_gateway_at_run_time() -> None:
    assert imports("gateway.keys", type_checking=False) == set()


def test_the_walk_sees_lazy_imports_and_from_package_imports() -> None:
    # What the walk must see for the tests above to mean anything.
    assert "gateway.limits.redis" in imports("gateway.app")  # inside a function
    assert "gateway.deadletters" in imports("gateway.console")  # `from gateway import x`
    assert "gateway.config" in imports("gateway.keys")  # under TYPE_CHECKING


def test_a_cycle_is_found_and_shown() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
