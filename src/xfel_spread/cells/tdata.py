"""Unit cells of integrated lattices, in cctbx.xfel.merge's tdata format.

A tdata file has one line per lattice: ``a b c alpha beta gamma SG``, the six cell parameters written
with ``%f`` (Angstrom, degrees) and the space group's lookup symbol without spaces (``C12/m1``), as
cctbx.xfel.merge's tdata worker writes them.

At production scale a dataset has 100,000 lattices in a few hundred ``.expt`` files, so the files are
read as plain JSON instead of through dxtbx (whose ExperimentList builds every model): only each
crystal's real-space vectors and Hall symbol are needed. The cell is computed the way dxtbx's
``Crystal`` computes it from those vectors, so the numbers are bit-identical to
``crystal.get_unit_cell().parameters()``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output
from xfel_spread.errors import UserInputError
from xfel_spread.io.expt import load_experiment_json
from xfel_spread.progress import Progress

log = logging.getLogger(__name__)

#: Names of the six cell parameters, in tdata column order.
CELL_PARAMETERS = ("a", "b", "c", "alpha", "beta", "gamma")
#: Format of one tdata line (cctbx.xfel.merge's tdata worker).
TDATA_LINE = "%f %f %f %f %f %f %s"
#: How often reading many experiment files logs its progress.
PROGRESS_INTERVAL_S = 10.0
# scitbx's degrees-per-radian divisor (constants::pi_180), so angles round exactly as dxtbx's do.
_PI_180 = math.atan(1.0) / 45.0


class TdataError(UserInputError, ValueError):
    """An experiment list or tdata file that cannot be read; the message is one line naming the file."""


def _dot(u: Sequence[float], v: Sequence[float]) -> float:
    """Scalar product summed in scitbx's order (x, then y, then z)."""
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def cell_parameters(real_space_a: Sequence[float], real_space_b: Sequence[float],
                    real_space_c: Sequence[float]) -> tuple[float, float, float, float, float, float]:
    """(a, b, c, alpha, beta, gamma) of a crystal given by its real-space vectors (Angstrom, degrees).

    Mirrors dxtbx's ``Crystal`` constructor (vector lengths and ``acos`` of normalised scalar
    products, converted with scitbx's constant), and uses the C library's ``acos`` (``math.acos``)
    rather than numpy's vectorised one, which differs in the last bit.
    """
    lengths = [math.sqrt(_dot(v, v)) for v in (real_space_a, real_space_b, real_space_c)]

    def angle(u, v, length_u, length_v):
        return math.acos(_dot(u, v) / (length_u * length_v)) / _PI_180

    return (lengths[0], lengths[1], lengths[2],
            angle(real_space_b, real_space_c, lengths[1], lengths[2]),
            angle(real_space_c, real_space_a, lengths[2], lengths[0]),
            angle(real_space_a, real_space_b, lengths[0], lengths[1]))


@functools.lru_cache(maxsize=None)
def space_group_symbol(hall_symbol: str) -> str:
    """The space group's lookup symbol without spaces (``-C 2y`` -> ``C12/m1``); RuntimeError if unknown."""
    from cctbx import sgtbx

    return "".join(sgtbx.space_group(hall_symbol).type().lookup_symbol().split())


def format_tdata_line(cell: Sequence[float], symbol: str) -> str:
    """One tdata line (without the newline)."""
    return TDATA_LINE % (*cell, symbol)


def _load_experiment_list(path: Path) -> dict:
    """The parsed JSON of a DIALS experiment list; TdataError if it is not one."""
    try:
        document = load_experiment_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TdataError(f"{path}: not a DIALS experiment list (invalid JSON: {error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("experiment"), list):
        raise TdataError(f"{path}: not a DIALS experiment list (no 'experiment' list)")
    return document


def experiment_cells(path: str | Path) -> list[tuple[tuple[float, ...], str]]:
    """(cell parameters, space group symbol) of every experiment of a ``.expt`` file, in order.

    An empty experiment list (a shard where nothing integrated) gives an empty list.
    """
    path = Path(path)
    document = _load_experiment_list(path)
    crystals = document.get("crystal", [])
    cells = []
    for number, experiment in enumerate(document["experiment"]):
        crystal_index = experiment.get("crystal") if isinstance(experiment, dict) else None
        if not isinstance(crystal_index, int) or not 0 <= crystal_index < len(crystals):
            raise TdataError(f"{path}: experiment {number} has no crystal model")
        crystal = crystals[crystal_index]
        try:
            cell = cell_parameters(crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"])
            symbol = space_group_symbol(crystal["space_group_hall_symbol"])
        except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError, RuntimeError) as error:
            raise TdataError(f"{path}: crystal {crystal_index} of experiment {number} is malformed "
                             f"({type(error).__name__}: {error})") from None
        cells.append((cell, symbol))
    return cells


def tdata_lines(experiment_paths: Sequence[str | Path]) -> list[str]:
    """The tdata lines of all lattices, in file order then experiment order; TdataError if there are none."""
    lines: list[str] = []
    started = time.monotonic()
    progress = Progress(len(experiment_paths), "read", log.info, PROGRESS_INTERVAL_S, items="experiment files",
                        report_end=False)  # the end has its own line below
    for path in experiment_paths:
        lines.extend(format_tdata_line(cell, symbol) for cell, symbol in experiment_cells(path))
        progress.advance(detail=f" ({len(lines)} lattices)")
    if not lines:
        raise TdataError(f"{len(experiment_paths)} experiment files ({experiment_paths[0]} ...) hold no "
                         "lattice at all" if experiment_paths else "no experiment files given")
    log.info("%d lattices from %d experiment files in %.1f s", len(lines), len(experiment_paths),
             time.monotonic() - started)
    return lines


def write_tdata(experiment_paths: Sequence[str | Path], output: str | Path) -> int:
    """Write the tdata file of all lattices of ``experiment_paths`` atomically; return the lattice count."""
    lines = tdata_lines(experiment_paths)
    with atomic_output(output, "w") as stream:
        stream.write("".join(line + "\n" for line in lines))
    return len(lines)


def _parse_tdata_line(text: str, path: Path, line_number: int) -> tuple[list[float], str]:
    """Cell parameters and symbol of one tdata line; TdataError naming the file and line if malformed."""
    fields = text.split()
    problem = None
    if len(fields) != 7:
        problem = f"expected 6 cell parameters and a space group symbol, got {len(fields)} fields"
    else:
        try:
            cell = [float(value) for value in fields[:6]]
        except ValueError:
            problem = "a cell parameter is not a number"
        else:
            if not all(math.isfinite(value) and value > 0 for value in cell):
                problem = "cell parameters must be finite and positive"
    if problem is not None:
        raise TdataError(f"{path}:{line_number}: {problem}: {text.strip()[:80]!r}")
    return cell, fields[6]


def read_tdata(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Cells (n, 6: a, b, c, alpha, beta, gamma) and space group symbols of a tdata file.

    Blank lines are skipped; a malformed line or a file without cells raises TdataError.
    """
    path = Path(path)
    cells, symbols = [], []
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line_number, text in enumerate(stream, start=1):
            if text.strip():
                cell, symbol = _parse_tdata_line(text, path, line_number)
                cells.append(cell)
                symbols.append(symbol)
    if not cells:
        raise TdataError(f"{path}: no unit cells (empty tdata file)")
    return np.array(cells, dtype=float), symbols
