"""Per-shot refinement (stage 8) on shots simulated with the project's simulator: recovery of the
truth from a perturbed start, eta refinement, bounds, and failures reported instead of raised."""

import dataclasses

import numpy as np
import pytest
import torch
from sim_fixtures import LY99_ENERGIES_EV, lookup_for

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import SparseTermCache, bragg_photons_pixels
from xfel_spread.stage1 import likelihood, refine
from xfel_spread.stage1.model import PARAMETER_NAMES, FreeDomainCrystal, Stage1Settings, c2_cell, parameter_space
from xfel_spread.stage1.refine import ShotProblem, centroid_rmsd, model_centroids, refine_shot
from xfel_spread.stage1.scoring import turned_by_mean
from xfel_spread.stage1.synthetic import LY99_DETECTOR, perturbed_matrix, simulate_shot_pixels, with_start

#: Ten channels over the band, for the quicker tests.
FEW_CHANNELS = np.arange(20, 80, 6)


@pytest.fixture(scope="module")
def full_lookup(amplitude_table):
    return lookup_for(amplitude_table, np.arange(len(LY99_ENERGIES_EV)))


@pytest.fixture(scope="module")
def few_lookup(amplitude_table):
    return lookup_for(amplitude_table, FEW_CHANNELS)


@pytest.fixture(scope="module")
def realistic_shot(amplitude_table, full_lookup):
    """All 100 channels, 12 px shoeboxes on the 20 strongest spots, N 57, LY99 flux."""
    return simulate_shot_pixels(full_lookup, LY99_ENERGIES_EV, amplitude_table.unit_cell, seed=2, n_rois=20)


@pytest.fixture(scope="module")
def quick_shot(amplitude_table, few_lookup):
    return simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=4,
                                n_rois=10)


def final_values(fit):
    return np.array([fit.final[name] for name in PARAMETER_NAMES])


def assert_inside_bounds(fit, settings):
    space = parameter_space(settings, c2_cell(fit.start_real_space_matrix), fit.start["G"])
    values = final_values(fit)
    assert np.all(values >= space.lower) and np.all(values <= space.upper)


def test_recovers_the_truth_from_a_perturbed_start(realistic_shot, full_lookup):
    """Start: 0.05 degrees off, a, b, c and beta 0.3 % off, N 72 (truth 57)."""
    start = perturbed_matrix(realistic_shot.true_matrix, seed=2, rotation_deg=0.05, cell_fraction=0.003)
    settings = Stage1Settings.from_config({})
    fit = refine_shot(with_start(realistic_shot.shot, start), full_lookup, settings)

    assert fit.converged, fit.reason
    assert fit.reason == "" and fit.n_rois == 20 and fit.n_trusted_pixels == 20 * 144
    misorientation_before = xtal.misorientation_deg(start, realistic_shot.true_matrix)
    misorientation_after = xtal.misorientation_deg(fit.real_space_matrix, realistic_shot.true_matrix)
    assert misorientation_before > 0.05
    assert misorientation_after < 0.002
    true_cell = np.array(c2_cell(realistic_shot.true_matrix))
    refined_cell = np.array([fit.final[name] for name in ("a", "b", "c", "beta_deg")])
    assert np.all(np.abs(refined_cell / true_cell - 1) < 2e-4)
    for name in ("Na", "Nb", "Nc"):
        assert abs(fit.final[name] - 57) < 1.0
    # Same amplitudes as the simulation, so G is absolute here: the true domains per crystal.
    assert fit.final["G"] == pytest.approx(realistic_shot.true_G, rel=0.02)
    assert fit.rmsd_px_start > 1.0 and fit.rmsd_px < 0.05
    assert fit.radial_rmsd_px < 0.05 and fit.radial_rmsd_px <= fit.rmsd_px
    # Every synthetic spot counts as strong.
    assert fit.n_strong_rois == 20 and fit.strong_radial_rmsd_px == fit.radial_rmsd_px
    assert fit.nll_final < fit.nll_start and 0.5 < fit.z_score_sigma_final < 1.5
    assert fit.model_centroid_px.shape == (20, 2) and np.all(np.isfinite(fit.model_centroid_px))
    assert fit.distance_mm == LY99_DETECTOR.distance_mm and fit.final["detz_shift_mm"] == 0
    assert_inside_bounds(fit, settings)


