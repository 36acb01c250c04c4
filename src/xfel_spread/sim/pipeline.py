"""The drivers of the simulation stage: what ``spread-structure-factors`` and ``spread-simulate`` run."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from xfel_spread.config import load_config
from xfel_spread.errors import OptionError
from xfel_spread.sim.structure_factors import (ChannelAmplitudes, channel_energies, compute_site_amplitudes,
                                               save_channel_amplitudes)

log = logging.getLogger(__name__)


def write_structure_factors(settings: dict, pdb: str, site_tables: Mapping[str, str], output: str) -> ChannelAmplitudes:
    """The per-channel amplitude table of the model (``structure_factors`` settings), written to ``output``;
    ``site_tables``: atom name of each anomalous site -> its f', f'' table."""
    energies = channel_energies(settings["channel_start_ev"], settings["channel_step_ev"], settings["n_channels"])
    table = compute_site_amplitudes(pdb, site_tables, energies, settings["d_min_a"], settings["k_sol"],
                                    settings["b_sol"])
    save_channel_amplitudes(table, output)
    log.info("%s: %d reflections x %d channels; sites %s", output, len(table.indices), len(energies),
             ", ".join(f"{name} ({path})" for name, path in site_tables.items()))
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
