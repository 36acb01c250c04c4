"""The pixel metrology driver (xfel_spread.stage1.pixel_metrology) and its command line, in-process, on
the tiny stage-1 case (tests/stage1_cases.py) with its images simulated 0.5 px off the beam centre the
experiments give: stage 1 refines the two lattices on the nominal detector, then the driver refines the
panel with them and writes the detector that DIALS reads back, moved by the refined shift."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from stage1_cases import PIXEL_SIZE_MM, write_case
from xfel_spread.cli.pixel_metrology import pixel_metrology_main
from xfel_spread.mpi import SerialComm
from xfel_spread.stage1.pipeline import Stage1Inputs, refine_one_by_one, run_stage1
from xfel_spread.stage1.pixel_metrology import PixelMetrologyError, PixelMetrologyInputs, run_pixel_metrology

#: Slow tier: stage 1 of two lattices and a joint refinement of 500-odd evaluations, about 25 s on one core.
pytestmark = pytest.mark.slow

OFFSET_PX = 0.5


@pytest.fixture(scope="module")
def refined_case(tmp_path_factory):
    """The offset case, its settings (stage1 + pixel_metrology) and stage 1's outputs."""
    directory = tmp_path_factory.mktemp("pixel_metrology_case")
    case = write_case(directory, beam_offset_px=OFFSET_PX)
    config = directory / "pixel_metrology.yaml"
    config.write_text("stage1:\n  structure_factors: model\n  device: cpu\n"
                      "pixel_metrology:\n  enabled: true\n  max_lattices: 200\n")
    (directory / "stage1").mkdir()
    stage1_prefix = directory / "stage1" / "shard_00000"
    results = run_stage1(Stage1Inputs(str(config), str(case.annulus_prefix), str(case.shard), str(stage1_prefix),
                                      amplitudes=str(case.amplitudes)), "spread-stage1", refine_one_by_one, SerialComm())
    assert [result.row["converged"] for result in results] == [1, 1]
    return case, config, stage1_prefix


def outputs(directory):
    return {name: str(directory / name) for name in ("refined_detector.expt", "table.tsv", "summary.json",
                                                      "refinement.png")}


def test_the_refined_detector_is_written_moved_by_the_recovered_shift(refined_case, tmp_path, caplog):
    from dxtbx.model.experiment_list import ExperimentList

    from xfel_spread.dials.metrology import apply_saved_detector, read_saved_detector

    case, config, stage1_prefix = refined_case
    paths = outputs(tmp_path)
    caplog.set_level(logging.INFO, logger="xfel_spread.stage1")
    summary = run_pixel_metrology(PixelMetrologyInputs(
        str(config), [str(case.annulus_prefix)], [str(case.shard)], [str(stage1_prefix)],
        paths["refined_detector.expt"], paths["table.tsv"], paths["summary.json"], paths["refinement.png"],
        amplitudes=str(case.amplitudes), dataset="offset"))
    assert summary["converged"], summary["reason"]
    assert (summary["n_lattices"], summary["n_kept"], summary["left_out"]) == (2, 2, [])
    # Its log reports progress: step 1's lattices, every profile evaluation, the standard errors.
    logged = [record.getMessage() for record in caplog.records if record.name == "xfel_spread.stage1"]
    assert any(line.startswith("pixel metrology, step 1 (each lattice alone): 2/2 lattices done") for line in logged)
    evaluations = [line for line in logged if line.startswith("pixel metrology, step 2: evaluation ")]
    assert len(evaluations) == summary["evaluations"]
    assert any(line.startswith("pixel metrology: standard errors") for line in logged)
    assert summary["nll_final"] < summary["nll_start"]
    # Two lattices find the 0.5 px offset along fast and slow to a few hundredths of a pixel, and no
    # distance shift to speak of.
    shift = np.array([summary["shift_fast_px"], summary["shift_slow_px"]])
    assert shift == pytest.approx([OFFSET_PX, OFFSET_PX], abs=0.05)
    assert abs(summary["shift_distance_mm"]) < 0.05
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["shift_fast_px"] == summary["shift_fast_px"]
    # The shift's standard errors (pixel_metrology.uncertainty, on by default), both kinds from two lattices.
    for kind in ("model", "robust"):
        sigma = written["uncertainty"][kind]
        assert sorted(sigma) == ["distance_mm", "fast_px", "slow_px"]
        assert all(0 < value < 0.5 for value in sigma.values()), (kind, sigma)

    # DIALS reads the detector back: the annulus detector's origin moved by the refined shift.
    nominal = ExperimentList.from_file(f"{case.annulus_prefix}_annulus.expt", check_format=False)[0].detector[0]
    saved = read_saved_detector(paths["refined_detector.expt"])
    (panel,) = list(saved)
    moved = np.subtract(panel.get_origin(), nominal.get_origin())
    assert moved == pytest.approx([-shift[0] * PIXEL_SIZE_MM, shift[1] * PIXEL_SIZE_MM, -summary["shift_distance_mm"]],
                                  abs=1e-9)
    assert panel.get_fast_axis() == nominal.get_fast_axis() and panel.get_slow_axis() == nominal.get_slow_axis()
    # ... and it is the shape metrology.reference_geometry takes: applied to the experiments' detector.
    detector = ExperimentList.from_file(f"{case.annulus_prefix}_annulus.expt", check_format=False)[0].detector
    apply_saved_detector(saved, detector, "test")
    assert detector[0].get_origin() == pytest.approx(panel.get_origin(), abs=1e-12)

    with open(paths["table.tsv"], newline="") as stream:
        rows = {row["quantity"]: row for row in csv.DictReader(stream, delimiter="\t")}
    assert float(rows["beam_centre_fast_px"]["change"]) == pytest.approx(shift[0], abs=1e-6)
    assert float(rows["beam_centre_slow_px"]["change"]) == pytest.approx(shift[1], abs=1e-6)
    assert float(rows["distance_mm"]["after"]) - float(rows["distance_mm"]["before"]) == pytest.approx(
        summary["shift_distance_mm"], abs=1e-5)
    assert (tmp_path / "refinement.png").read_bytes()[:4] == b"\x89PNG"


def test_the_command_line_refuses_mismatched_shard_lists_in_one_line(refined_case, tmp_path, capsys):
    case, config, stage1_prefix = refined_case
    paths = outputs(tmp_path)
    status = pixel_metrology_main([
        "--config", str(config), "--annulus-prefix", str(case.annulus_prefix), "--shard", str(case.shard),
        "--shard", str(case.shard), "--stage1-prefix", str(stage1_prefix), "--amplitudes", str(case.amplitudes),
        "--refined-detector", paths["refined_detector.expt"], "--table", paths["table.tsv"],
        "--summary", paths["summary.json"], "--plot", paths["refinement.png"]])
    assert status == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "one --shard and one --stage1-prefix per --annulus-prefix" in error
    assert not (tmp_path / "refined_detector.expt").exists()


def test_without_stage_1_outputs_it_stops_with_one_line(refined_case, tmp_path):
    case, config, _ = refined_case
    paths = outputs(tmp_path)
    with pytest.raises(PixelMetrologyError, match=r"missing_refined\.expt: no such file"):
        run_pixel_metrology(PixelMetrologyInputs(
            str(config), [str(case.annulus_prefix)], [str(case.shard)], [str(tmp_path / "missing")],
            paths["refined_detector.expt"], paths["table.tsv"], paths["summary.json"], paths["refinement.png"],
            amplitudes=str(case.amplitudes)))
    assert not (tmp_path / "refined_detector.expt").exists()
