"""Per-shot measurements for hit finding and the solvent ring, and the run's powder sum.

For each image (ADU, as the shard stores it):

1. photons = (ADU - ADC offset) / gain; a pixel is *trusted* when its ADU lies inside the shard's
   trusted range (inclusive);
2. the shot's solvent background is the azimuthal mean of the trusted pixels in photons per pixel
   at normal incidence (``hitfind.radial``), with bright outliers (Bragg spots) clipped;
3. a pixel is *lit* when its photons exceed that background (times the pixel's collection factor
   f) by more than ``lit_pixel_sigma`` standard deviations of the background's noise and by more
   than ``lit_pixel_min_photons`` photons. The noise is photon counting, so in corrected units it
   grows as 1/sqrt(f): its standard deviation is measured per bin on (corrected - background) x
   sqrt(f), which is uniform round a ring (measured directly on corrected photons, the pixels of
   low f at the panel's corners gave a blank full-size shot 8 lit pixels; this way it gets none).
   The sigma rule keeps the background dark whatever its level; the photon threshold is what counts
   where the background is near 0;
4. the clipped profile is the shot's radial average, and its maximum in the ring window the
   solvent-ring peak.

The powder pattern is the sum over shots of every trusted pixel's photons, Bragg spots included.

A multi-panel image ``(n_panels, n_slow, n_fast)`` is measured the same way over all its panels at
once (one radial profile, lit pixels and photons summed over panels); ADC offset, gain and trusted
range may then be given per panel (a list of ``n_panels`` values, ranges ``(n_panels, 2)``), as an
image list's dxtbx panels can differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from xfel_spread.hitfind.radial import (
    WATER_RING_Q_RANGE_INV_A,
    RadialGeometry,
    RingPeak,
    clipped_radial_statistics,
    ring_peak,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LitPixelSettings:
    """What makes a pixel lit (see the module docstring) and where the solvent ring is looked for."""

    sigma: float = 6.0
    min_photons: float = 10.0
    ring_q_range_inv_a: tuple[float, float] = WATER_RING_Q_RANGE_INV_A

    @classmethod
    def from_config(cls, hitfind: dict) -> "LitPixelSettings":
        return cls(hitfind["lit_pixel_sigma"], hitfind["lit_pixel_min_photons"],
                   tuple(hitfind["ring_q_range_inv_a"]))


def per_panel(value, image: np.ndarray):
    """``value`` as a float, or, given one per panel of a multi-panel ``image``, shaped to broadcast
    over it (``(n_panels, 1, 1)``)."""
    if np.ndim(value) == 0:
        return float(value)
    values = np.asarray(value, dtype=np.float64)
    if image.ndim != 3 or values.shape != (image.shape[0],):
        raise ValueError(f"{values.shape[0]} per-panel values for an image of shape {image.shape}")
    return values.reshape(-1, 1, 1)


def photons_from_adu(image_adu: np.ndarray, detector: dict) -> np.ndarray:
    """Photons per pixel (float64): ADU minus the ADC offset, over the gain (either per panel)."""
    offset, gain = per_panel(detector["adc_offset_adu"], image_adu), per_panel(detector["gain_adu_per_photon"], image_adu)
    return (image_adu.astype(np.float64) - offset) / gain


def trusted_mask(image_adu: np.ndarray, detector: dict) -> np.ndarray:
    """Pixels whose ADU lies inside the shard's trusted range (inclusive at both ends; one range, or
    one per panel ``(n_panels, 2)``)."""
    ranges = np.asarray(detector["trusted_range"], dtype=np.float64)
    if ranges.ndim == 1:
        low, high = detector["trusted_range"]
    else:
        low, high = per_panel(ranges[:, 0], image_adu), per_panel(ranges[:, 1], image_adu)
    return (image_adu >= low) & (image_adu <= high)


@dataclass(frozen=True)
class ShotMeasurement:
    """One shot's hit-finding numbers and radial profile (photons per pixel at normal incidence)."""

    lit_pixels: int
    photons: float
    trusted_pixels: int
    ring: RingPeak
    profile: np.ndarray


def measure_shot(image_adu: np.ndarray, detector: dict, geometry: RadialGeometry, settings: LitPixelSettings,
                 wavelength_a: float, mask: np.ndarray | None = None) -> tuple[ShotMeasurement, np.ndarray, np.ndarray]:
    """Measure one image; also return its photons and trusted mask (flat) for the powder sum. ``mask``
    (bool, image-shaped, True = trusted), when given, leaves out the pixels it rejects."""
    photons = photons_from_adu(image_adu, detector).reshape(-1)
    trusted = trusted_mask(image_adu, detector).reshape(-1)
    if mask is not None:
        trusted &= np.asarray(mask, dtype=bool).reshape(-1)
    factor, root_factor = geometry.relative_factor, geometry.root_relative_factor
    mean, noise = clipped_radial_statistics(photons / factor, trusted, geometry, noise_weight=root_factor)
    excess = photons - mean[geometry.bin_index] * factor
    margin = np.maximum(settings.sigma * noise[geometry.bin_index] * root_factor, settings.min_photons)
    lit = trusted & (excess > margin)
    peak = ring_peak(mean, geometry.bin_two_theta_rad, wavelength_a, settings.ring_q_range_inv_a)
    measurement = ShotMeasurement(int(lit.sum()), float(photons[trusted].sum()), int(trusted.sum()), peak, mean)
    return measurement, photons, trusted


@dataclass
class PowderSum:
    """Sum over shots of each trusted pixel's photons, and how many shots trusted each pixel (flat
    arrays over the image ``shape``: ``(n_slow, n_fast)``, or ``(n_panels, n_slow, n_fast)``)."""

    shape: tuple[int, ...]
    photons: np.ndarray = field(init=False)
    trusted_shots: np.ndarray = field(init=False)
    n_shots: int = 0

    def __post_init__(self):
        self.photons = np.zeros(int(np.prod(self.shape)))
        self.trusted_shots = np.zeros(int(np.prod(self.shape)), dtype=np.int64)

    def add(self, photons: np.ndarray, trusted: np.ndarray) -> None:
        self.photons += np.where(trusted, photons, 0.0)
        self.trusted_shots += trusted
        self.n_shots += 1

    def merge(self, other: "PowderSum") -> None:
        if other.shape != self.shape:
            raise ValueError(f"powder sums of images {other.shape} and {self.shape} cannot be added")
        self.photons += other.photons
        self.trusted_shots += other.trusted_shots
        self.n_shots += other.n_shots

    def mean_per_shot(self) -> tuple[np.ndarray, np.ndarray]:
        """Photons per pixel per trusted shot (flat) and the pixels trusted in at least one shot."""
        covered = self.trusted_shots > 0
        return np.where(covered, self.photons / np.maximum(self.trusted_shots, 1), 0.0), covered
