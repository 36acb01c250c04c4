"""The forward model on multi-panel detectors (sim.geometry.MultiPanelDetector): a panel cut into
abutting tiles gives the single panel's image, dense equals sparse on tilted and shifted tiles,
gradients agree with finite differences, and dxtbx detectors (the real CSPAD) are read panel by panel."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sim_fixtures import DISTANCE_MM, LY99_ENERGIES_EV, crystal_state, lookup_for, make_beam, random_orientation

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import CrystalState, bragg_photons_dense, bragg_photons_sparse, pixel_factors
from xfel_spread.sim.geometry import Detector, MultiPanelDetector, Panel, cspad_like_layout

#: The coarse panel of test_forward_model: 100 x 100 pixels of 1.5 mm at the LY99 distance.
SMALL_DETECTOR = Detector(100, 100, 1.5, DISTANCE_MM, (75.3, 74.6), thickness_mm=0.032, attenuation_length_mm=0.017)
TEN_CHANNELS = np.arange(0, 100, 11)
CSPAD_CBF = (Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "thermolysin_cspad"
             / "idx-20130301060858401.cbf")


@pytest.fixture(scope="module")
def ten_channel_lookup(amplitude_table):
    return lookup_for(amplitude_table, TEN_CHANNELS)


def ten_channel_beam(seed=1):
    photons = np.random.default_rng(seed).exponential(1.0, TEN_CHANNELS.size)
    return make_beam(LY99_ENERGIES_EV[TEN_CHANNELS], photons * 1e12 / photons.sum())


def panel_pixels(detector: MultiPanelDetector):
    """(panel, fast, slow) of every pixel, panel-major then image order."""
    panel, fast, slow = [], [], []
    for index, tile in enumerate(detector.panels):
        tile_slow, tile_fast = torch.meshgrid(torch.arange(tile.n_slow), torch.arange(tile.n_fast), indexing="ij")
        panel.append(torch.full((tile.n_slow * tile.n_fast,), index))
        fast.append(tile_fast.reshape(-1))
        slow.append(tile_slow.reshape(-1))
    return torch.cat(panel), torch.cat(fast), torch.cat(slow)


def dense_images(detector, beam, crystal, lookup):
    panel, fast, slow = panel_pixels(detector)
    flat = bragg_photons_dense(detector, beam, crystal, lookup, fast, slow, panel)
    return tuple(flat[int(detector.pixel_offsets[p]):int(detector.pixel_offsets[p + 1])]
                 .reshape(tile.n_slow, tile.n_fast) for p, tile in enumerate(detector.panels))


def test_one_panel_cut_into_four_gives_the_same_image(amplitude_table, ten_channel_lookup):
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, 10.0, n_domains=5, spread_deg=0.5, seed=4)
    beam = ten_channel_beam()
    single = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, ten_channel_lookup)
    tiles = MultiPanelDetector.split(SMALL_DETECTOR, 2, 2)
    assert [(t.n_fast, t.n_slow) for t in tiles.panels] == [(50, 50)] * 4
    sparse = bragg_photons_sparse(tiles, beam, crystal, ten_channel_lookup)
    dense = dense_images(tiles, beam, crystal, ten_channel_lookup)
    assembled = torch.cat((torch.cat(sparse[:2], dim=1), torch.cat(sparse[2:], dim=1)), dim=0)
    assembled_dense = torch.cat((torch.cat(dense[:2], dim=1), torch.cat(dense[2:], dim=1)), dim=0)
    peak = float(single.max())
    assert peak > 10.0 and int((single > 1e-3 * peak).sum()) > 100
    # Measured: 1.6e-12 of the peak for both (rounding of the positions, origin + x p against
    # corner + (x - x0) p).
    assert float((assembled - single).abs().max()) / peak < 1e-9
    assert float((assembled_dense - single).abs().max()) / peak < 1e-9
    # The one-panel multi-panel detector is the single panel to rounding too.
    one = bragg_photons_sparse(MultiPanelDetector.from_single(SMALL_DETECTOR), beam, crystal, ten_channel_lookup)
    assert len(one) == 1 and float((one[0] - single).abs().max()) / peak < 1e-9


def test_gaps_drop_exactly_their_pixels(amplitude_table, ten_channel_lookup):
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, 10.0, n_domains=2, spread_deg=0.3, seed=4)
    beam = ten_channel_beam()
    single = bragg_photons_sparse(SMALL_DETECTOR, beam, crystal, ten_channel_lookup).numpy()
    tiles = MultiPanelDetector.split(SMALL_DETECTOR, 2, 2, gap_px=4)
    assert [(t.n_fast, t.n_slow) for t in tiles.panels] == [(48, 48)] * 4
    images = bragg_photons_sparse(tiles, beam, crystal, ten_channel_lookup)
    for image, (x0, y0) in zip(images, [(0, 0), (52, 0), (0, 52), (52, 52)]):
        assert np.abs(image.numpy() - single[y0:y0 + 48, x0:x0 + 48]).max() < 1e-9 * single.max()


@pytest.mark.parametrize("ncells", [10.0, 5.0])  # N = 5 takes the rounding-check path
def test_sparse_equals_dense_on_tilted_shifted_tiles(amplitude_table, ten_channel_lookup, ncells):
    """A CSPAD-like 64-tile layout (quadrants turned by 90 degrees, tiles shifted and tilted) with
    coarse pixels so that the tiles reach 2theta ~ 40 degrees."""
    detector = cspad_like_layout(distance_mm=DISTANCE_MM, pixel_size_mm=1.0, tile_shape=(24, 22), gap_px=2,
                                 shift_px=1.0, tilt_deg=2.0, seed=1, thickness_mm=0.032, attenuation_length_mm=0.017)
    assert len(detector) == 64
    # Tilt a few tiles out of plane as well (the forward model takes any panel orientation).
    panels = list(detector.panels)
    for index in (0, 17, 40):
        tile = panels[index]
        turn = xtal.axis_angle_rotation(np.asarray(tile.fast_axis), np.radians(8.0))
        panels[index] = Panel(tile.origin_mm, tile.fast_axis, tuple(turn @ np.asarray(tile.slow_axis)),
                              tile.pixel_size_mm, tile.n_fast, tile.n_slow, tile.thickness_mm,
                              tile.attenuation_length_mm, tile.name)
    detector = MultiPanelDetector(panels)
    matrix = random_orientation(amplitude_table.unit_cell, seed=3)
    crystal = crystal_state(matrix, ncells, n_domains=5, spread_deg=0.5, seed=4)
    beam = ten_channel_beam()
    sparse = bragg_photons_sparse(detector, beam, crystal, ten_channel_lookup)
    dense = dense_images(detector, beam, crystal, ten_channel_lookup)
    peak = max(float(image.max()) for image in dense)
    lit = sum(int((image > 1e-3 * peak).sum()) for image in dense)
    lit_panels = sum(int((image > 1e-3 * peak).any()) for image in dense)
    assert peak > 10.0 and lit > 100 and lit_panels > 20
    assert max(float((s - d).abs().max()) for s, d in zip(sparse, dense)) / peak < 1e-9


def test_pixel_geometry_of_a_tilted_panel():
    """Position, solid angle and capture of a pixel of a panel turned 30 degrees about fast, written out."""
    angle = np.radians(30.0)
    slow_axis = (0.0, -np.cos(angle), np.sin(angle))
    panel = Panel((-10.0, 20.0, -100.0), (1.0, 0.0, 0.0), slow_axis, 0.5, 40, 60, 0.3, 0.2)
    detector = MultiPanelDetector([panel])
    directions, factor = pixel_factors(detector, torch.tensor([7]), torch.tensor([11]), 0.9, torch.tensor([0]))
    position = np.array([-10.0, 20.0, -100.0]) + 7.5 * 0.5 * np.array([1.0, 0, 0]) + 11.5 * 0.5 * np.array(slow_axis)
    radius = np.linalg.norm(position)
    direction = position / radius
    normal = np.cross((1.0, 0.0, 0.0), slow_axis)
    cosine = abs(direction @ normal)
    omega = 0.25 * cosine / radius ** 2
    capture = 1 - np.exp(-0.3 / (0.2 * cosine))
    polar = 0.9 * (1 - direction[0] ** 2) + 0.1 * (1 - direction[1] ** 2)
    assert np.allclose(directions.numpy()[0], direction, rtol=1e-14)
    assert float(factor[0]) == pytest.approx(polar * omega * capture, rel=1e-13)


def test_gradients_match_finite_differences_on_tiles(amplitude_table):
    channels = np.arange(40, 60, 2)
    lookup = lookup_for(amplitude_table, channels)
    hkl = lookup.nonzero_indices()
    detector = MultiPanelDetector.split(Detector(64, 64, 2.0, DISTANCE_MM, (64.3, 63.8)), 2, 2, gap_px=2,
                                        shift_px=0.5, seed=2)
    start = torch.as_tensor(random_orientation(amplitude_table.unit_cell, seed=3))
    rotations = torch.as_tensor(xtal.mosaic_rotations(3, 0.3, np.random.default_rng(3)))
    photons = np.random.default_rng(1).exponential(1.0, channels.size) * 1e11
    beam = make_beam(LY99_ENERGIES_EV[channels], photons)
    weights = [torch.as_tensor(np.random.default_rng(5 + p).uniform(0.5, 1.5, (31, 31))) for p in range(4)]

    def rotation_from_vector(vector):
        skew = torch.zeros(3, 3, dtype=vector.dtype)
        skew[0, 1], skew[0, 2], skew[1, 2] = -vector[2], vector[1], -vector[0]
        return torch.linalg.matrix_exp(skew - skew.T)

    def weighted_sum(rotation_vector, ncells, scale, shift):
        matrix = (rotation_from_vector(rotation_vector) @ start.T).T
        crystal = CrystalState(torch.einsum("dij,rj->dri", rotations, matrix), ncells, scale)
        images = bragg_photons_sparse(detector.shifted(shift), beam, crystal, lookup, hkl)
        return sum((image * weight).sum() for image, weight in zip(images, weights))

    inputs = (torch.tensor([1e-4, -2e-4, 3e-4], dtype=torch.float64, requires_grad=True),
              torch.tensor([12.0, 11.0, 13.0], dtype=torch.float64, requires_grad=True),
              torch.tensor(50.0, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.1, dtype=torch.float64, requires_grad=True))
    value = float(weighted_sum(*inputs).detach())
    assert value > 100.0
    assert torch.autograd.gradcheck(lambda *x: weighted_sum(*x) / value, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    gradient = torch.autograd.grad(weighted_sum(*inputs), inputs)
    assert float(gradient[2]) == pytest.approx(value / 50.0, rel=1e-12)
    assert float(gradient[3].abs()) > 1e-3 * value  # the distance moves the spots


@pytest.mark.skipif(not CSPAD_CBF.is_file(), reason="the shared CSPAD still is absent")
def test_reads_the_real_cspad_panel_by_panel():
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_filenames([str(CSPAD_CBF)])
    dxtbx_detector = experiments[0].detector
    detector = MultiPanelDetector.from_dxtbx(dxtbx_detector)
    assert len(detector) == len(dxtbx_detector) == 64
    panel, fast, slow = torch.tensor([0, 13, 63]), torch.tensor([0, 100, 193]), torch.tensor([0, 50, 184])
    positions = detector.pixel_centres_mm(fast, slow, panel).numpy()
    for row in range(3):
        # get_lab_coord takes millimetres in the panel (get_pixel_lab_coord would add CSPAD's parallax).
        tile = dxtbx_detector[int(panel[row])]
        pixel_mm = tile.get_pixel_size()[0]
        expected = tile.get_lab_coord(((int(fast[row]) + 0.5) * pixel_mm, (int(slow[row]) + 0.5) * pixel_mm))
        assert np.allclose(positions[row], expected, atol=1e-9)
    # Projection of a ray back onto its panel gives the pixel coordinates dxtbx gives.
    direction = torch.as_tensor(positions / np.linalg.norm(positions, axis=1, keepdims=True))
    fast_px, slow_px, towards, _, _ = detector.project_directions_px(direction)
    for row in range(3):
        p = int(panel[row])
        assert bool(towards[p, row])
        assert float(fast_px[p, row]) == pytest.approx(int(fast[row]) + 0.5, abs=1e-9)
        assert float(slow_px[p, row]) == pytest.approx(int(slow[row]) + 0.5, abs=1e-9)
