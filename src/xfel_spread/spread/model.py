"""SPREAD's forward model: per-pixel expected photons from the sites' f', f'' grids.

Structure factors are linear in each site's form factor (:func:`xfel_spread.sim.structure_factors.
site_decomposition`)::

    F_k(h) = F_rest(h) + sum_s (f'_s(E_k) + i f''_s(E_k)) G_s(h),   I_k(h) = |F_k(h)|^2

with f'_s(E_k) = sum_j W[k, j] f'_s[j] linear in the grid values (:mod:`xfel_spread.spread.tables`).
With each shot's stage-1 geometry and spectrum fixed, a pixel's Bragg photons per unit scale are
``bragg_p = sum_t c_t I[pair_t]`` over its few (reflection, channel) terms t (the coefficients of
:mod:`xfel_spread.spread.coefficients`), and its expected photons are::

    mu_p = b0_r + b1_r dx_p + b2_r dy_p + G_shot * bragg_p

``b_r`` is the tilted background plane of the pixel's shoebox r (photons; dx, dy its offsets in
pixels from the shoebox centre) and ``G_shot`` the shot's scale. I is evaluated densely on the
(channels x used reflections) table, which the data index through ``pair = k * n_reflections + m``.

A pixel's Poisson variance is mu_p itself, except behind a detector point spread: the photons are
counted, then spread (as stage 1 models it, :class:`xfel_spread.stage1.psf.ShotSpread`), so their
variance is spread by the squared kernel. There it is (:func:`poisson_photons`)::

    v_p = a * max(plane_p, 0) + rho_p * G_shot * bragg_p

with ``a`` the squared kernel's sum (a smooth background's share) and ``rho_p`` the pixel's ratio of
squared-kernel to kernel spread of its Bragg light (:func:`xfel_spread.spread.coefficients.
spread_variance_ratio`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Decomposition:
    """F_rest (n_h,) and site sums (n_sites, n_h) of the used reflections as real/imaginary float64 tensors."""

    rest_re: torch.Tensor
    rest_im: torch.Tensor
    site_re: torch.Tensor
    site_im: torch.Tensor

    @classmethod
    def from_complex(cls, f_rest: np.ndarray, site_sums: np.ndarray) -> Decomposition:
        """From complex arrays, e.g. ``SiteDecomposition.f_rest[used]``, ``.site_sums[:, used]``."""
        def as_tensor(values):
            return torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float64)

        return cls(as_tensor(f_rest.real), as_tensor(f_rest.imag), as_tensor(site_sums.real), as_tensor(site_sums.imag))

    @property
    def n_reflections(self) -> int:
        return int(self.rest_re.numel())


@dataclass
class SpreadData:
    """All lattices' trusted shoebox pixels and their sparse Bragg coefficients, concatenated.

    Pixel arrays (P,): ``data`` photons, ``shoebox`` index, ``dx``/``dy`` offsets (pixels) from the
    shoebox centre, ``readout_var`` (photons^2). Shoebox arrays (R,): ``shot`` index. Term arrays
    (T,): ``term_pixel``, ``term_pair`` (k * n_reflections + m) and ``term_coeff`` (photons per unit G
    and unit |F|^2), sorted by pixel.
    """

    data: torch.Tensor
    shoebox: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor
    readout_var: torch.Tensor
    shot: torch.Tensor
    term_pixel: torch.Tensor
    term_pair: torch.Tensor
    term_coeff: torch.Tensor
    n_shots: int
    #: Behind a point spread (P,): the ratio rho_p of the Bragg light's Poisson variance to its photons
    #: (:func:`poisson_photons`); None without one.
    bragg_variance_ratio: torch.Tensor | None = None
    #: Behind a point spread (P,): the share ``a`` of a smooth background's photons that is its Poisson
    #: variance (the squared kernel's sum); None without one.
    background_variance_share: torch.Tensor | None = None

    @property
    def n_pixels(self) -> int:
        return int(self.data.numel())

    @property
    def n_shoeboxes(self) -> int:
        return int(self.shot.numel())

    def pixel_shot(self) -> torch.Tensor:
        """The shot of each pixel (P,), computed once and kept (int64)."""
        cached = getattr(self, "_pixel_shot", None)
        if cached is None or cached.numel() != self.shoebox.numel():
            cached = self.shot.long()[self.shoebox.long()]
            self._pixel_shot = cached
        return cached

    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(t.element_size() * t.numel() for t in (
            self.data, self.shoebox, self.dx, self.dy, self.readout_var, self.shot,
            self.term_pixel, self.term_pair, self.term_coeff, self.bragg_variance_ratio,
            self.background_variance_share) if t is not None)

    @property
    def behind_point_spread(self) -> bool:
        """Whether the pixels' Poisson variance is not their expected photons (:func:`poisson_photons`)."""
        return self.bragg_variance_ratio is not None


