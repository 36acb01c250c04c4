"""Level-0 detector metrology: refine the whole detector's position against many indexed lattices.

``dials.combine_experiments`` puts the lattices of many shards onto one shared detector model
(``reference_from_experiment.detector=0``); ``dials.refine`` then refines that detector together with
every lattice's orientation and cell, under the users' phil (``config/metrology.phil``). The result is
written three ways:

* a report with the detector before and after (origin, distance, beam centre in mm and px), the
  comparison users used to read off ``dials.show``;
* a phil fragment that sets the refined panel geometry in ``dials.stills_process`` (the reindex
  stage includes it), so nobody copies numbers by hand;
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
from xfel_spread.dials.stills import read_shots_table

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


class MetrologyError(RuntimeError):
    """Metrology could not run; the message says why in one line."""


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


def detector_geometry(experiments_path: Path) -> dict:
    """Geometry of the first detector in an experiment list, with the beam centre of its first beam."""
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(experiments_path), check_format=False)
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


def refined_detector_phil(geometry: dict) -> str:
    """stills_process phil that sets every panel to its refined position and orientation."""
    lines = ["# Refined detector from the metrology stage; written by the pipeline, do not edit.",
             "geometry.detector {"]
    for index, panel in enumerate(geometry["panels"]):
        lines += [
            "  panel {",
            f"    id = {index}",
            f"    origin = {_vector(panel['origin_mm'])}",
            f"    fast_axis = {_vector(panel['fast_axis'])}",
            f"    slow_axis = {_vector(panel['slow_axis'])}",
            "  }",
        ]
    return "\n".join(lines + ["}"]) + "\n"


def _vector(values) -> str:
    return ",".join(f"{value:.10g}" for value in values)


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


def format_report(dataset: str, n_lattices: int, engine: str, before: dict, after: dict, note: str = "") -> str:
    """The human-readable before/after comparison."""
    lines = [f"Level-0 detector metrology, dataset {dataset}",
             f"lattices refined: {n_lattices} (refinery.engine={engine})", *([note] if note else []), ""]
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


def refine_detector(dataset: str, shards: Sequence[ShardLattices], phil_path, engine: str, max_lattices: int,
                    work_dir: Path, log_stream) -> tuple[int, dict, dict]:
    """Combine the selected lattices and refine the detector; returns (lattices, before, after)."""
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
    run_dials("refine", ["combined.expt", "combined.refl", os.path.abspath(phil_path),
                         f"refinement.refinery.engine={engine}",
                         "output.experiments=refined.expt", "output.reflections=refined.refl",
                         "output.log=dials.refine.log"], work_dir, log_stream)
    before, after = detector_geometry(work_dir / "combined.expt"), detector_geometry(work_dir / "refined.expt")
    # The combined and refined lattices are large and used by nothing downstream; the log keeps the story.
    shutil.rmtree(work_dir)
    return n_lattices, before, after


def write_metrology_outputs(dataset, n_lattices, plan: RefinementPlan, before, after, report_path, phil_path,
                            summary_path):
    """Write the report, the refined-detector phil fragment and the JSON summary, each atomically."""
    # The plan's note (a capped lattice count) matters only when the cap was reached.
    note = plan.note if n_lattices >= plan.max_lattices else ""
    with atomic_output(report_path, "w") as stream:
        stream.write(format_report(dataset, n_lattices, plan.engine, before, after, note))
    with atomic_output(summary_path, "w") as stream:
        json.dump({"dataset": dataset, "n_lattices": n_lattices, "engine": plan.engine, "note": note,
                   "before": before, "after": after, "shift": geometry_shift(before, after)}, stream, indent=1)
    with atomic_output(phil_path, "w") as stream:
        stream.write(refined_detector_phil(after))
