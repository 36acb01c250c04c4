"""Merged intensities scored against the simulation's truth, and two merged sets against each other.

The simulated spots of a shot integrate the crystal's |F_k(h)|^2 over the shot's spectrum, so what a
merge of many shots estimates (up to one overall scale and a resolution-dependent falloff) is

    I_true(h) = sum_k w_k |F_k(h)|^2,

with ``w_k`` the mean spectrum of the shots (photons per channel, normalised). Friedel mates stay
separate: the Fe f'' makes I(+) and I(-) differ, and that anomalous difference is the SPREAD signal.

Agreement is Pearson's correlation coefficient, which ignores the unknown scale: of the mean
intensities (IMEAN against the truth averaged over Friedel mates) and of the anomalous differences
I(+) - I(-) (where both mates were measured), overall and in resolution bins, always with the number
of common indices it rests on, so a CC from a handful of indices reads as what it is.

The merged MTZs are read by :mod:`xfel_spread.io.mtz`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xfel_spread.errors import UserInputError
from xfel_spread.io.mtz import MergedIntensities, intensity_array
from xfel_spread.io.tables import format_cell, write_table
from xfel_spread.sim.structure_factors import ChannelAmplitudes, true_intensities


class ScoringInputError(UserInputError, ValueError):
    """Shards or merged files that cannot be scored together (no spectrum, differing channels, another
    point group), with the file named."""


@dataclass(frozen=True)
class MeanSpectrum:
    """Photons per channel summed over the shots of some shards, normalised to sum 1."""

    energies_ev: np.ndarray
    weights: np.ndarray
    n_shots: int


def mean_spectrum(shard_paths: Sequence[str | os.PathLike]) -> MeanSpectrum:
    """The mean spectrum of every shot in the simulated shards (all on the same channels)."""
    from xfel_spread.io.shard import read_shard_metadata

    if not shard_paths:
        raise ScoringInputError("mean spectrum: no shard given")
    energies, total, n_shots = None, None, 0
    for path in shard_paths:
        # The metadata holds every shot's spectrum (read_shard_spectrum's source) in one read.
        metadata = read_shard_metadata(path)
        if energies is None:
            energies, total = metadata.energy_ev, np.zeros(len(metadata.energy_ev))
        elif not np.allclose(metadata.energy_ev, energies, rtol=0, atol=1e-6):
            raise ScoringInputError(f"{path}: spectrum channels differ from those of {shard_paths[0]}")
        total += metadata.photons_per_channel.sum(axis=0)
        n_shots += metadata.n_shots
    if not total.sum() > 0:
        raise ScoringInputError(f"{shard_paths[0]}: the shards' spectra hold no photons")
    return MeanSpectrum(energies_ev=np.asarray(energies, dtype=np.float64), weights=total / total.sum(),
                        n_shots=n_shots)


def pearson_cc(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation coefficient; NaN with fewer than two pairs or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else math.nan


def resolution_bin_edges(d_max: float, d_min: float, n_bins: int) -> np.ndarray:
    """``n_bins + 1`` d edges from d_max down to d_min, equal steps in 1/d^3 (equal reciprocal volume,
    so a complete data set has about as many indices in each bin)."""
    if not d_max > d_min > 0 or n_bins < 1:
        raise ValueError(f"resolution bins: need d_max > d_min > 0 and at least one bin, got "
                         f"{d_max}, {d_min}, {n_bins}")
    edges = np.linspace(d_max ** -3, d_min ** -3, n_bins + 1) ** (-1.0 / 3.0)
    # The ends exactly as given, so that the indices at the limits are not lost to rounding.
    edges[0], edges[-1] = d_max, d_min
    return edges


def _paired_values(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d of a's common indices, a's values, b's values) on the indices both arrays hold."""
    a_common, b_common = a.common_sets(b)
    return (a_common.d_spacings().data().as_numpy_array(), a_common.data().as_numpy_array(),
            b_common.data().as_numpy_array())


