"""Entry points of the simulation stage.

``spread-structure-factors``: per-channel amplitude table from the model and the Fe tables.
``spread-simulate``: one shard of shots, written as the nopsf and psf datasets plus a truth file.

Both take the pipeline config as a YAML file (``--config``); it is validated and completed with
the schema's defaults, so the commands also run outside Snakemake.
"""

from __future__ import annotations

import argparse
import logging
import sys

from xfel_spread.cli.common import configure_logging, run_command
from xfel_spread.config import load_config
from xfel_spread.errors import USER_ERRORS, OptionError, error_line
from xfel_spread.sim.structure_factors import channel_energies, compute_channel_amplitudes, save_channel_amplitudes

#: Transitional, for ``cli/analysis.py`` (being split by another change): it still imports these two;
#: remove them once it uses :func:`xfel_spread.cli.common.run_command`.
INPUT_ERRORS = USER_ERRORS


def _run(program: str, action, input_errors: tuple = (), log_level: int = logging.INFO) -> int:
    """Transitional: :func:`~xfel_spread.cli.common.run_command`, also reporting ``input_errors`` in one line."""
    configure_logging(log_level)
    try:
        action()
    except USER_ERRORS + tuple(input_errors) as error:
        print(error_line(program, error), file=sys.stderr)
        return 1
    return 0


def structure_factors_main(argv: list[str] | None = None) -> int:
    """``spread-structure-factors``: the per-channel amplitude table of the model."""
    parser = argparse.ArgumentParser(prog="spread-structure-factors", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--pdb", required=True, help="model (PDB format)")
    parser.add_argument("--oxidized-table", required=True, help="f'/f'' table for the oxidized Fe site")
    parser.add_argument("--reduced-table", required=True, help="f'/f'' table for the reduced Fe site")
    parser.add_argument("--output", required=True, help="amplitude table to write (HDF5)")
    arguments = parser.parse_args(argv)

    def action():
        settings = load_config(arguments.config)["structure_factors"]
        energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
        table = compute_channel_amplitudes(
            arguments.pdb, arguments.oxidized_table, arguments.reduced_table, energies,
            settings["d_min_a"], settings["k_sol"], settings["b_sol"],
            settings["fe_oxidized_atom"], settings["fe_reduced_atom"])
        save_channel_amplitudes(table, arguments.output)
        logging.info("%s: %d reflections x %d channels", arguments.output, len(table.indices), len(energies))

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
        import torch

        from xfel_spread.sim.shard import setup_from_config, simulate_shard

        if arguments.threads:
            torch.set_num_threads(arguments.threads)
        start, stop = arguments.shots
        if not 0 <= start < stop:
            raise OptionError(f"--shots {start} {stop}: need 0 <= START < STOP")
        setup = setup_from_config(load_config(arguments.config), arguments.amplitudes)
        simulate_shard(setup, start, stop, {"nopsf": arguments.nopsf, "psf": arguments.psf}, arguments.truth)

    return run_command("spread-simulate", action)


if __name__ == "__main__":
    sys.exit(simulate_main())
