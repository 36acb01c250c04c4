"""Shared helpers for the simulator tests (import them from a test module; fixtures live in conftest.py).

The LY99 amplitude table (1M2A, 100 channels from 7070.5 eV, 1.7 A, k_sol 0.435, b_sol 46) takes
about two seconds to compute; :func:`ly99_amplitudes` computes it once per test process and the
module-scoped fixture ``amplitude_table`` (tests/conftest.py) hands it to tests. Tests must not modify
its arrays.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import AmplitudeLookup, Beam, CrystalState
from xfel_spread.sim.structure_factors import (
    ChannelAmplitudes,
    channel_energies,
    compute_channel_amplitudes,
    expand_to_p1_grid,
)

#: The project's checksummed reference data, always present beside the repository.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
PDB_PATH = SHARED_DATA_DIR / "1m2a.pdb"
OXIDIZED_TABLE = SHARED_DATA_DIR / "pf-rd-ox_fftkk.out"
REDUCED_TABLE = SHARED_DATA_DIR / "pf-rd-red_fftkk.out"

#: The LY99 simulation's channels and structure-factor settings.
CHANNEL_START_EV, CHANNEL_STEP_EV, N_CHANNELS = 7070.5, 1.0, 100
D_MIN_A, K_SOL, B_SOL = 1.7, 0.435, 46.0
LY99_ENERGIES_EV = channel_energies(CHANNEL_START_EV, CHANNEL_STEP_EV, N_CHANNELS)
#: LY99 detector distance (mm) and the illuminated crystal's domain count (the Bragg scale).
DISTANCE_MM = 141.7
DOMAINS_PER_CRYSTAL = 93.75

DTYPE = torch.float64


@functools.lru_cache(maxsize=1)
def ly99_amplitudes() -> ChannelAmplitudes:
    """The LY99 per-channel amplitude table, computed once per process."""
    return compute_channel_amplitudes(str(PDB_PATH), str(OXIDIZED_TABLE), str(REDUCED_TABLE),
                                      LY99_ENERGIES_EV, D_MIN_A, K_SOL, B_SOL)


def channel_subset(table: ChannelAmplitudes, channels) -> ChannelAmplitudes:
    """The same table restricted to some channels (a copy)."""
    channels = np.asarray(channels)
    return ChannelAmplitudes(table.energies_ev[channels].copy(), table.unit_cell, table.space_group,
                             table.indices, table.amplitudes[channels].copy())


def lookup_for(table: ChannelAmplitudes, channels) -> AmplitudeLookup:
    """AmplitudeLookup (P1 grid) of the table restricted to ``channels``."""
    return AmplitudeLookup(expand_to_p1_grid(channel_subset(table, channels)), "cpu")


def random_orientation(unit_cell, seed: int) -> np.ndarray:
    """Real-space matrix (rows a, b, c) of the cell in a random orientation, as the simulator draws it."""
    rotation = xtal.random_rotation(np.random.default_rng(seed))
    return (rotation @ xtal.orthogonalization_matrix(unit_cell).T).T


def crystal_state(real_space_matrix: np.ndarray, ncells, n_domains: int = 1, spread_deg: float = 0.0,
                  seed: int = 0, scale: float = DOMAINS_PER_CRYSTAL) -> CrystalState:
    """CrystalState of a crystal with ``n_domains`` mosaic domains (float64)."""
    rotations = xtal.mosaic_rotations(n_domains, spread_deg, np.random.default_rng(seed))
    matrices = xtal.domain_matrices(real_space_matrix, rotations)
    return CrystalState(torch.as_tensor(matrices, dtype=DTYPE),
                        torch.as_tensor(np.broadcast_to(np.asarray(ncells, dtype=np.float64), (3,)).copy(), dtype=DTYPE),
                        torch.tensor(scale, dtype=DTYPE))


def make_beam(energies_ev, photons, size_m: float = 3e-6, polarization_fraction: float = 1.0) -> Beam:
    return Beam(torch.as_tensor(np.asarray(energies_ev, dtype=np.float64)),
                torch.as_tensor(np.asarray(photons, dtype=np.float64)), size_m, polarization_fraction)


def all_pixels(detector) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (fast, slow) index tensors of every pixel, in image (slow-major) order."""
    slow, fast = torch.meshgrid(torch.arange(detector.n_slow), torch.arange(detector.n_fast), indexing="ij")
    return fast.reshape(-1), slow.reshape(-1)


def spot_centroids(image: np.ndarray, threshold: float = 0.5, min_total: float = 50.0):
    """Connected spots of ``image > threshold`` holding more than ``min_total``: centroids (fast, slow).

    Centroids are in the dxtbx pixel convention (pixel i spans [i, i+1)), so +0.5 on the index.
    """
    from scipy import ndimage

    labels, n_labels = ndimage.label(image > threshold)
    if n_labels == 0:
        return np.zeros((0, 2)), np.zeros(0)
    label_ids = np.arange(1, n_labels + 1)
    totals = np.asarray(ndimage.sum(image, labels, label_ids))
    keep = label_ids[totals > min_total]
    if keep.size == 0:
        return np.zeros((0, 2)), np.zeros(0)
    centres = np.asarray(ndimage.center_of_mass(image, labels, keep)).reshape(-1, 2)
    return centres[:, ::-1] + 0.5, totals[totals > min_total]
