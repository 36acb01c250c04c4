"""The torch forward model (sim.forward, sim.geometry): sparse against dense, the physics it encodes,
its gradients, and spot positions against DIALS predictions from the true model."""

import dataclasses
import functools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from sim_fixtures import (
    DISTANCE_MM,
    DOMAINS_PER_CRYSTAL,
    LY99_ENERGIES_EV,
    all_pixels,
    channel_subset,
    crystal_state,
    lookup_for,
    make_beam,
    random_orientation,
    spot_centroids,
)

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import (
    ARG_CUTOFF,
    BEAM_DIRECTION,
    CACHE_ARG_CUTOFF,
    AmplitudeLookup,
    CrystalState,
    SparseTermCache,
    arg_quadratic,
    bragg_photons_dense,
    bragg_photons_mosaic_pixels,
    bragg_photons_pixels,
    bragg_photons_sparse,
    channel_runs,
    domain_pixel_terms,
    pixel_factors,
)
from xfel_spread.sim.geometry import Detector, capture_fraction, polarization_factor, solid_angle_sr
from xfel_spread.sim.shard import cells_per_domain_edge
from xfel_spread.sim.spectrum import SaseModel, sase_spectrum
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, AmplitudeGrid, expand_to_p1_grid

#: A coarse 100 x 100 panel of 1.5 mm pixels at the LY99 distance: the pattern out to ~2.8 A.
SMALL_DETECTOR = Detector(100, 100, 1.5, DISTANCE_MM, (75.3, 74.6), thickness_mm=0.032, attenuation_length_mm=0.017)
#: Ten channels spread over the 100-eV band, both sides of the Fe K edge.
TEN_CHANNELS = np.arange(0, 100, 11)
#: nanoBragg's r_e^2 (m^2), typed in here independently; CODATA 2018 (2.8179403262e-15 m)^2 is 6e-7 lower.
R_E_SQUARED = 7.94079248018965e-30


@pytest.fixture(scope="module")
def ten_channel_lookup(amplitude_table):
    return lookup_for(amplitude_table, TEN_CHANNELS)


def ten_channel_beam(seed=1):
    photons = np.random.default_rng(seed).exponential(1.0, TEN_CHANNELS.size)
    return make_beam(LY99_ENERGIES_EV[TEN_CHANNELS], photons * 1e12 / photons.sum())


def dense_image(detector, beam, crystal, lookup):
    fast, slow = all_pixels(detector)
    return bragg_photons_dense(detector, beam, crystal, lookup, fast, slow).reshape(detector.n_slow, detector.n_fast)


def independent_photons(detector, beam, crystal, grid, fast, slow):
    """The nanoBragg expression of the forward module's docstring, written out in numpy per pixel."""
    energies, photons = beam.energies_ev.numpy(), beam.photons.numpy()
    matrices, ncells = crystal.domain_matrices.numpy(), crystal.ncells.numpy()
    beam_x, beam_y = detector.beam_center_mm
    values = []
    for x, y in zip(fast, slow):
        position = np.array([-beam_x + (x + 0.5) * detector.pixel_size_mm,
                             beam_y - (y + 0.5) * detector.pixel_size_mm, -detector.distance_mm])
        radius = np.linalg.norm(position)
        direction = position / radius
        two_theta_cos = -direction[2]
        polar = 1 - direction[0] ** 2                     # E along lab x, fully polarized
        omega = detector.pixel_size_mm ** 2 * two_theta_cos / radius ** 2
        capture = 1 - np.exp(-detector.thickness_mm / (detector.attenuation_length_mm * two_theta_cos))
        total = 0.0
        for k, energy in enumerate(energies):
            for matrix in matrices:
                h = energy / HC_EV_ANGSTROM * matrix @ (direction - np.array([0.0, 0.0, -1.0]))
                h0 = np.floor(h + 0.5)
                arg = np.sum((ncells * (h - h0)) ** 2) / 0.63
                if arg >= 35:
                    continue
                offset = (h0 - grid.hkl_min).astype(int)
                inside = np.all(offset >= 0) and np.all(offset < grid.values.shape[1:])
                f = float(grid.values[(k, *offset)]) if inside else 0.0
                total += photons[k] * f ** 2 * np.prod(ncells) ** 2 * np.exp(-2 * arg)
        values.append(float(crystal.scale) * R_E_SQUARED / len(matrices) / beam.size_m ** 2
                      * polar * omega * capture * total)
    return np.array(values)


@pytest.mark.parametrize("ncells", [10.0, 5.0])  # N = 5 < 9.4 takes the rounding-check path
def test_sparse_equals_dense(amplitude_table, ten_channel_lookup, ncells):
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, ncells, n_domains=5, spread_deg=0.5, seed=4)
    beam = ten_channel_beam()
    sparse = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, ten_channel_lookup)
    dense = dense_image(SMALL_DETECTOR, beam, crystal, ten_channel_lookup)
    assert sparse.shape == (100, 100)
    # Measured: max |sparse - dense| / max(dense) 1.6e-12 (N=10), 3e-13 (N=5); 128 / 423 pixels
    # above 1e-3 of the peak (2755 / 131 photons).
    assert float((sparse - dense).abs().max() / dense.max()) < 1e-9
    assert int((dense > 1e-3 * dense.max()).sum()) > 100
    assert float(dense.max()) > 10.0  # photons: LY99 flux gives bright spots

    # Both agree with the documented expression evaluated independently, at the brightest pixels
    # (measured to 3e-14).
    order = torch.argsort(dense.reshape(-1), descending=True)[:8].numpy()
    slow, fast = np.divmod(order, SMALL_DETECTOR.n_fast)
    grid = expand_to_p1_grid(channel_subset(amplitude_table, TEN_CHANNELS))
    expected = independent_photons(SMALL_DETECTOR, beam, crystal, grid, fast, slow)
    assert np.allclose(dense.reshape(-1)[order].numpy(), expected, rtol=1e-8, atol=0)


