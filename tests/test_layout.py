"""The package's layout: which parts may import which, and no import circles.

The imports are read from the source (every ``import`` a module runs, at its top or in a
function; those under ``if TYPE_CHECKING:`` are for the type checker only and left out).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "streambroker"
FACES = {"broker", "async_broker", "_face"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``tree`` that run (not those for type checkers only)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped:
            yield node


def _imports(module: str) -> tuple[set[str], set[str]]:
    """What ``module`` imports: (modules of the package, top-level outside packages)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "streambroker":
                    inside.add(alias.name.removeprefix("streambroker").lstrip("."))
                else:
                    outside.add(top)
            continue
        if node.level == 0:
            name = node.module or ""
            if name.split(".")[0] != "streambroker":
                outside.add(name.split(".")[0])
                continue
            base = name.removeprefix("streambroker").lstrip(".").split(".") if name else []
        else:
            base = package[: len(package) - node.level + 1] + (
                node.module.split(".") if node.module else []
            )
        base = [part for part in base if part]
        for alias in node.names:
            candidate = ".".join([*base, alias.name])
            inside.add(candidate if candidate in MODULES else ".".join(base))
    return inside, outside


GRAPH = {module: _imports(module) for module in MODULES}


def _part(module: str) -> str:
    """The part of the design ``module`` belongs to."""
    head = module.split(".")[0]
    if head in ("core", "io", "config", "wire", "apps"):
        return head
    if head in FACES:
        return "faces"
    return module or "package"


#: What each part may import of the package (besides itself and ``errors``).
ALLOWED = {
    "wire": set(),
    "config": {"wire"},
    "core": {"wire", "config"},
    "io": {"core", "wire", "config"},
    "faces": {"core", "io", "wire", "config"},
}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_parts_below_it(part: str) -> None:
    wrong = {
        f"{module} imports {target}"
        for module, (inside, _) in GRAPH.items()
        if _part(module) == part
        for target in inside
        if _part(target) not in ALLOWED[part] | {part, "errors"}
    }
    assert not wrong


def test_the_io_free_parts_do_not_import_redis_py() -> None:
    """Nor sockets or threads. (They may use hiredis, which only packs and parses the
    wire protocol.)"""
    wrong = {
        f"{module} imports {name}"
        for module, (_, outside) in GRAPH.items()
        if _part(module) in ("core", "wire", "config")
        for name in outside
        if name in ("redis", "socket", "ssl", "asyncio", "threading", "concurrent")
    }
    assert not wrong


def test_there_is_no_import_circle() -> None:
    edges = {module: {t for t in inside if t in GRAPH} for module, (inside, _) in GRAPH.items()}
    # The package's __init__ imports the public names; a module importing from it
    # (``__version__``) would close a circle through every public module.
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles


def test_the_checks_see_the_imports() -> None:
    """The reading of the source finds what is known to be there (else the tests above
    would pass on nothing)."""
    assert "core.effects" in GRAPH["core.consuming"][0]
    assert "io.sync" in GRAPH["broker"][0]
    assert "redis" in GRAPH["io.connection"][1]
    assert "config.loading" in GRAPH["config.registry"][0]
    # Under TYPE_CHECKING only: not a runtime import.
    assert "broker" not in GRAPH["config.registry"][0]
