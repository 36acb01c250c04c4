"""The ev11 error model (Evans 2011, as cctbx.xfel.merge's ``errors/error_modifier_ev11.py``).

Each observation's variance becomes

    sdfac^2 (variance + sdb^2 |<I>| + sdadd^2 <I>^2)

with <I> the unweighted mean of the observations of its index (I(+) and I(-) apart). The parameters
are refined so that, in each of 100 bins of <I>, the deviations

    delta = sqrt((n - 1) / n) (I - mean of the other n - 1 observations)

of indices observed more than ``minimum_multiplicity`` times have unit variance under the new
variances: the target is sum over bins of sqrt(n_bin) (1 - sqrt(<delta^2 / variance>_bin))^2, as
upstream's.

The fit. The target is quadratic in 1 / sdfac, so sdfac is solved for exactly (:func:`profiled_target`)
and the target becomes a function of sdadd alone. That function can have more than one minimum: on
the validation run's psf lattices one lies at sdadd = 0 (sdfac 77, target 38.2) and the lowest at
sdadd 0.12 (sdfac 3.1, target 22.9), and a local search started near zero stops in the first. So
sdadd is searched globally: the target on a coarse grid of scaled sdadd values (0 and half decades
from 1e-3 to 1e3, see :func:`fit_ev11`), then a bounded scalar search between the grid neighbours of
the lowest grid minima, keeping the lowest target found. The search is deterministic, and runs on
rank 0 over deviations gathered in canonical order, so it gives the same model for any rank count.

Departures from upstream:

* sdb is held at zero. A summation intensity's integration variance already holds its own Poisson
  term, which grows with the intensity, so over the bins of <I> that the target compares,
  ``sdfac^2 variance`` and ``sdfac^2 sdb^2 |<I>|`` have nearly the same profile, and the target can
  trade one for the other. With sdb free its global minimum does trade, towards variances that are a
  smooth function of <I> alone (to the limit sdfac -> 0 with sdfac sdb and sdfac sdadd finite). The
  target cannot see what this costs: the sdb and sdadd terms are the same for every observation of an
  index, so the merge's weights within an index come from the integration variances alone, and the
  trade throws them away. Measured on our data (merge, then CC against the truth): on the
  100,000-lattice synthetic benchmark the global minimum with sdb free is sdfac 1.65, sdb 44, sdadd
  0.056 (target 745) and merges to anomalous CC 0.899, against 0.906 for the minimum with sdb = 0
  (sdfac 5.34, sdadd 0.023, target 849); on the validation lattices (psf and nopsf) the minimum with
  sdb free is the edge sdfac -> 0, every observation of an index weighted alike. A lower bound on
  sdfac would not prevent the trade (the benchmark's minimum has sdfac > 1); dropping the term that
  duplicates the integration variance does. (Upstream starts sdb near zero, at the square root of
  its normal-probability-plot intercept, where the target's gradient in sdb, a function of sdb^2,
  all but vanishes.)
* The sdb term, where a model carries one, uses |<I>|, so that weak indices with a negative mean
  cannot make a variance negative.
* sdfac is solved for exactly instead of refined from upstream's normal-probability-plot start, and
  sdadd is searched globally (above) instead of by upstream's L-BFGS-B from that start.
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
#: Scaled sdadd values of the coarse search (see :func:`fit_ev11`): zero and half decades from 1e-3
#: to 1e3. At the top the sdadd term is 1e6 times the typical variance at the typical intensity.
SCALED_SDADD_GRID = np.concatenate([[0.0], np.logspace(-3.0, 3.0, 13)])
#: Grid minima (lowest first) refined by the bounded scalar search.
N_REFINED_MINIMA = 2
#: Bracket-relative tolerance of the bounded scalar search.
_RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ErrorModel:
    """ev11 parameters and the target they reach; ``note`` says why they were not refined, if they were not."""

    sdfac: float = 1.0
    sdb: float = 0.0
    sdadd: float = 0.0
    n_deviations: int = 0
    note: str = ""
    target: float = float("nan")

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
class Deviations:
    """The fit's data: delta^2, variance, <I>^2 and intensity bin of each deviation, and counts per bin."""

    delta_sq: np.ndarray
    variance: np.ndarray
    mean_sq: np.ndarray
    bins: np.ndarray
    count: np.ndarray

    @classmethod
    def build(cls, delta_sq: np.ndarray, variance: np.ndarray, mean_intensity: np.ndarray) -> Deviations:
        bins = intensity_bins(mean_intensity)
        return cls(delta_sq, variance, mean_intensity * mean_intensity, bins,
                   np.bincount(bins, minlength=N_INTENSITY_BINS))


