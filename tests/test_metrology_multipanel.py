"""Detector metrology beyond one panel, on a simulated 2x2-panel detector with known misplacements.

Every panel of the true detector is shifted (up to 1 px) and rotated in its plane (up to 0.2 deg)
from the nominal detector. Still shots of random crystals are predicted on the true detector with
DIALS's stills predictor; their centroids plus 0.05 px of noise are the observations, written as
one index shard (``_refined.expt`` with the nominal detector and the true crystals,
``_indexed.refl``, ``_shots.tsv``). Metrology then runs the pipeline's code path
(:func:`refine_detector`: dials.combine_experiments + dials.refine) from the nominal detector.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from xfel_spread.dials import residual_maps
from xfel_spread.dials.metrology import (
    MetrologyInputError,
    MetrologyOutputs,
    RefinementPlan,
    detector_parameterisation_arguments,
    read_saved_detector,
    refine_detector,
    shard_lattices,
    write_detector,
    write_metrology_outputs,
)
from xfel_spread.dials.stills import ShotOutcome
from xfel_spread.io.stills import output_paths, write_shots_table

PIXEL_MM, PANEL_PX, GAP_MM, DISTANCE_MM, WAVELENGTH_A = 0.1, 256, 2.0, 80.0, 1.0
#: Panel misplacements of the true detector: (fast, slow) shift in px and in-plane rotation in deg.
TRUE_SHIFTS_PX = np.array([[0.6, -0.3], [-0.8, 0.5], [0.2, 0.9], [-0.4, -0.7]])
TRUE_ROTATIONS_DEG = np.array([0.15, -0.1, -0.2, 0.12])
CELL_A, CELL_C = 60.0, 80.0  # tetragonal P4: 3 orientation + 2 cell parameters per lattice
D_MIN_A, MAX_DELPSI_RAD, NOISE_PX = 1.5, 0.004, 0.05
N_LATTICES = 30
#: dials.refine settings of the tests: the shipped metrology.phil, with the in-plane panel rotation
#: (Tau1) free; beam fixed, panel tilts fixed.
TEST_PHIL = """
refinement {
  parameterisation {
    auto_reduction { min_nref_per_parameter = 3
                     action = remove }
    beam.fix = all
    detector.fix_list = Tau2,Tau3
  }
  reflections.outlier.algorithm = null
}
"""


def nominal_detector():
    """Four 256 x 256 px panels of 0.1 mm, 2 mm apart, hanging from one root group 80 mm from the sample."""
    from dxtbx.model import Detector

    detector = Detector()
    root = detector.hierarchy()
    root.set_name("root")
    root.set_frame((1, 0, 0), (0, -1, 0), (0, 0, -DISTANCE_MM))
    width = PANEL_PX * PIXEL_MM
    for row in range(2):
        for column in range(2):
            panel = root.add_panel()
            panel.set_name(f"panel_{row}{column}")
            panel.set_image_size((PANEL_PX, PANEL_PX))
            panel.set_pixel_size((PIXEL_MM, PIXEL_MM))
            panel.set_trusted_range((-1, 1e6))
            corner = (-width - GAP_MM / 2 + column * (width + GAP_MM), -width - GAP_MM / 2 + row * (width + GAP_MM))
            panel.set_local_frame((1, 0, 0), (0, 1, 0), (*corner, 0))
    return detector


def misplaced_detector(shifts_px, rotations_deg):
    """The nominal detector with each panel shifted (fast, slow px) and rotated about its centre (deg)."""
    from scitbx import matrix

    detector = nominal_detector()
    half_mm = PANEL_PX * PIXEL_MM / 2
    for panel, (shift_fast, shift_slow), angle in zip(detector, shifts_px, rotations_deg):
        fast, slow = matrix.col(panel.get_local_fast_axis()), matrix.col(panel.get_local_slow_axis())
        origin = matrix.col(panel.get_local_origin())
        rotation = fast.cross(slow).axis_and_angle_as_r3_rotation_matrix(angle, deg=True)
        centre = origin + (fast + slow) * half_mm + (fast * shift_fast + slow * shift_slow) * PIXEL_MM
        panel.set_local_frame(rotation * fast, rotation * slow, centre - rotation * (fast + slow) * half_mm)
    return detector


def random_crystal(rng):
    from dxtbx.model import Crystal
    from scitbx import matrix
    from scitbx.math import r3_rotation_axis_and_angle_as_matrix

    axis = rng.normal(size=3)
    rotation = matrix.sqr(r3_rotation_axis_and_angle_as_matrix(tuple(axis / np.linalg.norm(axis)),
                                                               rng.uniform(0, 2 * math.pi)))
    return Crystal(rotation * matrix.col((CELL_A, 0, 0)), rotation * matrix.col((0, CELL_A, 0)),
                   rotation * matrix.col((0, 0, CELL_C)), space_group_symbol="P4")


def observed_spots(experiment, true_detector, rng):
    """The reflections of one still on ``true_detector`` near the Ewald sphere, centroids plus noise."""
    from dials.algorithms.spot_prediction.reflection_predictor import ReflectionPredictor
    from dials.array_family import flex
    from dxtbx.model import Experiment

    truth = Experiment(beam=experiment.beam, detector=true_detector, crystal=experiment.crystal)
    reflections = ReflectionPredictor(truth, dmin=D_MIN_A)()
    reflections = reflections.select(flex.abs(reflections["delpsical.rad"]) < MAX_DELPSI_RAD)
    x_px, y_px, _ = reflections["xyzcal.px"].parts()
    x_px += flex.double(rng.normal(0, NOISE_PX, len(reflections)))
    y_px += flex.double(rng.normal(0, NOISE_PX, len(reflections)))
    zeros = flex.double(len(reflections), 0.0)
    variance_px = flex.double(len(reflections), NOISE_PX ** 2)
    reflections["xyzobs.px.value"] = flex.vec3_double(x_px, y_px, zeros)
    reflections["xyzobs.px.variance"] = flex.vec3_double(variance_px, variance_px, zeros)
    reflections["xyzobs.mm.value"] = flex.vec3_double(x_px * PIXEL_MM, y_px * PIXEL_MM, zeros)
    variance_mm = variance_px * PIXEL_MM ** 2
    reflections["xyzobs.mm.variance"] = flex.vec3_double(variance_mm, variance_mm, zeros)
    reflections.set_flags(flex.bool(len(reflections), True), reflections.flags.indexed)
    return reflections


def simulate_shard(prefix, true_detector, n_lattices: int, seed: int):
    """One index shard of ``n_lattices`` stills seen by ``true_detector``, its experiments on the nominal one."""
    from dials.array_family import flex
    from dxtbx.model import BeamFactory, Experiment
    from dxtbx.model.experiment_list import ExperimentList

    rng = np.random.default_rng(seed)
    beam, detector = BeamFactory.simple(WAVELENGTH_A), nominal_detector()
    experiments, reflections = ExperimentList(), flex.reflection_table()
    for index in range(n_lattices):
        experiment = Experiment(beam=beam, detector=detector, crystal=random_crystal(rng))
        spots = observed_spots(experiment, true_detector, rng)
        spots["id"] = flex.int(len(spots), index)
        experiments.append(experiment)
        reflections.extend(spots)
    paths = output_paths(prefix)
    experiments.as_file(str(paths["refined_experiments"]))
    reflections.as_file(str(paths["indexed_reflections"]))
    write_shots_table([ShotOutcome(shot=image, image=image, status="integrate_ok") for image in range(n_lattices)],
                      paths["shots"])
    return shard_lattices(paths["refined_experiments"], paths["indexed_reflections"], paths["shots"])


def panel_misplacements(detector, reference):
    """Per panel of ``detector``: its centre's offset from ``reference``'s (fast, slow px) and its in-plane
    rotation (deg), both in the reference panel's frame."""
    shifts, rotations = [], []
    for panel, reference_panel in zip(detector, reference):
        fast, slow = np.array(reference_panel.get_fast_axis()), np.array(reference_panel.get_slow_axis())
        offset = np.array(_centre(panel)) - np.array(_centre(reference_panel))
        shifts.append([offset @ fast / PIXEL_MM, offset @ slow / PIXEL_MM])
        moved_fast = np.array(panel.get_fast_axis())
        rotations.append(math.degrees(math.atan2(moved_fast @ slow, moved_fast @ fast)))
    return np.array(shifts), np.array(rotations)


