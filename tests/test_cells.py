"""Stage 5: tdata listing, DBSCAN clustering, the covariance pickle and its use by cctbx.xfel.merge."""

from __future__ import annotations

import importlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from xfel_spread.cells.covariance import (CellCovariance, CellPopulations, ClusteringError, CovarianceFileError,
                                          _components_by_boxes, _components_by_point_pairs, _grid_boxes,
                                          check_space_groups, cluster_cells, dbscan_labels, order_labels_by_size,
                                          read_covariance, write_covariance_pickle)
from xfel_spread.cells.tdata import (TdataError, cell_parameters, experiment_cells, read_tdata, tdata_lines,
                                     write_tdata)
from xfel_spread.cli.cells import covariance_main, tdata_main

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_EXPERIMENTS = sorted((REPO_ROOT / "validation/results/reindex/nopsf").glob("shard_*_integrated.expt"))
LY99_CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
C2_HALL = "-C 2y"


# -- helpers ---------------------------------------------------------------------------------------

def rotation(axis, angle_deg: float) -> np.ndarray:
    """Rotation matrix about ``axis`` by ``angle_deg`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(angle_deg)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def make_crystal(cell, rotation_matrix=np.eye(3), hall: str = C2_HALL):
    """A dxtbx Crystal with the given cell, rotated."""
    from cctbx import sgtbx, uctbx
    from dxtbx.model import Crystal

    orthogonalization = np.array(uctbx.unit_cell(tuple(cell)).orthogonalization_matrix()).reshape(3, 3)
    real_space = rotation_matrix @ orthogonalization  # columns: a, b, c
    return Crystal(*(tuple(real_space[:, i]) for i in range(3)), space_group=sgtbx.space_group(hall))


def write_experiments(path: Path, crystals) -> Path:
    """An ExperimentList file holding one experiment per crystal."""
    from dxtbx.model import Experiment, ExperimentList

    experiments = ExperimentList()
    for crystal in crystals:
        experiments.append(Experiment(crystal=crystal))
    experiments.as_file(str(path))
    return path


def dxtbx_tdata_lines(paths) -> list[str]:
    """The tdata lines as cctbx.xfel.merge's tdata worker writes them (through dxtbx)."""
    from dxtbx.model.experiment_list import ExperimentList

    lines = []
    for path in paths:
        for experiment in ExperimentList.from_file(str(path), check_format=False):
            cell = experiment.crystal.get_unit_cell().parameters()
            symbol = "".join(experiment.crystal.get_space_group().type().lookup_symbol().split())
            lines.append("%f %f %f %f %f %f %s" % (*cell, symbol))
    return lines


def synthetic_cells(seed: int = 1):
    """Two clusters of C2 cells (120 then 300, the larger second) and 15 isolated cells, with truth."""
    rng = np.random.default_rng(seed)
    small_mean, large_mean = np.array([68.5, 59.8, 47.2]), np.array([67.2, 59.8, 47.2])
    small_cov = np.diag([0.03, 0.04, 0.02]) ** 2
    large_sd = np.array([0.045, 0.033, 0.030])
    large_cov = np.outer(large_sd, large_sd) * np.array([[1, -0.3, 0.5], [-0.3, 1, 0], [0.5, 0, 1]])
    small = rng.multivariate_normal(small_mean, small_cov, size=120)
    large = rng.multivariate_normal(large_mean, large_cov, size=300)
    # Isolated cells on a 0.5 A lattice of positions far from both clusters: no two within eps 0.2.
    noise = np.array([[62.0 + 0.5 * i, 55.0 + 0.3 * (i % 3), 44.0 + 0.7 * (i % 5)] for i in range(15)])
    abc = np.concatenate([small, large, noise])
    cells = np.column_stack([abc[:, 0], abc[:, 1], abc[:, 2], np.full(len(abc), 90.0),
                             np.full(len(abc), 110.3), np.full(len(abc), 90.0)])
    truth = {"labels": np.array([1] * 120 + [0] * 300 + [-1] * 15),
             "means": [large_mean, small_mean], "covariances": [large_cov, small_cov]}
    return cells, truth


def write_settings(path: Path, **cells_settings) -> Path:
    path.write_text(yaml.safe_dump({"cells": cells_settings}))
    return path