def test_detector_distance_shift_is_recovered(quick_shot, few_lookup):
    """The shot claims a distance 0.3 mm short; refining detz_shift puts the panel back."""
    short = dataclasses.replace(LY99_DETECTOR, distance_mm=LY99_DETECTOR.distance_mm - 0.3)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "detz_shift"],
                                           "initial": {"ncells": [57, 57, 57]}})
    fit = refine_shot(with_start(quick_shot.shot, quick_shot.true_matrix, short), few_lookup, settings)
    assert fit.converged, fit.reason
    assert fit.final["detz_shift_mm"] == pytest.approx(0.3, abs=0.03)
    assert fit.distance_mm == pytest.approx(LY99_DETECTOR.distance_mm, abs=0.03)
    assert fit.rmsd_px < 0.1 < fit.rmsd_px_start


@pytest.mark.parametrize("draw", ["gaussian", "nanobragg"])
def test_eta_refinement_separates_the_spread_from_n_for_either_draw(amplitude_table, few_lookup, draw):
    """A crystal of 200 domains of RMS angle 0.1 degrees, drawn as the simulator's gaussian or
    nanoBragg's model draws them, refined with the analytic eta of the same draw (the default
    eta_model; stage1.mosaic_model names the draw) from eta 0.03 and a start 0.05 degrees off.

    Spots of a few thousand photons, like LY99's annulus. Measured over seeds 1-3: eta within 0.014
    degrees of the drawn domains' RMS angle (gaussian; within 0.009 for nanoBragg's) and every N
    within 5 % of 57 but one at 11 %; seed 2 is tested. Refining a nanoBragg draw with the gaussian
    draw's nodes puts eta 20-130 % high instead.
    """
    spread = 0.1 if draw == "gaussian" else 0.1 / xtal.NANOBRAGG_RMS_FRACTION
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=2,
                                     n_rois=12, spread_deg=spread, n_domains=200, total_photons=1e10,
                                     mosaic_model=draw)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"],
                                           "initial": {"eta_deg": 0.03}, "mosaic_model": draw})
    assert settings.analytic_mosaic and settings.n_domains == 1
    start = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed=2, rotation_deg=0.05,
                                                        cell_fraction=0.001))
    fit = refine_shot(start, few_lookup, settings)
    assert fit.converged, fit.reason
    assert np.all(np.isfinite(final_values(fit)))
    assert_inside_bounds(fit, settings)
    truth = synthetic.true_spread_deg
    assert truth == pytest.approx(0.1, rel=0.05)
    assert abs(fit.final["eta_deg"] - truth) < 0.015
    for name in ("Na", "Nb", "Nc"):
        assert fit.final[name] == pytest.approx(57, rel=0.06)
    assert fit.rmsd_px < fit.rmsd_px_start and 0.5 < fit.z_score_sigma_final < 1.5
    if draw == "nanobragg":
        other = refine_shot(start, few_lookup, dataclasses.replace(settings, mosaic_model="gaussian"))
        assert other.final["eta_deg"] - truth > 1.5 * abs(fit.final["eta_deg"] - truth)


def test_free_domains_find_the_drawn_domains_mean_orientation(amplitude_table, few_lookup):
    """A crystal of 25 domains of RMS angle 0.05 deg at LY99's flux (1e12 photons), 12 shoeboxes: the
    analytic eta cannot fit 25 sharp copies of each spot (Z-score sigma 6.1, 0.0039 deg from the
    domains' mean orientation, N 55-56), the free domains started from it can (measured: Z 0.84,
    0.00017 deg, N 57.0-57.1, their RMS angle 0.0486 against the drawn 0.0507, 361 iterations).

    The background planes keep their share of the Bragg photons here (``plane_holds_bragg`` off):
    with it taken out, this shot's free domains end 0.0021 deg from the mean (Z 0.96, RMS angle
    0.0450) from each of three starts, while seeds 2 (one start) and 3-5 (three) end 0.0001-0.0004 deg from it.
    """
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=1,
                                     n_rois=12, spread_deg=0.05, n_domains=25)
    start = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed=1))
    domain_mean = turned_by_mean(synthetic.true_matrix, synthetic.mosaic_rotations)
    eta = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"], "plane_holds_bragg": False})
    smooth = refine_shot(start, few_lookup, eta)
    free = refine_shot(start, few_lookup, dataclasses.replace(eta, free_domains=25, free_domains_starts=1))
    assert smooth.converged and free.converged, (smooth.reason, free.reason)
    assert smooth.domain_vectors_deg is None and free.domain_vectors_deg.shape == (25, 3)
    assert np.allclose(free.domain_vectors_deg.mean(axis=0), 0, atol=1e-12)
    rms = np.sqrt((free.domain_vectors_deg ** 2).sum(axis=1).mean())
    assert free.final["eta_deg"] == pytest.approx(rms, rel=1e-9)
    assert abs(rms - synthetic.true_spread_deg) < 0.005
    assert smooth.z_score_sigma_final > 4 and free.z_score_sigma_final < 1.2
    assert xtal.misorientation_deg(smooth.real_space_matrix, domain_mean) > 0.003
    assert xtal.misorientation_deg(free.real_space_matrix, domain_mean) < 0.001
    for name in ("Na", "Nb", "Nc"):
        assert free.final[name] == pytest.approx(57, rel=0.01)
    assert free.n_iterations > smooth.n_iterations and free.nll_final < smooth.nll_final
    assert_inside_bounds(free, eta)


