"""Pure functions of the DIALS stages (xfel_spread.dials): log parsing, tables, scoring, metrology, phil checks.

Nothing here runs a DIALS program; the log and phil inputs are written in the formats DIALS 3.12 produces.
"""

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xfel_spread.dials.compat import EXTENSION_NAME
from xfel_spread.dials.metrology import (
    ShardLattices,
    format_report,
    geometry_shift,
    select_shards,
    shard_lattices,
)
from xfel_spread.dials.phil import PhilFileError, check_phil_file
from xfel_spread.dials.scoring import (
    SCORE_COLUMNS,
    best_rotation,
    format_score_table,
    misorientation_deg,
    point_group_rotations,
    rotation_angle_deg,
    write_score_table,
)
from xfel_spread.dials.stills import (
    NOT_PROCESSED,
    ShotOutcome,
    image_tag,
    parse_debug_logs,
    parse_failure_reasons,
    shot_outcomes,
    stills_process_arguments,
)
from xfel_spread.io.stills import output_paths, read_shots_table, write_shots_table
from xfel_spread.io.tables import parse_float
from xfel_spread.sim.crystal import orthogonalization_matrix

LY99_CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
TWOFOLD_ABOUT_B = np.diag([-1.0, 1.0, -1.0])
STARS = "*" * 80

# The multi-line spotfinding failure exactly as a rank's stdout shows it: the exception text starts
# with a newline, so the reason begins on the next line and ends at a blank line.
SPOTFINDING_FAILURE_LINES = [
    "Error spotfinding shard_00007_00002 ",
    "          The number of strong pixels found (65536) is greater than the",
    "          maximum allowed (16384). Try changing spot finding parameters",
    "        ",
    STARS,
    "Finding Strong Spots",
    STARS,
]
SPOTFINDING_REASON = ("The number of strong pixels found (65536) is greater than the maximum allowed (16384). "
                      "Try changing spot finding parameters")


def rotation_about(axis, angle_deg) -> np.ndarray:
    """Rodrigues' formula: the proper rotation by ``angle_deg`` about ``axis``."""
    x, y, z = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    angle = np.radians(angle_deg)
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def oriented_ly99_crystal() -> np.ndarray:
    """Real-space matrix (rows a, b, c) of the LY99 cell in a general orientation, so no axis is special."""
    return orthogonalization_matrix(LY99_CELL) @ rotation_about([0.3, -1.0, 0.7], 37.0).T


# --- stills.py ---------------------------------------------------------------------------------------


def test_image_tag_is_file_stem_and_five_digit_image():
    assert image_tag("/data/run/shard_00003.h5", 0) == "shard_00003_00000"
    assert image_tag(Path("shard_00003.h5"), 12) == "shard_00003_00012"


def test_parse_debug_logs_keeps_last_terminal_event_and_splits_its_count():
    lines = [
        "vm,shard_00000_00000,2026-11-21T02:19Z31.011,    ,start",
        "vm,shard_00000_00000,2026-11-21T02:19Z31.012,    ,spotfind_start",
        "vm,shard_00000_00000,2026-11-21T02:19Z40.316,done,integrate_ok_70",
        "",  # DIALS writes an empty line when a rank finishes
        "vm,shard_00000_00001,2026-11-21T02:20Z10.000,done,spotfinding_ok_439",
        "vm,shard_00000_00001,2026-11-21T02:21Z27.576,stop,indexing_failed_439",
        "vm,shard_00000_00002,2026-11-21T02:20Z31.891,fail,spotfinding_exception",
        "vm,shard_00000_00003,2026-11-21T02:22Z00.000,    ,index_start",
    ]
    assert parse_debug_logs(lines) == {
        "shard_00000_00000": ("integrate_ok", 70),
        "shard_00000_00001": ("indexing_failed", 439),
        "shard_00000_00002": ("spotfinding_exception", None),
        # shard_00000_00003 has only an intermediate event: it never finished, so it has no outcome
    }


def test_parse_failure_reasons_single_and_multi_line():
    lines = [
        "No crystal models remaining after comparing with known symmetry",
        "Couldn't index shard_00007_00001 No suitable indexing solution found",
        STARS,  # the next shot's banner ends the one-line reason
        *SPOTFINDING_FAILURE_LINES,
        "Not enough spots to index shard_00007_00004",
        "",
    ]
    assert parse_failure_reasons(lines) == {
        "shard_00007_00001": "No suitable indexing solution found",
        "shard_00007_00002": SPOTFINDING_REASON,
        "shard_00007_00004": "",
    }


