"""The simulator on a tiled detector (simulate.detector.tiles): the tiles' images are the single
panel's pixels, the shard records the nominal tiles, and dxtbx (FormatSPREADShard) returns them as
a multi-panel detector with one image per panel."""

import numpy as np
import pytest
from sim_fixtures import ly99_amplitudes
from conftest import CSPAD_DIR
from tiny_config import tiny_config

from xfel_spread.config import load_config
from xfel_spread.io.shard import read_shard_image, read_shard_metadata
from xfel_spread.sim.geometry import MultiPanelDetector
from xfel_spread.workflow import RunSettingsError, check_tiles

TILES = {"fast": 2, "slow": 2, "gap_px": 2, "shift_px": 1.0, "seed": 5}


def tiled_config(**tiles):
    config = tiny_config(seed=3, n_shots=2, shots_per_shard=2,
                         background={"water_thickness_mm": 0.002, "air_path_mm": 0.2})
    config["simulate"]["detector"]["tiles"] = tiles
    return load_config(config)


@pytest.fixture(scope="module")
def amplitudes(tmp_path_factory):
    from xfel_spread.sim.structure_factors import save_channel_amplitudes

    path = tmp_path_factory.mktemp("amplitudes") / "amplitudes.h5"
    save_channel_amplitudes(ly99_amplitudes(), path)
    return str(path)


@pytest.fixture(scope="module")
def tiled_shard(tmp_path_factory, amplitudes):
    from xfel_spread.sim.shard import setup_from_config, simulate_shard

    directory = tmp_path_factory.mktemp("tiled")
    setup = setup_from_config(tiled_config(**TILES), amplitudes)
    paths = {dataset: str(directory / f"{dataset}.h5") for dataset in ("nopsf", "psf")}
    simulate_shard(setup, 0, 2, paths, str(directory / "truth.json"))
    return setup, paths


def test_tiles_without_moves_render_the_single_panels_pixels(amplitudes):
    from xfel_spread.sim.shard import draw_crystal, expected_photons, setup_from_config, shot_spectrum

    single = setup_from_config(tiled_config(), amplitudes)
    tiled = setup_from_config(tiled_config(fast=2, slow=2, gap_px=2), amplitudes)
    assert single.true_tiles is None and len(tiled.true_tiles) == 4
    photons = shot_spectrum(single, 1)
    truth = draw_crystal(single, 1)
    panel = expected_photons(single, truth, photons).numpy()
    tiles = expected_photons(tiled, truth, photons).numpy()
    assert tiles.shape == (4, 127, 127)
    # Tile (j, i) holds pixels [129 i, 129 i + 127) x [129 j, ...) of the panel (2 px gap at 127, 128).
    for index, (j, i) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = panel[129 * j:129 * j + 127, 129 * i:129 * i + 127]
        # Measured: 1e-13 relative (rounding of the positions).
        assert np.abs(tiles[index] - block).max() <= 1e-9 * panel.max()
    assert panel.max() > 100  # Bragg spots above the background


def test_shard_records_the_nominal_tiles_and_dxtbx_returns_them(tiled_shard):
    from dxtbx.model.experiment_list import ExperimentListFactory

    setup, paths = tiled_shard
    metadata = read_shard_metadata(paths["nopsf"])
    assert metadata.detector["n_panels"] == 4 and metadata.detector["n_fast"] == 127
    assert read_shard_image(paths["psf"], 1).shape == (4, 127, 127)
    experiments = ExperimentListFactory.from_filenames([paths["nopsf"]])
    assert len(experiments) == 2
    dxtbx_detector = experiments[0].detector
    assert len(dxtbx_detector) == 4
    # Every panel hangs from the root (metrology's hierarchy level 1 moves them one by one).
    assert len(dxtbx_detector.hierarchy()) == 4
    read_back = MultiPanelDetector.from_dxtbx(dxtbx_detector)
    for ours, theirs in zip(setup.nominal_tiles.panels, read_back.panels):
        assert np.allclose(ours.origin_mm, theirs.origin_mm, atol=1e-12)
        assert np.allclose(ours.fast_axis, theirs.fast_axis) and np.allclose(ours.slow_axis, theirs.slow_axis)
        assert (ours.n_fast, ours.n_slow, ours.pixel_size_mm) == (theirs.n_fast, theirs.n_slow, theirs.pixel_size_mm)
        assert theirs.thickness_mm == pytest.approx(ours.thickness_mm)
        assert theirs.attenuation_length_mm == pytest.approx(ours.attenuation_length_mm)
    raw = experiments[1].imageset.get_raw_data(0)
    assert len(raw) == 4 and raw[2].all() == (127, 127)
    assert np.array_equal(raw[2].as_numpy_array(), read_shard_image(paths["nopsf"], 1)[2])
    # The true tiles differ from the nominal ones by the beam-centre offset and each tile's own move.
    moves = np.array([np.subtract(true.origin_mm, nominal.origin_mm)
                      for true, nominal in zip(setup.true_tiles.panels, setup.nominal_tiles.panels)])
    assert np.ptp(moves[:, 0]) > 0.05 and np.all(np.abs(moves[:, 2]) < 1e-12)


