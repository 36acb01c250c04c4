"""The level-0 detector refined jointly with many lattices from their shoebox pixels
(stage1.metrology.refine_detector), on shots simulated with the project's simulator."""

import numpy as np
import pytest
import torch
from sim_fixtures import LY99_ENERGIES_EV, lookup_for

from xfel_spread.stage1.metrology import detector_uncertainty, moved_detector, refine_detector
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.synthetic import LY99_DETECTOR, simulate_shot_pixels, with_start

FEW_CHANNELS = np.arange(20, 80, 6)
#: Lattices of the recovery and control test (six took 32 and 14 s; three pin the shift as well)
N_LATTICES = 3


def imaged_shots(amplitude_table, lookup, true_detector, start_detector, n_lattices: int) -> list:
    """Lattices 1..n imaged on ``true_detector`` (10 shoeboxes each), started from their true crystals
    on ``start_detector``."""
    shots = []
    for seed in range(1, n_lattices + 1):
        synthetic = simulate_shot_pixels(lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell, seed=seed,
                                         n_rois=10, detector=true_detector)
        shots.append(with_start(synthetic.shot, synthetic.true_matrix, start_detector))
    return shots


def test_moved_detector_is_the_offset_detector_and_carries_gradients():
    shift = torch.tensor([0.5, -0.25, 0.3], dtype=torch.float64, requires_grad=True)
    moved = moved_detector(LY99_DETECTOR, shift)
    offset = LY99_DETECTOR.with_beam_center_offset_px((0.5, -0.25))
    fast, slow = torch.tensor([0, 100, 1500]), torch.tensor([7, 900, 1200])
    expected = offset.pixel_centres_mm(fast, slow)
    expected[:, 2] -= 0.3
    positions = moved.pixel_centres_mm(fast, slow)
    assert torch.allclose(positions, expected, rtol=0, atol=1e-12)
    positions.sum().backward()
    # Moving the beam centre along fast moves the pixels along -x, along slow along +y (the origin
    # is (-beam_x, beam_y, -distance)); the panel moves along -z: per pixel -p, +p, -1.
    pixel = LY99_DETECTOR.pixel_size_mm
    assert shift.grad.tolist() == pytest.approx([-3 * pixel, 3 * pixel, -3])


@pytest.mark.slow  # two refinements of six lattices: up to a minute each on one busy core
@pytest.mark.parametrize("offset_px, method", [(0.5, "joint"), (0.0, "profile")])
def test_a_half_pixel_beam_centre_offset_is_recovered_and_none_is_not_invented(amplitude_table, offset_px, method):
    """Three lattices imaged with the beam centre ``offset_px`` off the nominal one along fast and
    slow, refined on the nominal detector: the joint refinement finds the offset (and no distance
    shift), and the profile one (the default) finds none on the control. (The profile method finding
    the offset: the test below, and tests/test_pixel_metrology.py through the rule's driver.)"""
    lookup = lookup_for(amplitude_table, FEW_CHANNELS)
    true_detector = LY99_DETECTOR.with_beam_center_offset_px((offset_px, offset_px))
    shots = imaged_shots(amplitude_table, lookup, true_detector, LY99_DETECTOR, N_LATTICES)
    fit = refine_detector(shots, lookup, Stage1Settings.from_config({}), method=method)
    assert fit.converged, fit.reason
    assert fit.kept == list(range(N_LATTICES))
    assert fit.shift[:2] == pytest.approx([offset_px, offset_px], abs=0.02)
    assert abs(fit.shift[2]) < 0.02
    assert fit.nll_final <= fit.nll_start


def test_the_standard_errors_of_a_mean_are_the_assumed_noise_and_the_measured_scatter():
    """detector_uncertainty on the mean of n numbers y_i, each NLL (y_i - x)^2 / 2 with unit assumed
    noise: the curvature is n, lattice i's gradient x - y_i. The model error is 1 / sqrt(n) whatever
    the numbers; the robust one is their sample standard deviation over sqrt(n), here about 3 / sqrt(n)."""
    rng = np.random.default_rng(7)
    y = rng.normal(0.0, 3.0, size=400)
    x = y.mean()
    model, robust = detector_uncertainty(np.array([[len(y)]]), (x - y)[:, None])
    assert model == pytest.approx([1 / np.sqrt(len(y))])
    assert robust == pytest.approx([y.std(ddof=1) / np.sqrt(len(y))])
    assert 2.7 / np.sqrt(len(y)) < robust[0] < 3.3 / np.sqrt(len(y))
    # Two independent parameters: each its own mean; one lattice has no scatter; no minimum, no errors.
    z = rng.normal(0.0, 0.5, size=400)
    model, robust = detector_uncertainty(np.diag([400.0, 400.0]), np.stack((x - y, z.mean() - z), axis=1))
    assert robust == pytest.approx([y.std(ddof=1) / 20, z.std(ddof=1) / 20], rel=1e-9)
    assert detector_uncertainty(np.array([[4.0]]), np.array([[0.5]])) == (pytest.approx([0.5]), None)
    assert detector_uncertainty(np.diag([1.0, -1.0]), np.zeros((3, 2))) == (None, None)


