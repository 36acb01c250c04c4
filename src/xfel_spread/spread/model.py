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
            self.term_pixel, self.term_pair, self.term_coeff))


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
    box = data.shoebox
    return (background[:, 0][box] + background[:, 1][box] * data.dx + background[:, 2][box] * data.dy
            + scale[data.pixel_shot()] * bragg)
