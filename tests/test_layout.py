"""The package's layout: no import cycles (function-level imports included, so none can hide one),
the library never imports the demo, and outside the demo's folder no module names the demo's
data, weights or images."""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "flamingo_jax"
DEMO = "flamingo_jax.demo"
DEMO_NAMES = re.compile(r"fashion|smollm2|skimage|scikit-image|efficientnet[-_ ]lite0", re.IGNORECASE)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
    """Every flamingo_jax module ``path`` imports, anywhere in the file. ``from a.b import c``
    counts as ``a.b.c`` when that is a module, else as ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(path, set(known)) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_library_never_imports_the_demo():
    offenders = {
        name: sorted(target for target in targets if target == DEMO or target.startswith(DEMO + "."))
        for name, targets in import_graph().items()
        if not (name == DEMO or name.startswith(DEMO + "."))
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_no_module_outside_the_demo_names_its_data_weights_or_images():
    mentions = []
    for name, path in modules().items():
        if name == DEMO or name.startswith(DEMO + "."):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if DEMO_NAMES.search(line):
                mentions.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not mentions, "\n".join(mentions)
    # The check reads what it should: the demo's own modules do name them.
    assert any(DEMO_NAMES.search(path.read_text()) for path in (PACKAGE / "demo").glob("*.py"))
