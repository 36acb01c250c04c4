"""Amorphous scattering from the water around the crystal and the air in the beam path.

Each material scatters like ``n_molecules`` independent molecules whose structure factor F_bg
depends only on sin(theta)/lambda (the nanoBragg ``Fbg_vs_stol`` model)::

    photons = r_e^2 * polar * omega * capture * sum_k fluence_k * n_molecules * F_bg(u_k sin(theta))^2

The sum over channels depends on the pixel only through the scattering angle, so it is tabulated
once per shot on a fine grid of 2-theta and interpolated at every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator

from xfel_spread.sim.forward import R_E_SQUARED_M2, Beam, pixel_factors
from xfel_spread.sim.geometry import Detector, MultiPanelDetector

AVOGADRO = 6.02214076e23

#: F_bg (electrons) against sin(theta)/lambda (1/Angstrom), the tables of the LS49/LY99 simulations.
WATER_STOL_F = ((0.0, 2.57), (0.0365, 2.58), (0.07, 2.8), (0.12, 5.0), (0.162, 8.0), (0.18, 7.32),
                (0.2, 6.75), (0.216, 6.75), (0.236, 6.5), (0.28, 4.5), (0.3, 4.3), (0.345, 4.36),
                (0.436, 3.77), (0.5, 3.17))
AIR_STOL_F = ((0.0, 14.1), (0.045, 13.5), (0.174, 8.35), (0.35, 4.78), (0.5, 4.22))


@dataclass(frozen=True)
class AmorphousMaterial:
    """A slab of amorphous material crossed by the beam."""

    stol_f: tuple[tuple[float, float], ...]
    thickness_mm: float
    density_g_cm3: float
    molar_mass_g_mol: float

    def molecules_in_beam(self, beam_size_m: float) -> float:
        """Molecules in the illuminated volume: thickness x beam area."""
        volume_m3 = self.thickness_mm * 1e-3 * beam_size_m ** 2
        return volume_m3 * self.density_g_cm3 * 1e6 * AVOGADRO / self.molar_mass_g_mol

    def structure_factor(self, stol: np.ndarray) -> np.ndarray:
        """F_bg at sin(theta)/lambda: shape-preserving cubic through the table, flat beyond it."""
        table = np.asarray(self.stol_f)
        clipped = np.clip(stol, table[0, 0], table[-1, 0])
        return PchipInterpolator(table[:, 0], table[:, 1])(clipped)


def water(thickness_mm: float) -> AmorphousMaterial:
    return AmorphousMaterial(WATER_STOL_F, thickness_mm, 1.0, 18.015)


def air(path_mm: float) -> AmorphousMaterial:
    # Dry air at room temperature; the LY99 scripts meant 28 but their setting never took effect
    # (the molar mass stayed 18), so the absolute air level differs from theirs by 18/28.96.
    return AmorphousMaterial(AIR_STOL_F, path_mm, 1.2e-3, 28.96)


def background_profile(beam: Beam, materials: list[AmorphousMaterial], two_theta: np.ndarray) -> np.ndarray:
    """Photons per steradian (before polarization and capture) against the scattering angle."""
    stol = np.sin(two_theta / 2)[:, None] * (beam.inverse_wavelengths.cpu().numpy()[None, :])
    fluence = beam.fluence_per_m2.cpu().numpy()
    total = np.zeros_like(two_theta)
    for material in materials:
        f_sq = material.structure_factor(stol) ** 2
        total += material.molecules_in_beam(beam.size_m) * (f_sq @ fluence)
    return R_E_SQUARED_M2 * total


class PanelBackground:
    """Background on a whole panel for any beam; the per-pixel geometry is computed once.

    The scattering angle and polar * omega * capture of every pixel depend only on the detector
    and the beam's polarization, so a simulation job builds this once and reuses it for each shot.
    """

    def __init__(self, detector: Detector | MultiPanelDetector, polarization_fraction: float,
                 materials: list[AmorphousMaterial], device="cpu", grid_points: int = 4096):
        if isinstance(detector, MultiPanelDetector):
            # Panels of one shape: the background is (n_panels, n_slow, n_fast).
            n_slow, n_fast = int(detector.n_slow_per_panel[0]), int(detector.n_fast_per_panel[0])
            if np.any(detector.n_slow_per_panel != n_slow) or np.any(detector.n_fast_per_panel != n_fast):
                raise ValueError("the background of a multi-panel detector needs panels of one shape")
            panel, slow, fast = torch.meshgrid(torch.arange(len(detector), device=device),
                                               torch.arange(n_slow, device=device),
                                               torch.arange(n_fast, device=device), indexing="ij")
            directions, self.factor = pixel_factors(detector, fast.reshape(-1), slow.reshape(-1),
                                                    polarization_fraction, panel.reshape(-1))
            shape = (len(detector), n_slow, n_fast)
        else:
            slow, fast = torch.meshgrid(torch.arange(detector.n_slow, device=device),
                                        torch.arange(detector.n_fast, device=device), indexing="ij")
            directions, self.factor = pixel_factors(detector, fast.reshape(-1), slow.reshape(-1), polarization_fraction)
            shape = (detector.n_slow, detector.n_fast)
        two_theta = torch.arccos(torch.clamp(-directions[:, 2], -1.0, 1.0))
        self.grid = np.linspace(0.0, float(two_theta.max()) * 1.0001 + 1e-9, grid_points)
        position = two_theta / self.grid[-1] * (grid_points - 1)
        self.lower = torch.clamp(position.floor().long(), max=grid_points - 2)
        self.weight = position - self.lower
        self.shape = shape
        self.materials = materials
        self.polarization_fraction = polarization_fraction

    def photons(self, beam: Beam) -> torch.Tensor:
        """Amorphous background (n_slow, n_fast), float64 photons, for this beam's spectrum."""
        if beam.polarization_fraction != self.polarization_fraction:
            raise ValueError("beam polarization differs from the one the panel geometry was computed for")
        profile = torch.as_tensor(background_profile(beam, self.materials, self.grid), device=self.factor.device)
        per_sr = profile[self.lower] * (1 - self.weight) + profile[self.lower + 1] * self.weight
        return (per_sr * self.factor).reshape(self.shape)


def background_photons(detector: Detector, beam: Beam, materials: list[AmorphousMaterial],
                       device="cpu", grid_points: int = 4096) -> torch.Tensor:
    """Amorphous background on the whole panel (n_slow, n_fast), float64 photons."""
    return PanelBackground(detector, beam.polarization_fraction, materials, device, grid_points).photons(beam)