def channel_form_factors(grid: torch.Tensor, interpolation: torch.Tensor) -> torch.Tensor:
    """f' or f'' (n_sites, n_channels) at the channel energies from grid values (n_sites, n_grid)."""
    return grid @ interpolation.T


def intensities(fp_grid: torch.Tensor, fdp_grid: torch.Tensor, interpolation: torch.Tensor,
                decomposition: Decomposition) -> torch.Tensor:
    """|F_k(h)|^2 (n_channels, n_reflections) in electrons^2; differentiable in both grids."""
    fp = channel_form_factors(fp_grid, interpolation)
    fdp = channel_form_factors(fdp_grid, interpolation)
    d = decomposition
    # (f' + i f'')(G_re + i G_im) = (f' G_re - f'' G_im) + i (f' G_im + f'' G_re)
    real = d.rest_re[None, :] + fp.T @ d.site_re - fdp.T @ d.site_im
    imag = d.rest_im[None, :] + fp.T @ d.site_im + fdp.T @ d.site_re
    return real ** 2 + imag ** 2


def unit_bragg(intensity: torch.Tensor, data: SpreadData) -> torch.Tensor:
    """Bragg photons per unit G of every pixel: sum over its terms of c * I[pair] (P,)."""
    values = data.term_coeff.to(intensity.dtype) * intensity.reshape(-1)[data.term_pair]
    return torch.zeros(data.n_pixels, dtype=intensity.dtype).index_add_(0, data.term_pixel, values)


def expected_photons(bragg: torch.Tensor, scale: torch.Tensor, background: torch.Tensor,
                     data: SpreadData) -> torch.Tensor:
    """mu = plane of the shoebox + G * bragg (P,); ``scale`` (n_shots,), ``background`` (R, 3)."""
    return plane_photons(background, data) + scale[data.pixel_shot()] * bragg


def plane_photons(background: torch.Tensor, data: SpreadData) -> torch.Tensor:
    """The background plane of each pixel's shoebox at the pixel (P,); ``background`` (R, 3)."""
    box = data.shoebox
    return background[:, 0][box] + background[:, 1][box] * data.dx + background[:, 2][box] * data.dy


def poisson_photons(bragg: torch.Tensor, scale: torch.Tensor, background: torch.Tensor,
                    data: SpreadData) -> torch.Tensor | None:
    """The pixels' Poisson variance behind a point spread, ``a max(plane, 0) + rho G bragg`` (P,); None
    without one, where it is :func:`expected_photons` itself."""
    if not data.behind_point_spread:
        return None
    return (data.background_variance_share.to(bragg.dtype) * torch.clamp(plane_photons(background, data), min=0)
            + data.bragg_variance_ratio.to(bragg.dtype) * scale[data.pixel_shot()] * bragg)


def poisson_slopes(background: torch.Tensor, data: SpreadData) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The derivatives of :func:`poisson_photons` in the plane's photons and in the Bragg photons
    (G * bragg) at every pixel, ``(a [plane > 0], rho)``; None without a point spread."""
    if not data.behind_point_spread:
        return None
    plane = plane_photons(background, data)
    share = data.background_variance_share.to(plane.dtype)
    return share * (plane > 0).to(plane.dtype), data.bragg_variance_ratio.to(plane.dtype)
