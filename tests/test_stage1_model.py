"""Stage 1 parameterisation (settings, crystal, mosaic domains, detector shift, parameter space), the
likelihood's formulas, and autograd gradients of the NLL against finite differences."""

import math

import numpy as np
import pytest
import torch
from sim_fixtures import LY99_ENERGIES_EV, lookup_for

from xfel_spread.config import ConfigError
from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.geometry import Detector, solid_angle_sr
from xfel_spread.sim.forward import AmplitudeLookup, Beam, CrystalState, bragg_photons_dense
from xfel_spread.sim.structure_factors import AmplitudeGrid
from xfel_spread.stage1.likelihood import closed_form_scale, pixel_nll, same_for_every_channel, z_scores
from xfel_spread.stage1.model import (
    INDEX,
    NCELLS,
    PARAMETER_NAMES,
    CrystalModel,
    FreeDomainCrystal,
    Stage1Settings,
    StartModelError,
    axis_angle_rotations,
    c2_cell,
    mosaic_domain_set,
    mosaic_nodes,
    enter_pass,
    parameter_space,
    refinement_passes,
    rotation_vector_matrices,
    rotation_xyz,
    shifted_detector,
)
from xfel_spread.stage1.refine import ShotProblem, shot_evaluator
from xfel_spread.stage1.scoring import mean_rotation
from xfel_spread.stage1.synthetic import perturbed_matrix, simulate_shot_pixels, with_start

LY99_CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
#: Ten channels over the band, for quick unit tests.
FEW_CHANNELS = np.arange(20, 80, 6)


def start_matrix(seed=3):
    rotation = xtal.random_rotation(np.random.default_rng(seed))
    return (rotation @ xtal.orthogonalization_matrix(LY99_CELL).T).T


def test_settings_defaults_are_the_schema_ly99_values():
    settings = Stage1Settings.from_config({})
    assert settings.refine == ("G", "rotation", "cell", "ncells")
    assert settings.refined_names == ("G", "rot_x_deg", "rot_y_deg", "rot_z_deg", "a", "b", "c", "beta_deg",
                                      "Na", "Nb", "Nc")
    assert settings.initial_G is None and settings.initial_ncells == (72.0, 72.0, 72.0)
    assert settings.bounds_ncells == (3.0, 1600.0) and settings.bounds_rotation_deg == (-15.0, 15.0)
    assert settings.bounds_G == (0.0, 1e12) and settings.bounds_detz_shift_mm == (-1.5, 1.5)
    assert settings.readout_sigma_adu == 3.0 and settings.shoebox_size_px == 12
    assert settings.n_domains == 1
    assert Stage1Settings.from_config({"refine": ["G", "eta"]}).n_domains == 1  # analytic eta
    assert Stage1Settings.from_config({"refine": ["G", "eta"], "eta_model": "domains"}).n_domains == 25
    assert settings.eta_model == "analytic" and settings.mosaic_model == "gaussian"
    assert settings.broad_start_ncells == 20
    assert Stage1Settings.from_config({"device": "cpu"}).torch_device() == torch.device("cpu")


