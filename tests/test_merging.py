"""Units of the merge (xfel_spread.merging) on small arrays with known answers.

Indices and Friedel mates, the rs post-refinement (recovery of known G, B, RS and rotations), the
filters, the ev11 error model, weighted means, statistics, polarization, the reference and the MPI
helpers on one rank. End-to-end runs on files are in test_merging_cli.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from xfel_spread.merging import filters, postrefine
from xfel_spread.merging.error_model import ErrorModel, deviations, fit_ev11, group_means
from xfel_spread.merging.indices import (IndexRangeError, as_flex_miller_index, d_star_sq, map_to_asu, pack_hkl,
                                         unpack_keys)
from xfel_spread.merging.merge import group_numbers, lattice_half, merge_observations, weighted_means
from xfel_spread.merging.polarization import polarization_factor
from xfel_spread.merging.reference import ModelError, check_model_matches_data, model_reference
from xfel_spread.merging.statistics import merging_statistics, pearson, resolution_bins

from conftest import SHARED_DATA_DIR

MODEL = SHARED_DATA_DIR / "1m2a.pdb"
CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)


def c2_group():
    from cctbx import sgtbx

    return sgtbx.space_group_info("C 1 2 1").group()


def random_c2_indices(rng, n, limit=20):
    hkl = rng.integers(-limit, limit + 1, size=(n, 3))
    hkl[:, 1] -= (hkl[:, 0] + hkl[:, 1]) % 2  # C centring: h + k even
    return hkl[np.any(hkl != 0, axis=1)]


# --- indices ------------------------------------------------------------------------------------

def test_keys_round_trip_and_sort_like_indices():
    rng = np.random.default_rng(0)
    hkl = rng.integers(-300, 300, size=(1000, 3))
    keys = pack_hkl(hkl)
    assert np.array_equal(unpack_keys(keys), hkl)
    assert np.array_equal(np.argsort(keys, kind="stable"), np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0])))
    with pytest.raises(IndexRangeError):
        pack_hkl([[40000, 0, 0]])


def test_friedel_mates_map_to_one_key_with_opposite_flags():
    from cctbx import crystal, miller

    rng = np.random.default_rng(1)
    hkl = random_c2_indices(rng, 500)
    key, is_minus = map_to_asu(hkl, c2_group())
    mate_key, mate_is_minus = map_to_asu(-hkl, c2_group())
    assert np.array_equal(key, mate_key)
    centric = miller.set(crystal.symmetry(CELL, "C 1 2 1"), as_flex_miller_index(unpack_keys(key)),
                         anomalous_flag=False).centric_flags().data().as_numpy_array()
    assert centric.any() and (~centric).any()
    # Acentric: h and -h are the two mates; centric: both are I(+) (cctbx's anomalous asymmetric unit).
    assert np.all(is_minus[~centric] != mate_is_minus[~centric])
    assert not np.any(is_minus[centric] | mate_is_minus[centric])
    # A symmetry mate (the 2-fold along b) is the same index and the same mate.
    twofold = hkl * [-1, 1, -1]
    assert np.array_equal(map_to_asu(twofold, c2_group())[0], key)
    assert np.array_equal(map_to_asu(twofold, c2_group())[1], is_minus)


def test_d_star_sq_matches_cctbx():
    from cctbx import uctbx

    hkl = random_c2_indices(np.random.default_rng(2), 50)
    expected = uctbx.unit_cell(CELL).d_star_sq(as_flex_miller_index(hkl)).as_numpy_array()
    assert np.allclose(d_star_sq(hkl, CELL), expected, rtol=1e-12)


# --- post-refinement ----------------------------------------------------------------------------

def rotation_xy(theta_x, theta_y):
    cx, sx, cy, sy = np.cos(theta_x), np.sin(theta_x), np.cos(theta_y), np.sin(theta_y)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx


def synthetic_problem(rng, n_lattices, truth, noise=0.0, d_min=2.0, wavelength=1.74):
    """Lattices observed under the rs model with parameters ``truth`` ((n, 5)); A recorded unrotated."""
    from cctbx import uctbx

    orthogonalization = np.array(uctbx.unit_cell(CELL).orthogonalization_matrix()).reshape(3, 3)
    candidates = random_c2_indices(rng, 60000, limit=35)
    candidates = candidates[d_star_sq(candidates, CELL) <= 1 / d_min ** 2]
    s0 = np.array([0.0, 0.0, -1.0 / wavelength])
    lattice, hkl, a_matrices = [], [], []
    for number in range(n_lattices):
        u = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        a_recorded = u @ np.linalg.inv(orthogonalization).T  # columns a*, b*, c*
        a_true = rotation_xy(truth[number, 3], truth[number, 4]) @ a_recorded
        rh = np.linalg.norm(candidates @ a_true.T + s0, axis=1) - 1 / wavelength
        chosen = candidates[np.abs(rh) < 2 * truth[number, 2]]
        lattice.append(np.full(len(chosen), number))
        hkl.append(chosen)
        a_matrices.append(a_recorded)
    lattice, hkl = np.concatenate(lattice), np.concatenate(hkl)
    reference = rng.exponential(1e4, len(lattice))
    d = 1 / np.sqrt(d_star_sq(hkl, CELL))
    a_matrices = np.array(a_matrices)
    beams = np.tile(s0, (n_lattices, 1))
    exact = postrefine.ScalingProblem.build(lattice, a_matrices, beams, hkl, d, reference, np.zeros(len(lattice)))
    # The truth rotates the recorded orientation: evaluate the model there.
    observed, _ = postrefine.rs_scale_factors(exact, truth)
    observed *= reference
    observed *= 1 + noise * rng.standard_normal(len(observed))
    return postrefine.ScalingProblem.build(lattice, a_matrices, beams, hkl, d, reference, observed)


def test_rs_jacobian_matches_finite_differences():
    rng = np.random.default_rng(3)
    truth = np.array([[0.5, 1.0, 1e-3, 1e-3, -2e-3]] * 3)
    problem = synthetic_problem(rng, 3, truth)
    at = truth * [1.1, 0.5, 1.3, 0.3, 0.7]
    residuals, jacobian = postrefine._residuals_and_jacobian(problem, at)
    for column, step in enumerate((1e-6, 1e-6, 1e-9, 1e-8, 1e-8)):
        moved = at.copy()
        moved[:, column] += step
        numeric = (postrefine._residuals_and_jacobian(problem, moved)[0] - residuals) / step
        assert np.allclose(numeric, jacobian[column], rtol=1e-3, atol=1e-4 * np.abs(jacobian[column]).max())


def test_rs_refinement_recovers_scale_b_spot_radius_and_rotations():
    rng = np.random.default_rng(4)
    n = 12
    truth = np.column_stack([rng.lognormal(0, 0.5, n), rng.normal(0, 1.5, n), rng.uniform(8e-4, 1.5e-3, n),
                             rng.normal(0, 5e-4, n), rng.normal(0, 5e-4, n)])
    problem = synthetic_problem(rng, n, truth)
    fitted = postrefine.refine_rs(problem, postrefine.initial_parameters(problem, n))
    assert np.allclose(fitted[:, 0], truth[:, 0], rtol=1e-3)
    assert np.allclose(fitted[:, 1], truth[:, 1], atol=1e-3)
    assert np.allclose(fitted[:, 2], truth[:, 2], rtol=1e-3)
    assert np.allclose(fitted[:, 3:], truth[:, 3:], atol=2e-6)
    factor, partiality = postrefine.rs_scale_factors(problem, fitted)
    assert np.allclose(problem.observed / factor, problem.reference, rtol=1e-4)
    assert not np.any(postrefine.rs_failures(fitted, problem.lattice, partiality) != "")


def test_rs_refinement_with_noise_and_batch_independence():
    rng = np.random.default_rng(5)
    n = 10
    truth = np.column_stack([rng.lognormal(0, 0.5, n), rng.normal(0, 1.0, n), np.full(n, 1e-3),
                             np.zeros(n), np.zeros(n)])
    problem = synthetic_problem(rng, n, truth, noise=0.05)
    fitted = postrefine.refine_rs(problem, postrefine.initial_parameters(problem, n))
    assert np.allclose(fitted[:, 0], truth[:, 0], rtol=0.1)
    assert np.allclose(fitted[:, 1], truth[:, 1], atol=0.5)
    # A lattice's fit does not depend on the other lattices in the batch: bit for bit.
    alone = problem.select_lattices(np.array([3]), n)
    single = postrefine.refine_rs(alone, postrefine.initial_parameters(alone, 1))
    assert np.array_equal(single[0], fitted[3])


def test_rs_failures_and_parameter_outliers():
    parameters = np.array([[1.0, 0.0, 1e-3, 0, 0], [-1.0, 0.0, 1e-3, 0, 0], [1.0, 200.0, 1e-3, 0, 0],
                           [np.nan, 0.0, 1e-3, 0, 0], [1.0, 0.0, 1e-3, 0, 0]])
    lattice = np.repeat(np.arange(5), 4)
    partiality = np.full(20, 0.9)
    partiality[16:] = 0.1  # the last lattice has no near-full observation
    assert list(postrefine.rs_failures(parameters, lattice, partiality)) == [
        "", postrefine.NON_POSITIVE_SCALE, postrefine.B_OUT_OF_RANGE, postrefine.DIVERGED, postrefine.FEW_NEAR_FULL]

    rng = np.random.default_rng(6)
    population = np.column_stack([np.ones(200), rng.normal(0, 1, 200), np.full(200, 1e-3),
                                  rng.normal(0, 1e-4, 200), rng.normal(0, 1e-4, 200)])
    population[7, 1] = 30.0
    population[9, 4] = 5e-3
    reasons = postrefine.parameter_outliers(population)
    assert reasons[7] == postrefine.B_OUTLIER and reasons[9] == postrefine.ROTATION_OUTLIER
    assert np.count_nonzero(reasons != "") <= 4
    # Too few lattices to know the population's spread: none is called an outlier.
    few = population[:postrefine.MIN_OUTLIER_POPULATION - 1]
    assert np.all(postrefine.parameter_outliers(few) == "")


def test_scale_only_is_the_inverse_of_upstreams_slope():
    lattice = np.array([0, 0, 0, 1, 1, 1])
    reference = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    observed = np.r_[0.5 * reference[:3], -reference[3:]]
    scale = postrefine.scale_only(lattice, observed, reference, 2)
    assert scale[0] == pytest.approx(0.5)
    assert np.isnan(scale[1])


# --- filters ------------------------------------------------------------------------------------

class SphericalCluster:
    """A cell cluster whose Mahalanobis distance is the Euclidean distance of a, b, c in units of sigma."""

    def __init__(self, mean, sigma):
        self.mean, self.sigma = np.asarray(mean), sigma

    def mahalanobis(self, cells):
        return np.linalg.norm((np.asarray(cells)[:, :3] - self.mean[:3]) / self.sigma, axis=1)


def test_cell_and_space_group_filters():
    cells = np.array([CELL, np.array(CELL) * [1.001, 1, 1, 1, 1, 1], np.array(CELL) * [1.01, 1, 1, 1, 1, 1]])
    keep, distance = filters.cell_filter(cells, SphericalCluster(CELL, 0.1), 4.0)
    assert list(keep) == [True, True, False]
    assert distance[2] == pytest.approx(6.72)
    assert list(filters.space_group_filter(["-C 2y", "-P 1", "-C 2y"], c2_group())) == [True, False, True]


def test_significance_filter_cuts_at_the_first_weak_bin():
    n_lattices = 3
    lattice = np.repeat(np.arange(n_lattices), 120)
    d_star_sq_values = np.tile(np.linspace(0.01, 0.25, 120), n_lattices)
    i_over_sigma = np.full(360, 5.0)
    # Lattice 1: the outer third is noise around -2 (its bins fail); lattice 2: everything fails.
    i_over_sigma[120 + 80:240] = -2.0
    i_over_sigma[240:] = -2.0
    keep = filters.significance_filter(lattice, d_star_sq_values, i_over_sigma, n_lattices, sigma=0.5)
    assert keep[:120].all()
    # Lattice 1 keeps its strong part, and of the noise only what shares the last accepted bin.
    noise_kept = keep[200:240]
    assert keep[120:200].all() and noise_kept.sum() < 5 and np.all(np.diff(noise_kept.astype(int)) <= 0)
    assert not keep[240:].any()
    assert list(filters.significance_bin_counts(np.array([5, 50, 120, 1000]))) == [1, 5, 12, 20]
    # LY99's cutoff -0.5 still drops bins averaging -2.
    keep_ly99 = filters.significance_filter(lattice, d_star_sq_values, i_over_sigma, n_lattices, sigma=-0.5)
    assert np.array_equal(keep_ly99, keep)


def test_equal_volume_bins_match_cctbx_binning():
    from cctbx import miller, crystal

    hkl = random_c2_indices(np.random.default_rng(7), 400, limit=25)
    values = d_star_sq(hkl, CELL)
    miller_set = miller.set(crystal.symmetry(CELL, "C 1 2 1"), as_flex_miller_index(hkl), anomalous_flag=True)
    miller_set.setup_binner(n_bins=7)
    expected = np.array(miller_set.binner().bin_indices()) - 1
    n = len(values)
    ours = filters.equal_volume_bins(values, np.full(n, values.min()), np.full(n, values.max()), np.full(n, 7))
    assert np.array_equal(ours, expected)


def test_reference_correlation_is_pearson_per_lattice():
    rng = np.random.default_rng(8)
    lattice = np.repeat([0, 1, 2], [30, 40, 1])
    reference = rng.exponential(1.0, 71)
    observed = reference + rng.normal(0, 0.5, 71)
    cc, n = filters.reference_correlation(lattice, observed, reference, 3)
    assert cc[0] == pytest.approx(np.corrcoef(observed[:30], reference[:30])[0, 1])
    assert cc[1] == pytest.approx(np.corrcoef(observed[30:70], reference[30:70])[0, 1])
    assert np.isnan(cc[2]) and list(n) == [30, 40, 1]


# --- error model --------------------------------------------------------------------------------

def test_deviations_leave_one_out():
    group = np.array([0, 0, 0, 1, 1])
    intensity = np.array([1.0, 2.0, 6.0, 3.0, 5.0])
    work, delta = deviations(group, intensity, 2, minimum_multiplicity=2)
    assert list(work) == [True, True, True, False, False]
    assert delta[2] == pytest.approx(np.sqrt(2 / 3) * (6.0 - 1.5))
    mean, count = group_means(group, intensity, 2)
    assert list(mean) == [3.0, 4.0] and list(count) == [3, 2]


def simulated_deviations(rng, error_factor, n_groups=4000, multiplicity=6):
    """ev11 inputs from observations whose true errors are ``error_factor`` times the reported ones."""
    truth = rng.exponential(1000.0, n_groups)
    group = np.repeat(np.arange(n_groups), multiplicity)
    sigma = np.sqrt(50.0 + truth[group])  # reported
    intensity = truth[group] + error_factor * sigma * rng.standard_normal(len(group))
    work, delta = deviations(group, intensity, n_groups, minimum_multiplicity=2)
    mean, _ = group_means(group, intensity, n_groups)
    return delta[work] ** 2, sigma[work] ** 2, mean[group][work]


def test_error_model_is_identity_on_correct_sigmas_and_finds_a_factor():
    rng = np.random.default_rng(9)
    model = fit_ev11(*simulated_deviations(rng, 1.0))
    assert model.sdfac == pytest.approx(1.0, abs=0.03)
    assert model.sdb == 0.0 and model.sdadd < 0.01
    inflated = fit_ev11(*simulated_deviations(rng, 2.0))
    assert inflated.sdfac == pytest.approx(2.0, rel=0.03) and inflated.sdadd < 0.01
    assert fit_ev11(np.ones(5), np.ones(5), np.ones(5)).note.startswith("not refined")
    assert ErrorModel(2.0, 1.0, 0.1).variance(np.array([4.0]), np.array([-10.0]))[0] == pytest.approx(
        4 * (4 + 10 + 1))


def test_error_model_recovers_a_proportional_error():
    """Errors sigma^2 + (0.1 I)^2: the fit finds sdadd 0.1 and leaves the integration sigmas as they are."""
    rng = np.random.default_rng(10)
    n_groups, multiplicity = 4000, 6
    truth = rng.exponential(1000.0, n_groups)
    group = np.repeat(np.arange(n_groups), multiplicity)
    variance = 50.0 + truth[group]
    intensity = truth[group] + np.sqrt(variance + (0.1 * truth[group]) ** 2) * rng.standard_normal(len(group))
    work, delta = deviations(group, intensity, n_groups, minimum_multiplicity=2)
    mean, _ = group_means(group, intensity, n_groups)
    model = fit_ev11(delta[work] ** 2, variance[work], mean[group][work])
    assert model.sdfac == pytest.approx(1.0, abs=0.05)
    assert model.sdadd == pytest.approx(0.1, rel=0.1)


def ev11_bins(delta_sq, variance, mean_intensity, sdadd):
    """(sqrt(n_b), r_b): bin weights and rms of delta^2 / (variance + sdadd^2 <I>^2), written out afresh."""
    low, high = mean_intensity.min(), mean_intensity.max()
    bins = np.minimum(np.floor((mean_intensity - low) / (high - low) * 100).astype(int), 99)
    n = np.bincount(bins, minlength=100)
    used = n > 0
    ratio = delta_sq / (variance + sdadd ** 2 * mean_intensity ** 2)
    return np.sqrt(n[used]), np.sqrt(np.bincount(bins, weights=ratio, minlength=100)[used] / n[used])


def ev11_target(delta_sq, variance, mean_intensity, sdadd, sdfac=None):
    """Upstream's target sum_b sqrt(n_b) (1 - r_b / sdfac)^2 (sdb = 0); at the best sdfac if none is given."""
    weight, rms = ev11_bins(delta_sq, variance, mean_intensity, sdadd)
    if sdfac is None:
        return weight.sum() - np.sum(weight * rms) ** 2 / np.sum(weight * rms ** 2)
    return np.sum(weight * (1 - rms / sdfac) ** 2)


