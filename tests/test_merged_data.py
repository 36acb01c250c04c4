"""Tests of what uses the merged data: MTZ reading and truth scoring, the resolution annulus, the DIALS cross-check.

Shards of integrated lattices are built here as DIALS would write them (dxtbx models, a reflection
table with the integration columns), small enough for dials.scale to run in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from xfel_spread.annulus import pipeline as annulus_pipeline
from xfel_spread.annulus import select as annulus
from xfel_spread.io import lattices, mtz
from xfel_spread.merging import scoring
from xfel_spread.sim.structure_factors import ChannelAmplitudes

#: The LY99 cell; its crystals come out of stills_process in the Patterson group C 1 2/m 1.
CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
PATTERSON_GROUP = "C 1 2/m 1"


# --- building DIALS files -------------------------------------------------------------------------

def _crystal(rng):
    from cctbx import sgtbx, uctbx
    from dxtbx.model import Crystal
    from scipy.spatial.transform import Rotation

    orthogonalization = np.array(uctbx.unit_cell(CELL).orthogonalization_matrix()).reshape(3, 3)
    rotation = Rotation.random(random_state=rng).as_matrix()
    a, b, c = (rotation @ orthogonalization).T
    return Crystal(a, b, c, space_group=sgtbx.space_group_info(PATTERSON_GROUP).group())


def make_experiments(identifiers, rng, wavelengths=None):
    """Still-shot experiments (no scan, no images) with random orientations and the given identifiers."""
    from dxtbx.model import BeamFactory, DetectorFactory, Experiment, ExperimentList

    experiments = ExperimentList()
    for number, identifier in enumerate(identifiers):
        wavelength = 1.742 if wavelengths is None else wavelengths[number]
        detector = DetectorFactory.simple("PAD", 140.0, (50.0, 50.0), "+x", "-y", (0.1, 0.1), (1000, 1000))
        experiments.append(Experiment(beam=BeamFactory.simple(wavelength), detector=detector,
                                      crystal=_crystal(rng), identifier=identifier))
    return experiments


def make_reflections(ids, miller_indices, d, bboxes, intensities, identifiers, integrated=None):
    """An integrated-reflection table with the columns stills_process writes that the code reads."""
    from dials.array_family import flex

    n = len(ids)
    table = flex.reflection_table()
    table["id"] = flex.int(np.asarray(ids, dtype=np.int32))
    table["miller_index"] = flex.miller_index([tuple(int(v) for v in hkl) for hkl in miller_indices])
    table["d"] = flex.double(np.asarray(d, dtype=float))
    table["bbox"] = flex.int6([tuple(int(v) for v in box) for box in bboxes])
    table["panel"] = flex.size_t(n, 0)
    intensities = np.asarray(intensities, dtype=float)
    table["intensity.sum.value"] = flex.double(intensities)
    table["intensity.sum.variance"] = flex.double(np.maximum(intensities, 1.0))
    table["partiality"] = flex.double(n, 1.0)
    table["xyzobs.px.value"] = flex.vec3_double(n, (500.0, 500.0, 0.5))
    table["s1"] = flex.vec3_double(n, (0.0, 0.1, -0.57))
    table.set_flags(flex.bool(n, True) if integrated is None else flex.bool(list(integrated)),
                    table.flags.integrated_sum)
    for index, identifier in enumerate(identifiers):
        table.experiment_identifiers()[index] = identifier
    return table


def write_shard(prefix, experiments, reflections) -> None:
    """The shard's ``_integrated.expt``/``.refl``, as the reindex stage leaves them."""
    experiments.as_file(f"{prefix}_integrated.expt")
    reflections.as_file(f"{prefix}_integrated.refl")


def write_lattice_table(path, accepted: dict[str, bool]) -> None:
    lines = ["global_id\tidentifier\taccepted\treason"]
    lines += [f"{n}\t{identifier}\t{int(ok)}\t{'' if ok else 'cell'}" for n, (identifier, ok) in
              enumerate(accepted.items())]
    path.write_text("\n".join(lines) + "\n")


