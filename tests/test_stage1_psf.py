"""The detector's point spread in the refinement: the sparse map against the simulator's convolution,
its gradients, the per-shot and batched refinements with it, and what leaving it out costs."""

import dataclasses

import numpy as np
import pytest
import torch
from sim_fixtures import LY99_ENERGIES_EV, lookup_for

from stage1_cases import assert_identical_fit, assert_same_fit

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.detector_effects import apply_fiber_psf, fiber_psf_kernel
from xfel_spread.stage1.batched import BatchedForwardModel, refine_batch
from xfel_spread.stage1.likelihood import pixel_nll, plane_share_map, z_score_sigma
from xfel_spread.stage1.model import INDEX, Stage1Settings
from xfel_spread.stage1.psf import DetectorPsf, SpreadMap, block_diagonal, spread
from xfel_spread.stage1.refine import ShotProblem, refine_shot, shot_evaluator, summarize_model
from xfel_spread.stage1.synthetic import fit_tilted_plane, perturbed_matrix, simulate_shot_pixels, with_start

FEW_CHANNELS = np.arange(20, 80, 6)
#: The LY99 fiber PSF (simulate.detector defaults): FWHM 0.08 mm on 0.088 mm pixels, radius 10 px.
LY99_PSF = DetectorPsf(0.08, 10)
PIXEL_MM = 0.088


def test_spread_matrix_is_the_simulators_convolution():
    """Every pixel of a 30 x 40 patch given: the map equals apply_fiber_psf up to its even tail."""
    rng = np.random.default_rng(3)
    image = torch.as_tensor(rng.exponential(5.0, (30, 40)))
    slow, fast = np.mgrid[100:130, 200:240]
    spread_map = LY99_PSF.shot_spread(fast.ravel(), slow.ravel(), PIXEL_MM, "cpu").photons
    spread_image = spread(spread_map, image.reshape(-1)).reshape(30, 40)
    kernel = fiber_psf_kernel(0.08 / PIXEL_MM, 10)
    tail = float(image.sum()) * (1 - float(kernel.sum())) / image.numel()
    expected = apply_fiber_psf(image, 0.08 / PIXEL_MM, 10) - tail
    assert torch.allclose(spread_image, expected, rtol=1e-10, atol=1e-10)
    assert 0.9 < float(kernel.sum()) < 0.99


def test_light_crosses_between_shoeboxes_in_any_pixel_order():
    """Two 3 x 3 boxes side by side, pixels shuffled: one lit pixel lights its neighbour box."""
    slow, fast = np.mgrid[50:53, 60:66]
    order = np.random.default_rng(1).permutation(fast.size)
    fast, slow = fast.ravel()[order], slow.ravel()[order]
    matrix = LY99_PSF.spread_matrix(fast, slow, PIXEL_MM, "cpu").to_dense().numpy()
    kernel = fiber_psf_kernel(0.08 / PIXEL_MM, 10).numpy()
    for i in range(fast.size):
        for j in range(fast.size):
            assert matrix[i, j] == kernel[10 + slow[i] - slow[j], 10 + fast[i] - fast[j]]
    lit = np.flatnonzero((fast == 62) & (slow == 51))[0]
    neighbour = np.flatnonzero((fast == 63) & (slow == 51))[0]
    assert matrix[neighbour, lit] == kernel[10, 11] > 0.01


