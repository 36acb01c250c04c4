"""Entry point of the merge stage.

``spread-merge``: conventional merging of one dataset's reindexed lattices, Friedel mates separate
(our cctbx.xfel.merge), run under MPI (``mpirun -n N spread-merge ...``); rank 0 writes every file.
``spread-dials-merge``: the cross-check, dials.scale and dials.merge on the lattices our merge accepted.
``spread-score-merge``: our merge and DIALS's against the simulation's truth and against each other.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xfel_spread.cli.common import rank_zero_reports, run_command
from xfel_spread.config import load_config
from xfel_spread.errors import OptionError


def merge_main(argv: list[str] | None = None) -> int:
    """``spread-merge``: merge one dataset's lattices under MPI."""
    parser = argparse.ArgumentParser(
        prog="spread-merge",
        description="Merge the integrated lattices of one dataset, Friedel mates separate (run it under MPI).")
    parser.add_argument("--config", required=True, help="pipeline settings of the merge stage (YAML)")
    parser.add_argument("--shard-prefix", action="append", required=True,
                        help="output prefix of one shard's reindex stage (repeat for every shard, in order)")
    parser.add_argument("--covariance", required=True, help="unit-cell covariance pickle from spread-covariance")
    parser.add_argument("--model", help="reference model (PDB) for scaling; required with merge.reference model, "
                                        "not read with merge.reference data")
    parser.add_argument("--mtz", required=True, help="merged intensities to write (MTZ)")
    parser.add_argument("--stats-table", required=True, help="merging statistics to write (TSV)")
    parser.add_argument("--stats-text", required=True, help="the same statistics, aligned for reading")
    parser.add_argument("--stats-plot", required=True, help="statistics figure to write (PNG)")
    parser.add_argument("--lattices", required=True, help="per-lattice decisions and parameters to write (TSV)")
    parser.add_argument("--summary", required=True, help="counts, average cell, statistics and timings (JSON)")
    arguments = parser.parse_args(argv)

    def action():
        from mpi4py import MPI

        from xfel_spread.merging.pipeline import MergeOutputs, merge_dataset

        comm = MPI.COMM_WORLD
        if comm.Get_rank() != 0:  # rank 0 logs the job's progress; the others only their warnings
            for handler in logging.getLogger().handlers:
                handler.setLevel(logging.WARNING)
        # The launcher's rank count, as MPI sees it: 1 would mean the ranks did not join one world.
        logging.info("spread-merge: %d rank(s)", comm.Get_size())
        # Every rank meets the same input error; rank 0 reports it, the others leave quietly.
        outputs = MergeOutputs(Path(arguments.mtz), Path(arguments.stats_table), Path(arguments.stats_text),
                               Path(arguments.stats_plot), Path(arguments.lattices), Path(arguments.summary))
        with rank_zero_reports(comm):
            summary = merge_dataset(comm, load_config(arguments.config)["merge"], arguments.shard_prefix,
                                    arguments.covariance, arguments.model, outputs)
        if summary is not None:
            print(f"spread-merge: {summary['accepted']} of {summary['lattices_read']} lattices merged into "
                  f"{summary['unique_written']['anomalous']} anomalous and {summary['unique_written']['IMEAN']} "
                  f"mean intensities ({arguments.mtz})", file=sys.stderr)

    return run_command("spread-merge", action)


def dials_merge_main(argv: list[str] | None = None) -> int:
    """``spread-dials-merge``: the DIALS cross-check of one dataset's merge; exit status."""
    parser = argparse.ArgumentParser(
        prog="spread-dials-merge",
        description="Cross-check: dials.scale and dials.merge on the lattices our merge accepted.")
    parser.add_argument("--config", required=True, help="pipeline settings of the DIALS cross-check (YAML)")
    parser.add_argument("--lattices", required=True, help="per-lattice table of our merge (TSV)")
    parser.add_argument("--shard-prefix", action="append", required=True,
                        help="output prefix of one shard's reindex stage (repeat for every shard, in order)")
    parser.add_argument("--work-dir", required=True, help="scratch directory for the DIALS programs")
    parser.add_argument("--mtz", required=True, help="merged intensities to write (MTZ)")
    parser.add_argument("--log-summary", required=True, help="what was run and DIALS's merging summary (text)")
    arguments = parser.parse_args(argv)

    def action():
        from pathlib import Path

        from xfel_spread.merging.dials_crosscheck import dials_scale_and_merge

        settings = load_config(arguments.config)["merge"]
        text = dials_scale_and_merge(arguments.shard_prefix, arguments.lattices, settings["d_min"],
                                     settings["dials_crosscheck"]["max_lattices"], Path(arguments.work_dir),
                                     arguments.mtz, arguments.log_summary, sys.stdout)
        print(text, end="")

    return run_command("spread-dials-merge", action)


def score_merge_main(argv: list[str] | None = None) -> int:
    """``spread-score-merge``: score the merged intensities against the truth; exit status."""
    parser = argparse.ArgumentParser(
        prog="spread-score-merge",
        description="Score merged intensities against the simulation's truth (and ours against DIALS's).")
    parser.add_argument("--dataset", required=True, help="dataset name, for the titles")
    parser.add_argument("--mtz", required=True, help="our merged intensities (MTZ)")
    parser.add_argument("--dials-mtz", help="DIALS's merged intensities (MTZ), if the cross-check ran")
    parser.add_argument("--amplitudes", required=True, help="per-channel amplitude table (HDF5)")
    parser.add_argument("--shard", action="append", required=True,
                        help="simulated shard whose spectra make the mean spectrum (repeat for every shard)")
    parser.add_argument("--n-bins", type=int, default=20, help="resolution bins (default 20)")
    parser.add_argument("--table", required=True, help="score table to write (TSV)")
    parser.add_argument("--text", required=True, help="the same scores, aligned for reading")
    parser.add_argument("--plot", required=True, help="CC against resolution to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.atomic import atomic_output
        from xfel_spread.io.mtz import read_merged_mtz
        from xfel_spread.merging.plots import plot_cc_by_resolution
        from xfel_spread.merging.scoring import format_comparisons, score_merged_sets, write_comparison_table
        from xfel_spread.sim.structure_factors import load_channel_amplitudes

        if arguments.n_bins < 1:
            raise OptionError(f"--n-bins must be at least 1, got {arguments.n_bins}")
        ours = read_merged_mtz(arguments.mtz)
        theirs = read_merged_mtz(arguments.dials_mtz) if arguments.dials_mtz else None
        amplitudes = load_channel_amplitudes(arguments.amplitudes)
        comparisons = score_merged_sets(ours, theirs, amplitudes, arguments.shard, arguments.n_bins)
        write_comparison_table(comparisons, arguments.table)
        text = format_comparisons(arguments.dataset, comparisons)
        with atomic_output(arguments.text, "w") as stream:
            stream.write(text)
        print(text, end="")
        plot_cc_by_resolution(arguments.plot, arguments.dataset, comparisons)

    return run_command("spread-score-merge", action)


if __name__ == "__main__":
    sys.exit(merge_main())