def write_tdata_file(path: Path, cells, symbol: str = "C12/m1") -> Path:
    path.write_text("".join("%f %f %f %f %f %f %s\n" % (*cell, symbol) for cell in cells))
    return path


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    """(cells, truth, populations, pickle path) of the synthetic clustering."""
    cells, truth = synthetic_cells()
    populations = cluster_cells(cells, ["a", "b", "c"], 0.2, 5, "synthetic")
    path = tmp_path_factory.mktemp("model") / "synthetic_covariance.pickle"
    write_covariance_pickle(path, populations, ["a", "b", "c"], "synthetic",
                            {"space_group": "C12/m1", "eps": 0.2, "min_samples": 5, "tdata": "synthetic.tdata"})
    return cells, truth, populations, path


@pytest.fixture
def upstream_experiment_filter():
    """cctbx.xfel.merge's experiment_filter class, imported from the installed source file.

    Debian's cctbx lacks the compiled ``sx_merging_ext`` that ``xfel/merging/__init__.py`` loads, so
    the package is stood in for by an empty module with the real directory as its path; the module
    under test and everything it imports are the installed ones. Removed again afterwards.
    """
    xfel = pytest.importorskip("xfel")
    merging_dir = Path(list(xfel.__path__)[0]) / "merging"
    if not (merging_dir / "application/filter/experiment_filter.py").exists():
        pytest.skip("cctbx.xfel.merge's experiment_filter.py is not installed")
    before = set(sys.modules)
    stand_in = types.ModuleType("xfel.merging")
    stand_in.__path__ = [str(merging_dir)]
    saved = sys.modules.get("xfel.merging")
    sys.modules["xfel.merging"] = stand_in
    try:
        yield importlib.import_module("xfel.merging.application.filter.experiment_filter").experiment_filter
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("xfel.merging"):
                del sys.modules[name]
        if saved is not None:
            sys.modules["xfel.merging"] = saved
        else:
            sys.modules.pop("xfel.merging", None)


def upstream_filter_self(pickle_path: Path, component: int = 0, cutoff: float = 4.0):
    """The ``self`` upstream's check_cluster reads, set up as its ``run`` does from the pickle."""
    with open(pickle_path, "rb") as stream:
        data = pickle.load(stream)
    data["idxs"] = [["a", "b", "c", "alpha", "beta", "gamma"].index(name) for name in data["features"]]
    covariance = types.SimpleNamespace(component=component, mahalanobis=cutoff)
    params = types.SimpleNamespace(filter=types.SimpleNamespace(
        unit_cell=types.SimpleNamespace(cluster=types.SimpleNamespace(covariance=covariance))))
    return types.SimpleNamespace(cluster_data=data, params=params), data


def experiment_with_cell(cell):
    from dxtbx.model import Experiment

    return Experiment(crystal=make_crystal(cell, rotation([1, 2, 3], 37.0)))


# -- tdata -----------------------------------------------------------------------------------------

def test_cell_parameters_are_dxtbx_bit_for_bit(tmp_path):
    """The cells computed from the .expt JSON are exactly those dxtbx's models report from the same file."""
    from dxtbx.model.experiment_list import ExperimentList

    rng = np.random.default_rng(0)
    path = write_experiments(tmp_path / "cells.expt", [
        make_crystal(np.array(LY99_CELL) + np.r_[rng.normal(0, 0.05, 3), 0, rng.normal(0, 0.05), 0],
                     rotation(rng.normal(size=3), rng.uniform(0, 360))) for _ in range(40)])
    ours = [cell for cell, _ in experiment_cells(path)]
    theirs = [e.crystal.get_unit_cell().parameters() for e in ExperimentList.from_file(str(path), check_format=False)]
    assert ours == theirs
    assert cell_parameters((2, 0, 0), (0, 3, 0), (0, 0, 4)) == (2.0, 3.0, 4.0, 90.0, 90.0, 90.0)