def test_error_model_escapes_the_local_minimum_at_zero_sdadd():
    """Three populations of deviations, each with exactly the ratio delta^2 / variance given.

    Weak indices (<I> up to 1e3) and very strong, precisely measured ones (<I> 1e6, variance 1e6) agree
    with their variances; medium ones (<I> 1e4 to 5e4) scatter 4 times more. A small sdadd first
    lowers the strong indices' ratio (the target rises: sdadd = 0 is a local minimum, where a local
    search started near zero stops); a larger one brings the medium indices into line (the target falls
    below its value at zero). The fit must find that lower minimum.
    """
    weak, medium, strong = 400, 400, 20
    mean = np.concatenate([np.linspace(0.0, 1e3, weak), np.linspace(1e4, 5e4, medium), np.full(strong, 1e6)])
    variance = np.concatenate([np.full(weak + medium, 1e4), np.full(strong, 1e6)])
    delta_sq = variance * np.concatenate([np.ones(weak), np.full(medium, 16.0), np.ones(strong)])

    at_zero = ev11_target(delta_sq, variance, mean, 0.0)
    assert at_zero < ev11_target(delta_sq, variance, mean, 1e-4) < ev11_target(delta_sq, variance, mean, 1e-3)
    scan = np.logspace(-5, 1, 3001)
    targets = np.array([ev11_target(delta_sq, variance, mean, sdadd) for sdadd in scan])
    assert targets.min() < at_zero - 2.5

    model = fit_ev11(delta_sq, variance, mean)
    assert model.sdb == 0.0 and model.note == ""
    assert model.sdadd == pytest.approx(scan[np.argmin(targets)], rel=0.01)
    assert model.target <= targets.min() + 1e-9
    # The target reported is upstream's at the parameters reported, and that sdfac is the best one.
    assert model.target == pytest.approx(ev11_target(delta_sq, variance, mean, model.sdadd, model.sdfac), rel=1e-9)
    for factor in (0.99, 1.01):
        assert ev11_target(delta_sq, variance, mean, model.sdadd, factor * model.sdfac) > model.target