def test_parse_failure_reasons_keeps_adjacent_failures_apart():
    # Failures printed back to back, with no banner between them, must not swallow each other.
    lines = ["Couldn't index a_00000 No suitable indexing solution found", "Not enough spots to index a_00001",
             "Error in pre-process a_00002 bad image"]
    assert parse_failure_reasons(lines) == {
        "a_00000": "No suitable indexing solution found", "a_00001": "", "a_00002": "bad image"}


def test_shot_outcomes_from_a_two_rank_work_dir(tmp_path):
    # Rank 0 took images 0 and 2, rank 1 images 1 and 3; image 4 was never started.
    (tmp_path / "debug").mkdir()
    (tmp_path / "debug" / "debug_0.txt").write_text("\n".join([
        "vm,shard_00007_00000,2026-11-21T02:19Z31.011,    ,start",
        "vm,shard_00007_00000,2026-11-21T02:19Z40.316,done,integrate_ok_70",
        "vm,shard_00007_00002,2026-11-21T02:20Z30.000,    ,start",
        "vm,shard_00007_00002,2026-11-21T02:20Z31.891,fail,spotfinding_exception",
        "",
    ]))
    (tmp_path / "debug" / "debug_1.txt").write_text("\n".join([
        "vm,shard_00007_00001,2026-11-21T02:19Z31.020,    ,start",
        "vm,shard_00007_00001,2026-11-21T02:21Z27.576,stop,indexing_failed_439",
        "vm,shard_00007_00003,2026-11-21T02:21Z28.000,    ,start",
        "vm,shard_00007_00003,2026-11-21T02:21Z35.100,done,integrate_ok_108",
        "",
    ]))
    (tmp_path / "log_rank0000.out").write_text("\n".join(
        ["Should be redirected now", STARS, "Finding Strong Spots", STARS, *SPOTFINDING_FAILURE_LINES, ""]))
    (tmp_path / "log_rank0001.out").write_text("\n".join([
        "Should be redirected now",
        "No crystal models remaining after comparing with known symmetry",
        "Couldn't index shard_00007_00001 No suitable indexing solution found",
        STARS,
        "",
    ]))

    outcomes = shot_outcomes(tmp_path / "shard_00007.h5", first_shot=700, n_images=5, work_dir=tmp_path)

    assert outcomes == [
        ShotOutcome(shot=700, image=0, status="integrate_ok", n_integrated=70),
        ShotOutcome(shot=701, image=1, status="indexing_failed", n_spots=439,
                    reason="No suitable indexing solution found"),
        ShotOutcome(shot=702, image=2, status="spotfinding_exception", reason=SPOTFINDING_REASON),
        ShotOutcome(shot=703, image=3, status="integrate_ok", n_integrated=108),
        ShotOutcome(shot=704, image=4, status=NOT_PROCESSED),
    ]


def test_shots_table_round_trip(tmp_path):
    shots = [
        ShotOutcome(shot=700, image=0, status="integrate_ok", n_integrated=70),
        ShotOutcome(shot=701, image=1, status="indexing_failed", n_spots=0,
                    reason='tab\there, "quoted" text'),  # must survive TSV quoting
        ShotOutcome(shot=702, image=2, status="integrate_failed", n_indexed=35, reason="no reflections left"),
        ShotOutcome(shot=703, image=3, status=NOT_PROCESSED),
    ]
    path = tmp_path / "shard_00007_shots.tsv"
    write_shots_table(shots, path)

    assert read_shots_table(path) == [
        {"shot": 700, "image": 0, "status": "integrate_ok", "n_spots": None, "n_indexed": None, "n_integrated": 70,
         "reason": ""},
        # a zero count stays 0, distinct from a missing count (None)
        {"shot": 701, "image": 1, "status": "indexing_failed", "n_spots": 0, "n_indexed": None, "n_integrated": None,
         "reason": 'tab\there, "quoted" text'},
        {"shot": 702, "image": 2, "status": "integrate_failed", "n_spots": None, "n_indexed": 35,
         "n_integrated": None, "reason": "no reflections left"},
        {"shot": 703, "image": 3, "status": NOT_PROCESSED, "n_spots": None, "n_indexed": None, "n_integrated": None,
         "reason": ""},
    ]


