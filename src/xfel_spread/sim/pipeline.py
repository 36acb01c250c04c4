"""The drivers of the simulation stage: what ``spread-structure-factors`` and ``spread-simulate`` run."""

from __future__ import annotations

import logging

from xfel_spread.config import load_config
from xfel_spread.errors import OptionError
from xfel_spread.sim.structure_factors import (ChannelAmplitudes, channel_energies, compute_channel_amplitudes,
                                               save_channel_amplitudes)

log = logging.getLogger(__name__)


def write_structure_factors(settings: dict, pdb: str, oxidized_table: str, reduced_table: str,
                            output: str) -> ChannelAmplitudes:
    """The per-channel amplitude table of the model (``structure_factors`` settings), written to ``output``."""
    energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
    table = compute_channel_amplitudes(pdb, oxidized_table, reduced_table, energies, settings["d_min_a"],
                                       settings["k_sol"], settings["b_sol"], settings["fe_oxidized_atom"],
                                       settings["fe_reduced_atom"])
    save_channel_amplitudes(table, output)
    log.info("%s: %d reflections x %d channels", output, len(table.indices), len(energies))
    return table


def simulate_shots(config_path: str, amplitudes: str, shots: tuple[int, int], nopsf: str, psf: str, truth: str,
                   threads: int | None = None) -> None:
    """Simulate shots ``shots[0]..shots[1]-1`` of the pipeline config into the two shards and the truth file.

    ``threads``: torch's CPU threads (None or 0: torch's choice). OptionError for an empty shot range."""
    import torch

    from xfel_spread.sim.shard import setup_from_config, simulate_shard

    if threads:
        torch.set_num_threads(threads)
    start, stop = shots
    if not 0 <= start < stop:
        raise OptionError(f"--shots {start} {stop}: need 0 <= START < STOP")
    setup = setup_from_config(load_config(config_path), amplitudes)
    simulate_shard(setup, start, stop, {"nopsf": nopsf, "psf": psf}, truth)
