"""Entry points of the report's own figures (the Snakemake report shows these beside the stages' plots).

``spread-plot-shot``: one simulated shot of a dataset with the reindex pass's predicted spots overlaid.
``spread-plot-detector-refinement``: centroid residuals of the indexed spots before (index pass) and after
(reindex pass) the detector refinement.

With images from elsewhere (no truth; the rules run them as ``python -m xfel_spread.cli.report {refinement,spread}``):
``spread-plot-refinement``: a pixel refinement's RMSDs and Z-scores, start and refined, from its shots tables.
``spread-plot-spread``: SPREAD's f', f'' with their 1-sigma bands, the start tables and the controls.
"""

from __future__ import annotations

import argparse
import sys

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


def plot_refinement_main(argv: list[str] | None = None) -> int:
    """``spread-plot-refinement``: a pixel refinement's converged lattices without a truth."""
    parser = argparse.ArgumentParser(
        prog="spread-plot-refinement",
        description="Plot a pixel refinement's start and refined RMSDs and Z-score sigma from its shots tables.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the title")
    parser.add_argument("--refinement", required=True, help="stage1 or exa, for the title")
    parser.add_argument("--shots", action="append", required=True, help="a shard's shots table (repeatable)")
    parser.add_argument("--plot", required=True, help="figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.io.refined_shots import read_refined_shots
        from xfel_spread.report.plots import plot_refinement_without_truth

        rows = [row for path in arguments.shots for row in read_refined_shots(path)]
        print(plot_refinement_without_truth(arguments.plot, arguments.dataset, arguments.refinement, rows))

    return run_command("spread-plot-refinement", action)


def plot_spread_main(argv: list[str] | None = None) -> int:
    """``spread-plot-spread``: SPREAD's curves with their uncertainties, without a truth."""
    parser = argparse.ArgumentParser(
        prog="spread-plot-spread",
        description="Plot SPREAD's f', f'' of each site with 1-sigma bands, start tables and controls (no truth).")
    parser.add_argument("--dataset", required=True, help="dataset name, for the title")
    parser.add_argument("--prefix", required=True, help="SPREAD's output prefix P (P_fp_fdp.tsv, P_controls.tsv, "
                                                        "P_summary.json)")
    parser.add_argument("--plot", required=True, help="figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.report.plots import plot_spread_without_truth
        from xfel_spread.spread.scoring import summary_lattice_count

        lattices = summary_lattice_count(arguments.prefix)
        print(plot_spread_without_truth(arguments.plot, arguments.dataset, arguments.prefix, lattices))

    return run_command("spread-plot-spread", action)


def main(argv: list[str] | None = None) -> int:
    """``python -m xfel_spread.cli.report {refinement,spread} ...``."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"refinement": plot_refinement_main, "spread": plot_spread_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m xfel_spread.cli.report {refinement,spread} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
