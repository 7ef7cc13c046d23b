"""The shape of the package: concept folders, one-way imports, no reaching into another module's private names.

The import graph counts every import statement of perft_cli/, at any depth: inside functions and under
TYPE_CHECKING too, since a deferred import still ties two modules together. An edge goes to the module named
(``from perft_cli.x import y`` is an edge to ``perft_cli.x.y`` when that is a module, else to ``perft_cli.x``);
the implicit import of a parent package's ``__init__`` is not an edge (every submodule of a package with a façade
would otherwise form a circle with it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "perft_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement of perft_cli in ``path``."""
    found = []
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "perft_cli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "perft_cli":
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, names, _ in imports_of(path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            edges[name] |= set(subs) if subs and len(subs) == len(names) else {target} | set(subs)
    return {m: {t for t in ts if t in MODULES and t != m} for m, ts in edges.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{module_name(path)}:{line} imports {target}.{n}"
        for path in MODULES.values()
        for target, names, line in imports_of(path)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, bad


def test_the_core_and_quant_use_no_shell_or_command_module():
    """perft/ (the core) and quant/ (the 4-bit backbone) import only each other and errors/arch: arrows run one way."""
    allowed = {"perft_cli.errors", "perft_cli.arch"}
    for name, targets in graph().items():
        if name.startswith(("perft_cli.perft", "perft_cli.quant")):
            outside = {
                t for t in targets if not t.startswith(("perft_cli.perft", "perft_cli.quant")) and t not in allowed
            }
            assert not outside, (name, outside)


@pytest.mark.parametrize("folder", ["evaluation", "merging", "routing_report", "training"])
def test_concept_folders_exist(folder):
    assert (PACKAGE / folder / "__init__.py").is_file()


def test_no_name_prefix_families_left_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert not [n for n in top if n.startswith(("routing_", "merge_"))], top