def _centre(panel):
    return panel.get_pixel_lab_coord((PANEL_PX / 2, PANEL_PX / 2))


@pytest.fixture(scope="module")
def run_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrology")
    (directory / "metrology.phil").write_text(TEST_PHIL)
    return directory


@pytest.fixture(scope="module")
def true_detector():
    return misplaced_detector(TRUE_SHIFTS_PX, TRUE_ROTATIONS_DEG)


@pytest.fixture(scope="module")
def shard(run_directory, true_detector):
    return simulate_shard(run_directory / "shard_00000", true_detector, N_LATTICES, seed=1)


def run_metrology(run_directory, shards, name, hierarchy_level=0, saved_detector=None):
    started = time.perf_counter()
    with open(run_directory / f"{name}.log", "w") as log_stream:
        result = refine_detector(name, shards, run_directory / "metrology.phil", "LevMar", 1000,
                                 run_directory / f"{name}_work", log_stream, hierarchy_level, saved_detector)
    print(f"{name}: {time.perf_counter() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def level_1(run_directory, shard):
    return run_metrology(run_directory, [shard], "level_1", hierarchy_level=1)


@pytest.mark.slow  # dials.refine at hierarchy level 1 (the level_1 fixture): about a minute
def test_level_1_recovers_every_panel_shift_and_rotation(level_1, true_detector):
    refined_shifts, refined_rotations = panel_misplacements(level_1.refined_detector, nominal_detector())
    errors_px = refined_shifts - TRUE_SHIFTS_PX
    print("recovered shifts (px):", refined_shifts.round(4).tolist(), "errors:", errors_px.round(4).tolist())
    print("recovered rotations (deg):", refined_rotations.round(4).tolist(),
          "errors:", (refined_rotations - TRUE_ROTATIONS_DEG).round(4).tolist())
    assert np.abs(errors_px).max() < 0.05
    assert np.abs(refined_rotations - TRUE_ROTATIONS_DEG).max() < 0.01
    # The refined detector is the true one, panel by panel, to a few hundredths of a pixel everywhere.
    residual_shifts, _ = panel_misplacements(level_1.refined_detector, true_detector)
    assert np.abs(residual_shifts).max() < 0.05


@pytest.mark.slow  # dials.refine at hierarchy level 1 (the level_1 fixture): about a minute
def test_level_1_residuals_fall_to_the_noise(level_1):
    names = [panel.get_name() for panel in level_1.refined_detector]
    before = residual_maps.residual_statistics(level_1.residuals_before, names)
    after = residual_maps.residual_statistics(level_1.residuals_after, names)
    print("RMSD before/after (px):", [round(row["rmsd_px"], 4) for row in before],
          [round(row["rmsd_px"], 4) for row in after])
    # Before, each panel is off by its own shift: a panel moved by +s px sees its spots at -s px from
    # where the nominal panel predicts them (the rotations about the centres average out).
    for row, shift in zip(before[:4], TRUE_SHIFTS_PX):
        assert row["mean_dx_px"] == pytest.approx(-shift[0], abs=0.1)
        assert row["mean_dy_px"] == pytest.approx(-shift[1], abs=0.1)
    # After, what is left is the centroid noise (0.05 px per coordinate, so 0.07 px in 2D).
    assert before[-1]["rmsd_px"] > 0.5
    assert after[-1]["rmsd_px"] < 1.5 * NOISE_PX * math.sqrt(2)
    assert all(abs(row["mean_dx_px"]) < 0.02 and abs(row["mean_dy_px"]) < 0.02 for row in after)


@pytest.mark.slow  # dials.refine at hierarchy level 1 (the level_1 fixture): about a minute
def test_level_0_cannot_follow_independent_panels(run_directory, shard, level_1):
    level_0 = run_metrology(run_directory, [shard], "level_0", hierarchy_level=0)
    names = [panel.get_name() for panel in level_0.refined_detector]
    after_0 = residual_maps.residual_statistics(level_0.residuals_after, names)[-1]["rmsd_px"]
    after_1 = residual_maps.residual_statistics(level_1.residuals_after, names)[-1]["rmsd_px"]
    print(f"RMSD after level 0: {after_0:.4f} px, after level 1: {after_1:.4f} px")
    assert after_0 > 4 * after_1
    # The panels moved as one block: the distances between their centres are the nominal ones.
    assert centre_distances_mm(level_0.refined_detector) == pytest.approx(centre_distances_mm(nominal_detector()),
                                                                         abs=1e-6)
    assert centre_distances_mm(level_1.refined_detector) != pytest.approx(centre_distances_mm(nominal_detector()),
                                                                         abs=1e-3)


def centre_distances_mm(detector) -> list[float]:
    centres = [np.array(_centre(panel)) for panel in detector]
    return [float(np.linalg.norm(a - b)) for i, a in enumerate(centres) for b in centres[i + 1:]]


@pytest.mark.slow  # dials.refine at hierarchy level 1 (the level_1 fixture): about a minute
def test_saved_detector_applied_to_another_run_gives_the_same_geometry(run_directory, true_detector, level_1):
    saved = run_directory / "refined_detector.expt"
    write_detector(level_1.refined_detector, saved)
    other_run = run_directory / "other_run"
    other_run.mkdir()
    other_shard = simulate_shard(other_run / "shard_00000", true_detector, 12, seed=2)

    applied = run_metrology(run_directory, [other_shard], "applied", saved_detector=saved)

    assert applied.method == f"saved detector {saved} applied"
    for panel, saved_panel in zip(applied.refined_detector, read_saved_detector(saved)):
        assert panel.get_origin() == pytest.approx(saved_panel.get_origin(), abs=1e-9)
        assert panel.get_fast_axis() == pytest.approx(saved_panel.get_fast_axis(), abs=1e-12)
        assert panel.get_slow_axis() == pytest.approx(saved_panel.get_slow_axis(), abs=1e-12)
    # The saved detector fits the other run's spots as well as the run it was refined on.
    names = [panel.get_name() for panel in applied.refined_detector]
    statistics = residual_maps.residual_statistics(applied.residuals_after, names)
    assert statistics[-1]["rmsd_px"] < 1.5 * NOISE_PX * math.sqrt(2)


@pytest.mark.slow  # dials.refine at hierarchy level 1 (the level_1 fixture): about a minute
def test_stills_process_puts_the_saved_detector_on_every_image(run_directory, level_1):
    """The reindex stage's use of refined_detector.expt, done as stills_process does it."""
    from dials.command_line.stills_process import sync_geometry
    from dxtbx.model.experiment_list import ExperimentListFactory

    saved = run_directory / "refined_detector_for_stills.expt"
    write_detector(level_1.refined_detector, saved)
    (reference,) = ExperimentListFactory.from_json_file(str(saved), check_format=False).detectors()
    image_detector = nominal_detector()  # what a shot's file says
    sync_geometry(reference.hierarchy(), image_detector.hierarchy())

    for panel, refined_panel in zip(image_detector, level_1.refined_detector):
        assert panel.get_origin() == pytest.approx(refined_panel.get_origin(), abs=1e-9)
        assert panel.get_fast_axis() == pytest.approx(refined_panel.get_fast_axis(), abs=1e-12)


@pytest.mark.slow  # dials.refine at hierarchy level 1 (the level_1 fixture): about a minute
def test_metrology_outputs_include_residual_maps_and_table(tmp_path, level_1):
    outputs = MetrologyOutputs(*(tmp_path / name for name in (
        "report.txt", "summary.json", "refined_detector.expt", "residuals.tsv", "residuals_before.png",
        "residuals_after.png")))
    write_metrology_outputs("multipanel", level_1, RefinementPlan("LevMar", 1000), outputs)

    for plot in (outputs.residuals_before_plot, outputs.residuals_after_plot):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split("\t") for line in outputs.residuals_table.read_text().splitlines()]
    assert rows[0] == list(residual_maps.STATISTICS_COLUMNS)
    assert [row[:2] for row in rows[1:]] == [[stage, panel] for stage in ("before", "after")
                                             for panel in ("0", "1", "2", "3", "all")]
    assert "refined at hierarchy level 1" in outputs.report.read_text()
    assert len(read_saved_detector(outputs.refined_detector)) == 4


