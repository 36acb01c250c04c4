"""SPREAD's model, gradients, fit and uncertainties on synthetic data made with the model itself.

The data: 1M2A's site decomposition to 3 A (200 reflections), the site sums scaled up 10x (the
anomalous signal), 80 shots x 10 shoeboxes of 8 x 8 pixels with SASE-like spectra, Poisson noise
plus readout noise, FE1 oxidized and FE2 reduced. The fit starts both sites from the metallic table.
"""

import numpy as np
import pytest
import torch
from sim_fixtures import PDB_PATH, SHARED_DATA_DIR

from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, site_decomposition
from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.fit import (
    Nuisance,
    ProfiledNLL,
    Restraints,
    SpreadProblem,
    fit,
    optimise_nuisance,
    preconditioner,
    start_nuisance,
)
from xfel_spread.spread.likelihood import nll_derivatives, total_nll
from xfel_spread.spread.model import (
    Decomposition,
    SpreadData,
    expected_photons,
    unit_bragg,
)
from xfel_spread.spread.restraints import hilbert_matrix
from xfel_spread.spread.synthetic import sase_spectra, simulate, synthetic_layout
from xfel_spread.spread.tables import (
    energy_grid,
    interpolation_matrix,
    read_table,
    table_on_grid,
    table_path,
)
from xfel_spread.spread.information import profile_fisher
from xfel_spread.spread.uncertainty import (
    edge_estimates,
    fp_minimum_energy,
    grid_covariance,
    half_rise_energy,
    step_edge_energy,
)

ENERGIES_EV = 7070.5 + np.arange(100.0)
GRID_EV = energy_grid(7070.0, 7170.0, 1.0)
BOOST = 10.0
N_SHOTS, BOXES_PER_SHOT, N_REFLECTIONS = 80, 10, 200
#: Grid points of the recovery criterion (7100-7150 eV).
MIDDLE = (GRID_EV >= 7100) & (GRID_EV <= 7150)


def table(name):
    return table_on_grid(read_table(table_path(name, str(SHARED_DATA_DIR))), GRID_EV, name)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(1)
    full = site_decomposition(str(PDB_PATH), 3.0, 0.435, 46.0, ("FE1", "FE2"), HC_EV_ANGSTROM / ENERGIES_EV.mean())
    chosen = rng.choice(len(full.indices), N_REFLECTIONS, replace=False)
    decomposition = Decomposition.from_complex(full.f_rest[chosen], BOOST * full.site_sums[:, chosen])
    interpolation = interpolation_matrix(GRID_EV, ENERGIES_EV)
    (ox_fp, ox_fdp), (red_fp, red_fdp) = table("oxidized"), table("reduced")
    truth = np.stack([ox_fp, red_fp]), np.stack([ox_fdp, red_fdp])
    spectra = sase_spectra(N_SHOTS, ENERGIES_EV, rng)
    mean_intensity = float(np.mean(np.abs(full.f_rest[chosen]) ** 2))
    data = synthetic_layout(N_SHOTS, BOXES_PER_SHOT, N_REFLECTIONS, spectra, rng, amplitude=30000.0 / mean_intensity)
    background = np.zeros((data.n_shoeboxes, 3))
    background[:, 0] = rng.uniform(0.5, 2.0, data.n_shoeboxes)
    background[:, 1] = 0.05
    scale = rng.uniform(0.5, 1.5, N_SHOTS)
    data.data = simulate(data, *truth, interpolation, decomposition, scale, background, rng)
    metallic = table("metallic")
    start = np.stack([metallic[0], metallic[0]]), np.stack([metallic[1], metallic[1]])
    restraints = Restraints(1.0, 10.0, torch.tensor(start[0]), torch.tensor(start[1]),
                            torch.tensor(hilbert_matrix(GRID_EV)))
    problem = SpreadProblem(data, decomposition, torch.tensor(interpolation), restraints)
    return {"problem": problem, "truth": truth, "start": start, "scale": scale, "background": background,
            "spectra": spectra, "rng": rng, "full": full, "chosen": chosen}


