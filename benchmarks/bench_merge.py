"""Merging at production scale: 100,000 synthetic lattices loaded, filtered, scaled and merged on this machine.

Reference: the LY99 cctbx.xfel.merge run merged 97,673 lattices in 132 s on 2,048 MPI ranks. Goals
here, on ``--ranks`` ranks: merge wall time <= 132 s, CC of IMEAN to the truth >= 0.99 and CC of
I(+) - I(-) to the truth >= 0.5.

Steps (each timed and printed):
  1. generate the lattices (xfel_spread.sim.lattices) in the layout dials.stills_process writes,
     200 shards of 500 by default, into ``WORKDIR/data_N_PER-SHARD_seedS``; a complete directory with
     the same parameters is reused (its ``complete`` marker is written last);
  2. ``spread-tdata`` and ``spread-covariance`` on their cells, as the pipeline's stage 5 runs them;
  3. ``mpirun -n RANKS spread-merge`` with the default merge settings (its per-step timings printed
     from its summary JSON);
  4. the MTZ scored against the generator's truth (xfel_spread.merging.scoring), overall and per
     resolution bin, and the merge's accepted lattices against the outliers the generator planted.

The truth intensities come from ``--amplitudes`` (default: the validation run's amplitudes.h5);
when that file is missing they are computed from the 1M2A model and the Fe tables in
``--reference-dir`` (about a minute, once; kept in the workdir).

Usage: .venv/bin/python benchmarks/bench_merge.py [--n-lattices 100000] [--lattices-per-shard 500]
       [--ranks 2] [--jobs 2] [--workdir validation/bench_merge]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from xfel_spread.config import load_config, stage_settings, write_settings
from xfel_spread.io import synthetic_lattices as synio
from xfel_spread.io.mtz import read_merged_mtz
from xfel_spread.merging.scoring import score_against_truth
from xfel_spread.sim import lattice_dataset as lds
from xfel_spread.sim import lattices as lat
from xfel_spread.sim.structure_factors import (
    channel_energies,
    compute_channel_amplitudes,
    load_channel_amplitudes,
    save_channel_amplitudes,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: The LY99 reference run and the goals at this scale.
REFERENCE_SECONDS, REFERENCE_LATTICES, REFERENCE_RANKS = 132.0, 97673, 2048
GOAL_CC, GOAL_CC_ANOMALOUS = 0.99, 0.5


def channel_amplitudes(path: Path, reference_dir: Path, workdir: Path):
    """The amplitude table at ``path``, or one computed from the reference data (kept in workdir)."""
    if path.is_file():
        return load_channel_amplitudes(str(path)), str(path)
    computed = workdir / "amplitudes.h5"
    if not computed.is_file():
        settings = load_config({}, source_name="<benchmark>")["structure_factors"]
        print(f"{path} not found: computing the amplitudes from {reference_dir} into {computed}", flush=True)
        energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
        save_channel_amplitudes(compute_channel_amplitudes(
            str(reference_dir / "1m2a.pdb"), str(reference_dir / "pf-rd-ox_fftkk.out"),
            str(reference_dir / "pf-rd-red_fftkk.out"), energies, settings["d_min_a"], settings["k_sol"],
            settings["b_sol"], settings["fe_oxidized_atom"], settings["fe_reduced_atom"]), str(computed))
    return load_channel_amplitudes(str(computed)), str(computed)


def directory_bytes(directory: Path) -> int:
    return sum(entry.stat().st_size for entry in directory.iterdir() if entry.is_file())


def timed_command(command: list[str], log_path: Path) -> float:
    """Run ``command`` with its output in ``log_path``; exit with the log's tail if it fails."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        tail = log_path.read_text()[-3000:]
        sys.exit(f"benchmark: {Path(command[0]).name} ... failed (exit {result.returncode}); log {log_path}:\n{tail}")
    return elapsed


def truth_kinds(prefixes: list[str]) -> dict[str, int]:
    """Lattice kind (normal, off-cluster, unrelated) by identifier, from the shards' truth files."""
    kinds = {}
    for prefix in prefixes:
        with np.load(prefix + synio.TRUTH_SUFFIX) as truth:
            kinds.update(zip(truth["identifier"].tolist(), truth["kind"].tolist()))
    return kinds


