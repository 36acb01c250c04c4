"""The pipeline on images it did not write (input.source: images), run by Snakemake from configs made here:

- the eight nanoBragg stills (../shared/data/external/nanobragg, spectra from its spectra.tsv) through
  index, metrology, reindex, cells, merge, annulus and stage 1, scored against its truth.json as the
  simulated data are scored (misorientation against the true real-space matrix, over the C2 point group);
- the three real CSPAD thermolysin stills (monochromatic, no spectra) through the index stage with
  config/examples/thermolysin_cspad.phil, which the pipeline checks and hands to stills_process as it does
  config/index.phil: every still indexes in P 61 2 2 with the known cell.
"""

import json

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, SHARED_DATA_DIR
from pipeline_run import snakemake, succeeded

from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations
from xfel_spread.dials.stills import INTEGRATED, read_shots_table

#: Slow tier: Snakemake runs dials.stills_process (and, for nanoBragg, metrology, merging and stage 1).
pytestmark = pytest.mark.slow

NANOBRAGG = SHARED_DATA_DIR / "external" / "nanobragg"
CSPAD = SHARED_DATA_DIR / "real" / "thermolysin_cspad"


def nanobragg_config(workdir) -> dict:
    """Eight nanoBragg stills in two shards of four, spectra from the table, the LY99 model and index phil."""
    return {
        "input": {"source": "images", "images": [str(NANOBRAGG / "image_*.img.gz")], "shots_per_shard": 4,
                  "spectra": "table", "spectra_table": str(NANOBRAGG / "spectra.tsv")},
        "hitfind": {"enabled": False},
        "reference": {"mirror_dir": str(SHARED_DATA_DIR), "dir": str(workdir / "reference")},
        # Eight lattices: a cell cluster of 3, and indices observed once still merge.
        "cells": {"min_samples": 3},
        "merge": {"minimum_multiplicity": 1},
    }


def shots_of(workdir, stage, n_shards):
    return [row for index in range(n_shards)
            for row in read_shots_table(workdir / f"results/{stage}/images/shard_{index:05d}_shots.tsv")]


def crystals(path):
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(path), check_format=False)
    return {experiment.identifier: experiment for experiment in experiments}


def matrix(crystal) -> np.ndarray:
    return np.array([list(vector) for vector in crystal.get_real_space_vectors()])


def test_nanobragg_stills_run_to_stage1_and_score_against_their_truth(tmp_path):
    configfile = tmp_path / "nanobragg.yaml"
    configfile.write_text(yaml.safe_dump(nanobragg_config(tmp_path)))
    targets = [f"results/stage1/images/shard_{index:05d}_shots.tsv" for index in range(2)]
    succeeded(snakemake(tmp_path, configfile, *targets))

    truth = json.loads((NANOBRAGG / "truth.json").read_text())["images"]
    listed = (tmp_path / "results/images/list.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[1] for line in listed] == [str(NANOBRAGG / image["file"]) for image in truth]
    for stage in ("index", "reindex"):
        assert [row["status"] for row in shots_of(tmp_path, stage, 2)] == [INTEGRATED] * 8, stage

    # Metrology moves the detector to where nanoBragg drew the pattern (dxtbx's header origin is half a
    # pixel off in both directions).
    summary = json.loads((tmp_path / "results/metrology/images/summary.json").read_text())
    print(json.dumps(summary)[:2000])

    rotations = point_group_rotations("C 1 2 1")
    dials_angles, refined_angles = [], []
    for index in range(2):
        dials = crystals(tmp_path / f"results/reindex/images/shard_{index:05d}_integrated.expt")
        refined = crystals(tmp_path / f"results/stage1/images/shard_{index:05d}_refined.expt")
        for identifier, experiment in refined.items():
            image = index * 4 + experiment.imageset.indices()[0]
            true_matrix = np.array(truth[image]["real_space_a_b_c_dials_frame"])
            dials_angles.append(misorientation_deg(matrix(dials[identifier].crystal), true_matrix, rotations))
            refined_angles.append(misorientation_deg(matrix(experiment.crystal), true_matrix, rotations))
    dials_angles, refined_angles = np.array(dials_angles), np.array(refined_angles)
    print("misorientation (deg) DIALS:", np.round(dials_angles, 4), "stage 1:", np.round(refined_angles, 4))
    assert len(dials_angles) >= 6  # lattices that reached stage 1 (the merge may reject some)
    assert np.all(dials_angles < 0.5)
    assert (refined_angles < dials_angles).sum() > len(dials_angles) / 2


def test_cspad_thermolysin_stills_index_in_p6122_through_the_index_stage(tmp_path):
    phil = tmp_path / "thermolysin.phil"
    phil.write_text((REPO_ROOT / "config/examples/thermolysin_cspad.phil").read_text())
    config = {"input": {"source": "images", "images": [str(CSPAD / "*.cbf")], "spectra": "monochromatic"},
              "hitfind": {"enabled": False}, "index": {"phil": str(phil)}}
    configfile = tmp_path / "thermolysin.yaml"
    configfile.write_text(yaml.safe_dump(config))
    succeeded(snakemake(tmp_path, configfile, "results/index/images/shard_00000_shots.tsv"))

    assert [row["status"] for row in shots_of(tmp_path, "index", 1)] == [INTEGRATED] * 3
    from cctbx import sgtbx

    patterson = sgtbx.space_group_info("P 61 2 2").group().build_derived_patterson_group()
    experiments = crystals(tmp_path / "results/index/images/shard_00000_integrated.expt").values()
    assert len(experiments) == 3
    for experiment in experiments:
        # stills_process gives crystals the Patterson group of the known symmetry.
        assert experiment.crystal.get_space_group() == patterson
        cell = np.array(experiment.crystal.get_unit_cell().parameters())
        assert cell == pytest.approx([93.4, 93.4, 131.2, 90, 90, 120], rel=0.01)
