"""Amorphous background (sim.background) and detector effects (sim.detector_effects)."""

import math

import numpy as np
import pytest
import torch
from sim_fixtures import DISTANCE_MM, LY99_ENERGIES_EV, all_pixels, make_beam

from xfel_spread.sim import background as bg
from xfel_spread.sim.detector_effects import (
    FIBER_G_PER_FWHM,
    ReadoutModel,
    apply_fiber_psf,
    calibration_pattern,
    draw_noise,
    fiber_psf_kernel,
    to_adu,
)
from xfel_spread.sim.forward import pixel_factors
from xfel_spread.sim.geometry import Detector
from xfel_spread.sim.spectrum import SaseModel, sase_spectrum
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM

AVOGADRO = 6.02214076e23
R_E_SQUARED = 7.94079248018965e-30  # nanoBragg's r_e^2 (m^2)
PIXEL_MM = 0.088
#: A strip of LY99 pixels running out from the beam: 1200 x 16 pixels reach 2theta ~ 35 degrees.
STRIP = Detector(1200, 16, PIXEL_MM, DISTANCE_MM, (5.0, 8 * PIXEL_MM), thickness_mm=0.032, attenuation_length_mm=0.017)


@pytest.fixture(scope="module")
def sase_beam():
    photons = sase_spectrum(SaseModel(), LY99_ENERGIES_EV, np.random.default_rng(11))
    return make_beam(LY99_ENERGIES_EV, photons)


def per_pixel_geometry(detector):
    fast, slow = all_pixels(detector)
    directions, factor = pixel_factors(detector, fast, slow, 1.0)
    two_theta = torch.arccos(-directions[:, 2]).numpy()
    return two_theta.reshape(detector.n_slow, detector.n_fast), factor.numpy().reshape(detector.n_slow, detector.n_fast)


def test_background_follows_its_radial_profile(sase_beam):
    materials = [bg.water(0.1), bg.air(10.0)]
    image = bg.background_photons(STRIP, sase_beam, materials).numpy()
    assert image.shape == (16, 1200)
    two_theta, factor = per_pixel_geometry(STRIP)
    profile = bg.background_profile(sase_beam, materials, two_theta.reshape(-1)).reshape(two_theta.shape)
    # Divided by polarization x solid angle x capture, every pixel is the 2theta profile
    # (measured to 5e-7: linear interpolation on a 4096-point grid).
    assert np.abs(image / factor / profile - 1).max() < 1e-4
    assert image.min() > 10.0  # photons per pixel at the LY99 flux: a real background

    # No materials, no background.
    assert not bg.background_photons(STRIP, sase_beam, []).any()


def test_water_ring_lands_where_bragg_puts_stol_0162(sase_beam):
    image = bg.background_photons(STRIP, sase_beam, [bg.water(0.1)]).numpy()
    _, factor = per_pixel_geometry(STRIP)
    row = (image / factor)[8]   # the row through the beam centre
    peak_px = np.argmax(row) + 0.5 - STRIP.beam_center_mm[0] / PIXEL_MM
    photons = sase_beam.photons.numpy()
    mean_wavelength = float(photons @ (HC_EV_ANGSTROM / LY99_ENERGIES_EV) / photons.sum())
    expected_px = DISTANCE_MM * math.tan(2 * math.asin(0.162 * mean_wavelength)) / PIXEL_MM
    # Measured: 1036.68 px against 1036.64 px (2theta 32.8 degrees).
    assert peak_px == pytest.approx(expected_px, abs=1.5)
    assert row.max() > 1.5 * row[0]   # a ring, not a plateau


