"""Seconds per full-size LY99 shot (3840 x 3840, 100 channels, 25 mosaic domains).

Prints three figures on the machine it runs on:
  1. Bragg spots only (the sparse forward model);
  2. everything: Bragg + water/air background + attenuation + noise + PSF (both datasets);
  3. shots per second for a shard, including writing both HDF5 datasets and the truth file.

Usage: .venv/bin/python benchmarks/bench_simulate.py [--shots N] [--device cpu|cuda]
Reference data is read from ../shared/data (the project's mirror) unless --reference-dir is given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xfel_spread.config import load_config
from xfel_spread.sim import shard as sh
from xfel_spread.sim.structure_factors import channel_energies, compute_channel_amplitudes, save_channel_amplitudes

REPO = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=3, help="shots timed per figure")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reference-dir", default=str(REPO.parent / "shared" / "data"))
    arguments = parser.parse_args()

    config = load_config({"simulate": {"device": arguments.device}}, source_name="<benchmark>")
    settings = config["structure_factors"]
    reference = Path(arguments.reference_dir)
    with tempfile.TemporaryDirectory() as scratch:
        table_path = f"{scratch}/amplitudes.h5"
        energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
        seconds = timed(lambda: save_channel_amplitudes(compute_channel_amplitudes(
            str(reference / "1m2a.pdb"), str(reference / "pf-rd-ox_fftkk.out"), str(reference / "pf-rd-red_fftkk.out"),
            energies, settings["d_min_a"], settings["k_sol"], settings["b_sol"]), table_path), torch.device("cpu"))
        print(f"structure factors, {len(energies)} channels: {seconds:.1f} s (once per run)")
        setup = sh.setup_from_config(config, table_path)
        device = setup.device
        print(f"device {device}, torch threads {torch.get_num_threads()}, detector "
              f"{setup.nominal_detector.n_fast}x{setup.nominal_detector.n_slow}, {len(energies)} channels, "
              f"{setup.n_domains} domains, N = {setup.ncells.tolist()}")

        shots = range(arguments.shots)
        spectra = {shot: sh.shot_spectrum(setup, shot) for shot in shots}
        crystals = {shot: sh.draw_crystal(setup, shot) for shot in shots}
        sh.expected_photons(setup, crystals[0], spectra[0], include_background=False)  # warm-up

        bragg = [timed(lambda s=s: sh.expected_photons(setup, crystals[s], spectra[s], include_background=False),
                       device) for s in shots]
        print(f"Bragg only:                  {statistics.median(bragg):6.2f} s/shot (median of {len(bragg)}: "
              + ", ".join(f"{t:.2f}" for t in bragg) + ")")

        def everything(shot):
            expected = sh.expected_photons(setup, crystals[shot], spectra[shot])
            sh.detector_images(setup, expected, shot)

        full = [timed(lambda s=s: everything(s), device) for s in shots]
        print(f"+ background, noise, PSF:    {statistics.median(full):6.2f} s/shot (median of {len(full)}: "
              + ", ".join(f"{t:.2f}" for t in full) + ")")

        paths = {"nopsf": f"{scratch}/nopsf.h5", "psf": f"{scratch}/psf.h5"}
        seconds = timed(lambda: sh.simulate_shard(setup, 0, arguments.shots, paths, f"{scratch}/truth.json"), device)
        size_mb = sum(Path(path).stat().st_size for path in paths.values()) / 1e6
        print(f"shard of {arguments.shots} incl. write:     {arguments.shots / seconds:6.3f} shots/s "
              f"({seconds / arguments.shots:.2f} s/shot; {size_mb / arguments.shots:.1f} MB/shot for both datasets)")


if __name__ == "__main__":
    main()