def test_tdata_lines_match_the_merge_worker_on_built_experiments(tmp_path):
    rng = np.random.default_rng(3)
    first = write_experiments(tmp_path / "s0.expt", [
        make_crystal(LY99_CELL, rotation(rng.normal(size=3), rng.uniform(0, 360))) for _ in range(3)])
    empty = write_experiments(tmp_path / "s1.expt", [])
    last = write_experiments(tmp_path / "s2.expt", [
        make_crystal((67.3, 59.7, 47.25, 90, 110.2, 90), rotation([0, 1, 0], 12.0)),
        make_crystal((40.0, 50.0, 60.0, 80.0, 85.0, 95.0), hall="P 1")])
    lines = tdata_lines([first, empty, last])
    assert lines == dxtbx_tdata_lines([first, empty, last])
    assert len(lines) == 5
    assert lines[0] == "67.200000 59.800000 47.200000 90.000000 110.300000 90.000000 C12/m1"
    assert lines[4] == "40.000000 50.000000 60.000000 80.000000 85.000000 95.000000 P1"
    assert experiment_cells(empty) == []


@pytest.mark.skipif(not REAL_EXPERIMENTS, reason="validation data absent: run the validation config's reindex "
                    "stage to get validation/results/reindex/nopsf/shard_*_integrated.expt")
def test_tdata_of_real_stills_process_output(tmp_path):
    output = tmp_path / "nopsf.tdata"
    n = write_tdata(REAL_EXPERIMENTS, output)
    text = output.read_text()
    assert text.splitlines() == dxtbx_tdata_lines(REAL_EXPERIMENTS)
    assert n == len(text.splitlines()) > 0 and text.endswith("\n")
    cells, symbols = read_tdata(output)
    assert cells.shape == (n, 6) and set(symbols) == {"C12/m1"}
    for line, cell in zip(text.splitlines(), cells):
        fields = line.split(" ")
        assert len(fields) == 7 and all(len(value.split(".")[1]) == 6 for value in fields[:6])
        assert " ".join("%f" % value for value in cell) == " ".join(fields[:6])
    assert np.all(np.abs(cells[:, :3] - LY99_CELL[:3]) < 0.5)


def test_no_lattice_at_all_is_an_error(tmp_path):
    empty = write_experiments(tmp_path / "shard_00000_integrated.expt", [])
    with pytest.raises(TdataError, match=r"1 experiment files \(.*shard_00000_integrated.expt ...\) hold no lattice"):
        write_tdata([empty], tmp_path / "out.tdata")
    assert not (tmp_path / "out.tdata").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not a DIALS experiment list \(invalid JSON"),
    ('{"beam": []}', r"not a DIALS experiment list \(no 'experiment' list\)"),
    ('{"experiment": [{"beam": 0}], "crystal": []}', r"experiment 0 has no crystal model"),
    ('{"experiment": [{"crystal": 0}], "crystal": [{"real_space_a": [1, 0, 0]}]}',
     r"crystal 0 of experiment 0 is malformed \(KeyError"),
    ('{"experiment": [{"crystal": 0}], "crystal": [{"real_space_a": [1, 0, 0], "real_space_b": [0, 1, 0], '
     '"real_space_c": [0, 0, 1], "space_group_hall_symbol": "Q 9"}]}', r"is malformed \(RuntimeError"),
])
def test_bad_experiment_files(tmp_path, content, message):
    path = tmp_path / "bad.expt"
    path.write_text(content)
    with pytest.raises(TdataError, match=message) as raised:
        experiment_cells(path)
    assert str(raised.value).startswith(str(path)) and "\n" not in str(raised.value)


@pytest.mark.parametrize("text, message", [
    ("67 59 47 90 110 90\n", r":1: expected 6 cell parameters and a space group symbol, got 6 fields"),
    ("67 59 47 90 110 90 C12/m1\n67 59 x 90 110 90 C12/m1\n", r":2: a cell parameter is not a number"),
    ("67 59 47 90 110 90 C12/m1\n\n67 59 nan 90 110 90 C12/m1\n", r":3: cell parameters must be finite and positive"),
    ("\n", r": no unit cells"),
])
def test_read_tdata_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.tdata"
    path.write_text(text)
    with pytest.raises(TdataError, match=message) as raised:
        read_tdata(path)
    assert str(raised.value).startswith(str(path))


# -- clustering ------------------------------------------------------------------------------------

