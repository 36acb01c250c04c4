"""Synthetic integrated lattices (sim.lattices, sim.lattice_dataset, io.synthetic_lattices): files, physics,
determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sim_fixtures import ly99_amplitudes
from xfel_spread.io import synthetic_lattices as synio
from xfel_spread.sim import lattice_dataset as lds
from xfel_spread.sim import lattices as lat

SEED = 11
N_LATTICES = 20


@pytest.fixture(scope="module")
def truth() -> synio.TruthIntensities:
    amplitudes = ly99_amplitudes()
    settings = lat.SyntheticSettings()
    weights = lat.spectrum_weights(amplitudes.energies_ev, settings.energy_ev, settings.spectrum_fwhm_ev)
    return lat.truth_intensities(amplitudes, weights)


@pytest.fixture(scope="module")
def source(truth) -> lat.Source:
    return lat.prepare_source(truth, lat.SyntheticSettings(), SEED)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, truth):
    """Two shards of 20 lattices written with the default settings."""
    directory = tmp_path_factory.mktemp("synthetic")
    prefixes = lds.generate_dataset(directory, 2 * N_LATTICES, N_LATTICES, truth, lat.SyntheticSettings(), SEED)
    return directory, prefixes


def test_spectrum_weights_are_a_normalised_gaussian_with_the_given_fwhm():
    energies = np.arange(7070.5, 7170.0, 1.0)
    weights = lat.spectrum_weights(energies, 7120.0, 25.0)
    assert weights.sum() == pytest.approx(1.0)
    above_half = energies[weights >= weights.max() / 2]
    assert above_half.max() - above_half.min() == pytest.approx(24.0, abs=1.0)  # FWHM on a 1 eV grid
    assert energies[np.argmax(weights)] in (7119.5, 7120.5)


def test_truth_keeps_the_fe_anomalous_differences(truth):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=truth.unit_cell, space_group_symbol=truth.space_group)
    array = miller.set(symmetry, flex.miller_index(truth.miller_index), anomalous_flag=True).array(
        data=flex.double(truth.intensity))
    differences = np.asarray(array.anomalous_differences().data())
    mean = np.asarray(array.average_bijvoet_mates().data()).mean()
    assert len(differences) > 10000
    # Fe f'' near the K edge: Bijvoet differences of several percent of the mean intensity.
    assert 0.02 < np.sqrt(np.mean(differences ** 2)) / mean < 0.5


def test_rs_partiality_and_excitation_error_known_values():
    assert lat.rs_partiality(np.array([0.0, 2e-4, -2e-4]), 2e-4) == pytest.approx([1.0, 1 / 3, 1 / 3])
    wavelength = 1.74
    k = 1 / wavelength
    # A point on the Ewald sphere (|x + s0| = k, s0 = (0, 0, -k)) and one 1e-4 outside it.
    on_sphere = np.array([[k * np.sin(0.3), 0.0, k - k * np.cos(0.3)]])
    assert lat.excitation_errors(on_sphere, wavelength) == pytest.approx([0.0], abs=1e-12)
    outside = on_sphere + (k + 1e-4) / k * (on_sphere - (0, 0, k)) - (on_sphere - (0, 0, k))
    assert lat.excitation_errors(outside, wavelength) == pytest.approx([1e-4], rel=1e-6)


def test_polarization_factor_for_a_beam_polarized_along_x():
    directions = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [np.sqrt(0.5), 0.0, -np.sqrt(0.5)]])
    assert lat.polarization_factors(directions, (0.0, 1.0, 0.0)) == pytest.approx([1.0, 0.0, 1.0, 0.5])


def test_rotations_are_proper_and_cells_scatter_as_configured():
    rng = np.random.default_rng(0)
    rotations = lat.uniform_rotations(500, rng)
    assert np.allclose(rotations @ np.transpose(rotations, (0, 2, 1)), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(rotations), 1.0)
    # Uniform on SO(3): the mean rotation matrix is zero.
    assert np.abs(rotations.mean(axis=0)).max() < 0.1
    cells = lat.scattered_cells((67.2, 59.8, 47.2, 90, 110.3, 90), 4000, 0.0015, 0.05, rng)
    assert cells[:, :3].std(axis=0) / (67.2, 59.8, 47.2) == pytest.approx([0.0015] * 3, rel=0.1)
    assert cells[:, 4].std() == pytest.approx(0.05, rel=0.1)
    assert np.all(cells[:, [3, 5]] == 90)


def test_summation_variance_is_what_dials_reports():
    settings = replace(lat.SyntheticSettings(), readout_noise=0.0)
    rng = np.random.default_rng(1)
    signal = np.full(20000, 500.0)
    measured = lat.integrate(signal, np.full(20000, 50.0), settings, rng)
    m, n = measured.n_foreground, measured.n_background
    assert np.allclose(measured.background_sum_variance, measured.background_sum * (1 + m / n))
    assert np.allclose(measured.variance, measured.intensity + measured.background_sum_variance)
    # Without readout noise the reported variance is the real one: I/sigma residuals have unit spread.
    pulls = (measured.intensity - signal) / np.sqrt(measured.variance)
    assert pulls.mean() == pytest.approx(0.0, abs=0.03)
    assert pulls.std() == pytest.approx(1.0, abs=0.03)


def test_files_are_readable_by_dxtbx_and_dials_with_consistent_identifiers(dataset):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory, prefixes = dataset
    assert (directory / lds.COMPLETE_MARKER).is_file()
    all_identifiers = []
    for prefix in prefixes:
        experiments = ExperimentListFactory.from_json_file(prefix + "_integrated.expt", check_format=False)
        table = flex.reflection_table.from_file(prefix + "_integrated.refl")
        with np.load(prefix + synio.TRUTH_SUFFIX) as truth_file:
            truth_identifiers = list(truth_file["identifier"])
        identifiers = [experiment.identifier for experiment in experiments]
        assert len(experiments) == N_LATTICES and len(set(identifiers)) == N_LATTICES
        assert len(experiments.detectors()) == 1
        assert identifiers == truth_identifiers
        id_map = table.experiment_identifiers()
        assert sorted(id_map.keys()) == list(range(N_LATTICES))
        assert all(id_map[i] == identifiers[i] for i in range(N_LATTICES))
        ids = table["id"].as_numpy_array()
        assert ids.min() == 0 and ids.max() == N_LATTICES - 1 and np.all(np.diff(ids) >= 0)
        assert sorted(table.keys()) == sorted(synio.COLUMN_TYPES)
        for name, type_name in synio.COLUMN_TYPES.items():
            assert type(table[name]).__name__ == type_name, name
        assert table.get_flags(table.flags.integrated_sum).all_eq(True)
        assert (table["intensity.sum.variance"] > 0).all_eq(True)
        crystal = experiments[0].crystal
        assert crystal.get_space_group().type().lookup_symbol() == "C 1 2/m 1"
        all_identifiers += identifiers
    assert len(set(all_identifiers)) == 2 * N_LATTICES


def test_reflections_follow_the_recorded_model(dataset):
    """d, s1 and the predictor's cut agree with the crystal and beam dxtbx reads back."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    settings = lat.SyntheticSettings()
    _, prefixes = dataset
    experiments = ExperimentListFactory.from_json_file(prefixes[0] + "_integrated.expt", check_format=False)
    table = flex.reflection_table.from_file(prefixes[0] + "_integrated.refl")
    with np.load(prefixes[0] + synio.TRUTH_SUFFIX) as truth_file:
        rs = truth_file["rs"]
    ids = table["id"].as_numpy_array()
    hkl = np.asarray(table["miller_index"].as_vec3_double()).reshape(-1, 3)
    s1 = np.asarray(table["s1"]).reshape(-1, 3)
    for index, experiment in enumerate(experiments):
        rows = ids == index
        reciprocal = np.asarray(experiment.crystal.get_A()).reshape(3, 3)
        x = hkl[rows] @ reciprocal.T
        wavelength = experiment.beam.get_wavelength()
        assert np.allclose(1 / np.linalg.norm(x, axis=1), table["d"].as_numpy_array()[rows])
        assert np.all(table["d"].as_numpy_array()[rows] >= settings.d_min)
        excitation = lat.excitation_errors(x, wavelength)
        assert np.all(np.abs(excitation) <= settings.excitation_cutoff * rs[index] * (1 + 1e-9))
        s0 = np.asarray(experiment.beam.get_s0())
        assert np.allclose(np.linalg.norm(s1[rows], axis=1), 1 / wavelength)
        assert np.allclose(s1[rows], x + s0, atol=2 * settings.excitation_cutoff * rs.max())