# --- merging ------------------------------------------------------------------------------------

def test_weighted_means_and_friedel_separation():
    key = np.array([5, 5, 5, 5, 9])
    is_minus = np.array([False, False, True, True, False])
    half = np.array([0, 1, 0, 1, 0], dtype=np.int8)
    intensity = np.array([10.0, 14.0, 6.0, 6.0, 3.0])
    variance = np.array([1.0, 1.0, 1.0, 4.0, 1.0])
    anomalous, pairs = merge_observations(key, is_minus, half, intensity, variance)
    assert list(anomalous.key) == [5, 5, 9] and list(anomalous.is_minus) == [False, True, False]
    assert anomalous.intensity[0] == pytest.approx(12.0) and anomalous.sigma[0] == pytest.approx(np.sqrt(0.5))
    assert anomalous.intensity[1] == pytest.approx(6.0)
    assert list(anomalous.multiplicity) == [2, 2, 1]
    assert list(anomalous.half_intensity[0]) == [10.0, 14.0]
    assert np.isnan(anomalous.half_intensity[2, 1]) and anomalous.half_multiplicity[2, 1] == 0
    # IMEAN: all four observations of pair 5, weighted: (10 + 14 + 6 + 6/4) / (3.25)
    assert pairs.intensity[0] == pytest.approx(31.5 / 3.25)
    assert pairs.sigma[0] == pytest.approx(1 / np.sqrt(3.25)) and pairs.multiplicity[0] == 4
    group, starts = group_numbers(key, is_minus)
    assert list(group) == [0, 0, 1, 1, 2] and list(starts) == [0, 2, 4]
    mean, sigma, count = weighted_means(np.array([0, 0]), np.array([1.0, 3.0]), np.array([1.0, 1.0]), 2)
    assert mean[0] == 2.0 and np.isnan(mean[1]) and count[1] == 0