@pytest.mark.parametrize("section, message", [
    ({"refine": ["G", "spin"]}, "settings.yaml: stage1.refine"),
    ({"bounds": {"ncells": [80, 40]}}, "settings.yaml: stage1.bounds.ncells: lower bound 80 is above upper bound 40"),
    ({"initial": {"ncells": [2, 72, 72]}}, "settings.yaml: stage1.initial.ncells: [2.0, 72.0, 72.0] is outside"),
    ({"refine": ["eta"], "mosaic_domains": 1, "eta_model": "domains"},
     "stage1.mosaic_domains: refining eta needs at least 2 mosaic domains"),
    ({"eta_model": "sampled"}, "settings.yaml: stage1.eta_model"),
    ({"free_domains": 1}, "settings.yaml: stage1.free_domains: 1 domain is the crystal itself"),
    ({"free_domains": -2}, "settings.yaml: stage1.free_domains"),
    ({"bounds": {"detz_shift_mm": [0.5, 1.0]}}, "stage1.bounds.detz_shift_mm: the range must contain 0"),
    ({"broad_start": "sometimes"}, "settings.yaml: stage1.broad_start"),
    ({"broad_start": "always", "broad_start_ncells": None},
     "settings.yaml: stage1.broad_start: always needs broad_start_ncells"),
])
def test_settings_errors_are_one_line_naming_the_key(section, message):
    with pytest.raises(ConfigError) as error:
        Stage1Settings.from_config(section, source="settings.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_start_parameters_give_back_the_start_crystal():
    matrix = start_matrix()
    model = CrystalModel(matrix, 1)
    values = torch.as_tensor(parameter_space(Stage1Settings.from_config({}), model.start_cell, 1.0).start)
    assert np.allclose(model.real_space_matrix(values).numpy(), matrix, rtol=0, atol=1e-12)
    assert np.allclose(model.start_cell, (67.2, 59.8, 47.2, 110.3), atol=1e-12)


def test_rotations_are_about_the_laboratory_axes_in_xyz_order():
    angles = (0.3, -0.2, 0.5)
    expected = np.eye(3)
    for axis, angle in zip(np.eye(3), angles):
        expected = expected @ xtal.axis_angle_rotation(axis, math.radians(angle))
    # Two orders of three 3x3 products of entries <= 1 (3-term sums): a few ulp of 1 each (eps 2.2e-16).
    assert np.allclose(rotation_xyz(torch.tensor(angles, dtype=torch.float64)).numpy(), expected, rtol=0, atol=1e-14)

    matrix = start_matrix()
    model = CrystalModel(matrix, 1)
    values = torch.as_tensor(parameter_space(Stage1Settings.from_config({}), model.start_cell, 1.0).start)
    values[INDEX["rot_y_deg"]] = 0.05
    turned = model.real_space_matrix(values).numpy()
    assert xtal.misorientation_deg(turned, matrix) == pytest.approx(0.05, rel=1e-6)
    # Rotating about lab y turns every cell vector about y: rows rotate, lengths stay.
    assert np.allclose(turned, matrix @ xtal.axis_angle_rotation(np.array([0.0, 1.0, 0.0]), math.radians(0.05)).T)


def test_cell_parameters_set_the_c2_cell_and_keep_the_orientation():
    matrix = start_matrix()
    model = CrystalModel(matrix, 1)
    values = torch.as_tensor(parameter_space(Stage1Settings.from_config({}), model.start_cell, 1.0).start)
    values[INDEX["a"]], values[INDEX["c"]], values[INDEX["beta_deg"]] = 67.5, 47.0, 110.0
    changed = model.real_space_matrix(values).numpy()
    assert np.allclose(xtal.unit_cell_from_matrix(changed), (67.5, 59.8, 47.0, 90.0, 110.0, 90.0), atol=1e-10)
    # a keeps its direction (the PDB convention puts a along the orientation's first axis).
    assert np.allclose(changed[0] / 67.5, matrix[0] / 67.2, atol=1e-12)


def test_non_monoclinic_start_is_refused():
    triclinic = (xtal.orthogonalization_matrix((67.2, 59.8, 47.2, 90.0, 110.3, 91.0)))
    with pytest.raises(StartModelError, match="not monoclinic"):
        c2_cell(triclinic)


@pytest.mark.parametrize("space_group, cell, free", [
    ("P 61 2 2", (93.4, 93.4, 131.2, 90.0, 90.0, 120.0), (True, False, True, False)),   # thermolysin
    ("R 3 :H", (70.0, 70.0, 150.0, 90.0, 90.0, 120.0), (True, False, True, False)),
    ("P 43 21 2", (79.1, 79.1, 38.0, 90.0, 90.0, 90.0), (True, False, True, False)),      # lysozyme
    ("P 21 21 21", (40.0, 50.0, 60.0, 90.0, 90.0, 90.0), (True, True, True, False)),
    ("I 2 3", (78.0, 78.0, 78.0, 90.0, 90.0, 90.0), (True, False, False, False)),
    ("C 1 2 1", (67.2, 59.8, 47.2, 90.0, 110.3, 90.0), (True, True, True, True)),
])
def test_the_cell_keeps_its_crystal_systems_symmetry(space_group, cell, free):
    """The cell group refines what the lattice's system leaves free; changing a moves b (and c) with it
    where the symmetry ties them, and the start values give back the start crystal."""
    rotation = xtal.random_rotation(np.random.default_rng(7))
    matrix = (rotation @ xtal.orthogonalization_matrix(cell).T).T
    model = CrystalModel(matrix, 1, space_group=space_group)
    assert model.cell_model.free == free
    space = parameter_space(Stage1Settings.from_config({}), model.start_cell, 1.0, model.cell_model.free)
    assert [name for name in ("a", "b", "c", "beta_deg") if space.refined[INDEX[name]]] == [
        name for name, is_free in zip(("a", "b", "c", "beta_deg"), free) if is_free]
    values = torch.as_tensor(space.start)
    assert np.allclose(model.real_space_matrix(values).numpy(), matrix, rtol=0, atol=1e-10)
    values[INDEX["a"]] = cell[0] * 1.01
    changed = xtal.unit_cell_from_matrix(model.real_space_matrix(values).numpy())
    expected = list(cell)
    expected[0] *= 1.01
    if not free[1] and cell[1] == cell[0]:
        expected[1] = expected[0]
    if not free[2] and cell[2] == cell[0]:
        expected[2] = expected[0]
    assert np.allclose(changed, expected, atol=1e-9)
    tied = model.cell_model.tied(values.numpy())
    assert tied[INDEX["b"]] == pytest.approx(expected[1]) and tied[INDEX["c"]] == pytest.approx(expected[2])


def test_cells_the_model_cannot_describe_are_refused_in_one_line():
    def matrix(cell):
        return xtal.orthogonalization_matrix(cell)

    with pytest.raises(StartModelError, match="P 1 is triclinic: stage 1's cell model covers monoclinic to cubic"):
        CrystalModel(matrix((40.0, 50.0, 60.0, 80.0, 85.0, 95.0)), 1, space_group="P 1")
    with pytest.raises(StartModelError, match="on rhombohedral axes"):
        CrystalModel(matrix((50.0, 50.0, 50.0, 80.0, 80.0, 80.0)), 1, space_group="R 3 :R")
    with pytest.raises(StartModelError, match=r"does not have the shape of its hexagonal space group P 61 2 2"):
        CrystalModel(matrix((93.4, 93.0, 131.2, 90.0, 90.0, 120.0)), 1, space_group="P 61 2 2")


def test_mosaic_domains_are_paired_with_unit_rms_angle():
    axes, angles = mosaic_domain_set(25)
    assert np.allclose(np.linalg.norm(axes, axis=1), 1.0)
    assert np.sqrt(np.mean(angles ** 2)) == pytest.approx(1.0, rel=1e-12)
    assert abs(angles.sum()) < 1e-12 and np.count_nonzero(angles == 0) == 1
    same_set = mosaic_domain_set(25)
    assert np.array_equal(same_set[0], axes) and np.array_equal(same_set[1], angles)

    matrix = start_matrix()
    model = CrystalModel(matrix, 25)
    settings = Stage1Settings.from_config({"refine": ["eta"]})
    values = torch.as_tensor(parameter_space(settings, model.start_cell, 1.0).start)
    values[INDEX["eta_deg"]] = 0.2
    domains = model.domain_matrices(values).numpy()
    turned_by = [xtal.misorientation_deg(domain, matrix) for domain in domains]
    assert np.allclose(turned_by, 0.2 * np.abs(angles), atol=1e-5)  # arccos near 1: ~1e-6 deg
    assert np.sqrt(np.mean(np.square(turned_by))) == pytest.approx(0.2, rel=1e-5)
    assert CrystalModel(matrix, 1).domain_matrices(values).shape == (1, 3, 3)


def test_rotation_vectors_give_rodrigues_rotations_with_a_gradient_at_zero():
    rng = np.random.default_rng(5)
    vectors = torch.as_tensor(rng.normal(0.0, 0.3, (6, 3)))
    angles = vectors.norm(dim=1)
    assert torch.allclose(rotation_vector_matrices(vectors), axis_angle_rotations(vectors / angles[:, None], angles),
                          rtol=0, atol=1e-15)
    zero = torch.zeros((1, 3), dtype=torch.float64, requires_grad=True)
    rotation = rotation_vector_matrices(zero)
    assert torch.equal(rotation.detach()[0], torch.eye(3, dtype=torch.float64))
    (rotation[0] @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))[1].backward()
    assert torch.allclose(zero.grad, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))  # d(R x)_y / d v_z


