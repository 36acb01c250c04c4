"""Weighted means of the scaled observations per asymmetric-unit index.

Observations are grouped twice: by (index, I(+) or I(-)) for the anomalous intensities, and by index
alone for IMEAN, the mean over both Friedel mates. Each mean is weighted by inverse variances, with
standard error 1 / sqrt(sum of weights), as cctbx.xfel.merge's merger computes it. The two half data
sets for CC1/2 and CC_anom split the lattices by a hash of their global id.

All sums run over the observations in canonical order (index, mate, global lattice id, observation),
so the results do not depend on how lattices or indices were spread over MPI ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


def lattice_half(global_id: np.ndarray) -> np.ndarray:
    """0 or 1: the half data set of each lattice, from the splitmix64 hash of its global id."""
    with np.errstate(over="ignore"):
        z = np.asarray(global_id, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(1)).astype(np.int8)


def canonical_order(key: np.ndarray, is_minus: np.ndarray, global_id: np.ndarray,
                    position: np.ndarray) -> np.ndarray:
    """Permutation sorting observations by (index key, I(-) after I(+), lattice, position in lattice)."""
    return np.lexsort((position, global_id, is_minus, key))


def group_numbers(*sorted_columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each row, first row of each group) for rows sorted by ``sorted_columns``."""
    n = len(sorted_columns[0])
    change = np.zeros(n, bool)
    if n:
        change[0] = True
        for column in sorted_columns:
            change[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(change)
    return np.cumsum(change) - 1, starts


def weighted_means(group: np.ndarray, intensity: np.ndarray, variance: np.ndarray,
                   n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sigma, count) per group: inverse-variance weighted mean and its standard error.

    Groups without observations get NaN mean and sigma and count 0.
    """
    weight = 1.0 / variance
    total_weight = np.bincount(group, weights=weight, minlength=n_groups)
    weighted = np.bincount(group, weights=weight * intensity, minlength=n_groups)
    count = np.bincount(group, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return weighted / total_weight, 1.0 / np.sqrt(total_weight), count


@dataclass
class MergedIntensities:
    """Merged values of one kind of group: anomalous (key, is_minus) or Friedel pair (key)."""

    key: np.ndarray  #: int64 asymmetric-unit key of the Friedel pair
    is_minus: np.ndarray  #: bool, the I(-) member (all False for pair means)
    intensity: np.ndarray
    sigma: np.ndarray
    multiplicity: np.ndarray
    half_intensity: np.ndarray  #: (n, 2) mean of each half data set (NaN where it has no observation)
    half_multiplicity: np.ndarray  #: (n, 2)

    def __len__(self) -> int:
        return len(self.key)

    def select(self, selection) -> MergedIntensities:
        return MergedIntensities(**{field.name: getattr(self, field.name)[selection] for field in fields(self)})


def merge_groups(group: np.ndarray, starts: np.ndarray, key: np.ndarray, is_minus: np.ndarray, half: np.ndarray,
                 intensity: np.ndarray, variance: np.ndarray) -> MergedIntensities:
    """Merged values of observations in canonical order, grouped by ``group`` (first rows ``starts``)."""
    n_groups = len(starts)
    mean, sigma, count = weighted_means(group, intensity, variance, n_groups)
    half_intensity = np.empty((n_groups, 2))
    half_multiplicity = np.empty((n_groups, 2), np.int64)
    for which in (0, 1):
        rows = half == which
        half_intensity[:, which], _, half_multiplicity[:, which] = weighted_means(
            group[rows], intensity[rows], variance[rows], n_groups)
    return MergedIntensities(key[starts], is_minus[starts], mean, sigma, count, half_intensity, half_multiplicity)


def merge_observations(key: np.ndarray, is_minus: np.ndarray, half: np.ndarray, intensity: np.ndarray,
                       variance: np.ndarray) -> tuple[MergedIntensities, MergedIntensities]:
    """(anomalous, Friedel-pair) merged intensities of observations in canonical order."""
    anomalous_group, anomalous_starts = group_numbers(key, is_minus)
    anomalous = merge_groups(anomalous_group, anomalous_starts, key, is_minus, half, intensity, variance)
    pair_group, pair_starts = group_numbers(key)
    pairs = merge_groups(pair_group, pair_starts, key, np.zeros(len(key), bool), half, intensity, variance)
    return anomalous, pairs
