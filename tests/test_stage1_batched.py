"""The batched forward model (stage1.batched, what the exa rule runs) against the dense reference, its
gradients, buffer reuse, the lockstep driver, and refine_batch against refine_shot on CPU (and CUDA
against CPU)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from stage1_cases import assert_identical_fit, assert_same_fit
from sim_fixtures import LY99_ENERGIES_EV, lookup_for

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import ARG_CUTOFF, GAUSS_WIDTH, Beam, CrystalState, bragg_photons_dense, pixel_factors
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM
from xfel_spread.stage1.batched import BatchedForwardModel, Lockstep, batched_bragg_photons, refine_batch
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.refine import ShotProblem, refine_shot, shot_evaluator
from xfel_spread.stage1.synthetic import LY99_DETECTOR, perturbed_matrix, simulate_shot_pixels, with_start

FEW_CHANNELS = np.arange(20, 80, 6)
ALL_GROUPS = ["G", "rotation", "cell", "ncells", "eta", "detz_shift"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def kernel_rtol(max_ncells: float, n_terms: int, max_index: float = 64.0) -> float:
    """Relative difference that floating point allows between the dense and the batched Bragg photons.

    Both run one kernel (``sim.forward.bragg_sum``) but form h = u A (dir - i) with different einsums
    (one crystal; per-pixel gathered crystals), which may round its 3-term dot products differently:
    up to 3 ulp of |h| < ``max_index``. Inside the cut-off |N (h - h0)| < sqrt(35 * 0.63), so an ulp
    of h moves arg = |N (h - h0)|^2 / 0.63 by at most 2 sqrt(35 * 0.63) N ulp / 0.63, and the term
    exp(-2 arg) by twice that, relatively. A pixel sums ``n_terms`` (channel, domain) terms, all >= 0,
    so the sum keeps the terms' relative error plus n_terms rounding steps.
    """
    ulp = float(np.spacing(max_index))
    per_ulp = 4 * math.sqrt(ARG_CUTOFF * GAUSS_WIDTH) * max_ncells * ulp / GAUSS_WIDTH
    return 3 * per_ulp + n_terms * float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def few_lookup(amplitude_table):
    return lookup_for(amplitude_table, FEW_CHANNELS)


@pytest.fixture(scope="module")
def three_shots(amplitude_table, few_lookup):
    """Three simulated shots (different crystals, spectra) with perturbed starts."""
    shots = []
    for seed in (1, 2, 3):
        synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell,
                                         seed=seed, n_rois=8)
        shots.append(with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed, cell_fraction=0.001)))
    return shots


def prepared(shot, settings, lookup):
    """A ShotProblem with its start G set, as refine_shot makes it."""
    problem = ShotProblem(shot, settings, "cpu")
    problem.set_start_from_model(lookup)
    return problem


def shots_pixels(shots):
    """(fast, slow, shot of each pixel) of the shots' shoebox pixels, shot after shot."""
    fast = torch.as_tensor(np.concatenate([shot.pixel_fast for shot in shots]))
    slow = torch.as_tensor(np.concatenate([shot.pixel_slow for shot in shots]))
    return fast, slow, torch.as_tensor(np.repeat(np.arange(len(shots)), [shot.n_pixels for shot in shots]))


def gathered_photons(fast, slow, shot_of_pixel, crystals, spectra, energies, lookup, *mosaic_variance):
    """The batched kernel's photons, every pixel's inputs gathered in one call mixing shots (the GPU's way)."""
    directions, factor = pixel_factors(LY99_DETECTOR, fast, slow, 1.0)
    return batched_bragg_photons(directions, factor, shot_of_pixel, torch.stack([c.domain_matrices for c in crystals]),
                                 torch.stack([c.ncells for c in crystals]), torch.stack([c.scale for c in crystals]),
                                 torch.stack(spectra), torch.as_tensor(energies / HC_EV_ANGSTROM), lookup, 3e-6,
                                 *mosaic_variance)