# --- bad input ------------------------------------------------------------------------------------------


def test_level_1_on_a_single_panel_detector_is_refused():
    with pytest.raises(MetrologyInputError, match=r"^shard_refined.expt: metrology.hierarchy_level 1 refines each "
                                                  r"panel separately, but this detector has a single panel; "
                                                  r"use hierarchy_level 0$"):
        detector_parameterisation_arguments(1, 1, "shard_refined.expt")
    assert detector_parameterisation_arguments(0, 1, "x") == [
        "refinement.parameterisation.detector.panels=single",
        "refinement.parameterisation.detector.hierarchy_level=0"]
    assert detector_parameterisation_arguments(1, 4, "x") == [
        "refinement.parameterisation.detector.panels=hierarchical",
        "refinement.parameterisation.detector.hierarchy_level=1"]
    with pytest.raises(MetrologyInputError, match=r"metrology.hierarchy_level: 2 is not one of \(0, 1\)"):
        detector_parameterisation_arguments(2, 4, "x")


def test_saved_detector_errors_name_the_file(tmp_path, shard, run_directory):
    with pytest.raises(MetrologyInputError, match=r"^metrology.reference_geometry: .*missing.expt: no such file$"):
        read_saved_detector(tmp_path / "missing.expt")
    garbage = tmp_path / "garbage.expt"
    garbage.write_text("not json")
    with pytest.raises(MetrologyInputError, match=r"garbage.expt: not a DIALS experiment list") as error:
        read_saved_detector(garbage)
    assert "\n" not in str(error.value)

    from dxtbx.model import Detector
    single = Detector()
    single.add_panel().set_image_size((PANEL_PX, PANEL_PX))
    saved = tmp_path / "single_panel.expt"
    write_detector(single, saved)
    with pytest.raises(MetrologyInputError, match=r"single_panel.expt: the saved detector \(1 panels\) does not have "
                                                  r"the hierarchy of this dataset's detector \(4 panels\)"):
        run_metrology(run_directory, [shard], "mismatch", saved_detector=saved)