def lattice_decisions(lattices_table: Path) -> dict[str, str]:
    """The merge's decision per lattice identifier: "accepted" or its rejection reason."""
    with open(lattices_table, newline="") as stream:
        return {row["identifier"]: "accepted" if row["accepted"] == "1" else row["reason"]
                for row in csv.DictReader(stream, delimiter="\t")}


def print_decisions_by_kind(decisions: dict[str, str], kinds: dict[str, int]) -> None:
    """How many lattices of each planted kind the merge accepted, and why it rejected the others."""
    print("\nlattices by what the generator made them, and what the merge decided:")
    for kind, name in ((lat.KIND_NORMAL, "normal"), (lat.KIND_OFF_CLUSTER, "second cell cluster"),
                       (lat.KIND_UNRELATED, "unrelated intensities")):
        outcomes = Counter(decisions.get(identifier, "not in the lattice table")
                           for identifier, value in kinds.items() if value == kind)
        total = sum(outcomes.values())
        rejected = ", ".join(f"{reason} {count}" for reason, count in outcomes.most_common() if reason != "accepted")
        print(f"  {name:<22} {outcomes['accepted']:7d} of {total:7d} accepted" + (f"; rejected: {rejected}" if rejected else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "validation" / "bench_merge")
    parser.add_argument("--n-lattices", type=int, default=100_000)
    parser.add_argument("--lattices-per-shard", type=int, default=500, help="production shard size")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks of the merge")
    parser.add_argument("--jobs", type=int, default=2, help="processes generating shards")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n-bins", type=int, default=10, help="resolution bins of the score")
    parser.add_argument("--amplitudes", type=Path,
                        default=REPO / "validation" / "results" / "structure_factors" / "amplitudes.h5")
    parser.add_argument("--reference-dir", type=Path, default=REPO.parent / "shared" / "data")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    workdir = arguments.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    settings = lat.SyntheticSettings()
    amplitudes, amplitude_source = channel_amplitudes(arguments.amplitudes, arguments.reference_dir, workdir)
    truth = lat.truth_intensities(amplitudes, lat.spectrum_weights(
        amplitudes.energies_ev, settings.energy_ev, settings.spectrum_fwhm_ev))

    data = workdir / f"data_{arguments.n_lattices}_{arguments.lattices_per_shard}_seed{arguments.seed}"
    reused = (data / lds.COMPLETE_MARKER).is_file()
    start = time.perf_counter()
    prefixes = lds.generate_dataset(data, arguments.n_lattices, arguments.lattices_per_shard, truth, settings,
                                    arguments.seed, truth_source=amplitude_source, processes=arguments.jobs)
    generation_seconds = time.perf_counter() - start
    marker = json.loads((data / lds.COMPLETE_MARKER).read_text())
    size_gb = directory_bytes(data) / 1e9
    if reused:
        print(f"data: reused {data} ({marker['n_lattices']} lattices, {marker['n_shards']} shards, {size_gb:.2f} GB; "
              f"the run that completed it generated {marker['shards_generated']} shards in {marker['seconds']:.0f} s "
              f"with {marker['processes']} processes)", flush=True)
    else:
        print(f"data: generated {arguments.n_lattices} lattices in {len(prefixes)} shards in {generation_seconds:.1f} s "
              f"({arguments.jobs} processes), {size_gb:.2f} GB in {data}", flush=True)

    cells_dir, merge_dir = workdir / "cells", workdir / "merge"
    cells_dir.mkdir(exist_ok=True)
    merge_dir.mkdir(exist_ok=True)
    config = load_config({}, source_name="<benchmark>")
    write_settings(stage_settings(config, "cells"), cells_dir / "cells.yaml")
    write_settings(stage_settings(config, "merge"), merge_dir / "merge.yaml")

    tdata = cells_dir / "cells.tdata"
    tdata_seconds = timed_command(
        [str(BIN / "spread-tdata"), *[item for prefix in prefixes for item in ("--experiments", prefix + "_integrated.expt")],
         "--output", str(tdata)], cells_dir / "tdata.log")
    pickle = cells_dir / "covariance.pickle"
    covariance_seconds = timed_command(
        [str(BIN / "spread-covariance"), "--config", str(cells_dir / "cells.yaml"), "--tdata", str(tdata),
         "--pickle", str(pickle), "--summary", str(cells_dir / "clusters.txt"), "--plot", str(cells_dir / "clusters.png")],
        cells_dir / "covariance.log")
    print(f"spread-tdata      : {tdata_seconds:8.1f} s", flush=True)
    print(f"spread-covariance : {covariance_seconds:8.1f} s  (clusters: {cells_dir / 'clusters.txt'})", flush=True)

    outputs = {name: merge_dir / name for name in
               ("merged.mtz", "statistics.tsv", "statistics.txt", "statistics.png", "lattices.tsv", "summary.json")}
    model = arguments.reference_dir / "1m2a.pdb"
    merge_seconds = timed_command(
        ["mpirun", "--allow-run-as-root", "-n", str(arguments.ranks), str(BIN / "spread-merge"),
         "--config", str(merge_dir / "merge.yaml"),
         *[item for prefix in prefixes for item in ("--shard-prefix", prefix)],
         "--covariance", str(pickle), "--model", str(model), "--mtz", str(outputs["merged.mtz"]),
         "--stats-table", str(outputs["statistics.tsv"]), "--stats-text", str(outputs["statistics.txt"]),
         "--stats-plot", str(outputs["statistics.png"]), "--lattices", str(outputs["lattices.tsv"]),
         "--summary", str(outputs["summary.json"])], merge_dir / "merge.log")
    summary = json.loads(outputs["summary.json"].read_text())
    print(f"spread-merge      : {merge_seconds:8.1f} s on {arguments.ranks} ranks, {arguments.n_lattices} lattices "
          f"(reference: {REFERENCE_LATTICES} lattices in {REFERENCE_SECONDS:.0f} s on {REFERENCE_RANKS} ranks)")
    print("merge steps (s, from its summary):")
    for step, seconds in summary["timings_s"].items():
        print(f"  {step:<28} {seconds:8.1f}")
    print(f"merge: {summary['accepted']} of {summary['lattices_read']} lattices accepted, "
          f"{summary['observations_merged']} observations merged; rejected: "
          + (", ".join(f"{reason} {count}" for reason, count in summary["rejected"].items()) or "none"))

    merged = read_merged_mtz(outputs["merged.mtz"])
    d_max, d_min = merged.d_range()
    score = score_against_truth(merged, truth.miller_index, truth.intensity, arguments.n_bins, (d_max, d_min))
    print(f"\nmerged MTZ against the truth ({outputs['merged.mtz']}):")
    print(f"  {'d_max':>7} {'d_min':>7} {'n':>7} {'CC':>7} {'n_anom':>7} {'CC_anom':>8}")
    for row in score["bins"]:
        print(f"  {row['d_max']:7.2f} {row['d_min']:7.2f} {row['n_common']:7d} {row['cc']:7.4f} "
              f"{row['n_anomalous']:7d} {row['cc_anomalous']:8.4f}")
    print(f"  {d_max:7.2f} {d_min:7.2f} {score['n_common']:7d} {score['cc']:7.4f} "
          f"{score['n_anomalous']:7d} {score['cc_anomalous']:8.4f}  overall")

    print_decisions_by_kind(lattice_decisions(outputs["lattices.tsv"]), truth_kinds(prefixes))

    goals = [
        (f"merge wall time <= {REFERENCE_SECONDS:.0f} s", f"{merge_seconds:.1f} s", merge_seconds <= REFERENCE_SECONDS),
        (f"CC(IMEAN, truth) >= {GOAL_CC}", f"{score['cc']:.4f}", score["cc"] >= GOAL_CC),
        (f"CC(I(+) - I(-), truth) >= {GOAL_CC_ANOMALOUS}", f"{score['cc_anomalous']:.4f}",
         score["cc_anomalous"] >= GOAL_CC_ANOMALOUS),
    ]
    print(f"\nfigures ({arguments.n_lattices} lattices, {arguments.ranks} ranks, {os.cpu_count()} cores):")
    print(f"  {'generation (s)':<36} {generation_seconds if not reused else marker['seconds']:10.1f}"
          f"{'  (earlier run)' if reused else ''}")
    print(f"  {'data on disk (GB)':<36} {size_gb:10.2f}")
    print(f"  {'spread-tdata (s)':<36} {tdata_seconds:10.1f}")
    print(f"  {'spread-covariance (s)':<36} {covariance_seconds:10.1f}")
    print(f"  {'spread-merge (s)':<36} {merge_seconds:10.1f}")
    print("goals:")
    for name, value, passed in goals:
        print(f"  {name:<36} {value:>10}  {'PASS' if passed else 'FAIL'}")


if __name__ == "__main__":
    main()
