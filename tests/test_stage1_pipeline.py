"""The stage-1 driver (xfel_spread.stage1.pipeline) in-process, on one rank (SerialComm, no mpirun), on the
tiny simulated case of test_stage1_rois: the run's outputs, and the fallback of spread-exa when a whole
batch fails (one shot at a time: the shot that broke the batch fails alone, the others refine)."""

from __future__ import annotations

import csv
import dataclasses
import logging

import numpy as np
import pytest

from stage1_cases import write_case
from xfel_spread.io.mosaic_domains import read_domain_vectors
from xfel_spread.mpi import AgreedError, SerialComm
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.pipeline import (Stage1Inputs, batch_results, prepared_lattices, refine_batch_or_singly,
                                         refine_in_batches, run_stage1)

SETTINGS = {"device": "cpu"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("stage1_pipeline_case"))


@pytest.fixture(scope="module")
def prepared(case):
    """The case's settings, batched forward model and prepared lattices (lattice, shot, n_pixels, no_f)."""
    from xfel_spread.stage1.batched import BatchedForwardModel
    from xfel_spread.stage1.io import load_amplitude_grid
    from xfel_spread.stage1.rois import open_annulus_shard

    settings = Stage1Settings.from_config(SETTINGS)
    annulus = open_annulus_shard(case.annulus_prefix, case.shard)
    grid = load_amplitude_grid("model", annulus.metadata.energy_ev, amplitudes_path=case.amplitudes)
    failures = []
    lattices = list(prepared_lattices(annulus, grid, range(annulus.n_lattices), settings.shoebox_size_px, failures))
    assert failures == [] and len(lattices) == 2
    # The gathered kernel (a GPU's way) on the CPU: its batch buffers are what a whole batch can fail on.
    return settings, BatchedForwardModel(grid, annulus.metadata.energy_ev, "cpu", gathered=True), lattices


def write_config(path, **settings):
    lines = ["stage1:", "  structure_factors: model"] + [f"  {key}: {value}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_stage1_in_process_writes_one_converged_row_per_lattice(case, tmp_path):
    config = write_config(tmp_path / "stage1.yaml", batch_shots=2, **SETTINGS)
    inputs = Stage1Inputs(str(config), str(case.annulus_prefix), str(case.shard), str(tmp_path / "s"),
                          amplitudes=str(case.amplitudes))
    results = run_stage1(inputs, "spread-exa", refine_in_batches, SerialComm())
    assert [result.lattice for result in results] == [0, 1]
    with open(tmp_path / "s_shots.tsv", newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    assert [(row["identifier"], row["converged"], row["reason"]) for row in rows] == [
        ("lattice-0", "1", ""), ("lattice-1", "1", "")]
    assert (tmp_path / "s_refined.expt").is_file()
    # No free domains: their table is its header.
    assert read_domain_vectors(tmp_path / "s_domains.tsv") == {}


def test_free_domains_are_written_beside_the_shots_table(case, tmp_path):
    """stage1.free_domains: every converged lattice's domain vectors go to P_domains.tsv, the ones its fit
    ended with (to the table's 10 digits), their RMS angle the shots table's eta."""
    from xfel_spread.io.refined_shots import read_refined_shots
    from xfel_spread.stage1.pipeline import refine_one_by_one

    config = write_config(tmp_path / "stage1.yaml", refine="[G, rotation, cell, ncells, eta]", free_domains=3,
                          free_domains_starts=1, **SETTINGS)
    inputs = Stage1Inputs(str(config), str(case.annulus_prefix), str(case.shard), str(tmp_path / "s"),
                          amplitudes=str(case.amplitudes))
    results = run_stage1(inputs, "spread-stage1", refine_one_by_one, SerialComm())
    rows = read_refined_shots(tmp_path / "s_shots.tsv")
    assert [row["converged"] for row in rows] == [1, 1], [row["reason"] for row in rows]
    written = read_domain_vectors(tmp_path / "s_domains.tsv")
    assert sorted(written) == [0, 1]
    for result, row in zip(results, rows):
        vectors = written[result.lattice]
        # The case's crystals are one domain each: the fitted domains sit within 1e-4 deg of each other.
        assert vectors.shape == (3, 3) and np.abs(vectors).max() > 0
        assert np.abs(vectors - result.domain_vectors_deg).max() <= 1e-9 * np.abs(vectors).max()
        assert row["eta_deg"] == pytest.approx(np.sqrt((vectors ** 2).sum(axis=1).mean()), rel=1e-8)


def test_a_user_error_is_agreed_and_writes_nothing(case, tmp_path):
    config = write_config(tmp_path / "stage1.yaml", **SETTINGS)
    inputs = Stage1Inputs(str(config), str(case.annulus_prefix), str(case.shard), str(tmp_path / "no_dir" / "s"),
                          amplitudes=str(case.amplitudes))
    with pytest.raises(AgreedError, match="no_dir: output directory does not exist"):
        run_stage1(inputs, "spread-stage1", refine_in_batches, SerialComm())


def test_a_batch_that_fails_as_a_whole_is_refined_one_shot_at_a_time(prepared, caplog):
    from xfel_spread.stage1.batched import refine_batch

    settings, model, lattices = prepared
    (_, first, _, _), (_, second, _, _) = lattices
    # Extended-precision pixel data pass the per-shot checks (they are read as float64) but cannot be
    # put on the device with the batch: the batch as a whole fails.
    broken = dataclasses.replace(second, data_photons=np.asarray(second.data_photons, dtype=np.longdouble))
    with pytest.raises(TypeError):
        refine_batch([first, broken, second], model, settings)

    with caplog.at_level(logging.WARNING, logger="xfel_spread.stage1"):
        fits = refine_batch_or_singly([first, broken, second], model, settings)
    assert "a batch of 3 lattices failed; refining them one at a time" in caplog.text
    assert isinstance(fits[1], TypeError)
    for fit, shot in ((fits[0], first), (fits[2], second)):
        alone = refine_batch([shot], model, settings)[0]
        assert fit.converged and fit.reason == ""
        assert fit.final == pytest.approx(alone.final, rel=1e-9, abs=1e-12)

    batch = [lattices[0], (1, broken, broken.n_pixels, 0), lattices[1]]
    rows = [result.row for result in batch_results(batch, fits)]
    assert [row["converged"] for row in rows] == [1, 0, 1]
    assert rows[1]["reason"].startswith("TypeError: can't convert np.ndarray of type numpy.")
    assert (rows[1]["shot"], rows[1]["identifier"], rows[1]["n_pixels"]) == (
        broken.shot_index, broken.identifier, broken.n_pixels)


def test_a_batch_that_runs_is_not_refined_again(prepared, caplog):
    from xfel_spread.stage1.batched import refine_batch

    settings, model, lattices = prepared
    shots = [shot for _, shot, _, _ in lattices]
    with caplog.at_level(logging.WARNING, logger="xfel_spread.stage1"):
        fits = refine_batch_or_singly(shots, model, settings)
    assert "failed" not in caplog.text
    together = refine_batch(shots, model, settings)
    assert [fit.final for fit in fits] == [fit.final for fit in together]