@pytest.mark.slow  # two lattices refined a few dozen times: about 30 s on one busy core
def test_the_profile_method_recovers_the_offset_where_its_first_trial_step_loses_the_spots(amplitude_table):
    """method="profile": L-BFGS-B over the detector alone, each lattice re-refined on every detector
    tried. Its line search's first trial can run to the bounds (5 px off; it did on 25 lattices), where
    the lattices lose their spots; every evaluation restarts the lattices from the best detector's
    minima, so the refinement still finds the 0.5 px offset, in a few iterations."""
    lookup = lookup_for(amplitude_table, FEW_CHANNELS)
    true_detector = LY99_DETECTOR.with_beam_center_offset_px((0.5, 0.5))
    shots = imaged_shots(amplitude_table, lookup, true_detector, LY99_DETECTOR, 2)
    fit = refine_detector(shots, lookup, Stage1Settings.from_config({}), method="profile")
    assert fit.converged, fit.reason
    assert fit.kept == [0, 1]
    assert fit.shift[:2] == pytest.approx([0.5, 0.5], abs=0.02) and abs(fit.shift[2]) < 0.02
    assert fit.nll_final < 0.1 * fit.nll_start
    assert fit.n_iterations < 50
    assert len(fit.values) == 2 and all(np.all(np.isfinite(values)) for values in fit.values)
    # Standard errors (on by default): the exact model's photon noise leaves about 0.0003 px and 0.001 mm
    # (measured), which the 0.5 px offset recovered must agree with; two lattices do give a robust one.
    assert fit.sigma_model is not None and fit.sigma_robust is not None
    assert np.all((1e-5 < fit.sigma_model) & (fit.sigma_model < [0.01, 0.01, 0.01]))
    assert np.all(np.abs(fit.shift - [0.5, 0.5, 0.0]) < 5 * fit.sigma_model)
    assert np.all(np.isfinite(fit.sigma_robust))
    with pytest.raises(ValueError, match="method 'newton'"):
        refine_detector(shots, lookup, Stage1Settings.from_config({}), method="newton")


def test_a_tiled_detector_moves_rigidly_as_the_panel_it_was_cut_from():
    """moved_detector on a MultiPanelDetector (2 x 2 abutting tiles of the LY99 panel) moves every tile by
    one laboratory vector: each tile pixel lands where the moved single panel puts the same pixel, and
    the shift's gradient is the panel's."""
    from xfel_spread.sim.geometry import MultiPanelDetector

    tiles = MultiPanelDetector.split(LY99_DETECTOR, 2, 2)
    shift = torch.tensor([0.5, -0.25, 0.3], dtype=torch.float64, requires_grad=True)
    moved = moved_detector(tiles, shift)
    panel = torch.tensor([0, 1, 2, 3])
    fast, slow = torch.tensor([5, 100, 7, 1900]), torch.tensor([9, 3, 1000, 1800])
    positions = moved.pixel_centres_mm(fast, slow, panel)
    corners = [(0, 0), (1920, 0), (0, 1920), (1920, 1920)]  # each tile's first pixel on the panel
    panel_fast = fast + torch.tensor([corners[p][0] for p in panel.tolist()])
    panel_slow = slow + torch.tensor([corners[p][1] for p in panel.tolist()])
    with torch.no_grad():
        expected = moved_detector(LY99_DETECTOR, shift.detach()).pixel_centres_mm(panel_fast, panel_slow)
    assert torch.allclose(positions, expected, rtol=0, atol=1e-9)
    positions.sum().backward()
    pixel = LY99_DETECTOR.pixel_size_mm
    assert shift.grad.tolist() == pytest.approx([-4 * pixel, 4 * pixel, -4])
    # The original is untouched, and moves compose.
    assert tiles.translation_mm is None
    twice = moved_detector(moved, shift.detach())
    assert torch.allclose(twice.pixel_centres_mm(fast, slow, panel) - positions.detach(),
                          positions.detach() - tiles.pixel_centres_mm(fast, slow, panel), atol=1e-9)


