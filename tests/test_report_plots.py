"""The report's own figures (xfel_spread.report.plots) and their command-line entry points."""

import subprocess
import sys

import numpy as np
import pytest

from xfel_spread.report.plots import (CentroidResiduals, block_maximum, image_photons, plot_detector_refinement,
                                      plot_shot_with_predictions)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_block_maximum_keeps_a_one_pixel_spot_and_pads_the_edges():
    image = np.zeros((10, 7))
    image[9, 6] = 5.0  # in the last, partial block
    image[3, 1] = 2.0
    reduced, block = block_maximum(image, 4)
    assert block == 3  # ceil(10 / 4)
    assert reduced.shape == (4, 3)
    assert reduced[3, 2] == 5.0 and reduced[1, 0] == 2.0
    assert np.count_nonzero(reduced) == 2


def test_block_maximum_leaves_a_small_image_as_it_is():
    image = np.arange(12.0).reshape(3, 4)
    reduced, block = block_maximum(image, 400)
    assert block == 1 and np.array_equal(reduced, image)


def test_image_photons_removes_the_adc_offset_and_the_gain():
    photons = image_photons(np.array([[10, 30], [8, 110]], dtype=np.int32),
                            {"adc_offset_adu": 10, "gain_adu_per_photon": 2.0})
    assert photons.tolist() == [[0.0, 10.0], [-1.0, 50.0]]


def test_centroid_residuals_pool_and_rmsd_per_image():
    residuals = CentroidResiduals({0: np.array([[3.0, 4.0], [0.0, 0.0]]), 2: np.array([[1.0, 0.0]]),
                                   5: np.empty((0, 2))})
    assert residuals.all.shape == (3, 2)
    # sqrt(mean(|r|^2)): image 0 has |r|^2 = 25 and 0.
    assert residuals.rmsd_by_image() == pytest.approx({0: np.sqrt(12.5), 2: 1.0})


def test_figures_are_written_even_for_passes_without_spots(tmp_path):
    rng = np.random.default_rng(1)
    before = CentroidResiduals({0: rng.normal(0.3, 0.5, (40, 2)), 1: rng.normal(0.3, 0.5, (30, 2))})
    after = CentroidResiduals({0: rng.normal(0.0, 0.3, (40, 2))})
    plot_detector_refinement(tmp_path / "refinement.png", "psf", before, after)
    plot_detector_refinement(tmp_path / "empty.png", "psf", CentroidResiduals({}), CentroidResiduals({}))
    image = rng.poisson(5.0, (64, 64)).astype(float)
    plot_shot_with_predictions(tmp_path / "shot.png", "nopsf", image, np.array([[10.5, 20.5], [40.0, 8.0]]), 3)
    plot_shot_with_predictions(tmp_path / "unindexed.png", "nopsf", image, None, 0)
    for name in ("refinement", "empty", "shot", "unindexed"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.png", "refinement.png", "shot.png",
                                                                 "unindexed.png"]


def test_missing_input_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "shard_00000.h5"
    command = [sys.executable, "-c", "import sys; from xfel_spread.cli.report import plot_shot_main; "
               "sys.exit(plot_shot_main())", "--dataset", "psf", "--shard", str(missing),
               "--reindex-prefix", str(tmp_path / "shard_00000"), "--plot", str(tmp_path / "shot.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spread-plot-shot: error: ") and str(missing) in lines[0], lines
    assert not (tmp_path / "shot.png").exists()


def test_a_panel_cut_into_tiles_is_laid_out_as_the_panel_and_its_spots_move_with_it():
    """PanelLayout places each tile's pixels at their laboratory x, y: 2 x 2 abutting tiles of a panel give
    back the panel's image, and a spot on a tile lands where it is on the panel."""
    from xfel_spread.dials.plots import laid_out
    from xfel_spread.sim.geometry import Detector, MultiPanelDetector

    panel = Detector(12, 10, 0.1, 100.0, (0.55, 0.45))
    tiles = MultiPanelDetector.split(panel, 2, 2)
    detector = {"pixel_size_mm": 0.1, "panel_origin_mm": [list(t.origin_mm) for t in tiles.panels],
                "panel_fast_axis": [list(t.fast_axis) for t in tiles.panels],
                "panel_slow_axis": [list(t.slow_axis) for t in tiles.panels]}
    image = np.arange(120.0).reshape(10, 12)
    cut = np.stack([image[:5, :6], image[:5, 6:], image[5:, :6], image[5:, 6:]])
    spots = (np.array([[1.5, 2.25], [0.5, 4.5]]), np.array([[1.4, 2.2]]), np.array([3, 0]))
    picture, (predicted, observed) = laid_out(cut, detector, spots)
    assert np.array_equal(picture, image)
    assert np.allclose(predicted, [[7.5, 7.25], [0.5, 4.5]]) and np.allclose(observed, [[7.4, 7.2]])
    # One panel: as it is.
    same, (p, o) = laid_out(image, detector, spots)
    assert same is image and p is spots[0] and o is spots[1]


def test_image_photons_takes_per_panel_gain_and_offset():
    image = np.full((2, 3, 3), 30.0)
    photons = image_photons(image, {"adc_offset_adu": [10.0, 0.0], "gain_adu_per_photon": [2.0, 3.0]})
    assert np.allclose(photons[0], 10.0) and np.allclose(photons[1], 10.0)