def test_free_domains_are_centred_on_the_crystal_orientation():
    """The crystal's own matrix is the domains' mean orientation (the score's reference), whatever
    the vectors' mean; eta's meaning (their RMS angle) is kept."""
    matrix = start_matrix()
    model = FreeDomainCrystal(matrix, 25)
    rng = np.random.default_rng(7)
    model.vectors = torch.as_tensor(rng.normal(0.0, np.radians(0.05) / np.sqrt(3), (25, 3)) + np.radians(0.2))
    values = torch.as_tensor(parameter_space(Stage1Settings.from_config({}), model.start_cell, 1.0).start)
    domains = model.domain_matrices(values).numpy()
    rotations = model.domain_rotations().numpy()
    assert np.allclose(domains, xtal.domain_matrices(matrix, rotations), rtol=0, atol=1e-12)
    assert np.abs(mean_rotation(rotations) - np.eye(3)).max() < 1e-9  # third order in 0.05 deg
    turned_by = [xtal.misorientation_deg(domain, matrix) for domain in domains]
    assert np.sqrt(np.mean(np.square(turned_by))) == pytest.approx(model.rms_angle_deg(), rel=1e-4)
    assert 0.03 < model.rms_angle_deg() < 0.07
    state = model.crystal_state(values)
    assert state.domain_matrices.shape == (25, 3, 3) and state.mosaic_variance is None


