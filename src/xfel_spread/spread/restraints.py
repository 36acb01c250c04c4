"""Restraints on the refined f', f'' grids: smoothness and Kramers-Kronig consistency.

Smoothness
    ``weight * sum_i (x_{i+1} - x_i)^2`` over neighbouring grid points of each site's f' and f''
    (electrons^2; a weight w is a prior sigma of 1/sqrt(2w) electrons per grid step).

Kramers-Kronig consistency
    f' and f'' of a site are one analytic response. For an odd-extended f'' the KK relation
    ``f'(E) = (2/pi) PV int_0^inf E' f''(E') / (E^2 - E'^2) dE'`` is the Hilbert transform::

        f'(E) = -(1/pi) PV int f''(E') [1/(E' - E) + 1/(E' + E)] dE'.

    Only the change relative to a reference table is transformed, taken linear between the grid
    points and zero outside the grid (so the parts of the response far from the grid stay those
    of the reference)::

        penalty = weight * sum_i ((f' - f'_ref)_i - (H (f'' - f''_ref))_i)^2

    ``H`` (:func:`hilbert_matrix`) is exact for the piecewise-linear difference: column j is the
    transform of the hat function of grid point j, in closed form. The hat of an end point reaches
    one step beyond the grid (a difference that is not zero at a grid end is taken to fall to zero
    within one step; the penalty near the ends carries that truncation).
"""

from __future__ import annotations

import numpy as np
import torch


def _x_log_abs_x(x: np.ndarray) -> np.ndarray:
    """x ln|x| with the limit 0 at x = 0."""
    out = np.zeros_like(x)
    nonzero = x != 0
    out[nonzero] = x[nonzero] * np.log(np.abs(x[nonzero]))
    return out


def hat_principal_value(offset_ev: np.ndarray, half_width_ev: float) -> np.ndarray:
    """PV int hat(t) / (t - d) dt at offsets d (eV) for the unit hat of half-width h centred at 0.

    ``-(1/h) [(d+h) ln|d+h| - 2 d ln|d| + (d-h) ln|d-h|]`` (tends to -h/d far away).
    """
    d = np.asarray(offset_ev, dtype=np.float64)
    h = float(half_width_ev)
    return -(_x_log_abs_x(d + h) - 2.0 * _x_log_abs_x(d) + _x_log_abs_x(d - h)) / h


def hilbert_matrix(grid_ev: np.ndarray) -> np.ndarray:
    """(n, n) discrete KK transform on a uniform grid (eV): delta f' = H @ delta f''.

    Entry (i, j) is ``-(1/pi) [PV int hat_j(t)/(t - E_i) dt + int hat_j(t)/(t + E_i) dt]``; the second,
    smooth term is h / (E_j + E_i) (the odd extension's mirror, 1e-4 of the first near 7 keV).
    """
    grid_ev = np.asarray(grid_ev, dtype=np.float64)
    steps = np.diff(grid_ev)
    if len(grid_ev) < 2 or not np.allclose(steps, steps[0], rtol=1e-9, atol=0):
        raise ValueError("the KK transform needs a uniform grid of at least two points")
    h = float(steps[0])
    offsets = grid_ev[:, None] - grid_ev[None, :]
    mirror = h / (grid_ev[:, None] + grid_ev[None, :])
    return -(hat_principal_value(offsets, h) + mirror) / np.pi


def kk_residual(fp: torch.Tensor, fdp: torch.Tensor, fp_ref: torch.Tensor, fdp_ref: torch.Tensor,
                hilbert: torch.Tensor) -> torch.Tensor:
    """``(f' - f'_ref) - H (f'' - f''_ref)`` at every grid point (electrons), any leading site axis."""
    return (fp - fp_ref) - (fdp - fdp_ref) @ hilbert.T


def kk_penalty(fp, fdp, fp_ref, fdp_ref, hilbert, weight: float) -> torch.Tensor:
    """``weight * sum kk_residual^2`` (see the module docstring)."""
    return weight * (kk_residual(fp, fdp, fp_ref, fdp_ref, hilbert) ** 2).sum()


def smoothness_penalty(values: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * sum (x_{i+1} - x_i)^2`` along the last (grid) axis."""
    return weight * (torch.diff(values, dim=-1) ** 2).sum()
