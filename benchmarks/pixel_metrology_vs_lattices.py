"""Beam-centre error of the detector from the pixels against the number of lattices.

Simulates LY99 lattices (``stage1.synthetic.simulate_shot_pixels``: the project's simulator, 10 of the
100 channels, ``--rois`` shoeboxes per lattice around the strongest spots, photon and readout noise)
imaged with the beam centre ``--offset`` px off the nominal one along fast and slow, starts every
lattice from its true crystal on the nominal detector, and refines the level-0 detector jointly with
the first N lattices (``stage1.metrology.refine_detector``, what the ``pixel_metrology`` rule runs),
for each N of ``--lattices``. Prints the refined beam centre minus the true one (px), its robust
standard error along fast and slow (``profile`` only), the distance shift (mm, truth 0) and the wall
seconds; ``--offset 0`` is the control, where any shift found is bias.
The lattices are nested: the first 25 of the 50 are the 25. ``--domains 25`` draws each lattice as LY99's
25 mosaic domains of RMS ``--spread`` (0.05 deg), refined without eta unless ``--eta``; the figures
with and without domains are in the README (section 'The detector from the pixels').

DIALS's figure on the same lattices would need images DIALS indexes; it is measured on a finished
run by benchmarks/metrology_vs_lattices.py (0.04-0.065 px left of 0.5 px, flat from 50 to 200).

Usage: .venv/bin/python benchmarks/pixel_metrology_vs_lattices.py [--lattices 25 50 100 200]
           [--offset 0.5] [--rois 10] [--threads 1] [--method profile joint] [--domains 1] [--spread 0.05]
           [--eta] [--reference-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from xfel_spread.config import load_config
from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.sim.structure_factors import channel_energies, compute_channel_amplitudes, expand_to_p1_grid
from xfel_spread.stage1.metrology import refine_detector
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.synthetic import LY99_DETECTOR, simulate_shot_pixels, with_start

REPO = Path(__file__).resolve().parents[1]
#: The channels simulated and refined (as tests/test_stage1_metrology.py): 10 of the 100, 6 eV apart.
CHANNELS = np.arange(20, 80, 6)


def lookup_and_energies(reference: Path):
    settings = load_config({})["structure_factors"]
    energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
    table = compute_channel_amplitudes(str(reference / "1m2a.pdb"), str(reference / "pf-rd-ox_fftkk.out"),
                                       str(reference / "pf-rd-red_fftkk.out"), energies[CHANNELS],
                                       settings["d_min_a"], settings["k_sol"], settings["b_sol"])
    return AmplitudeLookup(expand_to_p1_grid(table), "cpu"), table.energies_ev, table.unit_cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lattices", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--offset", type=float, nargs="+", default=[0.5, 0.0],
                        help="beam-centre offsets (px, along fast and slow) of the images; 0 is the control")
    parser.add_argument("--rois", type=int, default=10, help="shoeboxes per lattice")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", choices=["profile", "joint"], nargs="+", default=["profile"],
                        help="step 2 of stage1.metrology.refine_detector; several: each on the same lattices")
    parser.add_argument("--domains", type=int, default=1,
                        help="mosaic domains per lattice (LY99 drew 25); 1 is the ideal single-domain lattice")
    parser.add_argument("--spread", type=float, default=0.05, help="RMS domain angle (deg) with --domains above 1")
    parser.add_argument("--eta", action="store_true", help="refine eta (analytic) with each lattice's other parameters")
    parser.add_argument("--reference-dir", default=str(REPO.parent / "shared" / "data"))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    lookup, energies, unit_cell = lookup_and_energies(Path(arguments.reference_dir))
    settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"]} if arguments.eta else {})
    spread = arguments.spread if arguments.domains > 1 else 0.0
    print(f"{len(energies)} channels, {arguments.rois} shoeboxes per lattice, {arguments.domains} mosaic domain(s) "
          f"of RMS {spread:g} deg, eta {'refined' if arguments.eta else 'not refined'}, {arguments.threads} thread(s)")
    print(f"{'offset':>7s} {'lattices':>9s} {'kept':>5s} {'fast - true (px)':>17s} {'slow - true (px)':>17s} "
          f"{'|error| (px)':>13s} {'robust sigma (px)':>18s} {'distance (mm)':>14s} {'iterations':>11s} "
          f"{'time (s)':>9s} {'s/lattice':>10s}",
          flush=True)
    for offset in arguments.offset:
        true_detector = LY99_DETECTOR.with_beam_center_offset_px((offset, offset))
        shots = []
        for count in sorted(arguments.lattices):
            for seed in range(len(shots) + 1, count + 1):
                synthetic = simulate_shot_pixels(lookup, energies, unit_cell, seed=seed, n_rois=arguments.rois,
                                                 detector=true_detector, n_domains=arguments.domains,
                                                 spread_deg=spread)
                shots.append(with_start(synthetic.shot, synthetic.true_matrix, LY99_DETECTOR))
            for method in arguments.method:
                fit = refine_detector(shots[:count], lookup, settings, method=method)
                error = fit.shift[:2] - offset
                state = "" if fit.converged else f"  NOT converged: {fit.reason}"
                sigma = "n/a" if fit.sigma_robust is None else f"{fit.sigma_robust[0]:.4f} {fit.sigma_robust[1]:.4f}"
                print(f"{offset:7.2f} {count:9d} {len(fit.kept):5d} {error[0]:+17.4f} {error[1]:+17.4f} "
                      f"{np.hypot(*error):13.4f} {sigma:>18s} {fit.shift[2]:+14.4f} {fit.n_iterations:11d} {fit.seconds:9.1f} "
                      f"{fit.seconds / count:10.2f}  {method}, {fit.n_evaluations} evaluations, NLL "
                      f"{fit.nll_start:.6f} -> {fit.nll_final:.6f}{state}", flush=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
