"""Code-quality gates that ruff and mypy do not cover.

* No function in the package is longer than :data:`MAX_LINES` lines of code
  (its docstring and blank lines not counted) unless its ``def`` line carries a
  ``# long: <reason>`` comment.
* The core (everything but the application modules) imports nothing of
  matplotlib, scikit-learn, scipy, tqdm or PIL.
* Only the layer tap registers hooks on a user's modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captum_pattern"
MAX_LINES = 60


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    lines = source[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def _long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            header = " ".join(source[node.lineno - 1 : node.body[0].lineno - 1])
            if re.search(r"#\s*long:\s*\S", header):
                continue
            count = _code_lines(node, source)
            if count > MAX_LINES:
                found.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({count})"
                )
    return found


def test_no_function_is_longer_than_the_limit_without_a_reason():
    assert _long_functions() == []


def test_the_checker_counts_code_lines_only():
    source = [
        "def f():",
        '    """Doc."""',
        "",
        "    # a comment",
        "    x = 1",
        "    return x",
    ]
    node = ast.parse("\n".join(source)).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _code_lines(node, source) == 2


def test_only_the_tap_registers_hooks_on_user_modules():
    allowed = {"tap.py"}
    users = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name not in allowed
        and re.search(r"\.register_(forward|full_backward|backward)\w*hook\(", path.read_text())
    ]
    assert users == []