def theta_of(fp, fdp):
    return torch.tensor(np.concatenate([np.ravel(fp), np.ravel(fdp)]), dtype=torch.float64)


def small_problem(problem, n_shots=3):
    """The first shots of the synthetic set (a cheap problem for finite differences)."""
    data = problem.data
    boxes = int((data.shot < n_shots).sum())
    pixels = int((data.shoebox < boxes).sum())
    terms = data.term_pixel < pixels
    small = SpreadData(data.data[:pixels], data.shoebox[:pixels], data.dx[:pixels], data.dy[:pixels],
                       data.readout_var[:pixels], data.shot[:boxes], data.term_pixel[terms], data.term_pair[terms],
                       data.term_coeff[terms], n_shots)
    return SpreadProblem(small, problem.decomposition, problem.interpolation, problem.restraints)


def central_difference(function, x, index, step):
    plus, minus = x.clone(), x.clone()
    plus.view(-1)[index] += step
    minus.view(-1)[index] -= step
    return (float(function(plus)) - float(function(minus))) / (2 * step)


def test_gradients_match_central_differences(synthetic):
    problem = small_problem(synthetic["problem"])
    theta = theta_of(*synthetic["start"])
    nuisance = start_nuisance(problem.data)
    with torch.no_grad():
        nuisance = optimise_nuisance(unit_bragg(problem.intensity(theta), problem.data), nuisance, problem.data, 5)
    scale = nuisance.scale.clone().requires_grad_(True)
    background = nuisance.background.clone().requires_grad_(True)
    theta_g = theta.clone().requires_grad_(True)
    problem.objective(theta_g, Nuisance(scale, background)).backward()
    n_grid = problem.n_grid
    checks = {  # name: (function of x, x, indices, autograd gradient, step)
        "f'": (lambda x: problem.objective(x, nuisance), theta, [50, n_grid + 48], theta_g.grad, 1e-4),
        "f''": (lambda x: problem.objective(x, nuisance), theta, [2 * n_grid + 50, 3 * n_grid + 60], theta_g.grad, 1e-4),
        "G": (lambda x: problem.objective(theta, Nuisance(x, nuisance.background)), nuisance.scale, [0, 2],
              scale.grad, 1e-6),
        "plane": (lambda x: problem.objective(theta, Nuisance(nuisance.scale, x)), nuisance.background,
                  [0, 1, 2, 3 * 17 + 1], background.grad.reshape(-1), 1e-5),
    }
    worst = {}
    for name, (function, x, indices, gradient, step) in checks.items():
        for index in indices:
            numeric = central_difference(function, x, index, step)
            analytic = float(gradient.reshape(-1)[index])
            worst[name] = max(worst.get(name, 0.0), abs(numeric - analytic) / max(abs(numeric), 1.0))
    assert all(error < 1e-5 for error in worst.values()), worst
    # The nuisance steps use their own pixel derivatives: the same as autograd's.
    mu = expected_photons(unit_bragg(problem.intensity(theta), problem.data), nuisance.scale, nuisance.background,
                          problem.data).detach().requires_grad_(True)
    total_nll(mu, problem.data).backward()
    assert torch.allclose(nll_derivatives(mu.detach(), problem.data)[0], mu.grad, rtol=1e-10, atol=1e-12)


def test_profile_gradient_matches_differences_of_the_profiled_objective(synthetic):
    """At the nuisance optimum the grids' gradient is the profile objective's (envelope theorem)."""
    problem = small_problem(synthetic["problem"])
    theta = theta_of(*synthetic["start"])

    def profiled(x):
        with torch.no_grad():
            nuisance = optimise_nuisance(unit_bragg(problem.intensity(x), problem.data), start_nuisance(problem.data),
                                         problem.data, 60)
        return problem.objective(x, nuisance), nuisance

    _, nuisance = profiled(theta)
    theta_g = theta.clone().requires_grad_(True)
    problem.objective(theta_g, nuisance).backward()
    for index in (50, 2 * problem.n_grid + 50):
        numeric = central_difference(lambda x: profiled(x)[0], theta, index, 1e-3)
        assert float(theta_g.grad[index]) == pytest.approx(numeric, rel=1e-3, abs=1e-3)


