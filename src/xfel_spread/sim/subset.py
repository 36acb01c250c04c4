"""Pixel-subset simulation: only the annulus shoeboxes of each shot, with the full simulator's physics.

Stage 1 and SPREAD read nothing of an image but the shoeboxes around the reflections of the annulus
resolution shell. This mode simulates those pixels alone, so that tens of thousands of shots fit on
a few cores:

- **Which pixels.** The shot's reflections of the shell ``d_min <= d < d_max`` are predicted from its
  true crystal (the unrotated mosaic centre) and the *true* detector (:func:`predict_annulus`): the
  energy at which h lies exactly on the Ewald sphere, ``u = |q|^2 / (2 q_z)``, must fall inside the
  shot's spectrum (between its ``spectrum_quantile`` and ``1 - spectrum_quantile`` cumulative
  photons), and the diffracted ray at that energy must meet the panel; its hit is the predicted
  centroid. Shoeboxes are placed and their pixels owned exactly as stage 1 does with DIALS's observed
  centroids (:mod:`xfel_spread.sim.shoeboxes`: ``shoebox_size_px`` squares, a pixel in two boxes to
  the nearer centroid, pixels within a quarter box of another centroid untrusted).
- **Expected photons.** Bragg photons from the sparse kernel of the full simulator
  (:func:`xfel_spread.sim.forward.candidate_terms`) on the streaks whose boxes meet a shoebox, and the
  amorphous background through the same 2-theta table as :class:`xfel_spread.sim.background.
  PanelBackground` (the table's grid spans the whole panel, from its corners, as the panel's own does).
  They equal the full simulator's expected image at those pixels to rounding (tested).
- **Noise and ADU.** The full simulator's code (:func:`xfel_spread.sim.detector_effects.draw_noise`,
  ``to_adu``) on the subset, with the run's calibration pattern at those pixels. The draws are the
  same model (Poisson, calibration, Gaussian readout), not the same numbers as a full image's (a
  full image draws every pixel of the panel from the shot's stream).
- **Point spread (psf dataset).** The full simulator spreads the noisy photons of the whole panel
  through the fiber kernel of radius R and adds the kernel's tail (the light beyond R) evenly over
  the panel. Here every shoebox is grown by R on each side, the noisy photons are drawn on the union
  of grown boxes, each shoebox's pixels are the kernel applied to its grown box (zero beyond the
  panel edge, as the full image's zero-padded convolution) and cropped. That part is exact: every
  pixel within R of a shoebox pixel is in its grown box. The tail constant needs the whole panel's
  photon total; here it is the *expected* total: the background of the whole panel (exact, a fixed
  linear map of the shot's 2-theta profile) plus the Bragg photons of the evaluated pixels. It
  leaves out the Bragg photons outside the grown boxes and the Poisson scatter of the total: with
  LY99's kernel (0.08 mm on 0.088 mm pixels, R = 10) the tail holds a few per cent of the light,
  spread over 14.7 M pixels, so the constant is off by far less than a photon per pixel
  (``panel_total`` overrides it; the test passes the full image's total and agrees to rounding).

:func:`simulate_subset_shot` returns one shot's pixels, both datasets' photons, and the Bragg terms
per unit scale and unit |F|^2 (pixel, channel, Miller index, value): with the true |F| they sum to
the simulated Bragg photons, and they are the coefficients SPREAD needs at the true geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as nnf

from xfel_spread.sim import background as bg
from xfel_spread.sim import crystal as xtal
from xfel_spread.sim import detector_effects as effects
from xfel_spread.sim.forward import (
    ARG_CUTOFF,
    GAUSS_WIDTH,
    Beam,
    CrystalState,
    candidate_terms,
    cutoff_radius,
    excited_streaks,
    photon_prefactor,
    pixel_factors,
)
from xfel_spread.sim.geometry import Detector
from xfel_spread.sim.shard import (
    STREAM_NOISE,
    ShotTruth,
    SimulationSetup,
    draw_crystal,
    shot_spectrum,
    shot_torch_seed,
)
from xfel_spread.sim.shoeboxes import assign_box_pixels, shoebox_bounds
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM

#: Candidate (streak, pixel) pairs evaluated at once.
CANDIDATES_PER_CHUNK = 1 << 19


@dataclass(frozen=True)
class SubsetSettings:
    """What to simulate of each shot: the annulus shell, the shoebox size, and the spectrum window."""

    d_min_a: float = 2.1
    d_max_a: float = 2.5
    shoebox_size_px: int = 12
    spectrum_quantile: float = 0.005
    psf: bool = True


def predict_annulus(detector: Detector, real_space_matrix: np.ndarray, hkl: np.ndarray, energies_ev: np.ndarray,
                    photons: np.ndarray, d_min_a: float, d_max_a: float,
                    spectrum_quantile: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Miller indices (n, 3) and predicted centroids (n, 2: fast, slow pixel coordinates) of the shell.

    ``real_space_matrix`` has rows a, b, c (Angstrom, laboratory frame); the beam runs along -z. A
    reflection is kept when its d lies in ``[d_min_a, d_max_a)``, the energy that puts it exactly on
    the Ewald sphere lies between the spectrum's ``spectrum_quantile`` and ``1 - spectrum_quantile``
    cumulative photons, and its ray meets the panel.
    """
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    q = hkl @ np.linalg.inv(np.asarray(real_space_matrix, dtype=np.float64)).T  # q = A^-1 h (1/Angstrom)
    q_sq = (q ** 2).sum(axis=1)
    with np.errstate(divide="ignore"):
        d_spacing = 1.0 / np.sqrt(q_sq)
    cumulative = np.cumsum(photons) / np.sum(photons)
    e_low = float(energies_ev[np.searchsorted(cumulative, spectrum_quantile)])
    e_high = float(energies_ev[min(len(energies_ev) - 1, np.searchsorted(cumulative, 1 - spectrum_quantile))])
    q_z = q[:, 2]
    shell = (d_spacing >= d_min_a) & (d_spacing < d_max_a) & (q_z > 0)
    u = np.where(shell, q_sq / (2 * np.where(q_z > 0, q_z, 1.0)), 0.0)
    energy = u * HC_EV_ANGSTROM
    keep = shell & (energy >= e_low) & (energy <= e_high)
    q, u = q[keep], u[keep]
    direction = q.copy()
    direction[:, 2] -= u
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    fast, slow, towards = detector.project_directions_px(torch.as_tensor(direction))
    fast, slow, towards = fast.numpy(), slow.numpy(), towards.numpy()
    on_panel = towards & (fast >= 0) & (fast < detector.n_fast) & (slow >= 0) & (slow < detector.n_slow)
    return hkl[keep][on_panel], np.stack((fast[on_panel], slow[on_panel]), axis=1)


