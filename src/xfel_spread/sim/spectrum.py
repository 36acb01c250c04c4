"""Shot-to-shot SASE spectra on the simulation's energy channels.

Stochastic model (deterministic from a seed). A self-amplified spontaneous-emission pulse is a
sum of independent longitudinal modes, each a narrow spike. For each shot:

1. the envelope centre is ``centre + jitter * N(0, 1)`` (electron-beam energy jitter);
2. ``n_modes`` spike positions are drawn from a Gaussian envelope of FWHM ``envelope_fwhm``
   around that centre;
3. each spike has a Gaussian line shape of FWHM ``mode_fwhm`` and an exponentially distributed
   weight (the intensity statistics of a single chaotic mode);
4. the spectrum is integrated over each 1-channel-wide bin and scaled to ``total_photons``.

Recorded spectra (one row of photons per channel per shot) can be used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from xfel_spread.config import ConfigError
from xfel_spread.errors import UserInputError

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


class SpectrumFileError(UserInputError, ValueError):
    """A recorded-spectrum file that cannot be used, with the file named."""


@dataclass(frozen=True)
class SaseModel:
    """Parameters of the stochastic SASE spectrum (energies in eV)."""

    envelope_center_ev: float = 7120.0
    envelope_fwhm_ev: float = 25.0
    center_jitter_ev: float = 3.0
    n_modes: int = 30
    mode_fwhm_ev: float = 1.5
    total_photons: float = 1e12


def sase_spectrum(model: SaseModel, energies_ev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photons in each channel (bins of width equal to the channel spacing) for one shot."""
    step = float(np.median(np.diff(energies_ev)))
    lower, upper = energies_ev - step / 2, energies_ev + step / 2
    centre = model.envelope_center_ev + model.center_jitter_ev * rng.standard_normal()
    mode_energy = centre + model.envelope_fwhm_ev * FWHM_TO_SIGMA * rng.standard_normal(model.n_modes)
    mode_weight = rng.exponential(1.0, model.n_modes)
    width = model.mode_fwhm_ev * FWHM_TO_SIGMA * np.sqrt(2.0)
    # Integral of each Gaussian mode over each bin.
    in_bin = 0.5 * (erf((upper[None, :] - mode_energy[:, None]) / width)
                    - erf((lower[None, :] - mode_energy[:, None]) / width))
    spectrum = mode_weight @ in_bin
    total = spectrum.sum()
    if total <= 0:
        raise ConfigError("SASE spectrum fell entirely outside the channels; widen the channel range")
    return spectrum * (model.total_photons / total)


def read_recorded_spectra(path: str, n_channels: int) -> np.ndarray:
    """Photons per channel per shot from a text file (one shot per row) or ``.npy`` array."""
    try:
        spectra = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        raise SpectrumFileError(f"{path}: cannot read recorded spectra ({exc})") from None
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.ndim != 2 or spectra.shape[1] != n_channels:
        raise SpectrumFileError(f"{path}: expected one row of {n_channels} channel values per shot, got shape {spectra.shape}")
    if not np.all(np.isfinite(spectra)) or np.any(spectra < 0) or np.any(spectra.sum(axis=1) <= 0):
        raise SpectrumFileError(f"{path}: spectra must be finite, non-negative and not all zero")
    return spectra


class SpectrumGridError(UserInputError, ValueError):
    """A spectrum that cannot be put on a channel grid (it lies outside it), with the shot named."""


def rebin_spectrum(energies_ev: np.ndarray, weights: np.ndarray, grid_ev: np.ndarray,
                   source: str = "spectrum") -> tuple[np.ndarray, np.ndarray]:
    """A spectrum (channel energies, weights) on the channels of a grid, total weight conserved.

    ``grid_ev``: increasing channel energies, e.g. the ``structure_factors`` section's
    (:func:`xfel_spread.sim.structure_factors.channel_energies`).

    Each input channel's weight is shared linearly between the two grid channels around its energy
    (weight ``1 - f`` to the lower, ``f`` to the upper, ``f`` the fractional position between them), so
    the total weight and the weighted mean energy are both kept exactly (up to rounding); the spectrum
    is only blurred by up to one grid step. A spectrum already on the grid (same number of channels at
    the same energies, within 1e-6 eV) is returned as given, the same arrays, so data made on the grid do
    not change by a bit. Returns ``(grid_ev, weights on the grid)`` otherwise.

    A channel outside the grid's energy range (beyond 1e-6 eV) is refused with one line
    (:class:`SpectrumGridError`) that starts with ``source`` (say the shard and image) and gives both
    ranges.
    """
    energies = np.asarray(energies_ev, dtype=np.float64)
    values = np.asarray(weights, dtype=np.float64)
    grid = np.asarray(grid_ev, dtype=np.float64)
    if energies.shape != values.shape or energies.ndim != 1:
        raise SpectrumGridError(f"{source}: {energies.shape} channel energies but {values.shape} weights")
    if grid.shape == energies.shape and np.allclose(energies, grid, rtol=0, atol=1e-6):
        return energies_ev, weights
    if len(grid) < 2:
        raise SpectrumGridError(f"{source}: a grid of {len(grid)} channel(s) cannot take a spectrum at other energies")
    tolerance = 1e-6
    if energies.size and (energies.min() < grid[0] - tolerance or energies.max() > grid[-1] + tolerance):
        raise SpectrumGridError(f"{source}: spectrum at {energies.min():.3f}-{energies.max():.3f} eV lies outside the "
                                f"channel grid {grid[0]:.3f}-{grid[-1]:.3f} eV (structure_factors.channel_start_ev, "
                                "channel_step_ev, n_channels)")
    lower = np.clip(np.searchsorted(grid, energies, side="right") - 1, 0, len(grid) - 2)
    fraction = np.clip((energies - grid[lower]) / (grid[lower + 1] - grid[lower]), 0.0, 1.0)
    rebinned = np.zeros(len(grid), dtype=np.float64)
    np.add.at(rebinned, lower, values * (1.0 - fraction))
    np.add.at(rebinned, lower + 1, values * fraction)
    return grid.copy(), rebinned
