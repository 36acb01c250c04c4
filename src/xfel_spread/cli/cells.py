"""Entry points of the unit-cell stage.

``spread-tdata``: every lattice's unit cell in cctbx.xfel.merge's tdata format.
``spread-covariance``: DBSCAN clusters of the cells, the covariance pickle merging filters with, a
summary and a plot (replaces LY99's ``uc_metrics.dbscan``).
"""

from __future__ import annotations

import argparse
import logging

from xfel_spread.cli.common import run_command


def tdata_main(argv: list[str] | None = None) -> int:
    """``spread-tdata``: every lattice's unit cell in tdata format."""
    parser = argparse.ArgumentParser(prog="spread-tdata",
                                     description="List the unit cell of every lattice in tdata format.")
    parser.add_argument("--experiments", action="append", required=True,
                        help="integrated experiment list of one shard (repeat for every shard, in order)")
    parser.add_argument("--output", required=True, help="tdata file to write")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.cells.tdata import write_tdata

        n_lattices = write_tdata(arguments.experiments, arguments.output)
        logging.info("%s: %d unit cells from %d experiment files", arguments.output, n_lattices,
                     len(arguments.experiments))

    return run_command("spread-tdata", action)


def covariance_main(argv: list[str] | None = None) -> int:
    """``spread-covariance``: cluster the unit cells and write their covariance model."""
    parser = argparse.ArgumentParser(prog="spread-covariance",
                                     description="Cluster unit cells (DBSCAN) and write their covariance model.")
    parser.add_argument("--config", required=True, help="pipeline settings of the cells stage (YAML)")
    parser.add_argument("--tdata", required=True, help="unit cells from spread-tdata")
    parser.add_argument("--pickle", required=True,
                        help="covariance model to write (cctbx.xfel.merge filter.unit_cell.cluster.covariance.file)")
    parser.add_argument("--summary", required=True, help="clustering summary to write (text)")
    parser.add_argument("--plot", required=True, help="pairwise scatter of the clustered features to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.cells.pipeline import run_covariance
        from xfel_spread.config import load_config

        run_covariance(load_config(arguments.config)["cells"], arguments.tdata, arguments.pickle, arguments.summary,
                       arguments.plot)

    return run_command("spread-covariance", action)

