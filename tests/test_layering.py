"""The import direction holds, read from the source (no module is imported here):

- ``formats/`` imports nothing of ours but the error tree;
- ``server/`` imports ``formats/`` and the error tree only;
- the runtime imports, when it runs, only the error tree, ``formats/``, the layer type and the tokenizer: nothing of
  the download (the model's type only under ``TYPE_CHECKING``);
- the cache imports nothing of the download (it is what the download writes into);
- the library never imports the CLI;
- ``tools/`` import no tests (what both need lives in ``tools/_support``, which ``tests/support`` re-uses).

Imports inside functions count (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"streamload": ROOT / "streamload", "streamload.formats": ROOT / "formats", "streamload.server": ROOT / "server"}
ERRORS = "streamload.errors"


def module_files() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if not (package == "streamload" and parts and parts[0] in ("formats", "server")):  # the installed aliases
                found[name] = path
    return found


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, but those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imported_names(path: Path, module: str | None) -> set[str]:
    """Absolute names of the modules ``path`` imports (``module``: its own dotted name, to resolve relative imports)."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:
            assert module is not None, f"{path}: a relative import outside the packages"
            base_parts = module.split(".") if is_package else module.split(".")[:-1]
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


def ours(names: set[str]) -> set[str]:
    return {name for name in names if name == "streamload" or name.startswith("streamload.")}


GRAPH = {name: ours(imported_names(path, name)) for name, path in MODULES.items()}


def closure(start: str) -> set[str]:
    """Every module of ours ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        current = todo.pop()
        for target in GRAPH.get(current, set()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def direct_violations(prefix: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module == prefix or module.startswith(prefix + ".")
        for target in targets
        if not any(target == a or target.startswith(a + ".") for a in allowed)
    )


def test_the_graph_sees_every_package() -> None:
    assert {"streamload.formats.reader", "streamload.server.app", "streamload.runtime.ops", "streamload.cli.parser"} <= set(GRAPH)
    assert ERRORS in GRAPH["streamload.formats.reader"]  # `from ..errors import` resolved
    assert "streamload.runtime.bert" in GRAPH["streamload.runtime"]  # a lazy `from . import bert` counts
    assert "streamload.model" not in GRAPH["streamload.runtime"]  # under TYPE_CHECKING: does not


def test_formats_imports_nothing_of_ours_but_the_error_tree() -> None:
    assert direct_violations("streamload.formats", ("streamload.formats", ERRORS)) == []


def test_the_server_imports_formats_and_the_error_tree_only() -> None:
    assert direct_violations("streamload.server", ("streamload.server", "streamload.formats", ERRORS)) == []


RUNTIME_MAY_USE = ("streamload.runtime", "streamload.formats", ERRORS, "streamload.layer", "streamload.tokenizer")


def test_the_runtime_imports_nothing_of_the_download() -> None:
    assert direct_violations("streamload.runtime", RUNTIME_MAY_USE) == []
    reached = set().union(*(closure(name) for name in GRAPH if name.startswith("streamload.runtime")))
    assert sorted(name for name in reached if not any(name == a or name.startswith(a + ".") for a in RUNTIME_MAY_USE)) == []


def test_the_cache_imports_nothing_of_the_download() -> None:
    cache = [name for name in GRAPH if name.startswith("streamload.cache")]
    assert cache
    reached = set().union(*(closure(name) for name in cache))
    assert sorted(name for name in reached if name.startswith("streamload.download")) == []


@pytest.mark.parametrize("package", ["streamload", "streamload.formats", "streamload.server"])
def test_the_library_never_imports_the_cli(package: str) -> None:
    library = [name for name in GRAPH if (name == package or name.startswith(package + ".")) and not name.startswith("streamload.cli")]
    assert library
    assert sorted(f"{name} imports {target}" for name in library for target in GRAPH[name] if target.startswith("streamload.cli")) == []


def test_tools_import_no_tests() -> None:
    tools = sorted((ROOT / "tools").rglob("*.py"))
    assert tools
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in tools
        for name in sorted(imported_names(path, ".".join(path.relative_to(ROOT).with_suffix("").parts)))
        if name == "tests" or name.startswith("tests.")
    ]
    assert offenders == []
