"""Refined beam centre against the truth as a function of the number of lattices refined.

Runs the metrology stage (``spread-metrology``: dials.combine_experiments + dials.refine with
config/metrology.phil) on the index output of a finished run, for several ``max_lattices`` values, and
prints the refined beam centre minus the true one (px) for each. This is how the accuracy goal of the
metrology stage (0.02 px) is measured against the lattice count; it needs a completed index stage of
a simulated run, e.g. ``config/validation.yaml`` (200 shots).

Usage: .venv/bin/python benchmarks/metrology_vs_lattices.py [--results validation/results]
           [--dataset psf] [--lattices 25 50 100 200] [--phil config/metrology.phil]
Without a finished run at --results it says so and exits 0 (``make bench`` runs every benchmark).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(REPO / "validation" / "results"),
                        help="output_dir of a run whose index stage finished (default: the validation run's)")
    parser.add_argument("--dataset", default="psf", choices=["nopsf", "psf"])
    parser.add_argument("--lattices", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--phil", default=str(REPO / "config" / "metrology.phil"))
    parser.add_argument("--engine", default="auto")
    arguments = parser.parse_args()

    results = Path(arguments.results)
    prefixes = sorted(path.with_name(path.name[: -len("_shots.tsv")])
                      for path in (results / "index" / arguments.dataset).glob("shard_*_shots.tsv"))
    truth_files = sorted((results / "sim" / "truth").glob("shard_*.json"))
    if not prefixes or not truth_files:
        print(f"skipped: {results} has no finished index stage for {arguments.dataset} (or no truth files); "
              "run config/validation.yaml first")
        return
    true_centre_mm = np.array(json.loads(truth_files[0].read_text())["shots"][0]["true_beam_center_mm"])

    bin_dir = Path(sys.executable).parent
    print(f"dataset {arguments.dataset}, {len(prefixes)} shards, phil {arguments.phil}")
    print(f"{'lattices':>9s} {'engine':>13s} {'fast - true (px)':>17s} {'slow - true (px)':>17s} "
          f"{'|error| (px)':>13s} {'distance change (mm)':>21s} {'time (s)':>9s}")
    with tempfile.TemporaryDirectory() as scratch:
        for max_lattices in arguments.lattices:
            work = Path(scratch) / str(max_lattices)
            work.mkdir()
            settings = work / "metrology.yaml"
            settings.write_text(yaml.safe_dump({"metrology": {"max_lattices": max_lattices,
                                                              "engine": arguments.engine}}))
            command = [str(bin_dir / "spread-metrology"), "--config", str(settings), "--dataset", arguments.dataset,
                       "--phil", arguments.phil, "--report", str(work / "report.txt"),
                       "--summary", str(work / "summary.json"),
                       "--refined-detector", str(work / "refined_detector.expt"),
                       "--residuals-table", str(work / "residuals.tsv"),
                       "--residuals-before", str(work / "residuals_before.png"),
                       "--residuals-after", str(work / "residuals_after.png"), "--work-dir", str(work / "dials")]
            for prefix in prefixes:
                command += ["--shard-prefix", str(prefix)]
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            if result.returncode != 0:
                sys.exit(f"spread-metrology failed for {max_lattices} lattices:\n{result.stdout[-3000:]}"
                         f"{result.stderr[-2000:]}")
            summary = json.loads((work / "summary.json").read_text())
            panel = summary["after"]["panels"][0]
            error_px = (np.array(panel["beam_centre_mm"]) - true_centre_mm) / np.array(panel["pixel_size_mm"])
            print(f"{summary['n_lattices']:9d} {summary['engine']:>13s} {error_px[0]:+17.4f} {error_px[1]:+17.4f} "
                  f"{np.hypot(*error_px):13.4f} {summary['shift'][0]['distance_change_mm']:+21.4f} {elapsed:9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
