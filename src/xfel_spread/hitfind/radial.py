"""Azimuthal (radial) averages of detector images, the solvent-ring peak, and the background model.

Pixels are binned by their distance from the beam (the laboratory z axis), in bins of ``bin_width_px``
pixels, so every bin holds a full ring of pixels whatever the scattering angle. Each pixel's photons
are divided by its *relative* collection factor (polarization x solid angle x sensor capture, divided
by the same product at normal incidence): the result, "photons per pixel at normal incidence", is the
same all round a ring for isotropic scattering (an XFEL beam's polarization makes the raw ring 30 %
brighter above and below the beam than beside it at the water ring), and is directly comparable with
the simulator's per-steradian background curve (:func:`background_model_profile`).

The geometry follows ``sim.geometry`` (DIALS laboratory frame, pixel centres at +0.5), built from a
shard's ``/detector`` and ``/beam`` attributes, so the same code serves simulated and real shards. A
multi-panel detector (``/detector`` with the ``n_panels``/``panel_*`` attributes of a tiled simulated
shard, or a dxtbx detector of an image list) gets every pixel's position from its own panel's frame
(:func:`multipanel_radial_geometry`): its images are ``(n_panels, n_slow, n_fast)`` and one profile
bins the pixels of every panel together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.errors import UserInputError
from xfel_spread.sim.geometry import (
    Detector,
    MultiPanelDetector,
    Panel,
    capture_fraction,
    multipanel_capture_fraction,
    multipanel_solid_angle_sr,
    polarization_factor,
    solid_angle_sr,
)
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM

#: The solvent (water) ring lies near q = 2 1/A (d = 3.1 A); the default window to find it in.
WATER_RING_Q_RANGE_INV_A = (1.5, 2.5)
#: Rows of the panel processed at once when computing the geometry (bounds the memory to ~100 MB).
_ROWS_PER_BLOCK = 256


class RadialInputError(UserInputError, ValueError):
    """Bad input to a radial average (shapes, bin width, ring window); one line."""


@dataclass(frozen=True)
class RadialGeometry:
    """Per-pixel geometry of a detector for azimuthal averaging (flat arrays in image order).

    ``shape`` is the image's: ``(n_slow, n_fast)`` for one panel, ``(n_panels, n_slow, n_fast)`` for a
    multi-panel detector (panel-major, as the shard stores it)."""

    shape: tuple[int, ...]
    bin_width_px: float
    #: radius bin of every pixel
    bin_index: np.ndarray
    #: polarization x solid angle x capture of every pixel, relative to normal incidence
    relative_factor: np.ndarray
    #: its square root: photon-counting noise in corrected units scales as one over it
    root_relative_factor: np.ndarray
    #: pixels in each bin, and their mean radius (px) and scattering angle (rad)
    pixels_per_bin: np.ndarray
    bin_radius_px: np.ndarray
    bin_two_theta_rad: np.ndarray
    #: pixel solid angle x capture at normal incidence: photons per pixel there = this x photons/sr
    normal_pixel_factor: float

    @property
    def n_pixels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bins(self) -> int:
        return len(self.pixels_per_bin)

    def q_inv_a(self, wavelength_a: float) -> np.ndarray:
        """q = 4 pi sin(theta) / lambda of every bin (1/Angstrom)."""
        return 4 * math.pi * np.sin(self.bin_two_theta_rad / 2) / wavelength_a


def detector_from_attrs(detector: dict) -> Detector:
    """The panel a shard's ``/detector`` attributes describe (its nominal geometry)."""
    return Detector(int(detector["n_fast"]), int(detector["n_slow"]), float(detector["pixel_size_mm"]),
                    float(detector["distance_mm"]), tuple(float(v) for v in detector["beam_center_mm"]),
                    float(detector["thickness_mm"]), float(detector["attenuation_length_mm"]))


