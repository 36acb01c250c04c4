"""How many free domains does a shot need? ``stage1.free_domains`` D against the shot's 25, and the cost.

``stage1.free_domains`` refines each shot as D mosaic domains of free rotation vectors after the
analytic eta (``stage1.refine.refine_free_domains``). Its cost grows with D (each evaluation draws
every domain's spots over all channels), so a run that cannot afford 25 would like to know what fewer
give. This benchmark runs the stage's own ``refine_shot`` on synthetic shots of 25 drawn domains of
RMS 0.05 deg (``stage1.synthetic.simulate_shot_pixels``; LY99's crystal, ``--rois`` shoeboxes, all
channels; the start is the truth turned by 0.05 deg with the cell off by 0.3 %, as
``bench_stage1.py``), with ``stage1.refine: [G, rotation, cell, ncells, eta]`` and each D of
``--domains`` (0: the eta alone), and prints per fit: misorientation to the domains' mean orientation
(the score's reference), Z-score sigma, N, the refined RMS angle (eta_deg) against the drawn one,
iterations and CPU seconds (one torch thread).

Measured: see the README's "Free mosaic domains" (figures with the machine they ran on).

Usage: .venv/bin/python benchmarks/stage1_free_domain_count.py [--seeds 1 2] [--domains 0 5 10 25]
       [--starts 1] [--rois 20] [--amplitudes results/structure_factors/amplitudes.h5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xfel_spread.sim import crystal as xtal
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.refine import refine_shot
from xfel_spread.stage1.scoring import turned_by_mean
from xfel_spread.stage1.synthetic import perturbed_matrix, simulate_shot_pixels, with_start

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_stage1 import add_shot_arguments, model_lookup  # noqa: E402

#: The simulated shots' mosaic: domains and their RMS angle (deg), as the LY99 run's.
TRUE_DOMAINS = 25
TRUE_SPREAD_DEG = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shot_arguments(parser)
    parser.set_defaults(rois=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--domains", type=int, nargs="+", default=[0, 5, 10, 25],
                        help="stage1.free_domains values to run (0: the analytic eta alone)")
    parser.add_argument("--starts", type=int, default=1, help="stage1.free_domains_starts")
    arguments = parser.parse_args()
    table, lookup = model_lookup(arguments)
    print(f"{len(table.energies_ev)} channels, {arguments.rois} shoeboxes, {TRUE_DOMAINS} drawn domains of RMS "
          f"{TRUE_SPREAD_DEG} deg, {arguments.starts} start(s), "
          f"{arguments.threads} torch thread(s)", flush=True)
    print("| seed | D | to the mean (deg) | Z | Na Nb Nc | RMS angle (deg; drawn) | iterations | CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed in arguments.seeds:
        truth = simulate_shot_pixels(lookup, table.energies_ev, table.unit_cell, seed, n_rois=arguments.rois,
                                     shoebox=arguments.shoebox, spread_deg=TRUE_SPREAD_DEG, n_domains=TRUE_DOMAINS)
        shot = with_start(truth.shot, perturbed_matrix(truth.true_matrix, truth.shot.shot_index))
        reference = turned_by_mean(truth.true_matrix, truth.mosaic_rotations)
        for domains in arguments.domains:
            settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"],
                                                   "free_domains": domains,
                                                   "free_domains_starts": arguments.starts})
            started = time.process_time()
            fit = refine_shot(shot, lookup, settings)
            seconds = time.process_time() - started
            final = fit.final
            print(f"| {seed} | {domains} | {xtal.misorientation_deg(fit.real_space_matrix, reference):.4f} | "
                  f"{fit.z_score_sigma_final:.2f} | {final['Na']:.1f} {final['Nb']:.1f} {final['Nc']:.1f} | "
                  f"{final['eta_deg']:.4f} ({truth.true_spread_deg:.4f}) | {fit.n_iterations} | {seconds:.0f} |"
                  + ("" if fit.converged else f" not converged: {fit.reason}"), flush=True)


if __name__ == "__main__":
    main()