def test_about_100_reflections_per_lattice_with_partialities_in_range(dataset):
    _, prefixes = dataset
    settings = lat.SyntheticSettings()
    counts, partialities = [], []
    for prefix in prefixes:
        with np.load(prefix + synio.TRUTH_SUFFIX) as truth_file:
            counts.append(np.bincount(truth_file["reflection_lattice"], minlength=N_LATTICES))
            partialities.append(truth_file["reflection_partiality"])
    counts, partiality = np.concatenate(counts), np.concatenate(partialities)
    assert 80 <= counts.mean() <= 120
    assert counts.min() > 20
    assert np.all((partiality > 0) & (partiality <= 1))
    # Selection by the recorded model cuts near p = 1 / (1 + 2 cutoff^2); the mean of a uniform |Rh|
    # over the band is atan(2 sqrt 2) / (2 sqrt 2) = 0.435 for cutoff 2.
    assert partiality.mean() == pytest.approx(0.435, abs=0.05)
    assert np.mean(partiality < 1 / (1 + 2 * settings.excitation_cutoff ** 2)) < 0.1


def test_same_seed_same_shard_in_any_order_and_other_seeds_differ(source):
    settings = lat.SyntheticSettings()
    first = lat.simulate_shard(3, N_LATTICES, source, settings, SEED)
    lat.simulate_shard(0, N_LATTICES, source, settings, SEED)  # another shard in between changes nothing
    again = lat.simulate_shard(3, N_LATTICES, source, settings, SEED)
    assert list(first.columns) == list(again.columns)
    for name in first.columns:
        assert np.array_equal(first.columns[name], again.columns[name]), name
    assert np.array_equal(first.lattices.identifier, again.lattices.identifier)
    assert np.array_equal(first.lattices.true_matrix, again.lattices.true_matrix)
    other_shard = lat.simulate_shard(4, N_LATTICES, source, settings, SEED)
    other_seed = lat.simulate_shard(3, N_LATTICES, lat.prepare_source(source.truth, settings, SEED + 1), settings, SEED + 1)
    for other in (other_shard, other_seed):
        assert not set(other.lattices.identifier) & set(first.lattices.identifier)
        assert not np.allclose(other.lattices.true_matrix, first.lattices.true_matrix)


