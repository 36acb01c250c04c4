"""SPREAD's likelihood: stage 1's per-pixel Poisson-plus-readout NLL, summed over all lattices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xfel_spread.spread.model import SpreadData
from xfel_spread.stage1.likelihood import pixel_nll, pixel_variance


def total_nll(mu: torch.Tensor, data: SpreadData, poisson: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of :func:`xfel_spread.stage1.likelihood.pixel_nll` over the pixels (dimensionless);
    ``poisson`` is their Poisson variance where it is not ``mu`` (:func:`xfel_spread.spread.model.
    poisson_photons`)."""
    return pixel_nll(mu, data.data.to(mu.dtype), data.readout_var.to(mu.dtype), poisson).sum()


@dataclass
class NllDerivatives:
    """The NLL's first and second derivatives at every pixel in the model's two kinds of photons: the
    background plane's and the Bragg photons (G * bragg). They differ only behind a point spread,
    where the two carry different Poisson variance (:func:`xfel_spread.spread.model.poisson_photons`);
    without one every field pair is the same tensor.

    ``plane_weight``, ``cross_weight`` and ``bragg_weight`` are the second derivatives (Fisher or
    observed, :func:`nll_derivatives`) in plane-plane, plane-Bragg and Bragg-Bragg."""

    plane: torch.Tensor
    bragg: torch.Tensor
    plane_weight: torch.Tensor
    cross_weight: torch.Tensor
    bragg_weight: torch.Tensor


def nll_derivatives(mu: torch.Tensor, data: SpreadData, observed: bool = False,
                    poisson: torch.Tensor | None = None,
                    slopes: tuple[torch.Tensor, torch.Tensor] | None = None) -> NllDerivatives:
    """d NLL / d mu and the Fisher weight E[d^2 NLL / d mu^2] = 1/v + 1/(2 v^2) of every pixel.

    With ``observed`` the weight is the observed curvature ``1/v - 1/(2 v^2) + 2 r/v^2 + r^2/v^3``
    (r = data - mu), floored at a tenth of the Fisher weight (it can be negative far from the fit).

    With v = max(mu, 0) + sigma_r^2 (floored as stage 1 does): the gradient is the exact one of
    :func:`total_nll` wherever mu > 0 (where mu <= 0 the variance is constant and the Fisher weight
    is 1/v).

    Behind a point spread give ``poisson`` (the pixels' Poisson variance p) and ``slopes``, its
    derivatives (dp/d plane, dp/d (G bragg)) (:func:`xfel_spread.spread.model.poisson_slopes`). With
    a = dp/dx and b = dp/dy for two kinds of photons x, y the weight is ``1/v + a b/(2 v^2)`` (Fisher)
    or ``1/v + (a + b) r/v^2 + a b (r^2/v^3 - 1/(2 v^2))`` (observed; a pixel whose observed 2 x 2
    weight is not positive definite, or falls below a tenth of the Fisher one, takes the Fisher).
    """
    readout = data.readout_var.to(mu.dtype)
    residual = data.data.to(mu.dtype) - mu
    if poisson is None:
        variance = pixel_variance(mu, readout)
        varies = (mu > 0).to(mu.dtype)
        gradient = -residual / variance + varies * (0.5 / variance - residual ** 2 / (2 * variance ** 2))
        weight = 1.0 / variance + varies * 0.5 / variance ** 2
        if observed:
            exact = 1.0 / variance + varies * (-0.5 / variance ** 2 + 2 * residual / variance ** 2
                                               + residual ** 2 / variance ** 3)
            weight = torch.maximum(exact, 0.1 * weight)
        return NllDerivatives(gradient, gradient, weight, weight, weight)
    variance = pixel_variance(poisson, readout)
    counts = (poisson > 0).to(mu.dtype)
    a, b = slopes[0].to(mu.dtype) * counts, slopes[1].to(mu.dtype) * counts
    d_mean = -residual / variance
    d_variance = 0.5 / variance - residual ** 2 / (2 * variance ** 2)
    inverse = 1.0 / variance
    fisher_vv = 0.5 / variance ** 2
    fisher = (inverse + a * a * fisher_vv, inverse + a * b * fisher_vv, inverse + b * b * fisher_vv)
    weights = fisher
    if observed:
        mean_variance = residual / variance ** 2
        observed_vv = residual ** 2 / variance ** 3 - fisher_vv
        exact = (inverse + 2 * a * mean_variance + a * a * observed_vv,
                 inverse + (a + b) * mean_variance + a * b * observed_vv,
                 inverse + 2 * b * mean_variance + b * b * observed_vv)
        usable = ((exact[0] >= 0.1 * fisher[0]) & (exact[2] >= 0.1 * fisher[2])
                  & (exact[0] * exact[2] >= exact[1] ** 2))
        weights = tuple(torch.where(usable, e, f) for e, f in zip(exact, fisher))
    return NllDerivatives(d_mean + a * d_variance, d_mean + b * d_variance, *weights)