def test_clusters_of_synthetic_cells_are_recovered_and_ordered_by_size(synthetic_model):
    cells, truth, populations, _ = synthetic_model
    np.testing.assert_array_equal(populations.labels, truth["labels"])
    assert populations.populations == [300, 120] and populations.n_noise_ == 15
    assert populations.main_components == [0, 1]
    for component, model in enumerate(populations.fit_components):
        members = cells[truth["labels"] == component][:, :3]
        # Exactly the members' mean and maximum-likelihood covariance ...
        np.testing.assert_allclose(model.location_, members.mean(axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(model.covariance_, np.cov(members.T, bias=True), rtol=1e-10, atol=1e-16)
        # ... which recover the generating distribution within sampling error.
        sd = np.sqrt(np.diag(truth["covariances"][component]))
        assert np.all(np.abs(model.location_ - truth["means"][component]) < 4 * sd / np.sqrt(len(members)))
        np.testing.assert_allclose(np.sqrt(np.diag(model.covariance_)), sd, rtol=0.2)


def test_cell_covariance_behaves_like_sklearn_empirical_covariance(synthetic_model):
    covariance_module = pytest.importorskip("sklearn.covariance")
    cells, truth, populations, _ = synthetic_model
    members = cells[truth["labels"] == 0][:, :3]
    reference = covariance_module.EmpiricalCovariance().fit(members)
    ours = populations.fit_components[0]
    np.testing.assert_allclose(ours.covariance_, reference.covariance_, rtol=1e-10)
    np.testing.assert_allclose(ours.precision_, reference.precision_, rtol=1e-8)
    np.testing.assert_allclose(ours.mahalanobis(cells[:, :3]), reference.mahalanobis(cells[:, :3]), rtol=1e-8)


def _canonical(labels) -> list[int]:
    """Labels renamed in order of first appearance (noise stays -1), to compare partitions."""
    names: dict[int, int] = {}
    return [-1 if label < 0 else names.setdefault(label, len(names)) for label in labels]


@pytest.mark.parametrize("seed", range(8))
def test_dbscan_matches_sklearn(seed):
    cluster_module = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(seed)
    d = 1 + seed % 4
    centres = rng.uniform(0, 4, size=(3, d))
    points = np.concatenate([rng.normal(centre, 0.06, size=(int(rng.integers(20, 150)), d)) for centre in centres]
                            + [rng.uniform(-2, 6, size=(30, d))])
    eps, min_samples = 0.15 + 0.05 * (seed % 3), 3 + seed % 5
    ours = dbscan_labels(points, eps, min_samples)
    reference = order_labels_by_size(cluster_module.DBSCAN(eps=eps, min_samples=min_samples).fit(points).labels_)
    assert _canonical(ours) == _canonical(reference)


@pytest.mark.parametrize("d", [2, 4])
def test_both_ways_of_joining_core_points_agree(d):
    rng = np.random.default_rng(d)
    points = np.concatenate([rng.normal(0, 0.05, size=(200, d)), rng.normal(0.5, 0.2, size=(200, d)),
                             rng.uniform(-1, 2, size=(50, d))])
    box_of_point, box_coordinates, _ = _grid_boxes(points, 0.2)
    by_pairs = _components_by_point_pairs(points, 0.2)
    by_boxes = _components_by_boxes(points, box_of_point, box_coordinates, 0.2)
    assert _canonical(by_pairs) == _canonical(by_boxes)
    assert len(set(by_pairs)) > 1


def test_order_labels_by_size():
    np.testing.assert_array_equal(order_labels_by_size(np.array([5, 5, -1, 2, 2, 2, 7])), [1, 1, -1, 0, 0, 0, 2])
    np.testing.assert_array_equal(order_labels_by_size(np.array([-1, -1])), [-1, -1])


def test_all_noise_is_a_clear_error():
    cells = np.array([[60.0 + i, 59.8, 47.2, 90.0, 110.3, 90.0] for i in range(12)])
    with pytest.raises(ClusteringError, match=r"^cells.tdata: no cluster found: all 12 cells are noise with eps 0.2 "
                       r"and min_samples 5 \(L2 distance on a, b, c\); raise cells.eps"):
        cluster_cells(cells, ["a", "b", "c"], 0.2, 5, "cells.tdata")


def test_a_feature_that_does_not_vary_is_refused(synthetic_model):
    cells = synthetic_model[0]
    with pytest.raises(ClusteringError, match=r"main cluster's covariance is singular \(alpha does not vary\)"):
        cluster_cells(cells, ["a", "b", "alpha"], 0.2, 5, "cells.tdata")


def test_space_groups_must_share_the_patterson_group():
    check_space_groups(["C12/m1", "C121"], "C12/m1", "x.tdata")  # C2 and C2/m: same Patterson group
    with pytest.raises(ValueError, match=r"^x.tdata:3: space group P1 .* does not match cells.space_group C12/m1 "
                       r".*; 1 of 3 cells differ"):
        check_space_groups(["C12/m1", "C12/m1", "P1"], "C12/m1", "x.tdata")
    with pytest.raises(ValueError, match=r"cells.space_group: 'Q9' is not a space group symbol"):
        check_space_groups(["C12/m1"], "Q9", "x.tdata")


# -- the pickle and cctbx.xfel.merge ---------------------------------------------------------------

def test_upstream_check_cluster_accepts_our_pickle(synthetic_model, upstream_experiment_filter):
    cells, _, populations, path = synthetic_model
    self_ns, data = upstream_filter_self(path)
    main = read_covariance(path, 0)
    sd = np.sqrt(np.diag(main.covariance))
    inside = (*main.mean, 90.0, 110.3, 90.0)
    outside = (main.mean[0] + 10 * sd[0], *main.mean[1:], 90.0, 110.3, 90.0)
    edge = (main.mean[0] + 2 * sd[0], *main.mean[1:], 90.0, 110.3, 90.0)
    verdicts = [upstream_experiment_filter.check_cluster(self_ns, experiment_with_cell(cell))
                for cell in (inside, outside, edge)]
    assert verdicts == [True, False, True]
    # Upstream's verdicts are ours, for every synthetic cell.
    ours = main.mahalanobis(cells) < 4.0
    theirs = [upstream_experiment_filter.check_cluster(self_ns, experiment_with_cell(cell)) for cell in cells[::7]]
    assert theirs == list(ours[::7])
    # The second component too.
    self_ns.params.filter.unit_cell.cluster.covariance.component = 1
    assert upstream_experiment_filter.check_cluster(self_ns, experiment_with_cell(
        (*read_covariance(path, 1).mean, 90.0, 110.3, 90.0)))


def test_upstream_legend_and_log_line(synthetic_model):
    _, _, _, path = synthetic_model
    with open(path, "rb") as stream:
        data = pickle.load(stream)
    legend_input = types.SimpleNamespace(features_=data["features"], sample_name=data["sample"],
                                         output_info=data["info"])
    population = data["populations"]
    legend = population.basic_covariance_compact_report(feature_vectors=legend_input).getvalue()
    assert legend.startswith("Unit-cell covariance model of synthetic: 435 cells, features a, b, c, 2 clusters, "
                             "15 noise\ncomponent 0: 300 cells (69.0%)\n")
    assert "component 1: 120 cells (27.6%)" in legend
    assert "%s noise %d order %s" % (population.populations, population.n_noise_, population.main_components) \
        == "[300, 120] noise 15 order [0, 1]"
    assert len(population.labels) == 435


@pytest.mark.skipif(not REAL_EXPERIMENTS, reason="validation data absent (validation/results/reindex/nopsf)")
def test_upstream_filter_on_real_lattices(tmp_path, upstream_experiment_filter):
    from dxtbx.model.experiment_list import ExperimentList

    write_tdata(REAL_EXPERIMENTS[:4], tmp_path / "real.tdata")
    settings = write_settings(tmp_path / "cells.yaml")
    assert covariance_main(["--config", str(settings), "--tdata", str(tmp_path / "real.tdata"), "--pickle",
                            str(tmp_path / "c.pickle"), "--summary", str(tmp_path / "s.txt"), "--plot",
                            str(tmp_path / "p.png")]) == 0
    self_ns, _ = upstream_filter_self(tmp_path / "c.pickle", cutoff=2.0)
    experiments = [e for path in REAL_EXPERIMENTS[:4] for e in ExperimentList.from_file(str(path), check_format=False)]
    cells, _ = read_tdata(tmp_path / "real.tdata")
    ours = read_covariance(tmp_path / "c.pickle").mahalanobis(cells) < 2.0
    theirs = [upstream_experiment_filter.check_cluster(self_ns, experiment) for experiment in experiments]
    assert theirs == list(ours) and 0 < sum(theirs) < len(theirs)


def test_read_covariance_and_mahalanobis(synthetic_model):
    cells, truth, populations, path = synthetic_model
    main = read_covariance(path)
    assert main.features == ("a", "b", "c") and main.n_members == 300
    np.testing.assert_array_equal(main.mean, populations.fit_components[0].location_)
    centred = cells[:, :3] - main.mean
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, np.linalg.inv(main.covariance), centred))
    np.testing.assert_allclose(main.mahalanobis(cells), expected, rtol=1e-10)
    np.testing.assert_allclose(main.mahalanobis(cells) ** 2, populations.fit_components[0].mahalanobis(cells[:, :3]),
                               rtol=1e-8)
    assert main.mahalanobis(np.array([[*main.mean, 1, 2, 3]]))[0] == pytest.approx(0.0, abs=1e-9)
    # Roughly chi-square with 3 degrees of freedom for the members: 4 sigma keeps nearly all of them.
    assert np.mean(main.mahalanobis(cells[truth["labels"] == 0]) < 4.0) > 0.99
    assert read_covariance(path, 1).n_members == 120
    with pytest.raises(ValueError, match=r"cells must be \(n, 6\)"):
        main.mahalanobis(cells[:, :3])


