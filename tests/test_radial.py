"""Radial averages on synthetic panels: ring radius and q recovered, collection factors removed,
Bragg-like outliers clipped, the ring-peak window, the background model's units, one-line errors."""

import math

import numpy as np
import pytest

from xfel_spread.hitfind.radial import (
    RadialInputError,
    background_model_profile,
    clipped_radial_statistics,
    compare_profiles,
    mean_wavelength_a,
    radial_geometry,
    radial_mean,
    ring_peak,
)
from xfel_spread.sim.geometry import Detector

N_PIXELS, PIXEL_MM, DISTANCE_MM = 240, 0.5, 60.0
WAVELENGTH_A = 1.75


def panel(offset_px=(0.0, 0.0), thickness_mm=0.0) -> Detector:
    centre = N_PIXELS * PIXEL_MM / 2
    detector = Detector(N_PIXELS, N_PIXELS, PIXEL_MM, DISTANCE_MM, (centre, centre), thickness_mm)
    return detector.with_beam_center_offset_px(offset_px)


def pixel_radius(detector: Detector) -> np.ndarray:
    """Distance (px) of every pixel centre from the beam centre, image-shaped."""
    slow, fast = np.mgrid[0:detector.n_slow, 0:detector.n_fast] + 0.5
    x0, y0 = (value / detector.pixel_size_mm for value in detector.beam_center_mm)
    return np.hypot(fast - x0, slow - y0)


def test_synthetic_ring_radius_and_q_are_recovered():
    detector = panel(offset_px=(3.3, -2.1))
    geometry = radial_geometry(detector, polarization_fraction=0.0, bin_width_px=1.0)
    ring_radius_px = 71.4
    image = 5.0 + 100.0 * np.exp(-0.5 * ((pixel_radius(detector) - ring_radius_px) / 3.0) ** 2)
    profile, counts = radial_mean(image, np.ones(image.shape, bool), geometry)

    best = np.nanargmax(profile)
    assert abs(geometry.bin_radius_px[best] - ring_radius_px) < 0.6
    assert counts.sum() == N_PIXELS ** 2

    two_theta = math.atan(ring_radius_px * PIXEL_MM / DISTANCE_MM)
    expected_q = 4 * math.pi * math.sin(two_theta / 2) / WAVELENGTH_A
    # The raw profile of an image flat in photons per pixel: the peak sits where the ring does.
    peak = ring_peak(profile, geometry.bin_two_theta_rad, WAVELENGTH_A, (0.5, 3.5))
    assert peak.q_inv_a == pytest.approx(expected_q, abs=0.005)
    assert peak.two_theta_deg == pytest.approx(math.degrees(two_theta), abs=0.05)
    assert peak.d_a == pytest.approx(2 * math.pi / expected_q, rel=0.003)
    assert peak.intensity == pytest.approx(105.0, rel=0.02)


def test_collection_factors_are_removed_round_a_ring():
    # A polarized beam, oblique pixels and a thin sensor: photons proportional to each pixel's factor
    # are one constant per bin once corrected, though they vary by tens of per cent round a ring.
    geometry = radial_geometry(panel(thickness_mm=0.03), polarization_fraction=1.0, bin_width_px=2.0)
    image = 400.0 * geometry.relative_factor.reshape(geometry.shape)
    ring = geometry.bin_index.reshape(geometry.shape) == 50
    assert image[ring].max() / image[ring].min() > 1.2
    corrected, _ = radial_mean(image / geometry.relative_factor.reshape(geometry.shape), np.ones(image.shape, bool),
                               geometry)
    assert np.nanmax(np.abs(corrected - 400.0)) < 1e-9
    assert geometry.relative_factor.max() == pytest.approx(1.0, abs=1e-3)  # normal incidence is the unit


