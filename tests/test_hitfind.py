"""Hit finding on tiny simulated shards with blank shots, and its parts on known inputs.

The simulated run is 8 shots of the tiny panel with half of them blank (seed 3 makes shots 0-3 and 7
blank), in two shards, with the water and air cut 50-fold so that a 0.6 mm pixel sees about the
production background (a few hundred photons): the full LY99 background on pixels 46 times the
production solid angle hides the few spots of this coarse panel. The three commands run as the
pipeline runs them; their outputs are checked against the truth.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import NANOBRAGG_DIR

from xfel_spread.config import load_config
from xfel_spread.hitfind.pixels import LitPixelSettings, measure_shot, photons_from_adu
from xfel_spread.hitfind.radial import radial_geometry
from xfel_spread.hitfind.tables import HitfindFileError, hit_images, read_hits_table, read_lit_table
from xfel_spread.hitfind.threshold import ThresholdInputError, choose_hit_threshold
from xfel_spread.io.shard import read_shard_image, read_shard_metadata
from xfel_spread.sim.geometry import Detector
from xfel_spread.sim.shard import is_blank_shot

from sim_fixtures import ly99_amplitudes
from tiny_config import tiny_config

BIN_DIR = Path(sys.executable).parent
SEED, BLANK_FRACTION = 3, 0.5
SHARDS = ((0, 4), (4, 8))
EXPECTED_BLANKS = [True, True, True, True, False, False, False, True]
#: The coarse panel's hits light 10-300 pixels, not the thousands of a full-size one: a lower floor.
HITFIND_SETTINGS = {"lit_pixel_floor": 5}


def run(name, *arguments):
    return subprocess.run([str(BIN_DIR / name), *map(str, arguments)], capture_output=True, text=True, timeout=600)


def succeeded(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def one_error_line(result, program):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: ")]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr
    return lines[0]


def blank_run_config(**simulate):
    settings = {"seed": SEED, "blank_fraction": BLANK_FRACTION, "n_shots": 8, "shots_per_shard": 4,
                "background": {"water_thickness_mm": 0.002, "air_path_mm": 0.2}}
    config = tiny_config(**{**settings, **simulate})
    config["hitfind"] = dict(HITFIND_SETTINGS)
    return load_config(config)


def simulate(config, shots, directory):
    from xfel_spread.sim.shard import setup_from_config, simulate_shard
    from xfel_spread.sim.structure_factors import save_channel_amplitudes

    amplitudes = directory.parent / "amplitudes.h5"
    if not amplitudes.exists():
        save_channel_amplitudes(ly99_amplitudes(), amplitudes)
    directory.mkdir(parents=True, exist_ok=True)
    setup = setup_from_config(config, str(amplitudes))
    paths = {dataset: str(directory / f"{dataset}.h5") for dataset in ("nopsf", "psf")}
    simulate_shard(setup, *shots, paths, str(directory / "truth.json"))
    return paths


@pytest.fixture(scope="module")
def blank_run(tmp_path_factory):
    """The run in two shards, every hitfind command run on both datasets; returns its directory."""
    root = tmp_path_factory.mktemp("hitfind")
    config = blank_run_config()
    settings = root / "settings.yaml"
    settings.write_text(yaml.safe_dump({"hitfind": config["hitfind"], "simulate": config["simulate"]}))
    for index, shots in enumerate(SHARDS):
        simulate(config, shots, root / f"shard_{index}")
    for dataset in ("nopsf", "psf"):
        out = root / dataset
        out.mkdir()
        for index, (first, _) in enumerate(SHARDS):
            succeeded(run("spread-hitfind-shard", "--config", settings,
                          "--shard", root / f"shard_{index}" / f"{dataset}.h5",
                          "--first-shot", first, "--lit-table", out / f"{index}_lit.tsv",
                          "--radial", out / f"{index}_radial.npz", "--powder", out / f"{index}_powder.npz"))
        per_shard, powders = [], []
        for index in range(len(SHARDS)):
            per_shard += ["--lit-table", out / f"{index}_lit.tsv", "--hits-table", out / f"{index}_hits.tsv"]
            powders += ["--radial", out / f"{index}_radial.npz", "--powder", out / f"{index}_powder.npz"]
        succeeded(run("spread-hitfind", "--config", settings, *per_shard, "--ring-peaks", out / "ring_peaks.tsv",
                      "--summary", out / "summary.json", "--shots-plot", out / "shots.png"))
        succeeded(run("spread-powder", "--config", settings, *powders, "--powder-image", out / "powder.npy",
                      "--powder-radial", out / "powder_radial.tsv", "--summary", out / "powder.json",
                      "--plot", out / "powder.png"))
        scoring = []
        for index in range(len(SHARDS)):
            scoring += ["--hits-table", out / f"{index}_hits.tsv", "--radial", out / f"{index}_radial.npz",
                        "--truth", root / f"shard_{index}" / "truth.json"]
        succeeded(run("spread-score-hitfind", "--dataset", dataset, "--simulate-config", settings,
                      "--hitfind-config", settings, *scoring, "--summary", out / "summary.json",
                      "--table", out / "score.tsv", "--text", out / "score.txt", "--plot", out / "score.png"))
    return root


def truth_blanks(root):
    return [shot["blank"] for index in range(len(SHARDS))
            for shot in json.loads((root / f"shard_{index}" / "truth.json").read_text())["shots"]]


@pytest.mark.slow  # simulates 8 shots and runs every hitfind command (blank_run): about 30 s
def test_blank_shots_are_drawn_from_the_seed_whatever_the_sharding(blank_run):
    assert truth_blanks(blank_run) == EXPECTED_BLANKS
    assert [is_blank_shot(SEED, shot, BLANK_FRACTION) for shot in range(8)] == EXPECTED_BLANKS
    assert not any(is_blank_shot(SEED, shot, 0.0) for shot in range(1000))
    assert all(is_blank_shot(SEED, shot, 1.0) for shot in range(1000))
    assert 0.45 < np.mean([is_blank_shot(SEED, shot, 0.5) for shot in range(4000)]) < 0.55


@pytest.mark.slow  # simulates 8 shots and runs every hitfind command (blank_run): about 30 s
def test_a_crystal_shot_is_the_same_with_or_without_blanks_among_its_neighbours(blank_run, tmp_path):
    # Shot 4 holds a crystal in the blank run; simulated alone with blank_fraction 0, it is bit-identical.
    paths = simulate(blank_run_config(blank_fraction=0.0), (4, 5), tmp_path / "alone")
    for dataset in ("nopsf", "psf"):
        np.testing.assert_array_equal(read_shard_image(paths[dataset], 0),
                                      read_shard_image(blank_run / "shard_1" / f"{dataset}.h5", 0))
    assert json.loads((tmp_path / "alone" / "truth.json").read_text())["shots"][0]["blank"] is False


@pytest.mark.slow  # simulates 8 shots and runs every hitfind command (blank_run): about 30 s
@pytest.mark.parametrize("dataset", ["nopsf", "psf"])
def test_blanks_are_misses_and_crystals_are_hits(blank_run, dataset):
    out = blank_run / dataset
    hits = [row["is_hit"] for index in range(len(SHARDS)) for row in read_hits_table(out / f"{index}_hits.tsv")]
    assert hits == [not blank for blank in EXPECTED_BLANKS]
    lit = [row["lit_pixels"] for index in range(len(SHARDS)) for row in read_lit_table(out / f"{index}_lit.tsv")]
    assert max(count for count, blank in zip(lit, EXPECTED_BLANKS) if blank) == 0
    assert min(count for count, blank in zip(lit, EXPECTED_BLANKS) if not blank) >= 10

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_shots"] == 8 and summary["n_hits"] == 3
    assert summary["threshold_rule"] == "otsu"
    score = dict(line.split("\t") for line in (out / "score.tsv").read_text().splitlines()[1:])
    assert float(score["accuracy"]) == 1.0
    assert (int(score["true_hits"]), int(score["true_blanks"]), int(score["false_hits"]), int(score["missed_hits"])) \
        == (3, 5, 0, 0)
    for name in ("powder.png", "shots.png", "score.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # simulates 8 shots and runs every hitfind command (blank_run): about 30 s
def test_powder_is_the_sum_of_every_shot(blank_run):
    out = blank_run / "nopsf"
    powder = np.load(out / "powder.npy")
    expected = np.zeros(powder.shape)
    for index in range(len(SHARDS)):
        path = blank_run / f"shard_{index}" / "nopsf.h5"
        metadata = read_shard_metadata(path)
        for image in range(metadata.n_shots):
            expected += photons_from_adu(read_shard_image(path, image), metadata.detector)
    np.testing.assert_allclose(powder, expected, rtol=1e-6)


@pytest.mark.slow  # simulates 8 shots and runs every hitfind command (blank_run): about 30 s
@pytest.mark.parametrize("dataset", ["nopsf", "psf"])
def test_water_ring_and_profile_match_the_simulators_background_model(blank_run, dataset):
    out = blank_run / dataset
    score = dict(line.split("\t") for line in (out / "score.tsv").read_text().splitlines()[1:])
    # Without the PSF the profile is the model itself; the PSF moves light off the panel's edges.
    assert float(score["profile_correlation_with_model"]) > (0.9999 if dataset == "nopsf" else 0.99)
    assert float(score["profile_scale_to_model"]) == pytest.approx(1.0, abs=0.01 if dataset == "nopsf" else 0.07)
    assert float(score["ring_q_observed_inv_a"]) == pytest.approx(float(score["ring_q_model_inv_a"]), abs=0.02)
    rings = [line.split("\t") for line in (out / "ring_peaks.tsv").read_text().splitlines()]
    column = rings[0].index("ring_q_inv_a")
    assert all(2.0 < float(row[column]) < 2.06 for row in rings[1:])  # water's ring, d = 3.1 A
    powder_q = json.loads((out / "powder.json").read_text())["ring_q_inv_a"]
    assert powder_q == pytest.approx(float(score["ring_q_model_inv_a"]), abs=0.02)


# --- the parts on known inputs ---------------------------------------------------------------------


def test_lit_pixels_are_the_bright_trusted_pixels_above_the_background():
    detector_attrs = {"adc_offset_adu": 10.0, "gain_adu_per_photon": 2.0, "trusted_range": (0, 60000)}
    detector = Detector(128, 128, 0.5, 40.0, (32.0, 32.0))
    geometry = radial_geometry(detector, polarization_fraction=0.0, bin_width_px=2.0)
    rng = np.random.default_rng(2)
    photons = rng.poisson(300.0 * geometry.relative_factor.reshape(geometry.shape)).astype(float)
    spots = [(20, 30), (40, 100), (90, 90), (100, 12), (64, 70), (5, 5), (120, 60)]
    for slow, fast in spots:
        photons[slow, fast] += 2000.0
    image = np.round(photons * 2.0 + 10.0).astype(np.int32)
    image[spots[0]] = 70000  # saturated: outside the trusted range, so neither lit nor counted
    measurement, _, trusted = measure_shot(image, detector_attrs, geometry, LitPixelSettings(), 1.75)
    assert measurement.lit_pixels == len(spots) - 1
    assert measurement.trusted_pixels == 128 * 128 - 1 and not trusted.reshape(128, 128)[spots[0]]
    assert measurement.photons == pytest.approx(photons.sum() - photons[spots[0]], rel=1e-6)
    # The photon threshold alone: spots of 2000 photons are not lit above 5000.
    high = measure_shot(image, detector_attrs, geometry, LitPixelSettings(min_photons=5000.0), 1.75)[0]
    assert high.lit_pixels == 0


def test_threshold_splits_two_classes_at_their_gap():
    rng = np.random.default_rng(0)
    blanks = rng.poisson(1.0, 300)
    crystals = np.round(10 ** rng.normal(3.0, 0.25, 700))
    threshold = choose_hit_threshold(np.concatenate([blanks, crystals]), floor=20, min_separation_decades=1.0)
    assert threshold.rule == "otsu"
    assert blanks.max() < threshold.min_lit_pixels <= crystals.min()
    assert threshold.is_hit(crystals).all() and not threshold.is_hit(blanks).any()


def test_one_class_is_decided_by_the_floor():
    rng = np.random.default_rng(1)
    crystals = np.round(10 ** rng.normal(3.0, 0.25, 500))  # every shot a hit: no gap of a decade
    all_hits = choose_hit_threshold(crystals, floor=20, min_separation_decades=1.0)
    assert all_hits.rule == "floor" and all_hits.min_lit_pixels == 20 and all_hits.is_hit(crystals).all()
    blanks = rng.poisson(1.0, 500)
    all_blank = choose_hit_threshold(blanks, floor=20, min_separation_decades=1.0)
    assert all_blank.rule == "floor" and not all_blank.is_hit(blanks).any()
    same = choose_hit_threshold([7, 7, 7], floor=5, min_separation_decades=1.0)
    assert same.rule == "floor" and same.is_hit([7]).all()


def test_floor_and_override_bound_the_threshold():
    # A gap between 0-1 and 12-15 lit pixels: Otsu would cut at ~3, the floor keeps it at 20.
    counts = [0, 1, 0, 1, 12, 15, 14]
    assert choose_hit_threshold(counts, floor=20, min_separation_decades=0.5).min_lit_pixels == 20
    assert choose_hit_threshold(counts, floor=0, min_separation_decades=0.5).min_lit_pixels == pytest.approx(
        10 ** ((math.log10(2) + math.log10(13)) / 2) - 1)
    manual = choose_hit_threshold(counts, floor=20, min_separation_decades=0.5, override=13)
    assert manual.rule == "override" and list(manual.is_hit(counts)) == [False] * 5 + [True, True]


@pytest.mark.parametrize("counts, message", [([], "no shots"), ([3, -1], "non-negative"), ([1, math.nan], "finite")])
def test_threshold_of_bad_counts_is_one_line(counts, message):
    with pytest.raises(ThresholdInputError, match=message):
        choose_hit_threshold(counts, floor=20, min_separation_decades=1.0)


def test_hits_table_must_list_the_shards_shots(tmp_path):
    table = tmp_path / "hits.tsv"
    table.write_text("shot\tlit_pixels\tphotons\tis_hit\n10\t500\t1e6\t1\n11\t0\t1e6\t0\n12\t40\t1e6\t1\n")
    assert hit_images(table, 10, 3) == [0, 2]
    with pytest.raises(HitfindFileError, match=r"hits.tsv: lists shots \[10, 11, 12\]... \(3\), expected 0..2"):
        hit_images(table, 0, 3)
    table.write_text("shot\tlit_pixels\tphotons\tis_hit\n10\t500\t1e6\tyes\n")
    with pytest.raises(HitfindFileError, match="hits.tsv: bad value"):
        read_hits_table(table)
    table.write_text("shot\tlit\n")
    with pytest.raises(HitfindFileError, match=r"hits.tsv: header \['shot', 'lit'\]"):
        read_hits_table(table)


@pytest.mark.slow  # simulates 8 shots and runs every hitfind command (blank_run): about 30 s
def test_commands_report_bad_input_in_one_line(blank_run, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("hitfind: {}\n")
    not_a_shard = tmp_path / "not_a_shard.h5"
    not_a_shard.write_text("hello")
    line = one_error_line(run("spread-hitfind-shard", "--config", settings, "--shard", not_a_shard, "--first-shot", 0,
                              "--lit-table", tmp_path / "l.tsv", "--radial", tmp_path / "r.npz",
                              "--powder", tmp_path / "p.npz"), "spread-hitfind-shard")
    assert str(not_a_shard) in line and "not a readable HDF5 file" in line
    assert not (tmp_path / "l.tsv").exists()

    out = blank_run / "nopsf"
    line = one_error_line(run("spread-hitfind", "--config", settings, "--lit-table", out / "0_lit.tsv",
                              "--hits-table", tmp_path / "h0.tsv", "--hits-table", tmp_path / "h1.tsv",
                              "--ring-peaks", tmp_path / "rp.tsv", "--summary", tmp_path / "s.json",
                              "--shots-plot", tmp_path / "s.png"), "spread-hitfind")
    assert "give one lit table and one hits table per shard" in line
    assert not (tmp_path / "h0.tsv").exists()

    line = one_error_line(run("spread-powder", "--config", settings, "--radial", out / "0_radial.npz",
                              "--radial", out / "1_radial.npz", "--powder", out / "0_lit.tsv",
                              "--powder", out / "1_lit.tsv",
                              "--powder-image", tmp_path / "p.npy", "--powder-radial", tmp_path / "pr.tsv",
                              "--summary", tmp_path / "p.json", "--plot", tmp_path / "p.png"), "spread-powder")
    assert f"{out / '0_lit.tsv'}: not a powder-sum file" in line

    old_truth = tmp_path / "truth.json"
    truth = json.loads((blank_run / "shard_0" / "truth.json").read_text())
    for shot in truth["shots"]:
        del shot["blank"]
    old_truth.write_text(json.dumps(truth))
    line = one_error_line(run("spread-score-hitfind", "--dataset", "nopsf", "--simulate-config", settings,
                              "--hitfind-config", settings, "--hits-table", out / "0_hits.tsv",
                              "--radial", out / "0_radial.npz", "--truth", old_truth, "--summary", out / "summary.json",
                              "--table", tmp_path / "t.tsv", "--text", tmp_path / "t.txt",
                              "--plot", tmp_path / "t.png"),
                          "spread-score-hitfind")
    assert f"{old_truth}: not a truth file with per-shot blank flags" in line


@pytest.mark.skipif(not NANOBRAGG_DIR.is_dir(), reason="needs the nanoBragg stills")
def test_an_unreadable_image_among_readable_ones_is_measured_as_nothing_and_never_a_hit(tmp_path):
    """An image list with a file dxtbx cannot read (recorded, within input.max_unreadable_fraction): hit
    finding measures the others as before, gives the unreadable one no trusted pixel, leaves it out of the
    threshold and the powder, and never calls it a hit (the index stage then records it as unreadable)."""
    from xfel_spread.hitfind.stages import find_hits, measure_shard, sum_powder
    from xfel_spread.io.images import list_images, make_image_list_shard

    junk = tmp_path / "image_999.img.gz"
    junk.write_bytes(b"\x1f\x8b not an image")
    shots = list_images([str(NANOBRAGG_DIR / "image_00[0-1].img.gz"), str(junk)])
    assert [Path(shot.path).name for shot in shots][-1] == junk.name
    make_image_list_shard(tmp_path / "shard_00000.h5", shots, 0, "table", str(NANOBRAGG_DIR / "spectra.tsv"),
                          max_unreadable_fraction=0.5)
    hitfind = load_config({})["hitfind"]
    settings = LitPixelSettings.from_config(hitfind)
    files = {name: tmp_path / f"shard_00000{suffix}" for name, suffix in (
        ("lit", "_lit.tsv"), ("radial", "_radial.npz"), ("powder", "_powder.npz"), ("hits", "_hits.tsv"))}
    measured = measure_shard(tmp_path / "shard_00000.h5", 0, settings, hitfind["radial_bin_px"],
                             files["lit"], files["radial"], files["powder"])
    assert [m.trusted_pixels > 0 for m in measured] == [True, True, False]
    assert measured[2].lit_pixels == 0 and np.all(np.isnan(measured[2].profile))
    rows = read_lit_table(files["lit"])
    assert [row["image"] for row in rows] == [0, 1, 2] and math.isnan(rows[2]["wavelength_a"])
    assert rows[0]["lit_pixels"] > 0 and rows[0]["wavelength_a"] > 0
    # The readable images' measurement is the one they get alone.
    alone = make_image_list_shard(tmp_path / "alone.h5", shots[:2], 0, "table", str(NANOBRAGG_DIR / "spectra.tsv"))
    assert alone.n_shots == 2
    only = measure_shard(tmp_path / "alone.h5", 0, settings, hitfind["radial_bin_px"], tmp_path / "a_lit.tsv",
                         tmp_path / "a_radial.npz", tmp_path / "a_powder.npz")
    assert [m.lit_pixels for m in only] == [m.lit_pixels for m in measured[:2]]

    outputs = {"ring_peaks": tmp_path / "ring_peaks.tsv", "summary": tmp_path / "summary.json",
               "shots_plot": tmp_path / "shots.png"}
    summary = find_hits([files["lit"]], [files["hits"]], dict(hitfind, min_lit_pixels=1), outputs)
    assert [row["is_hit"] for row in read_hits_table(files["hits"])] == [1, 1, 0]
    assert summary.n_unreadable == 1 and summary.n_hits == 2
    powder_outputs = {"powder": tmp_path / "powder.npy", "powder_radial": tmp_path / "powder_radial.tsv",
                      "summary": tmp_path / "powder.json", "plot": tmp_path / "powder.png"}
    powder = sum_powder([files["radial"]], [files["powder"]], tuple(hitfind["ring_q_range_inv_a"]), powder_outputs)
    assert powder.n_shots == 2 and math.isfinite(powder.mean_wavelength_a)
