"""The per-shot refinement of one dataset scored against the simulation's truth.

For every lattice of the stage-1 shots tables: the misorientation to the true crystal of DIALS's
crystal (the reindex pass, the refinement's start) and of the refined one (up to the rotations of
C 1 2 1, the indexing ambiguity of C2: :func:`xfel_spread.dials.scoring.misorientation_deg`), their
cell errors, the refined N against the truth's ``ncells_abc``, G against the truth's
``domains_per_crystal`` up to one overall scale, and the centroid RMSDs before and after.

The radial RMSD goal is judged on the strong spots, the reflections DIALS's spot finder found: their
observed centroids measure the spots, as those of DIALS's own refinement RMSD do. Over every ROI the
weak spots' integration centroids, mostly background noise, dominate; that RMSD is reported too.

The truth's crystal is a set of mosaic domains turned about its matrix ``real_space_a_b_c`` by
random small rotations (``mosaic_rotations``); with 25 domains of 0.05 degrees their mean orientation
sits about 0.01 degrees from that matrix, which is the precision of a good refinement. Both
references are scored: the truth's matrix (the goal's) and its domains' mean orientation (the
rotation nearest to the mean of the domain rotations, applied to the matrix). The goals are judged
against the domains' mean (the orientation their spots encode); the matrix's figure is information.
A refined mosaic spread ``eta_deg`` (an RMS angle) is compared with the RMS angle of the shot's own
domains about their mean orientation (``eta_true_deg``); a run that does not refine eta writes 0 for
every lattice (a model without spread), and the summary says so.

The goals (of the stage-1 issue; each line of the text summary says met or NOT met): the median
Z-score sigma at most 1.2, the median strong-spot radial RMSD at most 0.3 px, at least 97 % of the
lattices closer than DIALS to the domains' mean orientation with a median misorientation to it of at
most 0.004 deg, the median of each of N_a, N_b, N_c within 10 % of the truth and the median eta within
0.01 deg of the median true RMS angle.

A lattice that did not converge keeps its start crystal in ``_refined.expt``, so its refined
misorientation equals DIALS's: it counts as not improved. RMSD and parameter figures are taken over
the converged lattices only.

G is relative (see ``stage1.model``): merged intensities carry an arbitrary overall scale c. The
scale is fitted as c = median(G_true / G) over the converged lattices; ``G_scaled`` = c G is
comparable with the truth shot by shot, and the robust spread of ln G (1.4826 x the median absolute
deviation) says how far G varies between shots where the truth has one value for all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations
from xfel_spread.io.refined_shots import read_refined_shots
from xfel_spread.io.tables import format_cell, write_table
from xfel_spread.sim import crystal as xtal
from xfel_spread.stage1.io import Stage1FileError, output_paths

#: Goals (medians over the converged lattices unless said): strong-spot radial RMSD after refinement;
#: fraction of all lattices closer than DIALS to the domains' mean orientation, and the median
#: misorientation to it; Z-score sigma; relative error of each N; eta against the domains' RMS angle.
RADIAL_RMSD_GOAL_PX = 0.3
IMPROVED_FRACTION_GOAL = 0.97
DOMAIN_MEAN_MISORIENTATION_GOAL_DEG = 0.004
ZSCORE_SIGMA_GOAL = 1.2
NCELLS_RELATIVE_GOAL = 0.10
ETA_GOAL_DEG = 0.01
#: The space group whose rotations make the indexing ambiguity.
SPACE_GROUP = "C 1 2 1"

#: Columns of the per-lattice score table.
SCORE_COLUMNS = (
    "shot", "image", "identifier", "converged",
    "misorientation_dials_deg", "misorientation_refined_deg",
    "misorientation_dials_domain_mean_deg", "misorientation_refined_domain_mean_deg",
    "a_error_dials_a", "b_error_dials_a", "c_error_dials_a", "beta_error_dials_deg",
    "a_error_refined_a", "b_error_refined_a", "c_error_refined_a", "beta_error_refined_deg",
    "Na", "Nb", "Nc", "ncells_true", "G", "G_scaled", "G_true",
    "rmsd_radial_before_px", "rmsd_radial_after_px", "rmsd_overall_before_px", "rmsd_overall_after_px",
    "n_rois_strong", "rmsd_radial_strong_before_px", "rmsd_radial_strong_after_px", "rmsd_radial_strong_dials_px",
    "zscore_sigma", "eta_deg", "eta_true_deg",
)
_CELL_PARAMETERS = (0, 1, 2, 4)  # a, b, c, beta of a unit cell's six parameters


def crystals_by_identifier(path: str | os.PathLike) -> dict[str, object]:
    """The crystals of an experiment list, by experiment identifier."""
    from dxtbx.model.experiment_list import ExperimentList

    if not Path(path).is_file():
        raise Stage1FileError(f"{path}: no such file")
    try:
        experiments = ExperimentList.from_file(str(path), check_format=False)
    except Exception as error:  # dxtbx raises many kinds, with multi-line text
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Stage1FileError(f"{path}: cannot read experiments ({text})") from None
    return {experiment.identifier: experiment.crystal for experiment in experiments}


def domain_mean_matrix(truth_shot: dict) -> np.ndarray:
    """The truth's real-space matrix turned by the mean orientation of its mosaic domains.

    The mean orientation is the rotation nearest (polar decomposition) to the average of the
    domains' rotation matrices; without ``mosaic_rotations`` it is the matrix itself.
    """
    return turned_by_mean(truth_shot["real_space_a_b_c"], _domain_rotations(truth_shot))


def turned_by_mean(matrix, rotations) -> np.ndarray:
    """A real-space matrix (rows a, b, c) turned by the mean orientation of rotations (D, 3, 3)."""
    return np.asarray(matrix, dtype=np.float64) @ mean_rotation(rotations).T


def _domain_rotations(truth_shot: dict) -> np.ndarray:
    """The truth's domain rotations (D, 3, 3); the identity alone without ``mosaic_rotations``."""
    return np.asarray(truth_shot.get("mosaic_rotations") or [np.eye(3)], dtype=np.float64)


