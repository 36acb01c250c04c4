"""The file formats that moved into io/: the one TSV writer, the merge's lattice table, experiment-list JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xfel_spread.io.expt import (ExperimentListError, experiment_identifiers, load_experiment_json,
                                 read_experiment_document, subset_document)
from xfel_spread.io.lattices import LATTICE_COLUMNS, LatticeTableError, read_accepted_identifiers, write_lattice_table
from xfel_spread.io.tables import NAN_TEXT, format_cell, parse_float, write_table


def test_cells_and_the_one_nan_spelling():
    assert NAN_TEXT == ""
    assert [format_cell(value) for value in (None, math.nan, np.float32("nan"), 0.123456789, np.float64(2.5), 7, "x")] \
        == ["", "", "", "0.123457", "2.5", "7", "x"]
    assert format_cell(1.23456, ".3f") == "1.235"
    assert math.isnan(parse_float("")) and math.isnan(parse_float("nan")) and parse_float("2.5") == 2.5
    with pytest.raises(ValueError):
        parse_float("x")


def test_write_table_bytes(tmp_path):
    path = tmp_path / "t.tsv"
    write_table(path, ("a", "b", "c"), [[1, format_cell(math.nan), "two words"], ["tab\there", 'q"uote', None]])
    assert path.read_bytes() == b'a\tb\tc\n1\t\ttwo words\n"tab\there"\t"q""uote"\t\n'
    assert sorted(item.name for item in tmp_path.iterdir()) == ["t.tsv"]  # no temporary file left


def test_lattice_table_round_trip(tmp_path):
    path = tmp_path / "lattices.tsv"
    n = 3
    rows = {column: [0.0] * n for column in LATTICE_COLUMNS}
    rows.update(global_id=[0, 1, 2], shard_prefix=["s"] * n, identifier=["A", "B", "C"], accepted=[1, 0, 1],
                reason=["", "cell_outlier", ""], G=np.array([1.5, math.nan, 0.25]))
    write_lattice_table(rows, path)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(LATTICE_COLUMNS)
    assert lines[2].split("\t")[:6] == ["1", "s", "B", "0", "cell_outlier", ""]
    assert read_accepted_identifiers(path) == ["A", "C"]
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LatticeTableError, match=f"^{path}: lattice table is not text$"):
        read_accepted_identifiers(path)


def test_experiment_documents(tmp_path):
    document = {"__id__": "ExperimentList",
                "experiment": [{"identifier": "a", "beam": 0, "crystal": 0, "imageset": 0},
                               {"identifier": "b", "beam": 0, "crystal": 1, "imageset": 0}],
                "beam": [{"wavelength": 1.7}], "crystal": [{"n": 0}, {"n": 1}],
                "imageset": [{"images": ["shard.h5"], "mask": None}]}
    path = tmp_path / "x.expt"
    path.write_text(json.dumps(document))
    assert load_experiment_json(path) == document
    read = read_experiment_document(path)
    assert read["imageset"][0]["images"] == [str(tmp_path.resolve() / "shard.h5")]
    assert experiment_identifiers(read) == ["a", "b"]
    subset = subset_document(read, [1])
    assert subset["experiment"] == [{"identifier": "b", "beam": 0, "crystal": 0, "imageset": 0}]
    assert subset["crystal"] == [{"n": 1}] and subset["beam"] == [{"wavelength": 1.7}]

    path.write_text("{not json")
    with pytest.raises(ValueError):
        load_experiment_json(path)
    with pytest.raises(ExperimentListError, match=f"^{path}: cannot read experiments \\("):
        read_experiment_document(path)
    path.write_text("[]")
    with pytest.raises(ExperimentListError, match=f"^{path}: not a DIALS experiment list$"):
        read_experiment_document(path)
    with pytest.raises(OSError):
        load_experiment_json(tmp_path / "missing.expt")