def test_lattice_halves_are_balanced_and_fixed():
    halves = lattice_half(np.arange(100000))
    assert abs(halves.mean() - 0.5) < 0.01
    assert np.array_equal(lattice_half(np.arange(10)), lattice_half(np.arange(10)))
    assert not np.array_equal(halves[:20], np.arange(20) % 2)


# --- statistics ---------------------------------------------------------------------------------

def test_resolution_bins_count_the_complete_anomalous_set():
    from cctbx import crystal

    bins = resolution_bins(CELL, "C 1 2 1", 3.0, 5)
    complete = crystal.symmetry(CELL, "C 1 2 1").build_miller_set(anomalous_flag=True, d_min=3.0)
    assert bins.n_possible.sum() == complete.size()
    assert bins.bin_range(4)[1] == pytest.approx(3.0, abs=1e-4)
    # Equal volumes: equal steps in d*^3.
    cubes = bins.limits ** 1.5
    assert np.allclose(np.diff(cubes), np.diff(cubes)[0], rtol=1e-9)
    assert list(bins.bin_of(np.array([0.0, 1 / 2.9 ** 2, 1 / 3.1 ** 2]))) == [0, -1, 4]


def test_merging_statistics_on_a_small_set():
    from cctbx import crystal

    rng = np.random.default_rng(10)
    complete = crystal.symmetry(CELL, "C 1 2 1").build_miller_set(anomalous_flag=False, d_min=4.0)
    hkl = np.array(complete.indices())
    keys = pack_hkl(hkl)
    n = len(keys)
    truth = rng.exponential(100.0, n)
    both_halves = np.column_stack([truth + rng.normal(0, 1, n), truth + rng.normal(0, 1, n)])
    from xfel_spread.merging.merge import MergedIntensities

    anomalous = MergedIntensities(keys, np.zeros(n, bool), truth, np.ones(n), np.full(n, 4), both_halves,
                                  np.full((n, 2), 2))
    bins = resolution_bins(CELL, "C 1 2 1", 4.0, 4)
    rows = merging_statistics(anomalous, CELL, bins, minimum_multiplicity=2)
    overall = rows[-1]
    assert overall["n_measured"] == n and overall["n_observations"] == 4 * n
    assert overall["multiplicity"] == 4.0
    # Only I(+) was given: half the acentric anomalous set is missing.
    assert overall["completeness"] == pytest.approx(n / bins.n_possible.sum())
    assert overall["cc_half"] > 0.99 and np.isnan(overall["cc_anom"]) and overall["n_cc_anom"] == 0
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])) == pytest.approx(0.9933, abs=1e-4)


