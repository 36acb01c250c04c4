"""Stage 1 on multi-panel detectors: shoeboxes live on their reflection's panel, the point spread
stays inside a panel, and the refinement recovers a shot on four tiles as well as on one panel."""

import dataclasses

import numpy as np
import pytest
import torch
from sim_fixtures import LY99_ENERGIES_EV, lookup_for

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.geometry import MultiPanelDetector
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.refine import refine_shot
from xfel_spread.stage1.rois import assign_box_pixels, panel_box_pixels, shoebox_bounds
from xfel_spread.stage1.synthetic import LY99_DETECTOR, perturbed_matrix, simulate_shot_pixels, with_start

FEW_CHANNELS = np.arange(20, 80, 6)
#: LY99's panel cut into 2 x 2 tiles, 6 px gaps, each tile moved by up to 2 px (seeded).
FOUR_TILES = MultiPanelDetector.split(LY99_DETECTOR, 2, 2, gap_px=6, shift_px=2.0, seed=3)


@pytest.fixture(scope="module")
def few_lookup(amplitude_table):
    return lookup_for(amplitude_table, FEW_CHANNELS)


def test_a_box_crossing_a_tile_edge_keeps_only_its_own_panel():
    """Two 40 x 30 tiles side by side; a spot 2 px from tile 0's right edge, another on tile 1 whose
    box covers the same pixel coordinates there (a different place), a third on tile 1."""
    detector = MultiPanelDetector.split(dataclasses.replace(LY99_DETECTOR, n_fast=80, n_slow=30), 2, 1)
    centroids = np.array([[38.0, 15.0], [34.0, 15.0], [3.0, 15.2]])
    panels = np.array([0, 1, 1])
    bounds, pixels = panel_box_pixels(detector, panels, centroids, 12)
    # The box on tile 0 is clipped at its edge (x < 40): 8 columns, not 12; nothing from tile 1.
    assert bounds.tolist() == [[32, 40, 9, 21], [28, 40, 9, 21], [0, 9, 9, 21]]
    mine = pixels.roi == 0
    assert set(pixels.panel[mine]) == {0} and pixels.fast[mine].max() == 39 and mine.sum() == 8 * 12
    # Boxes 1 and 2 share tile 1 and do not overlap; box 1 keeps its 12 x 12 pixels although box 0
    # covers some of the same coordinates on the other panel.
    assert (pixels.roi == 1).sum() == 144 and set(pixels.panel[pixels.roi == 1]) == {1}
    assert not pixels.in_other_spot[pixels.roi == 1].any()
    # Without panels (one panel's frame) the first two boxes would fight over the same pixels.
    flat = assign_box_pixels(shoebox_bounds(centroids, 12, 80, 30), centroids, 3.0)
    assert (flat.roi == 1).sum() < 144


def test_point_spread_stays_inside_a_panel():
    psf = DetectorPsf(0.1, 3)
    fast = np.array([10, 11, 10, 11])
    slow = np.array([5, 5, 5, 5])
    panel = np.array([0, 0, 1, 1])
    matrix = psf.spread_matrix(fast, slow, 0.088, "cpu", panel).to_dense().numpy()
    # Pixels 0, 1 (panel 0) and 2, 3 (panel 1) are neighbours within their panel only.
    assert matrix[0, 1] > 0 and matrix[2, 3] > 0
    assert matrix[0, 2] == 0 and matrix[0, 3] == 0 and matrix[1, 2] == 0
    single = psf.spread_matrix(fast[:2], slow[:2], 0.088, "cpu").to_dense().numpy()
    assert np.array_equal(matrix[:2, :2], single)


def test_four_tiles_recover_the_orientation_as_well_as_one_panel(amplitude_table, few_lookup):
    """The same crystal and spectrum on LY99's single panel and on four shifted tiles with gaps,
    refined from the same start (0.05 degrees and 0.3 % off)."""
    fits = {}
    for name, detector in (("single", LY99_DETECTOR), ("tiles", FOUR_TILES)):
        synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell,
                                         seed=4, n_rois=10, detector=detector)
        start = perturbed_matrix(synthetic.true_matrix, seed=2, rotation_deg=0.05, cell_fraction=0.003)
        fit = refine_shot(with_start(synthetic.shot, start), few_lookup,
                          Stage1Settings.from_config({"initial": {"ncells": [57, 57, 57]}}))
        assert fit.converged, fit.reason
        fits[name] = (fit, xtal.misorientation_deg(fit.real_space_matrix, synthetic.true_matrix),
                      xtal.misorientation_deg(start, synthetic.true_matrix), synthetic)
    tiles_fit, tiles_error, tiles_start, synthetic = fits["tiles"]
    single_fit, single_error, _, _ = fits["single"]
    # The ROIs spread over more than one tile.
    assert len(set(synthetic.shot.roi_panel.tolist())) >= 2
    assert tiles_start > 0.05
    print(f"misorientation after: single panel {single_error:.5f} deg, four tiles {tiles_error:.5f} deg; "
          f"rmsd {single_fit.rmsd_px:.4f} / {tiles_fit.rmsd_px:.4f} px")
    assert tiles_error < 0.005 and tiles_error < 2 * single_error + 0.001
    assert tiles_fit.rmsd_px < 0.1 and tiles_fit.rmsd_px_start > 0.5


def test_distance_shift_on_tiles(amplitude_table, few_lookup):
    """The tiles claimed 0.3 mm too close; refining detz_shift moves all four back together."""
    synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell,
                                     seed=4, n_rois=10, detector=FOUR_TILES)
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "detz_shift"],
                                           "initial": {"ncells": [57, 57, 57]}})
    fit = refine_shot(with_start(synthetic.shot, synthetic.true_matrix, FOUR_TILES.shifted(-0.3)), few_lookup,
                      settings)
    assert fit.converged, fit.reason
    assert fit.final["detz_shift_mm"] == pytest.approx(0.3, abs=0.03)
    assert fit.distance_mm == pytest.approx(FOUR_TILES.distance_mm, abs=0.03)


def test_batched_model_equals_the_single_shot_model_on_tiles(amplitude_table, few_lookup):
    from xfel_spread.stage1.batched import BatchedForwardModel
    from xfel_spread.stage1.refine import ShotProblem

    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "detz_shift"]})
    problems = []
    for seed in (4, 5):
        synthetic = simulate_shot_pixels(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], amplitude_table.unit_cell,
                                         seed=seed, n_rois=6, detector=FOUR_TILES)
        problem = ShotProblem(synthetic.shot, settings, "cpu")
        problem.set_start_from_model(few_lookup)
        problems.append(problem)
    model = BatchedForwardModel(few_lookup, LY99_ENERGIES_EV[FEW_CHANNELS], "cpu", gathered=True)
    model.load(problems)
    values = torch.stack([torch.as_tensor(problem.start_values) for problem in problems])
    values[:, -1] = torch.tensor([0.2, -0.1], dtype=torch.float64)
    batched, pixels, rows = model.bragg([0, 1], values, trusted=True)
    for row, problem in enumerate(problems):
        single = problem.bragg(values[row], few_lookup)
        assert float(single.max()) > 10
        assert torch.allclose(batched[rows == row], single, rtol=1e-9, atol=1e-12 * float(single.abs().max()))
