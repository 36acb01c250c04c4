"""The strong-spot radial RMSD of the simulation's own model: the floor of stage 1's RMSD goal.

Stage 1 scores a lattice's spot positions by the radial RMSD between the model's centroid of its
Bragg photons in each strong spot's shoebox and DIALS's observed centroid of that spot
(``xyzobs.px.value``, from the spot finder's thresholded pixels). The observed centroids carry photon
noise and the spot finder's cut, so even the model that made the images does not reach zero. This
benchmark evaluates, on every lattice of a completed run, the forward model at the truth: the
simulated crystal matrix with its own 25 mosaic-domain rotations, the true N, and the detector's true
beam centre (``sim/truth``), no refinement. It prints, per lattice and as medians over the lattices
the score counts (converged, with strong spots), the truth's strong-spot radial RMSD on the run's
detector and on the true beam centre, beside the refined model's and DIALS's (from
``score/stage1_<dataset>.tsv``). The centroids do not depend on G or the background.

Usage: .venv/bin/python benchmarks/stage1_rmsd_floor.py [--dataset nopsf] [--results results]
One evaluation of 25 domains per lattice: about a second each on one core.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.sim.geometry import Detector
from xfel_spread.stage1.io import load_amplitude_grid
from xfel_spread.stage1.model import INDEX, NCELLS, Stage1Settings
from xfel_spread.stage1.pipeline import prepared_lattices
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.refine import (ShotProblem, all_pixels, centroid_rmsd, dials_strong_radial_rmsd, model_centroids,
                                      roi_beam_centres_px)
from xfel_spread.stage1.rois import open_annulus_shard

from stage1_mosaic_floor import TruthDomainCrystal, run_settings  # noqa: E402 - the sibling benchmark, run from benchmarks/


def truth_problem(shot, truth: dict, settings: Stage1Settings, psf: DetectorPsf | None,
                  rotations: np.ndarray | None = None) -> tuple[ShotProblem, torch.Tensor]:
    """Stage 1's problem of ``shot`` with the truth's crystal (its domain ``rotations``, default all of
    them), and the values that put it at the truth: its cell, no rotation, the true N, G 1, no shift."""
    problem = ShotProblem(shot, settings, "cpu", psf)
    problem.crystal = TruthDomainCrystal(np.array(truth["real_space_a_b_c"]),
                                         truth["mosaic_rotations"] if rotations is None else rotations)
    values = problem.unit_start_values()
    values[NCELLS] = torch.as_tensor(truth["ncells_abc"], dtype=torch.float64)
    values[INDEX["eta_deg"]] = 0.0
    return problem, values


def truth_strong_radial_rmsd(shot, truth: dict, settings: Stage1Settings, amplitudes: AmplitudeLookup,
                             psf: DetectorPsf | None, true_beam_centre: bool) -> float:
    """The strong-spot radial RMSD (px) of the truth's model of ``shot``, on the run's detector or
    (``true_beam_centre``) with the beam centre moved to the simulation's."""
    if true_beam_centre:
        if not isinstance(shot.detector, Detector):
            raise SystemExit("the true beam centre applies to the single-panel simulated detector only")
        shot = dataclasses.replace(shot, detector=dataclasses.replace(
            shot.detector, beam_center_mm=tuple(float(v) for v in truth["true_beam_center_mm"])))
    problem, values = truth_problem(shot, truth, settings, psf)
    with torch.no_grad():
        photons = problem.photons(values, amplitudes, all_pixels(problem))
    centroids = model_centroids(photons.mean.numpy(), np.asarray(shot.pixel_fast), np.asarray(shot.pixel_slow),
                                np.asarray(shot.pixel_roi), shot.n_rois)
    strong = np.asarray(shot.strong, dtype=bool)
    beam_centre_px = roi_beam_centres_px(shot)
    return centroid_rmsd(centroids[strong], np.asarray(shot.observed_centroid_px, dtype=np.float64)[strong],
                         beam_centre_px[strong] if beam_centre_px.ndim == 2 else beam_centre_px)[1]


def scored_rows(path: Path) -> dict[int, dict]:
    with open(path, newline="") as handle:
        return {int(row["shot"]): row for row in csv.DictReader(handle, delimiter="\t")}


def median(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def scored_lattices(results: Path, dataset: str, settings: Stage1Settings, strong_only: bool = True):
    """(shard name, lattice, shot, score row, truth shot, amplitudes) of each lattice of a completed run that stage 1's
    score counts: converged (and, with ``strong_only``, with strong spots), shard by shard."""
    scored = scored_rows(results / "score" / f"stage1_{dataset}.tsv")
    for expt in sorted((results / "annulus" / dataset).glob("shard_*_annulus.expt")):
        shard = expt.name[:len("shard_00000")]
        annulus = open_annulus_shard(results / "annulus" / dataset / shard, results / "sim" / dataset / f"{shard}.h5")
        truth_shots = json.loads((results / "sim" / "truth" / f"{shard}.json").read_text())["shots"]
        grid = load_amplitude_grid("model", annulus.metadata.energy_ev, None,
                                   results / "structure_factors" / "amplitudes.h5")
        amplitudes = AmplitudeLookup(grid, "cpu")
        failures: list = []
        lattices = range(len(annulus.experiments))
        for lattice, shot, _, _ in prepared_lattices(annulus, grid, lattices, settings.shoebox_size_px, failures):
            row = scored.get(shot.shot_index)
            if row is None or row["converged"] != "1" or (strong_only and not int(row["n_rois_strong"] or 0)):
                continue
            yield shard, lattice, shot, row, truth_shots[shot.image_index], amplitudes


def completed_run(description: str) -> tuple[Path, str, Stage1Settings, DetectorPsf | None]:
    """The command line of a floor benchmark (``--dataset``, ``--results``): the run's directory, the
    dataset, its stage-1 settings and modelled point spread; one torch thread."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="nopsf", choices=("nopsf", "psf"))
    parser.add_argument("--results", default="results", help="output directory of a completed run")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    results = Path(arguments.results)
    return (results, arguments.dataset, *run_settings(results, arguments.dataset))


def main() -> None:
    results, dataset, settings, psf = completed_run(__doc__.splitlines()[0])
    print(f"{dataset}: strong-spot radial RMSD (px) against DIALS's observed centroids; "
          f"point spread {'modelled' if psf else 'none'}")
    print("shot  strong  truth(run det)  truth(true centre)  refined  DIALS(xyzcal)")
    columns: dict[str, list[float]] = {"truth": [], "truth_centre": [], "refined": [], "dials": []}
    for _, _, shot, row, truth, amplitudes in scored_lattices(results, dataset, settings):
        figures = {"truth": truth_strong_radial_rmsd(shot, truth, settings, amplitudes, psf, False),
                   "truth_centre": truth_strong_radial_rmsd(shot, truth, settings, amplitudes, psf, True),
                   "refined": float(row["rmsd_radial_strong_after_px"]),
                   "dials": dials_strong_radial_rmsd(shot)}
        for name, value in figures.items():
            columns[name].append(value)
        print(f"{shot.shot_index:4d}  {int(row['n_rois_strong']):6d}  {figures['truth']:14.3f}  "
              f"{figures['truth_centre']:18.3f}  {figures['refined']:7.3f}  {figures['dials']:13.3f}", flush=True)
    print(f"median over {len(columns['truth'])} lattices: truth {median(columns['truth']):.3f}, "
          f"truth with the true beam centre {median(columns['truth_centre']):.3f}, "
          f"refined {median(columns['refined']):.3f}, DIALS {median(columns['dials']):.3f}")


if __name__ == "__main__":
    main()