def test_shifted_detector_moves_the_panel_along_the_beam_with_gradient():
    detector = Detector(100, 80, 0.088, 141.7, (4.0, 3.5), 0.032, 0.017)
    shift = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    moved = shifted_detector(detector, shift)
    fast, slow = torch.tensor([0, 17, 99]), torch.tensor([0, 40, 79])
    reference = Detector(100, 80, 0.088, 142.1, (4.0, 3.5), 0.032, 0.017)
    positions = moved.pixel_centres_mm(fast, slow)
    assert torch.allclose(positions, reference.pixel_centres_mm(fast, slow), rtol=0, atol=1e-12)
    solid_angle = solid_angle_sr(positions, moved).sum()
    solid_angle.backward()

    def at(shift_mm):
        other = Detector(100, 80, 0.088, 141.7 + shift_mm, (4.0, 3.5))
        return float(solid_angle_sr(other.pixel_centres_mm(fast, slow), other).sum())

    assert float(shift.grad) == pytest.approx((at(0.4 + 1e-5) - at(0.4 - 1e-5)) / 2e-5, rel=1e-6)


def test_parameter_space_scaling_bounds_restraints_and_passes():
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta", "detz_shift"],
                                           "restraints": {"cell_a": 0.5, "ncells": 10.0}})
    space = parameter_space(settings, (67.2, 59.8, 47.2, 110.3), 50.0)
    assert space.refined.all()
    assert space.start.tolist() == [50.0, 0, 0, 0, 67.2, 59.8, 47.2, 110.3, 72, 72, 72, 0.08, 0]
    assert np.allclose(space.lower[4:8], np.array([67.2, 59.8, 47.2, 110.3]) * 0.98)
    assert np.allclose(space.upper[4:8], np.array([67.2, 59.8, 47.2, 110.3]) * 1.02)
    values = space.start + space.step * np.arange(13)
    assert np.allclose(space.values(space.scaled(values)), values)
    assert np.allclose(space.physical(torch.as_tensor(space.scaled(values))).numpy(), values)
    assert space.values(np.full(13, 1e13)).tolist() == space.upper.tolist()
    shifted = space.start.copy()
    shifted[INDEX["a"]] += 1.0
    shifted[INDEX["Nb"]] += 20.0
    assert float(space.restraint_penalty(torch.as_tensor(shifted))) == pytest.approx(0.5 * (2.0 ** 2 + 2.0 ** 2))

    first, second = refinement_passes(space)
    assert [PARAMETER_NAMES[i] for i in first.refined_index] == [
        "G", "rot_x_deg", "rot_y_deg", "rot_z_deg", "a", "b", "c", "beta_deg", "detz_shift_mm"]
    assert second is space
    only_shapes = space.with_refined(np.isin(np.array(PARAMETER_NAMES), ("Na", "Nb", "Nc")))
    assert refinement_passes(only_shapes) == [only_shapes]
    assert refinement_passes(only_shapes, 20.0) == [only_shapes]

    # Broad spots first: the positions with N at 20 and G scaled to keep G Na Nb Nc.
    broad, positions, everything = refinement_passes(space, 20.0)
    assert positions.refined.tolist() == first.refined.tolist() and everything is space
    assert broad.refined.tolist() == first.refined.tolist()
    assert broad.start[NCELLS].tolist() == [20.0, 20.0, 20.0]
    assert broad.start[INDEX["G"]] == pytest.approx(50.0 * (72 / 20) ** 3)
    assert broad.step[INDEX["G"]] / broad.start[INDEX["G"]] == pytest.approx(space.step[0] / space.start[0])
    entered = enter_pass(space.start, broad)
    assert entered.tolist() == pytest.approx(broad.start.tolist())
    moved = entered.copy()
    moved[INDEX["G"]] *= 2
    moved[INDEX["a"]] += 0.01
    back = enter_pass(moved, positions)
    assert back[NCELLS].tolist() == [72, 72, 72] and back[INDEX["a"]] == moved[INDEX["a"]]
    assert back[INDEX["G"]] == pytest.approx(100.0)