def _write_pickle(path: Path, document) -> Path:
    with open(path, "wb") as stream:
        pickle.dump(document, stream)
    return path


def _document(populations, features=("a", "b", "c")):
    return {"features": list(features), "sample": "s", "info": {}, "populations": populations}


def test_read_covariance_errors(tmp_path, synthetic_model):
    _, _, populations, path = synthetic_model
    cases = []
    (tmp_path / "text.pickle").write_text("not a pickle at all")
    cases.append((tmp_path / "text.pickle", 0, r"not a covariance pickle \(UnpicklingError"))
    cases.append((_write_pickle(tmp_path / "list.pickle", [1, 2]), 0,
                  r"not a covariance pickle \(no features, sample, info, populations\)"))
    cases.append((_write_pickle(tmp_path / "nopop.pickle", _document(object())), 0,
                  r"not a covariance pickle \(populations has no fit_components\)"))
    cases.append((path, 2, r"component 2 requested but the file has 2 clusters"))
    one = CellPopulations(np.zeros(4, dtype=int), [CellCovariance(np.zeros(3), np.eye(3))])
    cases.append((_write_pickle(tmp_path / "one.pickle", _document(one)), 1,
                  r"component 1 requested but the file has 1 cluster$"))
    empty = CellPopulations(np.array([-1, -1, 1, 1]), [CellCovariance(np.zeros(3), np.eye(3)),
                                                        CellCovariance(np.zeros(3), np.eye(3))])
    cases.append((_write_pickle(tmp_path / "empty.pickle", _document(empty)), 0,
                  r"component 0 is an empty cluster"))
    cases.append((_write_pickle(tmp_path / "shape.pickle", _document(populations, ("a", "b"))), 0,
                  r"component 0 has mean \(3,\) and covariance \(3, 3\), but 2 features \(a, b\)"))
    singular = CellPopulations(np.zeros(4, dtype=int), [CellCovariance(np.zeros(3), np.diag([1.0, 1.0, 0.0]))])
    cases.append((_write_pickle(tmp_path / "singular.pickle", _document(singular)), 0,
                  r"component 0's covariance matrix is singular"))
    cases.append((_write_pickle(tmp_path / "names.pickle", _document(populations, ("a", "b", "volume"))), 0,
                  r"bad feature list \(features must be names among a, b, c, alpha, beta, gamma"))
    for bad_path, component, message in cases:
        with pytest.raises(CovarianceFileError, match=message) as raised:
            read_covariance(bad_path, component)
        assert str(raised.value).startswith(f"{bad_path}: ") and "\n" not in str(raised.value)