def test_tiles_of_unequal_shapes_are_refused_and_hit_finding_on_tiles_is_not():
    config = tiled_config(**TILES)
    config["hitfind"]["enabled"] = True
    check_tiles(config, "config.yaml")
    config = tiled_config(fast=3, slow=1, gap_px=0)  # 85, 86 and 85 px wide
    config["hitfind"]["enabled"] = False
    with pytest.raises(RunSettingsError, match="share one shape"):
        check_tiles(config, "config.yaml")


def test_a_tiled_run_with_hit_finding_plans_the_hitfind_jobs(tmp_path):
    """A dry run of a tiled config with hitfind on: one measurement per shard and dataset, the threshold,
    the powder and the score per dataset."""
    import subprocess
    import sys

    import yaml
    from conftest import REPO_ROOT, job_stats
    from tiny_config import tiny_config

    config = tiny_config(tmp_path, n_shots=4, shots_per_shard=2)
    config["simulate"]["detector"]["tiles"] = TILES
    config["hitfind"] = {"enabled": True}
    configfile = tmp_path / "tiled.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--quiet", "rules", "--snakefile",
                             str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path), f"--configfile={configfile}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = job_stats(result.stdout + result.stderr)
    assert {rule: jobs.get(rule) for rule in ("hitfind_shard", "hitfind", "powder", "score_hitfind")} == {
        "hitfind_shard": 4, "hitfind": 2, "powder": 2, "score_hitfind": 2}


# ---------------------------------------------------------------------------------------------
# simulate.detector.geometry: a detector read from a file (here the real CSPAD's, from one of its CBFs)


def test_moving_panels_by_the_beam_offset_matches_the_single_panels_offset():
    from xfel_spread.sim.geometry import Detector

    panel = Detector(300, 200, 0.1, 120.0, (14.0, 11.0))
    offset = (0.5, -0.3)
    moved = MultiPanelDetector.from_single(panel).moved(offset_px=offset)
    expected = MultiPanelDetector.from_single(panel.with_beam_center_offset_px(offset))
    assert np.allclose(moved.beam_centre_px(), expected.beam_centre_px(), atol=1e-12)
    assert np.allclose(moved.beam_centre_px()[0] - MultiPanelDetector.from_single(panel).beam_centre_px()[0], offset)
    # Each panel's own move stays in its plane and within shift_px along its axes.
    tiles = MultiPanelDetector.split(panel, 2, 2)
    shifted = tiles.moved(shift_px=1.0, seed=2)
    for before, after in zip(tiles.panels, shifted.panels):
        step = np.subtract(after.origin_mm, before.origin_mm) / 0.1
        assert abs(step[2]) < 1e-12 and np.all(np.abs(step[:2]) <= 1.0) and np.abs(step).max() > 0.01
    assert np.array_equal(tiles.moved(shift_px=1.0, seed=2)._origin, shifted._origin)


