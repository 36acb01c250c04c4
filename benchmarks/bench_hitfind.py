"""Cost of the hitfind stage on full-size shots: the geometry once per shard, then per shot.

Per shot: reading the image from the shard, and ``measure_shot`` (photons, trusted mask, the clipped
radial statistics with their lit-pixel test, the ring peak), and adding it to the powder sum; once per
shard, ``radial_geometry`` (2-theta, bins and collection factors of every pixel). The figures are
medians over the shard's shots, in seconds, and the lit pixels found per shot.

Usage: .venv/bin/python benchmarks/bench_hitfind.py [--shard results/sim/psf/shard_00000.h5]
(the default shard is the demo's: run ``make demo`` first, or give any simulated shard).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from xfel_spread.hitfind.radial import mean_wavelength_a
from xfel_spread.hitfind.pixels import LitPixelSettings, PowderSum, measure_shot
from xfel_spread.hitfind.stages import geometry_of
from xfel_spread.io.shard import read_shard_image, read_shard_metadata

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default=str(REPO / "results" / "sim" / "psf" / "shard_00000.h5"))
    parser.add_argument("--bin-px", type=float, default=2.0, help="radial bin width (px)")
    arguments = parser.parse_args()

    shard = Path(arguments.shard)
    if not shard.is_file():
        sys.exit(f"{shard}: no such shard (run `make demo` first, or pass --shard)")
    metadata = read_shard_metadata(shard)
    start = time.perf_counter()
    geometry = geometry_of(metadata.detector, metadata.beam, arguments.bin_px)
    geometry_s = time.perf_counter() - start
    powder = PowderSum(geometry.shape)
    settings = LitPixelSettings()
    read_s, measure_s, powder_s, lit = [], [], [], []
    for image in range(metadata.n_shots):
        start = time.perf_counter()
        pixels = read_shard_image(shard, image)
        read_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        wavelength = mean_wavelength_a(metadata.energy_ev, metadata.photons_per_channel[image])
        measurement, photons, trusted = measure_shot(pixels, metadata.detector, geometry, settings, wavelength)
        measure_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        powder.add(photons, trusted)
        powder_s.append(time.perf_counter() - start)
        lit.append(measurement.lit_pixels)

    n_slow, n_fast = geometry.shape
    print(f"shard {shard}: {metadata.n_shots} shots of {n_fast} x {n_slow} pixels, {geometry.n_bins} radial bins")
    print(f"radial geometry (once per shard): {geometry_s:.2f} s")
    print(f"per shot (median): read {statistics.median(read_s):.3f} s, lit pixels + radial profile + ring "
          f"{statistics.median(measure_s):.3f} s, powder sum {statistics.median(powder_s):.3f} s, total "
          f"{statistics.median(read_s) + statistics.median(measure_s) + statistics.median(powder_s):.3f} s")
    print(f"lit pixels per shot: {lit}")


if __name__ == "__main__":
    main()
