"""Entry point of the merge stage.

``spread-merge``: conventional merging of one dataset's reindexed lattices, Friedel mates separate
(our cctbx.xfel.merge), run under MPI (``mpirun -n N spread-merge ...``); rank 0 writes every file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xfel_spread.cli.common import rank_zero_reports, run_command
from xfel_spread.config import load_config


def merge_main(argv: list[str] | None = None) -> int:
    """``spread-merge``: merge one dataset's lattices under MPI."""
    parser = argparse.ArgumentParser(
        prog="spread-merge",
        description="Merge the integrated lattices of one dataset, Friedel mates separate (run it under MPI).")
    parser.add_argument("--config", required=True, help="pipeline settings of the merge stage (YAML)")
    parser.add_argument("--shard-prefix", action="append", required=True,
                        help="output prefix of one shard's reindex stage (repeat for every shard, in order)")
    parser.add_argument("--covariance", required=True, help="unit-cell covariance pickle from spread-covariance")
    parser.add_argument("--model", required=True, help="reference model (PDB) for scaling")
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


if __name__ == "__main__":
    sys.exit(merge_main())
