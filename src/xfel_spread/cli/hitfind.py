"""Entry points of the hitfind stage.

``spread-hitfind-shard``: lit pixels, photons, radial profile and ring peak of every shot of a shard,
and its powder sum.
``spread-hitfind``: the run's hit threshold, a hits table per shard, the per-shot ring peaks, a summary
and a figure, for one dataset.
``spread-powder``: the powder pattern of one dataset (sum of all shots), its radial table, ring and figure.
``spread-score-hitfind``: hit/miss accuracy against the truth's blank flags, and the mean solvent
profile against the simulator's background model (simulated data only).
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import run_command
from xfel_spread.config import load_config


def hitfind_shard_main(argv: list[str] | None = None) -> int:
    """``spread-hitfind-shard``: measure every shot of a shard."""
    parser = argparse.ArgumentParser(prog="spread-hitfind-shard",
                                     description="Lit pixels, photons and radial profile of every shot of a shard.")
    parser.add_argument("--config", required=True, help="settings of the hitfind_shard stage (YAML)")
    parser.add_argument("--shard", required=True, help="shard of shots (HDF5)")
    parser.add_argument("--first-shot", required=True, type=int, help="global index of the shard's first shot")
    parser.add_argument("--lit-table", required=True, help="per-shot measurements to write (TSV)")
    parser.add_argument("--radial", required=True, help="per-shot radial profiles to write (.npz)")
    parser.add_argument("--powder", required=True, help="the shard's powder sum to write (.npz)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.hitfind.pixels import LitPixelSettings
        from xfel_spread.hitfind.stages import measure_shard

        hitfind = load_config(arguments.config)["hitfind"]
        measurements = measure_shard(arguments.shard, arguments.first_shot, LitPixelSettings.from_config(hitfind),
                                     hitfind["radial_bin_px"], arguments.lit_table, arguments.radial, arguments.powder)
        lit = [measurement.lit_pixels for measurement in measurements]
        print(f"{arguments.shard}: {len(lit)} shots, lit pixels {min(lit, default=0)}..{max(lit, default=0)}",
              file=sys.stderr)

    return run_command("spread-hitfind-shard", action)


def hitfind_main(argv: list[str] | None = None) -> int:
    """``spread-hitfind``: the hit threshold and hits tables of one dataset."""
    parser = argparse.ArgumentParser(prog="spread-hitfind",
                                     description="Hit threshold and hits tables of one dataset.")
    parser.add_argument("--config", required=True, help="settings of the hitfind stage (YAML)")
    parser.add_argument("--lit-table", action="append", required=True,
                        help="per-shot measurements of one shard (once per shard, in order)")
    parser.add_argument("--hits-table", action="append", required=True,
                        help="hits table to write for one shard (once per shard, same order)")
    parser.add_argument("--ring-peaks", required=True, help="per-shot solvent-ring peaks to write (TSV)")
    parser.add_argument("--summary", required=True, help="threshold and hit counts to write (JSON)")
    parser.add_argument("--shots-plot", required=True, help="lit pixels and ring peaks per shot (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.hitfind.stages import find_hits

        hitfind = load_config(arguments.config)["hitfind"]
        summary = find_hits(arguments.lit_table, arguments.hits_table, hitfind, {
            "ring_peaks": arguments.ring_peaks, "summary": arguments.summary, "shots_plot": arguments.shots_plot})
        print(f"{summary.n_hits} hits of {summary.n_shots} shots (threshold {summary.threshold_min_lit_pixels:g} "
              f"lit pixels, rule {summary.threshold_rule})", file=sys.stderr)

    return run_command("spread-hitfind", action)


def powder_main(argv: list[str] | None = None) -> int:
    """``spread-powder``: the powder pattern of one dataset."""
    parser = argparse.ArgumentParser(prog="spread-powder",
                                     description="The powder pattern of one dataset and its radial profile.")
    parser.add_argument("--config", required=True, help="settings of the hitfind_shard stage (YAML)")
    parser.add_argument("--radial", action="append", required=True,
                        help="radial profiles of one shard (once per shard, in order)")
    parser.add_argument("--powder", action="append", required=True, help="powder sum of one shard (same order)")
    parser.add_argument("--powder-image", required=True,
                        help="powder pattern to write (.npy, photons summed over shots)")
    parser.add_argument("--powder-radial", required=True, help="its radial profile to write (TSV)")
    parser.add_argument("--summary", required=True, help="shots, wavelength and ring of the powder to write (JSON)")
    parser.add_argument("--plot", required=True, help="powder pattern with its radial profile (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.hitfind.stages import sum_powder

        hitfind = load_config(arguments.config)["hitfind"]
        summary = sum_powder(arguments.radial, arguments.powder, tuple(hitfind["ring_q_range_inv_a"]), {
            "powder": arguments.powder_image, "powder_radial": arguments.powder_radial,
            "summary": arguments.summary, "plot": arguments.plot})
        print(f"powder of {summary.n_shots} shots: solvent ring at q = {summary.ring_q_inv_a:.4f} 1/A",
              file=sys.stderr)

    return run_command("spread-powder", action)


def score_hitfind_main(argv: list[str] | None = None) -> int:
    """``spread-score-hitfind``: hit finding and solvent profile against the simulation."""
    parser = argparse.ArgumentParser(prog="spread-score-hitfind",
                                     description="Hit finding and the solvent profile against the simulation.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the report")
    parser.add_argument("--simulate-config", required=True, help="settings of the simulate stage (YAML)")
    parser.add_argument("--hitfind-config", required=True,
                        help="settings of the hitfind_shard stage (YAML), for the ring window")
    parser.add_argument("--hits-table", action="append", required=True, help="hits table of one shard (in order)")
    parser.add_argument("--radial", action="append", required=True, help="radial profiles of one shard (same order)")
    parser.add_argument("--truth", action="append", required=True, help="truth JSON of one shard (same order)")
    parser.add_argument("--summary", required=True, help="the hitfind stage's summary (JSON)")
    parser.add_argument("--table", required=True, help="score to write (TSV: quantity, value)")
    parser.add_argument("--text", required=True, help="the same, aligned for reading")
    parser.add_argument("--plot", required=True, help="figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.hitfind.stages import score_hits

        text = score_hits(arguments.dataset, arguments.hits_table, arguments.radial, arguments.truth,
                          load_config(arguments.simulate_config)["simulate"],
                          load_config(arguments.hitfind_config)["hitfind"]["ring_q_range_inv_a"], arguments.summary,
                          arguments.table, arguments.text, arguments.plot)
        print(text, end="")

    return run_command("spread-score-hitfind", action)
