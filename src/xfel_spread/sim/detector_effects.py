"""From expected photons to detector counts: noise, point spread and analogue-to-digital conversion.

The order is nanoBragg's ``add_noise``: Poisson photon counts, a fixed per-pixel calibration
(gain) error, the fiber-optic point spread of the phosphor, then ADU = photons x gain + offset +
Gaussian readout noise. The PSF spreads the noisy photons, so the datasets with and without PSF
share every random draw and differ only by the spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: fwhm = 2 sqrt(2^(2/3) - 1) g for the fiber PSF g / (2 pi (g^2 + r^2)^(3/2)).
FIBER_G_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 ** (2.0 / 3.0) - 1.0))
INT32_LIMITS = (-(2 ** 31), 2 ** 31 - 1)


@dataclass(frozen=True)
class ReadoutModel:
    """How the detector turns photons into ADU."""

    gain_adu_per_photon: float = 1.0
    adc_offset_adu: float = 10.0
    readout_noise_adu: float = 1.0
    calibration_noise_fraction: float = 0.01


def _fiber_cumulative(x: torch.Tensor, y: torch.Tensor, g: float) -> torch.Tensor:
    """Integral of the fiber PSF over (-inf, x] x (-inf, y] minus the separable parts."""
    return torch.atan(x * y / (g * torch.sqrt(g * g + x * x + y * y))) / (2 * math.pi)


def fiber_psf_kernel(fwhm_px: float, radius_px: int, dtype=torch.float64) -> torch.Tensor:
    """Pixel-integrated fiber PSF on a (2R+1)^2 grid, zero outside the circle of radius R.

    The share of light beyond the radius (the fiber's long tail) is not in the kernel; see
    :func:`apply_fiber_psf` for where it goes.
    """
    g = fwhm_px * FIBER_G_PER_FWHM
    offsets = torch.arange(-radius_px, radius_px + 1, dtype=dtype)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    kernel = (_fiber_cumulative(dx + 0.5, dy + 0.5, g) - _fiber_cumulative(dx + 0.5, dy - 0.5, g)
              - _fiber_cumulative(dx - 0.5, dy + 0.5, g) + _fiber_cumulative(dx - 0.5, dy - 0.5, g))
    return torch.where(dx ** 2 + dy ** 2 <= radius_px ** 2, kernel, torch.zeros_like(kernel))


def apply_fiber_psf(photons: torch.Tensor, fwhm_px: float, radius_px: int) -> torch.Tensor:
    """Spread an image through the fiber PSF, conserving photons.

    Light within the kernel radius is convolved (linear convolution by FFT; light spread past the
    panel edge is lost, as on a real detector). The tail beyond the radius is spread evenly over
    the whole panel, as nanoBragg does, so the total is conserved.
    """
    kernel = fiber_psf_kernel(fwhm_px, radius_px, dtype=photons.dtype).to(photons.device)
    n_slow, n_fast = photons.shape
    size = (n_slow + 2 * radius_px, n_fast + 2 * radius_px)
    spectrum = torch.fft.rfft2(photons, s=size) * torch.fft.rfft2(kernel, s=size)
    spread = torch.fft.irfft2(spectrum, s=size)[radius_px:radius_px + n_slow, radius_px:radius_px + n_fast]
    tail_share = 1.0 - float(kernel.sum())
    return spread + photons.sum() * tail_share / photons.numel()


def calibration_pattern(shape: tuple[int, int], fraction: float, seed: int, device="cpu") -> torch.Tensor:
    """Fixed per-pixel gain error 1 + fraction * N(0, 1): the same for every shot of a run."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return 1.0 + fraction * torch.randn(shape, generator=generator, dtype=torch.float64, device=device)


@dataclass
class NoisyPhotons:
    """The random draws of one shot, shared by the datasets with and without PSF."""

    photons: torch.Tensor
    readout_adu: torch.Tensor


def draw_noise(expected_photons: torch.Tensor, calibration: torch.Tensor, readout: ReadoutModel,
               seed: int) -> NoisyPhotons:
    """Poisson counts times the calibration pattern, and the readout noise, for one shot."""
    generator = torch.Generator(device=expected_photons.device).manual_seed(seed)
    counts = torch.poisson(torch.clamp(expected_photons, min=0.0), generator=generator)
    readout_adu = readout.readout_noise_adu * torch.randn(
        expected_photons.shape, generator=generator, dtype=expected_photons.dtype, device=expected_photons.device)
    return NoisyPhotons(counts * calibration, readout_adu)


def to_adu(photons: torch.Tensor, readout_adu: torch.Tensor, readout: ReadoutModel) -> torch.Tensor:
    """Integer ADU, rounded to nearest and never clipped (int32 holds the full dynamic range)."""
    adu = torch.round(photons * readout.gain_adu_per_photon + readout.adc_offset_adu + readout_adu)
    low, high = float(adu.min()), float(adu.max())
    if low < INT32_LIMITS[0] or high > INT32_LIMITS[1]:
        raise OverflowError(f"ADU range {low:g}..{high:g} does not fit in int32; lower the gain or the flux")
    return adu.to(torch.int32)
