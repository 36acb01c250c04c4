"""Imports inside the package run one way: from the command line down to the file formats.

Each top-level module or package of ``xfel_spread`` has a rank (:data:`RANKS`): the bottom layer
(atomic writes, errors, MPI, plotting, settings, reference data, file formats), then the simulator,
then one package per pipeline stage in pipeline order, then the report, then the command line. A
module may import from a lower rank, or from its own package; not from a higher rank, nor from
another package of the same rank. Nothing imports the benchmarks or the tests, and the old
``analysis`` package stays gone. The scan reads the source (every import statement, also those
inside functions), so it needs nothing installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "xfel_spread"

#: Rank of every top-level module and package of xfel_spread; a new one must be given a rank here.
RANKS = {
    "__init__": 0, "atomic": 0, "errors": 0,
    "mpi": 1, "plotting": 1, "progress": 1,
    "config": 2, "reference": 2, "io": 2,
    "sim": 3,
    "hitfind": 4, "dials": 5, "cells": 6, "merging": 7, "annulus": 8, "stage1": 9, "spread": 10,
    # workflow: the Snakefile's parse-time checks of a whole run (phil files, metrology engine), above the stages.
    "report": 11, "workflow": 11,
    "cli": 12,
}
#: Top-level names no module of the package may import (the benchmarks, the tests and their helpers).
FORBIDDEN_TOP_LEVEL = {"benchmarks", "tests"} | {path.stem for directory in ("tests", "benchmarks")
                                                for path in (ROOT / directory).glob("*.py")}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the module ``module`` (dotted,
    e.g. ``xfel_spread.dials.stills``); relative imports are resolved, ``from p import m`` gives
    ``p.m`` as well as ``p`` (``m`` may be a module)."""
    found = []
    package_parts = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package_parts[:len(package_parts) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def top_level(module: str) -> str:
    """The rank key of a module of the package: ``xfel_spread.dials.stills`` -> ``dials``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(module: str, source: str) -> list[str]:
    """The imports of ``module`` (source ``source``) that break the layer order, one line each."""
    own = top_level(module)
    problems = []
    if own not in RANKS:
        return [f"{module}: {own} has no rank in tests/test_layers.py RANKS"]
    for line, target in imported_modules(source, module):
        first = target.split(".")[0]
        if first in FORBIDDEN_TOP_LEVEL:
            problems.append(f"{module}:{line} imports {target} (benchmarks and tests are not for the package)")
            continue
        if first != "xfel_spread" or target == "xfel_spread":
            continue
        other = top_level(target)
        if other == own:
            continue
        if other not in RANKS:
            problems.append(f"{module}:{line} imports {target}, whose {other} has no rank in RANKS")
        elif RANKS[other] > RANKS[own]:
            problems.append(f"{module}:{line} imports {target}: {other} (rank {RANKS[other]}) is above "
                            f"{own} (rank {RANKS[own]})")
        elif RANKS[other] == RANKS[own]:
            problems.append(f"{module}:{line} imports {target}: {other} and {own} share rank {RANKS[own]}")
    return problems


def package_modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of the package; a package's own module ends in ``__init__``."""
    return [(".".join(("xfel_spread",) + path.relative_to(PACKAGE).with_suffix("").parts), path)
            for path in sorted(PACKAGE.rglob("*.py"))]


def test_imports_follow_the_layers():
    problems = [problem for module, path in package_modules() for problem in layer_violations(module, path.read_text())]
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_every_top_level_module_has_a_rank():
    names = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if (path.is_file() and path.suffix == ".py") or (path / "__init__.py").is_file()}
    assert names <= set(RANKS), f"modules without a rank in RANKS: {sorted(names - set(RANKS))}"


def test_the_analysis_package_is_gone():
    assert not (PACKAGE / "analysis").exists(), f"{PACKAGE / 'analysis'} is back; its parts live in the stages"
    assert "analysis" not in RANKS


def test_the_checker_reports_a_backward_import():
    # A stage importing a later stage, the command line, or the tests; a same-rank neighbour.
    source = ("import numpy\n"
              "from xfel_spread.io.expt import read_lattices\n"
              "from xfel_spread.dials import stills\n"
              "def f():\n"
              "    from xfel_spread.merging.scoring import pearson_cc\n"
              "    import xfel_spread.cli.merge\n"
              "    from tests.conftest import something\n"
              "from .stills import output_paths\n")
    problems = layer_violations("xfel_spread.dials.example", source)
    assert [problem.split(" imports ")[1].split(":")[0].split(" ")[0] for problem in problems] == [
        "xfel_spread.merging.scoring", "xfel_spread.merging.scoring.pearson_cc", "xfel_spread.cli.merge",
        "tests.conftest", "tests.conftest.something"]
    assert problems[0] == ("xfel_spread.dials.example:5 imports xfel_spread.merging.scoring: merging (rank 7) "
                           "is above dials (rank 5)")
    assert layer_violations("xfel_spread.io.example", "from xfel_spread.config import load_config\n") == [
        "xfel_spread.io.example:1 imports xfel_spread.config: config and io share rank 2",
        "xfel_spread.io.example:1 imports xfel_spread.config.load_config: config and io share rank 2"]
    assert layer_violations("xfel_spread.cli.example", "from xfel_spread.merging import scoring\n") == []
    assert layer_violations("xfel_spread.analysis.truth", "") == [
        "xfel_spread.analysis.truth: analysis has no rank in tests/test_layers.py RANKS"]