def test_spread_and_its_gradient_are_the_dense_products():
    """The row-compressed spread is M x, and its gradient M^T g, on a map that is not symmetric."""
    rng = np.random.default_rng(11)
    dense = torch.as_tensor(rng.random((7, 7)) * (rng.random((7, 7)) < 0.4))
    assert not torch.equal(dense, dense.t())
    row, column = np.nonzero(dense.numpy())
    spread_map = SpreadMap.from_entries(row, column, dense.numpy()[row, column], 7, "cpu")
    photons = torch.as_tensor(rng.random(7), dtype=torch.float64).requires_grad_(True)
    weights = torch.as_tensor(rng.random(7), dtype=torch.float64)
    spread_photons = spread(spread_map, photons)
    assert torch.allclose(spread_photons, dense @ photons, rtol=1e-14, atol=0)
    gradient, = torch.autograd.grad((weights * spread_photons).sum(), photons)
    assert torch.allclose(gradient, dense.t() @ weights, rtol=1e-14, atol=0)
    assert spread_map.shape == (7, 7)
    # Kept as two compressed maps with 32-bit indices (the memory of the coordinate list).
    assert spread_map.rows.col_indices().dtype == torch.int32
    assert torch.equal(spread_map.rows.to_dense(), dense) and torch.equal(spread_map.columns.to_dense(), dense.t())


def test_spread_map_holds_the_spread_matrix_and_its_transpose():
    """Pixels in no particular order: the map's rows and its transpose's, as the coordinate list says."""
    order = np.random.default_rng(5).permutation(12 * 12)
    fast, slow = order % 12 + 200, order // 12 + 50
    matrix = LY99_PSF.spread_matrix(fast, slow, PIXEL_MM, "cpu").to_dense()
    spread_map = LY99_PSF.shot_spread(fast, slow, PIXEL_MM, "cpu").photons
    assert torch.equal(spread_map.rows.to_dense(), matrix)
    assert torch.equal(spread_map.columns.to_dense(), matrix.t())
    assert spread_map.rows.col_indices().dtype == torch.int32


def test_block_diagonal_keeps_each_shot_to_itself():
    pixels = [(np.array([0, 1]), np.array([0, 0])), (np.array([5, 5, 6]), np.array([9, 10, 9]))]
    first, second = (LY99_PSF.spread_matrix(fast, slow, PIXEL_MM, "cpu").to_dense() for fast, slow in pixels)
    both = block_diagonal([LY99_PSF.shot_spread(fast, slow, PIXEL_MM, "cpu").photons for fast, slow in pixels])
    dense = both.rows.to_dense()
    assert dense.shape == (5, 5) and both.shape == (5, 5)
    assert torch.equal(dense[:2, :2], first) and torch.equal(dense[2:, 2:], second)
    assert not dense[:2, 2:].any() and not dense[2:, :2].any()
    # The transpose's rows too (the gradient's map).
    assert torch.equal(both.columns.to_dense(), dense.t())


def test_the_variance_map_is_the_simulators_spread_noise():
    """Photons counted, then spread (the simulator's order): over 3000 draws each pixel's variance is
    the expected photons spread by the squared kernel (ShotSpread.variance), and on a flat field the
    expected photons times the squares' sum (variance_share); the spread photons themselves, the
    variance of photons counted where they land, are 4 to 10 times too much."""
    size, margin = 44, 10
    expected = torch.full((size, size), 20.0, dtype=torch.float64)
    expected[22, 22] += 3000.0  # a sharp spot
    expected[22, 23] += 1000.0
    generator = torch.Generator().manual_seed(8)
    draws = torch.stack([apply_fiber_psf(torch.poisson(expected, generator=generator), 0.08 / PIXEL_MM, 10)
                         for _ in range(3000)])
    measured = draws.var(dim=0)
    slow, fast = np.mgrid[0:size, 0:size]
    shot_spread = LY99_PSF.shot_spread(fast.ravel(), slow.ravel(), PIXEL_MM, "cpu")
    variance = spread(shot_spread.variance, expected.reshape(-1)).reshape(size, size)
    mean = spread(shot_spread.photons, expected.reshape(-1)).reshape(size, size)
    inner = (slice(margin, size - margin),) * 2  # where the whole kernel lies inside the patch
    ratio = (measured / variance)[inner]
    # 3000 draws measure a variance to 2.6 % (one sigma): every inner pixel within 5 sigma, and on average.
    assert float((ratio - 1).abs().max()) < 0.13, float((ratio - 1).abs().max())
    assert abs(float(ratio.mean()) - 1) < 0.01
    share = shot_spread.variance_share
    assert share == pytest.approx(float((fiber_psf_kernel(0.08 / PIXEL_MM, 10) ** 2).sum()), rel=1e-15)
    assert 0.09 < share < 0.11
    flat = (slice(margin, margin + 4), slice(margin, margin + 4))  # more than a kernel radius from the spot
    assert torch.allclose(variance[flat], share * expected[flat], rtol=0.02)
    assert float((mean / variance)[22, 22]) > 3.5 and float((mean / variance)[flat].min()) > 9


