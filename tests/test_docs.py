"""Every Python snippet of every documentation page runs, each page in order as one script."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
@pytest.mark.slow
def test_page_snippets_run_in_order(page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)  # a snippet that saves a figure writes here
    # A real module, so that torch.compile (dynamo) can import the functions' module.
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, "__docs__", module)
    namespace = module.__dict__
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)


ROOT = DOCS.parent
GUIDE_PAGES = sorted(p.name for p in (DOCS / "guide").glob("*.md"))


def test_readme_is_a_short_map():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_guide_page_is_in_the_readme_table_and_the_nav():
    readme = (ROOT / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("|")]
    linked = set(re.findall(r"\(docs/guide/([\w-]+\.md)\)", "\n".join(table)))
    nav = set(re.findall(r"guide/([\w-]+\.md)", (ROOT / "mkdocs.yml").read_text()))
    assert GUIDE_PAGES, "no guide pages found"
    assert set(GUIDE_PAGES) == linked, "README's tool table must link every guide page"
    assert set(GUIDE_PAGES) == nav, "mkdocs.yml's nav must list every guide page"


def test_readme_links_point_at_files():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), target