class SubsetBackground:
    """The amorphous background at any pixels, exactly as :class:`~xfel_spread.sim.background.
    PanelBackground` gives it on the whole panel: the same 2-theta grid (its end from the panel's
    farthest pixel, a corner) and the same interpolation. ``panel_weights`` (built on first use, in
    chunks of the panel) turns a shot's 2-theta profile into the whole panel's background total."""

    def __init__(self, detector: Detector, polarization_fraction: float, materials: list, device="cpu",
                 grid_points: int = 4096):
        self.detector = detector
        self.polarization_fraction = polarization_fraction
        self.materials = materials
        self.device = device
        self.grid_points = grid_points
        corners_fast = torch.tensor([0, detector.n_fast - 1, 0, detector.n_fast - 1], device=device)
        corners_slow = torch.tensor([0, 0, detector.n_slow - 1, detector.n_slow - 1], device=device)
        directions, _ = pixel_factors(detector, corners_fast, corners_slow, polarization_fraction)
        two_theta = torch.arccos(torch.clamp(-directions[:, 2], -1.0, 1.0))
        self.grid = np.linspace(0.0, float(two_theta.max()) * 1.0001 + 1e-9, grid_points)

    def _interpolation(self, fast: torch.Tensor, slow: torch.Tensor):
        directions, factor = pixel_factors(self.detector, fast, slow, self.polarization_fraction)
        two_theta = torch.arccos(torch.clamp(-directions[:, 2], -1.0, 1.0))
        position = two_theta / self.grid[-1] * (self.grid_points - 1)
        lower = torch.clamp(position.floor().long(), max=self.grid_points - 2)
        return lower, position - lower, factor

    def profile(self, beam: Beam) -> torch.Tensor:
        if beam.polarization_fraction != self.polarization_fraction:
            raise ValueError("beam polarization differs from the one the background geometry was computed for")
        return torch.as_tensor(bg.background_profile(beam, self.materials, self.grid), device=self.device)

    def photons(self, beam: Beam, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        """Background photons (float64) at the pixels (fast, slow)."""
        profile = self.profile(beam)
        lower, weight, factor = self._interpolation(fast, slow)
        per_sr = profile[lower] * (1 - weight) + profile[lower + 1] * weight
        return per_sr * factor

    @cached_property
    def panel_weights(self) -> torch.Tensor:
        """(grid_points,) weights w with sum over the panel of the background = w . profile."""
        weights = torch.zeros(self.grid_points, dtype=torch.float64, device=self.device)
        n_fast = self.detector.n_fast
        rows = max(1, (1 << 20) // n_fast)
        for slow0 in range(0, self.detector.n_slow, rows):
            slow, fast = torch.meshgrid(torch.arange(slow0, min(self.detector.n_slow, slow0 + rows), device=self.device),
                                        torch.arange(n_fast, device=self.device), indexing="ij")
            lower, weight, factor = self._interpolation(fast.reshape(-1), slow.reshape(-1))
            weights.index_add_(0, lower, (1 - weight) * factor)
            weights.index_add_(0, lower + 1, weight * factor)
        return weights

    def panel_total(self, beam: Beam) -> float:
        """The whole panel's background photons for this beam."""
        return float(self.panel_weights @ self.profile(beam))


@dataclass
class BraggTerms:
    """Bragg terms of a set of pixels, summed over mosaic domains: photons per unit crystal scale and
    unit |F|^2 (``value``) of pixel ``pixel`` (index into the set), channel ``channel`` and Miller
    index ``hkl`` (int64, (T, 3))."""

    pixel: np.ndarray
    channel: np.ndarray
    hkl: np.ndarray
    value: np.ndarray


def _reachable(detector: Detector, beam: Beam, crystal: CrystalState, hkl: torch.Tensor, fast: torch.Tensor,
               slow: torch.Tensor, radius: float) -> torch.Tensor:
    """The Miller indices whose light can reach the pixels at some channel.

    A pixel at scattering angle 2 theta sees, at inverse wavelength u, scattering vectors of length
    2 u sin(theta); a reflection lights it only if some domain's q lies within the cut-off radius of
    that vector, so only if | |q| - 2 u sin(theta) | <= radius. Mosaic domains are rotations of one
    cell, so |q| is the same for all of them (the bound is widened by 1 % for rounding).
    """
    with torch.no_grad():
        directions, _ = pixel_factors(detector, fast, slow, beam.polarization_fraction)
        sin_theta = torch.sqrt(torch.clamp((1 + directions[:, 2]) / 2, min=0.0))
        u = beam.inverse_wavelengths.to(directions.dtype)
        s_low = 2 * float(u.min()) * float(sin_theta.min()) - 1.01 * radius
        s_high = 2 * float(u.max()) * float(sin_theta.max()) + 1.01 * radius
        inverse = torch.linalg.inv(crystal.domain_matrices[0].detach())
        length = torch.linalg.norm(hkl.to(inverse.dtype) @ inverse.T, dim=1)
        return hkl[(length >= s_low) & (length <= s_high)]


def subset_bragg(detector: Detector, beam: Beam, crystal: CrystalState, amplitudes, hkl: torch.Tensor,
                 fast: torch.Tensor, slow: torch.Tensor, with_terms: bool = False, term_floor: float = 1e-12):
    """Bragg photons (float64) at the pixels (fast, slow), distinct, and optionally their terms.

    The streaks of the full simulator's sparse evaluation (:func:`~xfel_spread.sim.forward.
    excited_streaks`, of the reflections :func:`_reachable` keeps) visit the set's pixels in the
    16 x 16 tiles of the panel their boxes meet; those inside the box and within the footprint of the
    segment (the candidates the whole-panel evaluation has there) are evaluated by the same kernel as :func:`~xfel_spread.sim.forward.bragg_photons_sparse`. The terms leave out
    those whose lattice transform is below ``term_floor`` of its peak (exp(-2 arg) < term_floor; the
    photons include them): at 1e-12 that is light of 1e-12 of a spot's brightest pixel, far below
    what SPREAD's coefficient cut-off (1e-3 of the pixel's largest term) keeps.
    """
    dtype = crystal.domain_matrices.dtype
    device = crystal.domain_matrices.device
    n_pixels = int(fast.numel())
    out = torch.zeros(n_pixels, dtype=dtype, device=device)
    empty = BraggTerms(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0))
    if n_pixels == 0:
        return (out, empty) if with_terms else out
    u_channels = beam.inverse_wavelengths.to(dtype)
    if torch.any(u_channels[1:] <= u_channels[:-1]):
        raise ValueError("beam channels must be sorted by increasing energy")
    ncells = crystal.ncells.to(dtype)
    needs_rounding_check = bool(torch.any(ncells.detach() <= 2 * math.sqrt(ARG_CUTOFF * GAUSS_WIDTH)))
    weight_k = beam.photons.to(dtype)
    lattice_peak_sq = torch.prod(ncells) ** 2
    term_arg_limit = -0.5 * math.log(term_floor) if term_floor > 0 else math.inf
    radius = cutoff_radius(crystal)
    hkl = _reachable(detector, beam, crystal, hkl.to(device), fast, slow, radius)
    streaks = excited_streaks(detector, crystal, hkl, float(u_channels[0]), float(u_channels[-1]), radius)
    # The set's pixels grouped by 16 x 16 tile of the panel; each streak visits only the set's pixels
    # in the tiles its box meets, inside the box and within its footprint of the segment (the
    # candidates bragg_photons_sparse would visit there).
    tile = 16
    tiles_fast = (detector.n_fast + tile - 1) // tile
    pixel_tile = (slow.long() // tile) * tiles_fast + fast.long() // tile
    by_tile = torch.argsort(pixel_tile)
    occupied, tile_count = torch.unique(pixel_tile[by_tile], return_counts=True)
    tile_first = torch.cumsum(tile_count, 0) - tile_count
    fast_lo, fast_hi, slow_lo, slow_hi = streaks.boxes(detector)
    tf0, tf1 = fast_lo // tile, fast_hi // tile
    ts0, ts1 = slow_lo // tile, slow_hi // tile
    n_tiles = (tf1 - tf0 + 1) * (ts1 - ts0 + 1)
    pair_streak = torch.repeat_interleave(torch.arange(n_tiles.numel(), device=device), n_tiles)
    local = torch.arange(pair_streak.numel(), device=device) - (torch.cumsum(n_tiles, 0) - n_tiles)[pair_streak]
    width = (tf1 - tf0 + 1)[pair_streak]
    pair_tile = (ts0[pair_streak] + local // width) * tiles_fast + tf0[pair_streak] + local % width
    position = torch.clamp(torch.searchsorted(occupied, pair_tile), max=max(occupied.numel() - 1, 0))
    hit = occupied[position] == pair_tile
    pair_streak, position = pair_streak[hit], position[hit]
    counts = tile_count[position]
    term_parts = []
    pair_end = torch.cumsum(counts, 0)
    start = 0
    while start < counts.numel():
        budget = (int(pair_end[start - 1]) if start else 0) + CANDIDATES_PER_CHUNK
        stop = max(start + 1, int(torch.searchsorted(pair_end, torch.tensor(budget, device=device), right=True)))
        c_counts = counts[start:stop]
        streak = torch.repeat_interleave(pair_streak[start:stop], c_counts)
        first = torch.repeat_interleave(tile_first[position[start:stop]], c_counts)
        offset = torch.arange(streak.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(c_counts, 0) - c_counts, c_counts)
        pixel = by_tile[first + offset]
        start = stop
        c_fast, c_slow = fast[pixel].long(), slow[pixel].long()
        near = ((c_fast >= fast_lo[streak]) & (c_fast <= fast_hi[streak]) & (c_slow >= slow_lo[streak])
                & (c_slow <= slow_hi[streak]))
        centre = torch.stack((c_fast, c_slow), dim=-1).to(streaks.start_px.dtype) + 0.5
        seg_start, along = streaks.start_px[streak], streaks.end_px[streak] - streaks.start_px[streak]
        length_sq = (along ** 2).sum(-1)
        t = torch.clamp(((centre - seg_start) * along).sum(-1) / torch.clamp(length_sq, min=1e-12), 0.0, 1.0)
        distance = torch.linalg.norm(centre - (seg_start + t[:, None] * along), dim=-1)
        chosen = torch.nonzero(near & (distance <= streaks.footprint_px[streak])).squeeze(1)
        if chosen.numel() == 0:
            continue
        terms = candidate_terms(detector, beam, crystal, hkl, streaks, streak[chosen], c_fast[chosen], c_slow[chosen],
                                needs_rounding_check)
        if terms is None:
            continue
        pair = terms.candidate
        t_pixel = pixel[chosen][pair]
        flat_cell, inside = amplitudes.cell_index(terms.hkl)
        f_sq = torch.where(inside[pair], amplitudes.intensity[terms.channel, flat_cell[pair]],
                           torch.zeros_like(terms.arg))
        contribution = torch.where(terms.alive, f_sq * weight_k[terms.channel] * lattice_peak_sq
                                   * torch.exp(-2 * terms.arg), torch.zeros_like(terms.arg)) * terms.factor[pair]
        out.index_add_(0, t_pixel, contribution)
        if with_terms:
            alive = torch.nonzero(terms.alive & (terms.arg < term_arg_limit)).squeeze(1)
            lattice = weight_k[terms.channel[alive]] * lattice_peak_sq * torch.exp(-2 * terms.arg[alive])
            term_parts.append((t_pixel[alive], terms.channel[alive], terms.hkl[pair[alive]].round().long(),
                               (lattice * terms.factor[pair[alive]]).detach()))
    prefactor = photon_prefactor(beam, crystal)
    out = prefactor * out
    if not with_terms:
        return out
    if not term_parts:
        return out, empty
    unit = float(photon_prefactor(beam, CrystalState(crystal.domain_matrices, crystal.ncells,
                                                     torch.ones((), dtype=dtype))))
    pixel, channel, miller, value = (torch.cat([part[i] for part in term_parts]) for i in range(4))
    # Sum the domains of each (pixel, channel, hkl): one int64 key per term.
    low = miller.min(dim=0).values
    span = miller.max(dim=0).values - low + 1
    packed = ((miller[:, 0] - low[0]) * span[1] + (miller[:, 1] - low[1])) * span[2] + (miller[:, 2] - low[2])
    n_packed = int(span.prod())
    key = (pixel * beam.photons.numel() + channel) * n_packed + packed
    unique, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros(unique.numel(), dtype=value.dtype, device=device).index_add_(0, inverse, value) * unit
    packed, rest = unique % n_packed, unique // n_packed
    n_channels = beam.photons.numel()
    miller = torch.stack((packed // (span[1] * span[2]), (packed // span[2]) % span[1], packed % span[2]), dim=1) + low
    return out, BraggTerms((rest // n_channels).cpu().numpy(), (rest % n_channels).cpu().numpy(),
                           miller.cpu().numpy(), summed.cpu().numpy())


@dataclass
class SubsetShot:
    """One shot's shoeboxes, simulated. Pixel arrays (n_pix,), ROI arrays (n_roi,).

    ``data_photons[dataset]`` holds what the stages read, (ADU - offset) / gain, for ``nopsf`` and (when
    simulated) ``psf``; ``expected[dataset]`` the noise-free photons (the psf one with the tail
    constant). ``terms`` are the Bragg terms of the shoebox pixels per unit crystal scale and |F|^2
    (their sum with the true |F|^2 times ``scale`` is the nopsf Bragg photons).
    """

    shot_index: int
    truth: ShotTruth
    photons: np.ndarray
    miller_index: np.ndarray
    centroid_px: np.ndarray
    roi_bounds: np.ndarray
    pixel_fast: np.ndarray
    pixel_slow: np.ndarray
    pixel_roi: np.ndarray
    trusted: np.ndarray
    expected: dict
    data_photons: dict
    terms: BraggTerms
    scale: float

    @property
    def n_rois(self) -> int:
        return len(self.miller_index)


class SubsetSimulator:
    """Shots of a :class:`~xfel_spread.sim.shard.SimulationSetup` on their annulus shoeboxes only."""

    def __init__(self, setup: SimulationSetup, settings: SubsetSettings = SubsetSettings()):
        self.setup = setup
        self.settings = settings
        self.background = SubsetBackground(setup.true_detector, setup.polarization_fraction, setup.materials,
                                           setup.device)
        self.hkl_np = setup.hkl.cpu().numpy()
        self.kernel = effects.fiber_psf_kernel(setup.psf_fwhm_px, setup.psf_radius_px).to(setup.device)

    def beam(self, photons: np.ndarray) -> Beam:
        setup = self.setup
        return Beam(torch.as_tensor(setup.energies_ev, dtype=torch.float64, device=setup.device),
                    torch.as_tensor(photons, dtype=torch.float64, device=setup.device),
                    setup.beam_size_m, setup.polarization_fraction)

    def crystal(self, truth: ShotTruth) -> CrystalState:
        setup = self.setup
        return CrystalState(
            torch.as_tensor(xtal.domain_matrices(truth.real_space_matrix, truth.mosaic_rotations),
                            dtype=torch.float64, device=setup.device),
            torch.as_tensor(setup.ncells, dtype=torch.float64, device=setup.device),
            torch.tensor(setup.scale, dtype=torch.float64, device=setup.device))

    def expected_at(self, truth: ShotTruth, photons: np.ndarray, fast: torch.Tensor, slow: torch.Tensor,
                    with_terms: bool = False):
        """Expected photons (Bragg + background) at distinct pixels, as the full simulator's
        :func:`~xfel_spread.sim.shard.expected_photons` has them there (and the Bragg terms)."""
        beam = self.beam(photons)
        if truth.blank:
            bragg = torch.zeros(fast.numel(), dtype=torch.float64, device=self.setup.device)
            terms = BraggTerms(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0))
        else:
            bragg, terms = subset_bragg(self.setup.true_detector, beam, self.crystal(truth), self.setup.amplitudes,
                                        self.setup.hkl, fast, slow, with_terms=True)
        expected = bragg + self.background.photons(beam, fast, slow) if self.setup.materials else bragg
        return (expected, terms, bragg) if with_terms else expected

    def shoeboxes(self, truth: ShotTruth, photons: np.ndarray):
        """Predicted shell reflections, their boxes and the owned pixels (:mod:`xfel_spread.sim.shoeboxes`)."""
        s, det = self.settings, self.setup.true_detector
        hkl, centroids = predict_annulus(det, truth.real_space_matrix, self.hkl_np, self.setup.energies_ev, photons,
                                         s.d_min_a, s.d_max_a, s.spectrum_quantile)
        bounds = shoebox_bounds(centroids, s.shoebox_size_px, det.n_fast, det.n_slow)
        nonempty = (bounds[:, 1] > bounds[:, 0]) & (bounds[:, 3] > bounds[:, 2])
        hkl, centroids, bounds = hkl[nonempty], centroids[nonempty], bounds[nonempty]
        pixels = assign_box_pixels(bounds, centroids, s.shoebox_size_px / 4.0)
        return hkl, centroids, bounds, pixels

    def spread_boxes(self, noisy_union: torch.Tensor, union_key: torch.Tensor, bounds: np.ndarray,
                     box_fast: np.ndarray, box_slow: np.ndarray, box_roi: np.ndarray) -> torch.Tensor:
        """The fiber kernel applied to the union's photons, at the shoebox pixels (without the tail)."""
        det, radius = self.setup.true_detector, self.setup.psf_radius_px
        size = self.settings.shoebox_size_px
        # Each box's unclipped square (the clipped box lies inside it), grown by the radius.
        centre_start = np.where(bounds[:, 0] == 0, bounds[:, 1] - size, bounds[:, 0]), \
            np.where(bounds[:, 2] == 0, bounds[:, 3] - size, bounds[:, 2])
        x0 = torch.as_tensor(centre_start[0] - radius)
        y0 = torch.as_tensor(centre_start[1] - radius)
        side = size + 2 * radius
        offsets = torch.arange(side)
        gy = y0[:, None, None] + offsets[None, :, None]
        gx = x0[:, None, None] + offsets[None, None, :]
        gy, gx = torch.broadcast_tensors(gy, gx)
        on_panel = (gx >= 0) & (gx < det.n_fast) & (gy >= 0) & (gy < det.n_slow)
        key = gy.clamp(0, det.n_slow - 1) * det.n_fast + gx.clamp(0, det.n_fast - 1)
        order = torch.argsort(union_key)
        sorted_key = union_key[order]
        position = torch.clamp(torch.searchsorted(sorted_key, key.reshape(-1)), max=len(sorted_key) - 1)
        found = (sorted_key[position] == key.reshape(-1)).reshape(key.shape) & on_panel
        values = torch.where(found, noisy_union[order[position]].reshape(key.shape), torch.zeros((), dtype=torch.float64))
        weight = torch.flip(self.kernel, (0, 1))[None, None]
        spread = nnf.conv2d(values[:, None], weight)[:, 0]  # (n_boxes, size, size)
        local_y = torch.as_tensor(box_slow) - y0[box_roi] - radius
        local_x = torch.as_tensor(box_fast) - x0[box_roi] - radius
        return spread[torch.as_tensor(box_roi), local_y, local_x]

    def grown_union(self, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct pixels of the boxes grown by the kernel radius, clipped to the panel."""
        det, radius = self.setup.true_detector, self.setup.psf_radius_px
        keys = []
        for x0, x1, y0, y1 in bounds:
            ys, xs = np.mgrid[max(0, y0 - radius):min(det.n_slow, y1 + radius),
                              max(0, x0 - radius):min(det.n_fast, x1 + radius)]
            keys.append((ys * det.n_fast + xs).ravel())
        union = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        return union % det.n_fast, union // det.n_fast

    def simulate(self, shot_index: int, panel_total: float | None = None) -> SubsetShot:
        """One shot (see the module docstring); ``panel_total`` overrides the psf tail's panel total."""
        setup = self.setup
        photons = shot_spectrum(setup, shot_index)
        truth = draw_crystal(setup, shot_index)
        hkl, centroids, bounds, pixels = self.shoeboxes(truth, photons)
        det = setup.true_detector
        box_key = pixels.slow * det.n_fast + pixels.fast
        if self.settings.psf:
            union_fast, union_slow = self.grown_union(bounds)
        else:
            union_fast, union_slow = pixels.fast, pixels.slow
        union_key = union_slow * det.n_fast + union_fast
        order = np.argsort(union_key)
        in_union = order[np.searchsorted(union_key[order], box_key)]
        fast_t, slow_t = torch.as_tensor(union_fast), torch.as_tensor(union_slow)
        expected, terms, bragg = self.expected_at(truth, photons, fast_t, slow_t, with_terms=True)
        # Terms of the shoebox pixels only, renumbered to the shoebox order.
        box_of_union = np.full(len(union_fast), -1, dtype=np.int64)
        box_of_union[in_union] = np.arange(len(in_union))
        keep = box_of_union[terms.pixel] >= 0
        terms = BraggTerms(box_of_union[terms.pixel[keep]], terms.channel[keep], terms.hkl[keep], terms.value[keep])
        calibration = setup.calibration[slow_t, fast_t]
        noisy = effects.draw_noise(expected, calibration, setup.readout,
                                   shot_torch_seed(setup.seed, shot_index, STREAM_NOISE))
        index = torch.as_tensor(in_union)
        readout = noisy.readout_adu[index]
        gain, offset = setup.readout.gain_adu_per_photon, setup.readout.adc_offset_adu

        def photons_read(values):
            return ((effects.to_adu(values, readout, setup.readout).double() - offset) / gain).cpu().numpy()

        expected_out = {"nopsf": expected[index].cpu().numpy()}
        data = {"nopsf": photons_read(noisy.photons[index])}
        if self.settings.psf:
            tail = self.tail_constant(photons, expected, bragg, panel_total)
            spread_noisy = self.spread_boxes(noisy.photons, torch.as_tensor(union_key), bounds, pixels.fast,
                                             pixels.slow, pixels.roi) + tail
            spread_expected = self.spread_boxes(expected, torch.as_tensor(union_key), bounds, pixels.fast,
                                                pixels.slow, pixels.roi) + tail
            expected_out["psf"] = spread_expected.cpu().numpy()
            data["psf"] = photons_read(spread_noisy)
        return SubsetShot(shot_index, truth, photons, hkl, centroids, bounds, pixels.fast, pixels.slow, pixels.roi,
                          ~pixels.in_other_spot, expected_out, data, terms, float(setup.scale))

    def tail_constant(self, photons: np.ndarray, expected: torch.Tensor, bragg: torch.Tensor,
                      panel_total: float | None) -> float:
        """Photons per pixel the kernel's tail adds everywhere: panel total x tail share / panel pixels."""
        det = self.setup.true_detector
        if panel_total is None:
            panel_total = float(bragg.sum())
            if self.setup.materials:
                panel_total += self.background.panel_total(self.beam(photons))
        tail_share = 1.0 - float(self.kernel.sum())
        return panel_total * tail_share / (det.n_fast * det.n_slow)