def test_output_paths_are_the_five_suffixed_files(tmp_path):
    prefix = tmp_path / "index" / "shard_00007"
    assert output_paths(prefix) == {
        "integrated_experiments": tmp_path / "index" / "shard_00007_integrated.expt",
        "integrated_reflections": tmp_path / "index" / "shard_00007_integrated.refl",
        "refined_experiments": tmp_path / "index" / "shard_00007_refined.expt",
        "indexed_reflections": tmp_path / "index" / "shard_00007_indexed.refl",
        "shots": tmp_path / "index" / "shard_00007_shots.tsv",
    }


def test_stills_process_arguments_order_and_meaning(tmp_path, monkeypatch):
    from dials.command_line.stills_process import phil_scope

    monkeypatch.chdir(tmp_path)
    work_dir = tmp_path / "shard_00007.work"
    arguments = stills_process_arguments("data/shard_00007.h5", [Path("index.phil"), "extra.phil"], work_dir, 4)

    assert arguments[:3] == [str(tmp_path / "data" / "shard_00007.h5"), "index.phil", "extra.phil"]
    # The pipeline's own settings must be parameters stills_process knows (the interpreter raises on
    # unknown ones) and must carry the values asked for.
    interpreter = phil_scope.command_line_argument_interpreter()
    params = phil_scope.fetch(sources=[interpreter.process(arg=argument) for argument in arguments[3:]]).extract()
    assert params.mp.method == "mpi"
    assert params.mp.composite_stride == 4
    assert params.output.output_dir == str(work_dir)
    assert params.output.logging_dir == str(work_dir)
    assert params.output.integration_pickle is None


def test_stills_process_arguments_pass_the_reference_geometry_as_an_absolute_path(tmp_path, monkeypatch):
    from dials.command_line.stills_process import phil_scope

    monkeypatch.chdir(tmp_path)
    arguments = stills_process_arguments("shard.h5", ["index.phil"], tmp_path / "work", 1,
                                         reference_geometry="metrology/refined_detector.expt")

    # stills_process runs in its work directory: the path must not depend on where it was given from.
    assert arguments[2] == f"input.reference_geometry={tmp_path / 'metrology' / 'refined_detector.expt'}"
    interpreter = phil_scope.command_line_argument_interpreter()
    params = phil_scope.fetch(sources=[interpreter.process(arg=arguments[2])]).extract()
    assert params.input.reference_geometry == str(tmp_path / "metrology" / "refined_detector.expt")
    assert params.input.sync_reference_geom


# --- scoring.py --------------------------------------------------------------------------------------


def test_point_group_rotations_of_c2_are_identity_and_twofold_about_b():
    # C 1 2 1 has four operations (two of them C-centring translations); only two rotation parts differ.
    rotations = point_group_rotations("C 1 2 1")
    assert len(rotations) == 2
    assert any(np.array_equal(rotation, np.eye(3)) for rotation in rotations)
    assert any(np.array_equal(rotation, TWOFOLD_ABOUT_B) for rotation in rotations)


@pytest.mark.parametrize("angle_deg", [0.0, 0.05, 30.0, 120.0, 180.0])
def test_rotation_angle_deg_recovers_the_angle(angle_deg):
    assert rotation_angle_deg(rotation_about([1.0, -2.0, 0.5], angle_deg)) == pytest.approx(angle_deg, abs=1e-6)


@pytest.mark.parametrize("angle_deg", [1e-7, 1e-4, 0.002])
def test_rotation_angle_deg_keeps_its_digits_near_zero(angle_deg):
    """arccos((trace - 1) / 2) rounds an angle near 0 to about 1e-6 deg (a CPU's rounding decided
    whether a C2-equivalent crystal scored 0 within 1e-6); the angle from atan2 keeps its digits."""
    assert rotation_angle_deg(rotation_about([1.0, -2.0, 0.5], angle_deg)) == pytest.approx(angle_deg, rel=1e-6)


def test_best_rotation_recovers_a_known_rotation():
    source = oriented_ly99_crystal()
    rotation = rotation_about([2.0, 1.0, -1.0], 23.0)
    assert best_rotation(source, source @ rotation.T) == pytest.approx(rotation, abs=1e-12)


def test_best_rotation_is_proper_even_when_a_reflection_fits_better():
    # The inverted crystal is matched exactly only by -I (determinant -1); Kabsch must still return a rotation.
    source = oriented_ly99_crystal()
    rotation = best_rotation(source, -source)
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-12)
    assert rotation @ rotation.T == pytest.approx(np.eye(3), abs=1e-12)


