"""Tests of the merge's checks: MTZ reading and truth scoring (spread-score-merge), the DIALS cross-check
(spread-dials-merge). The shards and merged sets come from merged_fixtures.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from xfel_spread.io import mtz
from xfel_spread.merging import scoring
from xfel_spread.sim.structure_factors import ChannelAmplitudes, true_intensities

from merged_fixtures import (
    CELL,
    make_experiments,
    make_reflections,
    write_shard,
    write_lattice_table,
    symmetry,
    anomalous_truth,
    merged_from_truth,
    write_our_mtz,
    write_dials_mtz,
    sorted_rows,
)


# --- truth scoring --------------------------------------------------------------------------------

def test_true_intensities_are_the_spectrum_weighted_squared_amplitudes():
    amplitudes = ChannelAmplitudes(
        energies_ev=np.array([7100.0, 7101.0]), unit_cell=CELL, space_group="C 1 2 1",
        indices=np.array([[1, 1, 0], [-1, -1, 0], [2, 0, 1]]),
        amplitudes=np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32))
    indices, values = true_intensities(amplitudes, [1.0, 3.0])  # normalised to 0.25, 0.75
    np.testing.assert_array_equal(indices, amplitudes.indices)
    np.testing.assert_allclose(values, [0.25 * 1 + 0.75 * 9, 0.25 * 4 + 0.75 * 4, 0.25 * 9 + 0.75 * 1])
    with pytest.raises(ValueError, match="3 spectrum weights for 2 amplitude channels"):
        true_intensities(amplitudes, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        true_intensities(amplitudes, [1.0, -1.0])


SHARD_DETECTOR = {"pixel_size_mm": 0.1, "distance_mm": 140.0, "n_fast": 4, "n_slow": 3, "beam_center_mm": (0.2, 0.15),
                  "gain_adu_per_photon": 1.0, "adc_offset_adu": 10.0, "trusted_range": (-100.0, 65505.0),
                  "thickness_mm": 0.05, "attenuation_length_mm": 0.0175, "material": "Gd2O2S"}
SHARD_BEAM = {"polarization_fraction": 1.0, "polarization_normal": (0.0, 1.0, 0.0)}


def write_spectrum_shard(path, energies, photons) -> None:
    from xfel_spread.io.shard import write_shard as write_h5_shard

    photons = np.asarray(photons, dtype=float)
    images = (np.full((3, 4), 10, dtype=np.int32) for _ in photons)
    write_h5_shard(path, images, np.arange(len(photons)), np.asarray(energies, dtype=float), photons,
                   SHARD_DETECTOR, SHARD_BEAM, "nopsf")


def test_mean_spectrum_sums_every_shot_of_every_shard(tmp_path):
    energies = [7100.0, 7101.0, 7102.0]
    write_spectrum_shard(tmp_path / "a.h5", energies, [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    write_spectrum_shard(tmp_path / "b.h5", energies, [[0.0, 0.0, 4.0]])
    spectrum = scoring.mean_spectrum([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert spectrum.n_shots == 3
    np.testing.assert_allclose(spectrum.weights, [1 / 8, 2 / 8, 5 / 8])
    np.testing.assert_array_equal(spectrum.energies_ev, energies)

    write_spectrum_shard(tmp_path / "c.h5", [7100.0, 7101.0, 7105.0], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="c.h5: spectrum channels differ"):
        scoring.mean_spectrum([tmp_path / "a.h5", tmp_path / "c.h5"])


def test_pearson_cc_known_values_and_undefined_cases():
    assert scoring.pearson_cc([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert scoring.pearson_cc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert scoring.pearson_cc([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(scoring.pearson_cc([1.0], [2.0]))
    assert math.isnan(scoring.pearson_cc([1, 2, 3], [5, 5, 5]))


def test_resolution_bins_have_equal_reciprocal_volume_and_exact_ends():
    edges = scoring.resolution_bin_edges(10.0, 2.0, 4)
    assert edges[0] == 10.0 and edges[-1] == 2.0
    np.testing.assert_allclose(np.diff(edges ** -3.0), (2.0 ** -3 - 10.0 ** -3) / 4)
    with pytest.raises(ValueError, match="d_max > d_min"):
        scoring.resolution_bin_edges(2.0, 2.5, 4)


def test_score_against_truth_perfect_and_with_friedel_mates_swapped():
    rng = np.random.default_rng(3)
    indices, values = anomalous_truth(rng, d_min=6.0)
    perfect = scoring.score_against_truth(merged_from_truth(indices, values), indices, values, n_bins=3)
    assert perfect["cc"] == pytest.approx(1.0) and perfect["cc_anomalous"] == pytest.approx(1.0)
    n_pairs = len(set(map(tuple, merged_from_truth(indices, values).mean_indices)))
    assert perfect["n_common"] == n_pairs
    assert len(perfect["bins"]) == 3 and sum(result["n_common"] for result in perfect["bins"]) == n_pairs
    assert all(result["cc"] == pytest.approx(1.0) for result in perfect["bins"])

    # I(+) and I(-) exchanged: the same means, every anomalous difference of the opposite sign.
    value_of = {tuple(h): v for h, v in zip(indices, values)}
    swapped = np.array([value_of.get(tuple(-h), value_of[tuple(h)]) for h in indices])
    flipped = scoring.score_against_truth(merged_from_truth(indices, swapped), indices, values, n_bins=3)
    assert flipped["cc"] == pytest.approx(1.0)
    assert flipped["cc_anomalous"] == pytest.approx(-1.0)
    assert flipped["n_anomalous"] == perfect["n_anomalous"] > 50


def test_score_against_truth_maps_the_truth_to_the_asymmetric_unit():
    rng = np.random.default_rng(4)
    indices, values = anomalous_truth(rng, d_min=6.0)
    merged = merged_from_truth(indices, values)
    # The 2-fold along b takes (h, k, l) to (-h, k, -l): the same reflections, listed elsewhere.
    equivalents = indices * np.array([-1, 1, -1])
    result = scoring.score_against_truth(merged, equivalents, values, n_bins=2)
    assert result["n_common"] == len(merged.mean_indices)
    assert result["cc"] == pytest.approx(1.0) and result["cc_anomalous"] == pytest.approx(1.0)


def test_correlate_merged_two_noisy_sets_and_a_foreign_point_group():
    rng = np.random.default_rng(5)
    indices, values = anomalous_truth(rng, d_min=5.0)
    a = merged_from_truth(indices, values, rng, noise=0.01)
    b = merged_from_truth(indices, values, rng, noise=0.01)
    result = scoring.correlate_merged(a, b, n_bins=4)
    assert 0.99 < result["cc"] < 1.0 and 0.8 < result["cc_anomalous"] < 1.0
    assert len(result["bins"]) == 4
    foreign = dataclasses.replace(b, space_group="P 1")
    with pytest.raises(ValueError, match="different point groups"):
        scoring.correlate_merged(a, foreign, n_bins=4)


@pytest.mark.parametrize("writer", [write_our_mtz, write_dials_mtz], ids=["spread-merge", "dials.merge"])
def test_read_merged_mtz_round_trip(tmp_path, writer):
    rng = np.random.default_rng(6)
    indices, values = anomalous_truth(rng, d_min=6.0)
    # One Friedel mate missing for some indices, as in real merged data.
    keep = rng.random(len(values)) > 0.2
    written = merged_from_truth(indices[keep], values[keep])
    writer(tmp_path / "merged.mtz", written)

    read = mtz.read_merged_mtz(tmp_path / "merged.mtz")
    assert read.space_group == "C 1 2 1"
    np.testing.assert_allclose(read.unit_cell, CELL, rtol=1e-6)
    for name in ("anomalous", "mean"):
        expected = sorted_rows(getattr(written, f"{name}_indices"), getattr(written, f"{name}_intensities"))
        got = sorted_rows(getattr(read, f"{name}_indices"), getattr(read, f"{name}_intensities"))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)
    assert read.anomalous_array().anomalous_flag() and not read.mean_array().anomalous_flag()


def test_read_merged_mtz_errors_name_the_file(tmp_path):
    merged = merged_from_truth(*anomalous_truth(np.random.default_rng(7), d_min=8.0))
    only_mean = tmp_path / "only_mean.mtz"
    merged.mean_array().as_mtz_dataset(column_root_label="IMEAN").mtz_object().write(str(only_mean))
    with pytest.raises(mtz.MergedFileError) as error:
        mtz.read_merged_mtz(only_mean)
    assert str(error.value).startswith(f"{only_mean}: merged MTZ lacks column(s) I(+), SIGI(+), I(-), SIGI(-)")
    assert "\n" not in str(error.value)

    not_mtz = tmp_path / "not.mtz"
    not_mtz.write_text("hello\n")
    with pytest.raises(mtz.MergedFileError, match=f"^{not_mtz}: cannot read MTZ"):
        mtz.read_merged_mtz(not_mtz)


# --- spread-score-merge ---------------------------------------------------------------------------

def test_score_merge_cli(tmp_path, capsys):
    from xfel_spread.cli.merge import score_merge_main
    from xfel_spread.sim.structure_factors import save_channel_amplitudes

    rng = np.random.default_rng(9)
    indices, values = anomalous_truth(rng, d_min=5.0)
    # Two channels whose |F|^2 average, under the shards' mean spectrum (1:3), to the truth above.
    energies = np.array([7100.0, 7101.0])
    squared = np.stack([values * 0.6, values * (1 - 0.25 * 0.6) / 0.75])
    save_channel_amplitudes(ChannelAmplitudes(energies, CELL, "C 1 2 1", indices, np.sqrt(squared).astype(np.float32)),
                            str(tmp_path / "amplitudes.h5"))
    write_spectrum_shard(tmp_path / "shard.h5", energies, [[1.0, 3.0], [2.0, 6.0]])
    write_our_mtz(tmp_path / "ours.mtz", merged_from_truth(indices, values, rng, noise=0.01))
    write_dials_mtz(tmp_path / "dials.mtz", merged_from_truth(indices, values, rng, noise=0.3))

    arguments = ["--dataset", "nopsf", "--mtz", str(tmp_path / "ours.mtz"), "--dials-mtz", str(tmp_path / "dials.mtz"),
                 "--amplitudes", str(tmp_path / "amplitudes.h5"), "--shard", str(tmp_path / "shard.h5"),
                 "--n-bins", "3", "--table", str(tmp_path / "score.tsv"), "--text", str(tmp_path / "score.txt"),
                 "--plot", str(tmp_path / "score.png")]
    assert score_merge_main(arguments) == 0
    assert capsys.readouterr().out == (tmp_path / "score.txt").read_text()
    lines = (tmp_path / "score.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(scoring.COMPARISON_COLUMNS)
    rows = [dict(zip(scoring.COMPARISON_COLUMNS, line.split("\t"))) for line in lines[1:]]
    assert [row["comparison"] for row in rows] == ["ours vs truth"] * 4 + ["DIALS vs truth"] * 4 + ["ours vs DIALS"] * 4
    overall = {row["comparison"]: row for row in rows if row["bin"] == "overall"}
    assert float(overall["ours vs truth"]["cc"]) > 0.999
    assert float(overall["ours vs truth"]["cc_anomalous"]) > 0.9
    assert float(overall["DIALS vs truth"]["cc"]) < float(overall["ours vs truth"]["cc"])
    assert int(overall["ours vs DIALS"]["n_common"]) == len(merged_from_truth(indices, values).mean_indices)
    assert (tmp_path / "score.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without the DIALS cross-check: ours against the truth only.
    arguments_without = [value for value in arguments if value not in ("--dials-mtz", str(tmp_path / "dials.mtz"))]
    assert score_merge_main(arguments_without) == 0
    assert len((tmp_path / "score.tsv").read_text().splitlines()) == 1 + 4


# --- DIALS cross-check ----------------------------------------------------------------------------

def write_scaling_shards(tmp_path, rng, truth_indices, truth_values, n_shards=2, lattices_per_shard=6,
                         reflections_per_lattice=80):
    """Shards of lattices measuring the truth at their own scale (0.5-2) with 1 % noise, each
    reflection as a random symmetry equivalent; returns the lattices' identifiers in order."""
    from cctbx import miller, sgtbx
    from cctbx.array_family import flex

    operations = [np.array(op.r().as_double()).reshape(3, 3) for op in
                  sgtbx.space_group_info("C 1 2 1").group().all_ops()]
    d = miller.set(symmetry(), flex.miller_index([tuple(map(int, h)) for h in truth_indices]), True).d_spacings()
    d = np.array(d.data())
    identifiers = []
    for shard in range(n_shards):
        names = [f"shard{shard}-lattice{k}" for k in range(lattices_per_shard)]
        identifiers += names
        rows = np.concatenate([rng.choice(len(truth_indices), reflections_per_lattice, replace=False)
                               for _ in names])
        lattice = np.repeat(np.arange(lattices_per_shard), reflections_per_lattice)
        scale = rng.uniform(0.5, 2.0, lattices_per_shard)[lattice]
        hkl = np.array([operations[rng.integers(len(operations))] @ h for h in truth_indices[rows]]).round()
        intensity = truth_values[rows] * scale * (1.0 + 0.01 * rng.standard_normal(len(rows)))
        boxes = np.tile([0, 5, 0, 5, 0, 1], (len(rows), 1))
        experiments = make_experiments(names, rng, wavelengths=1.740 + 0.004 * rng.random(lattices_per_shard))
        write_shard(tmp_path / f"shard_{shard:05d}", experiments,
                    make_reflections(lattice, hkl, d[rows], boxes, intensity, names))
    return identifiers