def test_dataset_written_in_parallel_equals_the_serial_one(tmp_path, truth, dataset):
    directory, prefixes = dataset
    parallel = lds.generate_dataset(tmp_path, 2 * N_LATTICES, N_LATTICES, truth, lat.SyntheticSettings(), SEED,
                                    processes=2)
    for serial_prefix, parallel_prefix in zip(prefixes, parallel):
        for suffix in ("_integrated.expt", "_integrated.refl"):
            with open(serial_prefix + suffix, "rb") as serial, open(parallel_prefix + suffix, "rb") as other:
                assert serial.read() == other.read()


def test_outlier_lattices_as_configured(source):
    settings = replace(lat.SyntheticSettings(), off_cluster_fraction=0.2, unrelated_fraction=0.1)
    shard = lat.simulate_shard(0, 40, source, settings, SEED)
    kind = shard.lattices.kind
    assert np.sum(kind == lat.KIND_OFF_CLUSTER) == 8 and np.sum(kind == lat.KIND_UNRELATED) == 4
    cells = shard.lattices.unit_cell
    off = kind == lat.KIND_OFF_CLUSTER
    assert np.allclose(cells[off, :3].mean(axis=0), settings.off_cluster_cell[:3], rtol=0.002)
    assert np.allclose(cells[~off, :3].mean(axis=0), settings.unit_cell[:3], rtol=0.002)
    # Expected photons / smooth factors (scale, B, polarization, partiality) = the intensity sampled.
    lattice = shard.predictions.lattice
    s1_unit = shard.predictions.s1 / np.linalg.norm(shard.predictions.s1, axis=1)[:, None]
    smooth = (source.photons_per_intensity * shard.lattices.scale[lattice] * shard.partiality
              * np.exp(-0.5 * shard.lattices.b_factor[lattice] * shard.predictions.d_star_sq_true)
              * lat.polarization_factors(s1_unit, settings.polarization_normal))
    sampled = shard.expected_photons / smooth
    truth_intensity = source.truth.intensity[shard.truth_column]
    normal, unrelated = kind[lattice] == lat.KIND_NORMAL, kind[lattice] == lat.KIND_UNRELATED
    assert np.allclose(sampled[normal], truth_intensity[normal])
    assert np.allclose(sampled[off[lattice]], truth_intensity[off[lattice]]
                       * source.nonisomorphous[shard.truth_column[off[lattice]]])
    assert np.mean(np.isclose(sampled[unrelated], truth_intensity[unrelated])) < 0.05
    # Unrelated intensities come from similar resolution: their mean is close to the truth's there.
    assert np.log(sampled[unrelated].mean() / truth_intensity[unrelated].mean()) == pytest.approx(0, abs=0.3)


def test_reusing_a_directory_with_other_parameters_is_refused(tmp_path, truth):
    lds.generate_dataset(tmp_path, 2, 2, truth, lat.SyntheticSettings(), SEED)
    record = json.loads((tmp_path / lds.GENERATION_FILE).read_text())
    assert record["n_lattices"] == 2 and record["seed"] == SEED
    with pytest.raises(synio.SyntheticDataError, match=r"generation\.json: directory holds a dataset generated with other"):
        lds.generate_dataset(tmp_path, 2, 2, truth, lat.SyntheticSettings(), SEED + 1)


def test_truth_intensities_round_trip(tmp_path, truth):
    path = tmp_path / "truth.npz"
    synio.save_truth_intensities(truth, path)
    again = synio.load_truth_intensities(path)
    assert again.unit_cell == truth.unit_cell and again.space_group == truth.space_group
    assert np.array_equal(again.miller_index, truth.miller_index)
    assert np.array_equal(again.intensity, truth.intensity)
    with pytest.raises(synio.SyntheticDataError, match="missing.npz: cannot read truth intensities"):
        synio.load_truth_intensities(tmp_path / "missing.npz")


def test_lattice_truth_round_trip(dataset):
    _, prefixes = dataset
    arrays = synio.load_lattice_truth(prefixes[0])
    assert arrays["identifier"].shape == (N_LATTICES,) and arrays["true_matrix"].shape == (N_LATTICES, 3, 3)
    with pytest.raises(synio.SyntheticDataError, match="missing_truth.npz: cannot read lattice truth"):
        synio.load_lattice_truth(str(prefixes[0]) + "missing")
