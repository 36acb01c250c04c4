"""The merge end to end on tiny synthetic shards written in dials.stills_process's layout.

Lattices of the 1M2A C2 crystal with known scale, B, spot radius and a small indexing error observe
true intensities with Bijvoet differences; the merge must find them again (I(+) and I(-) apart),
reject the planted bad lattices with the right reasons, write an MTZ that iotbx reads back, give the
same arrays on one and two MPI ranks, and stop with one-line errors on bad input.
"""

from __future__ import annotations

import csv
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from xfel_spread.merging.indices import d_star_sq, map_to_asu
from xfel_spread.mpi import SerialComm
from xfel_spread.merging.pipeline import MergeOutputs, MergeSettings, run_merge
from xfel_spread.merging.reference import model_reference

from conftest import SHARED_DATA_DIR, mpirun_command, run_job

MODEL = SHARED_DATA_DIR / "1m2a.pdb"
CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
WAVELENGTH = 1.74
D_MIN = 3.2
RS = 1.2e-3
BIN = Path(sys.executable).parent
SETTINGS = MergeSettings(d_min=D_MIN, n_bins=4)
FLAG_INTEGRATED_SUM = 1 << 8  # dials' integrated_sum flag
#: Kinds of planted lattices.
NORMAL, WRONG_CELL, UNRELATED, UNINTEGRATED, NEGATIVE = range(5)


class SphericalCluster:
    """Mahalanobis distance: the Euclidean distance of a, b, c from the model cell, in units of sigma."""

    sigma = 0.1

    def mahalanobis(self, cells):
        return np.linalg.norm((np.asarray(cells)[:, :3] - np.array(CELL[:3])) / self.sigma, axis=1)


@pytest.fixture(scope="module")
def truth():
    """True intensities per (pair key, is_minus): the model's, with Bijvoet differences of about 10%."""
    reference = model_reference(MODEL, D_MIN * 0.98)
    rng = np.random.default_rng(11)
    anomalous = 0.1 * rng.standard_normal(len(reference.keys))
    return reference.keys, reference.intensity * (1 + anomalous), reference.intensity * (1 - anomalous)


def true_intensity(truth, hkl):
    from cctbx import sgtbx

    keys, plus, minus = truth
    key, is_minus = map_to_asu(hkl, sgtbx.space_group_info("C 1 2 1").group())
    position = np.searchsorted(keys, key)
    assert np.all(keys[position] == key)
    # Centric indices have no I(-): their truth is the I(+) value (cctbx maps them to I(+)).
    return np.where(is_minus, minus[position], plus[position])


def candidate_indices():
    from cctbx import crystal

    complete = crystal.symmetry(CELL, "C 1 2 1").build_miller_set(anomalous_flag=True, d_min=D_MIN)
    return np.array(complete.expand_to_p1().indices(), dtype=np.int64)


