"""Synthetic SPREAD data made with SPREAD's own model, for tests and the benchmark.

Each shoebox is one reflection on a ``box_px`` square; its spot is a streak along ``dx``: channel k
lands at ``dx = (k - k_center) / channels_per_px`` with a Gaussian profile of ``sigma_px`` in x and y,
weighted by the shot's spectrum. So a pixel's coefficients are::

    c_{p,k} = amplitude * spectrum_s[k] * exp(-(dx_p - x_k)^2 / (2 sigma^2)) * exp(-dy_p^2 / (2 sigma^2))

kept where ``c_{p,k} >= cutoff * max_k c_{p,k}`` (the sparsification a real shot's coefficients get;
the share dropped is at most ``cutoff`` per channel relative to the pixel's largest). Spectra are
SASE-like: a Gaussian envelope of ``envelope_fwhm_ev`` centred at random inside the channels, times
exponentially distributed spikes. Measured photons are Poisson of the expected ones plus Gaussian
readout noise.
"""

from __future__ import annotations

import numpy as np
import torch

from xfel_spread.spread.model import (
    Decomposition,
    SpreadData,
    expected_photons,
    intensities,
    unit_bragg,
)


def sase_spectra(n_shots: int, energies_ev: np.ndarray, rng: np.random.Generator,
                 envelope_fwhm_ev: float = 30.0) -> np.ndarray:
    """(n_shots, n_channels) spectra, each normalised to a sum of 1."""
    centers = rng.uniform(energies_ev[0] + 15.0, energies_ev[-1] - 15.0, size=n_shots)
    sigma = envelope_fwhm_ev / 2.3548
    envelope = np.exp(-0.5 * ((energies_ev[None, :] - centers[:, None]) / sigma) ** 2)
    spikes = rng.exponential(size=envelope.shape)
    spectra = envelope * spikes
    return spectra / spectra.sum(axis=1, keepdims=True)


def synthetic_layout(n_shots: int, boxes_per_shot: int, n_reflections: int, spectra: np.ndarray,
                     rng: np.random.Generator, box_px: int = 8, channels_per_px: float = 3.0,
                     sigma_px: float = 0.8, amplitude: float = 1.0, cutoff: float = 1e-3,
                     readout_var: float = 0.25, coefficient_dtype=torch.float64) -> SpreadData:
    """Pixels, shoeboxes and sparse coefficients of a synthetic set (``data`` all zero; see
    :func:`simulate`). ``amplitude`` is the spot's total photons per unit G, |F|^2 and spectrum sum."""
    n_channels = spectra.shape[1]
    n_boxes = n_shots * boxes_per_shot
    offsets = np.arange(box_px) - (box_px - 1) / 2.0
    dy_grid, dx_grid = np.meshgrid(offsets, offsets, indexing="ij")
    dx_box, dy_box = dx_grid.ravel(), dy_grid.ravel()
    n_px = box_px * box_px
    reflection = rng.integers(0, n_reflections, size=n_boxes)
    center = rng.uniform(0, n_channels - 1, size=n_boxes)
    shot_of_box = np.repeat(np.arange(n_shots), boxes_per_shot)
    norm = amplitude / (2 * np.pi * sigma_px ** 2)
    window = int(np.ceil(channels_per_px * sigma_px * np.sqrt(2 * np.log(1 / cutoff)) + 1))
    pixels, pairs, coeffs = [], [], []
    taps = np.arange(-window, window + 1)
    chunk = max(1, 200_000 // (n_px * len(taps)))
    for first in range(0, n_boxes, chunk):
        boxes = np.arange(first, min(n_boxes, first + chunk))
        nearest = np.rint(center[boxes, None] + dx_box[None, :] * channels_per_px)  # (b, px)
        ks = nearest[:, :, None] + taps[None, None, :]  # (b, px, taps)
        inside = (ks >= 0) & (ks < n_channels)
        ks = np.clip(ks, 0, n_channels - 1).astype(np.int64)
        x_of_channel = (ks - center[boxes, None, None]) / channels_per_px
        c = (norm * spectra[shot_of_box[boxes, None, None], ks]
             * np.exp(-0.5 * (dy_box[None, :, None] / sigma_px) ** 2)
             * np.exp(-0.5 * ((dx_box[None, :, None] - x_of_channel) / sigma_px) ** 2)) * inside
        keep = (c >= cutoff * c.max(axis=2, keepdims=True)) & (c > 0)
        pixel_index = boxes[:, None, None] * n_px + np.arange(n_px)[None, :, None]
        pixels.append(np.broadcast_to(pixel_index, c.shape)[keep])
        pairs.append(ks[keep] * n_reflections + reflection[boxes, None, None].repeat(n_px, 1).repeat(len(taps), 2)[keep])
        coeffs.append(c[keep])
    return SpreadData(
        data=torch.zeros(n_boxes * n_px, dtype=torch.float64),
        shoebox=torch.as_tensor(np.repeat(np.arange(n_boxes), n_px)),
        dx=torch.as_tensor(np.tile(dx_box, n_boxes)), dy=torch.as_tensor(np.tile(dy_box, n_boxes)),
        readout_var=torch.full((n_boxes * n_px,), readout_var, dtype=torch.float64),
        shot=torch.as_tensor(shot_of_box),
        term_pixel=torch.as_tensor(np.concatenate(pixels)), term_pair=torch.as_tensor(np.concatenate(pairs)),
        term_coeff=torch.as_tensor(np.concatenate(coeffs)).to(coefficient_dtype),
        n_shots=n_shots)


def simulate(data: SpreadData, fp_grid: np.ndarray, fdp_grid: np.ndarray, interpolation: np.ndarray,
             decomposition: Decomposition, scale: np.ndarray, background: np.ndarray,
             rng: np.random.Generator) -> torch.Tensor:
    """Measured photons: Poisson(mu) + N(0, readout_var) of the model at the given truth."""
    with torch.no_grad():
        intensity = intensities(torch.as_tensor(fp_grid), torch.as_tensor(fdp_grid), torch.as_tensor(interpolation),
                                decomposition)
        mu = expected_photons(unit_bragg(intensity, data), torch.as_tensor(scale), torch.as_tensor(background), data)
    mu = mu.numpy()
    counts = rng.poisson(np.clip(mu, 0, None)) + rng.normal(0.0, np.sqrt(data.readout_var.numpy()))
    return torch.as_tensor(counts.astype(np.float64))
