"""Tests of the annulus stage (spread-annulus): accepted lattices' reflections in a resolution shell,
selected, written and counted. The shards come from merged_fixtures.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from xfel_spread.annulus import pipeline as annulus_pipeline
from xfel_spread.annulus import select as annulus
from xfel_spread.io import lattices

from merged_fixtures import (
    make_experiments,
    make_reflections,
    write_shard,
    write_lattice_table,
)


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