# --- polarization -------------------------------------------------------------------------------

def test_polarization_factor_follows_kahn():
    wavelength = 1.74
    s0 = np.array([[0.0, 0.0, -1 / wavelength]])
    normal = np.array([[0.0, 1.0, 0.0]])
    two_theta = np.radians(40.0)
    d = wavelength / (2 * np.sin(two_theta / 2))
    # Scattered in the y-z plane (perpendicular to the polarization along x): no loss.
    along_normal = np.array([[0.0, np.sin(two_theta), -np.cos(two_theta)]]) / wavelength
    # Scattered in the x-z plane: cos^2 2theta.
    in_plane = np.array([[np.sin(two_theta), 0.0, -np.cos(two_theta)]]) / wavelength
    lattice = np.zeros(1, np.int64)
    assert polarization_factor(along_normal, np.array([d]), lattice, s0, normal)[0] == pytest.approx(1.0)
    assert polarization_factor(in_plane, np.array([d]), lattice, s0, normal)[0] == pytest.approx(
        np.cos(two_theta) ** 2)


# --- reference ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return model_reference(MODEL, 4.0)


def test_model_reference_is_the_squared_model_amplitudes(reference):
    from cctbx import crystal

    assert reference.space_group_symbol == "C 1 2 1" and reference.cell == pytest.approx(CELL)
    complete = crystal.symmetry(CELL, "C 1 2 1").build_miller_set(anomalous_flag=False, d_min=4.0)
    assert len(reference.keys) == complete.size()
    assert np.all(np.diff(reference.keys) > 0) and np.all(reference.intensity > 0)
    found, intensity = reference.lookup(np.r_[reference.keys[:3], pack_hkl([[1, 0, 0]])])
    assert list(found) == [True, True, True, False] and intensity[3] == 0
    assert np.array_equal(intensity[:3], reference.intensity[:3])