def test_misorientation_of_a_slightly_rotated_crystal_is_the_rotation_angle():
    true = oriented_ly99_crystal()
    estimated = true @ rotation_about([0.2, 0.9, -0.4], 0.05).T
    assert misorientation_deg(estimated, true, point_group_rotations("C 1 2 1")) == pytest.approx(0.05, abs=1e-6)


def test_misorientation_ignores_the_c2_indexing_ambiguity():
    true = oriented_ly99_crystal()
    # (-a, b, -c): the same crystal described through its 2-fold axis, as an indexer may return it.
    equivalent = TWOFOLD_ABOUT_B @ true
    rotations = point_group_rotations("C 1 2 1")
    assert misorientation_deg(equivalent, true, rotations) == pytest.approx(0.0, abs=1e-6)
    assert misorientation_deg(equivalent @ rotation_about([1.0, 1.0, 1.0], 0.05).T, true, rotations) == (
        pytest.approx(0.05, abs=1e-6))
    # Without the symmetry rotations the same description is 180 degrees away: the ambiguity is real.
    # (arccos is ill-conditioned at 180 degrees, hence the looser tolerance.)
    assert misorientation_deg(equivalent, true, [np.eye(3)]) == pytest.approx(180.0, abs=1e-3)


def score_row(pass_name, shots, misorientation_median):
    """A score-table row whose float columns hold distinct values (more digits than the tables keep)."""
    row = {"pass": pass_name, "shots": shots}
    for number, column in enumerate(SCORE_COLUMNS[2:]):
        row[column] = 0.123456789 * (number + 1)
    row["misorientation_median_deg"] = misorientation_median
    return row


def test_format_score_table_has_one_line_per_column_and_one_cell_per_pass():
    rows = [score_row("index", 40, 0.0123456), score_row("reindex", 40, float("nan"))]
    lines = format_score_table("ly99_sim", rows).splitlines()

    assert "ly99_sim" in lines[0]
    assert lines[1].split() == ["index", "reindex"]
    assert [line.split()[0] for line in lines[2:]] == list(SCORE_COLUMNS[1:])
    cells = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert cells["shots"] == ["40", "40"]  # counts stay integers
    assert cells["misorientation_median_deg"][0] == "0.0123"
    assert cells["misorientation_median_deg"][1] == "nan"
    for column in SCORE_COLUMNS[2:]:
        if column != "misorientation_median_deg":
            assert [float(cell) for cell in cells[column]] == pytest.approx(
                [row[column] for row in rows], abs=5e-5)


def test_write_score_table_writes_every_column_of_every_row(tmp_path):
    rows = [score_row("index", 40, 0.0123456789), score_row("reindex", 38, float("nan"))]
    path = tmp_path / "scores.tsv"
    write_score_table(rows, path)

    with open(path, newline="") as stream:
        reader = csv.DictReader(stream, delimiter="\t")
        written = list(reader)
    assert tuple(reader.fieldnames) == SCORE_COLUMNS
    assert [row["pass"] for row in written] == ["index", "reindex"]
    assert [row["shots"] for row in written] == ["40", "38"]
    assert math.isnan(parse_float(written[1]["misorientation_median_deg"]))  # NaN is the empty cell
    for original, row in zip(rows, written):
        for column in SCORE_COLUMNS[2:]:
            if not math.isnan(original[column]):
                # six significant digits
                assert float(row[column]) == pytest.approx(original[column], rel=1e-5)


# --- metrology.py ------------------------------------------------------------------------------------


def shards_with(*lattice_counts):
    return [ShardLattices(Path(f"s{number}_refined.expt"), Path(f"s{number}_indexed.refl"), count)
            for number, count in enumerate(lattice_counts)]


def test_select_shards_skips_empty_shards_and_stops_at_max_lattices():
    shards = shards_with(0, 3, 0, 4, 5, 2)
    # 3 + 4 = 7 >= 6: the shard that crosses the limit is taken whole, later ones are not.
    assert select_shards(shards, 6) == ([shards[1], shards[3]], 7)
    assert select_shards(shards, 7) == ([shards[1], shards[3]], 7)
    assert select_shards(shards, 100) == ([shards[1], shards[3], shards[4], shards[5]], 14)
    assert select_shards(shards_with(0, 0), 10) == ([], 0)