def test_the_spread_noise_of_a_spot_is_its_counted_photons():
    """Why the NLL keeps the expected photons as their variance behind the point spread: the spread
    shares each counted photon among neighbours, so their noise is correlated, and a spot's pixels
    summed have nearly the Poisson noise of the photons counted, which the sum of the expected photons
    describes and the sum of the pixels' own (squared-kernel) variances understates several times.
    Measured: the box sum's variance 5225 photons^2, its expected photons 6112 (the kernel's tail
    carries some of each photon out of the box), the sum of its pixels' variances 650; the centre and
    the pixel beside it correlated 0.94."""
    size = 44
    expected = torch.full((size, size), 20.0, dtype=torch.float64)
    expected[22, 22] += 3000.0
    expected[22, 23] += 1000.0
    generator = torch.Generator().manual_seed(9)
    draws = torch.stack([apply_fiber_psf(torch.poisson(expected, generator=generator), 0.08 / PIXEL_MM, 10)
                         for _ in range(2000)])
    slow, fast = np.mgrid[0:size, 0:size]
    shot_spread = LY99_PSF.shot_spread(fast.ravel(), slow.ravel(), PIXEL_MM, "cpu")
    mean = spread(shot_spread.photons, expected.reshape(-1)).reshape(size, size)
    variance = spread(shot_spread.variance, expected.reshape(-1)).reshape(size, size)
    spot = (slice(17, 28), slice(17, 29))  # the spot's pixels, a 12-pixel box around it
    sums = draws[:, spot[0], spot[1]].sum(dim=(1, 2))
    measured = float(sums.var())
    # 2000 draws measure a variance to 3.2 % (one sigma).
    assert 0.75 < measured / float(mean[spot].sum()) < 1.0, (measured, float(mean[spot].sum()))
    assert measured > 5 * float(variance[spot].sum()), (measured, float(variance[spot].sum()))
    # Neighbours' noise is correlated: the spot's centre and the pixel beside it.
    centre, beside = draws[:, 22, 22], draws[:, 22, 21]
    correlation = float(((centre - centre.mean()) * (beside - beside.mean())).mean() / (centre.std() * beside.std()))
    assert correlation > 0.5, correlation


def test_the_nll_takes_the_photons_and_the_z_scores_the_spread_variance(spread_shot, few_lookup):
    """Behind the point spread the refinement's NLL is that of independent pixels with the expected
    photons as their variance; the Z-scores take the pixels' own (squared-kernel) variance."""
    settings = Stage1Settings.from_config({"initial": {"ncells": [spread_shot.true_ncells] * 3,
                                                       "G": spread_shot.true_G}, "readout_sigma_adu": 1.0})
    problem = ShotProblem(spread_shot.shot, settings, "cpu", LY99_PSF)
    unit = problem.set_start_from_model(few_lookup)
    values = torch.as_tensor(problem.start_values)
    photons = unit.scaled(values[INDEX["G"]])
    tensors = problem.tensors
    trusted = photons.at(tensors.trusted)
    model, poisson = problem.expected(trusted)
    assert poisson is not None and float((poisson / model.clamp(min=1e-9)).median()) < 0.5
    data = tensors.data[tensors.trusted]
    nll = float(pixel_nll(model, data, tensors.readout_variance).sum() + problem.space.restraint_penalty(values))
    assert float(problem.nll(values, trusted.mean)) == pytest.approx(nll, rel=1e-12)
    summary = summarize_model(problem, values, photons)
    assert summary.z_score_sigma == pytest.approx(z_score_sigma(model, data, tensors.readout_variance, poisson),
                                                  rel=1e-12)