def _binned_cc(d: np.ndarray, x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> list[tuple[int, float]]:
    """(count, CC) of the pairs in each bin [edges[i+1], edges[i]]; the end edges are inclusive."""
    position = np.searchsorted(-edges, -d, side="right") - 1  # edges fall, so search on -d
    position[d == edges[-1]] = len(edges) - 2
    results = []
    for index in range(len(edges) - 1):
        inside = position == index
        results.append((int(inside.sum()), pearson_cc(x[inside], y[inside])))
    return results


def compare_intensities(mean_a, mean_b, anomalous_a, anomalous_b, n_bins: int,
                        d_limits: tuple[float, float] | None = None) -> dict:
    """CC of two sets of mean intensities and of their anomalous differences, overall and binned.

    The arrays are cctbx intensity arrays in one asymmetric unit, ``a``'s unit cell giving the
    resolution. Bins span ``d_limits`` (d_max, d_min), by default the range of the common mean
    indices; indices outside it count overall only. Returns ``n_common``, ``cc``, ``n_anomalous``,
    ``cc_anomalous`` and ``bins``, a list of the same per bin with its ``d_max`` and ``d_min``.
    """
    d_mean, mean_x, mean_y = _paired_values(mean_a, mean_b)
    d_anomalous, anomalous_x, anomalous_y = _paired_values(anomalous_a.anomalous_differences(),
                                                           anomalous_b.anomalous_differences())
    result = {"n_common": int(d_mean.size), "cc": pearson_cc(mean_x, mean_y),
              "n_anomalous": int(d_anomalous.size), "cc_anomalous": pearson_cc(anomalous_x, anomalous_y),
              "bins": []}
    if d_limits is None:
        if d_mean.size == 0 or d_mean.max() == d_mean.min():
            return result
        d_limits = (float(d_mean.max()), float(d_mean.min()))
    edges = resolution_bin_edges(d_limits[0], d_limits[1], n_bins)
    mean_bins = _binned_cc(d_mean, mean_x, mean_y, edges)
    anomalous_bins = _binned_cc(d_anomalous, anomalous_x, anomalous_y, edges)
    for index, ((n_common, cc), (n_anomalous, cc_anomalous)) in enumerate(zip(mean_bins, anomalous_bins)):
        result["bins"].append({"d_max": float(edges[index]), "d_min": float(edges[index + 1]),
                               "n_common": n_common, "cc": cc, "n_anomalous": n_anomalous,
                               "cc_anomalous": cc_anomalous})
    return result


def _check_same_point_group(a_symbol: str, b_symbol: str, what: str) -> None:
    from cctbx import sgtbx

    groups = [sgtbx.space_group_info(symbol).group().build_derived_point_group() for symbol in (a_symbol, b_symbol)]
    if groups[0] != groups[1]:
        raise ScoringInputError(f"{what}: space groups {a_symbol} and {b_symbol} have different point groups")


def score_against_truth(merged: MergedIntensities, truth_indices: np.ndarray, truth_intensities: np.ndarray,
                        n_bins: int, d_limits: tuple[float, float] | None = None) -> dict:
    """:func:`compare_intensities` of a merged set (``a``) against the true intensities (``b``).

    ``truth_indices`` are anomalous indices (h and -h distinct, any symmetry equivalent in the
    merged set's space group), ``truth_intensities`` their I_true; the mean truth is the average of
    the Friedel mates.
    """
    truth = intensity_array(merged.crystal_symmetry(), truth_indices, truth_intensities, None,
                             anomalous=True).map_to_asu()
    return compare_intensities(merged.mean_array(), truth.average_bijvoet_mates(), merged.anomalous_array(), truth,
                               n_bins, d_limits)


def correlate_merged(a: MergedIntensities, b: MergedIntensities, n_bins: int,
                     d_limits: tuple[float, float] | None = None) -> dict:
    """:func:`compare_intensities` of two merged sets of the same crystal (resolution from ``a``'s cell)."""
    _check_same_point_group(a.space_group, b.space_group, f"{a.path} against {b.path}")
    symmetry = a.crystal_symmetry()
    # b's indices are put in a's cell so that both sides of a pair share one resolution.
    mean_b = b.mean_array().customized_copy(crystal_symmetry=symmetry).map_to_asu()
    anomalous_b = b.anomalous_array().customized_copy(crystal_symmetry=symmetry).map_to_asu()
    return compare_intensities(a.mean_array(), mean_b, a.anomalous_array(), anomalous_b, n_bins, d_limits)


#: Columns of the comparison table (one row per comparison overall, then one per resolution bin).
COMPARISON_COLUMNS = ("comparison", "bin", "d_max", "d_min", "n_common", "cc", "n_anomalous", "cc_anomalous")


def truth_for_shards(amplitudes: ChannelAmplitudes, shard_paths: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """True intensities under the mean spectrum of the shards' shots (their channels must be the table's)."""
    spectrum = mean_spectrum(shard_paths)
    if spectrum.energies_ev.shape != amplitudes.energies_ev.shape or not np.allclose(
            spectrum.energies_ev, amplitudes.energies_ev, rtol=0, atol=1e-6):
        raise ScoringInputError(f"{shard_paths[0]}: the spectrum's {spectrum.energies_ev.size} channels are not the "
                         f"amplitude table's {amplitudes.energies_ev.size}")
    return true_intensities(amplitudes, spectrum.weights)


def score_merged_sets(ours: MergedIntensities, theirs: MergedIntensities | None, amplitudes: ChannelAmplitudes,
                      shard_paths: Sequence, n_bins: int) -> list[dict]:
    """Ours against the truth, and if given DIALS's (``theirs``) against the truth and ours against it.

    Every comparison uses the same resolution bins, spanning both merged sets. Returns one dict per
    comparison: ``name`` and ``d_limits`` besides :func:`compare_intensities`'s keys.
    """
    merged_sets = [ours] if theirs is None else [ours, theirs]
    for merged in merged_sets:
        _check_same_point_group(merged.space_group, amplitudes.space_group, f"{merged.path} against the truth")
    ranges = [merged.d_range() for merged in merged_sets]
    d_limits = (max(d_max for d_max, _ in ranges), min(d_min for _, d_min in ranges))
    truth_indices, truth_values = truth_for_shards(amplitudes, shard_paths)
    comparisons = [("ours vs truth", score_against_truth(ours, truth_indices, truth_values, n_bins, d_limits))]
    if theirs is not None:
        comparisons += [("DIALS vs truth", score_against_truth(theirs, truth_indices, truth_values, n_bins, d_limits)),
                        ("ours vs DIALS", correlate_merged(ours, theirs, n_bins, d_limits))]
    return [{"name": name, "d_limits": d_limits, **result} for name, result in comparisons]


def comparison_rows(comparisons: Sequence[dict]) -> list[dict]:
    """The comparisons as table rows: each one overall (bin ``overall``), then its bins numbered from 1."""
    rows = []
    for comparison in comparisons:
        d_max, d_min = comparison["d_limits"]
        rows.append({"comparison": comparison["name"], "bin": "overall", "d_max": d_max, "d_min": d_min,
                     **{key: comparison[key] for key in COMPARISON_COLUMNS[4:]}})
        for number, result in enumerate(comparison["bins"], start=1):
            rows.append({"comparison": comparison["name"], "bin": str(number),
                         **{key: result[key] for key in COMPARISON_COLUMNS[2:]}})
    return rows


def write_comparison_table(comparisons: Sequence[dict], path) -> None:
    """The comparisons as TSV (:data:`COMPARISON_COLUMNS`), atomically; an undefined CC is the empty cell."""
    write_table(path, COMPARISON_COLUMNS, ([format_cell(row[key]) if isinstance(row[key], float) else row[key]
                                            for key in COMPARISON_COLUMNS] for row in comparison_rows(comparisons)))


def format_comparisons(dataset: str, comparisons: Sequence[dict]) -> str:
    """The comparisons as aligned text: an overview, then each comparison by resolution bin."""
    lines = [f"Merged intensities scored against the simulation's truth, dataset {dataset}",
             "Pearson CC of mean intensities (IMEAN against the truth's Friedel-mate average) and of anomalous",
             "differences I(+) - I(-); n = indices both sides have (a CC from few indices means little).",
             "",
             f"{'comparison':16s}{'d range (A)':>16s}{'n':>8s}{'CC':>9s}{'n anom':>9s}{'CC anom':>9s}"]
    for comparison in comparisons:
        lines.append(_text_row(comparison["name"], *comparison["d_limits"], comparison))
    for comparison in comparisons:
        lines += ["", f"{comparison['name']}, by resolution",
                  f"{'bin':16s}{'d range (A)':>16s}{'n':>8s}{'CC':>9s}{'n anom':>9s}{'CC anom':>9s}"]
        for number, result in enumerate(comparison["bins"], start=1):
            lines.append(_text_row(str(number), result["d_max"], result["d_min"], result))
    return "\n".join(lines) + "\n"


def _text_row(label: str, d_max: float, d_min: float, result: dict) -> str:
    d_range = f"{d_max:.2f}-{d_min:.2f}"
    return (f"{label:16s}{d_range:>16s}{result['n_common']:>8d}{result['cc']:>9.3f}"
            f"{result['n_anomalous']:>9d}{result['cc_anomalous']:>9.3f}")