def test_background_absolute_level():
    # One channel, so stol is exact: F_water(0) = 2.57, F_water(0.162) = 8.0, F_air(0) = 14.1.
    energy = 7120.0
    beam = make_beam([energy], [1e12])
    fluence = 1e12 / (3e-6) ** 2
    water, air = bg.water(0.1), bg.air(10.0)
    n_water = 0.1e-3 * (3e-6) ** 2 * 1e6 * 1.0 / 18.015 * AVOGADRO
    n_air = 10e-3 * (3e-6) ** 2 * 1e6 * 1.2e-3 / 28.96 * AVOGADRO
    assert water.molecules_in_beam(3e-6) == pytest.approx(3.0e13, rel=0.01)
    assert water.molecules_in_beam(3e-6) == pytest.approx(n_water, rel=1e-12)
    ring = 2 * math.asin(0.162 * HC_EV_ANGSTROM / energy)
    levels = bg.background_profile(beam, [water], np.array([0.0, ring]))
    assert levels == pytest.approx(R_E_SQUARED * n_water * fluence * np.array([2.57, 8.0]) ** 2, rel=1e-12)
    both = bg.background_profile(beam, [water, air], np.array([0.0]))
    assert both[0] == pytest.approx(R_E_SQUARED * fluence * (n_water * 2.57 ** 2 + n_air * 14.1 ** 2), rel=1e-12)


# ---- Fiber point-spread function -----------------------------------------------------------------

PSF_FWHM_PX = 0.08 / 0.088
PSF_RADIUS = 10


def test_fiber_psf_conserves_photons_and_is_symmetric():
    image = torch.zeros(64, 64, dtype=torch.float64)
    image[32, 32] = 1e6
    spread = apply_fiber_psf(image, PSF_FWHM_PX, PSF_RADIUS)
    assert float(spread.sum()) == pytest.approx(1e6, rel=1e-9)
    window = spread[32 - PSF_RADIUS:33 + PSF_RADIUS, 32 - PSF_RADIUS:33 + PSF_RADIUS]
    assert torch.allclose(window, window.flip(0), rtol=1e-9, atol=1e-9)
    assert torch.allclose(window, window.flip(1), rtol=1e-9, atol=1e-9)
    assert torch.allclose(window, window.T, rtol=1e-9, atol=1e-9)
    kernel = fiber_psf_kernel(PSF_FWHM_PX, PSF_RADIUS)
    for mirrored in (kernel.flip(0), kernel.flip(1), kernel.T):
        assert torch.allclose(kernel, mirrored, rtol=0, atol=1e-15)
    # The centre keeps the largest share (measured 0.2728), its neighbours 0.068 each.
    assert int(torch.argmax(spread)) == 32 * 64 + 32
    assert 0.2 < float(spread[32, 32]) / 1e6 < 0.35
    assert float(spread[32, 33]) < 0.3 * float(spread[32, 32])

    # Half-maximum crossing of the pixel-integrated profile: measured 1.33 px, the 0.91-px FWHM
    # of the PSF broadened by the pixel width.
    row = spread[32].numpy()
    half = row[32] / 2
    right = 32 + int(np.argmax(row[32:] < half))
    crossing = right - 1 + (row[right - 1] - half) / (row[right - 1] - row[right])
    assert 1.1 < 2 * (crossing - 32) < 1.6


def test_fiber_psf_shape_fwhm_and_tail():
    # Sampled finely (kernel pixels 1/20 of a detector pixel), the profile's half maximum is at
    # FWHM / 2: 0.08 mm / 0.088 mm = 0.91 px.
    fine = fiber_psf_kernel(20 * PSF_FWHM_PX, 60).numpy()[60]
    half = fine[60] / 2
    right = 60 + int(np.argmax(fine[60:] < half))
    crossing = right - 1 + (fine[right - 1] - half) / (fine[right - 1] - fine[right])
    assert 2 * (crossing - 60) / 20 == pytest.approx(PSF_FWHM_PX, rel=0.03)

    # The kernel integrates g / (2 pi (g^2 + r^2)^(3/2)) over each pixel: compare with a
    # 40 x 40 midpoint sum at a few pixels.
    g = PSF_FWHM_PX * FIBER_G_PER_FWHM
    kernel = fiber_psf_kernel(PSF_FWHM_PX, PSF_RADIUS).numpy()
    sub = (np.arange(40) + 0.5) / 40 - 0.5
    for dy, dx in ((0, 0), (0, 1), (1, 1), (2, 3), (0, 7)):
        y, x = np.meshgrid(dy + sub, dx + sub, indexing="ij")
        expected = np.mean(g / (2 * np.pi * (g * g + x * x + y * y) ** 1.5))
        assert kernel[PSF_RADIUS + dy, PSF_RADIUS + dx] == pytest.approx(expected, rel=2e-3)

    # What falls outside the radius is the fiber's long tail, g / sqrt(g^2 + R^2) (measured
    # 0.0590 against 0.0592 at R = 10).
    lost = 1 - float(kernel.sum())
    assert 0 < lost < 0.1
    assert lost == pytest.approx(g / math.sqrt(g * g + PSF_RADIUS ** 2), rel=0.02)
    lost_far = 1 - float(fiber_psf_kernel(PSF_FWHM_PX, 50).sum())
    assert lost_far == pytest.approx(g / math.sqrt(g * g + 50 ** 2), rel=0.02)


