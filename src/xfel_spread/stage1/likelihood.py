"""Expected photons in the shoebox pixels and the likelihood of the measured ones.

Each pixel's expected photons are the shoebox's tilted-plane background plus the Bragg photons of
the forward model (:func:`xfel_spread.sim.forward.bragg_photons_dense` on the shoebox pixels,
evaluated over its terms below the cut-off, equal to it to rounding:
:func:`~xfel_spread.sim.forward.bragg_photons_pixels` for sharp domains, one or many, and
:func:`~xfel_spread.sim.forward.bragg_photons_mosaic_pixels` for the analytic mosaic spread; scale G
included)::

    model = background + G * bragg

Measured photons carry Poisson noise and the detector's Gaussian readout noise (sigma_r =
readout_sigma_adu / gain photons). As diffBragg does, their sum is approximated by a Gaussian of
variance ``v = model + sigma_r^2``, whose negative log-likelihood over the trusted pixels is::

    NLL = sum 0.5 * log(2 pi v) + (data - model)^2 / (2 v)

``model`` enters the variance clipped at 0 (a tilted plane can dip below zero at a shoebox corner),
and the variance is floored at :data:`VARIANCE_FLOOR` so that a pixel predicted empty without readout
noise keeps a finite weight. The Z-scores ``(data - model) / sqrt(v)`` of a good model have unit
standard deviation.

Behind a detector's point spread a pixel's Poisson variance is not ``model``: the photons are spread
after they are counted, so it is the expected photons spread by the squared kernel
(:mod:`xfel_spread.stage1.psf`), about a tenth of ``model``. The functions below take that Poisson
variance as ``poisson`` where it differs from ``model``, and the refinement carries it beside the
Bragg photons (:class:`PixelPhotons`) for the Z-scores. The refinement's NLL keeps ``model`` as the
variance there too: the spread also correlates neighbouring pixels' noise, which a per-pixel
likelihood cannot hold, and with ``model`` as the variance a spot's pixels weigh as their sum, whose
noise is the counted photons' (measured: README, "The likelihood behind the point spread").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.sim.forward import (AmplitudeLookup, Beam, SparseTermCache, bragg_photons_mosaic_pixels,
                                    bragg_photons_pixels, compiled_pair_sums)
from xfel_spread.sim.geometry import Detector
from xfel_spread.stage1.model import REFERENCE_BEAM_SIZE_M, CrystalModel
from xfel_spread.stage1.psf import ShotSpread, SpreadMap, spread
from xfel_spread.stage1.shot import ShotPixels

#: Most (pixel, channel, domain) terms per call of the sparse models of a shot (:func:`bragg_photons`),
#: counted as dense terms: on a CPU 400-800 pixels of 25 domains and 100 channels per call evaluated
#: 20 shoeboxes in 0.14 s (forward and backward) against 0.15-0.27 s in calls of 25 or of every pixel;
#: one domain (or the analytic spread) takes a shot's pixels in one call.
SPARSE_TERMS_PER_CALL = 1 << 20
#: Most (pixel, domain) pairs per call of the free domains' cached sparse model where the compiled
#: loop evaluates it (:func:`~xfel_spread.sim.forward.compiled_pair_sums`): it makes no padded
#: (pair, channel) rows, so its memory goes with the pairs, and fewer, larger calls cost less Python
#: and autograd. A demo lattice of 25 domains (about 10^4 pixels, one call) took 5.4 s for its free
#: domains against 6.1 s in calls of 2^14 pairs and 7.1 s in the 419-pixel calls of SPARSE_TERMS_PER_CALL;
#: the demo's 8 psf lattices 24.1 s against 31.3 s (AMD EPYC, one thread).
SPARSE_PAIRS_PER_CALL = 1 << 18
#: Smallest pixel variance (photons^2).
VARIANCE_FLOOR = 1e-6
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class ShotDataError(ValueError):
    """Shoebox pixels that cannot be refined (none trusted, non-finite values, no spectrum)."""


def readout_variance(readout_sigma_adu: float, gain_adu_per_photon: float) -> float:
    """The readout noise variance in photons^2."""
    return (readout_sigma_adu / gain_adu_per_photon) ** 2


@dataclass
class PixelPhotons:
    """G * Bragg photons at some pixels (``mean``) and their share of the pixels' Poisson variance
    (``variance``): the same tensor without a point spread, the photons spread by the squared kernel
    behind one. Index both at once with :meth:`at`."""

    mean: torch.Tensor
    variance: torch.Tensor

    @classmethod
    def poisson(cls, mean: torch.Tensor) -> PixelPhotons:
        """Photons counted where they land: their variance is their mean."""
        return cls(mean, mean)

    @classmethod
    def from_unspread(cls, shot_spread: ShotSpread | None, photons: torch.Tensor,
                      pixels: torch.Tensor) -> PixelPhotons:
        """Without a point spread (``shot_spread`` None) the ``photons`` of the pixels, counted where
        they land; behind one, ``photons`` at every shoebox pixel spread by the kernel and taken at
        ``pixels``, with their variance spread by the squared kernel."""
        if shot_spread is None:
            return cls.poisson(photons)
        return cls(spread(shot_spread.photons, photons)[pixels], spread(shot_spread.variance, photons)[pixels])

    def at(self, pixels: torch.Tensor) -> PixelPhotons:
        """The photons and variances of the given positions."""
        if self.variance is self.mean:
            return PixelPhotons.poisson(self.mean[pixels])
        return PixelPhotons(self.mean[pixels], self.variance[pixels])

    def scaled(self, factor) -> PixelPhotons:
        """Both times ``factor`` (the scale G: both are linear in it)."""
        if self.variance is self.mean:
            return PixelPhotons.poisson(self.mean * factor)
        return PixelPhotons(self.mean * factor, self.variance * factor)


@dataclass
class ShotTensors:
    """One shot's pixels and beam as float64 / int64 tensors on one device.

    ``fast``, ``slow``, ``roi`` cover every shoebox pixel; ``trusted`` are the indices of the trusted
    ones, which alone enter the likelihood.
    """

    fast: torch.Tensor
    slow: torch.Tensor
    roi: torch.Tensor
    data: torch.Tensor
    background: torch.Tensor
    trusted: torch.Tensor
    beam: Beam
    readout_variance: float
    panel: torch.Tensor | None = None  #: each pixel's panel on a multi-panel detector, else None


def check_shot(shot: ShotPixels) -> None:
    """Raise ShotDataError if the shot's pixels or spectrum cannot be refined."""
    pixel_arrays = ("pixel_fast", "pixel_slow", "pixel_roi", "data_photons", "background_photons", "trusted")
    lengths = {len(getattr(shot, name)) for name in pixel_arrays}
    if len(lengths) != 1 or len(shot.energies_ev) != len(shot.photons):
        raise ShotDataError("pixel arrays, or channel energies and photons, differ in length")
    if shot.n_pixels and (min(shot.pixel_roi) < 0 or max(shot.pixel_roi) >= shot.n_rois):
        raise ShotDataError(f"pixel ROI numbers fall outside the {shot.n_rois} ROIs")
    trusted = np.asarray(shot.trusted, dtype=bool)
    if shot.n_pixels == 0 or not trusted.any():
        raise ShotDataError("no trusted shoebox pixels")
    for name in ("data_photons", "background_photons"):
        values = np.asarray(getattr(shot, name), dtype=np.float64)[trusted]
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ShotDataError(f"{bad} trusted pixel(s) hold non-finite {name}")
    photons = np.asarray(shot.photons, dtype=np.float64)
    if not np.all(np.isfinite(photons)) or np.any(photons < 0) or photons.sum() <= 0:
        raise ShotDataError("the shot's spectrum has no photons, or negative or non-finite ones")
    if not shot.gain_adu_per_photon > 0:
        raise ShotDataError(f"gain {shot.gain_adu_per_photon} ADU/photon is not positive")


