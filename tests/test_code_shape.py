"""Modules that each do one thing: no module of mesh/ over 450 lines, no function
over 60 (generated code aside)."""

from __future__ import annotations

import ast
from pathlib import Path

MESH = Path(__file__).resolve().parent.parent / "mesh"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return [p for p in sorted(MESH.rglob("*.py")) if "v1" not in p.relative_to(MESH).parts]


def test_no_module_over_450_lines() -> None:
    long = {
        str(p.relative_to(MESH)): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_over_60_lines() -> None:
    long: dict[str, int] = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(MESH)}:{node.name}"] = lines
    assert long == {}