def test_likelihood_formulas():
    model = torch.tensor([0.0, 4.0, 100.0, -2.0], dtype=torch.float64)
    data = torch.tensor([1.0, 3.0, 120.0, 0.0], dtype=torch.float64)
    variance = torch.clamp(model, min=0) + 9.0
    expected = 0.5 * torch.log(2 * math.pi * variance) + (data - model) ** 2 / (2 * variance)
    assert torch.allclose(pixel_nll(model, data, 9.0), expected, rtol=1e-15)
    assert torch.allclose(z_scores(model, data, 9.0), (data - model) / torch.sqrt(variance), rtol=1e-15)

    unit = torch.tensor([0.0, 2.0, 5.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    background = torch.tensor([1.0, 1.5, 2.0, 0.5, 0.7, 0.2], dtype=torch.float64)
    roi = torch.tensor([0, 0, 0, 1, 1, 1])
    assert closed_form_scale(unit, background + 7.5 * unit, background, roi) == pytest.approx(7.5, rel=1e-14)
    assert math.isnan(closed_form_scale(torch.zeros(6, dtype=torch.float64), background, background, roi))


@pytest.fixture(scope="module")
def few_channel_lookup(amplitude_table):
    return lookup_for(amplitude_table, FEW_CHANNELS)


def test_gradient_of_every_parameter_matches_central_differences(amplitude_table, few_channel_lookup):
    """All 13 parameters refined (eta with 4 domains, restraints on), at a generic point."""
    synthetic = simulate_shot_pixels(few_channel_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell,
                                     seed=7, n_rois=6, spread_deg=0.05, n_domains=5)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta", "detz_shift"],
                                           "mosaic_domains": 4, "restraints": {"cell_a": 0.1, "ncells": 20.0}})
    problem = ShotProblem(with_start(synthetic.shot, perturbed_matrix(synthetic.true_matrix, 7)), settings, "cpu")
    problem.set_start_from_model(few_channel_lookup)
    evaluate = shot_evaluator(problem, few_channel_lookup)
    point = np.random.default_rng(0).uniform(-3, 3, problem.space.n_refined)
    values = problem.space.values(point)
    assert values[INDEX["eta_deg"]] > 0.05 and values[INDEX["detz_shift_mm"]] != 0

    _, gradient = evaluate(problem.space, point)
    step = 1e-3  # scaled units, about a thousandth of each parameter's 1-sigma
    for position, name in enumerate(problem.settings.refined_names):
        offset = np.zeros_like(point)
        offset[position] = step
        central = (evaluate(problem.space, point + offset)[0] - evaluate(problem.space, point - offset)[0]) / (2 * step)
        assert gradient[position] == pytest.approx(central, rel=1e-6), name