def symmetry():
    from cctbx import crystal

    return crystal.symmetry(unit_cell=CELL, space_group_symbol="C 1 2 1")


def anomalous_truth(rng, d_min: float):
    """A small true data set in C 1 2 1: anomalous asu indices and intensities whose Friedel mates
    differ by about 10 % (so both the mean and the anomalous signal are there to recover)."""
    from cctbx import miller

    anomalous_set = miller.build_set(symmetry(), anomalous_flag=True, d_min=d_min)
    pair_keys = list(anomalous_set.customized_copy(anomalous_flag=False).map_to_asu().indices())
    unique_keys = sorted(set(pair_keys))
    pair_mean = dict(zip(unique_keys, rng.gamma(2.0, 1000.0, len(unique_keys))))
    values = np.array([pair_mean[key] for key in pair_keys]) * (1.0 + 0.1 * rng.standard_normal(len(pair_keys)))
    return np.array(anomalous_set.indices()), values


def merged_from_truth(indices, values, rng=None, noise=0.0, path="<test>") -> mtz.MergedIntensities:
    """A merged set holding the truth (times 1 + noise), both mates and their mean, as a merge writes it."""
    from cctbx import miller
    from cctbx.array_family import flex

    values = np.asarray(values, dtype=float)
    if noise:
        values = values * (1.0 + noise * rng.standard_normal(len(values)))
    anomalous = miller.set(symmetry(), flex.miller_index([tuple(map(int, h)) for h in indices]),
                           anomalous_flag=True).array(data=flex.double(values), sigmas=flex.double(len(values), 1.0))
    mean = anomalous.average_bijvoet_mates()
    return mtz.MergedIntensities(
        path=path, unit_cell=CELL, space_group="C 1 2 1",
        anomalous_indices=np.array(anomalous.indices()), anomalous_intensities=values,
        anomalous_sigmas=np.ones(len(values)), mean_indices=np.array(mean.indices()),
        mean_intensities=np.array(mean.data()), mean_sigmas=np.array(mean.sigmas()))


def write_our_mtz(path, merged: mtz.MergedIntensities) -> None:
    """The MTZ layout spread-merge writes: one dataset with IMEAN/SIGIMEAN, I(+)/SIGI(+)/I(-)/SIGI(-)."""
    dataset = merged.mean_array().as_mtz_dataset(column_root_label="IMEAN", wavelength=1.74)
    dataset.add_miller_array(merged.anomalous_array(), column_root_label="I")
    dataset.mtz_object().write(str(path))


def write_dials_mtz(path, merged: mtz.MergedIntensities) -> None:
    """The MTZ layout dials.merge writes (HKL_base crystal, then XTAL/NATIVE with N(+), N(-)), by its own writer."""
    from cctbx.array_family import flex
    from dials.util.export_mtz import MergedMTZWriter

    anomalous = merged.anomalous_array()
    writer = MergedMTZWriter(anomalous.space_group(), anomalous.unit_cell())
    writer.add_crystal(crystal_name="XTAL", project_name="AUTOMATIC")
    writer.add_empty_dataset(1.74, name="NATIVE")
    writer.add_dataset(merged.mean_array(), anomalous,
                       multiplicities=anomalous.customized_copy(data=flex.int(anomalous.size(), 2), sigmas=None))
    writer.mtz_file.write(str(path))


def sorted_rows(indices, *columns):
    order = np.lexsort(np.asarray(indices).T[::-1])
    return (np.asarray(indices)[order], *(np.asarray(column)[order] for column in columns))


# --- truth scoring --------------------------------------------------------------------------------