def shot_beam(shot: ShotPixels, device) -> Beam:
    """The shot's spectrum as the forward model's Beam (reference beam size, see the model module)."""
    return Beam(torch.as_tensor(np.asarray(shot.energies_ev, dtype=np.float64), device=device),
                torch.as_tensor(np.asarray(shot.photons, dtype=np.float64), device=device),
                REFERENCE_BEAM_SIZE_M, float(shot.polarization_fraction))


def same_for_every_channel(amplitudes: AmplitudeLookup, n_channels: int) -> AmplitudeLookup:
    """A one-row table (|F| without energy dependence, e.g. from merged IMEAN) repeated for every
    channel, as a view: the forward model looks |F|^2 up by channel."""
    if amplitudes.intensity.shape[0] != 1:
        raise ValueError(f"expected a one-row amplitude table, got {amplitudes.intensity.shape[0]} rows")
    repeated = copy.copy(amplitudes)
    repeated.intensity = amplitudes.intensity.expand(n_channels, -1)
    return repeated


def check_amplitude_rows(amplitudes: AmplitudeLookup, n_channels: int) -> None:
    """ShotDataError unless the amplitude table has one row of |F|^2 per channel of the spectrum."""
    rows = amplitudes.intensity.shape[0]
    if rows != n_channels:
        raise ShotDataError(f"the amplitude table has {rows} channel rows for the shot's {n_channels} channels")