def rotation_about(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def simulate_lattice(rng, truth, candidates, kind, drawn=None):
    """(real-space rows a, b, c as recorded, table columns) of one lattice; its true (scale, B) are appended
    to ``drawn`` if given."""
    from cctbx import uctbx

    cell = np.array(CELL) * ([1.03, 1.03, 1.03, 1, 1, 1] if kind == WRONG_CELL else 1.0)
    orthogonalization = np.array(uctbx.unit_cell(tuple(cell)).orthogonalization_matrix()).reshape(3, 3)
    u = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    real_true = (u @ orthogonalization).T  # rows a, b, c
    a_true = np.linalg.inv(real_true)
    # Indexing error: the recorded lattice is the true one turned by about 0.3 mrad.
    turn = rotation_about(rng.normal(size=3), 3e-4)
    real_recorded = real_true @ turn.T
    s0 = np.array([0.0, 0.0, -1 / WAVELENGTH])
    q = candidates @ a_true.T
    rh = np.linalg.norm(q + s0, axis=1) - 1 / WAVELENGTH
    chosen = np.abs(rh) < 2 * RS
    hkl, q, rh = candidates[chosen], q[chosen], rh[chosen]
    s1 = q + s0
    d = 1 / np.linalg.norm(q, axis=1)
    scale, b_factor = rng.lognormal(0, 0.3), rng.normal(0, 1.0)
    if drawn is not None:
        drawn.append((scale, b_factor))
    intensity = true_intensity(truth, hkl)
    if kind == UNRELATED:
        intensity = rng.permutation(intensity)
    partiality = RS ** 2 / (2 * rh ** 2 + RS ** 2)
    two_theta = 2 * np.arcsin(WAVELENGTH / (2 * d))
    cos_phi = s1[:, 1] / np.linalg.norm(s1[:, :2], axis=1)
    polarization = 0.5 * (1 + np.cos(two_theta) ** 2) + 0.5 * (2 * cos_phi ** 2 - 1) * np.sin(two_theta) ** 2
    expected = 0.01 * scale * np.exp(-2 * b_factor / d ** 2) * partiality * polarization * intensity
    variance = expected + 20.0
    observed = expected + 0.02 * np.sqrt(variance) * rng.standard_normal(len(expected))
    if kind == NEGATIVE:
        observed = -np.sqrt(variance)
    flags = np.full(len(hkl), FLAG_INTEGRATED_SUM if kind != UNINTEGRATED else 0, dtype=np.uint64)
    return real_recorded, {"miller_index": hkl, "intensity.sum.value": observed, "intensity.sum.variance": variance,
                           "d": d, "s1": s1, "flags": flags}


def write_shard(prefix, lattices, rng):
    """``prefix_integrated.expt`` (JSON) and ``prefix_integrated.refl`` (flex table) of the lattices."""
    from dials.array_family import flex

    identifiers = [str(uuid.UUID(bytes=rng.bytes(16))) for _ in lattices]
    experiments = [{"__id__": "Experiment", "identifier": identifier, "beam": number, "crystal": number, "detector": 0}
                   for number, identifier in enumerate(identifiers)]
    crystals = [{"__id__": "crystal", "real_space_a": list(real[0]), "real_space_b": list(real[1]),
                 "real_space_c": list(real[2]), "space_group_hall_symbol": "-C 2y"} for real, _ in lattices]
    beams = [{"direction": [0.0, 0.0, 1.0], "wavelength": WAVELENGTH, "polarization_normal": [0.0, 1.0, 0.0],
              "polarization_fraction": 1.0} for _ in lattices]
    Path(f"{prefix}_integrated.expt").write_text(json.dumps(
        {"__id__": "ExperimentList", "experiment": experiments, "crystal": crystals, "beam": beams,
         "detector": [], "imageset": [], "goniometer": [], "scan": [], "profile": [], "scaling_model": []}))
    table = flex.reflection_table()
    if lattices:
        columns = {name: np.concatenate([table_columns[name] for _, table_columns in lattices])
                   for name in lattices[0][1]}
        lattice_id = np.concatenate([np.full(len(c["d"]), number) for number, (_, c) in enumerate(lattices)])
        order = rng.permutation(len(lattice_id))  # the merge must not rely on rows sorted by lattice
        table["id"] = flex.int(lattice_id[order].astype(np.int32))
        hkl = columns["miller_index"][order].astype(np.int32)
        table["miller_index"] = flex.miller_index(*(flex.int(np.ascontiguousarray(hkl[:, axis])) for axis in range(3)))
        for name in ("intensity.sum.value", "intensity.sum.variance", "d"):
            table[name] = flex.double(np.ascontiguousarray(columns[name][order]))
        table["s1"] = flex.vec3_double(flex.double(np.ascontiguousarray(columns["s1"][order]).ravel()))
        table["flags"] = flex.size_t(columns["flags"][order])
        for number, identifier in enumerate(identifiers):
            table.experiment_identifiers()[number] = identifier
    table.as_file(f"{prefix}_integrated.refl")
    return identifiers


def make_dataset(directory, truth, kinds_per_shard, seed=13, drawn=None):
    """Shards of lattices of the given kinds; returns (prefixes, {identifier: kind}); the lattices' true
    (scale, B), in global-id order, are appended to ``drawn`` if given."""
    rng = np.random.default_rng(seed)
    candidates = candidate_indices()
    prefixes, kinds = [], {}
    for number, shard_kinds in enumerate(kinds_per_shard):
        prefix = str(directory / f"shard_{number:05d}")
        lattices = [simulate_lattice(rng, truth, candidates, kind, drawn) for kind in shard_kinds]
        kinds.update(zip(write_shard(prefix, lattices, rng), shard_kinds))
        prefixes.append(prefix)
    return prefixes, kinds


def outputs_in(directory, name="merged"):
    return MergeOutputs(*(directory / f"{name}.{suffix}" for suffix in ("mtz", "stats.tsv", "stats.txt", "png",
                                                                          "lattices.tsv", "json")))


def read_lattice_table(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def mtz_arrays(path):
    from iotbx import mtz

    return {array.info().label_string(): array for array in mtz.object(str(path)).as_miller_arrays()}


@pytest.fixture(scope="module")
def merged_dataset(tmp_path_factory, truth):
    """40 good lattices in 3 shards (one empty) plus one of each bad kind, merged on one rank."""
    directory = tmp_path_factory.mktemp("merge")
    kinds = [[NORMAL] * 20 + [WRONG_CELL, UNRELATED], [], [NORMAL] * 20 + [UNINTEGRATED, NEGATIVE]]
    prefixes, lattice_kinds = make_dataset(directory, truth, kinds)
    outputs = outputs_in(directory)
    summary = run_merge(SerialComm(), prefixes, SphericalCluster(), MODEL, SETTINGS, outputs)
    return directory, prefixes, lattice_kinds, outputs, summary


def test_bad_lattices_are_rejected_with_their_reasons(merged_dataset):
    _, prefixes, kinds, outputs, summary = merged_dataset
    rows = read_lattice_table(outputs.lattices)
    assert [row["global_id"] for row in rows] == [str(number) for number in range(44)]
    expected = {NORMAL: "", WRONG_CELL: "cell_outlier", UNRELATED: "low_reference_cc",
                UNINTEGRATED: "no_reflections", NEGATIVE: "significance"}
    for row in rows:
        assert row["reason"] == expected[kinds[row["identifier"]]], row
        assert row["accepted"] == ("1" if kinds[row["identifier"]] == NORMAL else "0")
    assert rows[0]["shard_prefix"] == prefixes[0] and rows[-1]["shard_prefix"] == prefixes[2]
    assert summary["lattices_read"] == 44 and summary["accepted"] == 40
    assert summary["rejected"] == {"no_reflections": 1, "cell_outlier": 1, "significance": 1, "low_reference_cc": 1}


def test_scales_are_recovered(merged_dataset):
    _, _, kinds, outputs, _ = merged_dataset
    rows = [row for row in read_lattice_table(outputs.lattices) if row["accepted"] == "1"]
    rs = np.array([float(row["RS"]) for row in rows])
    assert np.median(rs) == pytest.approx(RS, rel=0.05)
    rotations = np.array([[float(row["theta_x_mrad"]), float(row["theta_y_mrad"])] for row in rows])
    assert np.all(np.abs(rotations) < 1.0)
    assert all(int(row["n_reflections"]) > 20 for row in rows)


def test_merged_intensities_match_the_truth_with_friedel_mates_apart(merged_dataset, truth):
    _, _, _, outputs, summary = merged_dataset
    arrays = mtz_arrays(outputs.mtz)
    anomalous = arrays["I(+),SIGI(+),I(-),SIGI(-)"]
    imean = arrays["IMEAN,SIGIMEAN"]
    assert anomalous.anomalous_flag() and not imean.anomalous_flag()
    hkl = np.array(anomalous.indices())
    true = true_intensity(truth, hkl)
    data = anomalous.data().as_numpy_array()
    scale = np.sum(data * true) / np.sum(true * true)
    assert np.corrcoef(data, true)[0, 1] > 0.995
    relative_error = np.abs(data / scale - true) / true
    assert np.median(relative_error) < 0.05 and np.percentile(relative_error, 95) < 0.2
    # Bijvoet pairs measured on both sides differ as the truth does.
    matched = anomalous.match_bijvoet_mates()[1].pairs()
    plus, minus = np.array(matched.column(0)), np.array(matched.column(1))
    assert len(plus) >= 20
    measured_difference = data[plus] - data[minus]
    true_difference = scale * (true[plus] - true[minus])
    assert np.corrcoef(measured_difference, true_difference)[0, 1] > 0.8
    assert not np.allclose(data[plus], data[minus], rtol=0.02)
    # IMEAN of a pair is the weighted mean of all its observations, i.e. of I(+) and I(-) weighted by
    # their sigmas (the same variances: the error model does not depend on the mate).
    sigma = anomalous.sigmas().as_numpy_array()
    weights_plus, weights_minus = 1 / sigma[plus] ** 2, 1 / sigma[minus] ** 2
    expected = (weights_plus * data[plus] + weights_minus * data[minus]) / (weights_plus + weights_minus)
    mean_keys = {tuple(index): value for index, value in zip(np.array(imean.indices()), imean.data())}
    pair_hkl = np.array(anomalous.indices())[plus]
    assert np.allclose([mean_keys[tuple(index)] for index in pair_hkl], expected, rtol=1e-6)  # MTZ: float32
    assert summary["unique_written"] == {"IMEAN": imean.size(), "anomalous": anomalous.size()}


def test_mtz_columns_cell_and_space_group(merged_dataset):
    from iotbx import mtz

    _, _, _, outputs, summary = merged_dataset
    mtz_object = mtz.object(str(outputs.mtz))
    labels = {column.label(): column.type() for column in mtz_object.columns()}
    assert labels == {"H": "H", "K": "H", "L": "H", "IMEAN": "J", "SIGIMEAN": "Q", "I(+)": "K", "SIGI(+)": "M",
                      "I(-)": "K", "SIGI(-)": "M", "NIMEAN": "I", "N(+)": "I", "N(-)": "I"}
    assert str(mtz_object.space_group_info()) == "C 1 2 1"
    cell = mtz_object.crystals()[1].unit_cell().parameters()
    assert cell == pytest.approx(summary["average_cell"], abs=1e-3)
    assert cell == pytest.approx(CELL, abs=0.01)
    multiplicity = mtz_arrays(outputs.mtz)["NIMEAN"].data().as_numpy_array()
    assert multiplicity.min() >= SETTINGS.minimum_multiplicity
    assert min(1 / np.sqrt(d_star_sq(np.array(mtz_arrays(outputs.mtz)["NIMEAN"].indices()), cell))) >= D_MIN - 1e-3


def test_statistics_files(merged_dataset):
    _, _, _, outputs, summary = merged_dataset
    with open(outputs.stats_table, newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    assert [row["bin"] for row in rows] == ["1", "2", "3", "4", "all"]
    assert float(rows[-1]["d_min"]) == pytest.approx(D_MIN, abs=1e-3)
    assert int(rows[-1]["n_observations"]) == sum(int(row["n_observations"]) for row in rows[:-1])
    assert 0 < float(rows[-1]["completeness"]) <= 1
    text = outputs.stats_text.read_text()
    assert "CC1/2" in text and "CCanom" in text and text.splitlines()[-1].startswith("all")
    assert outputs.stats_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(outputs.summary.read_text())
    assert saved["overall"]["n_measured"] == int(rows[-1]["n_measured"])
    assert set(saved["timings_s"]) >= {"load", "reference", "filter", "scale", "merge", "write"}
    assert saved["error_model"]["sdfac"] > 0 and saved["error_model"]["sdb"] == 0.0
    assert saved["error_model"]["target"] >= 0 and saved["error_model"]["note"] == ""


def test_scale_only_and_no_error_model(merged_dataset, tmp_path):
    _, prefixes, _, _, _ = merged_dataset
    settings = MergeSettings(d_min=D_MIN, n_bins=4, postrefinement="none", error_model="none")
    summary = run_merge(SerialComm(), prefixes, SphericalCluster(), MODEL, settings, outputs_in(tmp_path))
    assert summary["accepted"] == 40 and summary["error_model"]["sdfac"] == 1.0
    rows = [row for row in read_lattice_table(outputs_in(tmp_path).lattices) if row["accepted"] == "1"]
    assert all(row["B"] == "" and float(row["G"]) > 0 for row in rows)


# --- command line: ranks and errors --------------------------------------------------------------

def write_covariance(path):
    from xfel_spread.cells.covariance import CellCovariance, CellPopulations, write_covariance_pickle

    cluster = CellCovariance(np.array(CELL[:3]), np.diag([0.1 ** 2] * 3))
    write_covariance_pickle(path, CellPopulations(np.zeros(10, int), [cluster]), ["a", "b", "c"], "test", {})


def merge_command(directory, prefixes, name, covariance, model=MODEL, ranks=None, timeout=300):
    config = directory / "merge.yaml"
    config.write_text(f"merge:\n  d_min: {D_MIN}\n  n_bins: 4\n")
    outputs = outputs_in(directory, name)
    command = [str(BIN / "spread-merge"), "--config", str(config),
               *[item for prefix in prefixes for item in ("--shard-prefix", str(prefix))],
               "--covariance", str(covariance), "--model", str(model), "--mtz", str(outputs.mtz),
               "--stats-table", str(outputs.stats_table), "--stats-text", str(outputs.stats_text),
               "--stats-plot", str(outputs.stats_plot), "--lattices", str(outputs.lattices),
               "--summary", str(outputs.summary)]
    if ranks:
        command = mpirun_command(command, ranks)
    return run_job(command, timeout), outputs


def test_one_and_two_ranks_give_identical_files(merged_dataset, tmp_path):
    from iotbx import mtz

    _, prefixes, _, _, _ = merged_dataset
    covariance = tmp_path / "covariance.pickle"
    write_covariance(covariance)
    one, one_outputs = merge_command(tmp_path, prefixes, "one", covariance, ranks=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, two_outputs = merge_command(tmp_path, prefixes, "two", covariance, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "merging statistics" in two.stderr and "spread-merge: 40 of 44 lattices merged" in two.stderr
    # Rank 0 names the rank count; the others log only warnings.
    assert one.stderr.count("spread-merge: 1 rank(s)") == 1 and two.stderr.count("spread-merge: 2 rank(s)") == 1
    first, second = mtz.object(str(one_outputs.mtz)), mtz.object(str(two_outputs.mtz))
    for column_one, column_two in zip(first.columns(), second.columns()):
        assert column_one.label() == column_two.label()
        values_one = column_one.extract_values_and_selection_valid()
        values_two = column_two.extract_values_and_selection_valid()
        assert np.array_equal(values_one.values.as_numpy_array(), values_two.values.as_numpy_array())
        assert np.array_equal(values_one.selection_valid.as_numpy_array(), values_two.selection_valid.as_numpy_array())
    assert one_outputs.lattices.read_text() == two_outputs.lattices.read_text()
    assert one_outputs.stats_table.read_text() == two_outputs.stats_table.read_text()
    # Everything in the summaries, floats to the last bit (JSON keeps them exactly), but ranks and timings.
    summary_one, summary_two = (json.loads(outputs.summary.read_text()) for outputs in (one_outputs, two_outputs))
    assert (summary_one.pop("n_ranks"), summary_two.pop("n_ranks")) == (1, 2)
    summary_one.pop("timings_s"), summary_two.pop("timings_s")
    assert summary_one == summary_two


def test_errors_on_two_ranks_are_one_line(merged_dataset, tmp_path):
    _, prefixes, _, _, _ = merged_dataset
    covariance = tmp_path / "covariance.pickle"
    write_covariance(covariance)

    def error_of(result):
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.startswith("spread-merge: error:")]
        assert len(lines) == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        return lines[0]

    # Rank 1 cannot read its shard; rank 0 reports it.
    missing = tmp_path / "nowhere" / "shard_00000"
    result, outputs = merge_command(tmp_path, [prefixes[0], missing], "missing", covariance, ranks=2)
    assert error_of(result) == (f"spread-merge: error: {missing}_integrated.expt: cannot read the experiment list "
                                "(No such file or directory)")
    assert not outputs.mtz.exists() and not outputs.summary.exists()

    far = tmp_path / "far.pickle"
    from xfel_spread.cells.covariance import CellCovariance, CellPopulations, write_covariance_pickle

    write_covariance_pickle(far, CellPopulations(np.zeros(10, int), [CellCovariance(np.array([60.0, 60.0, 60.0]),
                                                                                     np.eye(3) * 0.01)]),
                            ["a", "b", "c"], "test", {})
    result, _ = merge_command(tmp_path, prefixes, "far", far, ranks=2)
    assert error_of(result) == ("spread-merge: error: no lattice survives the filters: 44 read; no_reflections "
                                "removed 1, cell_outlier removed 43")


def test_a_corrupt_shard_on_one_rank_ends_the_job(merged_dataset, tmp_path):
    """Rank 1's shard has a truncated reflection table: the job ends at once, reports it, writes nothing."""
    _, prefixes, _, _, _ = merged_dataset
    covariance = tmp_path / "covariance.pickle"
    write_covariance(covariance)
    corrupt = tmp_path / "corrupt"
    Path(f"{corrupt}_integrated.expt").write_bytes(Path(f"{prefixes[2]}_integrated.expt").read_bytes())
    table = Path(f"{prefixes[2]}_integrated.refl").read_bytes()
    Path(f"{corrupt}_integrated.refl").write_bytes(table[:len(table) // 2])  # a copy cut short
    output_directory = tmp_path / "out"
    output_directory.mkdir()

    # Two shards on two ranks: rank 0 reads a good one, rank 1 the corrupt one.
    result, _ = merge_command(output_directory, [prefixes[0], corrupt], "merged", covariance, ranks=2, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("spread-merge: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"spread-merge: error: {corrupt}_integrated.refl: not a readable reflection table (")
    assert "Traceback" not in result.stderr
    # Nothing written, not even a temporary file: only the settings file the test put there.
    assert sorted(path.name for path in output_directory.iterdir()) == ["merge.yaml"]


def test_input_errors(merged_dataset, tmp_path):
    from xfel_spread.merging.loading import read_reflections

    _, prefixes, _, _, _ = merged_dataset

    def merge(prefixes, model=MODEL):
        return run_merge(SerialComm(), prefixes, SphericalCluster(), model, SETTINGS, outputs_in(tmp_path))

    with pytest.raises(ValueError, match=rf"^the 1 shard\(s\) hold no lattice \(first: {prefixes[1]}\)$"):
        merge([prefixes[1]])

    other_cell = tmp_path / "other_cell.pdb"
    other_cell.write_text("".join(
        "CRYST1   70.000   62.000   47.200  90.00 110.30  90.00 C 1 2 1       8          \n"
        if line.startswith("CRYST1") else line for line in MODEL.read_text().splitlines(keepends=True)))
    # The average of all 44 lattices' cells, one of them 3% longer in a, b, c.
    message = (f"{other_cell}: model cell (70.000, 62.000, 47.200, 90.00, 110.30, 90.00) disagrees with the "
               "lattices' average cell (67.246, 59.841, 47.232, 90.00, 110.30, 90.00) (tolerance 3% in lengths, "
               "2 deg in angles)")
    with pytest.raises(ValueError) as raised:
        merge(prefixes, other_cell)
    assert str(raised.value) == message

    garbled = tmp_path / "garbled_integrated.expt"
    garbled.write_text("{not json")
    (tmp_path / "garbled_integrated.refl").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{garbled}: not a readable experiment list"):
        merge([str(tmp_path / "garbled")])

    with pytest.raises(ValueError, match=r"garbled_integrated.refl: not a readable reflection table"):
        read_reflections(tmp_path / "garbled_integrated.refl", 1, ["x"])
    assert not outputs_in(tmp_path).mtz.exists()


def test_nothing_to_merge_is_an_error_not_an_empty_mtz(merged_dataset, tmp_path):
    _, prefixes, _, _, _ = merged_dataset
    # No index is observed a thousand times in 44 small lattices.
    settings = MergeSettings(d_min=D_MIN, n_bins=4, minimum_multiplicity=1000)
    with pytest.raises(ValueError, match=r"^nothing to merge: no index of the \d+ accepted lattices is observed at "
                                         r"least 1000 times \(merge.minimum_multiplicity\) to 3.2 A$"):
        run_merge(SerialComm(), prefixes, SphericalCluster(), MODEL, settings, outputs_in(tmp_path))
    assert not outputs_in(tmp_path).mtz.exists()