def test_batched_kernel_equals_the_dense_model_per_shot(three_shots, few_lookup):
    """Three shots' shoebox pixels, each shot with its own 3-domain crystal, N, scale and spectrum."""
    energies = LY99_ENERGIES_EV[FEW_CHANNELS]
    rng = np.random.default_rng(5)
    fast, slow, shot_of_pixel = shots_pixels(three_shots)
    crystals = [CrystalState(torch.as_tensor(xtal.domain_matrices(shot.real_space_matrix,
                                                                  xtal.mosaic_rotations(3, 0.1, rng))),
                             torch.as_tensor(rng.uniform(30, 80, 3)), torch.tensor(rng.uniform(10, 100)))
                for shot in three_shots]
    spectra = [torch.as_tensor(shot.photons * rng.uniform(0.5, 2.0, FEW_CHANNELS.size)) for shot in three_shots]
    gathered = gathered_photons(fast, slow, shot_of_pixel, crystals, spectra, energies, few_lookup)
    for shot in range(3):
        mine = shot_of_pixel == shot
        beam = Beam(torch.as_tensor(energies), spectra[shot], 3e-6, 1.0)
        reference = bragg_photons_dense(LY99_DETECTOR, beam, crystals[shot], few_lookup, fast[mine], slow[mine])
        assert reference.max() > 100
        # A term at the cut-off (arg = 35) is exp(-70) ~ 4e-31 of its peak; rounding decides its side.
        rtol = kernel_rtol(float(crystals[shot].ncells.max()), FEW_CHANNELS.size * 3)
        assert torch.allclose(gathered[mine], reference, rtol=rtol, atol=1e-20 * float(reference.max()))


def test_batched_kernel_with_an_analytic_mosaic_spread_equals_the_dense_model(three_shots, few_lookup):
    """Each shot's one domain averaged over its own mosaic spreads (two nodes, as the Gaussian draw's)."""
    energies = LY99_ENERGIES_EV[FEW_CHANNELS]
    rng = np.random.default_rng(6)
    fast, slow, shot_of_pixel = shots_pixels(three_shots)
    crystals = [CrystalState(torch.as_tensor(shot.real_space_matrix)[None], torch.as_tensor(rng.uniform(30, 80, 3)),
                             torch.tensor(rng.uniform(10, 100)),
                             torch.as_tensor(np.radians(rng.uniform(0.01, 0.1, 2)) ** 2 / 3))
                for shot in three_shots]
    spectra = [torch.as_tensor(shot.photons * rng.uniform(0.5, 2.0, FEW_CHANNELS.size)) for shot in three_shots]
    gathered = gathered_photons(fast, slow, shot_of_pixel, crystals, spectra, energies, few_lookup,
                                torch.stack([c.mosaic_variance for c in crystals]))
    for shot in range(3):
        mine = shot_of_pixel == shot
        beam = Beam(torch.as_tensor(energies), spectra[shot], 3e-6, 1.0)
        reference = bragg_photons_dense(LY99_DETECTOR, beam, crystals[shot], few_lookup, fast[mine], slow[mine])
        assert reference.max() > 100
        assert torch.allclose(gathered[mine], reference, rtol=1e-10, atol=1e-20 * float(reference.max()))


def served_at_generic_points(three_shots, few_lookup, **model_options):
    """Every parameter refined (eta with 4 domains, detector shift): the prepared problems, the loaded
    batched model, a request per shot at a generic point and the model's replies."""
    settings = Stage1Settings.from_config({"refine": ALL_GROUPS, "mosaic_domains": 4, "restraints": {"ncells": 20.0}})
    problems = [prepared(shot, settings, few_lookup) for shot in three_shots]
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu", **model_options)
    model.load(problems)
    rng = np.random.default_rng(1)
    requests = {index: (problem.space, rng.uniform(-3, 3, problem.space.n_refined))
                for index, problem in enumerate(problems)}
    return problems, model, requests, model.nll_and_gradients(requests)


def test_batched_nll_and_gradients_equal_the_per_shot_ones(three_shots, few_lookup):
    """At generic points of each shot, through the gathered kernel (a GPU's way, here on the CPU)."""
    problems, model, requests, replies = served_at_generic_points(three_shots, few_lookup, gathered=True)
    for index, problem in enumerate(problems):
        value, gradient = shot_evaluator(problem, few_lookup)(*requests[index])
        # The photons agree to kernel_rtol (N within its bounds); the NLL's per-pixel terms
        # are positive and summed in other orders, adding one rounding step per pixel.
        n_pixels = problem.tensors.trusted.numel()
        rel = (kernel_rtol(problem.settings.bounds_ncells[1], FEW_CHANNELS.size * 4)
               + n_pixels * float(np.finfo(np.float64).eps))
        assert replies[index][0] == pytest.approx(value, rel=rel)
        assert np.allclose(replies[index][1], gradient, rtol=1e-10, atol=1e-10 * np.abs(gradient).max())
    # A subset of the shots is served alone, with the same answers.
    alone = model.nll_and_gradients({2: requests[2]})
    assert alone[2][0] == pytest.approx(replies[2][0], rel=1e-13)
    assert np.allclose(alone[2][1], replies[2][1], rtol=1e-12)


