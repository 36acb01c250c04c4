"""SPREAD's energy grid, start tables and restraints (spread.tables, spread.restraints)."""

import numpy as np
import pytest
import torch
from sim_fixtures import SHARED_DATA_DIR

from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.restraints import hilbert_matrix, kk_penalty, smoothness_penalty
from xfel_spread.spread.tables import (
    energy_grid,
    interpolation_matrix,
    read_table,
    table_on_grid,
    table_path,
)


def lorentzian_pair(grid, center_ev, width_ev):
    """An odd-extended Lorentzian absorption line f'' and its exact KK partner f'."""
    def line(u):
        return width_ev / (u ** 2 + width_ev ** 2)

    def dispersion(u):
        return u / (u ** 2 + width_ev ** 2)

    return (dispersion(grid - center_ev) - dispersion(grid + center_ev),
            line(grid - center_ev) - line(grid + center_ev))


@pytest.mark.parametrize("spacing_ev, tolerance", [(1.0, 0.035), (0.5, 0.008), (0.25, 0.002)])
def test_hilbert_matrix_transforms_a_lorentzian(spacing_ev, tolerance):
    grid = energy_grid(6900.0, 7340.0, spacing_ev)
    fp, fdp = lorentzian_pair(grid, 7120.0, 3.0)
    error = np.abs(hilbert_matrix(grid) @ fdp - fp)[(grid > 7070) & (grid < 7170)].max() / np.abs(fp).max()
    # Piecewise-linear sampling of a 3-eV line: second order in the spacing (measured 3.1%, 0.72%, 0.18%).
    assert error < tolerance


def test_shipped_tables_differ_kk_consistently():
    grid = energy_grid(7070.0, 7170.0, 1.0)
    ox = table_on_grid(read_table(table_path("oxidized", str(SHARED_DATA_DIR))), grid, "ox")
    red = table_on_grid(read_table(table_path("reduced", str(SHARED_DATA_DIR))), grid, "red")
    middle = (grid >= 7090) & (grid <= 7150)
    residual = (ox[0] - red[0]) - hilbert_matrix(grid) @ (ox[1] - red[1])
    wrong_sign = (ox[0] - red[0]) + hilbert_matrix(grid) @ (ox[1] - red[1])
    rms = lambda x: np.sqrt(np.mean(x[middle] ** 2))
    # Measured: residual 0.023 e rms against a difference of 0.28 e rms (0.55 with the sign flipped).
    assert rms(residual) < 0.1 * rms(ox[0] - red[0])
    assert rms(wrong_sign) > rms(ox[0] - red[0])
    penalty = kk_penalty(torch.tensor(ox[0]), torch.tensor(ox[1]), torch.tensor(red[0]), torch.tensor(red[1]),
                         torch.tensor(hilbert_matrix(grid)), 2.0)
    assert float(penalty) == pytest.approx(2.0 * np.sum(residual ** 2))


def test_smoothness_penalty_value():
    values = torch.tensor([[0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert float(smoothness_penalty(values, 0.5)) == pytest.approx(0.5 * (1 + 4))


def test_interpolation_matrix_is_linear_interpolation():
    grid = energy_grid(7070.0, 7080.0, 2.0)
    energies = np.array([7070.0, 7071.5, 7079.9, 7080.0])
    values = np.sin(grid)
    assert np.allclose(interpolation_matrix(grid, energies) @ values, np.interp(energies, grid, values))
    assert grid[-1] == 7080.0 and len(energy_grid(7070.0, 7080.5, 2.0)) == 7
    with pytest.raises(SpreadInputError, match="outside the grid"):
        interpolation_matrix(grid, np.array([7081.0]))


def test_table_not_covering_the_grid_is_one_line(tmp_path):
    path = tmp_path / "short.dat"
    np.savetxt(path, [[7000.0, -4.0, 0.5], [7100.0, -5.0, 0.5]])
    with pytest.raises(SpreadInputError, match=r"short.dat: table covers 7000-7100 eV") as info:
        table_on_grid(read_table(str(path)), energy_grid(7070.0, 7170.0), str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(SpreadInputError, match="missing.dat"):
        read_table(str(tmp_path / "missing.dat"))


def test_unreadable_shots_table_is_one_line(tmp_path):
    from xfel_spread.spread.pipeline import converged_parameters

    path = tmp_path / "shard_00000_shots.tsv"
    path.write_text("shot\timage\n0\t0\n")
    with pytest.raises(SpreadInputError, match="shard_00000_shots.tsv: shots table lacks column") as info:
        converged_parameters(path)
    assert "\n" not in str(info.value)