def photons_and_gradients(model, beam, crystal, lookup):
    """A model's photons on every SMALL_DETECTOR pixel and the gradients of a weighted sum of them
    with respect to the domain matrices, N and the scale."""
    leaves = [crystal.domain_matrices.clone().requires_grad_(True), crystal.ncells.clone().requires_grad_(True),
              crystal.scale.clone().requires_grad_(True)]
    fast, slow = all_pixels(SMALL_DETECTOR)
    photons = model(SMALL_DETECTOR, beam, CrystalState(*leaves), lookup, fast, slow)
    weights = torch.linspace(0.5, 1.5, photons.numel(), dtype=photons.dtype)
    gradients = torch.autograd.grad((photons * weights).sum(), leaves)
    return photons.detach(), gradients


@pytest.mark.parametrize(("ncells", "n_domains"), [(10.0, 5), (40.0, 5), (20.0, 1)])
def test_pixel_sparse_equals_dense_with_gradients(amplitude_table, ten_channel_lookup, ncells, n_domains,
                                                  pair_channel_loop):
    """bragg_photons_pixels (stage 1's model of sharp domains: its free domains, and the one domain of
    its default refinement) visits only the terms below the cut-off and takes its gradient per (pixel,
    domain, index) pair: photons and gradients equal the dense reference's to rounding, on every pixel
    of a panel, with the per-term loop compiled and in eager torch."""
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, ncells, n_domains=n_domains, spread_deg=0.5, seed=4)
    beam = ten_channel_beam()
    dense, dense_gradients = photons_and_gradients(bragg_photons_dense, beam, crystal, ten_channel_lookup)
    sparse, sparse_gradients = photons_and_gradients(bragg_photons_pixels, beam, crystal, ten_channel_lookup)
    assert int((dense > 1e-3 * dense.max()).sum()) > 10  # spots on the panel, not an empty comparison
    # Measured: photons to 5e-15 (N=10), 7e-14 (N=40) and 3e-14 (one domain, N=20) of the peak,
    # gradients to 8e-14 of their largest.
    assert float((sparse - dense).abs().max() / dense.max()) < 1e-9
    for name, got, expected in zip(("domain matrices", "N", "scale"), sparse_gradients, dense_gradients):
        assert float(expected.abs().max()) > 0, name
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-9, name


def test_pixel_sparse_takes_the_dense_path_where_it_cannot_skip(amplitude_table, ten_channel_lookup):
    """Below N = 2 sqrt(35 * 0.63) a live term's index need not be the rounded one, and an analytic
    mosaic spread has no discrete domains: there bragg_photons_pixels is the dense evaluation itself."""
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    beam = ten_channel_beam()
    fast, slow = all_pixels(SMALL_DETECTOR)
    small = crystal_state(matrix, 5.0, n_domains=5, spread_deg=0.5, seed=4)
    spread = dataclasses.replace(crystal_state(matrix, 20.0), mosaic_variance=torch.tensor(1e-6, dtype=torch.float64))
    for crystal in (small, spread):
        expected = bragg_photons_dense(SMALL_DETECTOR, beam, crystal, ten_channel_lookup, fast, slow)
        assert float(expected.max()) > 1.0
        assert torch.equal(bragg_photons_pixels(SMALL_DETECTOR, beam, crystal, ten_channel_lookup, fast, slow),
                           expected)


@pytest.mark.parametrize(("ncells", "eta_deg"), [(20.0, 0.05), (10.0, 0.05), (40.0, 1.0), (20.0, 0.0)])
def test_analytic_mosaic_pixels_equal_dense_with_gradients(amplitude_table, ten_channel_lookup, ncells, eta_deg,
                                                           pair_channel_loop):
    """bragg_photons_mosaic_pixels (stage 1's analytic eta) visits only the terms below the cut-off,
    over runs of channels of one rounded index: photons and gradients (matrix, N, scale and the
    spread's variances) equal the dense kernel's to rounding, at a spread of stage 1's size, one of a
    degree (a live term's reach wider than its rounding cell) and none; its channel runs cover each
    pixel's band once."""
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    beam = ten_channel_beam()
    fast, slow = all_pixels(SMALL_DETECTOR)
    # Two nodes, as stage 1's Gaussian draw (mosaic_nodes): variances (eta f_j)^2 / 3.
    variance = (np.radians(eta_deg) * np.array([0.5, 1.3])) ** 2 / 3
    crystal = dataclasses.replace(crystal_state(matrix, ncells), mosaic_variance=torch.as_tensor(variance))

    def photons_and_gradients_of(model):
        leaves = [crystal.domain_matrices.clone().requires_grad_(True), crystal.ncells.clone().requires_grad_(True),
                  crystal.scale.clone().requires_grad_(True), crystal.mosaic_variance.clone().requires_grad_(True)]
        photons = model(SMALL_DETECTOR, beam, CrystalState(*leaves), ten_channel_lookup, fast, slow)
        weights = torch.linspace(0.5, 1.5, photons.numel(), dtype=photons.dtype)
        return photons.detach(), torch.autograd.grad((photons * weights).sum(), leaves)

    dense, dense_gradients = photons_and_gradients_of(bragg_photons_dense)
    sparse, sparse_gradients = photons_and_gradients_of(bragg_photons_mosaic_pixels)
    # Spots on the panel, not an empty comparison: measured 36-1141 pixels above 1e-6 of the peak.
    assert int((dense > 1e-6 * dense.max()).sum()) > 30
    # Measured: photons to 7e-15 - 1.2e-13 of the peak, gradients to 2e-13 of their largest.
    assert float((sparse - dense).abs().max() / dense.max()) < 1e-9
    names = ("domain matrices", "N", "scale", "mosaic variance")
    for name, got, expected in zip(names, sparse_gradients, dense_gradients):
        assert float(expected.abs().max()) > 0, name
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-9, name
    # The runs split each pixel's band by its rounded index, every channel in exactly one run.
    directions, _ = pixel_factors(SMALL_DETECTOR, fast, slow, 1.0)
    g = (directions - torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype)) @ crystal.domain_matrices[0].T
    pixel, _, k_start, k_end = channel_runs(g, beam.inverse_wavelengths)
    assert int((k_end - k_start).sum()) == fast.numel() * TEN_CHANNELS.size
    assert torch.all(pixel[1:] >= pixel[:-1]) and torch.all(k_end > k_start)