def test_model_mismatch_names_both_cells(reference):
    check_model_matches_data(reference, "1m2a.pdb", np.array(CELL) * [1.005, 0.995, 1, 1, 1, 1], ["-C 2y"])
    with pytest.raises(ModelError, match=r"1m2a.pdb: model cell \(67.200, 59.800, 47.200, 90.00, 110.30, 90.00\) "
                                         r"disagrees with the lattices' average cell \(77.280, 59.800"):
        check_model_matches_data(reference, "1m2a.pdb", np.array(CELL) * [1.15, 1, 1, 1, 1, 1], ["-C 2y"])
    with pytest.raises(ModelError) as raised:
        check_model_matches_data(reference, "1m2a.pdb", CELL, ["-P 1", "-P 1", "-C 2y"])
    assert str(raised.value) == ("1m2a.pdb: space group C 1 2 1 (Patterson group C 1 2/m 1 (No. 12)) disagrees with "
                                 "the lattices' Patterson group P -1 (No. 2)")


def test_unreadable_model(tmp_path):
    broken = tmp_path / "broken.pdb"
    broken.write_text("not a model\n")
    with pytest.raises(ModelError, match="broken.pdb"):
        model_reference(broken, 4.0)


# --- MPI helpers on one rank --------------------------------------------------------------------

def test_one_rank_helpers_without_mpi():
    from xfel_spread.merging.parallel import exchange, gather, owner_splits, owners
    from xfel_spread.mpi import AgreedError, SerialComm, first_error

    comm = SerialComm()
    columns = {"key": np.array([3, 1, 2]), "flag": np.array([True, False, True]), "pair": np.arange(6.0).reshape(3, 2)}
    received = exchange(comm, columns, np.zeros(3, np.int64))
    assert all(np.array_equal(received[name], columns[name]) for name in columns)
    gathered = gather(comm, columns)
    assert all(np.array_equal(gathered[name], columns[name]) for name in columns)
    splits = owner_splits(np.arange(10), 3)
    assert list(splits) == [3, 6] and list(owners(np.array([0, 3, 5, 6, 9]), splits)) == [0, 1, 1, 2, 2]
    first_error(comm, None)
    with pytest.raises(AgreedError, match="boom"):
        first_error(comm, ValueError("boom"))
    assert "mpi4py.MPI" not in sys.modules  # the tests start mpirun later: MPI must stay uninitialised here
