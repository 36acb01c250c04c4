"""How close to the true orientation a per-shot refinement can come: the mosaic-domain floor.

The simulator builds each crystal from 25 mosaic domains turned by random rotations (random axes,
N(0, 0.05 deg) angles, ``sim.crystal.mosaic_rotations``), drawn anew for every shot. The domains'
mean orientation sits about 0.01 deg from the crystal's matrix, and which domains light which spot
depends on the spectrum; the refinement models one orientation (or, with eta, a symmetric set about
it), so it finds the orientation these particular domains make, not the matrix they were drawn
about. This benchmark measures that floor on a completed run: it refines lattices of one annulus
shard twice from DIALS's crystal, as the run's stage1 settings say, and with the model's domains
replaced by the truth's own 25 rotations, an oracle no refinement of real data has. Printed per
lattice: misorientation to the true matrix of DIALS, of the refinement and of the oracle, and N.

On the demo (nopsf, shots 0 and 3, the two whose refinement ended farther from the truth than
DIALS): DIALS 0.0094 and 0.0130 deg, refined 0.0129 and 0.0137, oracle 0.0019 and 0.0014 with N
57.0-58.0 (truth 57). The refinement itself is exact; what is left is the domains.

Usage: .venv/bin/python benchmarks/stage1_mosaic_floor.py [--dataset nopsf] [--shard 0]
       [--lattices 0,3] [--results results]
An oracle refinement evaluates 25 domains: 2 to 5 minutes per lattice on one core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from xfel_spread.config import load_config, modelled_psf
from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations
from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.stage1.io import load_amplitude_grid
from xfel_spread.stage1.model import INDEX, CrystalModel, Stage1Settings
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.refine import ShotProblem, minimize_shot, shot_evaluator
from xfel_spread.stage1.rois import open_annulus_shard, read_lattices, rois_with_amplitude, select_rois


class TruthDomainCrystal(CrystalModel):
    """The refinement's crystal with the simulation's own mosaic-domain rotations."""

    def __init__(self, start_matrix: np.ndarray, rotations: np.ndarray):
        super().__init__(start_matrix, 1)
        self.rotations = torch.as_tensor(np.asarray(rotations), dtype=torch.float64)
        self.n_domains = len(self.rotations)

    def domain_matrices(self, values: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dij,rj->dri", self.rotations, self.real_space_matrix(values))


def refine(shot, amplitudes, settings, psf, truth_rotations=None):
    """(refined real-space matrix, N) of ``refine_shot``'s minimisation, with the truth's domains if given."""
    problem = ShotProblem(shot, settings, "cpu", psf)
    if truth_rotations is not None:
        problem.crystal = TruthDomainCrystal(shot.real_space_matrix, truth_rotations)
    problem.set_start_from_model(amplitudes)
    result = minimize_shot(problem, shot_evaluator(problem, amplitudes))
    values = torch.as_tensor(result.values)
    n = [float(values[INDEX[name]]) for name in ("Na", "Nb", "Nc")]
    return problem.crystal.real_space_matrix(values).numpy(), n, result.converged


def run_settings(results: Path, dataset: str) -> tuple[Stage1Settings, DetectorPsf | None]:
    """A completed run's stage-1 settings and the point spread it models for ``dataset`` (or None)."""
    config = {section: load_config(results / "settings" / f"{section}.yaml")[section]
              for section in ("simulate", "stage1")}
    fwhm_and_radius = modelled_psf(dataset, config)
    return Stage1Settings.from_config(config["stage1"]), (
        None if fwhm_and_radius is None else DetectorPsf(*fwhm_and_radius))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="nopsf", choices=("nopsf", "psf"))
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--lattices", default="0,3", help="comma-separated lattice numbers of the shard")
    parser.add_argument("--results", default="results", help="output directory of a completed run")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    results = Path(arguments.results)
    settings, psf = run_settings(results, arguments.dataset)
    shard = f"shard_{arguments.shard:05d}"
    annulus = open_annulus_shard(results / "annulus" / arguments.dataset / shard,
                                 results / "sim" / arguments.dataset / f"{shard}.h5")
    grid = load_amplitude_grid("model", annulus.metadata.energy_ev, None,
                               results / "structure_factors" / "amplitudes.h5")
    amplitudes = AmplitudeLookup(grid, "cpu")
    truth_shots = json.loads((results / "sim" / "truth" / f"{shard}.json").read_text())["shots"]
    symmetry = point_group_rotations("C 1 2 1")
    lattices = [int(text) for text in arguments.lattices.split(",")]
    print(f"{arguments.dataset} {shard}: model |F|, point spread {'modelled' if psf else 'none'}; "
          "misorientation to the true matrix (deg)")
    print("shot  DIALS    refined  oracle   refined N            oracle N             oracle s")
    for _, shot, _ in read_lattices(annulus, lattices, settings.shoebox_size_px, print):
        shot = select_rois(shot, rois_with_amplitude(grid, shot.miller_index))
        truth = truth_shots[shot.image_index]
        true_matrix = np.array(truth["real_space_a_b_c"])
        refined, n_refined, _ = refine(shot, amplitudes, settings, psf)
        started = time.perf_counter()
        oracle, n_oracle, _ = refine(shot, amplitudes, settings, psf, truth["mosaic_rotations"])
        seconds = time.perf_counter() - started
        print(f"{shot.shot_index:4d}  {misorientation_deg(shot.real_space_matrix, true_matrix, symmetry):.4f}  "
              f"{misorientation_deg(refined, true_matrix, symmetry):.4f}   "
              f"{misorientation_deg(oracle, true_matrix, symmetry):.4f}   "
              f"{' '.join(f'{n:6.1f}' for n in n_refined)}   {' '.join(f'{n:6.1f}' for n in n_oracle)}   "
              f"{seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
