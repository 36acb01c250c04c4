"""Files of the per-shot refinement: structure factors in, refined experiments and the shots table out.

Structure factors (``stage1.structure_factors``):

- ``merged``: |F| = sqrt(max(IMEAN, 0)) of the merge stage's MTZ, Friedel mates given the same value,
  expanded to P1 and repeated for every energy channel (a merged IMEAN has no energy dependence).
  An index the merge did not measure (or measured at IMEAN <= 0) has F = 0: a shoebox around such a
  reflection would be fitted as pure background, so stage 1 drops those ROIs and counts them
  (``n_rois_no_f`` in the shots table).
- ``model``: the model's per-channel amplitudes of the structure_factors stage, on the shard's channels.

Outputs of one annulus shard, for output prefix P:

``P_refined.expt``
    The annulus experiments, each converged lattice's crystal replaced by the refined one (a dxtbx
    ``Crystal`` from the refined real-space matrix, space group kept) and, when the distance was
    refined, its detector moved to the refined distance. A lattice that did not converge keeps its
    start crystal and detector (the shots table says why).
``P_shots.tsv``
    One row per lattice, in the experiment list's order (columns: ``io.refined_shots.SHOT_COLUMNS``,
    written and read by that module): global shot number,
    image in the shard, experiment identifier; ``converged`` (1/0) and, when 0, the reason; ROIs
    refined, ROIs dropped for want of a structure factor, shoebox pixels and trusted ones; the final
    parameters (start values for those not refined; G, rotations in degrees about the laboratory x,
    y, z axes, the C2 cell in Angstrom and degrees, Na, Nb, Nc, eta in degrees, the distance shift
    in mm); the NLL before and after; L-BFGS-B iterations; radial and overall RMSD (px) of the
    model's spot centroids against the observed ones, before and after, over every ROI and over the
    ROIs of strong spots (``n_rois_strong`` of them; see ``stage1.refine``), and DIALS's own radial
    RMSD (xyzcal.px) over the same strong spots; the standard deviation of
    the trusted pixels' Z-scores before and after; wall seconds. Values that do not exist for the
    lattice (a lattice that never reached the refinement) are blank.
``P_domains.tsv``
    With ``stage1.free_domains`` on, each converged lattice's free mosaic domains: their rotation
    vectors about the refined orientation (``io.mosaic_domains``, which writes and reads it), so that
    SPREAD models the lattice as stage 1 fitted it. Its header alone when the free domains are off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_path
from xfel_spread.errors import UserInputError
from xfel_spread.io.mosaic_domains import write_domain_vectors
from xfel_spread.io.refined_shots import PARAMETER_COLUMNS, write_refined_shots
from xfel_spread.sim.structure_factors import (AmplitudeGrid, ChannelAmplitudes, expand_to_p1_grid,
                                               load_channel_amplitudes, load_channel_energies)

#: Output files of one shard, as suffixes of its output prefix.
OUTPUT_SUFFIXES = {"experiments": "_refined.expt", "shots": "_shots.tsv", "domains": "_domains.tsv"}
#: Energies of the model's channels must match the shard's to this tolerance (eV).
ENERGY_TOLERANCE_EV = 1e-6

class Stage1FileError(UserInputError, ValueError):
    """A structure-factor source or a stage-1 output that cannot be used; one line naming the file."""


def output_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """The output files of a shard, by name."""
    return {name: Path(f"{prefix}{suffix}") for name, suffix in OUTPUT_SUFFIXES.items()}


# ---------------------------------------------------------------------------------------------
# Structure factors


def amplitude_grid_from_mtz(mtz_path: str | os.PathLike, energies_ev: np.ndarray) -> AmplitudeGrid:
    """P1 grid of sqrt(max(IMEAN, 0)) from a merged MTZ, Friedel mates equal, the same in every channel."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    from xfel_spread.io.mtz import read_merged_mtz

    merged = read_merged_mtz(mtz_path)
    if len(merged.mean_indices) == 0:
        raise Stage1FileError(f"{mtz_path}: merged MTZ holds no IMEAN")
    symmetry = crystal.symmetry(unit_cell=merged.unit_cell, space_group_symbol=merged.space_group)
    mean_set = miller.set(symmetry, flex.miller_index([tuple(int(v) for v in row) for row in merged.mean_indices]),
                          anomalous_flag=False)
    amplitudes = np.sqrt(np.maximum(merged.mean_intensities, 0.0))
    with_mates = miller.array(mean_set, flex.double(amplitudes)).generate_bijvoet_mates()
    indices = np.array(with_mates.indices(), dtype=np.int64).reshape(-1, 3)
    values = with_mates.data().as_numpy_array()
    energies_ev = np.asarray(energies_ev, dtype=np.float64)
    table = ChannelAmplitudes(energies_ev=energies_ev, unit_cell=tuple(merged.unit_cell),
                              space_group=merged.space_group, indices=indices,
                              amplitudes=np.broadcast_to(values, (len(energies_ev), len(values))))
    return expand_to_p1_grid(table)


