"""Speed and memory of the SPREAD refinement (stage 10) against the number of lattices.

The data are synthetic and made with SPREAD's own model (:mod:`xfel_spread.spread.synthetic`), not
from stage-1 shots: 12 x 12 px shoeboxes, ``--boxes`` per lattice (53 gives ~7,600 pixels per
lattice, LY99's 23 M pixels at 3,000 lattices), 100 channels, 2 sites, a 101-point grid per site and
component (404 global parameters), SASE-like spectra. The coefficients' sparsity is set to what a
real 100-channel LY99 shot's coefficients have at a relative cutoff of 1e-3 (measured on a stage-1
synthetic shot with :mod:`xfel_spread.spread.coefficients`: 9.5 terms per shoebox pixel; 30 without a
cutoff): ``channels_per_px`` 1.6 gives about that many. Arrays are held compact (float32 data and
coefficients, int32 term indices; shoebox numbers stay int64, as torch gathers
with int64 indices 3x faster than with int32).

Prints the set-up, the refinement's wall and CPU time, seconds per lattice, the peak resident memory
(``resource.getrusage``) and the bytes the data hold per lattice.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_spread.py [--lattices 3000] [--iterations 60]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from xfel_spread.spread.fit import Restraints, SpreadProblem, fit
from xfel_spread.spread.model import Decomposition
from xfel_spread.spread.restraints import hilbert_matrix
from xfel_spread.spread.synthetic import sase_spectra, simulate, synthetic_layout
from xfel_spread.spread.tables import energy_grid, interpolation_matrix


def lorentzian_edge(grid, edge_ev):
    """A smooth stand-in for an Fe K edge: an f'' step and its f' dip (electrons)."""
    fdp = 0.5 + 3.5 / (1 + np.exp(-(grid - edge_ev) / 2.0))
    fp = -4.5 - 2.5 * np.exp(-0.5 * ((grid - edge_ev - 2) / 5.0) ** 2)
    return fp, fdp


def compact(data):
    """The same data in float32 / int32 (what a production rank would hold)."""
    data.data = data.data.float()
    data.dx, data.dy = data.dx.float(), data.dy.float()
    data.readout_var = data.readout_var.float()
    data.shot = data.shot.int()
    data.term_pixel, data.term_pair = data.term_pixel.int(), data.term_pair.int()
    data.term_coeff = data.term_coeff.float()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lattices", type=int, default=3000)
    parser.add_argument("--boxes", type=int, default=53, help="shoeboxes per lattice")
    parser.add_argument("--reflections", type=int, default=20000, help="asymmetric-unit reflections")
    parser.add_argument("--iterations", type=int, default=60, help="L-BFGS iterations at most")
    parser.add_argument("--channels-per-px", type=float, default=1.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--covariance", action="store_true", help="also time the covariance and edge sigmas")
    parser.add_argument("--preconditioner-lattices", type=int, default=100,
                        help="lattices of the fit's preconditioner (spread's default), 0 for the plain L-BFGS-B")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    energies = 7070.5 + np.arange(100.0)
    grid = energy_grid(7070.0, 7170.0, 1.0)
    interpolation = interpolation_matrix(grid, energies)
    # Random structure-factor pieces of LY99's magnitudes (|F_rest| ~ 300 e, site sums ~ 4 x 26 e scale).
    n_ref = args.reflections
    f_rest = rng.normal(0, 200, n_ref) + 1j * rng.normal(0, 200, n_ref)
    sites = rng.normal(0, 3, (2, n_ref)) + 1j * rng.normal(0, 3, (2, n_ref))
    decomposition = Decomposition.from_complex(f_rest, sites)
    truth = [lorentzian_edge(grid, 7120.0), lorentzian_edge(grid, 7118.0)]
    fp_true, fdp_true = np.stack([t[0] for t in truth]), np.stack([t[1] for t in truth])
    start = lorentzian_edge(grid, 7112.0)
    fp_start, fdp_start = np.stack([start[0]] * 2), np.stack([start[1]] * 2)

    t0 = time.perf_counter()
    spectra = sase_spectra(args.lattices, energies, rng)
    data = synthetic_layout(args.lattices, args.boxes, n_ref, spectra, rng, box_px=12,
                            channels_per_px=args.channels_per_px, amplitude=3000.0 / 8e4, cutoff=1e-3)
    background = np.zeros((data.n_shoeboxes, 3))
    background[:, 0] = rng.uniform(0.5, 2.0, data.n_shoeboxes)
    data.data = simulate(data, fp_true, fdp_true, interpolation, decomposition, rng.uniform(0.5, 1.5, args.lattices),
                         background, rng)
    data = compact(data)
    setup_s = time.perf_counter() - t0
    n_pixels, n_terms = data.n_pixels, int(data.term_pixel.numel())
    print(f"lattices {args.lattices}, shoeboxes {data.n_shoeboxes}, pixels {n_pixels} "
          f"({n_pixels / args.lattices:.0f} per lattice), terms {n_terms} ({n_terms / n_pixels:.2f} per pixel), "
          f"set-up {setup_s:.1f} s")
    print(f"data held: {data.nbytes() / 1e6:.1f} MB, {data.nbytes() / args.lattices / 1e3:.1f} kB per lattice "
          f"({data.nbytes() / n_pixels:.1f} B per pixel)")

    restraints = Restraints(1.0, 10.0, torch.tensor(fp_start), torch.tensor(fdp_start),
                            torch.tensor(hilbert_matrix(grid)))
    problem = SpreadProblem(data, decomposition, torch.tensor(interpolation), restraints)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fit(problem, fp_start, fdp_start, max_iterations=args.iterations,
                 preconditioner_lattices=args.preconditioner_lattices)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    middle = (grid >= 7100) & (grid <= 7150)
    rms = np.sqrt(np.mean((result.fdp - fdp_true)[:, middle] ** 2))
    print(f"refinement: {wall:.1f} s wall, {cpu:.1f} s CPU, {result.evaluations} evaluations "
          f"({wall / result.evaluations:.2f} s each, the preconditioner's information from "
          f"{args.preconditioner_lattices} lattices included), {wall / args.lattices * 1e3:.1f} ms per lattice; "
          f"{result.message}")
    print(f"peak resident memory {peak_mb:.0f} MB; rms f'' error 7100-7150 eV {rms:.3f} e")
    if args.covariance:
        from xfel_spread.spread.uncertainty import edge_estimates, grid_covariance

        wall0 = time.perf_counter()
        theta = np.concatenate([result.fp.ravel(), result.fdp.ravel()])
        covariance = grid_covariance(problem, theta, result.nuisance)
        edges = edge_estimates(grid, result.fp, result.fdp, covariance)
        wall = time.perf_counter() - wall0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        print(f"covariance and edges: {wall:.1f} s ({wall / args.lattices * 1e3:.1f} ms per lattice), peak "
              f"{peak_mb:.0f} MB; median f'' sigma {np.median(np.sqrt(np.diag(covariance))[2 * grid.size:]):.3f} e; "
              + "; ".join(f"site {s}: half-rise {e.half_rise_ev:.2f} +- {e.half_rise_sigma_ev:.2f} eV"
                          for s, e in enumerate(edges)))


if __name__ == "__main__":
    main()
