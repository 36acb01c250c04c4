"""Entry points of the report's own figures (the Snakemake report shows these beside the stages' plots).

``spread-plot-shot``: one simulated shot of a dataset with the reindex pass's predicted spots overlaid.
``spread-plot-detector-refinement``: centroid residuals of the indexed spots before (index pass) and after
(reindex pass) the detector refinement.
"""

from __future__ import annotations

import argparse

from xfel_spread.cli.common import run_command


def plot_shot_main(argv: list[str] | None = None) -> int:
    """``spread-plot-shot``: one shot with the reindex pass's predicted spots."""
    parser = argparse.ArgumentParser(
        prog="spread-plot-shot",
        description="Draw the first shot the reindex pass integrated in a shard, with its predicted spots.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the title")
    parser.add_argument("--shard", required=True, help="the simulated shard (HDF5)")
    parser.add_argument("--reindex-prefix", required=True, help="output prefix of the same shard's reindex stage")
    parser.add_argument("--plot", required=True, help="figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.report.plots import plot_shot_from_files

        shot = plot_shot_from_files(arguments.plot, arguments.dataset, arguments.reindex_prefix, arguments.shard)
        print(f"{arguments.plot}: shot {shot} of {arguments.shard}")

    return run_command("spread-plot-shot", action)


def plot_detector_refinement_main(argv: list[str] | None = None) -> int:
    """``spread-plot-detector-refinement``: centroid residuals before and after metrology."""
    parser = argparse.ArgumentParser(
        prog="spread-plot-detector-refinement",
        description="Plot observed - predicted centroids of one shard's indexed spots before and after metrology.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the title")
    parser.add_argument("--index-prefix", required=True, help="output prefix of the shard's index stage")
    parser.add_argument("--reindex-prefix", required=True, help="output prefix of the same shard's reindex stage")
    parser.add_argument("--plot", required=True, help="figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.report.pipeline import detector_refinement_figure

        for line in detector_refinement_figure(arguments.plot, arguments.dataset, arguments.index_prefix,
                                               arguments.reindex_prefix):
            print(line)

    return run_command("spread-plot-detector-refinement", action)
