"""How much of the domains' mean orientation a lattice's pixels show: the floor of stage 1's orientation goal.

Stage 1's orientation goal is scored against the mean orientation of the simulated crystal's 25 mosaic
domains (``stage1.scoring.domain_mean_matrix``). On a still, a domain lights the shoeboxes only where
one of its reflections meets the Ewald sphere within the spectrum, so some domains put few or no
photons into them: the pixels cannot say where those domains are, and their share of the mean is
unseen by any refinement. This benchmark evaluates, on every lattice a completed run's score counts,
the forward model at the truth one domain at a time (the simulated matrix turned by that domain's
rotation, the true N, stage 1's trusted pixels, the run's point spread): the photons each domain puts
into the shoeboxes. It prints per lattice how many domains carry 90 % of those photons, the angle
between the domains' mean and their photon-weighted mean (the orientation the pixels weigh), and the
refined crystal's misorientation to each (``stage1/<dataset>/shard_*_refined.expt``), with the medians.

Usage: .venv/bin/python benchmarks/stage1_orientation_floor.py [--dataset nopsf] [--results results]
25 one-domain evaluations per lattice: 2-4 s per lattice on one core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations
from xfel_spread.sim import crystal as xtal
from xfel_spread.stage1.scoring import SPACE_GROUP, domain_mean_matrix

from stage1_rmsd_floor import completed_run, median, scored_lattices, truth_problem  # noqa: E402 - a sibling, run from benchmarks/


def domain_photons(shot, truth: dict, settings, amplitudes, psf) -> np.ndarray:
    """Bragg photons (D,) each of the truth's domains puts into ``shot``'s trusted pixels."""
    photons = []
    for rotation in np.asarray(truth["mosaic_rotations"], dtype=np.float64):
        problem, values = truth_problem(shot, truth, settings, psf, rotation[None])
        with torch.no_grad():
            photons.append(float(problem.bragg(values, amplitudes).sum()))
    return np.asarray(photons)


def weighted_mean_matrix(truth: dict, weights: np.ndarray) -> np.ndarray:
    """The truth's matrix turned by the rotation nearest the ``weights``-weighted mean of its domains'."""
    rotations = np.asarray(truth["mosaic_rotations"], dtype=np.float64)
    mean = xtal.nearest_rotation(np.tensordot(weights / weights.sum(), rotations, axes=1))
    return np.asarray(truth["real_space_a_b_c"], dtype=np.float64) @ mean.T


def refined_matrices(results: Path, dataset: str, shard: str) -> list[np.ndarray]:
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(results / "stage1" / dataset / f"{shard}_refined.expt"),
                                           check_format=False)
    return [np.array([list(v) for v in experiment.crystal.get_real_space_vectors()], dtype=np.float64)
            for experiment in experiments]


def main() -> None:
    results, dataset, settings, psf = completed_run(__doc__.splitlines()[0])
    print(f"{dataset}: the domains' mean against the orientation their photons weigh (deg); "
          f"point spread {'modelled' if psf else 'none'}")
    print("shot  domains(90 %)  mean->weighted  refined->mean  refined->weighted")
    rows: list[dict[str, float]] = []
    refined_by_shard: dict[str, list[np.ndarray]] = {}
    symmetry = point_group_rotations(SPACE_GROUP)
    for shard, lattice, shot, _row, truth, amplitudes in scored_lattices(results, dataset, settings,
                                                                          strong_only=False):
        if shard not in refined_by_shard:
            refined_by_shard[shard] = refined_matrices(results, dataset, shard)
        refined = refined_by_shard[shard][lattice]
        photons = domain_photons(shot, truth, settings, amplitudes, psf)
        share = np.sort(photons)[::-1].cumsum() / photons.sum()
        mean, weighted = domain_mean_matrix(truth), weighted_mean_matrix(truth, photons)
        rows.append({"lit": int(np.searchsorted(share, 0.9) + 1),
                     "unseen": misorientation_deg(weighted, mean, symmetry),
                     "refined": misorientation_deg(refined, mean, symmetry),
                     "refined_weighted": misorientation_deg(refined, weighted, symmetry)})
        print(f"{shot.shot_index:4d}  " + "  ".join(f"{rows[-1][name]:{width}}" for name, width in
                                                      zip(rows[-1], ("13d", "14.4f", "13.4f", "17.4f"))), flush=True)
    middle = {name: median([row[name] for row in rows]) for name in ("lit", "unseen", "refined", "refined_weighted")}
    print(f"median over {len(rows)} lattices: domains carrying 90 % {middle['lit']:.0f}, mean to weighted mean "
          f"{middle['unseen']:.4f}, refined to the mean {middle['refined']:.4f}, refined to the weighted mean "
          f"{middle['refined_weighted']:.4f}")


if __name__ == "__main__":
    main()
