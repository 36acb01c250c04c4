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

from xfel_spread.config import ConfigError, load_config
from xfel_spread.io.shard import ShardFormatError
from xfel_spread.sim.spectrum import SpectrumFileError
from xfel_spread.sim.structure_factors import (
    ModelFileError,
    channel_energies,
    compute_channel_amplitudes,
    save_channel_amplitudes,
)

#: Problems with the user's inputs: reported as one line, exit status 1.
INPUT_ERRORS = (ConfigError, ModelFileError, SpectrumFileError, ShardFormatError, OSError, ValueError)


def _configure_logging(level: int = logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # The level goes on the handler too: a program that lowers the root logger's level later (DIALS
    # does) must not make this handler repeat what it logs to its own files.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)


def _run(program: str, action, input_errors: tuple = INPUT_ERRORS, log_level: int = logging.INFO) -> int:
    """Run ``action``; report an input error as one line ``program: error: ...`` and exit status 1."""
    _configure_logging(log_level)
    try:
        action()
    except input_errors as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 1
    return 0


def structure_factors_main(argv: list[str] | None = None) -> int:
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

    return _run("spread-structure-factors", action)


def simulate_main(argv: list[str] | None = None) -> int:
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
            raise ValueError(f"--shots {start} {stop}: need 0 <= START < STOP")
        setup = setup_from_config(load_config(arguments.config), arguments.amplitudes)
        simulate_shard(setup, start, stop, {"nopsf": arguments.nopsf, "psf": arguments.psf}, arguments.truth)

    return _run("spread-simulate", action)


if __name__ == "__main__":
    sys.exit(simulate_main())