def test_on_a_cpu_the_batch_evaluates_each_shot_as_refine_shot_does(three_shots, few_lookup):
    """The CPU default: the same NLLs, gradients and every-pixel photons to the bit, no batch buffers."""
    problems, model, requests, replies = served_at_generic_points(three_shots, few_lookup)
    assert not model.gathered
    assert model._storage == {}
    for index, problem in enumerate(problems):
        value, gradient = shot_evaluator(problem, few_lookup)(*requests[index])
        assert replies[index][0] == value
        assert np.array_equal(replies[index][1], gradient)
    values = torch.stack([torch.as_tensor(problem.space.start) for problem in problems])
    for row, (photons, problem) in enumerate(zip(model.bragg_all_pixels(range(3), values), problems)):
        pixels = torch.arange(problem.shot.n_pixels)
        assert torch.equal(photons.mean, problem.bragg(values[row], few_lookup, pixels))
        assert photons.variance is photons.mean  # no point spread: photons counted where they land
        assert photons.mean.max() > 100


def test_buffers_are_reused_between_batches(three_shots, few_lookup):
    settings = Stage1Settings.from_config({})
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu", gathered=True)
    model.load([prepared(shot, settings, few_lookup) for shot in three_shots])
    pointers = {name: model._storage[name].data_ptr() for name in ("fast", "data", "directions")}
    model.load([prepared(shot, settings, few_lookup) for shot in three_shots[:2]])
    assert {name: model._storage[name].data_ptr() for name in pointers} == pointers
    assert model.data.shape[0] == sum(shot.n_pixels for shot in three_shots[:2])
    assert np.array_equal(model.data.numpy(), np.concatenate([shot.data_photons for shot in three_shots[:2]]))


def test_lockstep_serves_every_waiting_task_in_one_batch():
    batch_sizes = []

    def task(centre, fail_at=None):
        def run(evaluate):
            position, calls = np.zeros(1), 0
            for _ in range(5 + centre):
                calls += 1
                if calls == fail_at:
                    raise RuntimeError("task gave up")
                value, gradient = evaluate(None, position)
                position = position - 0.5 * gradient
            return float(position[0]), value
        return run

    def serve(requests):
        batch_sizes.append(len(requests))
        return {key: (float((x[0] - key) ** 2), 2 * (x - key)) for key, (_, x) in requests.items()}

    results = Lockstep().run({1: task(1), 2: task(2), 3: task(3, fail_at=2)}, serve)
    assert results[1] == (1.0, 0.0) and results[2] == (2.0, 0.0)
    assert isinstance(results[3], RuntimeError)
    assert batch_sizes == [3, 2, 2, 2, 2, 2, 1]


def test_refine_batch_gives_the_fits_of_refine_shot(three_shots, few_lookup):
    """On a CPU to the bit (the same evaluations, so the same cost per lattice); through the gathered
    kernel (a GPU's way) up to rounding."""
    settings = Stage1Settings.from_config({})
    singles = [refine_shot(shot, few_lookup, settings) for shot in three_shots]
    batched = refine_batch(three_shots, few_lookup, settings, "cpu")
    gathered_model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu", gathered=True)
    gathered = refine_batch(three_shots, gathered_model, settings)
    assert [fit.shot_index for fit in batched] == [shot.shot_index for shot in three_shots]
    for batched_fit, gathered_fit, single_fit in zip(batched, gathered, singles):
        assert single_fit.converged, single_fit.reason
        assert batched_fit.rmsd_px < 0.05 < batched_fit.rmsd_px_start
        assert_identical_fit(batched_fit, single_fit)
        assert_same_fit(gathered_fit, single_fit)


def test_refine_batch_runs_the_free_domains_shot_by_shot_as_refine_shot_does(three_shots, few_lookup):
    """The free-domain refinement (stage1.free_domains) runs each shot through refine_shot's model after the
    batch: on a CPU the fits are refine_shot's to the bit, domains included."""
    settings = Stage1Settings.from_config({"free_domains": 3, "free_domains_max_iterations": 30})
    shots = three_shots[:2]
    for batched_fit, shot in zip(refine_batch(shots, few_lookup, settings, "cpu"), shots):
        single_fit = refine_shot(shot, few_lookup, settings)
        assert single_fit.domain_vectors_deg.shape == (3, 3)
        assert_identical_fit(batched_fit, single_fit)


def test_refine_batch_with_eta_and_distance_gives_the_parameters_of_refine_shot(three_shots, few_lookup):
    """Rotation, cell and distance are correlated: rounding moves the end point along that valley a
    little more, so a hundredth of a step is asked. eta ends at its bound 0, where the NLL is flat
    to second order: there the batch's rounding left the second shot at 0.00015 deg (0.07 of a step,
    the NLLs 8e-7 apart), so a tenth of a step and the NLL are asked. The background planes' share of
    the Bragg photons is taken out, so that the batch's way of taking it out is checked too."""
    settings = Stage1Settings.from_config({"refine": ALL_GROUPS, "mosaic_domains": 4, "plane_holds_bragg": True})
    shots = three_shots[:2]
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu", gathered=True)
    for batched_fit, shot in zip(refine_batch(shots, model, settings), shots):
        single = refine_shot(shot, few_lookup, settings)
        assert single.final["eta_deg"] < 1e-3
        assert_same_fit(batched_fit, single, tolerance_steps=1e-2, flat={"eta_deg": 0.1})
        assert batched_fit.nll_final == pytest.approx(single.nll_final, rel=0, abs=1e-4)


