"""The benchmarks still import: every name a benchmark takes from the package (or from a sibling
benchmark) exists. They run by hand on completed runs, so a renamed function would otherwise break
one silently (stage1_mosaic_floor.py did, after ``dense_evaluator`` became ``shot_evaluator``)."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def checked_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each ``from ... import`` of the package or of a sibling benchmark."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None and (
                node.module.split(".")[0] == "xfel_spread" or (path.parent / f"{node.module}.py").is_file()):
            found.append((node.module, [alias.name for alias in node.names]))
    return found


#: The benchmarks that import from the package (the others drive the command line or Snakemake).
IMPORTING = [path for path in BENCHMARKS if checked_imports(path)]


def test_most_benchmarks_import_from_the_package():
    assert len(IMPORTING) >= len(BENCHMARKS) - 3


@pytest.mark.parametrize("path", IMPORTING, ids=[path.name for path in IMPORTING])
def test_benchmark_imports_resolve(path):
    missing = []
    for module_name, names in checked_imports(path):
        if module_name.split(".")[0] == "xfel_spread":
            module = importlib.import_module(module_name)
            missing += [f"{module_name}.{name}" for name in names
                        if not hasattr(module, name) and not (
                            hasattr(module, "__path__") and importlib.util.find_spec(f"{module_name}.{name}"))]
        else:
            sibling = defined_names(path.parent / f"{module_name}.py")
            missing += [f"{module_name}.{name}" for name in names if name not in sibling]
    assert not missing, f"{path.name} imports names that do not exist: {', '.join(missing)}"
