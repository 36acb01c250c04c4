"""SPREAD's likelihood: stage 1's per-pixel Poisson-plus-readout NLL, summed over all lattices."""

from __future__ import annotations

import torch

from xfel_spread.spread.model import SpreadData
from xfel_spread.stage1.likelihood import pixel_nll, pixel_variance


def total_nll(mu: torch.Tensor, data: SpreadData) -> torch.Tensor:
    """Sum of :func:`xfel_spread.stage1.likelihood.pixel_nll` over the pixels (dimensionless)."""
    return pixel_nll(mu, data.data.to(mu.dtype), data.readout_var.to(mu.dtype)).sum()


def nll_derivatives(mu: torch.Tensor, data: SpreadData, observed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """d NLL / d mu and the Fisher weight E[d^2 NLL / d mu^2] = 1/v + 1/(2 v^2) of every pixel.

    With ``observed`` the weight is the observed curvature ``1/v - 1/(2 v^2) + 2 r/v^2 + r^2/v^3``
    (r = data - mu), floored at a tenth of the Fisher weight (it can be negative far from the fit).

    With v = max(mu, 0) + sigma_r^2 (floored as stage 1 does): the gradient is the exact one of
    :func:`total_nll` wherever mu > 0 (where mu <= 0 the variance is constant and the Fisher weight
    is 1/v).
    """
    readout = data.readout_var.to(mu.dtype)
    variance = pixel_variance(mu, readout)
    residual = data.data.to(mu.dtype) - mu
    varies = (mu > 0).to(mu.dtype)
    gradient = -residual / variance + varies * (0.5 / variance - residual ** 2 / (2 * variance ** 2))
    weight = 1.0 / variance + varies * 0.5 / variance ** 2
    if observed:
        exact = 1.0 / variance + varies * (-0.5 / variance ** 2 + 2 * residual / variance ** 2
                                           + residual ** 2 / variance ** 3)
        weight = torch.maximum(exact, 0.1 * weight)
    return gradient, weight
