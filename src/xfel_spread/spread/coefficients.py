"""Per-pixel Bragg coefficients c_{p,k}(h) of a shot whose geometry stage 1 has fixed.

Stage 1's model of a pixel's Bragg photons (:func:`xfel_spread.sim.forward.bragg_photons_dense`) is::

    bragg_p = P * factor_p * sum_k photons_k sum_d |F_k(h_pkd)|^2 L(p, k, d)

with P the photon prefactor (scale G r_e^2 / n_domains / beam area), factor_p polarization x solid
angle x capture, L the Gaussian lattice transform of mosaic domain d and h_pkd the Miller index
nearest to the pixel's scattering vector at channel k. With everything but |F|^2 fixed this is
``sum_t c_t |F_{k_t}(h_t)|^2`` over terms t = (pixel, channel, reflection): the coefficients here
are that expression evaluated with |F|^2 = 1 and G = 1, the domains' transforms summed per
(pixel, channel, reflection). Reflections are columns of the anomalous asymmetric unit (|F|^2 is
the same for every symmetry mate, as the simulator's P1 grid has it); indices outside the table (beyond
d_min) drop out, as their |F| is 0 in the model.

Sparsification: a term is dropped when ``c_t < relative_cutoff * max_t' c_t'`` over the same pixel's
terms. The photons lost are at most ``relative_cutoff`` times the pixel's largest term per dropped
term; :func:`bragg_coefficients` reports the dropped share of the coefficient sum.

The detector's point spread (:class:`xfel_spread.stage1.psf.DetectorPsf`) is linear in the Bragg
photons, so it folds into the coefficients: c' = S c with S the shot's spread matrix
(:func:`fold_point_spread`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.sim.forward import (
    ARG_CUTOFF,
    GAUSS_WIDTH,
    Beam,
    CrystalState,
    mosaic_lattice_transform,
    photon_prefactor,
    pixel_factors,
)
from xfel_spread.sim.geometry import BEAM_DIRECTION, Detector

#: (pixel, channel, domain) terms evaluated at once.
TERMS_PER_CHUNK = 1 << 20


@dataclass(frozen=True)
class AsuLookup:
    """Dense P1 grid of asymmetric-unit columns: ``column[h - hkl_min]``, -1 where no column."""

    column: np.ndarray
    hkl_min: np.ndarray

    def columns(self, hkl: np.ndarray) -> np.ndarray:
        """Asymmetric-unit column of each Miller index (n, 3), -1 outside the table."""
        offset = np.asarray(hkl, dtype=np.int64) - self.hkl_min
        shape = np.array(self.column.shape)
        inside = np.all((offset >= 0) & (offset < shape), axis=1)
        out = np.full(len(offset), -1, dtype=np.int64)
        o = offset[inside]
        out[inside] = self.column[o[:, 0], o[:, 1], o[:, 2]]
        return out


def asu_lookup(unit_cell, space_group: str, asu_indices: np.ndarray) -> AsuLookup:
    """The P1 -> asymmetric-unit map of a table with anomalous-unit indices ``asu_indices`` (n, 3)."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=tuple(unit_cell), space_group_symbol=space_group)
    asu_set = miller.set(symmetry, flex.miller_index([tuple(int(v) for v in row) for row in asu_indices]),
                         anomalous_flag=True)
    p1_set, selection = asu_set.expand_to_p1(return_iselection=True)
    p1 = np.asarray(p1_set.indices(), dtype=np.int64).reshape(-1, 3)
    hkl_min = p1.min(axis=0)
    grid = np.full(tuple(p1.max(axis=0) - hkl_min + 1), -1, dtype=np.int64)
    offset = p1 - hkl_min
    grid[offset[:, 0], offset[:, 1], offset[:, 2]] = np.asarray(selection, dtype=np.int64)
    return AsuLookup(grid, hkl_min)


@dataclass
class ShotCoefficients:
    """One shot's sparse Bragg coefficients (terms sorted by pixel, then channel, then column).

    ``pixel`` indexes the pixels the coefficients were computed for, ``channel`` the beam's
    channels, ``column`` the asymmetric-unit table; ``value`` is photons per unit G per unit |F|^2.
    ``dropped_fraction`` is the share of the coefficient sum the relative cutoff removed.
    """

    pixel: np.ndarray
    channel: np.ndarray
    column: np.ndarray
    value: np.ndarray
    dropped_fraction: float

    def bragg(self, intensity: np.ndarray, n_pixels: int) -> np.ndarray:
        """Bragg photons per unit G: sum_t c_t intensity[channel_t, column_t] at every pixel (n_pixels,)."""
        return np.bincount(self.pixel, weights=self.value * intensity[self.channel, self.column], minlength=n_pixels)


