"""The pixel-subset simulation (sim.subset) against the full simulator on the tiny panel.

The tiny config (tests/tiny_config.py: full LY99 physics, 256 x 256 pixels of 0.6 mm, PSF radius 3)
reaches about 2.7 A in its corners, so the shell here is 3.0-4.5 A with 6-pixel shoeboxes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim_fixtures import ly99_amplitudes
from tiny_config import tiny_config
from xfel_spread.config import load_config
from xfel_spread.sim import detector_effects as effects
from xfel_spread.sim.shard import draw_crystal, expected_photons, setup_from_config, shot_spectrum
from xfel_spread.sim.structure_factors import save_channel_amplitudes
from xfel_spread.sim.subset import SubsetSettings, SubsetSimulator

SHOTS = (0, 1, 2)


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "amplitudes.h5"
    save_channel_amplitudes(ly99_amplitudes(), path)
    setup = setup_from_config(load_config(tiny_config()), str(path))
    return SubsetSimulator(setup, SubsetSettings(d_min_a=3.0, d_max_a=4.5, shoebox_size_px=6, psf=True))


def full_expected(setup, shot):
    return expected_photons(setup, draw_crystal(setup, shot), shot_spectrum(setup, shot))


def test_expected_photons_equal_the_full_simulators_on_the_shoeboxes(simulator):
    setup = simulator.setup
    n_boxes = 0
    for shot in SHOTS:
        full = full_expected(setup, shot)
        spread = effects.apply_fiber_psf(full, setup.psf_fwhm_px, setup.psf_radius_px)
        exact_tail = simulator.simulate(shot, panel_total=float(full.sum()))
        estimated_tail = simulator.simulate(shot)
        pixels = (exact_tail.pixel_slow, exact_tail.pixel_fast)
        n_boxes += exact_tail.n_rois
        assert exact_tail.n_rois >= 3
        # Bragg + background, no point spread: the same kernel on the same pixels.
        np.testing.assert_allclose(exact_tail.expected["nopsf"], full[pixels].numpy(), rtol=1e-12, atol=0)
        # Spread: the grown boxes hold every pixel the kernel reaches (FFT against direct sums: rounding).
        np.testing.assert_allclose(exact_tail.expected["psf"], spread[pixels].numpy(), rtol=1e-10, atol=0)
        # The tail from the expected total (background of the whole panel, Bragg of the evaluated pixels).
        np.testing.assert_allclose(estimated_tail.expected["psf"], spread[pixels].numpy(), rtol=1e-3, atol=0)
        # Bragg light really is in the boxes: the brightest pixel of each box is well above its background.
        bragg = exact_tail.expected["nopsf"] - simulator.background.photons(
            simulator.beam(exact_tail.photons), torch.as_tensor(exact_tail.pixel_fast),
            torch.as_tensor(exact_tail.pixel_slow)).numpy()
        peak = np.zeros(exact_tail.n_rois)
        np.maximum.at(peak, exact_tail.pixel_roi, bragg)
        assert np.median(peak) > 1.0
    assert n_boxes >= 12


def test_predicted_centroids_sit_on_the_spots(simulator):
    """The predicted centroid is within a pixel of the Bragg photons' centroid of its box."""
    distances = []
    for shot in SHOTS:
        sub = simulator.simulate(shot)
        beam = simulator.beam(sub.photons)
        fast, slow = torch.as_tensor(sub.pixel_fast), torch.as_tensor(sub.pixel_slow)
        bragg = sub.expected["nopsf"] - simulator.background.photons(beam, fast, slow).numpy()
        for roi in range(sub.n_rois):
            mine = (sub.pixel_roi == roi) & sub.trusted
            weight = bragg[mine]
            if weight.sum() < 10:
                continue
            centre = np.array([np.average(sub.pixel_fast[mine] + 0.5, weights=weight),
                               np.average(sub.pixel_slow[mine] + 0.5, weights=weight)])
            distances.append(np.linalg.norm(centre - sub.centroid_px[roi]))
    assert len(distances) >= 8
    assert np.median(distances) < 0.5, distances


def test_bragg_terms_are_spreads_coefficients(simulator):
    """The terms sum to the Bragg photons with the true |F|^2, and summed per asymmetric-unit column
    they are SPREAD's coefficients (spread.coefficients, the dense evaluation) at the true geometry."""
    from xfel_spread.spread.coefficients import asu_lookup, bragg_coefficients

    setup = simulator.setup
    table = ly99_amplitudes()
    lookup = asu_lookup(table.unit_cell, table.space_group, np.asarray(table.indices))
    sub = simulator.simulate(SHOTS[1])
    beam = simulator.beam(sub.photons)
    fast, slow = torch.as_tensor(sub.pixel_fast), torch.as_tensor(sub.pixel_slow)
    bragg = sub.expected["nopsf"] - simulator.background.photons(beam, fast, slow).numpy()
    flat, _ = setup.amplitudes.cell_index(torch.as_tensor(sub.terms.hkl))
    f_sq = setup.amplitudes.intensity[torch.as_tensor(sub.terms.channel), flat].numpy()
    from_terms = sub.scale * np.bincount(sub.terms.pixel, weights=sub.terms.value * f_sq, minlength=len(bragg))
    # The terms leave out lattice transforms below 1e-12 of their peak (term_floor); the photons do not.
    np.testing.assert_allclose(from_terms, bragg, rtol=1e-10, atol=1e-10 * bragg.max())

    dense = bragg_coefficients(setup.true_detector, beam, simulator.crystal(sub.truth), fast, slow, lookup)
    columns = lookup.columns(sub.terms.hkl)
    keys = np.stack([sub.terms.pixel, sub.terms.channel, columns], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    summed = np.bincount(inverse.reshape(-1), weights=sub.terms.value)
    dense_keys = np.stack([dense.pixel, dense.channel, dense.column], axis=1)
    big = summed > 1e-9 * summed.max()
    dense_big = dense.value > 1e-9 * dense.value.max()
    assert np.array_equal(unique[big], dense_keys[dense_big])
    # The sparse kernel writes arg as a quadratic in u, the dense one evaluates it directly: they agree
    # to rounding relative to the largest term, as bragg_photons_sparse and _dense do (test_forward_model).
    assert np.max(np.abs(summed[big] - dense.value[dense_big])) < 1e-9 * dense.value.max()


def test_noise_follows_the_detector_model(simulator):
    """nopsf pixels: (ADU - offset) / gain has mean mu * calibration and variance mu * cal^2 + readout^2
    (+ 1/12 from rounding to whole ADU); drawn by the full simulator's own functions."""
    setup = simulator.setup
    z = []
    for shot in range(6):
        sub = simulator.simulate(shot)
        cal = setup.calibration[torch.as_tensor(sub.pixel_slow), torch.as_tensor(sub.pixel_fast)].numpy()
        mu = sub.expected["nopsf"]
        gain = setup.readout.gain_adu_per_photon
        variance = mu * cal ** 2 + (setup.readout.readout_noise_adu / gain) ** 2 + 1.0 / 12 / gain ** 2
        z.append((sub.data_photons["nopsf"] - mu * cal) / np.sqrt(variance))
        # The psf dataset's photons scatter about its expected image too (less than Poisson: spread).
        assert abs(np.mean(sub.data_photons["psf"] - sub.expected["psf"] * 1.0)) < 5 * np.sqrt(mu.mean() / mu.size) + 1
    z = np.concatenate(z)
    assert z.size > 500
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert abs(z.std() - 1) < 0.06
