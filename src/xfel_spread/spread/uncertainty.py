"""Standard errors of the refined grids and of each site's edge positions.

Covariance of the grids
    The Fisher information of the pixels at the minimum with the nuisance profiled out
    (:func:`xfel_spread.spread.information.profile_fisher`) plus the restraints' Hessian (they are
    quadratic); the covariance is the inverse.

Edge positions, per site
    ``half_rise_ev``: the energy at which f'' first reaches half-way from its pre-edge level (mean
    over the grid's first ``pre_edge_ev`` eV) to its maximum, linear between grid points.
    ``fp_minimum_ev``: the energy of the f' minimum, by a parabola through the lowest grid point
    and its neighbours. ``half_rise_post_ev``: the half-rise with the top level the mean of the grid's
    last 20 eV instead of the maximum (robust where f'' has a shoulder near the half level, as the
    oxidized table has; see :func:`half_rise_post_edge_energy`). On the shipped tables (1 eV grid from 7070 eV): oxidized 7119.9 / 7123.0 eV,
    reduced 7118.0 / 7116.1 eV, metallic 7112.5 / 7111.2 eV. Their standard errors come from
    sampling grids from the posterior normal N(grids, covariance). ``step_edge_ev``: the energy of the
    sharp step with the area f'' has between its pre- and post-edge levels (:func:`step_edge_energy`), an
    average over the rise whose standard error is the linear propagation of the covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfel_spread.spread.fit import Nuisance, SpreadProblem
from xfel_spread.spread.information import profile_fisher


def grid_covariance(problem: SpreadProblem, theta: np.ndarray, nuisance: Nuisance) -> np.ndarray:
    """Covariance of the flat grid vector [f'.ravel(), f''.ravel()] (electrons^2)."""
    return covariance_from_information(profile_fisher(problem, theta, nuisance) + problem.restraint_hessian(theta))


def covariance_from_information(information: np.ndarray) -> np.ndarray:
    """The inverse of an information matrix (the data's Fisher information plus the restraints' Hessian),
    symmetrised first so that rounding cannot make the covariance asymmetric."""
    return np.linalg.inv(0.5 * (information + information.T))


def half_rise_energy(grid_ev: np.ndarray, fdp: np.ndarray, pre_edge_ev: float = 20.0,
                     post_edge_ev: float | None = None) -> float:
    """Energy (eV) where f'' first reaches half-way from its pre-edge mean to its maximum.

    With ``post_edge_ev`` the top level is the mean over the grid's last ``post_edge_ev`` eV instead of
    the maximum (:func:`half_rise_post_edge_energy`)."""
    pre = float(np.mean(fdp[grid_ev < grid_ev[0] + pre_edge_ev]))
    top = float(np.max(fdp)) if post_edge_ev is None else float(np.mean(fdp[grid_ev > grid_ev[-1] - post_edge_ev]))
    half = 0.5 * (pre + top)
    above = np.flatnonzero(fdp >= half)
    i = int(above[0]) if above.size else len(fdp) - 1
    if i == 0:
        return float(grid_ev[0])
    return float(grid_ev[i - 1] + (half - fdp[i - 1]) / (fdp[i] - fdp[i - 1]) * (grid_ev[i] - grid_ev[i - 1]))


def half_rise_post_edge_energy(grid_ev: np.ndarray, fdp: np.ndarray, pre_edge_ev: float = 20.0,
                               post_edge_ev: float = 20.0) -> float:
    """The half-rise with the level half-way between the means of the grid's first ``pre_edge_ev`` and
    last ``post_edge_ev`` eV of f'' (both linear in the grid, so noise does not bias the level, as it
    biases the maximum of a noisy curve upwards)."""
    return half_rise_energy(grid_ev, fdp, pre_edge_ev, post_edge_ev)


#: The energy ranges (eV) whose mean f'' are the step edge's pre- and post-edge levels: either side of the Fe K
#: edge, clear of the rise (7110-7120 eV in the shipped tables) and of the oxidized white line (to 7130 eV),
#: and inside the well-measured middle of LY99's 100 channels (the grid's ends, 7070-7090 and 7150-7170 eV,
#: carry f'' sigmas near 1 e at 200 lattices, and levels taken there left the step's sigma at 5-6 eV).
STEP_LEVELS_EV = ((7095.0, 7108.0), (7135.0, 7150.0))


def _step_edge_functionals(grid_ev: np.ndarray, levels_ev=STEP_LEVELS_EV):
    """(pre, post, area weights, upper end): the linear functionals :func:`step_edge_energy` is made of;
    None where the grid has no point in a level range or the window between them."""
    grid_ev = np.asarray(grid_ev, dtype=np.float64)
    (pre_lo, pre_hi), (post_lo, post_hi) = levels_ev
    pre_points = (grid_ev >= pre_lo) & (grid_ev < pre_hi)
    post_points = (grid_ev > post_lo) & (grid_ev <= post_hi)
    inside = (grid_ev >= pre_hi) & (grid_ev <= post_lo)
    if pre_points.sum() == 0 or post_points.sum() == 0 or inside.sum() < 2:
        return None
    pre = pre_points / pre_points.sum()
    post = post_points / post_points.sum()
    # The window between the two level ranges, trapezoid weights on its grid points.
    x = grid_ev[inside]
    steps = np.diff(x)
    weights = np.zeros_like(x)
    weights[:-1] += 0.5 * steps
    weights[1:] += 0.5 * steps
    area = np.zeros_like(grid_ev)
    area[inside] = weights
    return pre, post, area, float(x[-1])


def step_edge_energy(grid_ev: np.ndarray, fdp: np.ndarray, levels_ev=STEP_LEVELS_EV) -> float:
    """The energy (eV) of the sharp step with the area f'' has between its pre- and post-edge levels.

    With ``pre`` and ``post`` the mean f'' over the two ranges of ``levels_ev`` and the window [lo, hi]
    between them (its grid points), ``E = hi - integral_lo^hi (f'' - pre) / (post - pre) dE``: an ideal step
    at E0 inside the window gives E0. Unlike the half-rise crossings it averages over the whole rise, so a
    grid point's error moves it by its own share (about 1 eV x error / step height) and no crossing can
    jump; it is a ratio of linear functionals of f'', so its standard error follows from the grid
    covariance by linear propagation (:func:`step_edge_gradient`). A white line moves it from the
    half-rise; compare it with the same measure of a reference table. On the shipped tables (1 eV grid):
    oxidized 7120.64, reduced 7118.43, metallic 7112.36 eV. NaN when the grid does not cover the ranges or
    the post-edge level is not above the pre-edge one."""
    functionals = _step_edge_functionals(grid_ev, levels_ev)
    if functionals is None:
        return float("nan")
    pre, post, area, hi = functionals
    fdp = np.asarray(fdp, dtype=np.float64)
    low, high = float(pre @ fdp), float(post @ fdp)
    height = high - low
    if not height > 1e-9 * max(1.0, abs(low), abs(high)):  # rounding of equal levels is no rise
        return float("nan")
    return hi - float(area @ fdp - low * area.sum()) / height


def step_edge_gradient(grid_ev: np.ndarray, fdp: np.ndarray, levels_ev=STEP_LEVELS_EV) -> np.ndarray:
    """d :func:`step_edge_energy` / d f'' at ``fdp`` (per grid point, eV per electron; NaN where it is NaN)."""
    fdp = np.asarray(fdp, dtype=np.float64)
    if np.isnan(step_edge_energy(grid_ev, fdp, levels_ev)):
        return np.full(len(fdp), np.nan)
    pre, post, area, _ = _step_edge_functionals(grid_ev, levels_ev)
    height = float(post @ fdp - pre @ fdp)
    numerator_weights = area - area.sum() * pre
    numerator = float(numerator_weights @ fdp)
    return -(numerator_weights / height - numerator * (post - pre) / height ** 2)


def fp_minimum_energy(grid_ev: np.ndarray, fp: np.ndarray) -> float:
    """Energy (eV) of the f' minimum (parabola through the lowest grid point and its neighbours)."""
    j = int(np.argmin(fp))
    if j == 0 or j == len(fp) - 1:
        return float(grid_ev[j])
    a, b, c = fp[j - 1], fp[j], fp[j + 1]
    curvature = a - 2 * b + c
    offset = 0.5 * (a - c) / curvature if curvature > 0 else 0.0
    return float(grid_ev[j] + offset * (grid_ev[j + 1] - grid_ev[j]))


@dataclass(frozen=True)
class EdgeEstimate:
    """A site's edge positions (eV) with standard errors from posterior samples."""

    half_rise_ev: float
    half_rise_sigma_ev: float
    fp_minimum_ev: float
    fp_minimum_sigma_ev: float
    #: :func:`half_rise_post_edge_energy` and its standard error.
    half_rise_post_ev: float = float("nan")
    half_rise_post_sigma_ev: float = float("nan")
    #: :func:`step_edge_energy` and its standard error by linear propagation of the covariance.
    step_edge_ev: float = float("nan")
    step_edge_sigma_ev: float = float("nan")


def edge_estimates(grid_ev: np.ndarray, fp: np.ndarray, fdp: np.ndarray, covariance: np.ndarray,
                   n_samples: int = 500, seed: int = 0) -> list[EdgeEstimate]:
    """Edge positions of every site (fp, fdp: n_sites x n_grid) with sigmas from ``n_samples`` draws."""
    n_sites, n_grid = fp.shape
    theta = np.concatenate([fp.ravel(), fdp.ravel()])
    samples = np.random.default_rng(seed).multivariate_normal(theta, covariance, size=n_samples, method="cholesky")
    estimates = []
    for site in range(n_sites):
        fp_rows = samples[:, site * n_grid:(site + 1) * n_grid]
        fdp_rows = samples[:, (n_sites + site) * n_grid:(n_sites + site + 1) * n_grid]
        rise = [half_rise_energy(grid_ev, row) for row in fdp_rows]
        minimum = [fp_minimum_energy(grid_ev, row) for row in fp_rows]
        post = [half_rise_post_edge_energy(grid_ev, row) for row in fdp_rows]
        block = slice((n_sites + site) * n_grid, (n_sites + site + 1) * n_grid)
        gradient = step_edge_gradient(grid_ev, fdp[site])
        estimates.append(EdgeEstimate(half_rise_energy(grid_ev, fdp[site]), float(np.std(rise)),
                                      fp_minimum_energy(grid_ev, fp[site]), float(np.std(minimum)),
                                      half_rise_post_edge_energy(grid_ev, fdp[site]), float(np.std(post)),
                                      step_edge_energy(grid_ev, fdp[site]),
                                      float(np.sqrt(max(gradient @ covariance[block, block] @ gradient, 0.0)))
                                      if np.all(np.isfinite(gradient)) else float("nan")))
    return estimates