def test_shard_lattices_counts_indexed_outcomes(tmp_path):
    statuses = ["integrate_ok", "integrate_failed", "indexing_failed", "refine_failed",
                "spotfinding_exception", NOT_PROCESSED, "integrate_ok"]
    table = tmp_path / "shard_00007_shots.tsv"
    write_shots_table([ShotOutcome(shot=700 + image, image=image, status=status)
                       for image, status in enumerate(statuses)], table)

    lattices = shard_lattices(str(tmp_path / "r.expt"), str(tmp_path / "i.refl"), table)

    # integrate_ok twice and integrate_failed once; a failed refinement leaves no refined lattice.
    assert lattices == ShardLattices(tmp_path / "r.expt", tmp_path / "i.refl", 3)


def panel_geometry(origin_mm, beam_centre_mm, beam_centre_px, distance_mm, name="Panel"):
    return {"name": name, "origin_mm": origin_mm, "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, -1.0, 0.0],
            "distance_mm": distance_mm, "pixel_size_mm": [0.089, 0.089],
            "beam_centre_mm": beam_centre_mm, "beam_centre_px": beam_centre_px}


BEFORE = {"n_experiments": 300, "panels": [panel_geometry(
    [-151.3, 146.9, -141.7], [151.3, 146.9], [1700.0, 1650.5], 141.7)]}
AFTER = {"n_experiments": 300, "panels": [panel_geometry(
    [-151.4113, 146.7665, -141.55], [151.4113, 146.7665], [1701.25, 1649.0], 141.55)]}


def test_geometry_shift_is_after_minus_before():
    (shift,) = geometry_shift(BEFORE, AFTER)
    assert shift["name"] == "Panel"
    assert shift["beam_centre_shift_px"] == pytest.approx([1.25, -1.5])
    assert shift["beam_centre_shift_mm"] == pytest.approx([0.1113, -0.1335])
    assert shift["distance_change_mm"] == pytest.approx(-0.15)


def test_format_report_shows_before_and_after_beam_centres():
    report = format_report("ly99_sim", 300, "SparseLevMar", BEFORE, AFTER)
    assert "dataset ly99_sim" in report
    assert "lattices refined: 300 (refinery.engine=SparseLevMar)" in report
    (px_line,) = [line for line in report.splitlines() if "beam centre (px)" in line]
    assert px_line.index("(1700.0000, 1650.5000)") < px_line.index("(1701.2500, 1649.0000)")
    (mm_line,) = [line for line in report.splitlines() if "beam centre (mm)" in line]
    assert mm_line.index("(151.3000, 146.9000)") < mm_line.index("(151.4113, 146.7665)")
    assert "shift: beam centre (+1.2500, -1.5000) px (fast, slow), distance -0.1500 mm" in report


# --- phil.py -----------------------------------------------------------------------------------------


def rejection(path, program="stills_process") -> str:
    """The one-line message check_phil_file gives for ``path``, checked to start with the path."""
    with pytest.raises(PhilFileError) as caught:
        check_phil_file(path, program)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_check_phil_file_names_unknown_parameter_and_its_line(tmp_path):
    path = tmp_path / "index.phil"
    path.write_text("# comment\nspotfinder {\n  filter {\n    min_spot_size = 3\n    no_such_option = 1\n"
                    "  }\n}\n")
    message = rejection(path)
    assert "unknown parameter" in message
    assert "spotfinder.filter.no_such_option (line 5)" in message
    assert "min_spot_size" not in message  # the valid parameter is not blamed


@pytest.mark.parametrize("assignment, parameter", [
    ("spotfinder.filter.min_spot_size = three", "spotfinder.filter.min_spot_size"),
    ("dispatch.index = maybe", "dispatch.index"),
    ("mp.method = nonsense", "mp.method"),  # not one of the choices (libtbx raises Sorry)
])
def test_check_phil_file_rejects_a_value_of_the_wrong_type(tmp_path, assignment, parameter):
    path = tmp_path / "index.phil"
    path.write_text(assignment + "\n")
    assert parameter in rejection(path)


def test_check_phil_file_rejects_a_malformed_unit_cell_naming_the_file(tmp_path):
    # libtbx raises a bare ValueError here, without the file; the message must still start with it.
    path = tmp_path / "index.phil"
    path.write_text("indexing.known_symmetry.unit_cell = a,b\n")
    assert "could not convert" in rejection(path)


