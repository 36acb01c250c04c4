"""Standard errors of the refined grids and of each site's edge positions.

Covariance of the grids
    The Fisher information of the pixels (expected Hessian of the NLL: ``J^T diag(w) J`` with
    ``w = 1/v + 1/(2 v^2)`` per pixel and J the derivatives of the expected photons) at the
    minimum, over grids and nuisance (each shot's G, each shoebox's plane). The nuisance is
    profiled out exactly by the Schur complement, shoebox planes first (3 x 3 blocks), then each
    shot's G; the restraints' Hessian (they are quadratic) is added; the covariance is the inverse.

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
import torch

from xfel_spread.spread.fit import Nuisance, SpreadProblem
from xfel_spread.spread.likelihood import nll_derivatives
from xfel_spread.spread.model import expected_photons, unit_bragg


def _sum_rows(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros((size,) + tuple(values.shape[1:]), dtype=values.dtype).index_add_(0, index, values)


def intensity_derivatives(problem: SpreadProblem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dI/df' and dI/df'' at every channel (n_sites, n_channels, n_reflections): 2 Re(F* G_s), 2 Re(F* i G_s)."""
    d = problem.decomposition
    fp, fdp = problem.split(theta)
    fp_c, fdp_c = fp @ problem.interpolation.T, fdp @ problem.interpolation.T
    real = d.rest_re[None, :] + fp_c.T @ d.site_re - fdp_c.T @ d.site_im
    imag = d.rest_im[None, :] + fp_c.T @ d.site_im + fdp_c.T @ d.site_re
    d_fp = 2 * (real[None] * d.site_re[:, None, :] + imag[None] * d.site_im[:, None, :])
    d_fdp = 2 * (real[None] * d.site_im[:, None, :] - imag[None] * d.site_re[:, None, :])
    return d_fp, d_fdp


def pixel_jacobian(problem: SpreadProblem, theta: torch.Tensor, nuisance: Nuisance, pixel_lo: int,
                   pixel_hi: int, derivatives) -> torch.Tensor:
    """d mu / d grids (pixels pixel_lo..pixel_hi-1, 2 n_sites n_grid), dense."""
    data = problem.data
    n_sites, n_grid = problem.n_sites, problem.n_grid
    n_theta = 2 * n_sites * n_grid
    n_ref = problem.decomposition.n_reflections
    terms = torch.nonzero((data.term_pixel >= pixel_lo) & (data.term_pixel < pixel_hi)).squeeze(1)
    pixel = data.term_pixel[terms] - pixel_lo
    pair = data.term_pair[terms]
    channel, reflection = pair // n_ref, pair % n_ref
    weight_c = data.term_coeff[terms].to(torch.float64) * nuisance.scale[data.shot[data.shoebox[data.term_pixel[terms]]]]
    interp = problem.interpolation
    jacobian = torch.zeros((pixel_hi - pixel_lo) * n_theta, dtype=torch.float64)
    columns = torch.nonzero(interp[channel] != 0)  # (n, 2): term row, grid column
    term_row, grid_col = columns[:, 0], columns[:, 1]
    w = interp[channel[term_row], grid_col]
    d_fp, d_fdp = derivatives
    for site in range(n_sites):
        for part, values in ((0, d_fp), (1, d_fdp)):
            column = part * n_sites * n_grid + site * n_grid + grid_col
            contribution = weight_c[term_row] * w * values[site, channel[term_row], reflection[term_row]]
            jacobian.index_add_(0, pixel[term_row] * n_theta + column, contribution)
    return jacobian.reshape(pixel_hi - pixel_lo, n_theta)


def profile_fisher(problem: SpreadProblem, theta: np.ndarray, nuisance: Nuisance,
                   pixels_per_chunk: int = 10000) -> np.ndarray:
    """Fisher information of the grids with every shot's G and shoebox planes profiled out.

    Chunks hold whole shots (pixels are ordered by shoebox, shoeboxes by shot).
    """
    data = problem.data
    theta_t = torch.as_tensor(theta, dtype=torch.float64)
    with torch.no_grad():
        bragg = unit_bragg(problem.intensity(theta_t), data)
        mu = expected_photons(bragg, nuisance.scale, nuisance.background, data)
        _, weight = nll_derivatives(mu, data)
        derivatives = intensity_derivatives(problem, theta_t)
    n_theta = theta_t.numel()
    fisher = torch.zeros(n_theta, n_theta, dtype=torch.float64)
    pixel_shot = data.pixel_shot()
    shot_end = torch.searchsorted(pixel_shot, torch.arange(data.n_shots) + 1).tolist()
    start = 0
    while start < data.n_pixels:
        first_shot = int(pixel_shot[start])
        last_shot = first_shot
        while last_shot + 1 < data.n_shots and shot_end[last_shot + 1] - start <= pixels_per_chunk:
            last_shot += 1
        end = shot_end[last_shot]
        jac = pixel_jacobian(problem, theta_t, nuisance, start, end, derivatives)
        w = weight[start:end]
        box = data.shoebox[start:end]
        box0 = int(box.min())
        box_local = box - box0
        n_box = int(box.max()) - box0 + 1
        shots_local = pixel_shot[start:end] - first_shot
        n_shots_local = last_shot - first_shot + 1
        design = torch.stack([torch.ones_like(w), data.dx[start:end].to(w.dtype), data.dy[start:end].to(w.dtype)], 1)
        u = bragg[start:end]
        fisher += jac.T @ (w[:, None] * jac)
        # Nuisance blocks: planes (3 x 3 per shoebox), G (per shot: d mu / d G = bragg per unit G).
        h_bb = _sum_rows(box_local, w[:, None, None] * design[:, :, None] * design[:, None, :], n_box)
        h_bg = _sum_rows(box_local, (w * u)[:, None] * design, n_box)
        h_gg = _sum_rows(shots_local, w * u * u, n_shots_local)
        c_tb = _sum_rows(box_local, (w[:, None, None] * jac[:, :, None] * design[:, None, :]), n_box)  # (b, n_theta, 3)
        c_tg = _sum_rows(shots_local, (w * u)[:, None] * jac, n_shots_local)  # (s, n_theta)
        inv_bb = torch.linalg.inv(h_bb)
        fisher -= torch.einsum("bti,bij,buj->tu", c_tb, inv_bb, c_tb)
        box_shot = data.shot[box0:box0 + n_box] - first_shot
        reduced_tg = c_tg - _sum_rows(box_shot, torch.einsum("bti,bij,bj->bt", c_tb, inv_bb, h_bg), n_shots_local)
        reduced_gg = h_gg - _sum_rows(box_shot, torch.einsum("bi,bij,bj->b", h_bg, inv_bb, h_bg), n_shots_local)
        fisher -= (reduced_tg / reduced_gg[:, None]).T @ reduced_tg
        start = end
    return fisher.numpy()


def restraint_hessian(problem: SpreadProblem, theta: np.ndarray) -> np.ndarray:
    """Hessian of the (quadratic) restraints in the grids."""
    def restraint(values):
        fp, fdp = problem.split(values)
        return problem.restraints.value(fp, fdp)

    return torch.autograd.functional.hessian(restraint, torch.as_tensor(theta, dtype=torch.float64)).numpy()


def grid_covariance(problem: SpreadProblem, theta: np.ndarray, nuisance: Nuisance) -> np.ndarray:
    """Covariance of the flat grid vector [f'.ravel(), f''.ravel()] (electrons^2)."""
    information = profile_fisher(problem, theta, nuisance) + restraint_hessian(problem, theta)
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
