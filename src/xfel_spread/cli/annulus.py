"""Entry point of the annulus stage (stage 7's input).

``spread-annulus``: the merged lattices' reflections in a resolution annulus, for per-shot refinement.
"""

from __future__ import annotations

import argparse

from xfel_spread.cli.common import run_command
from xfel_spread.config import load_config


def annulus_main(argv: list[str] | None = None) -> int:
    """``spread-annulus``: select and count the annulus reflections of one dataset; exit status."""
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
        from xfel_spread.annulus.pipeline import select_annulus
        from xfel_spread.annulus.select import check_annulus, write_annulus_report

        settings = load_config(arguments.config)["annulus"]
        check_annulus(settings["d_max"], settings["d_min"], f"{arguments.config}: annulus")
        summary = select_annulus(arguments.shard_prefix, arguments.output_prefix, arguments.lattices,
                                 settings["d_max"], settings["d_min"])
        print(write_annulus_report(summary, arguments.summary, arguments.text), end="")

    return run_command("spread-annulus", action)