def scaled_lookup(lookup_grid: AmplitudeGrid, factor=1.0, zero_hkl=None) -> AmplitudeLookup:
    values = lookup_grid.values * np.float32(factor)
    if zero_hkl is not None:
        values[(slice(None), *(np.asarray(zero_hkl) - lookup_grid.hkl_min))] = 0.0
    return AmplitudeLookup(AmplitudeGrid(values, lookup_grid.hkl_min), "cpu")


def test_intensity_scales_as_amplitude_squared(amplitude_table):
    grid = expand_to_p1_grid(channel_subset(amplitude_table, TEN_CHANNELS))
    lookup = AmplitudeLookup(grid, "cpu")
    hkl = lookup.nonzero_indices()
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, 10.0, n_domains=3, spread_deg=0.5, seed=4)
    beam = ten_channel_beam()
    image = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, lookup, hkl)
    assert float(image.max()) > 10.0
    doubled = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, scaled_lookup(grid, 2.0), hkl)
    assert torch.equal(doubled, 4 * image)

    # The reflection that lights the brightest pixel, from the domain-0 fractional index there.
    brightest = int(torch.argmax(image))
    slow, fast = divmod(brightest, SMALL_DETECTOR.n_fast)
    direction, _ = pixel_factors(SMALL_DETECTOR, torch.tensor([fast]), torch.tensor([slow]), 1.0)
    mean_u = float((beam.photons * beam.inverse_wavelengths).sum() / beam.photons.sum())
    fractional = mean_u * crystal.domain_matrices[0].numpy() @ (direction[0].numpy() - np.array([0, 0, -1.0]))
    reflection = np.rint(fractional).astype(int)

    spot = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, lookup, torch.as_tensor(reflection[None]))
    without = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, scaled_lookup(grid, 1.0, reflection), hkl)
    assert float(spot[slow, fast]) > 0.9 * float(image[slow, fast])   # the spot is this reflection's
    assert float(without[slow, fast]) < 0.1 * float(image[slow, fast])
    # Removing the reflection removes exactly its light and nothing else.
    assert torch.allclose(without + spot, image, rtol=1e-12, atol=1e-12 * float(image.max()))
    untouched = spot == 0
    assert torch.equal(without[untouched], image[untouched])
    assert int((image[untouched] > 1.0).sum()) > 10  # other spots remain
    lit_slow, lit_fast = torch.nonzero(spot > 1e-6 * spot.max(), as_tuple=True)
    assert int(torch.max(torch.abs(lit_slow - slow))) <= 4 and int(torch.max(torch.abs(lit_fast - fast))) <= 4


def test_image_is_linear_in_channel_photons(amplitude_table, ten_channel_lookup):
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, 10.0, n_domains=3, spread_deg=0.5, seed=4)
    energies = LY99_ENERGIES_EV[TEN_CHANNELS]
    first = np.r_[np.full(5, 1e11), np.zeros(5)]
    second = np.r_[np.zeros(3), np.full(7, 2e11)]
    image_1 = bragg_photons_sparse(SMALL_DETECTOR, make_beam(energies, first), crystal, ten_channel_lookup)
    image_2 = bragg_photons_sparse(SMALL_DETECTOR, make_beam(energies, second), crystal, ten_channel_lookup)
    both = bragg_photons_sparse(SMALL_DETECTOR, make_beam(energies, first + second), crystal, ten_channel_lookup)
    assert torch.allclose(both, image_1 + image_2, rtol=1e-12, atol=1e-12 * float(both.max()))
    # Different channels light different pixels: the two parts are not proportional.
    assert float(image_1.max()) > 1.0 and float(image_2.max()) > 1.0
    ratio = image_2[both > 1e-3 * both.max()] / image_1[both > 1e-3 * both.max()]
    assert float(ratio.max()) > 10 * float(ratio.min())


def closest_point_position_px(detector, matrix, hkl, inverse_wavelength):
    """Where the ray to the point of the Ewald sphere closest to the reciprocal-lattice point meets the panel."""
    q = np.linalg.solve(matrix, np.asarray(hkl, dtype=np.float64))
    ray = torch.as_tensor((q - np.array([0.0, 0.0, inverse_wavelength]))[None])
    fast, slow, _ = detector.project_directions_px(ray)
    return np.array([float(fast[0]), float(slow[0])])