def radial_geometry(detector: Detector, polarization_fraction: float, polarization_normal=(0.0, 1.0, 0.0),
                    bin_width_px: float = 2.0) -> RadialGeometry:
    """Radius bins and relative collection factors of every pixel of ``detector``."""
    if not bin_width_px > 0:
        raise RadialInputError(f"radial bin width must be positive, got {bin_width_px}")
    n_slow, n_fast = detector.n_slow, detector.n_fast
    radius = np.empty(n_slow * n_fast)
    two_theta = np.empty(n_slow * n_fast)
    factor = np.empty(n_slow * n_fast)
    fast = torch.arange(n_fast)
    for row in range(0, n_slow, _ROWS_PER_BLOCK):
        slow_block, fast_block = torch.meshgrid(torch.arange(row, min(row + _ROWS_PER_BLOCK, n_slow)), fast,
                                                indexing="ij")
        positions = detector.pixel_centres_mm(fast_block.reshape(-1), slow_block.reshape(-1))
        directions = positions / torch.linalg.norm(positions, dim=-1, keepdim=True)
        block = slice(row * n_fast, row * n_fast + positions.shape[0])
        radius[block] = torch.linalg.norm(positions[:, :2], dim=-1).numpy() / detector.pixel_size_mm
        two_theta[block] = torch.arccos(torch.clamp(-directions[:, 2], -1.0, 1.0)).numpy()
        factor[block] = (polarization_factor(directions, polarization_fraction, polarization_normal)
                         * solid_angle_sr(positions, detector) * capture_fraction(directions, detector)).numpy()
    return _binned((n_slow, n_fast), bin_width_px, radius, two_theta, factor, _normal_incidence_factor(detector))


def _binned(shape: tuple[int, ...], bin_width_px: float, radius: np.ndarray, two_theta: np.ndarray,
            factor: np.ndarray, normal: float) -> RadialGeometry:
    """The geometry from every pixel's radius (px), 2-theta (rad) and absolute collection factor."""
    bin_index = np.floor(radius / bin_width_px).astype(np.int64)
    counts = np.bincount(bin_index)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_radius = np.bincount(bin_index, radius) / counts
        mean_two_theta = np.bincount(bin_index, two_theta) / counts
    relative = factor / normal
    return RadialGeometry(tuple(shape), float(bin_width_px), bin_index, relative, np.sqrt(relative), counts,
                          mean_radius, mean_two_theta, normal)


def panels_from_attrs(detector: dict) -> MultiPanelDetector:
    """The panels a multi-panel ``/detector`` describes (``n_panels``, ``panel_origin_mm``,
    ``panel_fast_axis``, ``panel_slow_axis``; every panel ``n_fast`` x ``n_slow`` pixels of
    ``pixel_size_mm``, one sensor)."""
    origins, fasts, slows = (np.asarray(detector[name], dtype=np.float64).reshape(-1, 3)
                             for name in ("panel_origin_mm", "panel_fast_axis", "panel_slow_axis"))
    n_panels = int(detector["n_panels"])
    if not len(origins) == len(fasts) == len(slows) == n_panels:
        raise RadialInputError(f"detector names {n_panels} panels but gives {len(origins)} origins, {len(fasts)} "
                               f"fast and {len(slows)} slow axes")
    try:
        return MultiPanelDetector([
            Panel(tuple(origin), tuple(fast), tuple(slow), float(detector["pixel_size_mm"]), int(detector["n_fast"]),
                  int(detector["n_slow"]), float(detector["thickness_mm"]), float(detector["attenuation_length_mm"]),
                  name=str(index)) for index, (origin, fast, slow) in enumerate(zip(origins, fasts, slows))])
    except ValueError as error:
        raise RadialInputError(str(error)) from None


def multipanel_radial_geometry(detector: MultiPanelDetector, polarization_fraction: float,
                               polarization_normal=(0.0, 1.0, 0.0), bin_width_px: float = 2.0) -> RadialGeometry:
    """Radius bins and relative collection factors of every pixel of every panel of ``detector``.

    Each pixel's position comes from its own panel's origin and axes; its radius is its distance from
    the beam axis over the pixel size, its solid angle and capture are along its panel's normal. The
    panels must share one shape and one pixel size (the image is ``(n_panels, n_slow, n_fast)``).
    Normal incidence is a pixel of panel 0's sensor at the panels' mean distance.
    """
    if not bin_width_px > 0:
        raise RadialInputError(f"radial bin width must be positive, got {bin_width_px}")
    try:
        n_slow, n_fast, pixel_mm = detector.uniform_panels()
    except ValueError as error:
        raise RadialInputError(f"radial averaging: {error}") from None
    n_panels = len(detector)
    per_panel = n_slow * n_fast
    radius, two_theta, factor = (np.empty(n_panels * per_panel) for _ in range(3))
    tables = detector.tables("cpu")
    fast = torch.arange(n_fast)
    for panel in range(n_panels):
        for row in range(0, n_slow, _ROWS_PER_BLOCK):
            slow_block, fast_block = torch.meshgrid(torch.arange(row, min(row + _ROWS_PER_BLOCK, n_slow)), fast,
                                                    indexing="ij")
            index = torch.full((fast_block.numel(),), panel, dtype=torch.int64)
            positions = detector.pixel_centres_mm(fast_block.reshape(-1), slow_block.reshape(-1), index)
            directions = positions / torch.linalg.norm(positions, dim=-1, keepdim=True)
            start = panel * per_panel + row * n_fast
            block = slice(start, start + positions.shape[0])
            normal = tables["normal"][panel]
            radius[block] = torch.linalg.norm(positions[:, :2], dim=-1).numpy() / pixel_mm
            two_theta[block] = torch.arccos(torch.clamp(-directions[:, 2], -1.0, 1.0)).numpy()
            factor[block] = (polarization_factor(directions, polarization_fraction, polarization_normal)
                             * multipanel_solid_angle_sr(positions, normal, tables["pixel"][panel])
                             * multipanel_capture_fraction(directions, normal, tables["thickness"][panel],
                                                           tables["attenuation"][panel])).numpy()
    head_on = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    normal_factor = float(pixel_mm ** 2 / detector.distance_mm ** 2 * multipanel_capture_fraction(
        head_on, head_on[0], tables["thickness"][0], tables["attenuation"][0])[0])
    return _binned((n_panels, n_slow, n_fast), bin_width_px, radius, two_theta, factor, normal_factor)