def test_true_intensities_are_the_spectrum_weighted_squared_amplitudes():
    amplitudes = ChannelAmplitudes(
        energies_ev=np.array([7100.0, 7101.0]), unit_cell=CELL, space_group="C 1 2 1",
        indices=np.array([[1, 1, 0], [-1, -1, 0], [2, 0, 1]]),
        amplitudes=np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32))
    indices, values = scoring.true_intensities(amplitudes, [1.0, 3.0])  # normalised to 0.25, 0.75
    np.testing.assert_array_equal(indices, amplitudes.indices)
    np.testing.assert_allclose(values, [0.25 * 1 + 0.75 * 9, 0.25 * 4 + 0.75 * 4, 0.25 * 9 + 0.75 * 1])
    with pytest.raises(ValueError, match="3 spectrum weights for 2 amplitude channels"):
        scoring.true_intensities(amplitudes, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        scoring.true_intensities(amplitudes, [1.0, -1.0])


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


# --- annulus --------------------------------------------------------------------------------------

#: Lattice "A": accepted, with reflections on both edges and outside; "B": accepted, none inside;
#: "C": inside but rejected by the merge; "D": accepted, inside.
#: (lattice, hkl, d, bbox x0 x1 y0 y1, integrated)
ANNULUS_ROWS = [
    ("A", (2, 0, 0), 3.0, (0, 4, 0, 4), True),
    ("A", (5, 5, 5), 2.5, (0, 4, 0, 4), True),       # d = d_max: outside
    ("A", (1, 1, 3), 2.4, (0, 10, 0, 8), True),      # 80 pixels
    ("A", (3, 3, 3), 2.2, (0, 4, 0, 4), False),      # not integrated
    ("A", (-1, -1, -3), 2.1, (5, 9, 5, 10), True),   # d = d_min: inside; Friedel mate of (1, 1, 3); 20 px
    ("A", (4, 0, 0), 2.0, (0, 4, 0, 4), True),
    ("B", (0, 2, 0), 3.5, (0, 4, 0, 4), True),
    ("B", (6, 0, 0), 1.9, (0, 4, 0, 4), True),
    ("C", (1, 1, 3), 2.3, (0, 4, 0, 4), True),
    ("D", (-1, 1, -3), 2.3, (0, 3, 0, 3), True),     # (1, 1, 3) under the 2-fold along b; 9 px
    ("D", (2, 2, 1), 2.25, (0, 2, 0, 2), True),      # 4 px
]
LATTICES = ("A", "B", "C", "D")


def write_annulus_shards(tmp_path):
    """Shard 0 holds ANNULUS_ROWS; shard 1 has no lattice (stills_process integrated nothing)."""
    from dials.array_family import flex
    from dxtbx.model import ExperimentList

    rng = np.random.default_rng(8)
    position = {name: n for n, name in enumerate(LATTICES)}
    rows = list(zip(*ANNULUS_ROWS))
    reflections = make_reflections([position[name] for name in rows[0]], rows[1], rows[2],
                                   [box + (0, 1) for box in rows[3]], np.arange(len(ANNULUS_ROWS)) * 10.0,
                                   LATTICES, integrated=rows[4])
    write_shard(tmp_path / "shard_00000", make_experiments(LATTICES, rng), reflections)
    ExperimentList().as_file(str(tmp_path / "shard_00001_integrated.expt"))
    flex.reflection_table().as_file(str(tmp_path / "shard_00001_integrated.refl"))
    write_lattice_table(tmp_path / "lattices.tsv", {"A": True, "B": True, "C": False, "D": True})


def test_annulus_selects_accepted_lattices_in_the_shell(tmp_path):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    write_annulus_shards(tmp_path)
    summary = annulus_pipeline.select_annulus([tmp_path / "shard_00000", tmp_path / "shard_00001"],
                                     [tmp_path / "out_00000", tmp_path / "out_00001"], tmp_path / "lattices.tsv",
                                     d_max=2.5, d_min=2.1)
    assert summary["space_group"] == "C 1 2 1"
    assert summary["accepted_lattices_in_table"] == summary["accepted_lattices_in_shards"] == 3
    assert summary["total"] == {
        "lattices": 2, "shoeboxes": 4,
        # (1, 1, 3) and (-1, 1, -3) are one index; its Friedel mate (-1, -1, -3) another; (2, 2, 1).
        "unique_indices_anomalous": 3, "unique_indices_friedel_merged": 2,
        "multiplicity_anomalous": pytest.approx(4 / 3), "multiplicity_friedel_merged": pytest.approx(2.0),
        "shoebox_pixels": 80 + 20 + 9 + 4,
    }
    assert [shard["shoeboxes"] for shard in summary["shards"]] == [4, 0]

    experiments = ExperimentList.from_file(str(tmp_path / "out_00000_annulus.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(str(tmp_path / "out_00000_annulus.refl"))
    assert [experiment.identifier for experiment in experiments] == ["A", "D"]
    assert reflections.are_experiment_identifiers_consistent(experiments)
    assert dict(reflections.experiment_identifiers()) == {0: "A", 1: "D"}
    assert list(reflections["id"]) == [0, 0, 1, 1]
    assert list(reflections["d"]) == [2.4, 2.1, 2.3, 2.25]
    assert list(reflections["intensity.sum.value"]) == [20.0, 40.0, 90.0, 100.0]  # all columns kept
    # The second crystal written is D's (B, without an annulus reflection, is dropped).
    source = ExperimentList.from_file(str(tmp_path / "shard_00000_integrated.expt"), check_format=False)
    assert experiments[1].crystal.get_A() == source[3].crystal.get_A()

    empty = ExperimentList.from_file(str(tmp_path / "out_00001_annulus.expt"), check_format=False)
    assert len(empty) == 0 and flex.reflection_table.from_file(str(tmp_path / "out_00001_annulus.refl")).size() == 0


def test_annulus_errors(tmp_path):
    with pytest.raises(annulus.AnnulusError, match=r"d_min \(2.5 A\) must be positive and below d_max \(2.1 A\)"):
        annulus.check_annulus(2.1, 2.5)
    with pytest.raises(annulus.AnnulusError, match="below d_max"):
        annulus.check_annulus(2.1, 2.1)
    table = tmp_path / "lattices.tsv"
    table.write_text("identifier\tkept\nA\t1\n")
    with pytest.raises(lattices.LatticeTableError, match=f"^{table}: lattice table lacks column\\(s\\) accepted$"):
        lattices.read_accepted_identifiers(table)
    table.write_text("identifier\taccepted\nA\tyes\n")
    with pytest.raises(lattices.LatticeTableError, match=f"^{table}:2: accepted must be 1 or 0"):
        lattices.read_accepted_identifiers(table)


def test_annulus_cli(tmp_path, capsys):
    from xfel_spread.cli.annulus import annulus_main

    write_annulus_shards(tmp_path)
    config = tmp_path / "annulus.yaml"
    config.write_text("annulus:\n  d_max: 2.5\n  d_min: 2.1\n")
    arguments = ["--config", str(config), "--lattices", str(tmp_path / "lattices.tsv"),
                 "--shard-prefix", str(tmp_path / "shard_00000"), "--output-prefix", str(tmp_path / "out_00000"),
                 "--shard-prefix", str(tmp_path / "shard_00001"), "--output-prefix", str(tmp_path / "out_00001"),
                 "--summary", str(tmp_path / "annulus.json"), "--text", str(tmp_path / "annulus.txt")]
    assert annulus_main(arguments) == 0
    text = (tmp_path / "annulus.txt").read_text()
    assert text == capsys.readouterr().out
    assert "integration bounding boxes" in text
    assert json.loads((tmp_path / "annulus.json").read_text())["total"]["shoebox_pixels"] == 113

    config.write_text("annulus:\n  d_max: 2.0\n  d_min: 2.1\n")
    assert annulus_main(arguments) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"spread-annulus: error: {config}: annulus: d_min (2.1 A) must be positive and below "
                     "d_max (2 A)")


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