@pytest.mark.slow  # two lattices on four tiles refined a few dozen times
def test_the_profile_method_recovers_the_offset_of_a_tiled_detector(amplitude_table):
    """Two lattices imaged on 2 x 2 tiles (gaps of 4 px, each tile moved up to 0.3 px in its plane, as the
    metrology found them) all moved by the beam-centre offset (0.5, 0.5) px, refined from the unmoved
    tiles: the rigid level-0 move recovers the offset."""
    from xfel_spread.sim.geometry import MultiPanelDetector

    lookup = lookup_for(amplitude_table, FEW_CHANNELS)
    nominal = MultiPanelDetector.split(LY99_DETECTOR, 2, 2, gap_px=4, shift_px=0.3, seed=3)
    true_detector = nominal.moved(offset_px=(0.5, 0.5))
    shots = imaged_shots(amplitude_table, lookup, true_detector, nominal, 2)
    fit = refine_detector(shots, lookup, Stage1Settings.from_config({}), method="profile")
    assert fit.converged, fit.reason
    assert fit.kept == [0, 1]
    assert fit.shift[:2] == pytest.approx([0.5, 0.5], abs=0.02) and abs(fit.shift[2]) < 0.02


def test_the_written_tiled_detector_moves_every_panel_by_the_refined_vector():
    """moved_dials_detector on the real CSPAD's 64 panels: the hierarchy's root moves, so every panel's
    origin moves by the one laboratory vector the forward model moved (and the axes stay); the table's
    beam centre (on panel 0's plane, along the laboratory axes) moves by the shift."""
    from conftest import CSPAD_DIR
    from dxtbx.model.experiment_list import ExperimentListFactory

    from xfel_spread.sim.geometry import MultiPanelDetector
    from xfel_spread.stage1.metrology import level0_translation_mm
    from xfel_spread.stage1.pixel_metrology import detector_rows, moved_dials_detector

    files = sorted(CSPAD_DIR.glob("*.cbf"))
    if not files:
        pytest.skip("needs the CSPAD stills")
    dials_detector = ExperimentListFactory.from_filenames([str(files[0])])[0].detector
    shift = np.array([0.5, -0.25, 0.3])
    moved = moved_dials_detector(dials_detector, shift)
    vector = level0_translation_mm(shift, dials_detector[0].get_pixel_size()[0]).numpy()
    assert len(moved) == 64
    for before, after in zip(dials_detector, moved):
        assert np.allclose(np.subtract(after.get_origin(), before.get_origin()), vector, atol=1e-9)
        assert np.allclose(after.get_fast_axis(), before.get_fast_axis(), atol=1e-12)
    start = MultiPanelDetector.from_dxtbx(dials_detector)
    rows = {row["quantity"]: row for row in detector_rows(start, moved_detector(start, torch.as_tensor(shift)))}
    # Panel 0 is turned in the plane (the CSPAD's quadrants are) and tilted by a fraction of a degree: along
    # the laboratory axes its beam centre moves by the shift to the tilt's cosine.
    assert [rows["beam_centre_fast_px"]["change"], rows["beam_centre_slow_px"]["change"]] == pytest.approx(
        [0.5, -0.25], abs=1e-3)
    assert rows["distance_mm"]["change"] == pytest.approx(0.3, abs=1e-3)


def test_the_detectors_lattices_are_refined_without_free_domains(amplitude_table, monkeypatch):
    """stage1.free_domains (on in the demo config) is not refined for the detector: the joint refinement
    models each lattice as one crystal with its eta, so step 1 refines that model alone."""
    from xfel_spread.stage1 import refine

    def no_free_domains(*args, **kwargs):
        raise AssertionError("free domains refined for the detector")

    monkeypatch.setattr(refine, "refine_free_domains", no_free_domains)
    lookup = lookup_for(amplitude_table, FEW_CHANNELS)
    shots = imaged_shots(amplitude_table, lookup, LY99_DETECTOR, LY99_DETECTOR, 1)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"], "free_domains": 3})
    assert refine.refine_shot(shots[0], lookup, settings).reason == "AssertionError: free domains refined for the detector"
    fit = refine_detector(shots, lookup, settings, max_iterations=2, uncertainty=False)
    (single,) = fit.single_fits
    assert single.converged, single.reason
    assert single.domain_vectors_deg is None
