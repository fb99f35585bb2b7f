"""The package's import structure: every module in a layer, imports only downward, no cycles.

The layers are drawn in the README's Layout section; a new module must be placed in one here.
Imports inside functions count too: a deferred upward import is still an upward import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ddpmkit"
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"__init__", "errors", "choices", "validation", "rng", "io", "images", "batch_threads"}),
    ("maths", {"schedules", "group_norm", "unet", "objectives", "metrics"}),
    ("samplers and guidance", {"guidance", "samplers"}),
    ("training and evaluation", {"data", "config", "checkpoint", "classifier", "inception", "fid", "likelihood", "training"}),
    ("experiments", {"ablation", "sweeps", "figures", "report", "demo", "interop"}),
    ("command line", {"cli", "__main__"}),
]
LAYER_OF = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def package_imports(source: str) -> set[str]:
    """The ddpmkit modules a module's source imports, at any depth ("__init__" for the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import a, b: submodules, or a name of the package itself
                found.update(alias.name if alias.name in LAYER_OF else "__init__" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ddpmkit"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ddpmkit."))
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: package_imports(path.read_text()) - {path.stem} for path in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported] if imported in path else [module, imported]
            if imported not in state and (cycle := visit(imported, path + [imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert sorted(set(import_graph()) - set(LAYER_OF)) == []
    assert sorted(set(LAYER_OF) - set(import_graph())) == []  # no stale entries


def test_imports_go_only_downward():
    upward = [
        f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports {imported} ({LAYERS[LAYER_OF[imported]][0]})"
        for module, imports in import_graph().items()
        for imported in sorted(imports)
        if LAYER_OF[imported] > LAYER_OF[module]
    ]
    assert upward == []


def test_there_is_no_import_cycle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_import_reader_sees_deferred_and_absolute_imports():
    source = "from . import __version__, unet\nimport ddpmkit.fid\ndef f():\n    from .training import train\n"
    assert package_imports(source) == {"__init__", "unet", "fid", "training"}


def test_importing_ddpmkit_and_building_the_command_line_loads_no_torch():
    code = "import sys, ddpmkit, ddpmkit.cli; ddpmkit.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
