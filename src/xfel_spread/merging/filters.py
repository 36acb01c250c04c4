"""Lattice and observation filters of the merge, vectorised over all lattices.

Each filter returns plain boolean masks; the pipeline records why each rejected lattice went, with
the reasons below (the ``reason`` column of the lattice table). Observations are sorted by lattice,
and ``lattice`` arrays number the lattices 0..n-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Why a lattice was rejected, in the order the filters run.
NO_REFLECTIONS = "no_reflections"  # no observation integrated by summation with positive variance
SPACE_GROUP = "space_group"  # its Patterson group is not the model's
CELL_OUTLIER = "cell_outlier"  # its cell lies beyond the Mahalanobis cutoff of the cell cluster
SIGNIFICANCE = "significance"  # even its lowest-resolution bin has mean I/sigma below the cutoff
NO_REFERENCE_MATCH = "no_reference_match"  # no observation within the reference's resolution limit
LOW_SIGNAL = "low_signal"  # its correlation with the reference is undefined (< 2 observations, no spread)
LOW_REFERENCE_CC = "low_reference_cc"  # its intensities correlate with the reference below the cutoff

#: cctbx.xfel.merge's significance filter binning (``select.significance_filter`` defaults): about
#: N_BINS resolution bins per lattice, fewer if that leaves less than MIN_COUNT observations per bin,
#: more if it leaves more than MAX_COUNT.
SIGNIFICANCE_N_BINS, SIGNIFICANCE_MIN_COUNT, SIGNIFICANCE_MAX_COUNT = 12, 10, 50
#: cctbx's binning widens the resolution range of the data by this fraction of its span.
_BINNING_RELATIVE_TOLERANCE = 1e-6


def segment_reduce(ufunc: np.ufunc, lattice: np.ndarray, values: np.ndarray, n_lattices: int,
                   fill: float) -> np.ndarray:
    """``ufunc`` reduced over each lattice's values (``lattice`` sorted); ``fill`` for lattices without any."""
    result = np.full(n_lattices, fill, dtype=float)
    if len(lattice):
        starts = np.flatnonzero(np.r_[True, lattice[1:] != lattice[:-1]])
        result[lattice[starts]] = ufunc.reduceat(values, starts)
    return result


def cell_filter(cells: np.ndarray, cluster, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep, distance): Mahalanobis distance of each cell ((n, 6)) from ``cluster``, kept if <= cutoff.

    ``cluster`` is any object with ``mahalanobis(cells) -> distances`` (not squared).
    """
    if len(cells) == 0:
        return np.zeros(0, bool), np.zeros(0)
    distance = np.asarray(cluster.mahalanobis(np.asarray(cells, dtype=float)), dtype=float).reshape(len(cells))
    return distance <= max_distance, distance


def space_group_filter(hall_symbols: Sequence[str], model_space_group) -> np.ndarray:
    """Lattices whose Patterson group is that of the model's space group (a cctbx space_group)."""
    from cctbx import sgtbx

    from xfel_spread.merging.reference import patterson_symbol

    model_patterson = patterson_symbol(model_space_group)
    verdict = {hall: patterson_symbol(sgtbx.space_group(hall)) == model_patterson for hall in set(hall_symbols)}
    return np.array([verdict[hall] for hall in hall_symbols], dtype=bool)


def significance_bin_counts(n_observations: np.ndarray) -> np.ndarray:
    """Number of significance-filter resolution bins of lattices with ``n_observations`` each."""
    n_observations = np.asarray(n_observations)
    return np.maximum.reduce([np.minimum(SIGNIFICANCE_N_BINS, n_observations // SIGNIFICANCE_MIN_COUNT),
                              n_observations // SIGNIFICANCE_MAX_COUNT, np.ones_like(n_observations)])


def equal_volume_bins(d_star_sq: np.ndarray, low: np.ndarray, high: np.ndarray, n_bins: np.ndarray) -> np.ndarray:
    """0-based bin of each 1/d^2 among ``n_bins`` equal reciprocal-volume bins spanning [low, high].

    Mirrors cctbx's ``miller.binning`` on a data set's own resolution range: the range is widened by
    1e-6 of its span, and bins hold equal volumes of reciprocal space (equal steps in d*^3).
    ``low``, ``high`` and ``n_bins`` are given per value.
    """
    span = high - low
    cube_low = np.sqrt(np.maximum(low - span * _BINNING_RELATIVE_TOLERANCE, 0.0)) ** 3
    cube_high = np.sqrt(high + span * _BINNING_RELATIVE_TOLERANCE) ** 3
    width = np.where(cube_high > cube_low, cube_high - cube_low, 1.0)
    fraction = (np.sqrt(d_star_sq) ** 3 - cube_low) / width
    return np.clip(np.floor(fraction * n_bins).astype(np.int64), 0, n_bins - 1)


def significance_filter(lattice: np.ndarray, d_star_sq: np.ndarray, i_over_sigma: np.ndarray, n_lattices: int,
                        sigma: float) -> np.ndarray:
    """Observations kept by cctbx.xfel.merge's significance filter (``select.significance_filter``).

    Per lattice, the observations are binned in resolution (equal reciprocal volumes over the
    lattice's own range, 1/d^2 in the model cell, see :func:`significance_bin_counts`); going out from
    low resolution, bins are accepted while their mean I/sigma exceeds ``sigma`` (empty bins are
    skipped), and the observations of the first failing bin and beyond are dropped. A lattice whose
    first bin fails loses every observation.
    """
    if len(lattice) == 0:
        return np.zeros(0, bool)
    counts = np.bincount(lattice, minlength=n_lattices)
    n_bins = significance_bin_counts(counts)
    low = segment_reduce(np.minimum, lattice, d_star_sq, n_lattices, 0.0)
    high = segment_reduce(np.maximum, lattice, d_star_sq, n_lattices, 0.0)
    bins = equal_volume_bins(d_star_sq, low[lattice], high[lattice], n_bins[lattice])
    width = int(n_bins.max())
    cell = lattice * width + bins
    bin_counts = np.bincount(cell, minlength=n_lattices * width).reshape(n_lattices, width)
    bin_sums = np.bincount(cell, weights=i_over_sigma, minlength=n_lattices * width).reshape(n_lattices, width)
    with np.errstate(invalid="ignore", divide="ignore"):
        failing = (bin_counts > 0) & ~(bin_sums / bin_counts > sigma)
    first_failing = np.where(failing.any(axis=1), failing.argmax(axis=1), width)
    return bins < first_failing[lattice]


def reference_correlation(lattice: np.ndarray, observed: np.ndarray, reference: np.ndarray,
                          n_lattices: int) -> tuple[np.ndarray, np.ndarray]:
    """(cc, n): Pearson correlation of each lattice's intensities with the reference, unit weights.

    cc is NaN where it is undefined (fewer than two observations, or no spread in either), the
    "low signal" case of cctbx.xfel.merge's scaler.
    """
    def sums(values):
        return np.bincount(lattice, weights=values, minlength=n_lattices)

    n = np.bincount(lattice, minlength=n_lattices).astype(float)
    sum_x, sum_y = sums(observed), sums(reference)
    spread_x = n * sums(observed * observed) - sum_x ** 2
    spread_y = n * sums(reference * reference) - sum_y ** 2
    defined = (n >= 2) & (spread_x > 0) & (spread_y > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cc = np.where(defined, (n * sums(observed * reference) - sum_x * sum_y) / np.sqrt(spread_x * spread_y),
                      np.nan)
    return cc, n.astype(np.int64)