def test_a_dark_free_domain_is_drawn_again(amplitude_table, few_lookup, monkeypatch):
    """A free domain started 1 deg off the crystal lights no spot: the refinement leaves it there
    (no gradient) unless it is drawn again about the others, which it is."""
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=3,
                                     n_rois=10, spread_deg=0.05, n_domains=6)
    start = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed=3))
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"], "free_domains": 6,
                                           "free_domains_starts": 1})
    drawn = refine.free_domain_start

    def one_far_off(shot_index, n_domains, eta_deg, start=0):
        vectors = drawn(shot_index, n_domains, eta_deg, start)
        vectors[0] = np.radians([1.0, 0.0, 0.0])
        return vectors - vectors.mean(axis=0)

    monkeypatch.setattr(refine, "free_domain_start", one_far_off)
    monkeypatch.setattr(refine, "FREE_DOMAIN_ROUNDS", 1)
    kept = refine.refine_shot(start, few_lookup, settings)
    monkeypatch.setattr(refine, "FREE_DOMAIN_ROUNDS", 3)
    redrawn = refine.refine_shot(start, few_lookup, settings)
    assert kept.converged and redrawn.converged, (kept.reason, redrawn.reason)
    # Unlit, the domain moves little: from 1 deg it ended above 0.5 deg on the earlier sessions' VM and at 0.39 deg on
    # this one (the AMD EPYC VM of 2026-12-07, with the code of 7a2d83f too): rounding, not this change.
    assert np.linalg.norm(kept.domain_vectors_deg, axis=1).max() > 0.35
    assert np.linalg.norm(redrawn.domain_vectors_deg, axis=1).max() < 0.3
    assert redrawn.nll_final < kept.nll_final


def test_free_domain_starts_keep_the_start_of_least_objective(amplitude_table, few_lookup, monkeypatch):
    """With free_domains_starts 3 the refinement runs from three draws and returns, to the bit, the fit
    of the one whose NLL plus the domains' prior is least. Here the three end within 0.04 of each other
    (the same minimum, measured 6641.017-6641.055), so this checks the choice; what several starts gain
    on a shot of many minima is measured by benchmarks/stage1_free_domain_count.py (--starts)."""
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=3,
                                     n_rois=10, spread_deg=0.05, n_domains=6)
    start = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed=3))
    eta = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"]})
    single = dataclasses.replace(eta, free_domains=6, free_domains_starts=1)
    first_eta = refine.refine_shot(start, few_lookup, eta).final["eta_deg"]
    prior_variance = np.radians(first_eta) ** 2 / 3
    seed = refine.free_domain_seed
    singles = []
    for k in range(3):  # one start each, seeded as start k of several (its redraws too)
        monkeypatch.setattr(refine, "free_domain_seed", lambda i, s, *more, k=k: seed(i, k if s == 0 else s, *more))
        singles.append(refine.refine_shot(start, few_lookup, single))
    monkeypatch.undo()
    several = refine.refine_shot(start, few_lookup, dataclasses.replace(single, free_domains_starts=3))
    objectives = [fit.nll_final + 0.5 * (np.radians(fit.domain_vectors_deg) ** 2).sum() / prior_variance
                  for fit in singles]
    assert len(set(objectives)) == 3, objectives
    best = singles[int(np.argmin(objectives))]
    assert several.converged, several.reason
    assert np.array_equal(several.domain_vectors_deg, best.domain_vectors_deg)
    assert several.final == best.final and several.nll_final == best.nll_final
    assert several.n_iterations > best.n_iterations


