"""The house stays readable: no function of the package over 80 code lines and no class
over 250 (docstrings, comments and blank lines not counted; `tools/code_sizes.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("code_sizes", ROOT / "tools" / "code_sizes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_function_or_class_of_the_package_is_over_the_limits():
    tool = load_tool()
    rows = tool.sizes(ROOT / "functorch_reg")
    assert len(rows) > 300, "the count found the package's functions"
    assert tool.over_limits(rows) == []


def test_the_count_skips_docstrings_comments_and_blank_lines(tmp_path):
    tool = load_tool()
    (tmp_path / "m.py").write_text(
        'def f():\n    """Doc.\n\n    More."""\n    # a comment\n\n    return 1\n'
        "class C:\n    x = 1\n    def g(self):\n        return 2\n"
    )
    rows = {name.split()[-1]: (count, kind) for count, kind, name in tool.sizes(tmp_path)}
    assert rows == {"f": (2, "def"), "C": (4, "class"), "g": (2, "def")}
    assert tool.over_limits([(81, "def", "x"), (250, "class", "y")]) == [(81, "def", "x")]
