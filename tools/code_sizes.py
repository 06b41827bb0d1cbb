"""Code lines of every function and class of a package: lines that are not blank, not
comments and not docstrings, counted over the whole ``def`` / ``class`` span (a nested
function counts in its parent too).

    python tools/code_sizes.py functorch_reg        # the 25 largest, and any over the limits

The limits (functions 80, classes 250) are the ones ``tests/test_code_sizes.py`` keeps.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FUNCTION_LIMIT = 80
CLASS_LIMIT = 250


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def sizes(package: Path) -> list[tuple[int, str, str]]:
    """``(code lines, "def" | "class", "path:line name")`` for every function and class."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        text = source.splitlines()
        tree = ast.parse(source)
        skip = _docstring_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                count = sum(
                    1
                    for i in span
                    if i not in skip
                    and text[i - 1].strip()
                    and not text[i - 1].strip().startswith("#")
                )
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                rows.append((count, kind, f"{path}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def over_limits(rows: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    return [row for row in rows if row[0] > (CLASS_LIMIT if row[1] == "class" else FUNCTION_LIMIT)]


if __name__ == "__main__":
    rows = sizes(Path(sys.argv[1] if len(sys.argv) > 1 else "functorch_reg"))
    print("over the limits:", over_limits(rows) or "none")
    for row in rows[:25]:
        print(*row)