def test_free_domains_keep_their_sparse_terms_while_they_refine(amplitude_table, few_lookup, monkeypatch):
    """The free-domain refinement keeps its evaluations' sparse terms (SparseTermCache) while it runs
    and lets them go after: most evaluations take the kept terms, and the fit is the one found with
    terms found anew at every evaluation, to rounding carried through the iterations."""
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=3,
                                     n_rois=10, spread_deg=0.05, n_domains=6)
    start = with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, seed=3))
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"], "free_domains": 6,
                                           "free_domains_starts": 1})
    caches, problems = [], []

    class Recorded(SparseTermCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

    summary = refine.final_summary

    def summarised(problem, *args):
        problems.append((problem, problem.term_cache))
        return summary(problem, *args)

    monkeypatch.setattr(refine, "SparseTermCache", Recorded)
    monkeypatch.setattr(refine, "final_summary", summarised)
    kept = refine.refine_shot(start, few_lookup, settings)
    # Measured: 60 evaluations took kept terms, 9 found them (the dark-domain check's single domains among them).
    assert len(caches) == 1 and caches[0].reuses > 3 * caches[0].builds > 0, (caches[0].builds, caches[0].reuses)
    # Every summary (the first refinement's, then the free domains') finds the terms let go.
    assert len(problems) >= 2 and all(cache is None for _, cache in problems)
    monkeypatch.setattr(Recorded, "lookup", lambda self, *args: (False, None))
    fresh = refine.refine_shot(start, few_lookup, settings)
    assert caches[1].reuses == 0 and caches[1].builds > caches[0].builds
    assert kept.converged and fresh.converged, (kept.reason, fresh.reason)
    # Measured: both 214 iterations, 1e-12 deg apart, N and G to 3e-10, the NLL to 4e-9.
    assert xtal.misorientation_deg(kept.real_space_matrix, fresh.real_space_matrix) < 1e-8
    assert kept.nll_final == pytest.approx(fresh.nll_final, abs=1e-6)
    for name, value in fresh.final.items():
        assert kept.final[name] == pytest.approx(value, rel=1e-8, abs=1e-12), name


def test_drawing_dark_domains_again_keeps_the_lit_ones_in_place():
    """The domains enter centred, so moving a dark one moves every other unless the crystal's rotation
    follows their mean: the lit domains stay within 1e-4 deg (second order) while the mean moves 0.1."""
    matrix = (xtal.random_rotation(np.random.default_rng(2)) @ xtal.orthogonalization_matrix(
        (67.2, 60.8, 35.2, 90, 110.3, 90)).T).T
    crystal = FreeDomainCrystal(matrix, 6)
    rng = np.random.default_rng(4)
    vectors = rng.normal(0.0, np.radians(0.03), (6, 3))
    vectors[0] = np.radians([0.6, 0.0, 0.0])
    values = parameter_space(Stage1Settings.from_config({}), crystal.start_cell, 1.0).start.copy()
    values[1:4] = [0.02, -0.01, 0.03]

    def domains(vectors, values):
        crystal.vectors = torch.as_tensor(vectors)
        return crystal.domain_matrices(torch.as_tensor(values)).numpy()

    before = domains(vectors, values)
    dark = np.array([True, False, False, False, False, False])
    new_vectors, new_values = refine.redraw_dark_domains(vectors, values, dark, rng, np.radians(0.03))
    after = domains(new_vectors, new_values)
    assert np.linalg.norm(np.degrees(new_vectors[0] - new_vectors[1:].mean(axis=0))) < 0.15
    assert np.array_equal(new_vectors[1:], vectors[1:])
    assert max(xtal.misorientation_deg(a, b) for a, b in zip(after[1:], before[1:])) < 1e-4
    unfollowed = domains(new_vectors, values)
    assert min(xtal.misorientation_deg(a, b) for a, b in zip(unfollowed[1:], before[1:])) > 0.08


def test_parameters_stop_at_their_bounds(quick_shot, few_lookup):
    """N may not go below 65 (truth 57) and the cell not move 0.05 % from a start 0.1 % off."""
    start = perturbed_matrix(quick_shot.true_matrix, seed=4, rotation_deg=0.02, cell_fraction=0.001)
    settings = Stage1Settings.from_config({"bounds": {"ncells": [65, 1600], "cell_fraction": 0.0005}})
    fit = refine_shot(with_start(quick_shot.shot, start), few_lookup, settings)
    assert fit.converged, fit.reason
    assert_inside_bounds(fit, settings)
    assert min(fit.final["Na"], fit.final["Nb"], fit.final["Nc"]) == 65.0
    start_cell = np.array(c2_cell(start))
    refined_cell = np.array([fit.final[name] for name in ("a", "b", "c", "beta_deg")])
    assert np.max(np.abs(refined_cell / start_cell - 1)) == pytest.approx(0.0005, rel=1e-9)


def test_a_start_whose_spots_are_4_px_off_keeps_them(quick_shot, few_lookup):
    """From this start (0.05 degrees and 0.3 % off) the spots lie about 4 px from their data: the
    start's least-squares G is in the millions and the first line search sends G to 0. Without the
    broad-spot restart the shot is lost; with it (the default) the refinement starts again with broad
    spots and converges on the truth."""
    start = with_start(quick_shot.shot, perturbed_matrix(quick_shot.true_matrix, seed=2, rotation_deg=0.05,
                                                         cell_fraction=0.003))
    lost = refine_shot(start, few_lookup, Stage1Settings.from_config({"broad_start_ncells": None}))
    assert 3.5 < lost.rmsd_px_start < 5
    # G ends at its bound 0, or within rounding of it (4.5e-13 on one CPU, against a start G in the millions).
    assert not lost.converged and lost.final["G"] < 1e-6
    assert lost.reason == "the refined model predicts no Bragg photons in the shoeboxes"

    settings = Stage1Settings.from_config({})
    assert settings.broad_start_ncells == 20
    fit = refine_shot(start, few_lookup, settings)
    assert fit.converged, fit.reason
    assert fit.start == lost.start and fit.n_evaluations > lost.n_evaluations
    assert fit.rmsd_px_start == pytest.approx(lost.rmsd_px_start) and fit.rmsd_px < 0.05
    assert xtal.misorientation_deg(fit.real_space_matrix, quick_shot.true_matrix) < 0.002
    assert fit.final["G"] == pytest.approx(quick_shot.true_G, rel=0.02)
    for name in ("Na", "Nb", "Nc"):
        assert abs(fit.final[name] - 57) < 2
    assert_inside_bounds(fit, settings)


def test_a_shot_lost_with_g_inside_its_bounds_restarts_with_broad_spots(quick_shot, few_lookup):
    """From this start (0.08 degrees and 0.5 % off, spots about 4 px from their data) the first line
    search moves every spot out of its shoebox while G stays inside its bounds (70, from 105), so
    no gradient is left and L-BFGS-B stops. G at a bound is not the sign here: the model with no
    Bragg photons is, and it restarts the shot with broad spots too (validation shot 66 was lost so)."""
    start = with_start(quick_shot.shot, perturbed_matrix(quick_shot.true_matrix, seed=1, rotation_deg=0.08,
                                                         cell_fraction=0.005))
    lost = refine_shot(start, few_lookup, Stage1Settings.from_config({"broad_start_ncells": None}))
    assert lost.reason == "the refined model predicts no Bragg photons in the shoeboxes"
    assert 1 < lost.final["G"] < lost.start["G"] < 1e12
    assert 3.5 < lost.rmsd_px_start < 5

    settings = Stage1Settings.from_config({})
    fit = refine_shot(start, few_lookup, settings)
    assert fit.converged, fit.reason
    assert fit.start == lost.start and fit.n_evaluations > lost.n_evaluations
    assert fit.rmsd_px < 0.05
    assert xtal.misorientation_deg(fit.real_space_matrix, quick_shot.true_matrix) < 0.002
    assert fit.final["G"] == pytest.approx(quick_shot.true_G, rel=0.02)
    assert_inside_bounds(fit, settings)


def test_broad_start_always_refines_from_both_starts_and_keeps_the_lower_nll(quick_shot, few_lookup):
    """With ``broad_start: always`` a shot that kept its spots is refined again from the broad-spot
    start (N 20) and the end of lower NLL is kept, with the evaluations of both. On this shot, whose
    likelihood has one minimum, both ends are the truth; the validation shot that needed it (nopsf 66,
    25 mosaic domains) is in the README."""
    start = with_start(quick_shot.shot, perturbed_matrix(quick_shot.true_matrix, seed=3, rotation_deg=0.05,
                                                         cell_fraction=0.001))
    settings = Stage1Settings.from_config({"broad_start": "always"})
    plain = refine_shot(start, few_lookup, Stage1Settings.from_config({}))
    both = refine_shot(start, few_lookup, settings)
    problem = ShotProblem(start, settings, "cpu")
    problem.set_start_from_model(few_lookup)
    broad = refine.restart_with_broad_spots(problem, refine.shot_evaluator(problem, few_lookup),
                                            refine.Minimization(problem.start_values, 0, 0, False, ""))
    broad_final = refine.final_summary(problem, few_lookup, broad, refine.all_pixels(problem))
    assert plain.converged and both.converged and broad.converged
    assert both.n_evaluations == plain.n_evaluations + broad.n_evaluations
    assert both.nll_final == min(plain.nll_final, broad_final.nll)
    assert both.nll_final == pytest.approx(plain.nll_final, abs=1e-3)
    assert xtal.misorientation_deg(both.real_space_matrix, quick_shot.true_matrix) < 0.002


def test_better_start_keeps_the_lower_nll_of_a_usable_end(quick_shot, few_lookup):
    """``better_start`` takes the broad-spot end only when its NLL is lower and finite and it kept
    the shot (spots in their shoeboxes, G inside its bounds); either way the counts are both ends'."""
    settings = Stage1Settings.from_config({"broad_start": "always"})
    problem = ShotProblem(quick_shot.shot, settings, "cpu")
    problem.set_start_from_model(few_lookup)
    values = np.asarray(problem.start_values, dtype=np.float64)
    centroids = np.zeros((quick_shot.shot.n_rois, 2))

    def end(nll, g=None, lost=False, iterations=30, evaluations=50):
        chosen = values.copy()
        if g is not None:
            chosen[PARAMETER_NAMES.index("G")] = g
        summary = refine.ModelSummary(nll, 1.0, np.full_like(centroids, np.nan) if lost else centroids,
                                      0.0, 0.0, 0.0, 0.0, np.eye(3), 100.0)
        return refine.Minimization(chosen, iterations, evaluations, True, "", restarted=True), summary

    first = end(100.0, iterations=10, evaluations=20)
    first = (dataclasses.replace(first[0], restarted=False), first[1])
    assert refine.should_try_broad(problem, first[0])
    assert not refine.should_try_broad(problem, dataclasses.replace(first[0], restarted=True))
    assert not refine.should_try_broad(ShotProblem(quick_shot.shot, Stage1Settings.from_config({}), "cpu"), first[0])
    lower = end(90.0)
    assert refine.better_start(problem, first, lower) == lower
    for other in (end(110.0), end(80.0, lost=True), end(float("nan")), end(70.0, g=0.0)):
        kept, summary = refine.better_start(problem, first, other)
        assert summary is first[1]
        assert np.array_equal(kept.values, first[0].values)
        assert (kept.n_iterations, kept.n_evaluations, kept.restarted) == (30, 50, True)


def test_a_start_too_far_off_is_reported_not_converged(quick_shot, few_lookup):
    """A start 1 degree off: every spot is out of its shoebox even with broad spots, G runs to 0
    (from the start and again from the restart), where every other gradient vanishes and L-BFGS-B
    stops "converged"."""
    start = perturbed_matrix(quick_shot.true_matrix, seed=4, rotation_deg=1.0, cell_fraction=0.0)
    fit = refine_shot(with_start(quick_shot.shot, start), few_lookup, Stage1Settings.from_config({}))
    assert fit.rmsd_px_start > 5
    assert not fit.converged
    assert fit.reason == "the refined model predicts no Bragg photons in the shoeboxes"


def test_g_at_its_upper_bound_is_reported_not_converged(quick_shot, few_lookup):
    """Without the broad-spot restart, this start's spots (0.4 % off, about 6.6 px) leave the
    shoeboxes and the least-squares G runs to its upper bound, where L-BFGS-B stops. (With the
    planes' share of the Bragg photons taken out in the last pass, that pass moves on from the bound
    and loses the spots: the planes keep their share here, for the bound's report.)"""
    start = perturbed_matrix(quick_shot.true_matrix, seed=4, rotation_deg=0.02, cell_fraction=0.004)
    fit = refine_shot(with_start(quick_shot.shot, start), few_lookup,
                      Stage1Settings.from_config({"broad_start_ncells": None, "plane_holds_bragg": False}))
    assert fit.final["G"] > 0.999e12
    assert not fit.converged
    assert fit.reason.startswith("G ended at its bound (1e+12)")


def test_the_planes_share_waits_for_the_last_pass(quick_shot, few_lookup):
    """The start 6.6 px off above, with the broad-spot restart and the planes' share of the Bragg
    photons taken out: placed without the share, then refined with it, the shot converges on the
    truth. Taken out in every pass, it was lost even from the broad spots (G 0). (Without a point
    spread the share is taken out only when asked; with one, by default.)"""
    start = perturbed_matrix(quick_shot.true_matrix, seed=4, rotation_deg=0.02, cell_fraction=0.004)
    assert Stage1Settings.from_config({}).plane_holds_bragg is None
    assert ShotProblem(quick_shot.shot, Stage1Settings.from_config({}), "cpu").plane_share is None
    settings = Stage1Settings.from_config({"plane_holds_bragg": True})
    problem = ShotProblem(quick_shot.shot, settings, "cpu")
    assert problem.plane_share is not None and problem.plane_share_on
    fit = refine_shot(with_start(quick_shot.shot, start), few_lookup, settings)
    assert fit.converged, fit.reason
    assert xtal.misorientation_deg(fit.real_space_matrix, quick_shot.true_matrix) < 0.002
    assert fit.final["G"] == pytest.approx(quick_shot.true_G, rel=0.02)


def test_restraints_pull_towards_the_start(quick_shot, few_lookup):
    free = Stage1Settings.from_config({})
    restrained = Stage1Settings.from_config({"restraints": {"ncells": 0.01}})
    free_fit = refine_shot(quick_shot.shot, few_lookup, free)
    restrained_fit = refine_shot(quick_shot.shot, few_lookup, restrained)
    assert free_fit.converged and restrained_fit.converged
    for name in ("Na", "Nb", "Nc"):
        assert abs(free_fit.final[name] - 57) < 2
        assert abs(restrained_fit.final[name] - 72) < abs(free_fit.final[name] - 72) / 4


@pytest.mark.parametrize("change, settings_section, reason", [
    ({"data_photons": "zeros", "background_photons": "zeros"}, {},
     "no Bragg signal in the shoeboxes: the least-squares start G is 0"),
    ({"data_photons": "nan"}, {}, "1 trusted pixel(s) hold non-finite data_photons"),
    ({"trusted": "none"}, {}, "no trusted shoebox pixels"),
    ({"photons": "zeros"}, {}, "the shot's spectrum has no photons"),
    ({"real_space_matrix": "triclinic"}, {}, "start cell is not monoclinic"),
    ({"pixel_roi": "beyond"}, {}, "pixel ROI numbers fall outside the 10 ROIs"),
    ({"photons": "shorter"}, {}, "pixel arrays, or channel energies and photons, differ in length"),
    ({}, {"max_iterations": 1}, "L-BFGS-B did not converge: STOP: TOTAL NO. of ITERATIONS REACHED LIMIT"),
])
def test_failures_are_reported_not_raised(quick_shot, few_lookup, change, settings_section, reason):
    shot = quick_shot.shot
    replacements = {}
    for field, kind in change.items():
        values = np.array(getattr(shot, field), dtype=np.float64, copy=True)
        if kind == "zeros":
            values[:] = 0
        elif kind == "nan":
            values[5] = np.nan
        elif kind == "none":
            values = np.zeros(shot.n_pixels, dtype=bool)
        elif kind == "beyond":
            values = values.astype(int)
            values[-1] = shot.n_rois
        elif kind == "shorter":
            values = values[:-1]
        elif kind == "triclinic":
            values = xtal.orthogonalization_matrix((67.2, 59.8, 47.2, 90.0, 110.3, 92.0))
        replacements[field] = values
    settings = Stage1Settings.from_config(settings_section)
    fit = refine_shot(dataclasses.replace(shot, **replacements), few_lookup, settings)
    assert not fit.converged
    assert fit.reason.startswith(reason)
    assert fit.shot_index == shot.shot_index and fit.identifier == shot.identifier
    assert fit.final.keys() == fit.start.keys() == set(PARAMETER_NAMES)
    if settings_section:
        assert fit.n_iterations == 2  # one per refinement pass
        assert np.all(np.isfinite(final_values(fit)))
        assert_inside_bounds(fit, settings)


def test_an_amplitude_table_for_other_channels_is_refused(quick_shot, full_lookup):
    fit = refine_shot(quick_shot.shot, full_lookup, Stage1Settings.from_config({}))
    assert not fit.converged
    assert fit.reason == "the amplitude table has 100 channel rows for the shot's 10 channels"


def test_an_exception_inside_is_reported(quick_shot, few_lookup, monkeypatch):
    calls = []

    def failing_model(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return bragg_photons_pixels(*args, **kwargs)

    monkeypatch.setattr(likelihood, "bragg_photons_pixels", failing_model)
    fit = refine_shot(quick_shot.shot, few_lookup, Stage1Settings.from_config({}))
    assert not fit.converged
    assert fit.reason == "RuntimeError: CUDA out of memory."
    assert np.isfinite(fit.rmsd_px_start) and np.isfinite(fit.nll_start)


def test_strong_spot_rmsds_are_taken_over_the_strong_rois_only(quick_shot, few_lookup):
    strong = np.arange(quick_shot.shot.n_rois) % 3 == 0
    observed = quick_shot.shot.observed_centroid_px
    dials_predicted = observed + np.array([0.3, -0.2])
    shot = dataclasses.replace(quick_shot.shot, strong=strong, dials_predicted_px=dials_predicted)
    fit = refine_shot(shot, few_lookup, Stage1Settings.from_config({}))
    assert fit.converged, fit.reason
    assert fit.n_strong_rois == strong.sum() < fit.n_rois
    beam_centre = np.asarray(LY99_DETECTOR.beam_center_mm) / LY99_DETECTOR.pixel_size_mm
    assert fit.dials_strong_radial_rmsd_px == pytest.approx(
        centroid_rmsd(dials_predicted[strong], observed[strong], beam_centre)[1])
    assert fit.dials_strong_radial_rmsd_px > 0.01
    observed = observed[strong]
    for predicted, overall, radial in ((fit.model_centroid_px_start, fit.strong_rmsd_px_start,
                                        fit.strong_radial_rmsd_px_start),
                                       (fit.model_centroid_px, fit.strong_rmsd_px, fit.strong_radial_rmsd_px)):
        assert (overall, radial) == pytest.approx(centroid_rmsd(predicted[strong], observed, beam_centre))
    assert fit.strong_radial_rmsd_px != pytest.approx(fit.radial_rmsd_px)


def test_centroids_and_radial_rmsd():
    bragg = np.array([1.0, 3.0, 0.0, 0.0, 2.0, 2.0])
    fast = np.array([10, 11, 50, 51, 20, 20])
    slow = np.array([5, 5, 9, 9, 30, 31])
    roi = np.array([0, 0, 1, 1, 2, 2])
    centroids = model_centroids(bragg, fast, slow, roi, 3)
    assert np.allclose(centroids[0], (11.25, 5.5)) and np.all(np.isnan(centroids[1]))
    assert np.allclose(centroids[2], (20.5, 31.0))
    observed = np.array([[11.25, 4.5], [50.0, 9.0], [20.5, 31.0]])
    beam_centre = np.array([11.25, 0.0])  # straight "above" ROI 0: its 1 px error is radial
    overall, radial = centroid_rmsd(centroids, observed, beam_centre)
    assert overall == pytest.approx(np.sqrt(1 / 2))
    assert radial == pytest.approx(np.sqrt(1 / 2))
    beam_centre = np.array([0.0, 4.5])  # to the side: the same error is tangential
    assert centroid_rmsd(centroids, observed, beam_centre)[1] == pytest.approx(0.0, abs=1e-12)


def test_free_domains_cached_terms_come_in_chunks_of_pairs_or_of_terms(amplitude_table, few_lookup,
                                                                       pair_channel_loop, monkeypatch):
    """The free domains' cached sparse model (likelihood.bragg_photons) takes a shot's pixels in chunks:
    of SPARSE_PAIRS_PER_CALL (pixel, domain) pairs where the compiled loop evaluates them (its memory
    goes with the pairs), else of SPARSE_TERMS_PER_CALL (pixel, channel, domain) terms, each chunk
    keeping its own terms. The photons and their gradients do not depend on the chunks (to rounding)."""
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=3,
                                     n_rois=10, spread_deg=0.05, n_domains=6)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"], "free_domains": 6})
    problem = ShotProblem(synthetic.shot, settings, "cpu")
    problem.set_start_from_model(few_lookup)
    crystal = FreeDomainCrystal(problem.crystal.start_matrix, 6)
    problem.crystal = crystal
    n_pixels = problem.tensors.trusted.numel()
    n_channels = len(FEW_CHANNELS)
    assert n_pixels == 1440

    def evaluated(pairs_per_call: int, terms_per_call: int):
        monkeypatch.setattr(likelihood, "SPARSE_PAIRS_PER_CALL", pairs_per_call)
        monkeypatch.setattr(likelihood, "SPARSE_TERMS_PER_CALL", terms_per_call)
        problem.term_cache = SparseTermCache()
        values = torch.tensor(problem.start_values, requires_grad=True)
        crystal.vectors = torch.tensor(np.radians(0.03) * np.random.default_rng(5).normal(size=(6, 3)),
                                       requires_grad=True)
        photons = problem.bragg(values, few_lookup)
        (photons ** 2).sum().backward()
        return photons.detach(), values.grad, crystal.vectors.grad, problem.term_cache.builds

    default_pairs, default_terms = likelihood.SPARSE_PAIRS_PER_CALL, likelihood.SPARSE_TERMS_PER_CALL
    whole, *whole_gradients, whole_builds = evaluated(default_pairs, default_terms)
    # 100 pixels per chunk counted either way: the loop in use decides which count applies.
    by_pairs, *pair_gradients, pair_builds = evaluated(6 * 100, default_terms)
    by_terms, *term_gradients, term_builds = evaluated(default_pairs, 6 * n_channels * 100)
    compiled = pair_channel_loop == "compiled"
    assert whole_builds == (1 if compiled else -(-n_pixels // (default_terms // (6 * n_channels))))
    assert pair_builds == (15 if compiled else whole_builds)
    assert term_builds == (1 if compiled else 15)
    assert float(whole.max()) > 1.0
    for photons, gradients in ((by_pairs, pair_gradients), (by_terms, term_gradients)):
        assert float((photons - whole).abs().max() / whole.max()) < 1e-12
        for got, expected in zip(gradients, whole_gradients):
            assert float((got - expected).abs().max() / expected.abs().max()) < 1e-12
