"""spread-stage1, spread-exa and spread-score-stage1 end to end on the tiny simulated case of
test_stage1_rois (two shots whose start crystals are 0.05 degrees and 0.2 % off the truth).

Commands run in subprocesses only: initialising MPI inside the pytest process would make every
later ``mpirun`` fail.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import mpirun_command, run_job
from stage1_cases import CELL, DISTANCE_MM, G_TRUE, NCELLS_TRUE, write_case, write_test_mtz
from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations

BIN = Path(sys.executable).parent
TIMEOUT_S = 300
#: Columns that may differ between two runs of the same input: wall time.
TIMING_COLUMNS = ("seconds",)


def write_config(path: Path, source: str = "model", **settings) -> Path:
    lines = ["stage1:", f"  structure_factors: {source}", "  device: cpu"]
    lines += [f"  {key}: {value}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def stage1_command(case, config, output_prefix, program="spread-stage1", ranks=None, mtz=None):
    source = ["--mtz", mtz] if mtz is not None else ["--amplitudes", case.amplitudes]
    command = [BIN / program, "--config", config, "--annulus-prefix", case.annulus_prefix, "--shard", case.shard,
               *source, "--output-prefix", output_prefix]
    if ranks:
        command = mpirun_command(command, ranks)
    return command


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in rows]


def crystals(path: Path) -> list[np.ndarray]:
    from dxtbx.model.experiment_list import ExperimentList

    return [np.array(experiment.crystal.get_real_space_vectors())
            for experiment in ExperimentList.from_file(str(path), check_format=False)]


def one_error_line(result, program) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("stage1_cli_case"))


@pytest.fixture(scope="module")
def one_rank(case, tmp_path_factory):
    """spread-stage1 on one MPI rank with the model's structure factors."""
    directory = tmp_path_factory.mktemp("one_rank")
    config = write_config(directory / "stage1.yaml")
    result = run_job(stage1_command(case, config, directory / "shard_00000", ranks=1), TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "shard_00000", result


def test_one_row_per_lattice_in_order_and_refined_crystals_closer_to_the_truth(case, one_rank):
    prefix, result = one_rank
    rows = read_table(Path(f"{prefix}_shots.tsv"))
    assert [row["identifier"] for row in rows] == ["lattice-0", "lattice-1"]
    assert [int(row["shot"]) for row in rows] == [0, 1] and [int(row["image"]) for row in rows] == [0, 1]
    assert [int(row["n_rois"]) for row in rows] == case.n_reflections
    assert all(int(row["n_rois_no_f"]) == 0 for row in rows)
    assert "lattices converged" in result.stderr
    rotations = point_group_rotations("C 1 2 1")
    refined = crystals(Path(f"{prefix}_refined.expt"))
    for row, matrix, start, truth in zip(rows, refined, case.start_matrices, case.true_matrices):
        assert (row["converged"], row["reason"]) == ("1", "")
        assert float(row["nll_after"]) < float(row["nll_before"])
        # The start is 0.05 degrees and 0.13 A (a) off; the simulated pixels pin the crystal down.
        assert misorientation_deg(start, truth, rotations) == pytest.approx(0.05, abs=1e-3)
        assert misorientation_deg(matrix, truth, rotations) < 0.005
        assert float(row["a"]) == pytest.approx(CELL[0], abs=0.01)
        assert float(row["Na"]) == pytest.approx(NCELLS_TRUE, rel=0.05)
        assert float(row["G"]) == pytest.approx(G_TRUE, rel=0.05)
        assert float(row["rmsd_radial_after_px"]) < 0.1 < float(row["rmsd_radial_before_px"])
        assert float(row["zscore_sigma"]) == pytest.approx(1.0, abs=0.15)


def test_two_ranks_write_the_same_files_as_one(case, one_rank, tmp_path):
    prefix, _ = one_rank
    config = write_config(tmp_path / "stage1.yaml")
    result = run_job(stage1_command(case, config, tmp_path / "shard_00000", ranks=2), TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert without_timing(read_table(tmp_path / "shard_00000_shots.tsv")) == without_timing(
        read_table(Path(f"{prefix}_shots.tsv")))
    assert (tmp_path / "shard_00000_refined.expt").read_text() == Path(f"{prefix}_refined.expt").read_text()
    # Each rank reports its own progress.
    assert "rank 0:" in result.stderr and "rank 1:" in result.stderr


def test_exa_gives_the_parameters_of_stage1(case, one_rank, tmp_path):
    prefix, _ = one_rank
    config = write_config(tmp_path / "stage1.yaml", batch_shots=2)
    result = run_job(stage1_command(case, config, tmp_path / "e", program="spread-exa", ranks=1), TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    exa_rows, stage1_rows = read_table(tmp_path / "e_shots.tsv"), read_table(Path(f"{prefix}_shots.tsv"))
    assert [row["identifier"] for row in exa_rows] == [row["identifier"] for row in stage1_rows]
    for exa, stage1 in zip(exa_rows, stage1_rows):
        assert exa["converged"] == stage1["converged"] == "1"
        for name, tolerance in (("G", 1e-3), ("Na", 1e-3), ("Nb", 1e-3), ("Nc", 1e-3), ("a", 1e-5), ("b", 1e-5),
                                ("c", 1e-5), ("beta_deg", 1e-5)):
            assert float(exa[name]) == pytest.approx(float(stage1[name]), rel=tolerance), name
        for name in ("rot_x_deg", "rot_y_deg", "rot_z_deg"):
            assert float(exa[name]) == pytest.approx(float(stage1[name]), abs=1e-4), name
    for exa, stage1 in zip(crystals(tmp_path / "e_refined.expt"), crystals(Path(f"{prefix}_refined.expt"))):
        np.testing.assert_allclose(exa, stage1, atol=1e-4)


def test_merged_structure_factors_drop_and_count_reflections_without_f(case, tmp_path):
    """With an MTZ holding only lattice 0's first two indices, lattice 1 keeps no shoebox: a failed row."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex
    from dials.array_family import flex as dials_flex

    reflections = dials_flex.reflection_table.from_file(f"{case.annulus_prefix}_annulus.refl")
    lattice_0 = reflections.select(reflections["id"] == 0)
    lattice_1 = reflections.select(reflections["id"] == 1)
    symmetry = crystal.symmetry(unit_cell=CELL, space_group_symbol="C 1 2 1")
    kept = miller.set(symmetry, lattice_0["miller_index"][:2], anomalous_flag=False).map_to_asu()
    kept_1 = miller.set(symmetry, lattice_1["miller_index"], anomalous_flag=False).map_to_asu()
    assert kept.common_set(kept_1).size() == 0, "the case's lattices share an index; pick others"
    mtz = tmp_path / "merged.mtz"
    write_test_mtz(mtz, miller.array(kept, flex.double([1.0e4, 2.0e4])))

    config = write_config(tmp_path / "stage1.yaml", source="merged", max_iterations=20)
    result = run_job(stage1_command(case, config, tmp_path / "m", mtz=mtz), TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_table(tmp_path / "m_shots.tsv")
    assert int(rows[0]["n_rois"]) == 2 and int(rows[0]["n_rois_no_f"]) == case.n_reflections[0] - 2
    assert rows[1]["converged"] == "0" and int(rows[1]["n_rois"]) == 0
    assert int(rows[1]["n_rois_no_f"]) == case.n_reflections[1]
    assert rows[1]["reason"].startswith("no shoebox to refine")
    assert f"{case.n_reflections[1]} without a structure factor" in rows[1]["reason"]
    # The failed lattice keeps its start crystal.
    np.testing.assert_allclose(crystals(tmp_path / "m_refined.expt")[1], case.start_matrices[1], atol=1e-9)


def test_detector_distance_is_written_when_refined(case, tmp_path):
    from dxtbx.model.experiment_list import ExperimentList

    config = tmp_path / "stage1.yaml"
    config.write_text("stage1:\n  structure_factors: model\n  device: cpu\n"
                      "  refine: [G, rotation, cell, ncells, detz_shift]\n")
    result = run_job(stage1_command(case, config, tmp_path / "d"), TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_table(tmp_path / "d_shots.tsv")
    written = ExperimentList.from_file(str(tmp_path / "d_refined.expt"), check_format=False)
    for row, experiment in zip(rows, written):
        shift = float(row["detz_shift_mm"])
        assert -1.5 <= shift <= 1.5
        expected = DISTANCE_MM + shift if row["converged"] == "1" else DISTANCE_MM
        assert experiment.detector[0].get_distance() == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow  # one command process per case (MPI, torch and DIALS imported each time), about 11 s
def test_input_errors_are_one_line(case, tmp_path):
    config = write_config(tmp_path / "stage1.yaml", source="merged")
    line = one_error_line(run_job(stage1_command(case, config, tmp_path / "x"), TIMEOUT_S), "spread-stage1")
    assert "stage1.structure_factors is merged; give --mtz" in line
    config = write_config(tmp_path / "bad.yaml", shoebox_size_px=2)
    line = one_error_line(run_job(stage1_command(case, config, tmp_path / "x"), TIMEOUT_S), "spread-stage1")
    assert "stage1.shoebox_size_px" in line
    config = write_config(tmp_path / "stage1.yaml")
    command = stage1_command(case, config, tmp_path / "x")
    command[command.index("--annulus-prefix") + 1] = tmp_path / "missing"
    line = one_error_line(run_job(command, TIMEOUT_S), "spread-stage1")
    assert f"{tmp_path / 'missing'}_annulus.expt: no such file" in line
    line = one_error_line(run_job(stage1_command(case, config, tmp_path / "x") + ["--psf-fwhm-mm", "0.08"],
                                  TIMEOUT_S), "spread-stage1")
    assert "--psf-fwhm-mm and --psf-radius-px go together" in line
    line = one_error_line(run_job(stage1_command(case, config, tmp_path / "x")
                                  + ["--psf-fwhm-mm", "0", "--psf-radius-px", "10"], TIMEOUT_S), "spread-stage1")
    assert "point-spread FWHM must be positive, got 0.0 mm" in line
    assert not list(tmp_path.glob("x_*"))


def test_score_stage1_against_the_truth(case, one_rank, tmp_path):
    prefix, _ = one_rank
    command = [BIN / "spread-score-stage1", "--dataset", "psf", "--stage1-prefix", prefix,
               "--dials-prefix", case.reindex_prefix, "--truth", case.truth, "--table", tmp_path / "score.tsv",
               "--text", tmp_path / "score.txt", "--plot", tmp_path / "score.png"]
    result = run_job(command, TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "score.txt").read_text()
    assert "lattices 2, converged 2" in text
    # One domain, the simulator's own model: the refinement lands on the truth, closer than DIALS.
    assert "goal <= 0.3: met" in text
    assert "lattices closer than DIALS to the domains' mean orientation 100.0 %   goal >= 97 %: met" in text
    assert "goal <= 0.004: met" in text
    rows = read_table(tmp_path / "score.tsv")
    stage1_rows = read_table(Path(f"{prefix}_shots.tsv"))
    assert len(rows) == 2
    rotations = point_group_rotations("C 1 2 1")
    for row, start, truth, stage1_row in zip(rows, case.start_matrices, case.true_matrices, stage1_rows):
        assert float(row["misorientation_dials_deg"]) == pytest.approx(
            misorientation_deg(start, truth, rotations), abs=1e-6)
        # The start is 0.05 degrees off the truth, its a axis 0.2 % long.
        assert float(row["misorientation_dials_deg"]) == pytest.approx(0.05, abs=0.01)
        assert float(row["a_error_dials_a"]) == pytest.approx(CELL[0] * 0.002, abs=1e-3)
        assert float(row["ncells_true"]) == NCELLS_TRUE
        assert row["rmsd_radial_after_px"] == (f"{float(stage1_row['rmsd_radial_after_px']):.6g}"
                                               if stage1_row["rmsd_radial_after_px"] else "")
    assert (tmp_path / "score.png").stat().st_size > 10_000


def test_score_needs_one_dials_prefix_and_truth_per_shard(case, one_rank, tmp_path):
    prefix, _ = one_rank
    command = [BIN / "spread-score-stage1", "--dataset", "psf", "--stage1-prefix", prefix, "--stage1-prefix", prefix,
               "--dials-prefix", case.reindex_prefix, "--truth", case.truth, "--table", tmp_path / "s.tsv",
               "--text", tmp_path / "s.txt", "--plot", tmp_path / "s.png"]
    line = one_error_line(run_job(command, TIMEOUT_S), "spread-score-stage1")
    assert "give one --dials-prefix and one --truth per --stage1-prefix" in line
