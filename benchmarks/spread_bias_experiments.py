"""Experiments on the FE1 half-rise bias of SPREAD's recovery (issue 16): the same subset shots as
``bench_spread_recovery.py`` (true geometry, nopsf), fitted with variants of the data and settings.

Variants (``--fits``, each ``name:key=value,...``): ``data`` noisy|expected (the noise-free expected
photons as data), ``smooth`` and ``kk`` (restraint weights), ``readout`` (the likelihood's readout
sigma, ADU), ``cutoff`` (1e-3 or 1e-6: the coefficient cut-off; both are built per shot), ``seed`` (a fresh noise
draw, Poisson + 1 ADU readout, on the expected photons), ``sigma`` (1: standard errors of the edges). The shots'
arrays are cached (``--cache``, a pickle) so that variants can be rerun without simulating again.
Also printed: the half-rise of the true tables on the grid and the restraints' gradient at the truth.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/spread_bias_experiments.py --lattices 200 \
           --fits "base:" "nf:data=expected" "nf-weak:data=expected,smooth=0.01,kk=0.1"
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spread_recovery import (  # noqa: E402
    DATA_DIR,
    SITES,
    STARTS,
    TRUTH,
    lattice_from_terms,
    ly99_model,
    subset_simulator,
)

from xfel_spread.spread.assemble import concatenate  # noqa: E402
from xfel_spread.spread.fit import Restraints, SpreadProblem, fit  # noqa: E402
from xfel_spread.spread.model import Decomposition  # noqa: E402
from xfel_spread.spread.restraints import hilbert_matrix, kk_residual  # noqa: E402
from xfel_spread.spread.run import SpreadSettings  # noqa: E402
from xfel_spread.spread.scoring import score_fits  # noqa: E402
from xfel_spread.spread.tables import energy_grid, interpolation_matrix, read_table, table_on_grid, table_path  # noqa: E402
from xfel_spread.spread.uncertainty import edge_estimates, grid_covariance, half_rise_energy  # noqa: E402


def build(n: int, cache: str | None):
    config, energies, pdb, decomposition, lookup = ly99_model()
    gain = config["simulate"]["detector"]["gain_adu_per_photon"]
    if cache and Path(cache).exists():
        with open(cache, "rb") as stream:
            stored = pickle.load(stream)
        if len(stored["noisy"]) >= n:
            return energies, decomposition, gain, {k: v[:n] for k, v in stored.items()}
    simulator = subset_simulator(config, energies, pdb, False)
    setup = simulator.setup
    lattices = {"noisy": [], "expected": [], "noisy_fine": []}
    t = time.perf_counter()
    for shot_index in range(n):
        shot = simulator.simulate(shot_index)
        arrays = lattice_from_terms(shot, shot.terms, lookup, 1e-3, "nopsf", None,
                                    setup.true_detector.pixel_size_mm, 1.0, energies)
        if arrays is None:
            continue
        fine = lattice_from_terms(shot, shot.terms, lookup, 1e-6, "nopsf", None,
                                  setup.true_detector.pixel_size_mm, 1.0, energies)
        lattices["noisy"].append(arrays)
        lattices["noisy_fine"].append(fine)
        trusted = np.asarray(shot.trusted, dtype=bool)
        lattices["expected"].append(dataclasses.replace(arrays, data=np.asarray(shot.expected["nopsf"])[trusted]))
        if (shot_index + 1) % 50 == 0:
            print(f"  simulated {shot_index + 1}/{n} ({(time.perf_counter() - t) / (shot_index + 1):.2f} s/shot)",
                  flush=True)
    if cache:
        with open(cache, "wb") as stream:
            pickle.dump(lattices, stream)
    return energies, decomposition, gain, lattices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lattices", type=int, default=200)
    parser.add_argument("--fits", nargs="+", default=["base:"])
    parser.add_argument("--start", choices=tuple(STARTS), default="metallic")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = SpreadSettings.from_mapping(None)
    energies, decomposition, gain, lattices = build(args.lattices, args.cache)
    grid = energy_grid(float(np.floor(energies.min())), float(energies.max()), settings.grid_spacing_ev)
    interpolation = torch.tensor(interpolation_matrix(grid, energies))
    hilbert = torch.tensor(hilbert_matrix(grid))

    def on_grid(name):
        path = table_path(name, str(DATA_DIR))
        return table_on_grid(read_table(path), grid, path)

    truth = tuple(np.stack([on_grid(name)[i] for name in TRUTH]) for i in (0, 1))
    start = STARTS[args.start]
    fp_start = np.stack([on_grid(name)[0] for name in start])
    fdp_start = np.stack([on_grid(name)[1] for name in start])
    for s, site in enumerate(SITES):
        residual = kk_residual(torch.tensor(truth[0][s]), torch.tensor(truth[1][s]), torch.tensor(fp_start[s]),
                               torch.tensor(fdp_start[s]), hilbert).numpy()
        inner = (grid >= 7100) & (grid <= 7150)
        print(f"{site} true table on the grid: half-rise {half_rise_energy(grid, truth[1][s]):.2f} eV; KK residual of "
              f"the truth against the {start[s]} reference: rms {np.sqrt(np.mean(residual ** 2)):.3f} e "
              f"(7100-7150 eV: {np.sqrt(np.mean(residual[inner] ** 2)):.3f} e, largest {np.abs(residual).max():.3f})")
    for spec in args.fits:
        name, _, rest = spec.partition(":")
        options = dict(item.split("=") for item in rest.split(",") if item)
        kind = options.get("data", "noisy")
        if options.get("cutoff") == "1e-6":
            kind = "noisy_fine"
        chosen = lattices[kind]
        if "seed" in options:  # a fresh noise draw: Poisson of the expected photons + readout N(0, 1 ADU)
            rng = np.random.default_rng(int(options["seed"]))
            chosen = [dataclasses.replace(lattice, data=rng.poisson(lattice.data).astype(np.float64)
                                          + rng.normal(0.0, 1.0 / gain, len(lattice.data)))
                      for lattice in lattices["expected"]]
        readout_var = (float(options.get("readout", 3.0)) / gain) ** 2
        chosen = [dataclasses.replace(lattice, readout_var=readout_var) for lattice in chosen]
        data, columns = concatenate(chosen)
        smooth = float(options.get("smooth", settings.smoothness_weight))
        kk = float(options.get("kk", settings.kk_weight))
        restraints = Restraints(smooth, kk, torch.tensor(fp_start), torch.tensor(fdp_start), hilbert)
        problem = SpreadProblem(data, Decomposition.from_complex(decomposition.f_rest[columns],
                                                                 decomposition.site_sums[:, columns]),
                                interpolation, restraints)
        t = time.perf_counter()
        result = fit(problem, fp_start, fdp_start, max_iterations=settings.max_iterations,
                     pixels_per_chunk=settings.pixels_per_chunk,
                     preconditioner_lattices=settings.preconditioner_lattices)
        rows = [row for row in score_fits(grid, SITES, {name: (result.fp, result.fdp)}, truth) if "-" not in row["site"]]
        print(f"{name} ({spec}): {len(chosen)} lattices, {result.evaluations} evaluations, "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        edges = None
        if options.get("sigma"):
            theta = np.concatenate([result.fp.ravel(), result.fdp.ravel()])
            edges = edge_estimates(grid, result.fp, result.fdp, grid_covariance(problem, theta, result.nuisance),
                                   n_samples=settings.posterior_samples, seed=settings.seed)
        for s, row in enumerate(rows):
            if edges is not None:
                print(f"   {row['site']} sigmas: half-rise {edges[s].half_rise_sigma_ev:.2f} eV, post-edge half-rise "
                      f"{edges[s].half_rise_post_sigma_ev:.2f} eV, f' minimum {edges[s].fp_minimum_sigma_ev:.2f} eV")
            near = (grid >= 7116) & (grid <= 7124)
            print(f"   {row['site']}: half-rise error {row['half_rise_error_ev']:+.2f} eV (post-edge half-rise "
                  f"{row['half_rise_post_error_ev']:+.2f}), f' min error "
                  f"{row['fp_minimum_error_ev']:+.2f} eV, rms f' {row['fp_rms_error_e']:.3f}, rms f'' "
                  f"{row['fdp_rms_error_e']:.3f} e; f''-true 7116-7124: "
                  f"{' '.join(f'{v:+.2f}' for v in (result.fdp[s] - truth[1][s])[near])}", flush=True)


if __name__ == "__main__":
    main()
