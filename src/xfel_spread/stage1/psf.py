"""The detector's point spread in the refinement's model of the shoebox pixels.

A phosphor-and-fiber detector (the Rayonix) spreads each photon over its neighbours. Without the
spread in the model, the refinement widens the spots another way (N shrinks well below the
truth) and, from a start a few pixels off, can lose faint spots altogether. With it, the model's
Bragg photons are spread as the images' were: through the simulator's own pixel-integrated fiber
kernel (:func:`xfel_spread.sim.detector_effects.fiber_psf_kernel`), as one sparse linear map
among a shot's shoebox pixels::

    spread[i] = sum_j kernel(slow_i - slow_j, fast_i - fast_j) * bragg[j]

over the pixels j of every shoebox (light crosses from one shoebox into a neighbouring one). Two
shares are left out, both deliberately: the light of Bragg photons outside every shoebox (the far
tails of spots centred inside one), and the kernel's tail beyond its radius, which the simulator
spreads evenly over the whole panel, a constant the shoeboxes' background planes absorb.

A refinement applies the map at every evaluation, forward and backward, so it holds the map in
compressed rows twice (:class:`SpreadMap`): the map's own rows to spread the photons and its
transpose's to carry the gradient back. On 35 scattered shoeboxes of 12 x 12 pixels (5040 pixels, 720,000
entries, one thread), torch's coordinate-list product cost 56 ms forward and back, the two
row-compressed products 2.4 ms. The two are built straight from the kernel's entries with 32-bit
indices: together they take the memory of the one coordinate list (:meth:`DetectorPsf.spread_matrix`,
which SPREAD's coefficients still read).

The spread also changes the noise. The phosphor spreads each photon after it is counted (the
simulator draws the Poisson counts, then spreads them), so a pixel's photon count is a sum of
independent Poisson counts weighted by the kernel, whose variance is the counts' means spread by the
*squared* kernel::

    variance[i] = sum_j kernel(slow_i - slow_j, fast_i - fast_j)^2 * photons[j]

not the spread photons themselves: about a tenth of them on a smooth background with the LY99
kernel (whose squares sum to 0.098), and near a sharp spot's centre about a quarter. The Z-scores
take that variance (:class:`ShotSpread`): the Bragg photons through the squared kernel's map, and the
background plane, smooth, times the squares' sum (:meth:`DetectorPsf.variance_share`). The
refinement's likelihood keeps the photons themselves, since the spread also correlates neighbouring
pixels' noise (:mod:`xfel_spread.stage1.likelihood`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.sim.detector_effects import fiber_psf_kernel


@dataclass(frozen=True)
class DetectorPsf:
    """A fiber point-spread function: its full width at half maximum (mm) and kernel radius (pixels)."""

    fwhm_mm: float
    radius_px: int

    def __post_init__(self):
        if not (np.isfinite(self.fwhm_mm) and self.fwhm_mm > 0):
            raise ValueError(f"point-spread FWHM must be positive, got {self.fwhm_mm} mm")
        if self.radius_px < 0:
            raise ValueError(f"point-spread kernel radius must be at least 0, got {self.radius_px} px")

    def spread_matrix(self, fast: np.ndarray, slow: np.ndarray, pixel_size_mm: float, device,
                      panel: np.ndarray | None = None) -> torch.Tensor:
        """The sparse (P, P) map from Bragg photons at the pixels ``(fast, slow)`` to the spread ones.

        With ``panel`` (P,) the pixels lie on several panels of a tiled detector: light spreads only
        among pixels of the same panel (a tile's sensor ends at its edge). Pixels must be distinct. Entry (i, j) is the kernel's share of pixel j's light that lands in
        pixel i; float64, on ``device``, a coalesced coordinate list.
        """
        rows, columns, weights = self.spread_entries(fast, slow, pixel_size_mm, panel)
        return torch.sparse_coo_tensor(torch.as_tensor(np.stack((rows, columns))), torch.as_tensor(weights),
                                       (len(fast), len(fast)), dtype=torch.float64, device=device,
                                       check_invariants=True).coalesce()

    def shot_spread(self, fast: np.ndarray, slow: np.ndarray, pixel_size_mm: float, device,
                    panel: np.ndarray | None = None) -> ShotSpread:
        """The spread of the photons and of their Poisson variance among the pixels (:class:`ShotSpread`):
        :meth:`spread_matrix` and its squares made ready to apply (:class:`SpreadMap`s), built without
        the coordinate list."""
        rows, columns, weights = self.spread_entries(fast, slow, pixel_size_mm, panel)
        return ShotSpread(SpreadMap.from_entries(rows, columns, weights, len(fast), device),
                          SpreadMap.from_entries(rows, columns, weights ** 2, len(fast), device),
                          self.variance_share(pixel_size_mm))

    def variance_share(self, pixel_size_mm: float) -> float:
        """The sum of the squared kernel: the share of a smooth field's Poisson variance that is left
        after the spread (the spread field's photons are the field's own, less the kernel's tail)."""
        return float((fiber_psf_kernel(self.fwhm_mm / pixel_size_mm, self.radius_px) ** 2).sum())

    def spread_entries(self, fast: np.ndarray, slow: np.ndarray, pixel_size_mm: float,
                       panel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries (row i, column j, weight) of :meth:`spread_matrix`, each (i, j) once, unsorted."""
        fast = np.asarray(fast, dtype=np.int64)
        slow = np.asarray(slow, dtype=np.int64)
        if fast.size == 0:
            raise ValueError("no shoebox pixels to spread")
        radius = self.radius_px
        if panel is not None:
            # Stack the panels along slow, a kernel's reach apart, so no offset crosses a panel.
            panel = np.asarray(panel, dtype=np.int64)
            slow = slow + panel * (int(slow.max()) + 2 * radius + 1)
        kernel = fiber_psf_kernel(self.fwhm_mm / pixel_size_mm, radius).numpy()
        # One integer key per pixel, with room for every kernel offset without wrapping a row.
        width = int(fast.max()) + 2 * radius + 1
        key = slow * width + fast
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        if np.any(sorted_key[1:] == sorted_key[:-1]):
            raise ValueError("the shoebox pixels are not distinct")
        rows, columns, weights = [], [], []
        for d_slow, d_fast in zip(*np.nonzero(kernel)):
            target = key + (d_slow - radius) * width + (d_fast - radius)
            position = np.minimum(np.searchsorted(sorted_key, target), len(key) - 1)
            hit = sorted_key[position] == target
            rows.append(order[position[hit]])
            columns.append(np.flatnonzero(hit))
            weights.append(np.full(int(hit.sum()), kernel[d_slow, d_fast]))
        return np.concatenate(rows), np.concatenate(columns), np.concatenate(weights)


class SpreadMap:
    """A point-spread map made ready to apply: the sparse (P, P) map kept as its rows and its
    transpose's rows, compressed (``rows``, ``columns``), for the spread and its gradient. The
    indices are 32-bit where they fit, so the two take the memory of one coordinate list (24 bytes
    per entry). Build it with :meth:`DetectorPsf.shot_spread` or :meth:`from_entries`; join a
    batch's maps with :func:`block_diagonal`."""

    def __init__(self, rows: torch.Tensor, columns: torch.Tensor):
        self.rows = rows
        self.columns = columns

    @classmethod
    def from_entries(cls, row: np.ndarray, column: np.ndarray, weight: np.ndarray, size: int, device) -> SpreadMap:
        """From each entry (row, column, weight) of a (size, size) map, each (row, column) at most once."""
        row = np.asarray(row, dtype=np.int64)
        column = np.asarray(column, dtype=np.int64)
        weight = np.asarray(weight, dtype=np.float64)
        index_type = np.int32 if max(size, row.size) < 2 ** 31 else np.int64
        return cls(_compressed_rows(row, column, weight, size, index_type, device),
                   _compressed_rows(column, row, weight, size, index_type, device))

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape


@dataclass
class ShotSpread:
    """The point spread among one shot's (or a batch's) shoebox pixels, for the mean and the noise.

    ``photons`` spreads the Bragg photons (the kernel), ``variance`` spreads their Poisson variance
    (the squared kernel), and ``variance_share`` is the squared kernel's sum, which carries a smooth
    background's photons to its variance. Build it with :meth:`DetectorPsf.shot_spread`; join a
    batch's with :func:`block_diagonal_spreads`.
    """

    photons: SpreadMap
    variance: SpreadMap
    variance_share: float


def block_diagonal_spreads(spreads: list[ShotSpread]) -> ShotSpread:
    """One ShotSpread for the pixels of several shots concatenated in order (one kernel for all)."""
    shares = {shot_spread.variance_share for shot_spread in spreads}
    if len(shares) != 1:
        raise ValueError("a batch's shots must share one point spread")
    return ShotSpread(block_diagonal([shot_spread.photons for shot_spread in spreads]),
                      block_diagonal([shot_spread.variance for shot_spread in spreads]), shares.pop())


def _compressed_rows(row: np.ndarray, column: np.ndarray, weight: np.ndarray, size: int, index_type,
                     device) -> torch.Tensor:
    """The (size, size) map of the entries as compressed rows, each row's columns ascending."""
    order = np.lexsort((column, row))
    row_start = np.zeros(size + 1, dtype=index_type)
    np.cumsum(np.bincount(row, minlength=size), out=row_start[1:])
    return _csr_tensor(torch.from_numpy(row_start), torch.from_numpy(column[order].astype(index_type)),
                       torch.from_numpy(weight[order]), size, device)


def _csr_tensor(row_start: torch.Tensor, column: torch.Tensor, values: torch.Tensor, size: int,
                device) -> torch.Tensor:
    """A (size, size) float64 compressed-row tensor on ``device``, its invariants checked."""
    with warnings.catch_warnings():  # torch calls its compressed-row layout beta; its products are what is used
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(row_start, column, values, (size, size), dtype=torch.float64, device=device,
                                       check_invariants=True)


class _Spread(torch.autograd.Function):
    """y = M x with dy/dx carried back as M^T g, both as row-compressed products."""

    @staticmethod
    def forward(ctx, bragg, rows, columns):
        ctx.columns = columns
        return torch.mv(rows, bragg)

    @staticmethod
    def backward(ctx, grad):
        return torch.mv(ctx.columns, grad), None, None


def spread(spread_map: SpreadMap, bragg: torch.Tensor) -> torch.Tensor:
    """The Bragg photons of every shoebox pixel (P,) spread through a :class:`SpreadMap`; differentiable."""
    return _Spread.apply(bragg, spread_map.rows, spread_map.columns)


def block_diagonal(maps: list[SpreadMap]) -> SpreadMap:
    """One map for the pixels of several shots concatenated in order, from each shot's map."""
    return SpreadMap(_block_diagonal_rows([spread_map.rows for spread_map in maps]),
                     _block_diagonal_rows([spread_map.columns for spread_map in maps]))


def _block_diagonal_rows(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Square compressed-row maps placed along one diagonal (their index type kept where it fits)."""
    sizes = [matrix.shape[0] for matrix in matrices]
    counts = [matrix.values().numel() for matrix in matrices]
    index_type = torch.int32 if max(sum(sizes), sum(counts)) < 2 ** 31 else torch.int64
    first_row, first_entry = np.cumsum([0] + sizes[:-1]), np.cumsum([0] + counts[:-1])
    row_start = torch.cat([matrices[0].crow_indices()[:1].to(index_type)]
                          + [matrix.crow_indices()[1:].to(index_type) + int(entry)
                             for matrix, entry in zip(matrices, first_entry)])
    column = torch.cat([matrix.col_indices().to(index_type) + int(row) for matrix, row in zip(matrices, first_row)])
    return _csr_tensor(row_start, column, torch.cat([matrix.values() for matrix in matrices]), sum(sizes),
                       matrices[0].device)