#: Largest relative difference of a, b, c and largest difference of the angles (degrees) between the
#: model's cell and the lattices' median cell for the model to describe the crystal.
MODEL_CELL_TOLERANCE = (0.05, 3.0)


def check_model_cell(amplitudes_path: str | os.PathLike, model_cell, lattice_cells, source: str) -> None:
    """Refuse the model's amplitudes for lattices whose median cell is not the model's: a model of another
    crystal (the LY99 default under real images of something else) would give stage 1 wrong |F| for
    every reflection. One line (Stage1FileError) naming both cells."""
    cells = np.asarray(lattice_cells, dtype=np.float64).reshape(-1, 6)
    if not len(cells):
        return
    median = np.median(cells, axis=0)
    model = np.asarray(model_cell, dtype=np.float64)
    lengths = np.abs(median[:3] / model[:3] - 1).max()
    angles = np.abs(median[3:] - model[3:]).max()
    if lengths > MODEL_CELL_TOLERANCE[0] or angles > MODEL_CELL_TOLERANCE[1]:
        def shown(cell):
            return " ".join(f"{value:.2f}" for value in cell)
        raise Stage1FileError(
            f"{amplitudes_path}: the model's cell ({shown(model)}) is not the lattices' ({shown(median)}, median of "
            f"{len(cells)} in {source}): the model does not describe this crystal; give its own model (input.model) "
            "or take |F| from the data (stage1.structure_factors: merged)")


def amplitude_grid_from_model(amplitudes_path: str | os.PathLike, energies_ev: np.ndarray,
                              lattice_cells=None, source: str = "") -> AmplitudeGrid:
    """P1 grid of the model's per-channel amplitudes, whose channels must be the shard's and whose cell
    must be the lattices' (``lattice_cells``: a, b, c, alpha, beta, gamma each; see :func:`check_model_cell`)."""
    table = load_channel_amplitudes(str(amplitudes_path))
    if lattice_cells is not None:
        check_model_cell(amplitudes_path, table.unit_cell, lattice_cells, source)
    energies_ev = np.asarray(energies_ev, dtype=np.float64)
    if (table.energies_ev.shape != energies_ev.shape
            or np.abs(table.energies_ev - energies_ev).max() > ENERGY_TOLERANCE_EV):
        raise Stage1FileError(
            f"{amplitudes_path}: channels ({len(table.energies_ev)} from {table.energies_ev[0]:g} eV) are not the "
            f"shard's ({len(energies_ev)} from {energies_ev[0]:g} eV)")
    return expand_to_p1_grid(table)


def stage1_channels(source: str, shard_energies_ev: np.ndarray, amplitudes_path=None) -> np.ndarray:
    """The channels (eV) on which stage 1 evaluates each shot's spectrum: the shard's own with merged
    |F| (one |F| for every channel), the amplitude table's with the model's (``source`` ``model``),
    on which shots whose spectra lie elsewhere, images from another program or a beamline, are put
    (:func:`xfel_spread.stage1.rois.annulus_on_channels`)."""
    if source == "model" and amplitudes_path is not None:
        return np.asarray(load_channel_energies(str(amplitudes_path)), dtype=np.float64)
    return np.asarray(shard_energies_ev, dtype=np.float64)


def load_amplitude_grid(source: str, energies_ev: np.ndarray, mtz_path=None, amplitudes_path=None,
                        lattice_cells=None, lattices_source: str = "") -> AmplitudeGrid:
    """The grid of ``stage1.structure_factors`` (``merged`` or ``model``) from the file it needs; a model's
    cell is checked against ``lattice_cells`` when given."""
    if source == "merged":
        if mtz_path is None:
            raise Stage1FileError("stage1.structure_factors is merged: give the merged MTZ (--mtz)")
        return amplitude_grid_from_mtz(mtz_path, energies_ev)
    if source == "model":
        if amplitudes_path is None:
            raise Stage1FileError("stage1.structure_factors is model: give the amplitude table (--amplitudes)")
        return amplitude_grid_from_model(amplitudes_path, energies_ev, lattice_cells, lattices_source)
    raise Stage1FileError(f"stage1.structure_factors: unknown source {source!r}")


# ---------------------------------------------------------------------------------------------
# Results of one lattice


@dataclass
class LatticeResult:
    """What stage 1 made of one lattice: its table row and, when it converged, the refined models."""

    lattice: int  #: position in the annulus experiment list
    row: dict = field(default_factory=dict)  #: values of ``io.refined_shots.SHOT_COLUMNS`` (missing ones blank)
    refined_matrix: np.ndarray | None = None  #: (3, 3) rows a, b, c, when converged
    detz_shift_mm: float | None = None  #: refined distance shift, when converged and refined
    #: The free domains' centred rotation vectors (D, 3, deg), when converged with ``stage1.free_domains``.
    domain_vectors_deg: np.ndarray | None = None


