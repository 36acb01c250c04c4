"""Seconds per lattice of stage 1's refinement on 64-tile detectors against the single LY99 panel.

The same crystals (LY99 cell, N 57, G 93.75, seeds 1..``--shots``), spectra and amplitude table are
simulated with the project's simulator (``xfel_spread.stage1.synthetic``) on each detector, with
``--rois`` shoeboxes of ``--shoebox`` px round the strongest spots (on a tiled detector each box lies
inside one tile), and refined with ``refine_shot`` (G, rotation, cell, N) from the truth turned by
0.05 degrees with a, b, c and beta 0.3 % off. Detectors:

  1. ``single``: the LY99 Rayonix panel (3840 x 3840 px of 0.088 mm at 141.7 mm);
  2. ``ly99-64-tiles``: the same panel cut into 8 x 8 abutting tiles (the same pixels, so the same
     spots except those a tile edge cuts: what the per-panel frames cost);
  3. ``cspad-like``: ``sim.geometry.cspad_like_layout``, 64 tiles of 194 x 185 px of 0.088 mm at 141.7 mm,
     quadrants turned by 90 degrees, tiles shifted by up to 1 px and tilted by up to 0.2 degrees;
  4. ``real-cspad``: the real CSPAD's 64 tiles read from ``../shared/data/real/thermolysin_cspad/``
     with dxtbx (0.11 mm pixels, its own distance), when the file is there.

Printed per detector: seconds per lattice (median wall and CPU time; other jobs inflate wall time),
the ratio to the first detector, CPU microseconds per trusted pixel and evaluation (the pixels and the
iterations differ between detectors, this does not depend on them), the ROIs' median signal, iterations, misorientation before and after, RMSD after, and the
seconds of one whole-detector sparse image. ``--batched`` also times ``refine_batch`` (all shots in
one batch).

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_multipanel.py [--shots 3] [--rois 50] [--shoebox 12]
       [--threads 1] [--batched] [--amplitudes results/structure_factors/amplitudes.h5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_stage1 import add_shot_arguments, model_lookup

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import Beam, CrystalState, bragg_photons_sparse
from xfel_spread.sim.geometry import MultiPanelDetector, cspad_like_layout
from xfel_spread.stage1.batched import BatchedForwardModel, refine_batch
from xfel_spread.stage1.model import REFERENCE_BEAM_SIZE_M, Stage1Settings
from xfel_spread.stage1.refine import refine_shot
from xfel_spread.stage1.synthetic import (
    LY99_DETECTOR,
    LY99_DOMAINS_PER_CRYSTAL,
    perturbed_matrix,
    simulate_shot_pixels,
    with_start,
)

REPO = Path(__file__).resolve().parents[1]
CSPAD_CBF = REPO.parent / "shared" / "data" / "real" / "thermolysin_cspad" / "idx-20130301060858401.cbf"


def detectors() -> dict:
    found = {"single": LY99_DETECTOR, "ly99-64-tiles": MultiPanelDetector.split(LY99_DETECTOR, 8, 8),
             "cspad-like": cspad_like_layout(distance_mm=LY99_DETECTOR.distance_mm, pixel_size_mm=0.088,
                                             thickness_mm=LY99_DETECTOR.thickness_mm,
                                             attenuation_length_mm=LY99_DETECTOR.attenuation_length_mm)}
    if CSPAD_CBF.is_file():
        from dxtbx.model.experiment_list import ExperimentListFactory

        dxtbx_detector = ExperimentListFactory.from_filenames([str(CSPAD_CBF)])[0].detector
        found["real-cspad"] = MultiPanelDetector.from_dxtbx(dxtbx_detector)
    return found


def sparse_seconds(detector, table, lookup, truth) -> float:
    beam = Beam(torch.as_tensor(table.energies_ev), torch.as_tensor(truth.shot.photons), REFERENCE_BEAM_SIZE_M, 1.0)
    crystal = CrystalState(torch.as_tensor(truth.true_matrix)[None], torch.full((3,), 57.0, dtype=torch.float64),
                           torch.tensor(LY99_DOMAINS_PER_CRYSTAL, dtype=torch.float64))
    started = time.perf_counter()
    bragg_photons_sparse(detector, beam, crystal, lookup)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shot_arguments(parser)
    parser.add_argument("--batched", action="store_true")
    parser.add_argument("--detectors", nargs="+", default=["single", "ly99-64-tiles", "cspad-like", "real-cspad"],
                        help="which detectors to time (the first is the reference)")
    arguments = parser.parse_args()
    table, lookup = model_lookup(arguments)
    settings = Stage1Settings.from_config({})
    print(f"torch threads {torch.get_num_threads()}, {len(table.energies_ev)} channels, up to {arguments.rois} "
          f"shoeboxes of {arguments.shoebox} x {arguments.shoebox} px per lattice, {arguments.shots} lattices")
    reference = None
    available = detectors()
    for name in arguments.detectors:
        if name not in available:
            print(f"{name}: not available")
            continue
        detector = available[name]
        truths = [simulate_shot_pixels(lookup, table.energies_ev, table.unit_cell, seed, n_rois=arguments.rois,
                                       shoebox=arguments.shoebox, detector=detector)
                  for seed in range(1, arguments.shots + 1)]
        shots = [with_start(truth.shot, perturbed_matrix(truth.true_matrix, truth.shot.shot_index)) for truth in truths]
        fits, cpu = [], []
        for shot in shots:
            started = time.process_time()
            fits.append(refine_shot(shot, lookup, settings))
            cpu.append(time.process_time() - started)
        wall = statistics.median(fit.seconds for fit in fits)
        cpu_median = statistics.median(cpu)
        per_pixel = [seconds / max(1, fit.n_trusted_pixels * fit.n_evaluations) * 1e6 for fit, seconds in zip(fits, cpu)]
        if reference is None:
            reference = (wall, cpu_median, statistics.median(per_pixel))
        panels = 1 if not isinstance(detector, MultiPanelDetector) else len(detector)
        print(f"{name} ({panels} panel{'s' if panels > 1 else ''}): refine_shot {wall:.2f} s/lattice wall, "
              f"{cpu_median:.2f} s CPU (medians of " + ", ".join(f"{fit.seconds:.2f}" for fit in fits)
              + f"); ratio to single panel {wall / reference[0]:.3f} wall, {cpu_median / reference[1]:.3f} CPU; "
              f"{statistics.median(per_pixel):.2f} us CPU per trusted pixel and evaluation "
              f"(ratio {statistics.median(per_pixel) / reference[2]:.3f})")
        for fit, truth in zip(fits, truths):
            panels_used = (len(set(truth.shot.roi_panel.tolist())) if truth.shot.roi_panel is not None else 1)
            signal = np.bincount(truth.shot.pixel_roi, truth.shot.data_photons - truth.shot.background_photons)
            print(f"    lattice {fit.shot_index}: {fit.n_rois} ROIs on {panels_used} panel(s), "
                  f"{fit.n_trusted_pixels} px, median ROI signal {np.median(signal):.0f} photons, converged {fit.converged} {fit.reason}, iterations {fit.n_iterations}, "
                  f"evaluations {fit.n_evaluations}; misorientation "
                  f"{xtal.misorientation_deg(fit.start_real_space_matrix, truth.true_matrix):.4f} -> "
                  f"{xtal.misorientation_deg(fit.real_space_matrix, truth.true_matrix):.5f} deg; RMSD "
                  f"{fit.rmsd_px_start:.3f} -> {fit.rmsd_px:.4f} px")
        if arguments.batched:
            model = BatchedForwardModel(lookup, table.energies_ev, "cpu")
            started = time.perf_counter()
            refine_batch(shots, model, settings)
            print(f"    refine_batch: {(time.perf_counter() - started) / len(shots):.2f} s/lattice wall")
        print(f"    one whole-detector sparse image (seed 1, no mosaic): {sparse_seconds(detector, table, lookup, truths[0]):.2f} s")


if __name__ == "__main__":
    main()