@pytest.fixture(scope="module")
def recovered(synthetic):
    problem = synthetic["problem"]
    result = fit(problem, *synthetic["start"], max_iterations=300)
    theta = np.concatenate([result.fp.ravel(), result.fdp.ravel()])
    covariance = grid_covariance(problem, theta, result.nuisance)
    return result, covariance


def test_recovers_each_site_from_the_metallic_start(synthetic, recovered):
    result, covariance = recovered
    problem = synthetic["problem"]
    truth_fp, truth_fdp = synthetic["truth"]
    # Converged: the fit's objective is below the truth's (nuisance profiled at both).
    truth_theta = theta_of(truth_fp, truth_fdp)
    with torch.no_grad():
        nuisance = optimise_nuisance(unit_bragg(problem.intensity(truth_theta), problem.data),
                                     start_nuisance(problem.data), problem.data, 60)
        assert result.objective < float(problem.objective(truth_theta, nuisance))
    edges = edge_estimates(GRID_EV, result.fp, result.fdp, covariance)
    for site in range(2):
        rms_fdp = np.sqrt(np.mean((result.fdp[site] - truth_fdp[site])[MIDDLE] ** 2))
        assert rms_fdp < 0.3, (site, rms_fdp)
        true_rise = half_rise_energy(GRID_EV, truth_fdp[site])
        true_minimum = fp_minimum_energy(GRID_EV, truth_fp[site])
        assert abs(edges[site].half_rise_ev - true_rise) < max(1.5, 3 * edges[site].half_rise_sigma_ev)
        assert abs(edges[site].fp_minimum_ev - true_minimum) < max(1.5, 3 * edges[site].fp_minimum_sigma_ev)
        assert 0.05 < edges[site].half_rise_sigma_ev < 3.0
        # The step edge, an average over the rise, with its linearly propagated sigma.
        true_step = step_edge_energy(GRID_EV, truth_fdp[site])
        assert abs(edges[site].step_edge_ev - true_step) < 3 * edges[site].step_edge_sigma_ev
        assert 0.05 < edges[site].step_edge_sigma_ev < 3.0
    # FE1 (oxidized) lies above FE2 (reduced) in both edge measures, as in the tables.
    assert edges[0].half_rise_ev > edges[1].half_rise_ev
    assert edges[0].fp_minimum_ev > edges[1].fp_minimum_ev + 3.0
    # The standard errors describe the scatter: normalised f'' errors in 7100-7150 eV have rms near 1.
    sigma = np.sqrt(np.diag(covariance))
    n_grid = len(GRID_EV)
    z = [(result.fdp[s] - truth_fdp[s])[MIDDLE] / sigma[(2 + s) * n_grid:(3 + s) * n_grid][MIDDLE] for s in range(2)]
    assert 0.3 < np.sqrt(np.mean(np.concatenate(z) ** 2)) < 2.0


def shuffled_channels(synthetic):
    """Each shot's channels permuted in the coefficients (the data keep the true spectra)."""
    problem = synthetic["problem"]
    data = problem.data
    rng = np.random.default_rng(7)
    n_ref = problem.decomposition.n_reflections
    permutations = torch.as_tensor(np.stack([rng.permutation(len(ENERGIES_EV)) for _ in range(data.n_shots)]))
    term_shot = data.shot[data.shoebox[data.term_pixel]]
    channel, reflection = data.term_pair // n_ref, data.term_pair % n_ref
    shuffled = SpreadData(data.data, data.shoebox, data.dx, data.dy, data.readout_var, data.shot, data.term_pixel,
                          permutations[term_shot, channel] * n_ref + reflection, data.term_coeff, data.n_shots)
    return SpreadProblem(shuffled, problem.decomposition, problem.interpolation, problem.restraints)


