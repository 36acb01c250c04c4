"""Score the DIALS stages against the simulation's ground truth.

For one dataset and one pass (index or reindex): the fraction of shots indexed and integrated, the
misorientation of each integrated lattice to the true crystal (up to the space group's rotations, the
indexing ambiguity of C2), the cell error, integrated reflections per shot, and the detector's beam
centre against the true one. Real data has no truth, so this is a separate step the pipeline runs
only on simulated data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xfel_spread.dials.metrology import INDEXED_OUTCOMES
from xfel_spread.dials.stills import INTEGRATED
from xfel_spread.io.stills import output_paths, read_shots_table
from xfel_spread.errors import UserInputError
from xfel_spread.io.tables import format_cell, write_table
from xfel_spread.sim.crystal import rotation_angle_deg

#: Columns of the score table, in order.
SCORE_COLUMNS = (
    "pass", "shots", "indexed_fraction", "integrated_fraction",
    "misorientation_median_deg", "misorientation_p95_deg",
    "cell_error_a_median_a", "cell_error_b_median_a", "cell_error_c_median_a", "cell_error_beta_median_deg",
    "integrated_reflections_per_shot_median", "integrated_reflections_per_shot_mean",
    "beam_centre_error_fast_px", "beam_centre_error_slow_px",
)


class ScoreInputError(UserInputError, ValueError):
    """Indexing outputs and truth files that do not belong together; the message names the file."""


def point_group_rotations(space_group_symbol: str) -> list[np.ndarray]:
    """Rotation parts (on fractional coordinates) of a space group's operations, without repeats."""
    from cctbx import sgtbx

    rotations = []
    for operation in sgtbx.space_group_info(space_group_symbol).group().all_ops():
        rotation = np.array(operation.r().as_double()).reshape(3, 3)
        if not any(np.array_equal(rotation, seen) for seen in rotations):
            rotations.append(rotation)
    return rotations


def best_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation Q minimising |source Q^T - target| over rows (Kabsch); rows are vectors."""
    u, _, vt = np.linalg.svd(source.T @ target)
    correction = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    return vt.T @ correction @ u.T


def misorientation_deg(estimated: np.ndarray, true: np.ndarray, rotations: Sequence[np.ndarray]) -> float:
    """Smallest rotation angle taking the true crystal onto the estimated one.

    ``estimated`` and ``true`` are real-space matrices (rows a, b, c, in the lab frame). Each symmetry
    rotation R gives an equally valid description R^T true of the true crystal (an indexing program
    may return any of them), so the smallest angle over all of them is the misorientation.
    """
    angles = []
    for rotation in rotations:
        equivalent = rotation.T @ np.asarray(true)
        angles.append(rotation_angle_deg(best_rotation(equivalent, np.asarray(estimated))))
    return min(angles)


@dataclass
class LatticeScore:
    shot: int
    misorientation_deg: float
    cell_error: np.ndarray  # a, b, c (A) and beta (deg): estimated minus true


def score_lattices(integrated_experiments: Path, truth_shots: Sequence[dict], first_shot: int,
                   rotations) -> list[LatticeScore]:
    """Score every integrated lattice of one shard against the shard's truth records."""
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(integrated_experiments), check_format=False)
    scores = []
    for experiment in experiments:
        image = experiment.imageset.indices()[0]
        truth = truth_shots[image]
        if truth["shot_index"] != first_shot + image:
            raise ScoreInputError(f"{integrated_experiments}: image {image} is shot {first_shot + image}, "
                             f"but its truth record is shot {truth['shot_index']}")
        crystal = experiment.crystal
        estimated = np.array([crystal.get_real_space_vectors()[i] for i in range(3)])
        cell = np.array(crystal.get_unit_cell().parameters())
        true_cell = np.array(truth["unit_cell"])
        scores.append(LatticeScore(
            shot=first_shot + image,
            misorientation_deg=misorientation_deg(estimated, np.array(truth["real_space_a_b_c"]), rotations),
            cell_error=(cell - true_cell)[[0, 1, 2, 4]],
        ))
    return scores