def test_clipped_statistics_ignore_bright_spots_and_untrusted_pixels():
    geometry = radial_geometry(panel(), polarization_fraction=0.0, bin_width_px=2.0)
    rng = np.random.default_rng(5)
    image = rng.normal(200.0, 10.0, geometry.shape)
    spots = rng.integers(0, N_PIXELS, (300, 2))
    image[spots[:, 0], spots[:, 1]] += 1.0e5
    trusted = np.ones(geometry.shape, bool)
    trusted[:, :10] = False
    image[:, :10] = -1.0e6  # untrusted pixels hold garbage
    mean, std = clipped_radial_statistics(image, trusted, geometry)
    populated = geometry.pixels_per_bin > 200
    assert np.nanmax(np.abs(mean[populated] - 200.0)) < 3.0
    assert np.nanmedian(std[populated]) == pytest.approx(10.0, rel=0.05)
    plain, _ = radial_mean(image, trusted, geometry)
    assert np.nanmax(plain[populated]) > 300.0  # what clipping avoids


def test_ring_outside_the_window_or_the_panel_is_no_peak():
    geometry = radial_geometry(panel(), polarization_fraction=0.0, bin_width_px=2.0)
    falling = 1000.0 / (1.0 + geometry.bin_radius_px)
    # A monotonic profile has its maximum on the window's edge: not a ring.
    assert math.isnan(ring_peak(falling, geometry.bin_two_theta_rad, WAVELENGTH_A, (0.5, 1.5)).q_inv_a)
    # The panel reaches about 2.8 1/A at its corners; a window beyond it holds no bins.
    assert math.isnan(ring_peak(falling, geometry.bin_two_theta_rad, WAVELENGTH_A, (5.0, 6.0)).q_inv_a)


def test_background_model_is_in_photons_per_pixel_at_normal_incidence():
    from xfel_spread.sim import background as bg
    from xfel_spread.sim.forward import Beam
    import torch

    detector = panel()
    geometry = radial_geometry(detector, polarization_fraction=1.0, bin_width_px=2.0)
    energies, photons = np.array([7100.0, 7120.0]), np.array([4e11, 6e11])
    materials = [bg.water(0.01)]
    beam = Beam(torch.tensor(energies), torch.tensor(photons), 3e-6, 1.0)
    image = bg.background_photons(detector, beam, materials).numpy()
    corrected, _ = radial_mean(image / geometry.relative_factor.reshape(geometry.shape), np.ones(image.shape, bool),
                               geometry)
    model = background_model_profile(geometry.bin_two_theta_rad, energies, photons, materials, 3e-6,
                                     geometry.normal_pixel_factor)
    comparison = compare_profiles(corrected, model)
    assert comparison.scale == pytest.approx(1.0, abs=0.003)
    assert comparison.correlation > 0.9999
    assert comparison.relative_rms_residual < 0.005


def test_mean_wavelength_is_hc_over_the_photon_weighted_energy():
    assert mean_wavelength_a([7000.0, 8000.0], [1.0, 3.0]) == pytest.approx(12398.419843320026 / 7750.0)


@pytest.mark.parametrize("call, message", [
    (lambda g: radial_mean(np.zeros((3, 3)), np.ones((3, 3), bool), g), "does not match the panel's (240, 240)"),
    (lambda g: ring_peak(np.zeros(g.n_bins), g.bin_two_theta_rad, WAVELENGTH_A, (2.5, 1.5)), "must be 0 <= low < high"),
    (lambda g: radial_geometry(panel(), 0.0, bin_width_px=0), "bin width must be positive"),
    (lambda g: compare_profiles(np.full(4, np.nan), np.ones(4)), "only 0 bins"),
    (lambda g: mean_wavelength_a([7000.0], [0.0]), "spectrum has no photons"),
], ids=["shape", "window", "bin width", "no overlap", "empty spectrum"])
def test_bad_input_is_one_line(call, message):
    geometry = radial_geometry(panel(), polarization_fraction=0.0, bin_width_px=2.0)
    with pytest.raises(RadialInputError) as error:
        call(geometry)
    assert message in str(error.value) and "\n" not in str(error.value)
