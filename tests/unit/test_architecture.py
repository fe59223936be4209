"""The shape of the code (issue 15, DESIGN.md §4), checked on the import graph so that a shortcut fails here:
methods never import engines, engines never import methods, the controller and the reshape pipeline name no method,
and every method is one folder with the same parts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dist_lowrank.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[2] / "dist_lowrank"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (top level and inside functions), as dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [
    ("backends", "dist_lowrank.methods"),
    ("reshape", "dist_lowrank.methods"),
    ("methods", "dist_lowrank.backends"),
])
def test_layers_of_the_design_do_not_import_each_other(folder, forbidden):
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith(forbidden))
                 for p in files(folder)}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{folder}/ imports {forbidden}: {offenders}"


def test_controller_and_engines_name_no_method():
    """No identifier or string in the controller, the pipeline or a backend names a method (comments may). A method
    name that is also everyday torch vocabulary ("tensor") counts only as a string: a variable called `tensor` in a
    backend names no method."""
    names = set(METHODS) | {"InRankLinear", "CuttlefishStrategy", "InRankGrowthRule", "FixedRatioStrategy",
                            "TensorizedLinear", "TensorizedEmbedding"}
    identifiers = names - {"tensor"}
    paths = [PACKAGE / "controller.py", *files("reshape"), *files("backends")]
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in identifiers:
                used.add(node.id)
            elif isinstance(node, ast.Attribute) and node.attr in identifiers:
                used.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                used.add(node.value)
        if used:
            found[str(path.relative_to(PACKAGE))] = sorted(used)
    assert not found, f"method names outside methods/: {found}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_one_folder_with_its_parts(name):
    folder = PACKAGE / "methods" / name
    assert {p.name for p in folder.glob("*.py")} >= {"__init__.py", "config.py", "rule.py", "method.py"}
    module, cls = METHODS[name].split(":")
    assert module == f"dist_lowrank.methods.{name}.method"