def test_spots_move_outward_with_longer_wavelength(amplitude_table):
    from scipy import ndimage

    detector = Detector(200, 200, 0.75, DISTANCE_MM, (75.0, 75.0))
    channels = [0, 99]  # 7070.5 eV (1.7535 A) and 7169.5 eV (1.7293 A)
    lookup = lookup_for(amplitude_table, channels)
    energies = LY99_ENERGIES_EV[channels]
    matrix = random_orientation(amplitude_table.unit_cell, seed=7)
    crystal = crystal_state(matrix, 5.0)  # one domain, small N: each spot is excited at both energies
    long_beam, short_beam = make_beam(energies, [1e12, 0.0]), make_beam(energies, [0.0, 1e12])
    long_image = bragg_photons_sparse(detector, long_beam, crystal, lookup).numpy()

    # Candidate reflections: the nearest integer index at each lit pixel.
    slow, fast = np.nonzero(long_image > 0.01 * long_image.max())
    directions, _ = pixel_factors(detector, torch.as_tensor(fast), torch.as_tensor(slow), 1.0)
    u_long = energies[0] / HC_EV_ANGSTROM
    indices = np.rint(u_long * (directions.numpy() - [0, 0, -1.0]) @ matrix.T).astype(int)
    candidates, which = np.unique(indices, axis=0, return_inverse=True)
    assert len(candidates) > 40
    # The 40 reflections with the brightest pixels.
    peak = np.zeros(len(candidates))
    np.maximum.at(peak, which.reshape(-1), long_image[slow, fast])
    candidates = candidates[np.argsort(peak)[::-1][:40]]

    centre_px = np.asarray(detector.beam_center_mm) / detector.pixel_size_mm
    measured = []
    for hkl in candidates:
        single = torch.as_tensor(hkl[None])
        spots = [bragg_photons_sparse(detector, beam, crystal, lookup, single).numpy() for beam in (long_beam, short_beam)]
        edges = [np.r_[s[0], s[-1], s[:, 0], s[:, -1]].max() for s in spots]
        if min(s.sum() for s in spots) < 0.05 or max(e / s.max() for e, s in zip(edges, spots)) > 1e-3:
            continue  # too faint, or cut by the panel edge
        long_at, short_at = (np.asarray(ndimage.center_of_mass(s))[::-1] + 0.5 for s in spots)
        outward = (long_at + short_at) / 2 - centre_px
        outward /= np.linalg.norm(outward)
        shift = long_at - short_at
        predicted = (closest_point_position_px(detector, matrix, hkl, u_long)
                     - closest_point_position_px(detector, matrix, hkl, energies[1] / HC_EV_ANGSTROM))
        measured.append((shift @ outward, shift[0] * outward[1] - shift[1] * outward[0], predicted @ outward))
    radial, tangential, expected = np.array(measured).T
    # Measured on 40 spots: radial shifts 0.15-2.03 px, |tangential| at most 0.11 px (0.11 of the
    # radial shift), and the radial shift 0.85-1.06 times that of the point of the Ewald sphere
    # closest to the reciprocal-lattice point (correlation 0.993 across spots).
    assert len(radial) >= 20
    assert np.all(radial > 0.1)
    assert np.all(np.abs(tangential) < 0.25 * radial)
    assert np.all(np.abs(radial / expected - 1) < 0.2)
    # Bragg's law: at larger angles the same wavelength change moves spots further.
    assert np.corrcoef(radial, expected)[0, 1] > 0.97


def test_polarization_factor_analytic():
    two_theta = np.radians([0.0, 20.0, 45.0, 70.0])
    along_x = torch.as_tensor(np.stack([np.sin(two_theta), 0 * two_theta, -np.cos(two_theta)], 1))
    along_y = torch.as_tensor(np.stack([0 * two_theta, np.sin(two_theta), -np.cos(two_theta)], 1))
    cos_sq = np.cos(two_theta) ** 2
    # Fully polarized with E along lab x (dxtbx normal (0, 1, 0)): cos^2(2theta) in the xz plane, 1 in yz.
    assert np.allclose(polarization_factor(along_x, 1.0).numpy(), cos_sq, rtol=0, atol=1e-14)
    assert np.allclose(polarization_factor(along_y, 1.0).numpy(), 1.0, rtol=0, atol=1e-14)
    # Polarized along y instead: the roles swap; unpolarized: (1 + cos^2 2theta) / 2 everywhere.
    assert np.allclose(polarization_factor(along_x, 0.0).numpy(), 1.0, rtol=0, atol=1e-14)
    assert np.allclose(polarization_factor(along_y, 0.0).numpy(), cos_sq, rtol=0, atol=1e-14)
    for directions in (along_x, along_y):
        assert np.allclose(polarization_factor(directions, 0.5).numpy(), (1 + cos_sq) / 2, rtol=0, atol=1e-14)

    # On the panel (fast = +x, slow = -y): a pixel on the x axis at 2theta is weaker than the pixel
    # at the same angle on the y axis by exactly cos^2(2theta); omega and capture are the same.
    detector = Detector(801, 801, 0.2, 100.0, (80.1, 80.1), thickness_mm=0.032, attenuation_length_mm=0.017)
    centre = 400
    fast = torch.tensor([centre + 300, centre])
    slow = torch.tensor([centre, centre + 300])
    _, factor = pixel_factors(detector, fast, slow, 1.0)
    expected = math.cos(math.atan(300 * 0.2 / 100.0)) ** 2
    assert float(factor[0] / factor[1]) == pytest.approx(expected, rel=1e-12)
    assert expected < 0.75


