"""The CUDA path runs the same code as the CPU path; here it must also give the same numbers.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``.venv/bin/python -m pytest -q tests/test_cuda.py``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim import detector_effects as effects
from xfel_spread.sim.forward import AmplitudeLookup, Beam, CrystalState, bragg_photons_sparse
from xfel_spread.sim.geometry import Detector
from xfel_spread.sim.spectrum import SaseModel, sase_spectrum
from xfel_spread.sim.structure_factors import channel_energies, compute_channel_amplitudes, expand_to_p1_grid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def simulate_on(device: str, grid, energies, photons, matrices) -> torch.Tensor:
    detector = Detector(512, 512, 0.3, 141.7, (76.8, 76.8), 0.032, 0.017)
    beam = Beam(torch.tensor(energies, device=device), torch.tensor(photons, device=device), 3e-6, 1.0)
    crystal = CrystalState(torch.tensor(matrices, device=device),
                           torch.tensor([57.0, 57.0, 57.0], dtype=torch.float64, device=device),
                           torch.tensor(93.75, dtype=torch.float64, device=device))
    return bragg_photons_sparse(detector, beam, crystal, AmplitudeLookup(grid, device)).cpu()


def test_sparse_bragg_image_is_the_same_on_cpu_and_cuda():
    energies = channel_energies(7070.5, 1.0, 100)
    table = compute_channel_amplitudes(str(DATA / "1m2a.pdb"), str(DATA / "pf-rd-ox_fftkk.out"),
                                       str(DATA / "pf-rd-red_fftkk.out"), energies, 1.7, 0.435, 46.0)
    rng = np.random.default_rng(7)
    photons = sase_spectrum(SaseModel(), energies, rng)
    real_space = (xtal.random_rotation(rng) @ xtal.orthogonalization_matrix(table.unit_cell).T).T
    matrices = xtal.domain_matrices(real_space, xtal.mosaic_rotations(25, 0.05, rng))
    grid = expand_to_p1_grid(table)

    on_cpu = simulate_on("cpu", grid, energies, photons, matrices)
    on_cuda = simulate_on("cuda", grid, energies, photons, matrices)

    assert on_cpu.sum() > 1e4
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-9, atol=1e-6)


def test_noise_draws_are_reproducible_on_cuda():
    expected = torch.full((256, 256), 50.0, dtype=torch.float64, device="cuda")
    calibration = effects.calibration_pattern((256, 256), 0.01, 5, "cuda")
    first = effects.draw_noise(expected, calibration, effects.ReadoutModel(), seed=11)
    second = effects.draw_noise(expected, calibration, effects.ReadoutModel(), seed=11)
    assert torch.equal(first.photons, second.photons)
    assert abs(float(first.photons.mean()) - 50.0) < 0.5
