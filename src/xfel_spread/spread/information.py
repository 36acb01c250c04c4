"""The Fisher information of SPREAD's grids with the per-shot nuisance profiled out.

``J^T diag(w) J`` with ``w = 1/v + 1/(2 v^2)`` per pixel (the expected Hessian of the Poisson +
readout NLL) and J the derivatives of the expected photons in the grids, over grids and nuisance
(each shot's G, each shoebox's background plane). The nuisance is profiled out exactly by the Schur
complement, shoebox planes first (3 x 3 blocks), then each shot's G. :mod:`xfel_spread.spread.
uncertainty` inverts it (with the restraints' Hessian) for the standard errors at the minimum;
:mod:`xfel_spread.spread.fit` takes it on the first lattices at the start as the fit's preconditioner.
The problem and nuisance are :class:`xfel_spread.spread.fit.SpreadProblem` and ``Nuisance`` (this
module sits below :mod:`~xfel_spread.spread.fit` and takes them as they come).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # fit imports this module
    from xfel_spread.spread.fit import Nuisance, SpreadProblem

from xfel_spread.spread.likelihood import nll_derivatives
from xfel_spread.spread.model import expected_photons, unit_bragg


def _sum_rows(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros((size,) + tuple(values.shape[1:]), dtype=values.dtype).index_add_(0, index, values)


def intensity_derivatives(problem: SpreadProblem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dI/df' and dI/df'' at every channel (n_sites, n_channels, n_reflections): 2 Re(conj(F) G_s) and
    2 Re(conj(F) i G_s) = 2 (Im F Re G_s - Re F Im G_s)."""
    d = problem.decomposition
    fp, fdp = problem.split(theta)
    fp_c, fdp_c = fp @ problem.interpolation.T, fdp @ problem.interpolation.T
    real = d.rest_re[None, :] + fp_c.T @ d.site_re - fdp_c.T @ d.site_im
    imag = d.rest_im[None, :] + fp_c.T @ d.site_im + fdp_c.T @ d.site_re
    d_fp = 2 * (real[None] * d.site_re[:, None, :] + imag[None] * d.site_im[:, None, :])
    d_fdp = 2 * (imag[None] * d.site_re[:, None, :] - real[None] * d.site_im[:, None, :])
    return d_fp, d_fdp


def pixel_jacobian(problem: SpreadProblem, theta: torch.Tensor, nuisance: Nuisance, pixel_lo: int,
                   pixel_hi: int, derivatives) -> torch.Tensor:
    """d mu / d grids (pixels pixel_lo..pixel_hi-1, 2 n_sites n_grid), dense.

    The terms must be sorted by pixel (as :mod:`xfel_spread.spread.assemble` makes them): the pixels'
    terms are found by bisection, not by a pass over all of them (which made the information of N
    lattices cost as N^2)."""
    data = problem.data
    n_sites, n_grid = problem.n_sites, problem.n_grid
    n_theta = 2 * n_sites * n_grid
    n_ref = problem.decomposition.n_reflections
    bounds = torch.tensor([pixel_lo, pixel_hi], dtype=data.term_pixel.dtype)
    t0, t1 = torch.searchsorted(data.term_pixel, bounds).tolist()
    terms = torch.arange(t0, t1)
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
    if data.term_pixel.numel() and not bool((torch.diff(data.term_pixel) >= 0).all()):
        raise ValueError("SPREAD data must have their terms sorted by pixel")
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