# --- residual maps ----------------------------------------------------------------------------------------


def test_binned_means_and_statistics_of_known_residuals():
    # Panel 0: two spots in the top-left bin, one in the bottom-right; panel 1: one spot.
    residuals = residual_maps.PositionalResiduals(
        panel=np.array([0, 0, 0, 1]), x=np.array([1.0, 2.0, 99.0, 50.0]), y=np.array([1.0, 3.0, 99.5, 50.0]),
        dx=np.array([0.2, 0.4, -1.0, 0.5]), dy=np.array([0.0, -0.2, 2.0, 0.1]))

    mean_dx, mean_dy = residual_maps.binned_residual_means(residuals, 0, (100, 100), bins=4)
    assert mean_dx[0, 0] == pytest.approx(0.3) and mean_dy[0, 0] == pytest.approx(-0.1)
    assert mean_dx[3, 3] == pytest.approx(-1.0) and mean_dy[3, 3] == pytest.approx(2.0)
    assert np.isnan(mean_dx).sum() == 14

    rows = residual_maps.residual_statistics(residuals, ["a", "b"])
    assert [row["panel"] for row in rows] == ["0", "1", "all"]
    assert rows[0]["n_reflections"] == 3
    assert rows[0]["mean_dx_px"] == pytest.approx(-0.4 / 3)
    assert rows[0]["rmsd_x_px"] == pytest.approx(math.sqrt((0.04 + 0.16 + 1.0) / 3))
    assert rows[1]["rmsd_px"] == pytest.approx(math.hypot(0.5, 0.1))
    assert rows[2]["n_reflections"] == 4
