"""Entry points of the analysis of the merged data (stages 6-7).

``spread-annulus``: the merged lattices' reflections in a resolution annulus, for per-shot refinement.
``spread-dials-merge``: the cross-check, dials.scale and dials.merge on the lattices our merge accepted.
``spread-score-merge``: our merge and DIALS's against the simulation's truth and against each other.
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.analysis.annulus import AnnulusError
from xfel_spread.analysis.truth import MergedFileError
from xfel_spread.cli.simulate import INPUT_ERRORS, _run
from xfel_spread.config import load_config
from xfel_spread.dials.scale_merge import DialsMergeError

#: Besides bad inputs, a DIALS program that fails is reported in one line.
ANALYSIS_ERRORS = INPUT_ERRORS + (AnnulusError, MergedFileError, DialsMergeError)


def annulus_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spread-annulus",
        description="Select the merged lattices' reflections in a resolution annulus and count them.")
    parser.add_argument("--config", required=True, help="pipeline settings of the annulus stage (YAML)")
    parser.add_argument("--lattices", required=True, help="per-lattice table of the merge (TSV)")
    parser.add_argument("--shard-prefix", action="append", required=True,
                        help="output prefix of one shard's reindex stage (repeat for every shard, in order)")
    parser.add_argument("--output-prefix", action="append", required=True,
                        help="write PREFIX_annulus.expt/.refl for the shard of the same position")
    parser.add_argument("--summary", required=True, help="counts per dataset and per shard to write (JSON)")
    parser.add_argument("--text", required=True, help="the dataset's counts to write (text)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.analysis.annulus import check_annulus, select_annulus, write_annulus_report

        settings = load_config(arguments.config)["annulus"]
        check_annulus(settings["d_max"], settings["d_min"], f"{arguments.config}: annulus")
        summary = select_annulus(arguments.shard_prefix, arguments.output_prefix, arguments.lattices,
                                 settings["d_max"], settings["d_min"])
        print(write_annulus_report(summary, arguments.summary, arguments.text), end="")

    return _run("spread-annulus", action, ANALYSIS_ERRORS)


def dials_merge_main(argv: list[str] | None = None) -> int:
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

        from xfel_spread.dials.scale_merge import dials_scale_and_merge

        settings = load_config(arguments.config)["merge"]
        text = dials_scale_and_merge(arguments.shard_prefix, arguments.lattices, settings["d_min"],
                                     settings["dials_crosscheck"]["max_lattices"], Path(arguments.work_dir),
                                     arguments.mtz, arguments.log_summary, sys.stdout)
        print(text, end="")

    return _run("spread-dials-merge", action, ANALYSIS_ERRORS)


def score_merge_main(argv: list[str] | None = None) -> int:
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
        from xfel_spread.analysis.plots import plot_cc_by_resolution
        from xfel_spread.analysis.truth import (format_comparisons, read_merged_mtz, score_merged_sets,
                                                write_comparison_table)
        from xfel_spread.atomic import atomic_output
        from xfel_spread.sim.structure_factors import load_channel_amplitudes

        if arguments.n_bins < 1:
            raise ValueError(f"--n-bins must be at least 1, got {arguments.n_bins}")
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

    return _run("spread-score-merge", action, ANALYSIS_ERRORS)