def spoiled_site_sums(synthetic):
    """The site sums of (h, k, l+1) in place of those of h (0 where l+1 is outside the table)."""
    from xfel_spread.spread.coefficients import asu_lookup

    problem, full, chosen = synthetic["problem"], synthetic["full"], synthetic["chosen"]
    lookup = asu_lookup(full.unit_cell, full.space_group, full.indices)
    shifted = lookup.columns(full.indices[chosen] + np.array([0, 0, 1]))
    sums = np.where(shifted >= 0, BOOST * full.site_sums[:, np.maximum(shifted, 0)], 0)
    assert (shifted >= 0).mean() > 0.8
    return SpreadProblem(problem.data, Decomposition.from_complex(full.f_rest[chosen], sums), problem.interpolation,
                         problem.restraints)


@pytest.mark.parametrize("spoil", [shuffled_channels, spoiled_site_sums])
def test_negative_controls_do_not_recover_the_sites(synthetic, recovered, spoil):
    """The same data fitted with each shot's channels shuffled, or with the site sums of l+1."""
    control = fit(spoil(synthetic), *synthetic["start"], max_iterations=300)
    result, _ = recovered
    _, truth_fdp = synthetic["truth"]

    def difference_error(fdp):
        return np.sqrt(np.mean(((fdp[0] - fdp[1]) - (truth_fdp[0] - truth_fdp[1]))[MIDDLE] ** 2))

    def fdp_error(fdp):
        return np.sqrt(np.mean((fdp - truth_fdp)[:, MIDDLE] ** 2))

    assert fdp_error(control.fdp) > 2 * fdp_error(result.fdp)
    assert difference_error(control.fdp) > 2 * difference_error(result.fdp)


def test_no_lattices_is_one_line(synthetic):
    problem = synthetic["problem"]
    empty = SpreadData(*(torch.zeros(0, dtype=torch.float64) for _ in range(5)), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, dtype=torch.float64), 0)
    with pytest.raises(SpreadInputError, match="no converged lattices") as info:
        fit(SpreadProblem(empty, problem.decomposition, problem.interpolation, problem.restraints),
            *synthetic["start"])
    assert "\n" not in str(info.value)


def test_chunked_evaluation_gives_the_same_fit(synthetic):
    """Whole-shot chunks of ~5,000 pixels (11 chunks) against one chunk: the same objective path, up to
    where each chunk's nuisance steps stop (measured: 2e-3 of an NLL of 1.2e5, grids within 1e-6 e)."""
    problem = synthetic["problem"]
    whole = fit(problem, *synthetic["start"], max_iterations=3)
    chunked = fit(problem, *synthetic["start"], max_iterations=3, pixels_per_chunk=5000)
    assert len(chunked.history) == len(whole.history)
    assert np.allclose(chunked.history, whole.history, rtol=1e-7)
    assert np.allclose(chunked.fdp, whole.fdp, atol=1e-4)


def test_information_of_the_leading_lattices_is_scaled_to_the_problem(synthetic):
    """All shots: exactly the profiled Fisher information; the first shots: theirs times all pixels
    over theirs."""
    problem = small_problem(synthetic["problem"], n_shots=6)
    theta = theta_of(*synthetic["start"]).numpy()
    nll = ProfiledNLL(problem)
    nll(theta)
    whole = profile_fisher(problem, theta, nll.nuisance)
    assert np.allclose(nll.information(theta, 6), whole, rtol=1e-12, atol=0)
    assert np.allclose(nll.information(theta, 100), whole, rtol=1e-12, atol=0)
    leading = small_problem(synthetic["problem"], n_shots=2)
    fisher = profile_fisher(leading, theta, Nuisance(nll.nuisance.scale[:2],
                                                     nll.nuisance.background[:leading.data.n_shoeboxes]))
    expected = fisher * problem.data.n_pixels / leading.data.n_pixels
    assert np.allclose(nll.information(theta, 2), expected, rtol=1e-12, atol=0)


def test_preconditioner_factor_of_a_singular_matrix():
    """Cholesky where it works; eigenvalues raised to 1e-10 of the largest where it does not."""
    spd = np.array([[4.0, 1.0], [1.0, 3.0]])
    factor = preconditioner(spd)
    assert np.allclose(factor @ factor.T, spd) and np.allclose(factor, np.tril(factor))
    singular = np.array([[1.0, 1.0], [1.0, 1.0]])
    factor = preconditioner(singular)
    values = np.linalg.eigvalsh(factor @ factor.T)
    assert values == pytest.approx([2e-10, 2.0], rel=1e-3)


