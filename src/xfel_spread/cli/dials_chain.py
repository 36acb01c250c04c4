"""Entry points of the DIALS stages (index, metrology, reindex) and their scoring.

``spread-stills-process``: dials.stills_process on one shard, run under MPI (``mpirun``/``srun``).
``spread-metrology``: detector refinement (hierarchy level 0 or 1) from the indexed lattices of one dataset,
or a saved detector applied to them.
``spread-score-dials``: the indexing results of one dataset scored against the simulation's truth.
"""

from __future__ import annotations

import argparse
import logging
import sys

from xfel_spread.cli.common import run_command
from xfel_spread.config import load_config


def stills_process_main(argv: list[str] | None = None) -> int:
    """``spread-stills-process``: dials.stills_process on one shard, under MPI."""
    parser = argparse.ArgumentParser(
        prog="spread-stills-process",
        description="Index and integrate every shot of one shard with dials.stills_process (run it under MPI).")
    parser.add_argument("--shard", required=True, help="simulated shard (HDF5)")
    parser.add_argument("--shots", required=True, type=int, nargs=2, metavar=("START", "STOP"),
                        help="the shard's shot indices START..STOP-1")
    parser.add_argument("--phil", action="append", default=[], help="stills_process parameter file (repeatable)")
    parser.add_argument("--reference-geometry", metavar="EXPT",
                        help="detector to use instead of the images' (an experiment list, e.g. metrology's "
                             "refined_detector.expt)")
    parser.add_argument("--output-prefix", required=True,
                        help="write PREFIX_integrated.expt/.refl, _refined.expt, _indexed.refl and _shots.tsv")
    parser.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                        help="how often to log shots done, rate and time left (default 30)")
    parser.add_argument("--hits-table", default=None,
                        help="hitfind's table of the shard's shots: process only those marked is_hit")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.dials.pipeline import run_stills_process
        from xfel_spread.dials.stills import INTEGRATED

        shots = run_stills_process(arguments.shard, tuple(arguments.shots), arguments.phil, arguments.output_prefix,
                                   arguments.progress_interval, arguments.reference_geometry, arguments.hits_table)
        if shots is not None:
            n_integrated = sum(shot.status == INTEGRATED for shot in shots)
            print(f"{arguments.shard}: {n_integrated} of {len(shots)} shots integrated", file=sys.stderr)

    # DIALS logs to per-rank files, which are copied into the job's log in rank order at the end.
    return run_command("spread-stills-process", action, log_level=logging.WARNING)


def metrology_main(argv: list[str] | None = None) -> int:
    """``spread-metrology``: refine (or apply) the detector of one dataset."""
    parser = argparse.ArgumentParser(
        prog="spread-metrology",
        description="Refine the detector of one dataset (or apply a saved one) and map the spots' residuals.")
    parser.add_argument("--config", required=True, help="pipeline settings of the metrology stage (YAML)")
    parser.add_argument("--dataset", required=True, help="dataset name, for the report")
    parser.add_argument("--phil", required=True, help="dials.refine parameter file")
    parser.add_argument("--shard-prefix", action="append", required=True,
                        help="output prefix of one shard's index stage (repeat for every shard, in order)")
    parser.add_argument("--report", required=True, help="before/after report to write (text)")
    parser.add_argument("--summary", required=True, help="before/after geometry to write (JSON)")
    parser.add_argument("--refined-detector", required=True,
                        help="refined detector to write (experiment list; stills_process's input.reference_geometry)")
    parser.add_argument("--residuals-table", required=True, help="per-panel residual statistics to write (TSV)")
    parser.add_argument("--residuals-before", required=True, help="residual maps before metrology to write (PNG)")
    parser.add_argument("--residuals-after", required=True, help="residual maps after metrology to write (PNG)")
    parser.add_argument("--work-dir", required=True, help="scratch directory for the DIALS programs")
    arguments = parser.parse_args(argv)

    def action():
        from pathlib import Path

        from xfel_spread.dials.metrology import MetrologyOutputs
        from xfel_spread.dials.pipeline import run_metrology

        outputs = MetrologyOutputs(Path(arguments.report), Path(arguments.summary), Path(arguments.refined_detector),
                                   Path(arguments.residuals_table), Path(arguments.residuals_before),
                                   Path(arguments.residuals_after))
        run_metrology(load_config(arguments.config)["metrology"], arguments.dataset, arguments.phil,
                      arguments.shard_prefix, outputs, arguments.work_dir, sys.stdout)
        print(outputs.report.read_text(), end="")

    return run_command("spread-metrology", action)


def score_main(argv: list[str] | None = None) -> int:
    """``spread-score-dials``: score the index and reindex passes of one dataset."""
    parser = argparse.ArgumentParser(prog="spread-score-dials",
                                     description="Score the index and reindex passes of one dataset against truth.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the table's title")
    parser.add_argument("--index-prefix", action="append", required=True,
                        help="output prefix of one shard's index stage (repeat for every shard, in order)")
    parser.add_argument("--reindex-prefix", action="append", required=True,
                        help="output prefix of one shard's reindex stage (same order)")
    parser.add_argument("--truth", action="append", required=True, help="truth JSON of each shard (same order)")
    parser.add_argument("--metrology-summary", required=True, help="JSON summary of the metrology stage")
    parser.add_argument("--table", required=True, help="score table to write (TSV)")
    parser.add_argument("--text", required=True, help="the same table, aligned for reading")
    parser.add_argument("--image-shard", required=True, help="the first shard's images, for the plot")
    parser.add_argument("--plot", required=True, help="summary figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.dials.pipeline import score_dials

        score_dials(arguments.dataset, arguments.index_prefix, arguments.reindex_prefix, arguments.truth,
                    arguments.metrology_summary, arguments.table, arguments.text, arguments.image_shard, arguments.plot,
                    echo=sys.stdout)

    return run_command("spread-score-dials", action)
