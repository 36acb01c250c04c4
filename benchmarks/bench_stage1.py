"""Seconds per shot of the per-shot pixel refinement and of its batched path (stage1.batched, what the exa rule runs).

Shots are simulated with the project's simulator (``xfel_spread.stage1.synthetic``): the LY99 panel,
all channels of the amplitude table, ``--rois`` shoeboxes of ``--shoebox`` px around the strongest
spots, LY99's crystal (N 57, G 93.75). Each refinement starts from the truth turned by 0.05 degrees
with a, b, c and beta off by 0.3 %, and N at the LY99 start (72). Printed per path: seconds per shot
(median; CPU time too, as other jobs on the machine inflate wall time), iterations, centroid RMSD
before and after, misorientation to the truth before and after,
refined N, G (93.75 is the truth) and eta.

  1. ``refine_shot`` on the CPU, torch threads as set (default refinement: G, rotation, cell, N; with
     ``--eta``, eta too, with 25 mosaic domains, on shots simulated with LY99's 25 domains and 0.05
     degree spread);
  2. ``refine_batch`` on ``--device`` with all shots in one batch, and its largest parameter
     differences from ``refine_shot``.

Usage: .venv/bin/python benchmarks/bench_stage1.py [--shots 3] [--rois 50] [--shoebox 12] [--eta]
       [--domains 25] [--eta-model analytic|domains] [--draw gaussian|nanobragg] [--threads 1]
       [--device cpu|cuda] [--amplitudes results/structure_factors/amplitudes.h5]
The amplitude table defaults to the demo run's; without it, it is computed from ../shared/data.

Measured on the 2-core AMD EPYC VM, one torch thread, 2026-12-05, with other jobs running (load 4-6
on 2 cores, so wall time is 2-4x CPU time; CPU time is the figure to compare), when a CPU batch still
ran the batched kernel (one shot's pixels at a time) and so took rounding-different paths:

| run | refine_shot CPU s/lattice | refine_batch CPU s/lattice (3 per batch) |
| --- | --- | --- |
| default (G, rotation, cell, N), 50 shoeboxes | 13.25; 12.27 (a second run) | 15.59; 13.65 (540 evaluations against 505: about 76 against 73 ms each) |
| default, 20 shoeboxes | 4.64 | 4.76 |
| ``--eta --rois 20`` (analytic, gaussian draw) | 8.39 | 9.00 |
| ``--eta --rois 20 --draw nanobragg`` | 8.07 | 8.06 |

Since 2026-12-06 a batch on a CPU evaluates each shot by its dense model (``BatchedForwardModel``'s
``gathered`` off), so every shot takes refine_shot's path to the bit: the same evaluations, the same
fits (largest difference printed: 0). Measured that day, one torch thread, a pixel-metrology job on
the other core; CPU seconds per lattice, the mean over the shots (a batch has one time for all):

| run | refine_shot | refine_batch |
| --- | --- | --- |
| default, 50 shoeboxes, ``--shots 4`` | 13.08 | 13.12 |
| default, 20 shoeboxes (wall: the CPU mean was not printed then) | 6.04 | 6.01 |
| ``--eta --rois 20 --shots 4`` | 8.85 | 9.55 |
| default, 50 shoeboxes, ``--gathered`` (the GPU's kernel on the CPU; wall) | 15.06 | 14.83 |

The eta row's 8 % is the machine: refining one such shot both ways twice (208 evaluations each), the
CPU outside the evaluations was 0.14 and 0.15 s per lattice for refine_shot and refine_batch, while
the evaluations themselves took 10.32, 10.46, 10.51 and 11.79 s from run to run.

With ``--eta`` the refined N (median per lattice) was -2.6, +5.5, +1.3 % of 57 (gaussian draw) and
+1.8, +0.1, -1.3 % (nanoBragg's), eta 0.0526, 0.0633, 0.0686 deg against the drawn domains' RMS
0.0507, 0.0459, 0.0602 (gaussian) and 0.0533, 0.0509, 0.0429 against 0.0520, 0.0480, 0.0490
(nanoBragg's). One evaluation (forward and backward, 20 shoeboxes, 100 channels) cost 33 ms CPU
without eta, 42 ms with one analytic average, 52 ms with two, 976 ms with 25 sampled domains.

After 19a3cb4 (the dense kernels take h one component at a time; ``sim.forward``), same day, the two
runs side by side, one per core: default, 50 shoeboxes, ``--shots 4``: 9.80 (refine_shot) and 8.83
(refine_batch) CPU s per lattice; ``--eta --rois 20 --shots 4``: 8.10 and 7.07. Each shot took the
same evaluations both ways (largest difference 0); the gap between the two is the machine's.

**What 25 domains leave** (``--eta --rois 20 --shots 5`` with ``--domains 25`` and ``--domains 400``,
2026-12-06, the two runs side by side, one per core; misorientation also printed to the drawn
domains' mean orientation, the stage-1 score's reference):

| domains | to the domains' mean (deg), shots 1-5 | median N | eta - drawn RMS (deg) | Z-score sigma | refine_shot / refine_batch CPU s per lattice |
| --- | --- | --- | --- | --- | --- |
| 25 | 0.0044, 0.0032, 0.0050, 0.0041, 0.0013 | -2.6 to +5.5 % | +0.002 to +0.017 | 4.8-7.6 | 8.36 / 10.29 |
| 400 | 0.0015, 0.0008, 0.0012, 0.0009, 0.0009 | -1.7 to -0.1 % | -0.002 to +0.001 | 1.7-2.5 | 9.65 / 8.25 |

With a smooth mosaic (400 domains) the analytic eta meets the orientation, N and eta goals with margin
(median 0.0009 deg to the mean). With LY99's 25 the orientation stops near 0.004 deg on these ideal
shots (0.006 on the demo's): the spots show the particular domains, which no smooth spread model
follows. The Z-score stays above 1 even at 400 domains: at 1e12 photons a strong spot's pixels hold
1e4-1e5 photons, so the averaged model's few-percent shape error outweighs their Poisson noise.
The batch's CPU per lattice was 1.23 and 0.85 times refine_shot's: the batched shots take other
numbers of evaluations along rounding-different paths; per evaluation the two are the same work.

Since d86b6e4 (2026-12-07) a shot's evaluations skip the terms beyond the cut-off
(``bragg_photons_pixels`` for one sharp domain, ``bragg_photons_mosaic_pixels`` for the analytic eta;
the batch on a CPU takes the same). Measured that day on the AMD EPYC VM, one torch thread, the two
runs side by side, one per core; CPU seconds per lattice, the mean over 4 shots; every shot ended at
the fits printed above (the eta run's N and eta to the printed figure), the batch at refine_shot's to
the bit:

| run | refine_shot | refine_batch |
| --- | --- | --- |
| default, 50 shoeboxes, ``--shots 4`` | 2.38 | 1.95 |
| ``--eta --rois 20 --shots 4`` | 3.30 | 3.19 |

With the compiled per-term loop (``sim.fused``, b98def2; a later session, same VM, same protocol):
default 1.71 (refine_shot) and 1.85 (refine_batch); ``--eta --rois 20`` 2.87 and 2.58. The same
evaluations and fits as above; the batch equal to refine_shot to the bit.

``BatchedForwardModel.nll_and_gradients`` over 3 shots of 50 shoeboxes cost 72-76 ms CPU per shot
with the kernel fed one shot at a time (the CPU default), 79-83 with gathered per-pixel inputs, the
dense per-shot evaluation 73-76 (two alternating runs in one process).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from xfel_spread.config import load_config
from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.sim.structure_factors import (
    channel_energies,
    compute_channel_amplitudes,
    expand_to_p1_grid,
    load_channel_amplitudes,
)
from xfel_spread.stage1.batched import BatchedForwardModel, refine_batch
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.refine import refine_shot
from xfel_spread.stage1.scoring import turned_by_mean
from xfel_spread.stage1.synthetic import perturbed_matrix, simulate_shot_pixels, with_start

REPO = Path(__file__).resolve().parents[1]


def add_shot_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage-1 timing benchmark takes: lattices, shoeboxes, threads, and where the
    amplitude table (or the shared data it is computed from) is."""
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--rois", type=int, default=50)
    parser.add_argument("--shoebox", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--amplitudes", default=str(REPO / "results" / "structure_factors" / "amplitudes.h5"))
    parser.add_argument("--reference-dir", default=str(REPO.parent / "shared" / "data"))


def model_lookup(arguments: argparse.Namespace):
    """torch's threads set from ``arguments``; the LY99 amplitude table and its CPU lookup."""
    torch.set_num_threads(arguments.threads)
    table = amplitude_table(Path(arguments.amplitudes), Path(arguments.reference_dir))
    return table, AmplitudeLookup(expand_to_p1_grid(table), "cpu")


def amplitude_table(path: Path, reference: Path):
    if path.exists():
        return load_channel_amplitudes(str(path))
    settings = load_config({})["structure_factors"]
    energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
    return compute_channel_amplitudes(str(reference / "1m2a.pdb"), str(reference / "pf-rd-ox_fftkk.out"),
                                      str(reference / "pf-rd-red_fftkk.out"), energies, settings["d_min_a"],
                                      settings["k_sol"], settings["b_sol"])


def report(label: str, fits, truths, seconds: list[float], cpu_seconds: list[float]) -> None:
    misorientation = [(xtal.misorientation_deg(fit.start_real_space_matrix, truth.true_matrix),
                       xtal.misorientation_deg(fit.real_space_matrix, truth.true_matrix),
                       xtal.misorientation_deg(fit.real_space_matrix,
                                               turned_by_mean(truth.true_matrix, truth.mosaic_rotations)))
                      for fit, truth in zip(fits, truths)]
    print(f"{label}: {statistics.median(seconds):6.2f} s/lattice wall (median of {len(seconds)}: "
          + ", ".join(f"{s:.2f}" for s in seconds) + f"; mean {statistics.fmean(seconds):.2f}), "
          f"{statistics.median(cpu_seconds):6.2f} s/lattice CPU (mean {statistics.fmean(cpu_seconds):.2f}, "
          "the figure a batch's one time compares with)")
    for fit, truth, (before, after, to_mean) in zip(fits, truths, misorientation):
        n = [fit.final[name] for name in ("Na", "Nb", "Nc")]
        print(f"    shot {fit.shot_index}: converged {fit.converged} {fit.reason} iterations {fit.n_iterations}, "
              f"evaluations {fit.n_evaluations}; RMSD {fit.rmsd_px_start:.3f} -> {fit.rmsd_px:.3f} px "
              f"(radial {fit.radial_rmsd_px_start:.3f} -> {fit.radial_rmsd_px:.3f}); misorientation "
              f"{before:.4f} -> {after:.4f} deg (to the domains' mean {to_mean:.4f}); N {n[0]:.1f} {n[1]:.1f} {n[2]:.1f} "
              f"(median {100 * (statistics.median(n) / truth.true_ncells - 1):+.1f} % of {truth.true_ncells:g}); "
              f"G {fit.final['G']:.2f}; eta {fit.final['eta_deg']:.4f} deg (drawn RMS {truth.true_spread_deg:.4f}); "
              f"Z-score sigma {fit.z_score_sigma_final:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shot_arguments(parser)
    parser.add_argument("--eta", action="store_true", help="refine eta too, on shots drawn with 25 domains of RMS 0.05 deg")
    parser.add_argument("--domains", type=int, default=25,
                        help="mosaic domains drawn per shot with --eta (LY99's 25; more make the spread smooth)")
    parser.add_argument("--eta-model", default="analytic", choices=["analytic", "domains"])
    parser.add_argument("--draw", default="gaussian", choices=["gaussian", "nanobragg"],
                        help="the simulator's mosaic draw, and the refinement's stage1.mosaic_model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gathered", action="store_true",
                        help="the batch through the gathered kernel (a GPU's way) on a CPU too")
    arguments = parser.parse_args()
    table, lookup = model_lookup(arguments)
    print(f"torch threads {torch.get_num_threads()}, {len(table.energies_ev)} channels, {arguments.rois} shoeboxes "
          f"of {arguments.shoebox} x {arguments.shoebox} px per shot")

    if arguments.eta:
        spread = 0.05 if arguments.draw == "gaussian" else 0.05 / xtal.NANOBRAGG_RMS_FRACTION
        domains = arguments.domains
        label = (f"G, rotation, cell, N, eta ({arguments.eta_model}, {arguments.draw} draw of {domains} domains, "
                 f"RMS 0.05 deg)")
        settings = Stage1Settings.from_config({"refine": ["G", "rotation", "cell", "ncells", "eta"],
                                               "eta_model": arguments.eta_model, "mosaic_model": arguments.draw})
    else:
        label, spread, domains = "G, rotation, cell, N", 0.0, 1
        settings = Stage1Settings.from_config({})
    truths = [simulate_shot_pixels(lookup, table.energies_ev, table.unit_cell, seed, n_rois=arguments.rois,
                                   shoebox=arguments.shoebox, spread_deg=spread, n_domains=domains,
                                   mosaic_model=arguments.draw)
              for seed in range(1, arguments.shots + 1)]
    shots = [with_start(truth.shot, perturbed_matrix(truth.true_matrix, truth.shot.shot_index)) for truth in truths]
    singles, cpu_seconds = [], []
    for shot in shots:
        started = time.process_time()
        singles.append(refine_shot(shot, lookup, settings))
        cpu_seconds.append(time.process_time() - started)
    report(f"refine_shot, cpu, {label}", singles, truths, [fit.seconds for fit in singles], cpu_seconds)

    device = torch.device(arguments.device)
    model = BatchedForwardModel(lookup, table.energies_ev, device, gathered=True if arguments.gathered else None)
    if device.type == "cuda":
        refine_batch(shots[:1], model, settings)  # warm-up: CUDA context and kernels
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    fits = refine_batch(shots, model, settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_shot = (time.perf_counter() - started) / len(shots)
    cpu_per_shot = (time.process_time() - cpu_started) / len(shots)
    kernel = "gathered" if model.gathered else "each shot's own model"
    report(f"refine_batch, {device} ({kernel}), {label}, {len(shots)} shots per batch", fits, truths, [per_shot],
           [cpu_per_shot])
    worst = {name: max(abs(a.final[name] - b.final[name]) for a, b in zip(fits, singles)) for name in fits[0].final}
    print("    largest difference refine_batch - refine_shot: "
          + ", ".join(f"{name} {value:.1e}" for name, value in worst.items()))


if __name__ == "__main__":
    main()