def shot_tensors(shot: ShotPixels, readout_sigma_adu: float, device) -> ShotTensors:
    """The shot's arrays on ``device`` (checked first with :func:`check_shot`)."""
    check_shot(shot)

    def as_long(values):
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)

    def as_float(values):
        return torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)

    return ShotTensors(
        fast=as_long(shot.pixel_fast), slow=as_long(shot.pixel_slow), roi=as_long(shot.pixel_roi),
        data=as_float(shot.data_photons), background=as_float(shot.background_photons),
        trusted=as_long(np.flatnonzero(np.asarray(shot.trusted, dtype=bool))),
        beam=shot_beam(shot, device),
        readout_variance=readout_variance(readout_sigma_adu, shot.gain_adu_per_photon),
        panel=None if shot.pixel_panel is None else as_long(shot.pixel_panel),
    )


def bragg_photons(detector: Detector, crystal: CrystalModel, values: torch.Tensor, tensors: ShotTensors,
                  amplitudes: AmplitudeLookup, pixels: torch.Tensor | None = None,
                  cache: SparseTermCache | None = None) -> torch.Tensor:
    """G * Bragg photons at the given pixel indices (default: the trusted ones).

    ``detector`` is the shot's detector already moved by ``detz_shift_mm`` (see
    :func:`xfel_spread.stage1.model.shifted_detector`); the result is differentiable in ``values``.
    ``cache`` keeps the sparse model's terms between evaluations (many domains only).
    """
    pixels = tensors.trusted if pixels is None else pixels
    fast, slow = tensors.fast[pixels], tensors.slow[pixels]
    state = crystal.crystal_state(values)
    # Only the terms below the cut-off, equal to the dense evaluation to rounding: of the analytic mosaic
    # spread (about 40 % of them live on LY99 shots), or of sharp domains, one or stage 1's free domains
    # (about half; dense where N is too small to skip terms, see sparse_pixels_apply).
    model = bragg_photons_pixels if state.mosaic_variance is None else bragg_photons_mosaic_pixels
    cached = cache is not None and model is bragg_photons_pixels
    if cached and compiled_pair_sums(fast.device, state.domain_matrices.dtype):
        step = max(1, SPARSE_PAIRS_PER_CALL // crystal.n_domains)
    else:
        step = max(1, SPARSE_TERMS_PER_CALL // (tensors.beam.energies_ev.numel() * crystal.n_domains))
    panel = None if tensors.panel is None else tensors.panel[pixels]

    def chunk(start: int) -> torch.Tensor:
        inputs = (detector, tensors.beam, state, amplitudes, fast[start:start + step], slow[start:start + step],
                  None if panel is None else panel[start:start + step])
        if not cached:
            return model(*inputs)
        # The sharp domains' terms are kept per chunk of these pixels and this many domain matrices.
        return model(*inputs, cache=cache, cache_key=(state.domain_matrices.shape[0], fast.numel(), start))

    return torch.cat([chunk(start) for start in range(0, fast.numel(), step)])


def pixel_variance(poisson: torch.Tensor, readout_var: float | torch.Tensor) -> torch.Tensor:
    """Poisson plus readout variance of each pixel, floored. ``poisson`` is the Poisson variance:
    the expected photons themselves, except behind a point spread (see the module docstring)."""
    return torch.clamp(torch.clamp(poisson, min=0) + readout_var, min=VARIANCE_FLOOR)


def poisson_variance(background: torch.Tensor, bragg: PixelPhotons,
                     variance_share: float | torch.Tensor | None) -> torch.Tensor | None:
    """The Poisson variance of pixels of ``background`` photons (the tilted plane) and ``bragg``
    (G * Bragg photons and their variance). Without a point spread (``variance_share`` None) it is
    the expected photons themselves and None is returned (``pixel_nll`` then takes the model). Behind
    one it is the Bragg photons' spread variance plus the smooth background's photons times the
    squared kernel's sum, ``variance_share`` (:class:`xfel_spread.stage1.psf.ShotSpread`)."""
    if variance_share is None:
        return None
    return variance_share * torch.clamp(background, min=0) + bragg.variance


def pixel_nll(model: torch.Tensor, data: torch.Tensor, readout_var: float | torch.Tensor,
              poisson: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel negative log-likelihood of the Gaussian approximation (``poisson``: the Poisson
    variance where it is not ``model``)."""
    variance = pixel_variance(model if poisson is None else poisson, readout_var)
    return HALF_LOG_TWO_PI + 0.5 * torch.log(variance) + (data - model) ** 2 / (2 * variance)


def z_scores(model: torch.Tensor, data: torch.Tensor, readout_var: float | torch.Tensor,
             poisson: torch.Tensor | None = None) -> torch.Tensor:
    """Residuals in units of their expected standard deviation."""
    return (data - model) / torch.sqrt(pixel_variance(model if poisson is None else poisson, readout_var))


def z_score_sigma(model: torch.Tensor, data: torch.Tensor, readout_var: float | torch.Tensor,
                  poisson: torch.Tensor | None = None) -> float:
    """Standard deviation of the Z-scores (1 for a model that explains the data down to the noise)."""
    z = z_scores(model, data, readout_var, poisson)
    return float(torch.std(z)) if z.numel() > 1 else float("nan")


def plane_share_map(shot: ShotPixels, device) -> SpreadMap | None:
    """The linear map from the Bragg photons of the trusted pixels to the share of them each ROI's
    background plane holds, or None when the shot does not say which pixels the planes were fitted
    to (``ShotPixels.background_fit``).

    The plane is a least-squares fit to pixels on the shoebox's border, and a spot's light reaches
    them (its own tails, and the detector's point spread, whose fiber tail falls as the distance
    cubed). So the plane holds, besides the background, the least-squares plane through the Bragg
    photons at those pixels. For ROI r with fitted pixels F and trusted pixels T, with the plane's
    design rows ``A = [1, x, y]``, the map's block is ``A_T pinv(A_F)`` (T x F); a ROI with fewer
    than three fitted pixels, or all on a line, has none.
    """
    if shot.background_fit is None:
        return None
    trusted = np.flatnonzero(np.asarray(shot.trusted, dtype=bool))
    fitted = np.asarray(shot.background_fit, dtype=bool)[trusted]
    roi = np.asarray(shot.pixel_roi)[trusted]
    x = np.asarray(shot.pixel_fast, dtype=np.float64)[trusted]
    y = np.asarray(shot.pixel_slow, dtype=np.float64)[trusted]
    order = np.argsort(roi, kind="stable")
    starts = np.searchsorted(roi[order], np.arange(shot.n_rois + 1))
    rows, columns, weights = [], [], []
    for index in range(shot.n_rois):
        members = order[starts[index]:starts[index + 1]]
        sources = members[fitted[members]]
        if sources.size < 3:
            continue
        x0, y0 = x[sources].mean(), y[sources].mean()
        design = np.stack((np.ones(members.size), x[members] - x0, y[members] - y0), axis=1)
        source_design = np.stack((np.ones(sources.size), x[sources] - x0, y[sources] - y0), axis=1)
        if np.linalg.matrix_rank(source_design) < 3:
            continue
        block = design @ np.linalg.pinv(source_design)
        rows.append(np.repeat(members, sources.size))
        columns.append(np.tile(sources, members.size))
        weights.append(block.ravel())
    if not rows:
        return None
    return SpreadMap.from_entries(np.concatenate(rows), np.concatenate(columns), np.concatenate(weights),
                                  trusted.size, device)


def closed_form_scale(unit_bragg: torch.Tensor, data: torch.Tensor, background: torch.Tensor,
                      roi: torch.Tensor) -> float:
    """Least-squares G for the shoebox sums: sum_roi (signal_roi - G * bragg_roi)^2 is least.

    ``signal_roi`` is the background-subtracted photons and ``bragg_roi`` the start model's Bragg
    photons per unit G, both summed over each shoebox's given (trusted) pixels. Fitting sums rather
    than pixels keeps the estimate sound when the start model's spots sit a pixel or two off the
    measured ones. The result may be <= 0 or non-finite when the shoeboxes hold no Bragg signal.
    """
    n_rois = int(roi.max()) + 1 if roi.numel() else 0
    signal = torch.zeros(n_rois, dtype=data.dtype, device=data.device).index_add_(0, roi, data - background)
    bragg = torch.zeros(n_rois, dtype=data.dtype, device=data.device).index_add_(0, roi, unit_bragg)
    denominator = float((bragg ** 2).sum())
    if not denominator > 0:
        return float("nan")
    return float((bragg * signal).sum()) / denominator