def test_check_phil_file_rejects_an_unclosed_brace(tmp_path):
    path = tmp_path / "index.phil"
    path.write_text("dispatch {\n  index = True\n")
    message = rejection(path)
    assert "Syntax error" in message
    assert 'no matching "}"' in message


def test_check_phil_file_rejects_a_missing_file(tmp_path):
    assert rejection(tmp_path / "absent.phil").endswith("no such file")


@pytest.mark.parametrize("name, program", [("index.phil", "stills_process"), ("metrology.phil", "refine")])
def test_check_phil_file_accepts_the_repository_phil_files(repo_root, name, program):
    check_phil_file(repo_root / "config" / name, program)


def test_check_phil_file_rejects_index_phil_checked_as_refine(repo_root):
    # (metrology.phil is valid for stills_process too: its refinement scope includes dials.refine's.)
    message = rejection(repo_root / "config" / "index.phil", "refine")
    assert "unknown parameter for dials.refine" in message
    assert "indexing.known_symmetry.space_group" in message


# --- compat.py ---------------------------------------------------------------------------------------

needs_missing_extension = pytest.mark.skipif(
    importlib.util.find_spec(EXTENSION_NAME) is not None,
    reason=f"this cctbx ships the compiled {EXTENSION_NAME}; the stand-in is not used")


def run_python(code: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the stand-in changes sys.modules for the rest of the process.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@needs_missing_extension
def test_mono_simulation_import_fails_without_the_stand_in():
    result = run_python("import xfel.mono_simulation.max_like")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert EXTENSION_NAME in result.stderr


@needs_missing_extension
def test_mono_sim_stand_in_makes_the_import_work_once_installed():
    result = run_python(
        "from xfel_spread.dials.compat import install_mono_sim_stand_in\n"
        "print(install_mono_sim_stand_in())\n"
        "import xfel.mono_simulation.max_like, xfel.mono_simulation.util\n"
        "print(install_mono_sim_stand_in())\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


# --- metrology.plan_refinement -------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False], ids=["with_eigen", "without_eigen"])
def test_auto_engine_is_sparse_where_available_else_capped_levmar(monkeypatch, sparse):
    from xfel_spread.dials import metrology

    monkeypatch.setattr(metrology, "sparse_engine_available", lambda: sparse)
    plan = metrology.plan_refinement("auto", 30000)
    if sparse:
        assert plan == metrology.RefinementPlan("SparseLevMar", 30000)
    else:
        assert (plan.engine, plan.max_lattices) == ("LevMar", metrology.AUTO_DENSE_MAX_LATTICES)
        assert "30000" in plan.note and str(metrology.AUTO_DENSE_MAX_LATTICES) in plan.note
    # Small sets are never capped.
    assert metrology.plan_refinement("auto", 50).max_lattices == 50


def test_explicit_engines_are_used_as_named_or_refused(monkeypatch):
    from xfel_spread.dials import metrology

    monkeypatch.setattr(metrology, "sparse_engine_available", lambda: False)
    assert metrology.plan_refinement("LevMar", 200) == metrology.RefinementPlan("LevMar", 200)
    # Explicitly named, a dense engine may exceed auto's cap (the user accepts the time) ...
    assert metrology.plan_refinement("GaussNewton", 1000) == metrology.RefinementPlan("GaussNewton", 1000)
    assert metrology.plan_refinement("SimpleLBFGS", 30000) == metrology.RefinementPlan("SimpleLBFGS", 30000)
    with pytest.raises(metrology.MetrologyError, match="SparseLevMar needs DIALS's Eigen extension"):
        metrology.plan_refinement("SparseLevMar", 200)
    # 30,000 lattices x 7 parameters: a (210,000)^2 matrix of doubles, 353 GB.
    with pytest.raises(metrology.MetrologyError, match="need a dense 353 GB normal matrix"):
        metrology.plan_refinement("LevMar", 30000)


def test_this_dials_reports_whether_it_has_the_sparse_engine():
    # Debian's DIALS 3.12 lacks the Eigen wrapper; a conda-forge DIALS has it. Either way the answer
    # must agree with whether the module behind SparseLevMar imports.
    from xfel_spread.dials.metrology import sparse_engine_available

    try:
        import dials.algorithms.refinement.sparse_engine  # noqa: F401
        importable = True
    except Exception:  # DIALS raises its own DialsRefineConfigError when Eigen is missing
        importable = False
    assert sparse_engine_available() == importable
