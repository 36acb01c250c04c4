"""The step edge (spread.uncertainty.step_edge_energy): the energy of the sharp step with the area f'' has
between its pre- and post-edge levels, and its standard error by linear propagation of a covariance."""

import numpy as np
import pytest
from conftest import SHARED_DATA_DIR

from xfel_spread.spread.tables import energy_grid, read_fp_fdp_table, table_on_grid
from xfel_spread.spread.uncertainty import edge_estimates, step_edge_energy, step_edge_gradient

GRID_EV = energy_grid(7070.0, 7170.0, 1.0)


def table(name):
    return table_on_grid(read_fp_fdp_table(str(SHARED_DATA_DIR / name)), GRID_EV, name)


@pytest.mark.parametrize("edge_ev", [7114.0, 7121.3, 7128.0])
def test_a_sharp_or_smooth_step_gives_its_centre(edge_ev):
    sharp = np.where(GRID_EV >= edge_ev, 3.9, 0.4)
    sharp[np.isclose(GRID_EV, edge_ev)] = 0.5 * (3.9 + 0.4)  # the trapezoid's midpoint of a step on a point
    assert step_edge_energy(GRID_EV, sharp) == pytest.approx(edge_ev, abs=0.5)
    smooth = 0.4 + 3.5 / (1 + np.exp(-(GRID_EV - edge_ev) / 0.7))  # symmetric about its centre
    assert step_edge_energy(GRID_EV, smooth) == pytest.approx(edge_ev, abs=1e-3)
    # No rise, or a grid that does not reach the level ranges (STEP_LEVELS_EV): undefined.
    assert np.isnan(step_edge_energy(GRID_EV, np.full(len(GRID_EV), 1.0)))
    assert np.isnan(step_edge_energy(GRID_EV[GRID_EV < 7130], smooth[GRID_EV < 7130]))


def test_the_shipped_tables_in_order_and_the_gradient_matches_differences():
    edges = {name: step_edge_energy(GRID_EV, table(name)[1])
             for name in ("pf-rd-ox_fftkk.out", "pf-rd-red_fftkk.out", "Fe_fake.dat")}
    # Oxidized above reduced above metallic, as their half-rises (7119.9, 7118.0, 7112.5 eV); the white lines
    # pull the step below the half-rise.
    assert edges["pf-rd-ox_fftkk.out"] > edges["pf-rd-red_fftkk.out"] + 1.0 > edges["Fe_fake.dat"] + 1.0
    fdp = table("pf-rd-ox_fftkk.out")[1]
    gradient = step_edge_gradient(GRID_EV, fdp)
    h = 1e-6
    numeric = np.array([(step_edge_energy(GRID_EV, fdp + h * unit) - step_edge_energy(GRID_EV, fdp - h * unit)) / (2 * h)
                        for unit in np.eye(len(GRID_EV))])
    assert np.max(np.abs(numeric - gradient)) < 1e-6 * np.max(np.abs(gradient))


def test_the_propagated_sigma_is_the_scatter_of_draws_from_the_covariance():
    """Grids drawn from N(table, C) with C smooth-correlated (as the restraints make the fit's errors): the
    step edge's standard deviation over the draws is the linearly propagated sigma edge_estimates gives."""
    fp, fdp = table("pf-rd-ox_fftkk.out")
    n = len(GRID_EV)
    distance = GRID_EV[:, None] - GRID_EV[None, :]
    block = 0.2 ** 2 * np.exp(-0.5 * (distance / 3.0) ** 2) + 1e-6 * np.eye(n)
    covariance = np.zeros((2 * n, 2 * n))
    covariance[:n, :n] = block
    covariance[n:, n:] = block
    (estimate,) = edge_estimates(GRID_EV, fp[None], fdp[None], covariance, n_samples=50)
    assert estimate.step_edge_ev == step_edge_energy(GRID_EV, fdp)
    draws = np.random.default_rng(1).multivariate_normal(fdp, block, size=4000)
    scatter = np.std([step_edge_energy(GRID_EV, row) for row in draws])
    assert estimate.step_edge_sigma_ev == pytest.approx(scatter, rel=0.05)
    assert 0.1 < estimate.step_edge_sigma_ev < 5.0