def test_preconditioned_fit_reaches_the_minimum_in_fewer_evaluations(synthetic, recovered):
    """Preconditioned by the information of its 80 shots at the start, the fit ends where the plain
    L-BFGS-B does, on the same grids, in fewer evaluations (measured: 27 against 58). This set's 200
    reflections are few, so the information of 20 shots is a poor estimate here (61 evaluations, to a
    lower minimum); on LY99's lattices 30 of 600 were enough (19 against 73-114, docs/spread.md)."""
    plain, _ = recovered
    preconditioned = fit(synthetic["problem"], *synthetic["start"], max_iterations=300, preconditioner_lattices=80)
    assert preconditioned.objective == pytest.approx(plain.objective, rel=1e-6)
    assert preconditioned.evaluations < plain.evaluations
    assert np.abs(preconditioned.fdp - plain.fdp)[:, MIDDLE].max() < 0.05
    assert np.abs(preconditioned.fp - plain.fp)[:, MIDDLE].max() < 0.05


def test_swapped_start_reaches_the_same_sites(synthetic, recovered):
    """FE1 started from the reduced table and FE2 from the oxidized one: the same answer."""
    truth_fp, truth_fdp = synthetic["truth"]
    swapped = fit(synthetic["problem"], truth_fp[::-1].copy(), truth_fdp[::-1].copy(), max_iterations=300)
    result, _ = recovered
    for site in range(2):
        assert half_rise_energy(GRID_EV, swapped.fdp[site]) == pytest.approx(
            half_rise_energy(GRID_EV, result.fdp[site]), abs=0.2)
        assert fp_minimum_energy(GRID_EV, swapped.fp[site]) == pytest.approx(
            fp_minimum_energy(GRID_EV, result.fp[site]), abs=0.2)


def test_refine_writes_grids_and_edges(synthetic, tmp_path):
    """spread.run end to end on the synthetic set: settings, start tables, fit, errors, files."""
    from xfel_spread.spread.run import SpreadSettings, refine, write_results

    full, chosen = synthetic["full"], synthetic["chosen"]
    settings = SpreadSettings.from_mapping({"sites": {"FE2": "metallic", "FE1": "metallic"}, "posterior_samples": 200})
    result = refine(synthetic["problem"].data, ENERGIES_EV, ("FE1", "FE2"), full.f_rest[chosen],
                    BOOST * full.site_sums[:, chosen], settings, str(SHARED_DATA_DIR))
    assert result.site_names == ("FE2", "FE1") and np.array_equal(result.grid_ev, GRID_EV)
    _, truth_fdp = synthetic["truth"]
    assert abs(result.edges[0].half_rise_ev - half_rise_energy(GRID_EV, truth_fdp[1])) < 1.5
    assert abs(result.edges[1].half_rise_ev - half_rise_energy(GRID_EV, truth_fdp[0])) < 1.5
    write_results(result, tmp_path / "spread")
    table = np.genfromtxt(tmp_path / "spread_fp_fdp.tsv", names=True, delimiter="\t")
    assert len(table) == len(GRID_EV) and np.allclose(table["FE1_fdp"], result.fdp[1], atol=1e-6)
    assert np.all(table["FE1_fdp_sigma"] > 0)
    edges = (tmp_path / "spread_edges.tsv").read_text().splitlines()
    assert edges[1].startswith("FE2\t") and len(edges) == 3


@pytest.mark.parametrize("section, message", [
    ({"grid_spacing": 1.0}, "spread.grid_spacing: unknown setting"),
    ({"grid_spacing_ev": 0}, "spread.grid_spacing_ev: expected a non-negative number above 0"),
    ({"sites": ["FE1"]}, "spread.sites: expected a mapping"),
    ({"max_iterations": 2.5}, "spread.max_iterations: expected a positive integer"),
    ({"preconditioner_lattices": -1}, "spread.preconditioner_lattices: expected a non-negative integer"),
])
def test_bad_settings_are_one_line(section, message):
    from xfel_spread.spread.run import SpreadSettings

    with pytest.raises(SpreadInputError, match=message) as info:
        SpreadSettings.from_mapping(section, "config.yaml")
    assert str(info.value).startswith("config.yaml: ") and "\n" not in str(info.value)