# -- command line ----------------------------------------------------------------------------------

def test_command_line_end_to_end(tmp_path, capsys):
    cells, truth = synthetic_cells(seed=5)
    rng = np.random.default_rng(5)
    shards = [write_experiments(tmp_path / f"shard_{i:05d}_integrated.expt",
                                [make_crystal(cell, rotation(rng.normal(size=3), rng.uniform(0, 360)))
                                 for cell in part])
              for i, part in enumerate(np.array_split(cells, 3))]
    shards.insert(1, write_experiments(tmp_path / "shard_empty_integrated.expt", []))
    tdata = tmp_path / "psf.tdata"
    argv = [arg for shard in shards for arg in ("--experiments", str(shard))] + ["--output", str(tdata)]
    assert tdata_main(argv) == 0
    listed, symbols = read_tdata(tdata)
    np.testing.assert_allclose(listed, cells, atol=2e-6)
    assert set(symbols) == {"C12/m1"}

    settings = write_settings(tmp_path / "cells.yaml", eps=0.2, min_samples=5)
    outputs = {name: tmp_path / f"psf_{name}" for name in ("covariance.pickle", "clusters.txt", "clusters.png")}
    assert covariance_main(["--config", str(settings), "--tdata", str(tdata),
                            "--pickle", str(outputs["covariance.pickle"]),
                            "--summary", str(outputs["clusters.txt"]), "--plot", str(outputs["clusters.png"])]) == 0
    summary = outputs["clusters.txt"].read_text()
    assert summary.startswith(f"cells: 435 (space group C12/m1) from {tdata}\n"
                              "DBSCAN: eps 0.2, min_samples 5, L2 metric on a, b, c\n"
                              "clusters found: 2, sizes 300, 120\nnoise: 15 cells\n")
    assert outputs["clusters.png"].read_bytes().startswith(b"\x89PNG")
    main = read_covariance(outputs["covariance.pickle"])
    assert main.n_members == 300 and np.allclose(main.mean, truth["means"][0], atol=0.02)
    with open(outputs["covariance.pickle"], "rb") as stream:
        document = pickle.load(stream)
    assert document["sample"] == "psf" and document["features"] == ["a", "b", "c"]
    assert document["info"]["space_group"] == "C12/m1" and document["info"]["n_cells"] == 435


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert tdata_main(["--experiments", str(write_experiments(tmp_path / "e.expt", [])),
                       "--output", str(tmp_path / "x.tdata")]) == 1
    assert "spread-tdata: error: 1 experiment files" in capsys.readouterr().err

    tdata = write_tdata_file(tmp_path / "spread.tdata", [[60.0 + i, 59.8, 47.2, 90, 110.3, 90] for i in range(8)])
    argv = ["--config", str(write_settings(tmp_path / "cells.yaml")), "--tdata", str(tdata), "--pickle",
            str(tmp_path / "c.pickle"), "--summary", str(tmp_path / "s.txt"), "--plot", str(tmp_path / "p.png")]
    assert covariance_main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"spread-covariance: error: {tdata}: no cluster found: all 8 cells are noise with eps 0.2 and "
                     "min_samples 5 (L2 distance on a, b, c); raise cells.eps or lower cells.min_samples")
    assert not (tmp_path / "c.pickle").exists()

    argv[1] = str(write_settings(tmp_path / "bad.yaml", eps=-1))
    assert covariance_main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"spread-covariance: error: {argv[1]}: cells.eps")


@pytest.mark.parametrize("features", [["a"], ["a", "b"], ["a", "b", "c", "beta"]])
def test_plot_for_any_feature_count(tmp_path, features):
    from xfel_spread.cells.plots import plot_cell_clusters

    cells, _ = synthetic_cells()
    cells[:, 4] += np.random.default_rng(2).normal(0, 0.05, len(cells))  # beta must vary to be clustered
    populations = cluster_cells(cells, features, 0.2, 5, "synthetic")
    plot_cell_clusters(tmp_path / "p.png", cells, populations, features, "test")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_ellipse_points_lie_at_the_mahalanobis_distance():
    from xfel_spread.cells.plots import ellipse_points

    mean, covariance = np.array([1.0, 2.0]), np.array([[0.04, 0.01], [0.01, 0.02]])
    outline = ellipse_points(mean, covariance, 4.0, n=50)
    centred = outline - mean
    np.testing.assert_allclose(np.einsum("ij,jk,ik->i", centred, np.linalg.inv(covariance), centred), 16.0)