def test_the_plane_share_map_is_the_border_plane_of_the_photons(spread_shot):
    """Applied to any photons at the trusted pixels, the map gives each ROI's least-squares plane
    through them on its border, as the shot's builder fitted the background (the fit is linear)."""
    shot = spread_shot.shot
    share = plane_share_map(shot, "cpu")
    photons = np.random.default_rng(4).exponential(50.0, shot.n_pixels)
    planes = spread(share, torch.as_tensor(photons)).numpy()
    for roi in range(shot.n_rois):
        mine = shot.pixel_roi == roi
        expected = fit_tilted_plane(shot.pixel_fast[mine], shot.pixel_slow[mine], photons[mine],
                                    shot.background_fit[mine])
        np.testing.assert_allclose(planes[mine], expected, rtol=1e-9, atol=1e-9)
    assert plane_share_map(dataclasses.replace(shot, background_fit=None), "cpu") is None


def test_the_true_model_explains_the_psf_pixels_to_their_noise(spread_shot, few_lookup):
    """At the truth (N, G and the crystal), the photons spread after they are counted and the
    border planes lifted by the spots' fiber tails: with the spread variance and the planes' share
    of the Bragg photons taken out, the Z-scores have about unit spread; either one left out, they
    do not. Measured: 0.97, and 8.1 without the planes' share; 1.75 for the model without both."""
    z_sigma = {}
    for plane_holds_bragg in (True, False):
        settings = Stage1Settings.from_config({"initial": {"ncells": [spread_shot.true_ncells] * 3,
                                                           "G": spread_shot.true_G},
                                               "readout_sigma_adu": 1.0, "plane_holds_bragg": plane_holds_bragg})
        problem = ShotProblem(spread_shot.shot, settings, "cpu", LY99_PSF)
        unit = problem.set_start_from_model(few_lookup)
        values = torch.as_tensor(problem.start_values)
        z_sigma[plane_holds_bragg] = summarize_model(problem, values,
                                                     unit.scaled(values[INDEX["G"]])).z_score_sigma
        if not plane_holds_bragg:
            tensors = problem.tensors
            bragg = unit.mean[tensors.trusted] * values[INDEX["G"]]
            z_sigma["neither"] = z_score_sigma(tensors.background[tensors.trusted] + bragg,
                                               tensors.data[tensors.trusted], tensors.readout_variance)
    assert 0.85 < z_sigma[True] < 1.1, z_sigma
    assert z_sigma[False] > 4 and z_sigma["neither"] > 1.5, z_sigma


def test_bad_psf_and_repeated_pixels_are_refused():
    with pytest.raises(ValueError, match="FWHM must be positive"):
        DetectorPsf(0.0, 10)
    with pytest.raises(ValueError, match="radius must be at least 0"):
        DetectorPsf(0.08, -1)
    with pytest.raises(ValueError, match="no shoebox pixels"):
        LY99_PSF.spread_matrix(np.zeros(0, dtype=int), np.zeros(0, dtype=int), PIXEL_MM, "cpu")
    with pytest.raises(ValueError, match="not distinct"):
        LY99_PSF.spread_matrix(np.array([3, 4, 3]), np.array([7, 7, 7]), PIXEL_MM, "cpu")


@pytest.fixture(scope="module")
def few_lookup(amplitude_table):
    return lookup_for(amplitude_table, FEW_CHANNELS)


@pytest.fixture(scope="module")
def spread_shot(amplitude_table, few_lookup):
    """Ten shoeboxes, N 57, imaged through the LY99 PSF."""
    return simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=4,
                                n_rois=10, psf=LY99_PSF)