def bragg_coefficients(detector: Detector, beam: Beam, crystal: CrystalState, fast: torch.Tensor,
                       slow: torch.Tensor, lookup: AsuLookup, relative_cutoff: float = 0.0,
                       panel: torch.Tensor | None = None) -> ShotCoefficients:
    """Coefficients of the pixels (fast, slow) for stage 1's model with G = 1 and |F|^2 = 1 (float64);
    ``panel`` names each pixel's panel on a multi-panel detector."""
    with torch.no_grad():
        directions, factor = pixel_factors(detector, fast, slow, beam.polarization_fraction, panel)
        unit = CrystalState(crystal.domain_matrices, crystal.ncells, torch.ones((), dtype=torch.float64),
                            crystal.mosaic_variance)
        prefactor = float(photon_prefactor(beam, unit))
        beam_direction = torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype)
        u = beam.inverse_wavelengths.to(directions.dtype)
        photons = beam.photons.to(directions.dtype)
        matrices = crystal.domain_matrices.to(directions.dtype)
        ncells = crystal.ncells.to(directions.dtype)
        n_terms = u.numel() * matrices.shape[0]
        chunk = max(1, TERMS_PER_CHUNK // n_terms)
        variances = None
        if crystal.mosaic_variance is not None:
            if matrices.shape[0] != 1:
                raise ValueError("an analytic mosaic spread needs a single domain matrix")
            variances = crystal.mosaic_variance.to(directions.dtype).reshape(-1)
            metric = matrices[0] @ matrices[0].T
        keys, values = [], []
        for start in range(0, directions.shape[0], chunk):
            w = directions[start:start + chunk] - beam_direction
            if variances is not None:
                # Stage 1's analytic average over the rotations (bragg_sum_mosaic), per channel: one "domain".
                nearest, lattice_sq = mosaic_lattice_transform(w @ matrices[0].T, (w ** 2).sum(dim=-1), metric, u,
                                                               ncells, variances)
                nearest, lattice_sq = nearest[:, :, None, :], lattice_sq[:, :, None]
            else:
                h_per_u = torch.einsum("dij,pj->pdi", matrices, w)
                h = u[None, :, None, None] * h_per_u[:, None, :, :]
                nearest = torch.ceil(h - 0.5)
                arg = (((h - nearest) * ncells) ** 2).sum(dim=-1) / GAUSS_WIDTH
                lattice_sq = torch.where(arg < ARG_CUTOFF, torch.prod(ncells) ** 2 * torch.exp(-2 * arg),
                                         torch.zeros_like(arg))
            weight = lattice_sq * photons[None, :, None] * factor[start:start + chunk, None, None] * prefactor
            p, k, d = torch.nonzero(weight > 0, as_tuple=True)
            hkl = nearest[p, k, d].to(torch.int64).numpy()
            column = lookup.columns(hkl)
            inside = column >= 0
            keys.append(np.stack([(p + start).numpy()[inside], k.numpy()[inside], column[inside]], axis=1))
            values.append(weight[p, k, d].numpy()[inside])
    keys = np.concatenate(keys) if keys else np.zeros((0, 3), dtype=np.int64)
    values = np.concatenate(values) if values else np.zeros(0)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    summed = np.bincount(inverse.reshape(-1), weights=values, minlength=len(unique))
    pixel, channel, column = unique.T if len(unique) else (np.zeros(0, np.int64),) * 3
    total = float(summed.sum())
    keep = apply_cutoff(pixel, summed, relative_cutoff)
    dropped = float(summed[~keep].sum()) / total if total > 0 else 0.0
    return ShotCoefficients(pixel[keep], channel[keep], column[keep], summed[keep], dropped)


def apply_cutoff(pixel: np.ndarray, value: np.ndarray, relative_cutoff: float) -> np.ndarray:
    """Which terms to keep: ``value >= relative_cutoff * max value`` over the same pixel's terms."""
    if relative_cutoff <= 0 or value.size == 0:
        return np.ones(value.size, dtype=bool)
    pixel_max = np.zeros(int(pixel.max()) + 1)
    np.maximum.at(pixel_max, pixel, value)
    return value >= relative_cutoff * pixel_max[pixel]


def fold_point_spread(coefficients: ShotCoefficients, spread_matrix: torch.Tensor, n_pixels: int,
                      relative_cutoff: float = 0.0) -> ShotCoefficients:
    """Coefficients of the spread Bragg photons: c'_{i,(k,m)} = sum_j S[i, j] c_{j,(k,m)}.

    ``spread_matrix`` is the sparse (n_pixels, n_pixels) map of :meth:`xfel_spread.stage1.psf.
    DetectorPsf.spread_matrix` for the same pixels. The spread terms are cut again at
    ``relative_cutoff`` (the spread carries every term over the kernel); ``dropped_fraction`` adds
    that share.
    """
    import scipy.sparse as sp

    s = spread_matrix.coalesce()
    rows, cols = s.indices().cpu().numpy()
    spread = sp.csr_matrix((s.values().cpu().numpy(), (rows, cols)), shape=(n_pixels, n_pixels))
    n_columns = int(coefficients.column.max()) + 1 if coefficients.column.size else 1
    pair = coefficients.channel * n_columns + coefficients.column
    unique_pairs, pair_index = np.unique(pair, return_inverse=True)
    c = sp.csr_matrix((coefficients.value, (coefficients.pixel, pair_index.reshape(-1))),
                      shape=(n_pixels, len(unique_pairs)))
    folded = (spread @ c).tocoo()
    order = np.lexsort((unique_pairs[folded.col], folded.row))
    row, pairs, value = folded.row[order].astype(np.int64), unique_pairs[folded.col[order]], folded.data[order]
    keep = apply_cutoff(row, value, relative_cutoff)
    total = float(value.sum())
    dropped = coefficients.dropped_fraction + (float(value[~keep].sum()) / total if total > 0 else 0.0)
    return ShotCoefficients(row[keep], pairs[keep] // n_columns, pairs[keep] % n_columns, value[keep], dropped)