def _normal_incidence_factor(detector: Detector) -> float:
    """Solid angle x capture of a pixel the beam meets head-on (polarization is 1 there)."""
    on_axis = torch.tensor([[0.0, 0.0, -detector.distance_mm]], dtype=torch.float64)
    direction = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    return float(solid_angle_sr(on_axis, detector)[0] * capture_fraction(direction, detector)[0])


def mean_wavelength_a(energies_ev: np.ndarray, photons: np.ndarray) -> float:
    """hc over the photon-weighted mean energy of a spectrum (Angstrom)."""
    photons = np.asarray(photons, dtype=np.float64)
    total = photons.sum()
    if not total > 0:
        raise RadialInputError("spectrum has no photons; its wavelength is undefined")
    return HC_EV_ANGSTROM / float(np.asarray(energies_ev, dtype=np.float64) @ photons / total)


def radial_mean(values: np.ndarray, include: np.ndarray, geometry: RadialGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` over the included pixels of each bin, and the pixels used (NaN where none)."""
    values, include = _flat(values, geometry), _flat(include, geometry)
    bins = geometry.bin_index[include]
    counts = np.bincount(bins, minlength=geometry.n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(bins, values[include], minlength=geometry.n_bins) / counts, counts


def clipped_radial_statistics(corrected: np.ndarray, include: np.ndarray, geometry: RadialGeometry,
                              noise_weight: np.ndarray | None = None, clip_sigma: float = 3.0,
                              passes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean of ``corrected`` and standard deviation of its noise, bright outliers clipped.

    The noise of a pixel is ``(corrected - bin mean) x noise_weight`` (default 1): a weight that makes
    it uniform round a ring makes one standard deviation per bin describe every pixel. Each pass
    drops the pixels whose noise exceeds ``clip_sigma`` standard deviations of the previous pass
    (one-sided: Bragg spots only add light), so spots lift neither the mean nor the spread. Returns
    (mean, std) per bin, NaN for bins without pixels. Sums are accumulated with zero weights for the
    excluded pixels rather than by selecting the included ones, which copies less at 15 M pixels.
    """
    corrected, include = _flat(corrected, geometry), _flat(include, geometry)
    weight = np.ones_like(corrected) if noise_weight is None else _flat(noise_weight, geometry)
    weight_squared = weight * weight
    bins, n_bins = geometry.bin_index, geometry.n_bins
    kept = include
    for number in range(1, passes + 1):
        kept_values = np.where(kept, corrected, 0.0)
        counts = np.bincount(bins, kept, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.bincount(bins, kept_values, minlength=n_bins) / counts
            # E[(c - m)^2 w^2] = E[c^2 w^2] - 2 m E[c w^2] + m^2 E[w^2], from three sums over the kept pixels.
            weighted = kept_values * weight_squared
            second = np.bincount(bins, weighted * kept_values, minlength=n_bins) / counts
            first = np.bincount(bins, weighted, minlength=n_bins) / counts
            zeroth = np.bincount(bins, np.where(kept, weight_squared, 0.0), minlength=n_bins) / counts
            std = np.sqrt(np.maximum(second - 2 * mean * first + mean * mean * zeroth, 0.0))
        if number < passes:
            noise = (corrected - mean[bins]) * weight
            kept = include & ~(noise > clip_sigma * std[bins])
    return mean, std


def _flat(array: np.ndarray, geometry: RadialGeometry) -> np.ndarray:
    if array.shape != geometry.shape and array.shape != (geometry.n_pixels,):
        whose = "panel's" if len(geometry.shape) == 2 else "detector's"
        raise RadialInputError(f"image of shape {array.shape} does not match the {whose} {geometry.shape}")
    return array.reshape(-1)


@dataclass(frozen=True)
class RingPeak:
    """The brightest point of a radial profile inside a q window (NaN when the panel does not reach it)."""

    q_inv_a: float
    two_theta_deg: float
    intensity: float

    @property
    def d_a(self) -> float:
        return 2 * math.pi / self.q_inv_a if self.q_inv_a > 0 else float("nan")


NO_PEAK = RingPeak(float("nan"), float("nan"), float("nan"))


def ring_peak(profile: np.ndarray, two_theta_rad: np.ndarray, wavelength_a: float,
              q_range_inv_a: tuple[float, float] = WATER_RING_Q_RANGE_INV_A) -> RingPeak:
    """Position and height of the profile's maximum within ``q_range_inv_a``.

    The maximum bin and its two neighbours are fitted with a parabola, so the position is not
    limited to the bin grid. A maximum on the window's edge is not a peak (the ring lies outside the
    window, or the panel ends first): it gives :data:`NO_PEAK`, as does a window with under 3 bins.
    """
    q_low, q_high = q_range_inv_a
    if not 0 <= q_low < q_high:
        raise RadialInputError(f"ring window {q_range_inv_a} must be 0 <= low < high (1/A)")
    q = 4 * math.pi * np.sin(np.asarray(two_theta_rad) / 2) / wavelength_a
    inside = np.flatnonzero((q >= q_low) & (q <= q_high) & np.isfinite(profile))
    if len(inside) < 3:
        return NO_PEAK
    best = inside[np.argmax(profile[inside])]
    if best in (inside[0], inside[-1]) or not np.all(np.isfinite(profile[best - 1:best + 2])):
        return NO_PEAK
    below, at, above = profile[best - 1:best + 2]
    curvature = below - 2 * at + above
    shift = 0.5 * (below - above) / curvature if curvature < 0 else 0.0
    height = at - 0.25 * (below - above) * shift
    two_theta = float(np.interp(best + shift, np.arange(len(two_theta_rad)), two_theta_rad))
    return RingPeak(4 * math.pi * math.sin(two_theta / 2) / wavelength_a, math.degrees(two_theta), float(height))


def background_model_profile(two_theta_rad: np.ndarray, energies_ev: np.ndarray, photons_per_channel: np.ndarray,
                             materials: list, beam_size_m: float, normal_pixel_factor: float) -> np.ndarray:
    """The simulator's amorphous background at ``two_theta_rad``, in photons per pixel at normal incidence.

    ``sim.background.background_profile`` gives photons per steradian before polarization and
    capture; times the solid angle and capture of a head-on pixel, it is in the units of a profile of
    corrected photons (see the module docstring).
    """
    from xfel_spread.sim.background import background_profile
    from xfel_spread.sim.forward import Beam

    beam = Beam(torch.as_tensor(np.asarray(energies_ev, dtype=np.float64)),
                torch.as_tensor(np.asarray(photons_per_channel, dtype=np.float64)), beam_size_m)
    return background_profile(beam, materials, np.asarray(two_theta_rad, dtype=np.float64)) * normal_pixel_factor


@dataclass(frozen=True)
class ProfileComparison:
    """An observed radial profile against a model: least-squares scale, correlation, residual."""

    n_bins: int
    scale: float
    correlation: float
    relative_rms_residual: float


def compare_profiles(observed: np.ndarray, model: np.ndarray) -> ProfileComparison:
    """Fit ``observed ~ scale x model`` over the bins where both are finite.

    ``relative_rms_residual`` is the rms of ``observed - scale x model`` over the mean observed value.
    """
    usable = np.isfinite(observed) & np.isfinite(model)
    if usable.sum() < 3:
        raise RadialInputError(f"only {int(usable.sum())} bins where both profiles are defined; need 3")
    observed, model = observed[usable], model[usable]
    scale = float(observed @ model / (model @ model))
    residual = observed - scale * model
    correlation = float(np.corrcoef(observed, model)[0, 1])
    return ProfileComparison(int(usable.sum()), scale, correlation,
                             float(np.sqrt(np.mean(residual ** 2)) / np.mean(observed)))