def test_gradient_with_the_psf_matches_central_differences(spread_shot, few_lookup):
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "detz_shift"]})
    problem = ShotProblem(with_start(spread_shot.shot, perturbed_matrix(spread_shot.true_matrix, 7)), settings,
                          "cpu", LY99_PSF)
    problem.set_start_from_model(few_lookup)
    evaluate = shot_evaluator(problem, few_lookup)
    point = np.random.default_rng(0).uniform(-3, 3, problem.space.n_refined)
    _, gradient = evaluate(problem.space, point)
    # A component far below the others (rot_z here, -26 against thousands) meets the NLL's
    # rounding in the differences: absolute agreement on the gradient's own scale is asked there.
    scale = np.abs(gradient).max()
    step = 1e-3
    for position, name in enumerate(settings.refined_names):
        offset = np.zeros_like(point)
        offset[position] = step
        central = (evaluate(problem.space, point + offset)[0] - evaluate(problem.space, point - offset)[0]) / (2 * step)
        assert gradient[position] == pytest.approx(central, rel=1e-6, abs=1e-7 * scale), name


@pytest.mark.slow  # refinements to convergence with the modelled PSF: 15-20 s
def test_modelling_the_psf_recovers_n_and_the_orientation(amplitude_table):
    """All 100 channels, 12 shoeboxes through the PSF, a start 0.05 degrees and 0.3 % off. With the
    PSF in the model, N and the orientation come back; without it, N shrinks to widen the spots, the
    pixels stay far from explained and the orientation ends 0.09 degrees off (here; on the LY99 psf
    demo one start of seven lost its shot that way, G going to 0)."""
    lookup = lookup_for(amplitude_table, np.arange(len(LY99_ENERGIES_EV)))
    synthetic = simulate_shot_pixels(lookup, LY99_ENERGIES_EV, amplitude_table.unit_cell, seed=2, n_rois=12,
                                     psf=LY99_PSF)
    start = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, 2, rotation_deg=0.05,
                                                        cell_fraction=0.003))
    settings = Stage1Settings.from_config({})
    with_psf = refine_shot(start, lookup, settings, LY99_PSF)
    without = refine_shot(start, lookup, settings)
    assert with_psf.converged and without.converged, (with_psf.reason, without.reason)
    assert xtal.misorientation_deg(with_psf.real_space_matrix, synthetic.true_matrix) < 0.002
    assert xtal.misorientation_deg(without.real_space_matrix, synthetic.true_matrix) > 0.02
    n_with = np.array([with_psf.final[name] for name in ("Na", "Nb", "Nc")])
    n_without = np.array([without.final[name] for name in ("Na", "Nb", "Nc")])
    assert np.all(np.abs(n_with - 57) < 2), n_with
    assert np.all(n_without < 30), n_without
    assert with_psf.z_score_sigma_final < 0.5 * without.z_score_sigma_final


@pytest.mark.slow  # refinements to convergence with the modelled PSF: 15-20 s
def test_refine_batch_with_the_psf_gives_the_parameters_of_refine_shot(amplitude_table, spread_shot, few_lookup):
    other = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=5,
                                 n_rois=8, psf=LY99_PSF)
    shots = [with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed, cell_fraction=0.001))
             for seed, synthetic in ((4, spread_shot), (5, other))]
    settings = Stage1Settings.from_config({})
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu", gathered=True)
    singles = [refine_shot(shot, few_lookup, settings, LY99_PSF) for shot in shots]
    # On a CPU (one shot: the batch's identity with refine_shot is the batched tests' subject).
    assert_identical_fit(refine_batch(shots[:1], few_lookup, settings, "cpu", psf=LY99_PSF)[0], singles[0])
    for gathered, single in zip(refine_batch(shots, model, settings, psf=LY99_PSF), singles):
        assert single.converged, single.reason
        # The gathered kernel (a GPU's) spreads over the batch's block-diagonal map, another sum
        # order; its rounding moves the end point by about a thousandth of a step, so a hundredth is asked.
        assert_same_fit(gathered, single, tolerance_steps=1e-2)
    # The same model batch after batch: a batch without the PSF reaches another end point.
    without = refine_batch(shots[:1], model, settings)[0]
    assert abs(without.final["Na"] - singles[0].final["Na"]) > 1
