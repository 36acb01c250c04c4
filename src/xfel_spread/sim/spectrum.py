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