def cspad_geometry_config(**detector):
    config = tiny_config(seed=3, n_shots=1, shots_per_shard=1,
                         background={"water_thickness_mm": 0.002, "air_path_mm": 0.2})
    cbf = sorted(CSPAD_DIR.glob("*.cbf"))[0]
    config["simulate"]["detector"] = {"geometry": str(cbf), "tiles": {"shift_px": 1.0, "seed": 4},
                                      "beam_center_offset_px": [0.5, 0.5], **detector}
    return config


@pytest.mark.skipif(not CSPAD_DIR.is_dir(), reason="needs ../shared/data/real/thermolysin_cspad")
def test_a_detector_geometry_file_is_rendered_and_the_shard_returns_its_panels(tmp_path, amplitudes):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from xfel_spread.sim.shard import setup_from_config, simulate_shard

    config = load_config(cspad_geometry_config())
    setup = setup_from_config(config, amplitudes)
    cbf = config["simulate"]["detector"]["geometry"]
    reference = MultiPanelDetector.from_file(cbf)
    assert len(setup.nominal_tiles) == 64 and setup.nominal_detector.pixel_size_mm == pytest.approx(0.10992)
    paths = {dataset: str(tmp_path / f"{dataset}.h5") for dataset in ("nopsf", "psf")}
    simulate_shard(setup, 0, 1, paths, str(tmp_path / "truth.json"))
    assert read_shard_image(paths["psf"], 0).shape == (64, 185, 194)
    read_back = MultiPanelDetector.from_dxtbx(ExperimentListFactory.from_filenames([paths["nopsf"]])[0].detector)
    for ours, theirs in zip(reference.panels, read_back.panels):
        assert np.allclose(ours.origin_mm, theirs.origin_mm, atol=1e-9)
        assert np.allclose(ours.fast_axis, theirs.fast_axis, atol=1e-12)
        assert np.allclose(ours.slow_axis, theirs.slow_axis, atol=1e-12)
    # The true panels: the file's, each moved by up to 1 px in its own plane, all by the beam offset.
    whole = -0.10992 * (0.5 * np.array([1.0, 0.0, 0.0]) + 0.5 * np.array([0.0, -1.0, 0.0]))
    for nominal, true in zip(reference.panels, setup.true_tiles.panels):
        own = np.subtract(true.origin_mm, nominal.origin_mm) - whole
        assert abs(own @ nominal.normal) < 1e-9
        assert abs(own @ np.asarray(nominal.fast_axis)) <= 0.10992 + 1e-9
        assert abs(own @ np.asarray(nominal.slow_axis)) <= 0.10992 + 1e-9
    truth = __import__("json").loads((tmp_path / "truth.json").read_text())["shots"][0]
    # The truth's beam centre is panel 0's, in its own frame: the laboratory offset seen along its axes.
    beam_move = -whole / 0.10992
    first = reference.panels[0]
    assert truth["true_beam_center_offset_px"] == pytest.approx(
        [beam_move @ np.asarray(first.fast_axis), beam_move @ np.asarray(first.slow_axis)], abs=1e-3)
    assert len(truth["true_tile_origin_mm"]) == 64
    # Bragg spots land on the tiles: some pixels far above the background of this shot.
    image = read_shard_image(paths["nopsf"], 0)
    assert image.max() > 50 * np.median(image)


def test_a_geometry_file_with_tiles_missing_or_unreadable_is_one_line(tmp_path):
    config = load_config(cspad_geometry_config(tiles={"fast": 2, "slow": 1}))
    with pytest.raises(RunSettingsError, match="geometry and simulate.detector.tiles 2 x 1 are both given"):
        check_tiles(config, "config.yaml")
    config = load_config(cspad_geometry_config(geometry=str(tmp_path / "absent.expt")))
    with pytest.raises(RunSettingsError, match="absent.expt: no such file"):
        check_tiles(config, "config.yaml")
    junk = tmp_path / "junk.cbf"
    junk.write_text("not an image\n")
    config = load_config(cspad_geometry_config(geometry=str(junk)))
    with pytest.raises(RunSettingsError, match=r"^Config error: config.yaml: simulate.detector.geometry: .*junk.cbf: "):
        check_tiles(config, "config.yaml")
