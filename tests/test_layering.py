"""The package's import graph, read from the source with ``ast``: no cycle among the
imports that run when a module loads, and the update rules (``functorch_reg/optim/``)
below everything that uses them.

The rule the code follows: ``optim/`` imports, at module level, only ``optim/`` itself
and the base modules (``tree``, ``select``, ``_checks``, ``_memory``, ``transforms``);
the one way up is ``flat``, imported inside ``for_flat`` (``optim/base.py``), which
translates a rule to a flat layout only when the flat layout asks for it. Imports under
``if TYPE_CHECKING:`` are annotations only and are left out of the runtime graph.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "functorch_reg"
NAME = "functorch_reg"

# What optim/ may import at module level, besides optim/ itself.
OPTIM_BASE = {f"{NAME}.{m}" for m in ("tree", "select", "_checks", "_memory", "transforms")}
# What optim/ may import inside a function: (importing module, function) -> modules.
OPTIM_LAZY = {(f"{NAME}.optim.base", "for_flat"): {f"{NAME}.flat"}}


@dataclass
class Imports:
    """A module's imports of the package: at load time, inside functions (with the
    function's name), and for type checking only."""

    eager: set[str] = field(default_factory=set)
    lazy: set[tuple[str, str]] = field(default_factory=set)
    typing: set[str] = field(default_factory=set)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules an import statement loads (``from . import x`` loads ``x``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == NAME}
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base.split(".")[0] != NAME:
        return set()
    found = {base}
    found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(module: str) -> Imports:
    path = MODULES[module]
    found = Imports()
    is_package = path.name == "__init__.py"

    def visit(nodes: list[ast.stmt], function: str | None, typing_only: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = targets(module, is_package, node)
                if typing_only:
                    found.typing |= names
                elif function is None:
                    found.eager |= names
                else:
                    found.lazy |= {(name, function) for name in names}
                continue
            inner = function
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = node.name
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], inner, typing_only or is_type_checking(node))

    visit(ast.parse(path.read_text()).body, None, False)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def eager_edges(module: str) -> set[str]:
    """The modules loading ``module`` loads: its eager imports and their parent packages."""
    edges = set()
    for target in GRAPH[module].eager:
        parts = target.split(".")
        edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {edge for edge in edges if edge in MODULES and edge != module}


def find_cycle() -> list[str] | None:
    """A cycle of eager imports among the package's modules (a package's ``__init__``
    importing its own submodules is not one), or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(eager_edges(module)):
            if module.startswith(target + "."):
                continue  # a submodule needs its package loaded first: not an edge back
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(MODULES):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    # The reader would pass the tests below by reading nothing: pin what it must see.
    assert f"{NAME}.optim.base" in GRAPH[f"{NAME}.optim.adam"].eager
    assert (f"{NAME}.flat", "for_flat") in GRAPH[f"{NAME}.optim.base"].lazy
    assert f"{NAME}.hypergrad" in GRAPH[f"{NAME}._plot"].typing
    assert f"{NAME}.hypergrad" not in GRAPH[f"{NAME}._plot"].eager
    assert f"{NAME}._graph_pass" in {name for name, _ in GRAPH[f"{NAME}.train"].lazy}


def test_no_cycle_among_the_imports_that_run_at_load_time():
    assert find_cycle() is None


def test_a_cycle_would_be_found():
    saved = set(GRAPH[f"{NAME}.tree"].eager)
    GRAPH[f"{NAME}.tree"].eager.add(f"{NAME}.optim.base")
    try:
        cycle = find_cycle()
    finally:
        GRAPH[f"{NAME}.tree"].eager = saved
    assert cycle is not None and cycle[0] == cycle[-1]


def test_optim_imports_only_the_base_modules():
    for module in sorted(m for m in MODULES if m.startswith(f"{NAME}.optim")):
        upward = {
            target
            for target in GRAPH[module].eager
            if not target.startswith(f"{NAME}.optim") and target not in OPTIM_BASE
        }
        assert not upward, f"{module} imports {sorted(upward)} at module level"
        for target, function in GRAPH[module].lazy:
            if target.startswith(f"{NAME}.optim") or target in OPTIM_BASE:
                continue
            allowed = OPTIM_LAZY.get((module, function), set())
            assert target in allowed, f"{module}.{function} imports {target}"


def test_base_modules_import_nothing_above_them():
    # The modules every other one builds on stay at the bottom: tree and the private
    # helpers import no module of the package but each other and tree.
    bottom = {f"{NAME}.{m}" for m in ("tree", "_checks", "_linear_solve", "_compile_log")}
    for module in sorted(bottom | {f"{NAME}._memory"}):
        assert GRAPH[module].eager <= bottom, (module, GRAPH[module].eager)