def test_failed_shots_do_not_stop_the_batch(three_shots, few_lookup):
    settings = Stage1Settings.from_config({})
    broken = np.array(three_shots[1].data_photons, copy=True)
    broken[3] = np.nan
    other_channels = dataclasses.replace(three_shots[2], energies_ev=three_shots[2].energies_ev + 1.0)
    shots = [three_shots[0], dataclasses.replace(three_shots[1], data_photons=broken), other_channels, three_shots[0]]
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu")
    fits = refine_batch(shots, model, settings)
    assert not fits[1].converged and fits[1].reason == "1 trusted pixel(s) hold non-finite data_photons"
    assert not fits[2].converged
    assert fits[2].reason == "the shot's channel energies differ from those of the batched model"
    single = refine_shot(three_shots[0], few_lookup, settings)
    assert_same_fit(fits[0], single)
    assert_same_fit(fits[3], single)
    assert refine_batch([], model, settings) == []


def test_a_failing_batch_evaluation_fails_its_shots_with_the_reason(three_shots, few_lookup, monkeypatch):
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu")

    def out_of_memory(requests):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(model, "nll_and_gradients", out_of_memory)
    fits = refine_batch(three_shots, model, Stage1Settings.from_config({}))
    assert [fit.converged for fit in fits] == [False] * 3
    assert {fit.reason for fit in fits} == {"RuntimeError: CUDA out of memory"}
    assert all(np.isfinite(fit.rmsd_px_start) for fit in fits)


@needs_cuda
def test_refine_batch_on_cuda_gives_the_parameters_found_on_cpu(three_shots, few_lookup):
    settings = Stage1Settings.from_config({"refine": ALL_GROUPS, "mosaic_domains": 4})
    on_cpu = refine_batch(three_shots, few_lookup, settings, "cpu")
    on_cuda = refine_batch(three_shots, few_lookup, settings, "cuda")
    for cuda_fit, cpu_fit in zip(on_cuda, on_cpu):
        assert cpu_fit.converged, cpu_fit.reason
        assert_same_fit(cuda_fit, cpu_fit, tolerance_steps=1e-2)


def test_refine_batch_tries_the_broad_start_as_refine_shot_does(three_shots, few_lookup):
    """With ``broad_start: always`` every shot of a batch is refined from the broad-spot start too,
    the same way as alone: the same fits, field for field."""
    settings = Stage1Settings.from_config({"broad_start": "always"})
    plain = refine_batch(three_shots, few_lookup, Stage1Settings.from_config({}), "cpu")
    for batched, shot, once in zip(refine_batch(three_shots, few_lookup, settings, "cpu"), three_shots, plain):
        single = refine_shot(shot, few_lookup, settings)
        assert single.converged, single.reason
        assert_identical_fit(batched, single)
        assert batched.n_evaluations > once.n_evaluations


def test_refine_batch_restarts_a_lost_shot_as_refine_shot_does(amplitude_table, three_shots, few_lookup):
    """A start whose spots lie about 4 px off loses its shot (G to 0) and is refined again with
    broad spots, in the batch as alone, beside a shot that needs no restart; so is one whose spots
    all leave their shoeboxes with G inside its bounds (the restart after the batch's end)."""
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=4,
                                     n_rois=10)
    lost = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, 2, rotation_deg=0.05,
                                                       cell_fraction=0.003))
    lost_inside = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, 1, rotation_deg=0.08,
                                                              cell_fraction=0.005))
    shots = [lost, three_shots[0], lost_inside]
    settings = Stage1Settings.from_config({})
    for batched, shot in zip(refine_batch(shots, few_lookup, settings, "cpu"), shots):
        single = refine_shot(shot, few_lookup, settings)
        assert single.converged, single.reason
        assert_identical_fit(batched, single)
    without = refine_batch([lost, lost_inside], few_lookup, Stage1Settings.from_config({"broad_start_ncells": None}),
                           "cpu")
    assert [fit.reason for fit in without] == ["the refined model predicts no Bragg photons in the shoeboxes"] * 2
    # The first G ends at its bound 0 or within rounding of it (4.5e-13 on one CPU); the second stays inside.
    assert without[0].final["G"] < 1e-6 and 1e-6 < without[1].final["G"] < 1e12