def beam_centre_error_px(metrology_summary: dict, truth_shot: dict, refined: bool) -> np.ndarray:
    """Beam centre used by a pass minus the true one, in px (fast, slow), for the first panel.

    ``refined`` picks the geometry after metrology (the reindex pass) or before (the index pass).
    """
    panel = metrology_summary["after" if refined else "before"]["panels"][0]
    pixel_size = np.array(panel["pixel_size_mm"])
    return (np.array(panel["beam_centre_mm"]) - np.array(truth_shot["true_beam_center_mm"])) / pixel_size


def score_pass(name: str, shard_prefixes: Sequence, truth_paths: Sequence, metrology_summary: dict,
               refined: bool, space_group_symbol: str = "C 1 2 1") -> tuple[dict, list[LatticeScore]]:
    """One row of the score table for a pass over all shards of a dataset, and its lattices' scores."""
    rotations = point_group_rotations(space_group_symbol)
    statuses, integrated_counts, lattices, first_truth = [], [], [], None
    for prefix, truth_path in zip(shard_prefixes, truth_paths):
        paths = output_paths(prefix)
        rows = read_shots_table(paths["shots"])
        truth_shots = json.loads(Path(truth_path).read_text())["shots"]
        first_truth = first_truth or truth_shots[0]
        statuses += [row["status"] for row in rows]
        integrated_counts += [row["n_integrated"] for row in rows if row["status"] == INTEGRATED]
        if any(row["status"] == INTEGRATED for row in rows):
            lattices += score_lattices(paths["integrated_experiments"], truth_shots, rows[0]["shot"], rotations)

    n_shots = len(statuses)
    misorientations = np.array([lattice.misorientation_deg for lattice in lattices])
    cell_errors = np.abs(np.array([lattice.cell_error for lattice in lattices])).reshape(-1, 4)
    centre_error = beam_centre_error_px(metrology_summary, first_truth, refined)
    row = {
        "pass": name,
        "shots": n_shots,
        "indexed_fraction": sum(status in INDEXED_OUTCOMES for status in statuses) / n_shots,
        "integrated_fraction": sum(status == INTEGRATED for status in statuses) / n_shots,
        "misorientation_median_deg": _statistic(np.median, misorientations),
        "misorientation_p95_deg": _statistic(lambda values: np.percentile(values, 95), misorientations),
        "cell_error_a_median_a": _statistic(np.median, cell_errors[:, 0]),
        "cell_error_b_median_a": _statistic(np.median, cell_errors[:, 1]),
        "cell_error_c_median_a": _statistic(np.median, cell_errors[:, 2]),
        "cell_error_beta_median_deg": _statistic(np.median, cell_errors[:, 3]),
        "integrated_reflections_per_shot_median": _statistic(np.median, np.array(integrated_counts)),
        "integrated_reflections_per_shot_mean": _statistic(np.mean, np.array(integrated_counts)),
        "beam_centre_error_fast_px": float(centre_error[0]),
        "beam_centre_error_slow_px": float(centre_error[1]),
    }
    return row, lattices


def _statistic(function, values: np.ndarray) -> float:
    return float(function(values)) if len(values) else float("nan")


def format_score_table(dataset: str, rows: Sequence[dict]) -> str:
    """The score rows as an aligned text table (one column per pass)."""
    lines = [f"DIALS stages scored against the simulation's truth, dataset {dataset}"]
    lines.append(f"{'':40s}" + "".join(f"{row['pass']:>14s}" for row in rows))
    for column in SCORE_COLUMNS[1:]:
        cells = "".join(_cell(row[column]) for row in rows)
        lines.append(f"{column:40s}{cells}")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, int):
        return f"{value:>14d}"
    return f"{value:>14.4f}"


def write_score_table(rows: Sequence[dict], path) -> None:
    """The score rows as TSV (one row per pass), atomically; an undefined value (NaN) is the empty cell."""
    write_table(path, SCORE_COLUMNS, ([format_cell(row[key]) if isinstance(row[key], float) else row[key]
                                       for key in SCORE_COLUMNS] for row in rows))
