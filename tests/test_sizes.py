"""A newcomer reads any library module in one sitting: none is over 400 lines, no function over 80 (read from the
source, docstrings included; tests and tools are not held to it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [ROOT / "streamload", ROOT / "formats", ROOT / "server"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def library_files() -> list[Path]:
    return sorted(path for folder in LIBRARY for path in folder.rglob("*.py"))


def test_the_library_is_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in library_files()}
    assert {"streamload/download/session.py", "formats/reader.py", "server/app.py", "streamload/runtime/generate.py"} <= names


def test_no_library_module_is_over_400_lines() -> None:
    long = {
        path.relative_to(ROOT).as_posix(): n for path in library_files() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_library_function_is_over_80_lines() -> None:
    long = {
        f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for path in library_files()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}
