"""The layering of the packages, read from their imports (static, every import statement of every module):

    formulas   the calculator: the standard library and itself only (no torch, no models, no harness)
    models     module builders: may use formulas, never harness
    harness    measures: uses both

and no module imports itself back through others (no import cycles among top-level imports), and no module
grows past ~500 lines. A new trainer, method, family or report section goes into a file of its own.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("formulas", "models", "harness")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute module names imported by a file (every statement, or those that run at import time)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _root(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("name", [n for n in modules() if _root(n) == "formulas"])
def test_formulas_imports_only_the_standard_library_and_itself(name):
    bad = {i for i in imports(modules()[name]) if _root(i) not in sys.stdlib_module_names and _root(i) != "formulas"}
    assert not bad, f"{name} imports {sorted(bad)}: formulas must stay a calculator without torch, models or harness"


@pytest.mark.parametrize("name", [n for n in modules() if _root(n) == "models"])
def test_models_never_import_harness(name):
    bad = {i for i in imports(modules()[name]) if _root(i) == "harness"}
    assert not bad, f"{name} imports {sorted(bad)}: models build modules and know nothing about measuring"


def test_no_import_cycles():
    """Top-level imports form a DAG (a cycle means two modules are one module, or one is in the wrong place)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            # The most specific module each statement needs: `from harness.zero import config` needs
            # harness.zero.config, `from formulas.spec import RunSpec` formulas.spec, `import a.b` a.b.
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                wanted = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                ]
            else:
                continue
            for imported in wanted:
                while imported and imported not in mods:
                    imported = imported.rpartition(".")[0]
                if imported and imported != name:
                    targets.add(imported)
        graph[name] = targets
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_layering_test_sees_a_violation(tmp_path):
    """The checks above read real import statements: a module that imports torch is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from __future__ import annotations\n\ndef f():\n    import torch\n    from harness.records import Record\n"
    )
    found = imports(bad)
    assert "torch" in found and "harness.records" in found
    assert imports(bad, top_level_only=True) == {"__future__", "__future__.annotations"}


@pytest.mark.parametrize("name", list(modules()))
def test_modules_stay_small(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by role (see the README's development section)"