def lattice_result(lattice: int, fit, n_rois_no_f: int, n_pixels: int) -> LatticeResult:
    """The result of a lattice whose refinement ran (``fit``: a ``stage1.refine.ShotFit``)."""
    row = {
        "shot": fit.shot_index, "image": fit.image_index, "identifier": fit.identifier,
        "converged": int(fit.converged), "reason": fit.reason, "n_rois": fit.n_rois,
        "n_rois_strong": fit.n_strong_rois, "n_rois_no_f": n_rois_no_f,
        "n_pixels": n_pixels, "n_trusted": fit.n_trusted_pixels,
        **{name: fit.final.get(name) for name in PARAMETER_COLUMNS},
        "nll_before": fit.nll_start, "nll_after": fit.nll_final, "iterations": fit.n_iterations,
        "rmsd_radial_before_px": fit.radial_rmsd_px_start, "rmsd_radial_after_px": fit.radial_rmsd_px,
        "rmsd_overall_before_px": fit.rmsd_px_start, "rmsd_overall_after_px": fit.rmsd_px,
        "rmsd_radial_strong_before_px": fit.strong_radial_rmsd_px_start,
        "rmsd_radial_strong_after_px": fit.strong_radial_rmsd_px,
        "rmsd_overall_strong_before_px": fit.strong_rmsd_px_start, "rmsd_overall_strong_after_px": fit.strong_rmsd_px,
        "rmsd_radial_strong_dials_px": fit.dials_strong_radial_rmsd_px,
        "zscore_sigma_before": fit.z_score_sigma_start, "zscore_sigma": fit.z_score_sigma_final,
        "seconds": fit.seconds,
    }
    if not fit.converged:
        return LatticeResult(lattice, row)
    shift = fit.final.get("detz_shift_mm") if "detz_shift_mm" in fit.refined else None
    vectors = None if fit.domain_vectors_deg is None else np.asarray(fit.domain_vectors_deg, dtype=np.float64)
    return LatticeResult(lattice, row, np.asarray(fit.real_space_matrix, dtype=np.float64), shift, vectors)


def failed_lattice_result(lattice: int, shot: int, image: int, identifier: str, reason: str,
                          n_rois: int | None = None, n_rois_no_f: int | None = None,
                          n_pixels: int | None = None) -> LatticeResult:
    """The result of a lattice that never reached the refinement (no usable shoebox, unreadable image)."""
    return LatticeResult(lattice, {"shot": shot, "image": image, "identifier": identifier, "converged": 0,
                                   "reason": reason, "n_rois": n_rois, "n_rois_no_f": n_rois_no_f,
                                   "n_pixels": n_pixels})


# ---------------------------------------------------------------------------------------------
# Writing


def refined_experiments(experiments, results: Sequence[LatticeResult]):
    """A copy of ``experiments`` with the refined crystals and detector distances of ``results``."""
    from dxtbx.model import Crystal, Detector
    from dxtbx.model.experiment_list import ExperimentList

    by_lattice = {result.lattice: result for result in results}
    refined = ExperimentList()
    for position, experiment in enumerate(experiments):
        result = by_lattice.get(position)
        copy = _shallow_copy(experiment)
        if result is not None and result.refined_matrix is not None:
            a, b, c = (tuple(float(v) for v in row) for row in np.asarray(result.refined_matrix))
            copy.crystal = Crystal(a, b, c, experiment.crystal.get_space_group())
            if result.detz_shift_mm is not None and result.detz_shift_mm != 0.0:
                detector = Detector.from_dict(experiment.detector.to_dict())
                for panel in detector:
                    x, y, z = panel.get_origin()
                    # Positive shift moves the panel away from the sample, along -z.
                    panel.set_frame(panel.get_fast_axis(), panel.get_slow_axis(), (x, y, z - result.detz_shift_mm))
                copy.detector = detector
        refined.append(copy)
    return refined


def _shallow_copy(experiment):
    from dxtbx.model import Experiment

    return Experiment(imageset=experiment.imageset, beam=experiment.beam, detector=experiment.detector,
                      goniometer=experiment.goniometer, scan=experiment.scan, crystal=experiment.crystal,
                      profile=experiment.profile, scaling_model=experiment.scaling_model,
                      identifier=experiment.identifier)


def write_refined_experiments(experiments, results: Sequence[LatticeResult], path: str | os.PathLike) -> None:
    """Write :func:`refined_experiments` as a DIALS experiment list, atomically."""
    refined = refined_experiments(experiments, results)
    with atomic_path(path) as temporary:
        # as_file picks the format from the extension, which the temporary name lacks.
        refined.as_json(str(temporary))


def write_shots_table(results: Sequence[LatticeResult], path: str | os.PathLike) -> None:
    """The shots table of ``results``, in the given order (:func:`xfel_spread.io.refined_shots.write_refined_shots`)."""
    write_refined_shots([result.row for result in results], path)


def write_domains_table(results: Sequence[LatticeResult], path: str | os.PathLike) -> None:
    """The domains table of the ``results`` that have free domains (:func:`xfel_spread.io.mosaic_domains.write_domain_vectors`)."""
    write_domain_vectors({result.lattice: result.domain_vectors_deg for result in results
                          if result.domain_vectors_deg is not None}, path)
