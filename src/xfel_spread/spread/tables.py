"""Energy grid of the refined f', f'' and the tables they start from.

Each site's f' and f'' (electrons) are free at the points of a uniform energy grid (eV); between
them they are linear, so the values at the shots' channel energies are a fixed linear map of the
grid values (:func:`interpolation_matrix`). Start tables are three-column (energy eV, f', f'')
files; the names ``oxidized``, ``reduced`` and ``metallic`` choose the shipped LY99 tables
(``pf-rd-ox_fftkk.out``, ``pf-rd-red_fftkk.out``, ``Fe_fake.dat`` in the shared data directory).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from xfel_spread.sim.structure_factors import ModelFileError, read_fp_fdp_table
from xfel_spread.spread.errors import SpreadInputError

#: The shipped tables the start-table names choose.
NAMED_TABLES = {"oxidized": "pf-rd-ox_fftkk.out", "reduced": "pf-rd-red_fftkk.out", "metallic": "Fe_fake.dat"}


def energy_grid(min_energy_ev: float, max_energy_ev: float, spacing_ev: float = 1.0) -> np.ndarray:
    """Uniform grid (eV) from ``min_energy_ev`` that covers ``max_energy_ev`` with spacing ``spacing_ev``."""
    if not (spacing_ev > 0 and np.isfinite(spacing_ev)):
        raise SpreadInputError(f"spread.grid_spacing_ev: must be positive, got {spacing_ev}")
    if not max_energy_ev >= min_energy_ev:
        raise SpreadInputError(f"energy range {min_energy_ev}-{max_energy_ev} eV is empty")
    n_points = int(np.ceil((max_energy_ev - min_energy_ev) / spacing_ev - 1e-9)) + 1
    return min_energy_ev + spacing_ev * np.arange(max(n_points, 2), dtype=np.float64)


def table_path(choice: str, data_dir: str) -> str:
    """The file of a start table: a shipped table's name (see :data:`NAMED_TABLES`) or a path."""
    return os.path.join(data_dir, NAMED_TABLES[choice]) if choice in NAMED_TABLES else choice


def read_table(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(energy eV, f', f'') of a three-column table, SpreadInputError naming the file if unusable."""
    try:
        return read_fp_fdp_table(path)
    except ModelFileError as exc:
        raise SpreadInputError(str(exc)) from None


def table_on_grid(table: tuple[np.ndarray, np.ndarray, np.ndarray], grid_ev: np.ndarray,
                  source: str) -> tuple[np.ndarray, np.ndarray]:
    """f', f'' (electrons) of a table at the grid energies, linearly interpolated; a table that does
    not cover the grid is refused with one line naming ``source``."""
    energy, fp, fdp = table
    if grid_ev.min() < energy[0] or grid_ev.max() > energy[-1]:
        raise SpreadInputError(f"{source}: table covers {energy[0]:g}-{energy[-1]:g} eV, the spectra need "
                               f"{grid_ev.min():g}-{grid_ev.max():g} eV")
    return np.interp(grid_ev, energy, fp), np.interp(grid_ev, energy, fdp)


def interpolation_matrix(grid_ev: np.ndarray, energies_ev: np.ndarray) -> np.ndarray:
    """(n_energies, n_grid) matrix W of linear interpolation: values at ``energies_ev`` = W @ grid values.

    Energies outside the grid are refused (the grid must cover every channel).
    """
    grid_ev = np.asarray(grid_ev, dtype=np.float64)
    energies_ev = np.asarray(energies_ev, dtype=np.float64)
    tolerance = 1e-9 * max(1.0, abs(grid_ev[-1]))
    if energies_ev.min() < grid_ev[0] - tolerance or energies_ev.max() > grid_ev[-1] + tolerance:
        raise SpreadInputError(f"channel energies {energies_ev.min():g}-{energies_ev.max():g} eV fall outside the "
                               f"grid {grid_ev[0]:g}-{grid_ev[-1]:g} eV")
    position = np.clip(np.searchsorted(grid_ev, energies_ev, side="right") - 1, 0, len(grid_ev) - 2)
    fraction = np.clip((energies_ev - grid_ev[position]) / (grid_ev[position + 1] - grid_ev[position]), 0.0, 1.0)
    matrix = np.zeros((len(energies_ev), len(grid_ev)))
    rows = np.arange(len(energies_ev))
    matrix[rows, position] += 1.0 - fraction
    matrix[rows, position + 1] += fraction
    return matrix


def channel_values(grid_values: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Values at the channel energies, ``grid_values[..., n_grid] @ matrix^T``; differentiable."""
    return grid_values @ matrix.T