def profiled_target(sdadd: float, data: Deviations) -> tuple[float, float]:
    """(target, best sdfac) of sdb = 0 and this sdadd, with sdfac at its optimum.

    With T_b the sum of delta^2 / (variance + sdadd^2 <I>^2) over bin b, r_b = sqrt(T_b / n_b) and
    x = 1 / sdfac, the target sum_b sqrt(n_b) (1 - r_b x)^2 is quadratic in x, minimal at
    x = sum(w r) / sum(w r^2) (w_b = sqrt(n_b)). The sdfac is NaN when every deviation is zero.
    """
    ratio = data.delta_sq / (data.variance + sdadd * sdadd * data.mean_sq)
    used = data.count > 0
    n = data.count[used].astype(float)
    rms = np.sqrt(np.bincount(data.bins, weights=ratio, minlength=N_INTENSITY_BINS)[used] / n)
    weight = np.sqrt(n)
    if not np.any(rms > 0):
        return float(weight.sum()), float("nan")
    x = np.sum(weight * rms) / np.sum(weight * rms * rms)
    return float(np.sum(weight * (1.0 - rms * x) ** 2)), float(1.0 / x)


def grid_minima(values: np.ndarray) -> np.ndarray:
    """Positions of the local minima of a sequence (ends included, plateaus once), lowest first."""
    previous = np.r_[np.inf, values[:-1]]
    following = np.r_[values[1:], np.inf]
    minima = np.flatnonzero((values < previous) & (values <= following))
    return minima[np.argsort(values[minima], kind="stable")]


def fit_ev11(delta_sq: np.ndarray, variance: np.ndarray, mean_intensity: np.ndarray) -> ErrorModel:
    """Refine sdfac and sdadd (sdb held at zero) on the squared deviations of observations with ``variance``.

    ``mean_intensity`` is each observation's index mean <I>. sdadd is searched on
    :data:`SCALED_SDADD_GRID` in units of sqrt(V) / M, with V the median variance and M the median
    |<I>| (at scaled value one the sdadd term equals the typical variance at the typical intensity),
    then refined by bounded Brent searches between the neighbours of the :data:`N_REFINED_MINIMA`
    lowest grid minima; sdfac is solved for exactly at every step.
    """
    from scipy.optimize import minimize_scalar

    n = len(delta_sq)
    if n < MIN_DEVIATIONS:
        return ErrorModel(n_deviations=n, note=f"not refined: {n} deviations, fewer than {MIN_DEVIATIONS}")
    typical_variance = float(np.median(variance))
    typical_mean = float(np.median(np.abs(mean_intensity)))
    if not (typical_variance > 0 and typical_mean > 0):
        return ErrorModel(n_deviations=n, note="not refined: the typical variance or mean intensity is zero")
    scale = np.sqrt(typical_variance) / typical_mean
    data = Deviations.build(delta_sq, variance, mean_intensity)
    evaluations = 0

    def target(scaled_sdadd: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return profiled_target(scaled_sdadd * scale, data)[0]

    grid = SCALED_SDADD_GRID
    values = np.array([target(value) for value in grid])
    best = int(np.argmin(values))
    best_scaled, best_value = grid[best], values[best]
    for position in grid_minima(values)[:N_REFINED_MINIMA]:
        low, high = grid[max(position - 1, 0)], grid[min(position + 1, len(grid) - 1)]
        result = minimize_scalar(target, bounds=(low, high), method="bounded",
                                 options={"xatol": _RELATIVE_TOLERANCE * high})
        if result.fun < best_value:
            best_scaled, best_value = float(result.x), float(result.fun)

    value, sdfac = profiled_target(best_scaled * scale, data)
    if not np.isfinite(sdfac):
        return ErrorModel(n_deviations=n, note="not refined: every deviation is zero")
    note = ""
    if best_scaled >= grid[-1] * (1 - _RELATIVE_TOLERANCE):
        note = "sdadd at the top of its search: the integration variances carry almost no weight"
    model = ErrorModel(sdfac, 0.0, float(best_scaled * scale), n, note, value)
    log.info("ev11 error model from %d deviations: sdfac %.4f, sdb 0 (held), sdadd %.4g (target %.4g; "
             "%d evaluations, grid minimum at scaled sdadd %.3g)", n, model.sdfac, model.sdadd, value, evaluations,
             grid[best])
    return model