def test_solid_angle_and_capture_analytic():
    detector = Detector(400, 400, 0.5, 100.0, (100.0, 100.0), thickness_mm=0.032, attenuation_length_mm=0.017)
    fast, slow = all_pixels(detector)
    positions = detector.pixel_centres_mm(fast, slow)
    omega = solid_angle_sr(positions, detector)
    # The whole panel: 4 atan(a b / (D sqrt(D^2 + a^2 + b^2))) for a rectangle of half-sides a, b
    # centred on the beam. Measured relative error of the pixel sum 2e-6.
    half = 100.0
    exact = 4 * math.atan(half * half / (100.0 * math.sqrt(100.0 ** 2 + 2 * half ** 2)))
    assert float(omega.sum()) == pytest.approx(exact, rel=1e-4)
    # One pixel next to the beam: area / D^2; at 45 degrees the obliquity and 1/r^2 give cos^3.
    assert float(omega.max()) == pytest.approx(0.25 / 100.0 ** 2, rel=1e-4)

    unit = torch.tensor([[0.0, 0.0, -1.0], [math.sin(math.radians(60)), 0.0, -0.5]], dtype=torch.float64)
    at_45 = detector.pixel_centres_mm(torch.tensor([399]), torch.tensor([199]))  # x = 99.75 mm
    cos_obliquity = 100.0 / float(torch.linalg.norm(at_45))
    assert float(solid_angle_sr(at_45, detector)[0]) == pytest.approx(0.25 / 100.0 ** 2 * cos_obliquity ** 3, rel=1e-12)
    # Capture: 1 - exp(-t / (mu_len cos)); the oblique ray crosses twice the sensor thickness.
    capture = capture_fraction(unit, detector).numpy()
    assert capture == pytest.approx([1 - math.exp(-0.032 / 0.017), 1 - math.exp(-2 * 0.032 / 0.017)], rel=1e-12)
    thin = Detector(4, 4, 0.5, 100.0, (1.0, 1.0), thickness_mm=0.0)
    assert np.array_equal(capture_fraction(unit, thin).numpy(), [1.0, 1.0])


def rotation_from_vector(vector):
    skew = torch.zeros(3, 3, dtype=vector.dtype)
    skew[0, 1], skew[0, 2], skew[1, 2] = -vector[2], vector[1], -vector[0]
    skew = skew - skew.T
    return torch.linalg.matrix_exp(skew)