def mean_rotation(rotations: np.ndarray) -> np.ndarray:
    """The mean orientation of rotations (D, 3, 3): the rotation nearest to their average matrix."""
    return xtal.nearest_rotation(np.asarray(rotations).mean(axis=0))


def domain_rms_angle_deg(truth_shot: dict) -> float:
    """The RMS rotation angle (deg) of the truth's mosaic domains about their mean orientation: the
    spread that a refined eta (an RMS angle) of this shot should find; 0 without ``mosaic_rotations``."""
    rotations = _domain_rotations(truth_shot)
    return xtal.rms_rotation_deg(rotations @ mean_rotation(rotations).T)


def _matrix(crystal) -> np.ndarray:
    return np.array([list(vector) for vector in crystal.get_real_space_vectors()], dtype=np.float64)


def _cell_error(crystal, true_cell) -> np.ndarray:
    cell = np.array(crystal.get_unit_cell().parameters())
    return (cell - np.asarray(true_cell, dtype=np.float64))[list(_CELL_PARAMETERS)]


def score_shard(stage1_prefix, dials_prefix, truth_path, rotations) -> list[dict]:
    """Score rows (without G_scaled) of one shard's lattices, in the shots table's order."""
    from xfel_spread.io.stills import output_paths as dials_output_paths

    paths = output_paths(stage1_prefix)
    rows = read_refined_shots(paths["shots"])
    refined = crystals_by_identifier(paths["experiments"])
    dials = crystals_by_identifier(dials_output_paths(dials_prefix)["integrated_experiments"])
    try:
        truth_shots = json.loads(Path(truth_path).read_text())["shots"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Stage1FileError(f"{truth_path}: cannot read truth ({error})") from None

    scores = []
    for row in rows:
        identifier = row["identifier"]
        for name, crystals, source in (("refined", refined, paths["experiments"]),
                                       ("DIALS", dials, dials_output_paths(dials_prefix)["integrated_experiments"])):
            if identifier not in crystals:
                raise Stage1FileError(f"{source}: no {name} experiment {identifier} (shots table {paths['shots']})")
        image = row["image"]
        if not 0 <= image < len(truth_shots) or truth_shots[image]["shot_index"] != row["shot"]:
            raise Stage1FileError(f"{truth_path}: no truth record for shot {row['shot']} at image {image}")
        truth = truth_shots[image]
        true_matrix = np.array(truth["real_space_a_b_c"], dtype=np.float64)
        mean_matrix = domain_mean_matrix(truth)
        dials_error = _cell_error(dials[identifier], truth["unit_cell"])
        refined_error = _cell_error(refined[identifier], truth["unit_cell"])
        scores.append({
            "shot": row["shot"], "image": image, "identifier": identifier, "converged": row["converged"],
            "misorientation_dials_deg": misorientation_deg(_matrix(dials[identifier]), true_matrix, rotations),
            "misorientation_refined_deg": misorientation_deg(_matrix(refined[identifier]), true_matrix, rotations),
            "misorientation_dials_domain_mean_deg": misorientation_deg(_matrix(dials[identifier]), mean_matrix,
                                                                       rotations),
            "misorientation_refined_domain_mean_deg": misorientation_deg(_matrix(refined[identifier]), mean_matrix,
                                                                         rotations),
            **dict(zip(("a_error_dials_a", "b_error_dials_a", "c_error_dials_a", "beta_error_dials_deg"),
                       dials_error.tolist())),
            **dict(zip(("a_error_refined_a", "b_error_refined_a", "c_error_refined_a", "beta_error_refined_deg"),
                       refined_error.tolist())),
            "Na": row["Na"], "Nb": row["Nb"], "Nc": row["Nc"],
            "ncells_true": float(np.mean(truth["ncells_abc"])),
            "G": row["G"], "G_scaled": None, "G_true": float(truth["domains_per_crystal"]),
            "rmsd_radial_before_px": row["rmsd_radial_before_px"], "rmsd_radial_after_px": row["rmsd_radial_after_px"],
            "rmsd_overall_before_px": row["rmsd_overall_before_px"],
            "rmsd_overall_after_px": row["rmsd_overall_after_px"],
            "n_rois_strong": row["n_rois_strong"],
            "rmsd_radial_strong_before_px": row["rmsd_radial_strong_before_px"],
            "rmsd_radial_strong_after_px": row["rmsd_radial_strong_after_px"],
            "rmsd_radial_strong_dials_px": row["rmsd_radial_strong_dials_px"],
            "zscore_sigma": row["zscore_sigma"],
            "eta_deg": row["eta_deg"], "eta_true_deg": domain_rms_angle_deg(truth),
        })
    return scores


def score_shards(stage1_prefixes: Sequence, dials_prefixes: Sequence, truth_paths: Sequence) -> list[dict]:
    """Score rows of every lattice of the shards, G_scaled filled with the overall scale of all of them."""
    rotations = point_group_rotations(SPACE_GROUP)
    scores = []
    for stage1_prefix, dials_prefix, truth_path in zip(stage1_prefixes, dials_prefixes, truth_paths):
        scores += score_shard(stage1_prefix, dials_prefix, truth_path, rotations)
    scale = overall_g_scale(scores)
    for score in scores:
        if score["G"] is not None and math.isfinite(scale):
            score["G_scaled"] = scale * score["G"]
    return scores


def _converged_values(scores: Sequence[dict], column: str) -> np.ndarray:
    values = [score[column] for score in scores if score["converged"] == 1 and score[column] is not None]
    values = np.array(values, dtype=np.float64)
    return values[np.isfinite(values)]


def overall_g_scale(scores: Sequence[dict]) -> float:
    """c = median(G_true / G) over the converged lattices with a positive G (NaN when none)."""
    ratios = [score["G_true"] / score["G"] for score in scores
              if score["converged"] == 1 and score["G"] is not None and score["G"] > 0]
    return float(np.median(ratios)) if ratios else float("nan")


def _median(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")


def robust_sigma(values) -> float:
    """1.4826 x the median absolute deviation (the standard deviation for normal data)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def summarize(scores: Sequence[dict]) -> dict:
    """Summary figures of the score rows (see the module docstring for which lattices count)."""
    converged = [score for score in scores if score["converged"] == 1]
    dials = np.array([score["misorientation_dials_deg"] for score in scores], dtype=np.float64)
    refined = np.array([score["misorientation_refined_deg"] for score in scores], dtype=np.float64)
    improved = float(np.mean(refined < dials)) if len(scores) else float("nan")
    dials_mean = np.array([score["misorientation_dials_domain_mean_deg"] for score in scores], dtype=np.float64)
    refined_mean = np.array([score["misorientation_refined_domain_mean_deg"] for score in scores], dtype=np.float64)
    g = _converged_values(scores, "G")
    eta = _converged_values(scores, "eta_deg")
    scale = overall_g_scale(scores)
    g_ratio = np.array([score["G_scaled"] / score["G_true"] for score in converged
                        if score["G_scaled"] is not None and score["G_scaled"] > 0])
    summary = {
        "lattices": len(scores),
        "converged": len(converged),
        "rmsd_radial_before_px": _median(_converged_values(scores, "rmsd_radial_before_px")),
        "rmsd_radial_after_px": _median(_converged_values(scores, "rmsd_radial_after_px")),
        "rmsd_overall_before_px": _median(_converged_values(scores, "rmsd_overall_before_px")),
        "rmsd_overall_after_px": _median(_converged_values(scores, "rmsd_overall_after_px")),
        "rmsd_radial_strong_before_px": _median(_converged_values(scores, "rmsd_radial_strong_before_px")),
        "rmsd_radial_strong_after_px": _median(_converged_values(scores, "rmsd_radial_strong_after_px")),
        "rmsd_radial_strong_dials_px": _median(_converged_values(scores, "rmsd_radial_strong_dials_px")),
        "misorientation_dials_median_deg": _median(dials),
        "misorientation_refined_median_deg": _median(refined),
        "improved_fraction": improved,
        "misorientation_dials_domain_mean_median_deg": _median(dials_mean),
        "misorientation_refined_domain_mean_median_deg": _median(refined_mean),
        "improved_fraction_domain_mean": float(np.mean(refined_mean < dials_mean)) if len(scores) else float("nan"),
        "ncells_median": [_median(_converged_values(scores, name)) for name in ("Na", "Nb", "Nc")],
        "ncells_true": _median([score["ncells_true"] for score in scores]),
        "G_median": _median(g),
        "G_true": _median([score["G_true"] for score in scores]),
        "G_scale": scale,
        "G_log_spread": robust_sigma(np.log(g[g > 0])),
        "G_scaled_rms_log_error": float(np.sqrt(np.mean(np.log(g_ratio) ** 2))) if len(g_ratio) else float("nan"),
        "zscore_sigma_median": _median(_converged_values(scores, "zscore_sigma")),
        "eta_median_deg": _median(eta),
        "eta_true_median_deg": _median([score["eta_true_deg"] for score in scores]),
        "eta_refined": bool(np.any(eta > 0)),
    }
    for source in ("dials", "refined"):
        summary[f"cell_error_{source}_median"] = [
            _median(np.abs([score[f"{name}_error_{source}_{unit}"] for score in scores]))
            for name, unit in (("a", "a"), ("b", "a"), ("c", "a"), ("beta", "deg"))]
    summary["radial_goal_met"] = bool(summary["rmsd_radial_strong_after_px"] <= RADIAL_RMSD_GOAL_PX)
    summary["improved_goal_met"] = bool(summary["improved_fraction_domain_mean"] >= IMPROVED_FRACTION_GOAL)
    summary["domain_mean_goal_met"] = bool(summary["misorientation_refined_domain_mean_median_deg"]
                                           <= DOMAIN_MEAN_MISORIENTATION_GOAL_DEG)
    summary["zscore_goal_met"] = bool(summary["zscore_sigma_median"] <= ZSCORE_SIGMA_GOAL)
    summary["ncells_goal_met"] = bool(all(abs(value / summary["ncells_true"] - 1.0) <= NCELLS_RELATIVE_GOAL
                                          for value in summary["ncells_median"]))
    # Without eta refined the model has no spread (eta 0), which meets the goal only on a truth without one.
    summary["eta_goal_met"] = bool(abs(summary["eta_median_deg"] - summary["eta_true_median_deg"]) <= ETA_GOAL_DEG)
    return summary


def format_summary(dataset: str, summary: dict) -> str:
    """The summary as aligned text lines."""
    def goal(met: bool) -> str:
        return "met" if met else "NOT met"

    cell_d, cell_r = summary["cell_error_dials_median"], summary["cell_error_refined_median"]
    lines = [
        f"Stage 1 (per-shot pixel refinement) against the simulation's truth, dataset {dataset}",
        f"lattices {summary['lattices']}, converged {summary['converged']}",
        f"median radial RMSD (px), strong spots          {summary['rmsd_radial_strong_before_px']:8.3f} -> "
        f"{summary['rmsd_radial_strong_after_px']:8.3f}   goal <= {RADIAL_RMSD_GOAL_PX:g}: "
        f"{goal(summary['radial_goal_met'])}; DIALS's own (xyzcal) {summary['rmsd_radial_strong_dials_px']:.3f}",
        f"median radial RMSD (px), every ROI             {summary['rmsd_radial_before_px']:8.3f} -> "
        f"{summary['rmsd_radial_after_px']:8.3f}",
        f"median overall RMSD (px), every ROI            {summary['rmsd_overall_before_px']:8.3f} -> "
        f"{summary['rmsd_overall_after_px']:8.3f}",
        f"median misorientation to the domains' mean orientation (deg), DIALS -> refined "
        f"{summary['misorientation_dials_domain_mean_median_deg']:.4f} -> "
        f"{summary['misorientation_refined_domain_mean_median_deg']:.4f}   goal <= "
        f"{DOMAIN_MEAN_MISORIENTATION_GOAL_DEG:g}: {goal(summary['domain_mean_goal_met'])}",
        f"lattices closer than DIALS to the domains' mean orientation {100 * summary['improved_fraction_domain_mean']:.1f}"
        f" %   goal >= {100 * IMPROVED_FRACTION_GOAL:g} %: {goal(summary['improved_goal_met'])}",
        f"against the truth's crystal matrix (information): median {summary['misorientation_dials_median_deg']:.4f} -> "
        f"{summary['misorientation_refined_median_deg']:.4f} deg, {100 * summary['improved_fraction']:.1f} % below DIALS's",
        _cell_line("DIALS  ", cell_d),
        _cell_line("refined", cell_r),
        "median Na, Nb, Nc (converged) " + ", ".join(f"{value:.1f}" for value in summary["ncells_median"])
        + f"; truth {summary['ncells_true']:g}   goal within {100 * NCELLS_RELATIVE_GOAL:g} %: "
        + goal(summary["ncells_goal_met"]),
        (f"median eta {summary['eta_median_deg']:.4f} deg" if summary["eta_refined"]
         else "eta 0 for every lattice (not refined)")
        + f"; truth (RMS angle of the domains about their mean) {summary['eta_true_median_deg']:.4f} deg   "
        f"goal within {ETA_GOAL_DEG:g} deg: {goal(summary['eta_goal_met'])}",
        f"G: median {summary['G_median']:.4g}, truth {summary['G_true']:.4g}, overall scale c = median(G_true/G) "
        f"{summary['G_scale']:.4g}; robust spread of ln G {summary['G_log_spread']:.3f}, "
        f"rms ln(c G / G_true) {summary['G_scaled_rms_log_error']:.3f}",
        f"median Z-score sigma after refinement {summary['zscore_sigma_median']:.3f}   goal <= {ZSCORE_SIGMA_GOAL:g}: "
        f"{goal(summary['zscore_goal_met'])}",
    ]
    return "\n".join(lines) + "\n"


def _cell_line(name: str, errors) -> str:
    return (f"median |cell error| {name} a {errors[0]:.4f} b {errors[1]:.4f} c {errors[2]:.4f} A, "
            f"beta {errors[3]:.4f} deg")


def write_score_table(scores: Sequence[dict], path: str | os.PathLike) -> None:
    """The per-lattice scores as TSV, atomically."""
    write_table(path, SCORE_COLUMNS, ([_cell(score[column]) for column in SCORE_COLUMNS] for score in scores))


def _cell(value) -> str:
    """A cell of the score table: None, and floats, by :func:`format_cell`; anything else as str."""
    return format_cell(value) if value is None or isinstance(value, float) else str(value)
