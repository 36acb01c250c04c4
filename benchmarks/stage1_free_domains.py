"""Can a per-shot refinement find a shot's own mosaic domains? Free domain rotations after eta.

The orientation floor of stage 1 (about 0.004 deg to the domains' mean on ideal shots, 0.006 on the
runs) is the 25 drawn domains: with them known (``stage1_mosaic_floor.py``, the oracle) the
refinement reaches 0.0014-0.0019 deg, and no Gaussian average of rotations, isotropic or anisotropic,
fits their 25 sharp copies of each spot (``stage1_anisotropic_mosaic.py``). This benchmark tries the
remaining model: each shot's D domains as free rotation vectors (3 D parameters), refined with G,
the orientation, the cell and N. The vectors are centred (their mean is the crystal's orientation),
so the refined orientation is the model's domain mean, the score's reference.

Per shot (``stage1.synthetic.simulate_shot_pixels``: LY99's crystal, 25 domains of RMS 0.05 deg,
``--rois`` shoeboxes, all channels; the start is the truth turned by 0.05 deg with the cell off by
0.3 %, as ``bench_stage1.py``):

1. ``refine_shot`` with the analytic eta (``stage1.refine: [G, rotation, cell, ncells, eta]``);
2. from its end, D free domains drawn at random with its eta (not the truth's), refined by L-BFGS-B
   over the stage's scaled parameters and the vectors (unit 0.01 deg), from ``--starts`` draws.

This is the experiment that preceded ``stage1.free_domains`` (``stage1.refine.refine_free_domains``,
the same model; the stage stops at a relative NLL change of 1e-6, this script at 1e-12 or
``--max-iterations``). Printed: Z-score sigma, NLL and misorientation to the domains' mean
orientation, and the RMS angle between each refined domain and the nearest true one.

Measured 2026-12-06 on the 2-core VM (20 shoeboxes, 100 channels, 300 iterations, both seeds side by
side, one per core; about 1 s CPU per evaluation):

| seed | eta: Z, to the mean (deg) | free, start 0: Z, to the mean, domains to the truth's (deg RMS) | start 1 | N | CPU s |
| --- | --- | --- | --- | --- | --- |
| 1 | 5.77, 0.0044 | 0.84, 0.0001, 0.0058 | 0.84, 0.0001, 0.0057 | 57.0 57.0 57.0 | 300, 314 |
| 2 | 7.62, 0.0032 | 1.47, 0.0006, 0.0067 | 1.47, 0.0006, 0.0063 | 57.0 57.1 57.0 | 303, 293 |

Both random starts reach the same NLL (8620 and 8619; 10782 twice), so the minimum is not the
start's: the refinement finds the drawn domains (their start was 0.025-0.045 deg RMS from them).

Usage: .venv/bin/python benchmarks/stage1_free_domains.py [--seeds 1 2 3] [--rois 20] [--starts 2]
       [--domains 25] [--max-iterations 300] [--amplitudes results/structure_factors/amplitudes.h5]
About 1 s per evaluation with 25 domains and 20 shoeboxes on one core: minutes per shot.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from xfel_spread.sim import crystal as xtal
from xfel_spread.stage1.likelihood import z_score_sigma
from xfel_spread.stage1.model import PARAMETER_NAMES, FreeDomainCrystal, Stage1Settings
from xfel_spread.stage1.refine import ShotProblem, refine_shot
from xfel_spread.stage1.scoring import turned_by_mean
from xfel_spread.stage1.synthetic import perturbed_matrix, simulate_shot_pixels, with_start

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_stage1 import add_shot_arguments, model_lookup  # noqa: E402
from stage1_anisotropic_mosaic import rotation_vector  # noqa: E402

#: One scaled unit of a domain's rotation vector component (rad): 0.01 deg.
VECTOR_UNIT = math.radians(0.01)


def rotation_vectors(rotations: np.ndarray) -> np.ndarray:
    """Axis times angle (rad) of rotations (D, 3, 3)."""
    return np.array([rotation_vector(rotation) for rotation in rotations])


def refine_free(problem: ShotProblem, lookup, start_vectors: np.ndarray, max_iterations: int):
    """L-BFGS-B over the stage's refined parameters and the domains' vectors; (values, vectors,
    NLL, evaluations, seconds)."""
    space = problem.space
    n = space.n_refined
    crystal = problem.crystal
    count = [0]

    def evaluate(x: np.ndarray) -> tuple[float, np.ndarray]:
        leaf = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        values = space.physical(leaf[:n])
        crystal.vectors = (VECTOR_UNIT * leaf[n:]).reshape(-1, 3)
        nll = problem.nll(values, problem.bragg(values, lookup))
        nll.backward()
        count[0] += 1
        return float(nll.detach()), leaf.grad.numpy()

    x0 = np.concatenate([np.zeros(n), (start_vectors / VECTOR_UNIT).ravel()])
    bounds = space.scaled_bounds() + [(None, None)] * start_vectors.size
    started = time.process_time()
    result = scipy.optimize.minimize(evaluate, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                     options={"maxiter": max_iterations, "ftol": 1e-12, "gtol": 1e-6})
    values = space.values(result.x[:n])
    vectors = VECTOR_UNIT * result.x[n:].reshape(-1, 3)
    return values, vectors, float(result.fun), count[0], time.process_time() - started


def summary(problem: ShotProblem, lookup, values: np.ndarray, vectors: np.ndarray, truth) -> tuple[float, float, float]:
    """(Z-score sigma, NLL, misorientation to the truth's domain mean in deg) of a free-domain fit."""
    crystal = problem.crystal
    crystal.vectors = torch.as_tensor(vectors)
    with torch.no_grad():
        tensor = torch.as_tensor(values)
        bragg = problem.bragg(tensor, lookup)
        nll = float(problem.nll(tensor, bragg))
        tensors = problem.tensors
        z = z_score_sigma(tensors.background[tensors.trusted] + bragg, tensors.data[tensors.trusted],
                          tensors.readout_variance)
        matrix = crystal.real_space_matrix(tensor).numpy()
        model_mean = turned_by_mean(matrix, crystal.domain_rotations().numpy())
    reference = turned_by_mean(truth.true_matrix, truth.mosaic_rotations)
    return z, nll, xtal.misorientation_deg(model_mean, reference)


def domain_error_deg(vectors: np.ndarray, truth) -> float:
    """RMS angle (deg) from each refined domain's offset to the nearest true domain's (both centred)."""
    true = rotation_vectors(np.asarray(truth.mosaic_rotations))
    true -= true.mean(axis=0)
    model = vectors - vectors.mean(axis=0)
    distance = np.linalg.norm(model[:, None, :] - true[None, :, :], axis=-1).min(axis=1)
    return math.degrees(math.sqrt((distance ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shot_arguments(parser)
    parser.set_defaults(rois=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--domains", type=int, default=25, help="free domains of the model")
    parser.add_argument("--starts", type=int, default=2, help="random draws of the free domains' start")
    parser.add_argument("--max-iterations", type=int, default=300)
    arguments = parser.parse_args()
    table, lookup = model_lookup(arguments)
    eta_settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"]})
    free_settings = Stage1Settings.from_config({})
    print(f"{len(table.energies_ev)} channels, {arguments.rois} shoeboxes, {arguments.domains} free domains, "
          f"{arguments.starts} random starts", flush=True)
    for seed in arguments.seeds:
        truth = simulate_shot_pixels(lookup, table.energies_ev, table.unit_cell, seed, n_rois=arguments.rois,
                                     shoebox=arguments.shoebox, spread_deg=0.05, n_domains=25)
        shot = with_start(truth.shot, perturbed_matrix(truth.true_matrix, truth.shot.shot_index))
        started = time.process_time()
        fit = refine_shot(shot, lookup, eta_settings)
        reference = turned_by_mean(truth.true_matrix, truth.mosaic_rotations)
        print(f"seed {seed}: eta: Z {fit.z_score_sigma_final:.2f} NLL {fit.nll_final:.0f} "
              f"to the mean {xtal.misorientation_deg(fit.real_space_matrix, reference):.4f} deg, "
              f"eta {fit.final['eta_deg']:.4f} (drawn RMS {truth.true_spread_deg:.4f}), "
              f"{fit.n_evaluations} evaluations, {time.process_time() - started:.0f} CPU s", flush=True)

        problem = ShotProblem(shot, free_settings, "cpu")
        problem.crystal = FreeDomainCrystal(shot.real_space_matrix, arguments.domains, "cpu", shot.space_group)
        problem.set_start_from_model(lookup)
        final = np.array([fit.final[name] for name in PARAMETER_NAMES])
        final[PARAMETER_NAMES.index("eta_deg")] = 0.0
        problem.space = dataclasses.replace(problem.space, start=final)
        eta_rad = math.radians(fit.final["eta_deg"])
        starts = [np.random.default_rng(1000 * seed + k).normal(0.0, eta_rad / math.sqrt(3), (arguments.domains, 3))
                  for k in range(arguments.starts)]
        for k, start in enumerate(starts):
            label = f"random start {k}"
            z0, nll0, mis0 = summary(problem, lookup, final, start, truth)
            values, vectors, nll, evaluations, seconds = refine_free(problem, lookup, start, arguments.max_iterations)
            z, nll, mis = summary(problem, lookup, values, vectors, truth)
            print(f"    free domains, {label}: Z {z0:.2f} -> {z:.2f}, NLL {nll0:.0f} -> {nll:.0f}, "
                  f"to the mean {mis0:.4f} -> {mis:.4f} deg, domains from the truth's "
                  f"{domain_error_deg(start, truth):.4f} -> {domain_error_deg(vectors, truth):.4f} deg RMS, "
                  f"N {values[PARAMETER_NAMES.index('Na')]:.1f} {values[PARAMETER_NAMES.index('Nb')]:.1f} "
                  f"{values[PARAMETER_NAMES.index('Nc')]:.1f}, {evaluations} evaluations, {seconds:.0f} CPU s",
                  flush=True)


if __name__ == "__main__":
    main()