def test_one_amplitude_row_serves_every_channel():
    """Merged IMEAN has no energy dependence: one row, looked up for every channel."""
    values = np.random.default_rng(2).uniform(1, 10, (1, 9, 9, 9)).astype(np.float32)
    one_row = AmplitudeLookup(AmplitudeGrid(values, np.array([-4, -4, -4])), "cpu")
    every_row = AmplitudeLookup(AmplitudeGrid(np.repeat(values, 3, axis=0), np.array([-4, -4, -4])), "cpu")
    repeated = same_for_every_channel(one_row, 3)
    assert repeated.intensity.shape == (3, 729) and repeated.intensity.data_ptr() == one_row.intensity.data_ptr()
    detector = Detector(64, 64, 2.0, 50.0, (64.0, 64.0))
    crystal = CrystalState(torch.as_tensor(np.diag([20.0, 22.0, 25.0]))[None], torch.tensor([5.0, 5.0, 5.0]),
                           torch.tensor(1.0))
    beam = Beam(torch.tensor([7100.0, 7110.0, 7120.0]), torch.tensor([1e11, 2e11, 1e11]), 3e-6, 1.0)
    fast, slow = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    expected = bragg_photons_dense(detector, beam, crystal, every_row, fast.reshape(-1), slow.reshape(-1))
    assert expected.max() > 0
    assert torch.equal(bragg_photons_dense(detector, beam, crystal, repeated, fast.reshape(-1), slow.reshape(-1)),
                       expected)
    with pytest.raises(ValueError, match="one-row amplitude table"):
        same_for_every_channel(every_row, 3)