def test_gradients_match_finite_differences(amplitude_table):
    channels = np.arange(40, 60, 2)
    lookup = lookup_for(amplitude_table, channels)
    hkl = lookup.nonzero_indices()
    detector = Detector(64, 64, 2.0, DISTANCE_MM, (64.3, 63.8))
    start = torch.as_tensor(random_orientation(amplitude_table.unit_cell, seed=3))
    rotations = torch.as_tensor(xtal.mosaic_rotations(3, 0.3, np.random.default_rng(3)))
    photons = np.random.default_rng(1).exponential(1.0, channels.size) * 1e11
    beam = make_beam(LY99_ENERGIES_EV[channels], photons)
    weights = torch.as_tensor(np.random.default_rng(5).uniform(0.5, 1.5, (64, 64)))

    def weighted_sum(rotation_vector, ncells, scale):
        matrix = (rotation_from_vector(rotation_vector) @ start.T).T
        crystal = CrystalState(torch.einsum("dij,rj->dri", rotations, matrix), ncells, scale)
        return (bragg_photons_sparse(detector, beam, crystal, lookup, hkl) * weights).sum()

    inputs = (torch.tensor([1e-4, -2e-4, 3e-4], dtype=torch.float64, requires_grad=True),
              torch.tensor([12.0, 11.0, 13.0], dtype=torch.float64, requires_grad=True),
              torch.tensor(50.0, dtype=torch.float64, requires_grad=True))
    value = float(weighted_sum(*inputs).detach())
    assert value > 100.0
    image = bragg_photons_sparse(detector, beam, CrystalState(torch.einsum("dij,rj->dri", rotations, start),
                                                               inputs[1].detach(), inputs[2].detach()), lookup, hkl)
    assert int((image > 1e-3 * image.max()).sum()) >= 10
    # Measured: autograd and central differences agree to 1e-6 relative or better.
    assert torch.autograd.gradcheck(lambda *x: weighted_sum(*x) / value, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    gradient = torch.autograd.grad(weighted_sum(*inputs), inputs)
    assert float(gradient[2]) == pytest.approx(value / 50.0, rel=1e-12)   # linear in the scale
    assert float(gradient[0].abs().max()) > 30 * value                   # spots move fast with angle


# ---- Spot positions against DIALS predictions from the true model -------------------------------

#: A 2x2-binned Rayonix-like panel: 1000 x 1000 pixels of 0.176 mm reach 2theta ~ 32 degrees.
DIALS_PIXEL_MM, DIALS_PIXELS = 0.176, 1000
DIALS_SHOTS = (1, 2, 3, 4, 5)


def dials_predictions(detector, matrix, wavelength):
    from dials.array_family import flex
    from dxtbx.model import Beam as DxtbxBeam
    from dxtbx.model import Experiment, MosaicCrystalSauter2014
    from dxtbx.model.detector import DetectorFactory

    panel = DetectorFactory.make_detector("PAD", (1, 0, 0), (0, -1, 0), tuple(detector.origin_mm),
                                          (detector.pixel_size_mm, detector.pixel_size_mm),
                                          (detector.n_fast, detector.n_slow), (0, 1e6))
    crystal = MosaicCrystalSauter2014(tuple(matrix[0]), tuple(matrix[1]), tuple(matrix[2]), "C 1 2 1")
    crystal.set_domain_size_ang(4000.0)
    crystal.set_half_mosaicity_deg(0.05)
    experiment = Experiment(beam=DxtbxBeam((0.0, 0.0, 1.0), wavelength), detector=panel, crystal=crystal)
    predictions = flex.reflection_table.from_predictions(experiment, dmin=1.7)
    x, y, _ = predictions["xyzcal.px"].parts()
    return np.stack([np.asarray(x), np.asarray(y)], axis=1)


def match(centroids, predictions, radius=3.0):
    """Residuals (centroid - prediction) of the spots with a prediction within ``radius`` px, and the
    number of predictions that have a spot within ``radius``."""
    distance = np.linalg.norm(centroids[:, None, :] - predictions[None, :, :], axis=2)
    nearest = distance.argmin(axis=1)
    matched = distance[np.arange(len(centroids)), nearest] < radius
    predictions_found = int((distance.min(axis=0) < radius).sum())
    return matched, centroids[matched] - predictions[nearest[matched]], predictions_found


@pytest.fixture(scope="module")
def simulated_shots(amplitude_table):
    """Noise-free Bragg-only LY99 shots (full SASE spectrum, 25 domains, N from 4000 A domains)."""
    lookup = AmplitudeLookup(expand_to_p1_grid(amplitude_table), "cpu")
    hkl = lookup.nonzero_indices()
    ncells = cells_per_domain_edge(amplitude_table.unit_cell, 4000.0)
    centre = DIALS_PIXELS * DIALS_PIXEL_MM / 2
    true_detector = Detector(DIALS_PIXELS, DIALS_PIXELS, DIALS_PIXEL_MM, DISTANCE_MM, (centre, centre),
                             thickness_mm=0.032, attenuation_length_mm=0.017).with_beam_center_offset_px((0.5, 0.5))
    shots = []
    for seed in DIALS_SHOTS:
        rng = np.random.default_rng(seed)
        matrix = (xtal.random_rotation(rng) @ xtal.orthogonalization_matrix(amplitude_table.unit_cell).T).T
        rotations = xtal.mosaic_rotations(25, 0.05, rng)
        photons = sase_spectrum(SaseModel(), LY99_ENERGIES_EV, rng)
        crystal = CrystalState(torch.as_tensor(xtal.domain_matrices(matrix, rotations)),
                               torch.full((3,), float(ncells), dtype=torch.float64),
                               torch.tensor(DOMAINS_PER_CRYSTAL, dtype=torch.float64))
        image = bragg_photons_sparse(true_detector, make_beam(LY99_ENERGIES_EV, photons), crystal, lookup, hkl).numpy()
        wavelength = float(photons @ (HC_EV_ANGSTROM / LY99_ENERGIES_EV) / photons.sum())
        shots.append((matrix, wavelength, image))
    return ncells, true_detector, shots


def test_spot_positions_agree_with_dials_predictions(simulated_shots):
    ncells, true_detector, shots = simulated_shots
    assert ncells == 57
    centre_px = np.asarray(true_detector.beam_center_mm) / true_detector.pixel_size_mm
    nominal_detector = true_detector.with_beam_center_offset_px((-0.5, -0.5))
    residuals = {"true": [], "nominal": []}
    tangential = {"true": [], "nominal": []}
    for matrix, wavelength, image in shots:
        centroids, _ = spot_centroids(image, threshold=0.5, min_total=50.0)
        for name, detector in (("true", true_detector), ("nominal", nominal_detector)):
            predictions = dials_predictions(detector, matrix, wavelength)
            matched, residual, found = match(centroids, predictions)
            if name == "true":
                # Measured per shot: 16-25 predictions on the panel, every one with a spot within
                # 3 px; 37-48 spots. The rest of the spots are reflections the 100-eV band excites
                # that a single-wavelength prediction leaves out.
                assert len(predictions) >= 15
                assert found >= 0.9 * len(predictions)
                assert matched.sum() >= 15
            outward = centroids[matched] - centre_px
            outward /= np.linalg.norm(outward, axis=1, keepdims=True)
            residuals[name].append(residual)
            tangential[name].append(residual[:, 0] * outward[:, 1] - residual[:, 1] * outward[:, 0])
    true_residual, nominal_residual = np.concatenate(residuals["true"]), np.concatenate(residuals["nominal"])
    true_tangential = np.abs(np.concatenate(tangential["true"]))
    # Polychromatic streaks scatter radially (median |radial| 0.23-0.41 px per shot); across the
    # streak, the spots sit on the predictions: median |tangential| 0.08 px over the five shots
    # (0.06-0.12 per shot, from which of the 25 mosaic domains light each spot).
    assert np.median(true_tangential) < 0.15
    # Mean residual with the true geometry: measured (-0.01, -0.04) px over the five shots.
    assert np.all(np.abs(true_residual.mean(axis=0)) < 0.1)
    # Predicting with the beam centre 0.5 px off moves the mean residual by 0.5 px and spoils the
    # tangential agreement (median 0.49 px; 0.34-0.59 per shot): the comparison sees half a pixel.
    assert len(nominal_residual) == len(true_residual)
    assert np.allclose(nominal_residual.mean(axis=0) - true_residual.mean(axis=0), 0.5, atol=0.05)
    assert np.median(np.abs(np.concatenate(tangential["nominal"]))) > 0.25


def rotation_angles_and_axes(rotations):
    """Angles (radians, >= 0) and unit axes of rotation matrices (D, 3, 3)."""
    angles = np.arccos(np.clip((np.trace(rotations, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0))
    skew = np.stack((rotations[:, 2, 1] - rotations[:, 1, 2], rotations[:, 0, 2] - rotations[:, 2, 0],
                     rotations[:, 1, 0] - rotations[:, 0, 1]), axis=1)
    return angles, skew / np.linalg.norm(skew, axis=1, keepdims=True)


def test_nanobragg_mosaic_draw_has_nanobraggs_angle_distribution():
    """nanoBragg's draw: angle spread * (1 - r^2)^(1/3), r uniform on [-1, 1], so its CDF is
    1 - sqrt(1 - t^3) of t = angle / spread, never above the spread; axes uniform on the sphere;
    domain 0 the identity."""
    spread_deg, n = 0.5, 20000
    rotations = xtal.mosaic_rotations(n, spread_deg, np.random.default_rng(11), "nanobragg")
    assert np.array_equal(rotations[0], np.eye(3))
    assert np.allclose(np.einsum("dij,dkj->dik", rotations, rotations), np.eye(3), atol=1e-12)
    angles, axes = rotation_angles_and_axes(rotations[1:])
    fraction = angles / np.radians(spread_deg)
    assert fraction.max() <= 1 + 1e-9
    result = scipy.stats.kstest(fraction, lambda t: 1 - np.sqrt(1 - np.clip(t, 0, 1) ** 3))
    assert result.pvalue > 0.01, result
    # Clustered near the spread: half the angles above (3/4)^(1/3) = 0.909 of it, the median.
    assert np.median(fraction) == pytest.approx(0.75 ** (1 / 3), abs=0.01)
    assert np.sqrt(np.mean(fraction ** 2)) == pytest.approx(xtal.NANOBRAGG_RMS_FRACTION, abs=0.005)
    assert xtal.NANOBRAGG_RMS_FRACTION == pytest.approx(0.8598, abs=1e-4)
    # Axes uniform on the sphere: each component uniform on [-1, 1] (Archimedes), mean 0, mean square 1/3.
    assert np.abs(axes.mean(axis=0)).max() < 0.02
    assert np.allclose((axes ** 2).mean(axis=0), 1 / 3, atol=0.01)
    assert scipy.stats.kstest(axes[:, 2], "uniform", args=(-1, 2)).pvalue > 0.01


def test_nanobraggs_ran1_is_the_minimal_standard_generator_behind_a_shuffle():
    """The generator under the shuffle is Park and Miller's: from 1, the 10000th value is 1043618065 (their
    published check). The deviates lie on (0, 1) in single precision, and a seed gives the same sequence.
    (That the shuffled draw is nanoBragg's is checked on its images: benchmarks/stage1_nanobragg_truth.py.)"""
    state = 1
    for _ in range(10000):
        state = xtal.NanoBraggRan1._step(state)
    assert state == 1043618065
    first, again = xtal.NanoBraggRan1(-1000), xtal.NanoBraggRan1(-1000)
    values = np.array([first.next() for _ in range(3000)])
    assert np.array_equal(values, [again.next() for _ in range(3000)])
    assert values.min() > 0 and values.max() < 1 and np.array_equal(values, values.astype(np.float32))
    assert abs(values.mean() - 0.5) < 0.02 and scipy.stats.kstest(values, "uniform").pvalue > 0.01


def test_nanobraggs_seeded_domains_are_its_draw_from_its_generator():
    """``-mosaic_seed 1000``: domain 0 the identity after its three deviates, the rest nanoBragg's
    axis-angle formula on the generator's next three deviates each, never beyond the spread."""
    rotations = xtal.nanobragg_seeded_mosaic_rotations(10, 0.05, 1000)
    generator = xtal.NanoBraggRan1(-1000)
    deviates = np.array([[2.0 * generator.next() - 1.0 for _ in range(3)] for _ in range(10)])
    assert np.array_equal(rotations[0], np.eye(3))
    for rotation, (r1, r2, r3) in zip(rotations[1:], deviates[1:]):
        axis = np.array([np.sqrt(1 - r2 ** 2) * np.sin(np.pi * r1), np.sqrt(1 - r2 ** 2) * np.cos(np.pi * r1), r2])
        angle = np.radians(0.05) * (1 - r3 ** 2) ** (1 / 3)
        assert np.allclose(rotation, xtal.axis_angle_rotation(axis, angle), atol=1e-15)
        assert xtal.rotation_angle_deg(rotation) <= 0.05 + 1e-12
    assert not np.allclose(rotations, xtal.nanobragg_seeded_mosaic_rotations(10, 0.05, 1001))
    # nanoBragg's frame to DIALS's: a proper rotation (x_dials = z, y_dials = y, z_dials = -x).
    frame = xtal.NANOBRAGG_MOSFLM_TO_DIALS
    assert np.allclose(frame @ frame.T, np.eye(3)) and np.linalg.det(frame) == pytest.approx(1.0)
    assert np.array_equal(frame @ np.array([1.0, 2.0, 3.0]), [3.0, 2.0, -1.0])


def test_gaussian_mosaic_draw_is_the_default_and_unchanged():
    """The default draw is the LY99 one: normal angles of standard deviation spread, axes uniform."""
    default = xtal.mosaic_rotations(5000, 0.5, np.random.default_rng(12))
    gaussian = xtal.mosaic_rotations(5000, 0.5, np.random.default_rng(12), "gaussian")
    assert np.array_equal(default, gaussian)
    rng = np.random.default_rng(12)
    axis = rng.standard_normal(3)
    first = xtal.axis_angle_rotation(axis / np.linalg.norm(axis), rng.normal(0.0, np.radians(0.5)))
    assert np.array_equal(default[0], first)
    angles, _ = rotation_angles_and_axes(default)
    # |N(0, s)| is the half-normal: its CDF erf(x / (s sqrt 2)).
    result = scipy.stats.kstest(angles / np.radians(0.5), "halfnorm")
    assert result.pvalue > 0.01, result
    with pytest.raises(ValueError, match="unknown mosaic model 'uniform'"):
        xtal.mosaic_rotations(2, 0.5, np.random.default_rng(0), "uniform")


def test_the_simulators_mosaic_model_comes_from_the_config(amplitude_table, tmp_path):
    from tiny_config import tiny_config

    from xfel_spread.config import ConfigError, load_config
    from xfel_spread.sim.shard import draw_crystal, setup_from_config
    from xfel_spread.sim.structure_factors import save_channel_amplitudes

    save_channel_amplitudes(amplitude_table, tmp_path / "amplitudes.h5")
    spread = {"n_mosaic_domains": 50, "mosaic_spread_deg": 0.2}
    setups = {model: setup_from_config(load_config(tiny_config(crystal={**spread, "mosaic_model": model})),
                                       str(tmp_path / "amplitudes.h5"))
              for model in ("gaussian", "nanobragg")}
    default = setup_from_config(load_config(tiny_config(crystal=spread)), str(tmp_path / "amplitudes.h5"))
    assert default.mosaic_model == "gaussian" and setups["nanobragg"].mosaic_model == "nanobragg"
    assert np.array_equal(draw_crystal(default, 3).mosaic_rotations, draw_crystal(setups["gaussian"], 3).mosaic_rotations)
    nanobragg = draw_crystal(setups["nanobragg"], 3)
    assert np.array_equal(nanobragg.real_space_matrix, draw_crystal(default, 3).real_space_matrix)
    assert np.array_equal(nanobragg.mosaic_rotations[0], np.eye(3))
    angles, _ = rotation_angles_and_axes(nanobragg.mosaic_rotations[1:])
    assert angles.max() <= np.radians(0.2) * (1 + 1e-9)
    with pytest.raises(ConfigError, match="mosaic_model"):
        load_config(tiny_config(crystal={"mosaic_model": "uniform"}))


def live_term_set(h_per_u, u, ncells, arg_cutoff, below=None):
    """The (pair, h, k, l, channel) terms :func:`domain_pixel_terms` finds to ``arg_cutoff``; with
    ``below``, only those whose arg is below it."""
    terms = domain_pixel_terms(h_per_u, u, ncells, arg_cutoff)
    channel, valid = terms.channel_grid(u.numel())
    if below is not None:
        curvature, u_centre, floor = arg_quadratic(h_per_u[terms.pair], terms.hkl, ncells)
        valid = valid & (curvature[:, None] * (u[channel] - u_centre[:, None]) ** 2 + floor[:, None] < below)
    return {(int(terms.pair[i]), *(int(v) for v in terms.hkl[i]), int(channel[i, j]))
            for i, j in torch.nonzero(valid).tolist()}


def test_kept_terms_hold_every_live_term_and_give_the_uncached_photons(amplitude_table, ten_channel_lookup):
    """SparseTermCache: terms found at one crystal are taken again only while they hold every term
    live at the present one. Turned by growing angles (N changed too), each evaluation with terms
    kept from the start crystal gives the uncached photons and gradients to rounding; where the
    cache says its terms still hold, the live terms (arg < 35) of the turned crystal are among those
    found at the start to the cache's reach, and the largest turns make it find them again."""
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    start = crystal_state(matrix, 40.0, n_domains=5, spread_deg=0.5, seed=4)
    beam = ten_channel_beam()
    fast, slow = all_pixels(SMALL_DETECTOR)
    directions, _ = pixel_factors(SMALL_DETECTOR, fast, slow, beam.polarization_fraction)
    incident = directions - torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype)
    u = beam.inverse_wavelengths.to(directions.dtype)

    def h_per_u(crystal):
        return torch.einsum("dij,pj->pdi", crystal.domain_matrices, incident).reshape(-1, 3)

    found_at_start = live_term_set(h_per_u(start), u, start.ncells, CACHE_ARG_CUTOFF)
    live_at_start = live_term_set(h_per_u(start), u, start.ncells, ARG_CUTOFF, below=ARG_CUTOFF)
    outcomes, beyond_the_cutoff = [], []
    for angle_deg in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.2):
        axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
        turn = torch.as_tensor(xtal.axis_angle_rotation(axis, math.radians(angle_deg)), dtype=torch.float64)
        moved = CrystalState(start.domain_matrices @ turn.T, start.ncells * (1 + angle_deg / 10), start.scale)
        cache = SparseTermCache()
        bragg_photons_pixels(SMALL_DETECTOR, beam, start, ten_channel_lookup, fast, slow, cache=cache, cache_key=0)
        kept, kept_gradients = photons_and_gradients(
            functools.partial(bragg_photons_pixels, cache=cache, cache_key=0), beam, moved, ten_channel_lookup)
        fresh, fresh_gradients = photons_and_gradients(bragg_photons_pixels, beam, moved, ten_channel_lookup)
        reused = cache.reuses == 1
        outcomes.append(reused)
        assert cache.builds == (1 if reused else 2)
        assert float(fresh.max()) > 1.0
        # Measured: photons to 1e-18 of the peak, gradients to 1e-13 of their largest (N's).
        assert float((kept - fresh).abs().max() / fresh.max()) < 1e-12, angle_deg
        for got, expected in zip(kept_gradients, fresh_gradients):
            assert float((got - expected).abs().max() / expected.abs().max()) < 1e-12, angle_deg
        if reused:
            live_now = live_term_set(h_per_u(moved), u, moved.ncells, ARG_CUTOFF, below=ARG_CUTOFF)
            assert live_now and live_now <= found_at_start, angle_deg
            beyond_the_cutoff.append(len(live_now - live_at_start))
    # Measured: reused to 0.02 deg, found again at 0.05 and 0.2; the turned crystals' live terms that
    # were not live at the start (the reach's work): 0, 11, 22, 36, 77 of about 3200.
    assert outcomes[0] and not outcomes[-1] and sum(outcomes) >= 2, outcomes
    assert beyond_the_cutoff[0] == 0 and beyond_the_cutoff[-1] > 0, beyond_the_cutoff
