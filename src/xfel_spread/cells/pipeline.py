"""The driver of the unit-cell stage's clustering (``spread-covariance``): DBSCAN clusters of one
dataset's cells, the covariance pickle merging filters with, a summary and a figure."""

from __future__ import annotations

import logging
from pathlib import Path

from xfel_spread.atomic import atomic_output
from xfel_spread.cells.covariance import (CellPopulations, check_space_groups, cluster_cells, format_summary,
                                          write_covariance_pickle)
from xfel_spread.cells.tdata import read_tdata

log = logging.getLogger(__name__)


def run_covariance(settings: dict, tdata: str, pickle_path: str, summary_path: str, plot_path: str) -> CellPopulations:
    """Cluster the cells of ``tdata`` with the ``cells`` settings; write the pickle, the summary and the plot.

    User errors (TdataError, ClusteringError, a space group other than ``cells.space_group``) name
    ``tdata``. Returns the clustered populations."""
    from xfel_spread.cells.plots import plot_cell_clusters

    features = list(settings["features"])
    cells, symbols = read_tdata(tdata)
    log.info("%s: %d unit cells", tdata, len(cells))
    check_space_groups(symbols, settings["space_group"], tdata)
    populations = cluster_cells(cells, features, settings["eps"], settings["min_samples"], tdata)
    sample = Path(tdata).stem
    info = {"tdata": tdata, "space_group": settings["space_group"], "eps": settings["eps"],
            "min_samples": settings["min_samples"], "metric": "L2norm", "n_cells": len(cells)}
    write_covariance_pickle(pickle_path, populations, features, sample, info)
    summary = format_summary(populations, features, sample, info)
    with atomic_output(summary_path, "w") as stream:
        stream.write(summary)
    log.info("clustering of %s:\n%s", tdata, summary.rstrip())
    plot_cell_clusters(plot_path, cells, populations, features,
                       f"{sample}: {len(cells)} unit cells, DBSCAN eps {settings['eps']}, "
                       f"min_samples {settings['min_samples']}")
    return populations
