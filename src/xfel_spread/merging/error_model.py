"""The ev11 error model (Evans 2011, as cctbx.xfel.merge's ``errors/error_modifier_ev11.py``).

Each observation's variance becomes

    sdfac^2 (variance + sdb^2 |<I>| + sdadd^2 <I>^2)

with <I> the unweighted mean of the observations of its index (I(+) and I(-) apart). The three
parameters are refined so that, in each of 100 bins of <I>, the deviations

    delta = sqrt((n - 1) / n) (I - mean of the other n - 1 observations)

of indices observed more than ``minimum_multiplicity`` times have unit variance under the new
variances: the target is sum over bins of sqrt(n_bin) (1 - sqrt(<delta^2 / variance>_bin))^2, as
upstream's.

Departures from upstream: the sdb term uses |<I>| so that weak indices with a negative mean
cannot make a variance negative, and the target is minimised by scipy's L-BFGS-B on parameters
scaled to the data's typical variance and intensity (sdb and sdadd are otherwise of very different
magnitudes for photon counts and for scaled intensities), with sdfac solved for exactly at each step
instead of started from upstream's normal probability plot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Bins of <I> in the target, as upstream's.
N_INTENSITY_BINS = 100
#: Fewer deviations than this leave the error model at its identity (upstream stops with an error).
MIN_DEVIATIONS = 20
#: Starting values of the scaled sdb and sdadd (see :func:`fit_ev11`): small, as upstream starts them, so
#: the fit finds the minimum nearest to the integration sigmas. The target also falls, further out,
#: towards models that drop the integration variances altogether (sdfac -> 0 with sdfac sdb finite,
#: every observation of an index then weighted alike), which merge worse on synthetic data; the
#: gradient vanishes at zero, hence not zero.
_INITIAL_SCALED_SDB = _INITIAL_SCALED_SDADD = 0.1


@dataclass(frozen=True)
class ErrorModel:
    """ev11 parameters; ``note`` says why they were not refined, if they were not."""

    sdfac: float = 1.0
    sdb: float = 0.0
    sdadd: float = 0.0
    n_deviations: int = 0
    note: str = ""

    def variance(self, variance: np.ndarray, mean_intensity: np.ndarray) -> np.ndarray:
        """The modified variances of observations with these variances and index means."""
        return self.sdfac ** 2 * (variance + self.sdb ** 2 * np.abs(mean_intensity)
                                  + self.sdadd ** 2 * mean_intensity ** 2)


def group_means(group: np.ndarray, intensity: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(unweighted mean, count) of each group's intensities."""
    count = np.bincount(group, minlength=n_groups)
    total = np.bincount(group, weights=intensity, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count, count


def deviations(group: np.ndarray, intensity: np.ndarray, n_groups: int,
               minimum_multiplicity: int) -> tuple[np.ndarray, np.ndarray]:
    """(work mask, delta) of each observation; work marks groups with more than ``minimum_multiplicity``."""
    total = np.bincount(group, weights=intensity, minlength=n_groups)[group]
    count = np.bincount(group, minlength=n_groups)[group]
    work = count > minimum_multiplicity
    n = np.where(work, count, 2).astype(float)
    mean_of_others = (total - intensity) / (n - 1)
    return work, np.where(work, np.sqrt((n - 1) / n) * (intensity - mean_of_others), 0.0)


def intensity_bins(mean_intensity: np.ndarray) -> np.ndarray:
    """Bin (0..N_INTENSITY_BINS-1) of each <I>: equal widths between the extremes, the end bins open."""
    edges = np.linspace(mean_intensity.min(), mean_intensity.max(), N_INTENSITY_BINS + 1)
    return np.clip(np.searchsorted(edges, mean_intensity, side="right") - 1, 0, N_INTENSITY_BINS - 1)


@dataclass(frozen=True)
class _Deviations:
    """The fit's data: delta^2, variance, |<I>|, <I>^2 and intensity bin of each deviation."""

    delta_sq: np.ndarray
    variance: np.ndarray
    absolute_mean: np.ndarray
    mean_sq: np.ndarray
    bins: np.ndarray
    count: np.ndarray  #: deviations per bin

    def bin_sums(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.bins, weights=values, minlength=N_INTENSITY_BINS)


def profiled_target(sdb: float, sdadd: float, data: _Deviations) -> tuple[float, float, np.ndarray]:
    """(target, best sdfac, gradient wrt (sdb, sdadd)) with sdfac at its optimum for this sdb, sdadd.

    With T_b the sum of delta^2 / (variance + sdb^2 |<I>| + sdadd^2 <I>^2) over bin b, r_b =
    sqrt(T_b / n_b) and x = 1 / sdfac, the target sum_b sqrt(n_b) (1 - r_b x)^2 is quadratic in x,
    minimal at x = sum(w r) / sum(w r^2) (w_b = sqrt(n_b)); its gradient there needs no term in x.
    """
    inner = data.variance + sdb * sdb * data.absolute_mean + sdadd * sdadd * data.mean_sq
    ratio = data.delta_sq / inner
    used = data.count > 0
    n = data.count[used].astype(float)
    rms = np.sqrt(data.bin_sums(ratio)[used] / n)
    weight = np.sqrt(n)
    if not np.any(rms > 0):
        return float(weight.sum()), float("nan"), np.zeros(2)
    x = np.sum(weight * rms) / np.sum(weight * rms * rms)
    target = float(np.sum(weight * (1.0 - rms * x) ** 2))
    ratio /= inner
    # d target / d T_b = -w_b x (1 - r_b x) / (r_b n_b) and d T_b / d sdb = -2 sdb sum(delta^2 |<I>| / inner^2)
    # (likewise for sdadd with <I>^2), so d target / d sdb = sum_b factor_b sdb sum(...)
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(rms > 0, 2.0 * weight * x * (1.0 - rms * x) / (rms * n), 0.0)
    gradient = np.array([np.sum(factor * sdb * data.bin_sums(ratio * data.absolute_mean)[used]),
                         np.sum(factor * sdadd * data.bin_sums(ratio * data.mean_sq)[used])])
    return target, 1.0 / x, gradient


def fit_ev11(delta_sq: np.ndarray, variance: np.ndarray, mean_intensity: np.ndarray) -> ErrorModel:
    """Refine sdfac, sdb and sdadd on the squared deviations of observations with ``variance``.

    ``mean_intensity`` is each observation's index mean <I>. sdfac is solved for exactly at each step
    (:func:`profiled_target`), so L-BFGS-B searches only sdb and sdadd, scaled to the data: sdb by
    sqrt(V / M) and sdadd by sqrt(V) / M, with V the median variance and M the median |<I>|, so that
    scaled values of order one mean terms of the size of the typical variance.
    """
    from scipy.optimize import minimize

    n = len(delta_sq)
    if n < MIN_DEVIATIONS:
        return ErrorModel(n_deviations=n, note=f"not refined: {n} deviations, fewer than {MIN_DEVIATIONS}")
    typical_variance = float(np.median(variance))
    typical_mean = float(np.median(np.abs(mean_intensity)))
    if not (typical_variance > 0 and typical_mean > 0):
        return ErrorModel(n_deviations=n, note="not refined: the typical variance or mean intensity is zero")
    scales = np.array([np.sqrt(typical_variance / typical_mean), np.sqrt(typical_variance) / typical_mean])
    bins = intensity_bins(mean_intensity)
    data = _Deviations(delta_sq, variance, np.abs(mean_intensity), mean_intensity * mean_intensity, bins,
                       np.bincount(bins, minlength=N_INTENSITY_BINS))

    def target(scaled):
        value, _, gradient = profiled_target(scaled[0] * scales[0], scaled[1] * scales[1], data)
        return value, gradient * scales

    result = minimize(target, np.array([_INITIAL_SCALED_SDB, _INITIAL_SCALED_SDADD]), jac=True,
                      method="L-BFGS-B", bounds=[(0.0, None), (0.0, None)])
    sdb, sdadd = result.x * scales
    value, sdfac, _ = profiled_target(sdb, sdadd, data)
    if not np.isfinite(sdfac):
        return ErrorModel(n_deviations=n, note="not refined: every deviation is zero")
    model = ErrorModel(float(sdfac), float(sdb), float(sdadd), n,
                       "" if result.success else f"L-BFGS-B stopped: {result.message}")
    log.info("ev11 error model from %d deviations: sdfac %.4f, sdb %.4g, sdadd %.4g (target %.4g, %d evaluations)",
             n, model.sdfac, model.sdb, model.sdadd, value, result.nfev)
    return model
