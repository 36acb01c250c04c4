"""Detector metrology: refine the detector's position against many indexed lattices.

``dials.combine_experiments`` puts the lattices of many shards onto one shared detector model
(``reference_from_experiment.detector=0``); ``dials.refine`` then refines that detector together with
every lattice's orientation and cell, under the users' phil (``config/metrology.phil``), at the
hierarchy level of config key ``metrology.hierarchy_level``: 0 moves the whole detector as one rigid
block, 1 moves every node directly under the detector's root separately (every panel, on a detector
whose panels hang from its root). Level 1 on a single-panel detector is refused: it would be level 0
under another name, and asking for it means the config expected a different detector.

Alternatively (``metrology.reference_geometry``) a detector saved by an earlier run is applied
instead of refined: the lattices are refitted on it with the detector fixed, which shows how well it
fits this run. The result is written as:

* ``refined_detector.expt``, an experiment list holding only the detector, which the reindex stage
  gives ``dials.stills_process`` as ``input.reference_geometry`` and which other runs can reuse;
* a report with the detector before and after (origin, distance, beam centre in mm and px, per
  panel), the comparison users used to read off ``dials.show``;
* positional residual maps before and after (PNG) and their per-panel statistics (TSV), see
  :mod:`xfel_spread.dials.residual_maps`;
* a JSON summary for the scoring step and the plots.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xfel_spread.atomic import atomic_output
from xfel_spread.dials import residual_maps
from xfel_spread.io.stills import read_shots_table
from xfel_spread.errors import UserInputError

#: Shot outcomes whose lattice was indexed and refined (so it is in the shard's _refined.expt).
INDEXED_OUTCOMES = ("integrate_ok", "integrate_failed")
#: dials.refine engines that build the dense normal matrix of all parameters (7 per C2 lattice:
#: 3 orientation + 4 cell). Its accumulation costs rows x parameters^2, the cube of the lattice count:
#: measured on Debian's DIALS 3.12, one GaussNewton iteration over 199 LY99 lattices (1,396 parameters)
#: took 150 s on one core. Under engine auto they get at most AUTO_DENSE_MAX_LATTICES (minutes per
#: iteration); named explicitly they are refused beyond DENSE_ENGINE_MAX_LATTICES (days per iteration).
DENSE_ENGINES = ("LevMar", "GaussNewton")
AUTO_DENSE_MAX_LATTICES = 300
DENSE_ENGINE_MAX_LATTICES = 2000
#: Values of config key metrology.hierarchy_level: 0 the whole detector, 1 each node under its root.
HIERARCHY_LEVELS = (0, 1)


class MetrologyError(UserInputError, RuntimeError):
    """Metrology could not run; the message says why in one line."""


class MetrologyInputError(MetrologyError, ValueError):
    """A metrology input (setting, saved detector, detector model) is unusable; the message names it."""


def sparse_engine_available() -> bool:
    """Whether this DIALS has the Eigen extension SparseLevMar needs (Debian's DIALS 3.12 does not)."""
    try:
        from scitbx.examples.bevington import non_linear_ls_eigen_wrapper  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RefinementPlan:
    """The dials.refine engine and lattice count metrology will use, and why if they differ from config."""

    engine: str
    max_lattices: int
    note: str = ""


def plan_refinement(engine: str, max_lattices: int) -> RefinementPlan:
    """Resolve config values ``metrology.engine`` and ``max_lattices``; raise MetrologyError if unusable.

    ``auto`` is SparseLevMar where DIALS has it (the LY99 choice, which scales to tens of thousands
    of lattices) and LevMar otherwise (the same refined geometry on small sets, about two times
    slower), with the lattice count capped at AUTO_DENSE_MAX_LATTICES. An engine named explicitly
    is used as named, or refused when it cannot finish.
    """
    if engine == "auto":
        if sparse_engine_available():
            return RefinementPlan("SparseLevMar", max_lattices)
        if max_lattices > AUTO_DENSE_MAX_LATTICES:
            return RefinementPlan("LevMar", AUTO_DENSE_MAX_LATTICES,
                                  f"engine auto: this DIALS has no SparseLevMar, so LevMar refines at most "
                                  f"{AUTO_DENSE_MAX_LATTICES} of the {max_lattices} lattices asked for")
        return RefinementPlan("LevMar", max_lattices)
    if engine == "SparseLevMar" and not sparse_engine_available():
        raise MetrologyError("metrology.engine: SparseLevMar needs DIALS's Eigen extension, which this DIALS "
                             "lacks; use auto or LevMar")
    if engine in DENSE_ENGINES and max_lattices > DENSE_ENGINE_MAX_LATTICES:
        gigabytes = (7 * max_lattices) ** 2 * 8 / 1e9
        raise MetrologyError(
            f"metrology.max_lattices: {max_lattices} lattices with dials.refine's {engine} need a dense "
            f"{gigabytes:.0f} GB normal matrix and days per iteration; set at most {DENSE_ENGINE_MAX_LATTICES} "
            "(or engine auto, which caps it), or use SparseLevMar (a DIALS with Eigen, e.g. conda-forge's)")
    return RefinementPlan(engine, max_lattices)


@dataclass(frozen=True)
class ShardLattices:
    """One shard's indexing output as metrology reads it."""

    refined_experiments: Path
    indexed_reflections: Path
    n_lattices: int


def shard_lattices(refined_experiments, indexed_reflections, shots_table) -> ShardLattices:
    """A shard's metrology inputs, with its lattice count taken from its shots table."""
    n_lattices = sum(row["status"] in INDEXED_OUTCOMES for row in read_shots_table(shots_table))
    return ShardLattices(Path(refined_experiments), Path(indexed_reflections), n_lattices)


def select_shards(shards: Sequence[ShardLattices], max_lattices: int) -> tuple[list[ShardLattices], int]:
    """The shards, in order, that hold the first ``max_lattices`` lattices (skipping empty ones).

    Returns the selected shards and the number of lattices they hold (which may exceed
    ``max_lattices`` by part of the last shard; combine_experiments trims that).
    """
    selected, total = [], 0
    for shard in shards:
        if total >= max_lattices:
            break
        if shard.n_lattices > 0:
            selected.append(shard)
            total += shard.n_lattices
    return selected, total


def dials_command(program: str, arguments: Sequence[str]) -> list[str]:
    """A DIALS program run through this interpreter (so it sees the package's dxtbx Format class)."""
    return [sys.executable, "-m", f"dials.command_line.{program}", *map(str, arguments)]


def run_dials(program: str, arguments: Sequence[str], work_dir: Path, log_stream) -> None:
    """Run a DIALS program in ``work_dir``, its output going to ``log_stream``; raise on failure."""
    log_stream.flush()
    result = subprocess.run(dials_command(program, arguments), cwd=work_dir, stdout=log_stream,
                            stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise MetrologyError(f"dials.{program} failed (exit status {result.returncode}); its output is in the log")


def read_experiments(path):
    """An experiment list read without its images (metrology needs only the models)."""
    from dxtbx.model.experiment_list import ExperimentList

    return ExperimentList.from_file(str(path), check_format=False)


def detector_geometry(experiments) -> dict:
    """Geometry of the first detector in an experiment list, with the beam centre of its first beam."""
    detector, beam = experiments[0].detector, experiments[0].beam
    panels = []
    for panel in detector:
        centre_mm = panel.get_beam_centre(beam.get_s0())
        panels.append({
            "name": panel.get_name(),
            "origin_mm": list(panel.get_origin()),
            "fast_axis": list(panel.get_fast_axis()),
            "slow_axis": list(panel.get_slow_axis()),
            "distance_mm": panel.get_directed_distance(),
            "pixel_size_mm": list(panel.get_pixel_size()),
            "beam_centre_mm": list(centre_mm),
            "beam_centre_px": list(panel.millimeter_to_pixel(centre_mm)),
        })
    return {"n_experiments": len(experiments), "panels": panels}


def detector_parameterisation_arguments(hierarchy_level: int, n_panels: int, source) -> list[str]:
    """dials.refine arguments that move the detector as one block (level 0) or node by node (level 1).

    ``source`` names the experiment list the detector came from, for the error message.
    """
    if hierarchy_level not in HIERARCHY_LEVELS:
        raise MetrologyInputError(f"metrology.hierarchy_level: {hierarchy_level} is not one of {HIERARCHY_LEVELS}")
    if hierarchy_level == 1 and n_panels == 1:
        raise MetrologyInputError(f"{source}: metrology.hierarchy_level 1 refines each panel separately, but this "
                                  "detector has a single panel; use hierarchy_level 0")
    # dials.refine's single-panel parameterisation is the level-0 one for a single panel; any other
    # detector is refined through its hierarchy (level 0: the root group as one rigid block).
    panels = "single" if n_panels == 1 else "hierarchical"
    return [f"refinement.parameterisation.detector.panels={panels}",
            f"refinement.parameterisation.detector.hierarchy_level={hierarchy_level}"]


def read_saved_detector(path):
    """The one detector model of a saved detector file (an experiment list, e.g. refined_detector.expt)."""
    from dxtbx.model.experiment_list import ExperimentList

    path = Path(path)
    if not path.is_file():
        raise MetrologyInputError(f"metrology.reference_geometry: {path}: no such file")
    try:
        experiments = ExperimentList.from_file(str(path), check_format=False)
    except Exception as error:  # dxtbx raises anything from JSON errors to RuntimeError
        reason = " ".join(str(error).split()) or type(error).__name__
        raise MetrologyInputError(f"{path}: not a DIALS experiment list ({reason})") from error
    detectors = experiments.detectors()
    if len(detectors) != 1:
        raise MetrologyInputError(f"{path}: holds {len(detectors)} detector models; a saved detector holds one")
    return detectors[0]


def apply_saved_detector(saved, detector, source) -> None:
    """Set ``detector``'s hierarchy, node by node, to the local frames of ``saved`` (in place).

    This is what stills_process does with ``input.reference_geometry``: the models keep their own
    panels (names, pixel sizes, masks), and only the geometry is taken from the saved detector, which
    must therefore have the same hierarchy.
    """
    if _hierarchy_shape(saved.hierarchy()) != _hierarchy_shape(detector.hierarchy()):
        raise MetrologyInputError(f"{source}: the saved detector ({len(saved)} panels) does not have the hierarchy "
                                  f"of this dataset's detector ({len(detector)} panels)")
    _copy_local_frames(saved.hierarchy(), detector.hierarchy())


def _hierarchy_shape(node):
    return None if node.is_panel() else tuple(_hierarchy_shape(child) for child in node)


def _copy_local_frames(source, destination) -> None:
    destination.set_local_frame(source.get_local_fast_axis(), source.get_local_slow_axis(),
                                source.get_local_origin())
    if not source.is_panel():
        for source_child, destination_child in zip(source, destination):
            _copy_local_frames(source_child, destination_child)


def write_detector(detector, path) -> None:
    """Save ``detector`` as an experiment list holding only it (stills_process's reference_geometry), atomically."""
    from dxtbx.model import Experiment
    from dxtbx.model.experiment_list import ExperimentList

    with atomic_output(path, "w") as stream:
        json.dump(ExperimentList([Experiment(detector=detector)]).to_dict(), stream, indent=1)


def geometry_shift(before: dict, after: dict) -> list[dict]:
    """Per panel: beam-centre shift (px, mm) and distance change (mm) from ``before`` to ``after``."""
    shifts = []
    for old, new in zip(before["panels"], after["panels"]):
        shifts.append({
            "name": new["name"],
            "beam_centre_shift_px": [b - a for a, b in zip(old["beam_centre_px"], new["beam_centre_px"])],
            "beam_centre_shift_mm": [b - a for a, b in zip(old["beam_centre_mm"], new["beam_centre_mm"])],
            "distance_change_mm": new["distance_mm"] - old["distance_mm"],
        })
    return shifts


def format_report(dataset: str, n_lattices: int, engine: str, before: dict, after: dict, note: str = "",
                  method: str = "refined at hierarchy level 0", rmsd_px: tuple[float, float] | None = None) -> str:
    """The human-readable before/after comparison; ``rmsd_px`` is the positional RMSD (before, after)."""
    lines = [f"Detector metrology ({method}), dataset {dataset}",
             f"lattices refined: {n_lattices} (refinery.engine={engine})", *([note] if note else [])]
    if rmsd_px is not None:
        lines.append(f"positional RMSD (observed - predicted): {rmsd_px[0]:.4f} px before, {rmsd_px[1]:.4f} px after")
    lines.append("")
    for old, new, shift in zip(before["panels"], after["panels"], geometry_shift(before, after)):
        lines += [
            f"panel {new['name'] or '(unnamed)'}",
            f"  {'':24s}{'before':>34s}{'after':>34s}",
            f"  {'origin (mm)':24s}{_triple(old['origin_mm']):>34s}{_triple(new['origin_mm']):>34s}",
            f"  {'distance (mm)':24s}{old['distance_mm']:>34.4f}{new['distance_mm']:>34.4f}",
            f"  {'beam centre (mm)':24s}{_pair(old['beam_centre_mm']):>34s}{_pair(new['beam_centre_mm']):>34s}",
            f"  {'beam centre (px)':24s}{_pair(old['beam_centre_px']):>34s}{_pair(new['beam_centre_px']):>34s}",
            f"  shift: beam centre {_pair(shift['beam_centre_shift_px'])} px (fast, slow), "
            f"distance {shift['distance_change_mm']:+.4f} mm",
        ]
    return "\n".join(lines) + "\n"


def _triple(values) -> str:
    return "(" + ", ".join(f"{value:.4f}" for value in values) + ")"


def _pair(values) -> str:
    return "(" + ", ".join(f"{value:+.4f}" if abs(value) < 10 else f"{value:.4f}" for value in values) + ")"


@dataclass(frozen=True)
class MetrologyResult:
    """What one metrology run found: the detector before and after, and the spots' residuals on each."""

    n_lattices: int
    method: str
    starting_detector: object
    refined_detector: object
    before: dict
    after: dict
    residuals_before: residual_maps.PositionalResiduals
    residuals_after: residual_maps.PositionalResiduals


def refine_detector(dataset: str, shards: Sequence[ShardLattices], phil_path, engine: str, max_lattices: int,
                    work_dir: Path, log_stream, hierarchy_level: int = 0,
                    saved_detector_path=None, min_lattices: int = 1) -> MetrologyResult:
    """Combine the selected lattices and refine the detector at ``hierarchy_level``.

    With ``saved_detector_path`` the saved detector is applied instead and only the lattices are
    refined on it. With fewer than ``min_lattices`` lattices the detector is not refined (one lattice
    cannot tell a detector shift from its own orientation and cell): the lattices are refined on the
    images' detector, which is carried forward, and the method says so. The residuals are those of the
    spots dials.refine used, predicted before (the lattices as indexed, on the starting detector) and after.
    """
    saved_detector = read_saved_detector(saved_detector_path) if saved_detector_path is not None else None
    selected, n_available = select_shards(shards, max_lattices)
    if not selected:
        raise MetrologyError(f"dataset {dataset}: none of its {len(shards)} shards has an indexed lattice; "
                             "there is nothing to refine the detector against")
    n_lattices = min(n_available, max_lattices)
    print(f"metrology: {n_lattices} lattices from {len(selected)} of {len(shards)} shards", file=log_stream,
          flush=True)

    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    combine_arguments = [os.path.abspath(path) for shard in selected
                         for path in (shard.refined_experiments, shard.indexed_reflections)]
    combine_arguments += ["reference_from_experiment.detector=0",
                          "output.experiments_filename=combined.expt", "output.reflections_filename=combined.refl"]
    if n_available > max_lattices:
        # Deterministic, unlike the default random subset: keep the lattices with most reflections.
        combine_arguments += [f"output.n_subset={max_lattices}", "output.n_subset_method=n_refl"]
    run_dials("combine_experiments", combine_arguments, work_dir, log_stream)
    combined = read_experiments(work_dir / "combined.expt")
    detector = combined[0].detector

    fixed_detector = ["refinement.parameterisation.detector.fix=all",
                      # dials.refine applies a fix_list after fix=all, freeing what the list leaves out; so no list.
                      "refinement.parameterisation.detector.fix_list=None"]
    if saved_detector is None and n_lattices < min_lattices:
        method = (f"not refined: {n_lattices} lattice(s), fewer than metrology.min_lattices ({min_lattices}); "
                  "the images' detector is carried forward")
        detector_arguments = fixed_detector
        starting_experiments = "combined.expt"
    elif saved_detector is None:
        method = f"refined at hierarchy level {hierarchy_level}"
        detector_arguments = detector_parameterisation_arguments(hierarchy_level, len(detector),
                                                                 selected[0].refined_experiments)
        starting_experiments = "combined.expt"
    else:
        method = f"saved detector {saved_detector_path} applied"
        applied = read_experiments(work_dir / "combined.expt")
        apply_saved_detector(saved_detector, applied[0].detector, saved_detector_path)
        applied.as_file(str(work_dir / "applied.expt"))
        detector_arguments = fixed_detector
        starting_experiments = "applied.expt"
    print(f"metrology: {method}, {len(detector)} panel(s)", file=log_stream, flush=True)
    run_dials("refine", [starting_experiments, "combined.refl", os.path.abspath(phil_path),
                         f"refinement.refinery.engine={engine}", *detector_arguments,
                         "output.experiments=refined.expt", "output.reflections=refined.refl",
                         "output.log=dials.refine.log"], work_dir, log_stream)
    refined = read_experiments(work_dir / "refined.expt")
    refined_reflections = flex_reflections(work_dir / "refined.refl")
    result = MetrologyResult(
        n_lattices=n_lattices, method=method, starting_detector=detector, refined_detector=refined[0].detector,
        before=detector_geometry(combined), after=detector_geometry(refined),
        residuals_before=residual_maps.positional_residuals(combined, refined_reflections),
        residuals_after=residual_maps.positional_residuals(refined, refined_reflections))
    # The combined and refined lattices are large and used by nothing downstream; the log keeps the story.
    shutil.rmtree(work_dir)
    return result


def flex_reflections(path):
    """A DIALS reflection table read from ``path``."""
    from dials.array_family import flex

    return flex.reflection_table.from_file(str(path))


@dataclass(frozen=True)
class MetrologyOutputs:
    """Where the metrology stage writes its results."""

    report: Path
    summary: Path
    refined_detector: Path
    residuals_table: Path
    residuals_before_plot: Path
    residuals_after_plot: Path


def write_metrology_outputs(dataset: str, result: MetrologyResult, plan: RefinementPlan,
                            outputs: MetrologyOutputs) -> None:
    """Write the refined detector, the report, the residual table and maps and the JSON summary, atomically."""
    # The plan's note (a capped lattice count) matters only when the cap was reached.
    note = plan.note if result.n_lattices >= plan.max_lattices else ""
    panel_names = [panel.get_name() for panel in result.refined_detector]
    statistics = {"before": residual_maps.residual_statistics(result.residuals_before, panel_names),
                  "after": residual_maps.residual_statistics(result.residuals_after, panel_names)}
    rmsd_px = (statistics["before"][-1]["rmsd_px"], statistics["after"][-1]["rmsd_px"])

    write_detector(result.refined_detector, outputs.refined_detector)
    with atomic_output(outputs.report, "w") as stream:
        stream.write(format_report(dataset, result.n_lattices, plan.engine, result.before, result.after, note,
                                   result.method, rmsd_px))
    residual_maps.write_residual_statistics(statistics, outputs.residuals_table)
    limit = residual_maps.colour_limit(result.residuals_before, result.residuals_after,
                                       detector=result.refined_detector)
    for stage, residuals, detector, path in (
            ("before", result.residuals_before, result.starting_detector, outputs.residuals_before_plot),
            ("after", result.residuals_after, result.refined_detector, outputs.residuals_after_plot)):
        residual_maps.plot_residual_maps(path, residuals, detector,
                                         f"Dataset {dataset}, {stage} metrology ({result.method})", limit)
    with atomic_output(outputs.summary, "w") as stream:
        json.dump({"dataset": dataset, "n_lattices": result.n_lattices, "engine": plan.engine, "note": note,
                   "method": result.method, "before": result.before, "after": result.after,
                   "shift": geometry_shift(result.before, result.after), "residuals": statistics}, stream, indent=1)
