"""Entry points of the simulation stage.

``spread-structure-factors``: per-channel amplitude table from the model and its anomalous sites' tables.
``spread-simulate``: one shard of shots, written as the nopsf and psf datasets plus a truth file.

Both take the pipeline config as a YAML file (``--config``); it is validated and completed with
the schema's defaults, so the commands also run outside Snakemake.
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import run_command
from xfel_spread.config import load_config

def structure_factors_main(argv: list[str] | None = None) -> int:
    """``spread-structure-factors``: the per-channel amplitude table of the model."""
    parser = argparse.ArgumentParser(prog="spread-structure-factors", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--pdb", required=True, help="model (PDB format)")
    parser.add_argument("--site", action="append", default=[], metavar="ATOM=TABLE", required=True,
                        help="an anomalous site: its atom name in the model and its f', f'' table (repeat per site; "
                             "LY99: FE1=pf-rd-ox_fftkk.out FE2=pf-rd-red_fftkk.out)")
    parser.add_argument("--output", required=True, help="amplitude table to write (HDF5)")
    arguments = parser.parse_args(argv)
    site_tables = {}
    for item in arguments.site:
        name, _, table = item.partition("=")
        if not name or not table or name in site_tables:
            parser.error(f"--site {item}: expected ATOM=TABLE, each atom once")
        site_tables[name] = table

    def action():
        from xfel_spread.sim.pipeline import write_structure_factors

        write_structure_factors(load_config(arguments.config)["structure_factors"], arguments.pdb, site_tables,
                                arguments.output)

    return run_command("spread-structure-factors", action)


def simulate_main(argv: list[str] | None = None) -> int:
    """``spread-simulate``: one shard of shots, both datasets and the truth."""
    parser = argparse.ArgumentParser(prog="spread-simulate", description="Simulate one shard of LY99 shots.")
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--amplitudes", required=True, help="amplitude table from spread-structure-factors")
    parser.add_argument("--shots", required=True, type=int, nargs=2, metavar=("START", "STOP"),
                        help="shot indices START..STOP-1")
    parser.add_argument("--nopsf", required=True, help="shard to write without the point spread function")
    parser.add_argument("--psf", required=True, help="shard to write with the point spread function")
    parser.add_argument("--truth", required=True, help="ground-truth JSON to write")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.sim.pipeline import simulate_shots

        simulate_shots(arguments.config, arguments.amplitudes, tuple(arguments.shots), arguments.nopsf,
                       arguments.psf, arguments.truth, arguments.threads)

    return run_command("spread-simulate", action)


if __name__ == "__main__":
    sys.exit(simulate_main())