def test_site_not_in_the_model_is_one_line(synthetic):
    from xfel_spread.spread.run import SpreadSettings, refine

    settings = SpreadSettings.from_mapping({"sites": {"FE1": "oxidized", "FE3": "reduced"}})
    full, chosen = synthetic["full"], synthetic["chosen"]
    with pytest.raises(SpreadInputError, match=r"spread.sites: FE3 not among the model's sites \(FE1, FE2\)"):
        refine(synthetic["problem"].data, ENERGIES_EV, ("FE1", "FE2"), full.f_rest[chosen], full.site_sums[:, chosen],
               settings, str(SHARED_DATA_DIR))


def nuisance_gradients(problem, theta, nuisance):
    """Autograd's d objective / d (G, planes)."""
    scale = nuisance.scale.clone().requires_grad_(True)
    background = nuisance.background.clone().requires_grad_(True)
    problem.objective(theta, Nuisance(scale, background)).backward()
    return scale.grad, background.grad


def test_nuisance_steps_reach_the_optimum(synthetic):
    """The nuisance steps end where the objective's gradient in every G and plane is zero."""
    problem = small_problem(synthetic["problem"])
    theta = theta_of(*synthetic["start"])
    start = start_nuisance(problem.data)
    before = nuisance_gradients(problem, theta, start)
    with torch.no_grad():
        nuisance = optimise_nuisance(unit_bragg(problem.intensity(theta), problem.data), start, problem.data, 60,
                                     nll_tolerance=1e-12)
    after = nuisance_gradients(problem, theta, nuisance)
    # Measured: the largest gradient fell by 1e-9 (G) and 1.3e-5 (planes); the steps stop once they
    # gain less than 1e-10 per pixel.
    for first, last in zip(before, after):
        assert float(last.abs().max()) < 1e-4 * float(first.abs().max()), (float(first.abs().max()),
                                                                          float(last.abs().max()))


def test_profiled_information_is_the_gaussian_fisher_information(synthetic):
    """profile_fisher equals the Fisher information of the pixels' Gaussian, ``J_mu^T J_mu / v +
    J_v^T J_v / (2 v^2)`` over grids and nuisance (J_v: the derivatives of the variance, autograd's),
    with G and the planes profiled out by the Schur complement. (It found dI/df'' of the wrong sign.)"""
    from xfel_spread.stage1.likelihood import pixel_variance

    problem = small_problem(synthetic["problem"], n_shots=2)
    data = problem.data
    theta = theta_of(*synthetic["start"])
    with torch.no_grad():
        nuisance = optimise_nuisance(unit_bragg(problem.intensity(theta), data), start_nuisance(data), data, 30)
    n_theta, n_scale = theta.numel(), nuisance.scale.numel()

    def mean_and_variance(values):
        grids = values[:n_theta]
        scale = values[n_theta:n_theta + n_scale]
        background = values[n_theta + n_scale:].reshape(-1, 3)
        bragg = unit_bragg(problem.intensity(grids), data)
        mu = expected_photons(bragg, scale, background, data)
        return mu, pixel_variance(mu, data.readout_var)

    values = torch.cat([theta, nuisance.scale, nuisance.background.reshape(-1)])
    j_mu, j_v = torch.autograd.functional.jacobian(mean_and_variance, values)
    _, variance = mean_and_variance(values)
    full = j_mu.T @ (j_mu / variance[:, None]) + j_v.T @ (j_v / (2 * variance[:, None] ** 2))
    grids, rest = slice(0, n_theta), slice(n_theta, None)
    expected = full[grids, grids] - full[grids, rest] @ torch.linalg.solve(full[rest, rest], full[rest, grids])
    ours = torch.as_tensor(profile_fisher(problem, theta.numpy(), nuisance))
    scale = float(expected.abs().max())
    assert float((ours - expected).abs().max()) < 1e-8 * scale, float((ours - expected).abs().max()) / scale