# ---- Noise, calibration and ADC -----------------------------------------------------------------


def test_draw_noise_is_reproducible_and_poisson():
    expected = torch.full((256, 256), 100.0, dtype=torch.float64)
    flat = torch.ones_like(expected)
    readout = ReadoutModel(readout_noise_adu=2.0)
    first, again, other = (draw_noise(expected, flat, readout, seed) for seed in (5, 5, 6))
    assert torch.equal(first.photons, again.photons) and torch.equal(first.readout_adu, again.readout_adu)
    assert not torch.equal(first.photons, other.photons)
    assert not torch.equal(first.readout_adu, other.readout_adu)

    counts = first.photons
    assert torch.equal(counts, torch.round(counts))            # whole photons
    # Poisson: mean = variance = 100 (sampling error 0.04 % and 0.6 % over 65,536 pixels).
    assert float(counts.mean()) == pytest.approx(100.0, rel=0.03)
    assert float(counts.var()) == pytest.approx(100.0, rel=0.03)
    assert float(first.readout_adu.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(first.readout_adu.std()) == pytest.approx(2.0, rel=0.03)
    # Negative expectations (never produced, but clamped) give no photons.
    assert not draw_noise(-expected, flat, readout, 5).photons.any()


def test_calibration_pattern_multiplies_counts():
    pattern = calibration_pattern((256, 256), 0.01, seed=42)
    assert torch.equal(pattern, calibration_pattern((256, 256), 0.01, seed=42))
    assert not torch.equal(pattern, calibration_pattern((256, 256), 0.01, seed=43))
    assert float(pattern.mean()) == pytest.approx(1.0, abs=2e-4)
    assert float(pattern.std()) == pytest.approx(0.01, rel=0.03)

    expected = torch.full((256, 256), 50.0, dtype=torch.float64)
    noisy = draw_noise(expected, pattern, ReadoutModel(), seed=1)
    plain = draw_noise(expected, torch.ones_like(pattern), ReadoutModel(), seed=1)
    assert torch.allclose(noisy.photons, plain.photons * pattern, rtol=1e-15, atol=0)


def test_to_adu():
    photons = torch.tensor([[0.0, 1.4], [2.6, 1000.2]], dtype=torch.float64)
    readout = torch.tensor([[0.3, -0.3], [0.0, -1.0]], dtype=torch.float64)
    adu = to_adu(photons, readout, ReadoutModel(gain_adu_per_photon=1.0, adc_offset_adu=10.0))
    assert adu.dtype == torch.int32
    assert adu.tolist() == [[10, 11], [13, 1009]]
    doubled = to_adu(photons, torch.zeros_like(photons), ReadoutModel(gain_adu_per_photon=2.0, adc_offset_adu=10.0))
    assert doubled.tolist() == [[10, 13], [15, 2010]]

    # Never clipped: the largest int32 still fits, one more ADU does not.
    limit = float(2 ** 31 - 1)
    fits = to_adu(torch.tensor([[limit - 10.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                  ReadoutModel())
    assert int(fits[0, 0]) == 2 ** 31 - 1
    for value in (limit - 9.0, -limit - 20.0):
        with pytest.raises(OverflowError, match="int32"):
            to_adu(torch.tensor([[value]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), ReadoutModel())
