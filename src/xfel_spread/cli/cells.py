"""Entry points of the unit-cell stage.

``spread-tdata``: every lattice's unit cell in cctbx.xfel.merge's tdata format.
``spread-covariance``: DBSCAN clusters of the cells, the covariance pickle merging filters with, a
summary and a plot (replaces LY99's ``uc_metrics.dbscan``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
        from xfel_spread.atomic import atomic_output
        from xfel_spread.cells.covariance import (check_space_groups, cluster_cells, format_summary,
                                                  write_covariance_pickle)
        from xfel_spread.cells.plots import plot_cell_clusters
        from xfel_spread.cells.tdata import read_tdata
        from xfel_spread.config import load_config

        settings = load_config(arguments.config)["cells"]
        features = list(settings["features"])
        cells, symbols = read_tdata(arguments.tdata)
        logging.info("%s: %d unit cells", arguments.tdata, len(cells))
        check_space_groups(symbols, settings["space_group"], arguments.tdata)
        populations = cluster_cells(cells, features, settings["eps"], settings["min_samples"], arguments.tdata)
        sample = Path(arguments.tdata).stem
        info = {"tdata": arguments.tdata, "space_group": settings["space_group"], "eps": settings["eps"],
                "min_samples": settings["min_samples"], "metric": "L2norm", "n_cells": len(cells)}
        write_covariance_pickle(arguments.pickle, populations, features, sample, info)
        summary = format_summary(populations, features, sample, info)
        with atomic_output(arguments.summary, "w") as stream:
            stream.write(summary)
        logging.info("clustering of %s:\n%s", arguments.tdata, summary.rstrip())
        plot_cell_clusters(arguments.plot, cells, populations, features,
                           f"{sample}: {len(cells)} unit cells, DBSCAN eps {settings['eps']}, "
                           f"min_samples {settings['min_samples']}")

    return run_command("spread-covariance", action)