@pytest.mark.parametrize("draw, spread_deg, worst", [("gaussian", 0.05, 0.04), ("nanobragg", 0.05 / 0.86, 0.12)])
def test_analytic_mosaic_spread_stands_for_the_drawn_domains(amplitude_table, draw, spread_deg, worst):
    """The one-domain model averaged in closed form over rotations of RMS eta (the draw's nodes)
    against 4,000 domains drawn as the simulator draws them: 2.5 % (gaussian, two nodes) and 8 %
    (nanoBragg's, one node) apart over the shoebox pixels (relative L2), where the unblurred model is
    about 50 % off; the same integrated photons; and exactly the unblurred model at eta 0."""
    lookup = lookup_for(amplitude_table, np.arange(20, 80, 6))
    synthetic = simulate_shot_pixels(lookup, LY99_ENERGIES_EV[np.arange(20, 80, 6)], amplitude_table.unit_cell,
                                     seed=4, n_rois=6)
    shot, matrix = synthetic.shot, synthetic.true_matrix
    beam = Beam(torch.as_tensor(shot.energies_ev), torch.as_tensor(shot.photons), 3e-6, 1.0)
    fast, slow = torch.as_tensor(shot.pixel_fast), torch.as_tensor(shot.pixel_slow)
    rotations = xtal.mosaic_rotations(4000, spread_deg, np.random.default_rng(0), draw)
    rms_deg = math.degrees(math.sqrt(np.mean(np.arccos(np.clip((np.trace(rotations, axis1=1, axis2=2) - 1) / 2,
                                                                  -1, 1)) ** 2)))
    ncells = torch.full((3,), 57.0, dtype=torch.float64)
    sampled = bragg_photons_dense(shot.detector, beam, CrystalState(torch.as_tensor(xtal.domain_matrices(
        matrix, rotations)), ncells, torch.tensor(90.0, dtype=torch.float64)), lookup, fast, slow)

    model = CrystalModel(matrix, 1, mosaic_model=draw)
    settings = Stage1Settings.from_config({"refine": ["G", "eta"], "mosaic_model": draw})
    values = torch.as_tensor(parameter_space(settings, model.start_cell, 90.0).start)
    values[NCELLS] = 57.0

    def photons(eta_deg):
        values[INDEX["eta_deg"]] = eta_deg
        return bragg_photons_dense(shot.detector, beam, model.crystal_state(values), lookup, fast, slow)

    plain = bragg_photons_dense(shot.detector, beam, CrystalModel(matrix, 1).crystal_state(values), lookup,
                                fast, slow)
    assert torch.allclose(photons(0.0), plain, rtol=1e-12, atol=0)
    averaged = photons(rms_deg)
    assert float((averaged - sampled).norm() / sampled.norm()) < worst
    assert float((plain - sampled).norm() / sampled.norm()) > 0.4
    assert float(averaged.sum() / sampled.sum()) == pytest.approx(1.0, abs=0.02)


def test_gradient_of_the_analytic_mosaic_spread_matches_central_differences(amplitude_table):
    lookup = lookup_for(amplitude_table, np.arange(20, 80, 6))
    synthetic = simulate_shot_pixels(lookup, LY99_ENERGIES_EV[np.arange(20, 80, 6)], amplitude_table.unit_cell,
                                     seed=4, n_rois=6, spread_deg=0.05, n_domains=25)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"]})
    problem = ShotProblem(synthetic.shot, settings, "cpu")
    problem.set_start_from_model(lookup)
    evaluate = shot_evaluator(problem, lookup)
    point = np.random.default_rng(0).uniform(-3, 3, problem.space.n_refined)
    _, gradient = evaluate(problem.space, point)
    scale = np.abs(gradient).max()
    for position, name in enumerate(settings.refined_names):
        offset = np.zeros_like(point)
        offset[position] = 1e-3
        central = (evaluate(problem.space, point + offset)[0] - evaluate(problem.space, point - offset)[0]) / 2e-3
        assert gradient[position] == pytest.approx(central, rel=1e-6, abs=1e-7 * scale), name


def test_mosaic_nodes_keep_eta_the_rms_angle():
    for draw, count in (("gaussian", 2), ("nanobragg", 1)):
        nodes = mosaic_nodes(draw)
        assert nodes.size == count and np.mean(nodes ** 2) == pytest.approx(1.0, rel=1e-12)
    # The half-normal's quartiles, 0.319 and 1.150 sigma, over their RMS.
    assert mosaic_nodes("gaussian") * math.sqrt((0.31863936 ** 2 + 1.15034938 ** 2) / 2) == pytest.approx(
        [0.31863936, 1.15034938], rel=1e-7)
    settings = Stage1Settings.from_config({"refine": ["G", "eta"]})
    assert settings.eta_model == "analytic" and settings.analytic_mosaic and settings.n_domains == 1
    domains = Stage1Settings.from_config({"refine": ["G", "eta"], "eta_model": "domains"})
    assert not domains.analytic_mosaic and domains.n_domains == 25
    assert not Stage1Settings.from_config({}).analytic_mosaic