def test_dials_scale_and_merge_on_accepted_lattices(tmp_path, capsys):
    """dials.scale and dials.merge really run (about 8 s): C 1 2 1, Friedel mates apart, the cap."""
    from xfel_spread.cli.merge import dials_merge_main

    rng = np.random.default_rng(10)
    truth_indices, truth_values = anomalous_truth(rng, d_min=8.0)
    identifiers = write_scaling_shards(tmp_path, rng, truth_indices, truth_values)
    write_lattice_table(tmp_path / "lattices.tsv", {name: name != "shard0-lattice2" for name in identifiers})
    config = tmp_path / "dials_merge.yaml"
    config.write_text("merge:\n  d_min: 8.0\n  dials_crosscheck:\n    max_lattices: 9\n")

    arguments = ["--config", str(config), "--lattices", str(tmp_path / "lattices.tsv"),
                 "--shard-prefix", str(tmp_path / "shard_00000"), "--shard-prefix", str(tmp_path / "shard_00001"),
                 "--work-dir", str(tmp_path / "work"), "--mtz", str(tmp_path / "dials.mtz"),
                 "--log-summary", str(tmp_path / "dials.txt")]
    assert dials_merge_main(arguments) == 0
    summary = (tmp_path / "dials.txt").read_text()
    assert "lattices: 9 accepted by our merge" in summary and "from 2 of 2 shards" in summary
    assert "space group: C 1 2 1" in summary
    assert "Summary of merging statistics" in summary
    assert summary in capsys.readouterr().out
    assert not (tmp_path / "work").exists()

    merged = mtz.read_merged_mtz(tmp_path / "dials.mtz")
    assert merged.space_group == "C 1 2 1"
    # Scaled and merged, the lattices give back the truth, Friedel mates apart.
    score = scoring.score_against_truth(merged, truth_indices, truth_values, n_bins=2)
    assert score["n_common"] > 100 and score["cc"] > 0.95
    assert score["n_anomalous"] > 30 and score["cc_anomalous"] > 0.8


def test_dials_failure_is_one_line_naming_the_program(tmp_path):
    from io import StringIO

    from xfel_spread.merging.dials_crosscheck import DialsMergeError, run_dials_program

    log = StringIO()
    with pytest.raises(DialsMergeError) as error:
        run_dials_program("merge", ["missing.expt", "missing.refl"], tmp_path, log)
    message = str(error.value)
    assert message.startswith("dials.merge failed (exit status ")
    assert "\n" not in message and message.split(": ", 1)[1] in log.getvalue()


def test_last_error_line_prefers_the_error():
    from xfel_spread.merging.dials_crosscheck import last_error_line

    output = "Scaling...\nTraceback (most recent call last):\n  File x\nValueError: no reflections\n\n"
    assert last_error_line(output) == "ValueError: no reflections"
    assert last_error_line("one\ntwo\n\n") == "two"
    assert last_error_line("") == "no output"
