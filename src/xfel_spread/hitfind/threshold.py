"""The run's hit threshold on lit pixels per shot, chosen from their distribution.

Rule (``choose_hit_threshold``), on x = log10(1 + lit pixels) of every shot of the run:

1. ``hitfind.min_lit_pixels`` set: that is the threshold (rule ``override``), nothing is estimated.
2. Otherwise Otsu's split of x: the cut between sorted values that maximises the between-class
   variance. Blanks light a handful of pixels (noise), hits hundreds to thousands, so the two classes
   sit decades apart; orientation and crystal size spread hits over a fraction of a decade. So the
   split is taken only when its class means are at least ``min_separation_decades`` apart: then the
   threshold is the geometric midpoint of the gap the cut falls in (rule ``otsu``).
3. Otherwise the run holds one class (every shot a hit, as in simulated data without blanks, or
   every shot blank), and the floor decides which (rule ``floor``).

The threshold is never below ``lit_pixel_floor``: a shot with fewer lit pixels is a miss whatever
the distribution. A shot is a hit when its lit pixels are at least the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfel_spread.errors import UserInputError


class ThresholdInputError(UserInputError, ValueError):
    """Lit-pixel counts that no threshold can be chosen from; one line."""


@dataclass(frozen=True)
class HitThreshold:
    """``min_lit_pixels``: a shot is a hit when it has at least this many; how it was chosen."""

    min_lit_pixels: float
    rule: str
    separation_decades: float | None = None

    def is_hit(self, lit_pixels) -> np.ndarray:
        return np.asarray(lit_pixels) >= self.min_lit_pixels


def otsu_split(values: np.ndarray) -> tuple[int, float]:
    """Otsu's cut of sorted ``values``: (k, separation), the low class being ``values[:k]``.

    ``separation`` is the difference of the two class means. Needs at least two distinct values.
    """
    n = len(values)
    cumulative = np.cumsum(values)
    low_count = np.arange(1, n)
    low_mean = cumulative[:-1] / low_count
    high_mean = (cumulative[-1] - cumulative[:-1]) / (n - low_count)
    between = low_count * (n - low_count) * (high_mean - low_mean) ** 2
    # A cut between equal values is no cut.
    between[values[1:] == values[:-1]] = -1.0
    best = int(np.argmax(between))
    return best + 1, float(high_mean[best] - low_mean[best])


def choose_hit_threshold(lit_pixels, floor: float, min_separation_decades: float,
                         override: float | None = None) -> HitThreshold:
    """The hit threshold of a run (see the module docstring for the rule)."""
    if override is not None:
        return HitThreshold(float(override), "override")
    lit = np.asarray(lit_pixels, dtype=np.float64)
    if lit.ndim != 1 or len(lit) == 0:
        raise ThresholdInputError("no shots: a hit threshold needs the lit-pixel counts of at least one shot")
    if np.any(~np.isfinite(lit)) or np.any(lit < 0):
        raise ThresholdInputError("lit-pixel counts must be finite and non-negative")
    x = np.sort(np.log10(1.0 + lit))
    if x[0] == x[-1]:
        return HitThreshold(float(floor), "floor", 0.0)
    k, separation = otsu_split(x)
    if separation < min_separation_decades:
        return HitThreshold(float(floor), "floor", separation)
    midpoint = 10 ** ((x[k - 1] + x[k]) / 2) - 1.0
    return HitThreshold(max(float(midpoint), float(floor)), "otsu", separation)
