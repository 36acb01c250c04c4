"""The polychromatic still-diffraction forward model (nanoBragg physics, torch implementation).

For a pixel with unit diffracted direction d, a channel of wavelength lambda (u = 1/lambda) and
a mosaic domain with real-space matrix A_d, the fractional Miller index is
``h = u * A_d (d - i)`` (i the beam direction). With h0 the nearest integer index, the Gaussian
lattice transform with nanoBragg's argument check (``Gauss_argchk``) is::

    arg = |N * (h - h0)|^2 / 0.63,    F_latt = Na Nb Nc exp(-arg) if arg < 35 else 0

and the pixel collects, in photons::

    scale * r_e^2 * polar * omega * capture * sum_k (photons_k / beam_area)
            * (1 / n_domains) * sum_d |F_k(h0)|^2 F_latt^2

``scale`` is the number of mosaic domains in the crystal (crystal volume / domain volume).

Three evaluations of the same expression are provided:

* :func:`bragg_photons_dense` visits every (pixel, channel, domain) and is the reference; its
  kernel :func:`bragg_sum` also serves pixels of many shots at once (the batched path).
* :func:`bragg_photons_sparse` visits only what the cut-off can reach. For reflection hkl and
  domain d, the Ewald condition ``| |q - c(u)| - u | <= r_s`` (c(u) = u * (0, 0, 1) the sphere
  centre, r_s the largest |s - q| with arg < 35) is linear in u, which gives the channels that can
  excite the reflection. Across those channels the spot centre moves along a straight segment on
  the panel (the central projection of a line), so a box around the segment, widened by the
  largest footprint of the cut-off ball, holds every pixel that can receive light. For each pixel
  of that box ``arg(u)`` is a quadratic in u, whose sub-cut-off interval gives exactly the channels
  to evaluate. Pixels, channels and domains outside contribute exactly zero by definition, so both
  evaluations agree to rounding.
* :func:`bragg_photons_pixels` is the same skipping at given pixels (stage 1's shoeboxes) for many
  discrete domains: per (pixel, domain) the indices the band can reach, per index the channels its
  quadratic ``arg(u)`` keeps, and the gradient per (pixel, domain, index) from two more sums over
  its channels (:class:`PairChannelSum`), so the backward pass never visits the terms.

All tensors carry gradients with respect to the crystal matrices, N and the scale, so the same
model serves simulation and refinement, on CPU or CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from xfel_spread.sim.fused import pair_channel_sum_module
from xfel_spread.sim.geometry import (
    BEAM_DIRECTION,
    Detector,
    MultiPanelDetector,
    capture_fraction,
    multipanel_capture_fraction,
    multipanel_solid_angle_sr,
    polarization_factor,
    solid_angle_sr,
)
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, AmplitudeGrid

#: Thomson cross-section r_e^2 in m^2, the value nanoBragg uses.
R_E_SQUARED_M2 = 7.94079248018965e-30
#: nanoBragg's Gaussian lattice transform: arg = hrad^2 / GAUSS_WIDTH; F_latt = 0 once arg >= ARG_CUTOFF.
GAUSS_WIDTH = 0.63
ARG_CUTOFF = 35.0
#: Evaluation chunk: the number of (pixel, channel[, domain]) terms held in memory at once.
CHUNK_TERMS = 1 << 22


@dataclass
class Beam:
    """A polychromatic beam: per-channel photon counts and a square beam of side ``size_m``."""

    energies_ev: torch.Tensor
    photons: torch.Tensor
    size_m: float
    polarization_fraction: float = 1.0

    @property
    def inverse_wavelengths(self) -> torch.Tensor:
        """u = 1/lambda for each channel, 1/Angstrom."""
        return self.energies_ev / HC_EV_ANGSTROM

    @property
    def fluence_per_m2(self) -> torch.Tensor:
        return self.photons / self.size_m ** 2


@dataclass
class CrystalState:
    """What the model needs of the crystal; every tensor may require gradients.

    ``domain_matrices`` (n_domains, 3, 3): real-space matrix of each mosaic domain (rows a, b, c,
    Angstrom, laboratory frame). ``ncells`` (3,): Na, Nb, Nc. ``scale``: domains per crystal.
    """

    domain_matrices: torch.Tensor
    ncells: torch.Tensor
    scale: torch.Tensor
    #: Variance (radians^2) of each component of the crystal's small random rotation vectors, averaged
    #: over analytically (:func:`bragg_sum_mosaic`) instead of sampled by domains: a scalar, or (J,)
    #: whose J averages are averaged with equal weights; None: no averaging.
    mosaic_variance: torch.Tensor | None = None


class AmplitudeLookup:
    """Per-channel |F|^2 looked up by integer Miller index, 0 outside the table (default_F = 0)."""

    def __init__(self, grid: AmplitudeGrid, device, dtype=torch.float64):
        values = torch.as_tensor(grid.values, device=device)
        self.intensity = (values.to(dtype) ** 2).reshape(values.shape[0], -1)
        self.shape = torch.as_tensor(values.shape[1:], device=device)
        self.hkl_min = torch.as_tensor(grid.hkl_min, device=device)

    def cell_index(self, hkl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat grid index of each hkl (..., 3) and whether it lies inside the table."""
        offset = hkl.long() - self.hkl_min
        # Component by component: a reduction over a last axis of 3 (all) cost ten times one such comparison.
        inside = None
        for axis in range(3):
            component = offset[..., axis]
            within = (component >= 0) & (component < self.shape[axis])
            inside = within if inside is None else inside & within
        flat = (offset[..., 0] * self.shape[1] + offset[..., 1]) * self.shape[2] + offset[..., 2]
        return torch.where(inside, flat, 0), inside

    def nonzero_indices(self) -> torch.Tensor:
        """All Miller indices with a non-zero amplitude in some channel, (M, 3)."""
        flat = torch.nonzero(self.intensity.amax(dim=0) > 0).squeeze(1)
        n_k, n_l = int(self.shape[1]), int(self.shape[2])
        return torch.stack((flat // (n_k * n_l), (flat // n_l) % n_k, flat % n_l), dim=1) + self.hkl_min


def pixel_factors(detector: Detector | MultiPanelDetector, fast: torch.Tensor, slow: torch.Tensor,
                  polarization_fraction: float, panel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit diffracted directions (P, 3) and the per-pixel factor polar * omega * capture (P,).

    On a :class:`MultiPanelDetector` ``panel`` (P,) names each pixel's panel and ``fast``, ``slow``
    are in that panel's frame; a single-panel :class:`Detector` takes no ``panel``.
    """
    if isinstance(detector, MultiPanelDetector):
        if panel is None:
            raise ValueError("a multi-panel detector needs each pixel's panel")
        panel = torch.as_tensor(panel, device=fast.device).long()
        tables = detector.tables(fast.device)
        positions = detector.pixel_centres_mm(fast, slow, panel)
        directions = positions / torch.linalg.norm(positions, dim=-1, keepdim=True)
        normal = tables["normal"][panel]
        factor = (polarization_factor(directions, polarization_fraction)
                  * multipanel_solid_angle_sr(positions, normal, tables["pixel"][panel])
                  * multipanel_capture_fraction(directions, normal, tables["thickness"][panel],
                                                tables["attenuation"][panel]))
        return directions, factor
    positions = detector.pixel_centres_mm(fast, slow)
    directions = positions / torch.linalg.norm(positions, dim=-1, keepdim=True)
    factor = (polarization_factor(directions, polarization_fraction)
              * solid_angle_sr(positions, detector) * capture_fraction(directions, detector))
    return directions, factor


def photon_prefactor(beam: Beam, crystal: CrystalState) -> torch.Tensor:
    """r_e^2 * scale / (domains * beam area): turns sum over domains of |F|^2 |S|^2 * fluence into photons."""
    n_domains = crystal.domain_matrices.shape[0]
    return crystal.scale * R_E_SQUARED_M2 / n_domains / beam.size_m ** 2


def bragg_sum(h_per_u: torch.Tensor, inverse_wavelengths: torch.Tensor, ncells: torch.Tensor,
              photons: torch.Tensor, amplitudes: AmplitudeLookup) -> torch.Tensor:
    """``sum_k sum_d photons_k |F_k(h0)|^2 F_latt^2`` of each pixel, every channel and domain visited.

    ``h_per_u`` (P, D, 3) is ``A_d (dir_p - i)``, the fractional index per unit inverse wavelength of
    each pixel and domain; ``inverse_wavelengths`` (K,) are the channels, whose rows ``amplitudes``
    holds. ``ncells`` (3,) and ``photons`` (K,) are one crystal's N and spectrum, shared by every
    pixel; or (P, 3) and (P, K), each pixel's own (pixels of different shots in one call). This is the
    one dense kernel: :func:`bragg_photons_dense` and the batched path of
    :mod:`xfel_spread.stage1.batched` differ only in how they gather its inputs.
    """
    per_pixel = ncells.dim() == 2
    # h[p, k, d, :] = u_k * A_d (dir_p - i), one (P, K, D) tensor per component (as in
    # mosaic_lattice_transform); the nearest index carries no gradient.
    h = [inverse_wavelengths[None, :, None] * h_per_u[:, None, :, axis] for axis in range(3)]
    with torch.no_grad():
        nearest = [torch.ceil(component - 0.5) for component in h]
    arg = None
    for axis in range(3):
        term = ((h[axis] - nearest[axis]) * (ncells[:, axis, None, None] if per_pixel else ncells[axis])) ** 2
        arg = term if arg is None else arg + term
    arg = arg / GAUSS_WIDTH
    peak_sq = torch.prod(ncells, dim=1)[:, None, None] ** 2 if per_pixel else torch.prod(ncells) ** 2
    lattice_sq = torch.where(arg < ARG_CUTOFF, peak_sq * torch.exp(-2 * arg), 0.0)
    flat, inside = amplitudes.cell_index(torch.stack(nearest, dim=-1))
    channel = torch.arange(inverse_wavelengths.numel(), device=inverse_wavelengths.device)[None, :, None].expand_as(flat)
    f_sq = torch.where(inside, amplitudes.intensity[channel, flat], 0.0)
    weights = photons[:, :, None] if per_pixel else photons[None, :, None]
    return (f_sq * lattice_sq * weights).sum(dim=(1, 2))


def mosaic_lattice_transform(h_per_u: torch.Tensor, w_squared: torch.Tensor, metric: torch.Tensor,
                             inverse_wavelengths: torch.Tensor, ncells: torch.Tensor,
                             mosaic_variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest Miller index (P, K, 3) and the squared lattice transform averaged over the analytic
    mosaic spread (P, K) of every pixel and channel: :func:`bragg_sum_mosaic` before |F|^2 and the
    channel weights (SPREAD's coefficients take it per term)."""
    per_pixel = ncells.dim() == 2
    # Each component of h[p, k] = u_k g_p on its own (P, K): no (P, K, 3) tensor is sliced under
    # autograd (its backward fills a zero tensor per slice). The nearest index carries no gradient.
    h = [inverse_wavelengths[None, :] * h_per_u[:, axis, None] for axis in range(3)]
    with torch.no_grad():
        nearest = [torch.ceil(component - 0.5) for component in h]
    x0, x1, x2 = (component - index for component, index in zip(h, nearest))
    # The cross terms' factor 2 is taken on the (P,) inverse below (exact: a power of two).
    squares = (x0 * x0, x1 * x1, x2 * x2, x0 * x1, x0 * x2, x1 * x2)
    lattice_variance = GAUSS_WIDTH / (4 * (ncells if per_pixel else ncells[None, :]) ** 2)  # (P or 1, 3)
    lattice_determinant = torch.prod(lattice_variance, dim=-1)  # (P or 1,)
    if metric.dim() == 2:
        metric = metric.expand(h_per_u.shape[0], 3, 3)
    peak_sq = torch.prod(ncells, dim=-1)[:, None] ** 2 if per_pixel else torch.prod(ncells) ** 2
    nodes = mosaic_covariances(h_per_u, w_squared, metric, inverse_wavelengths, lattice_variance, mosaic_variance)
    lattice_sq = None
    for node in nodes:
        (a00, a11, a22, a01, a02, a12), determinant = node.adjugate, node.determinant
        inverse = [(a / determinant)[:, None] for a in (a00, a11, a22, 2 * a01, 2 * a02, 2 * a12)]
        quadratic = (inverse[0] * squares[0] + inverse[1] * squares[1] + inverse[2] * squares[2]
                     + inverse[3] * squares[3] + inverse[4] * squares[4] + inverse[5] * squares[5])
        term = torch.where(quadratic < 4 * ARG_CUTOFF,
                           torch.sqrt(lattice_determinant / determinant)[:, None] * torch.exp(-0.5 * quadratic), 0.0)
        lattice_sq = term if lattice_sq is None else lattice_sq + term
    lattice_sq = lattice_sq * (peak_sq / len(nodes))
    return torch.stack(nearest, dim=-1), lattice_sq


@dataclass
class MosaicCovariance:
    """One node's covariance ``C = C_N + C_m`` of the analytic mosaic average at each pixel (see
    :func:`bragg_sum_mosaic`): its adjugate ``(a00, a11, a22, a01, a02, a12)`` (``C^-1 = adjugate /
    determinant``) and its ``determinant``, each (P,) or (1,)."""

    adjugate: tuple
    determinant: torch.Tensor


def mosaic_covariances(h_per_u: torch.Tensor, w_squared: torch.Tensor, metric: torch.Tensor,
                       inverse_wavelengths: torch.Tensor, lattice_variance: torch.Tensor,
                       mosaic_variance: torch.Tensor) -> list[MosaicCovariance]:
    """Each node's :class:`MosaicCovariance` at the pixels of ``h_per_u`` (P, 3), ``w_squared`` (P,),
    ``metric`` (P, 3, 3), with ``lattice_variance`` (P or 1, 3) the diagonal of ``C_N`` and
    ``mosaic_variance`` (J,) or (P, J) the nodes' rotation variances (:func:`bragg_sum_mosaic`)."""
    spread = w_squared[:, None, None] * metric - h_per_u[:, :, None] * h_per_u[:, None, :]  # (P, 3, 3)
    # The blur's u^2 is the channels' mean: across a band of a few percent (LY99: 1.4 %) the spread's
    # width changes by that fraction, and C is then one matrix per pixel instead of per pixel and channel.
    u_squared = (inverse_wavelengths ** 2).mean()
    variances = mosaic_variance.to(h_per_u.dtype)
    variances = variances[None, :] if variances.dim() == 1 else variances  # (P or 1, J)
    nodes = []
    for node in range(variances.shape[1]):
        t = variances[:, node] * u_squared  # (P or 1,)

        def entry(i, j, t=t):
            value = t * spread[:, i, j]
            return value + lattice_variance[:, i] if i == j else value

        c00, c11, c22 = entry(0, 0), entry(1, 1), entry(2, 2)
        c01, c02, c12 = entry(0, 1), entry(0, 2), entry(1, 2)
        a00, a11, a22 = c11 * c22 - c12 * c12, c00 * c22 - c02 * c02, c00 * c11 - c01 * c01
        a01, a02, a12 = c02 * c12 - c01 * c22, c01 * c12 - c02 * c11, c01 * c02 - c00 * c12
        determinant = c00 * a00 + c01 * a01 + c02 * a02  # (P,)
        nodes.append(MosaicCovariance((a00, a11, a22, a01, a02, a12), determinant))
    return nodes


def bragg_sum_mosaic(h_per_u: torch.Tensor, w_squared: torch.Tensor, metric: torch.Tensor,
                     inverse_wavelengths: torch.Tensor, ncells: torch.Tensor, photons: torch.Tensor,
                     amplitudes: AmplitudeLookup, mosaic_variance: torch.Tensor) -> torch.Tensor:
    """:func:`bragg_sum` of one domain averaged over small random rotations of the crystal, in closed form.

    A rotation by the small vector w turns the crystal's reciprocal lattice point at s by w x s; with
    the components of w independent, of zero mean and variance ``var`` (radians^2; an axis uniform on
    the sphere and an RMS angle eta give eta^2 / 3), the displacement of the fractional index h = A s
    has covariance ``C_m = var u^2 (|w|^2 A A^T - g g^T)`` with g = A w, w = dir - i (``h_per_u``
    (P, 3) is g, ``w_squared`` (P,) is |w|^2, ``metric`` (3, 3) or (P, 3, 3) is A A^T). The Gaussian
    lattice transform ``(Na Nb Nc)^2 exp(-2 sum N_i^2 dh_i^2 / 0.63)`` is a normal density of
    covariance ``C_N = diag(0.63 / (4 N^2))`` times its peak; averaged over a normal displacement it
    becomes the normal of covariance ``C = C_N + C_m`` times ``peak sqrt(det C_N / det C)``, which
    keeps every spot's integrated photons. With ``var`` 0 this is :func:`bragg_sum` (up to rounding).
    The blur's u^2 is the channels' mean (see the code). The displacement is taken Gaussian: one
    average matches the second moment of a mosaic draw, not
    its shape; ``mosaic_variance`` (J,) or (P, J) gives J variances whose averages are averaged with
    equal weights (the indexing, |F|^2 lookup and geometry are shared among them). ``ncells`` (3,) or
    (P, 3), ``photons`` (K,) or (P, K).
    """
    per_pixel = ncells.dim() == 2
    nearest, lattice_sq = mosaic_lattice_transform(h_per_u, w_squared, metric, inverse_wavelengths, ncells,
                                                   mosaic_variance)
    flat, inside = amplitudes.cell_index(nearest)
    channel = torch.arange(inverse_wavelengths.numel(), device=inverse_wavelengths.device)[None, :].expand_as(flat)
    f_sq = torch.where(inside, amplitudes.intensity[channel, flat], 0.0)
    weights = photons if per_pixel else photons[None, :]
    return (f_sq * lattice_sq * weights).sum(dim=1)


def bragg_photons_dense(detector: Detector | MultiPanelDetector, beam: Beam, crystal: CrystalState,
                        amplitudes: AmplitudeLookup, fast: torch.Tensor, slow: torch.Tensor,
                        panel: torch.Tensor | None = None) -> torch.Tensor:
    """Bragg photons at the given pixels, visiting every channel and domain (reference).

    On a :class:`MultiPanelDetector` ``panel`` names each pixel's panel (see :func:`pixel_factors`).
    """
    directions, factor = pixel_factors(detector, fast, slow, beam.polarization_fraction, panel)
    beam_direction = torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype, device=directions.device)
    u = beam.inverse_wavelengths.to(directions.dtype)
    photons_k = beam.photons.to(directions.dtype)
    ncells = crystal.ncells.to(directions.dtype)
    n_terms = u.numel() * crystal.domain_matrices.shape[0]
    chunk = max(1, CHUNK_TERMS // n_terms)
    totals = []
    if crystal.mosaic_variance is not None:
        if crystal.domain_matrices.shape[0] != 1:
            raise ValueError("an analytic mosaic spread needs a single domain matrix")
        matrix = crystal.domain_matrices[0]
        metric = matrix @ matrix.T
        variances = crystal.mosaic_variance.reshape(-1)
        for start in range(0, directions.shape[0], chunk):
            w = directions[start:start + chunk] - beam_direction
            totals.append(bragg_sum_mosaic(w @ matrix.T, (w ** 2).sum(dim=-1), metric, u, ncells, photons_k,
                                           amplitudes, variances))
        return photon_prefactor(beam, crystal) * factor * torch.cat(totals)
    for start in range(0, directions.shape[0], chunk):
        h_per_u = torch.einsum("dij,pj->pdi", crystal.domain_matrices, directions[start:start + chunk] - beam_direction)
        totals.append(bragg_sum(h_per_u, u, ncells, photons_k, amplitudes))
    return photon_prefactor(beam, crystal) * factor * torch.cat(totals)


@dataclass
class PixelTerms:
    """The live (pixel, domain, Miller index) pairs of some pixels and their channels (see
    :func:`domain_pixel_terms`): per pair its flat (pixel, domain) index ``pair``, Miller index ``hkl``
    (float) and the channels ``k_first <= k < k_first + n_channels`` to evaluate."""

    pair: torch.Tensor
    hkl: torch.Tensor
    k_first: torch.Tensor
    n_channels: torch.Tensor

    def channel_grid(self, n_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's channels as a row (n, W) padded to the longest (clamped to the band), and which
        entries are real."""
        offsets = torch.arange(int(self.n_channels.max()), device=self.k_first.device)
        valid = offsets[None, :] < self.n_channels[:, None]
        return torch.clamp(self.k_first[:, None] + offsets[None, :], max=n_channels - 1), valid


def domain_pixel_terms(h_per_u: torch.Tensor, inverse_wavelengths: torch.Tensor,
                       ncells: torch.Tensor, arg_cutoff: float = ARG_CUTOFF) -> PixelTerms | None:
    """The (pixel, domain, Miller index) pairs with a term below the cut-off, and their channels.

    ``h_per_u`` (P, D, 3), or flattened to (P D, 3), is ``A_d (dir_p - i)`` (no gradient needed); a
    pair's index is ``p D + d``. ``inverse_wavelengths`` (K,) sorted increasing; N as
    :func:`sparse_pixels_apply` requires. Across the band a pair's fractional index ``u h_per_u`` runs
    along a segment; a term lives only where ``|N (h - hkl)| < R = sqrt(ARG_CUTOFF * GAUSS_WIDTH)``,
    and a line passing that close to an index crosses its rounding cell (which holds the ball of
    radius ``min N / 2`` in these units) along at least :func:`rounding_chord`, so rounding points of
    the segment sampled more finely than that meets every index with a live term. Each index's
    channels come from its quadratic ``arg(u)``, widened by one channel each side; the evaluation's
    own ``arg < ARG_CUTOFF`` decides, as the dense kernel's does. None when no term lives. A larger
    ``arg_cutoff`` finds every term below it instead (:class:`SparseTermCache`'s reach); it must leave
    :func:`rounding_chord` positive.
    """
    u_low, u_high = float(inverse_wavelengths[0]), float(inverse_wavelengths[-1])
    pairs = h_per_u.reshape(-1, 3)
    # In N-scaled index units the segment's length, and the shortest chord of a rounding cell that
    # passes within the cut-off's reach of its index.
    length = (u_high - u_low) * float(torch.linalg.norm(pairs * ncells, dim=1).max()) if pairs.shape[0] else 0.0
    n_samples = max(2, math.ceil(length / (0.9 * rounding_chord(ncells, arg_cutoff))) + 1)
    samples = torch.linspace(u_low, u_high, n_samples, dtype=pairs.dtype, device=pairs.device)
    indices = torch.ceil(samples[None, :, None] * pairs[:, None, :] - 0.5)  # (PD, S, 3)
    # Along a line the rounding cells are met in runs: keep each run's first sample.
    new_run = torch.ones(indices.shape[:2], dtype=torch.bool, device=pairs.device)
    new_run[:, 1:] = (indices[:, 1:] != indices[:, :-1]).any(dim=-1)
    pair, sample = torch.nonzero(new_run, as_tuple=True)
    hkl = indices[pair, sample]
    curvature, u_centre, floor = arg_quadratic(pairs[pair], hkl, ncells)
    k_first, k_last, live = channel_range(curvature, u_centre, floor, inverse_wavelengths, widen=1,
                                          arg_cutoff=arg_cutoff)
    live = torch.nonzero(live).squeeze(1)
    if live.numel() == 0:
        return None
    return PixelTerms(pair[live], hkl[live], k_first[live], (k_last - k_first)[live])


def channel_range(curvature: torch.Tensor, u_centre: torch.Tensor, floor: torch.Tensor,
                  inverse_wavelengths: torch.Tensor, widen: int = 0,
                  arg_cutoff: float = ARG_CUTOFF) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The channels ``k_first <= k < k_last`` (sorted ``inverse_wavelengths``) at which ``arg(u) =
    curvature (u - u_centre)^2 + floor`` is below ``arg_cutoff``, widened by ``widen`` channels each
    side within the band, and whether any is (``floor`` below the cut-off and the range not empty)."""
    half_width = torch.sqrt(torch.clamp((arg_cutoff - floor) / curvature, min=0))
    u_channels = inverse_wavelengths.contiguous()
    k_first = torch.searchsorted(u_channels, (u_centre - half_width).contiguous())
    k_last = torch.searchsorted(u_channels, (u_centre + half_width).contiguous(), right=True)
    if widen:
        k_first = torch.clamp(k_first - widen, min=0)
        k_last = torch.clamp(k_last + widen, max=u_channels.numel())
    return k_first, k_last, (floor < arg_cutoff) & (k_last > k_first)


def arg_quadratic(h_per_u: torch.Tensor, hkl: torch.Tensor,
                  ncells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``arg(u) = |N (u h_per_u - hkl)|^2 / 0.63`` as ``curvature (u - u_centre)^2 + floor`` (each (n,)).

    The floor is taken as the distance at ``u_centre`` itself (no difference of large numbers), so
    arg keeps full precision near the spot (Pythagoras: the offset at u_centre is perpendicular to h).
    """
    scaled_h1 = h_per_u * ncells
    h1_sq = (scaled_h1 ** 2).sum(-1)
    u_centre = (scaled_h1 * (hkl * ncells)).sum(-1) / h1_sq
    floor = (((u_centre[:, None] * h_per_u - hkl) * ncells) ** 2).sum(-1) / GAUSS_WIDTH
    return h1_sq / GAUSS_WIDTH, u_centre, floor


class PairChannelSum(torch.autograd.Function):
    """Per pair, ``sum_k weight_k exp(-2 arg_k)`` over its channels with ``arg_k = curvature (u_k -
    u_centre)^2 + floor`` below the cut-off, differentiable in the pairs' curvature, centre and floor.

    The gradient is per pair from two more sums (``sum e du`` and ``sum e du^2``, e a term's value,
    du = u_k - u_centre), so the backward pass never visits the terms again: it is what makes many
    sharp domains affordable (stage 1's free domains). Inputs: (n,) ``curvature``, ``u_centre``,
    ``floor``; constants (n, W) ``u`` (each pair's channels, padded) and ``weight`` (0 on padding).
    On the CPU in float64 the sums come from the compiled loop of :mod:`xfel_spread.sim.fused` when it
    is available, else (and on CUDA) from :meth:`eager`; the two agree to rounding.
    """

    @staticmethod
    def forward(ctx, curvature, u_centre, floor, u, weight):
        moments = any(ctx.needs_input_grad[:3])
        module = pair_channel_sum_module() if compiled_pair_sums(u.device, u.dtype) else None
        if module is not None:  # the compiled loop (sim/fused.py): one vectorised pass over the rows
            total, first, second = module.pair_channel_sum(
                curvature.contiguous(), u_centre.contiguous(), floor.contiguous(), u.contiguous(),
                weight.contiguous(), ARG_CUTOFF, moments)
            if moments:
                ctx.save_for_backward(curvature, total, first, second)
            return total
        return PairChannelSum.eager(ctx, curvature, u_centre, floor, u, weight, moments)

    @staticmethod
    def eager(ctx, curvature, u_centre, floor, u, weight, moments: bool):
        """The forward in eager torch (CUDA tensors, or where the compiled loop is unavailable)."""
        # In place on two (n, W) temporaries: allocating one per operation cost a fifth of a free-domain
        # evaluation (96-108 against 72-81 ms on a demo lattice of 31 shoeboxes, 25 domains, 100 channels).
        du = u - u_centre[:, None]
        arg = (du * du).mul_(curvature[:, None]).add_(floor[:, None])
        dead = arg >= ARG_CUTOFF
        value = arg.mul_(-2).exp_().masked_fill_(dead, 0.0).mul_(weight)
        total = value.sum(dim=1)
        if moments:
            first = value.mul_(du).sum(dim=1)
            second = value.mul_(du).sum(dim=1)
            ctx.save_for_backward(curvature, total, first, second)
        return total

    @staticmethod
    def backward(ctx, grad):
        curvature, total, first, second = ctx.saved_tensors
        return -2 * grad * second, 4 * grad * curvature * first, -2 * grad * total, None, None


class PairQuadraticSum(torch.autograd.Function):
    """:func:`arg_quadratic` and :class:`PairChannelSum` in one call of the compiled loop
    (:mod:`xfel_spread.sim.fused`): per pair the channel sum of its quadratic from ``h`` (n, 3, the
    pairs' ``h_per_u``), ``hkl`` (n, 3) and ``ncells`` (3,), differentiable in ``h`` and ``ncells``,
    over the pairs' ragged channel rows (:class:`LiveTerms`; no padded arrays are made). The compiled
    loop returns each pair's derivatives too (the chain rule through the quadratic, see
    ``pair_channel_sum.cpp``), so the backward pass is two products: the autograd graph of
    :func:`arg_quadratic`'s two dozen small operations is gone. Only where :func:`pair_sums` finds
    the compiled loop."""

    @staticmethod
    def forward(ctx, h, ncells, live):
        gradients = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total, grad_h, grad_n = pair_channel_sum_module().pair_quadratic_sum(
            h.contiguous(), live.hkl.to(h.dtype).contiguous(), ncells.contiguous(), live.band, live.table,
            live.row.contiguous(), live.k_first.contiguous(), live.n_channels.contiguous(), GAUSS_WIDTH, ARG_CUTOFF,
            gradients)
        if gradients:
            ctx.save_for_backward(grad_h, grad_n)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_n = ctx.saved_tensors
        return grad[:, None] * grad_h, (grad[:, None] * grad_n).sum(dim=0), None


class RaggedPairChannelSum(torch.autograd.Function):
    """:class:`PairChannelSum` over the ragged channel rows of :class:`LiveTerms` (``live``), read in
    place by the compiled loop: no padded (pairs, channels) arrays. Only where :func:`pair_channel_sums`
    finds the compiled loop; the backward pass is :class:`PairChannelSum`'s."""

    @staticmethod
    def forward(ctx, curvature, u_centre, floor, live):
        moments = any(ctx.needs_input_grad[:3])
        total, first, second = pair_channel_sum_module().pair_channel_sum_ragged(
            curvature.contiguous(), u_centre.contiguous(), floor.contiguous(), live.band, live.table,
            live.row.contiguous(), live.k_first.contiguous(), live.n_channels.contiguous(), ARG_CUTOFF, moments)
        if moments:
            ctx.save_for_backward(curvature, total, first, second)
        return total

    @staticmethod
    def backward(ctx, grad):
        return (*PairChannelSum.backward(ctx, grad)[:3], None)


def pair_channel_sums(curvature: torch.Tensor, u_centre: torch.Tensor, floor: torch.Tensor,
                      live: LiveTerms) -> torch.Tensor:
    """Per pair of ``live`` ``sum_k weight_k exp(-2 arg(u_k))`` below the cut-off with ``arg = curvature
    (u - u_centre)^2 + floor``: over the ragged rows in the compiled loop (:class:`RaggedPairChannelSum`)
    where it runs (:func:`compiled_pair_sums`), else :class:`PairChannelSum` over the padded rows."""
    if live.band.dtype == torch.float64 and compiled_pair_sums(curvature.device, curvature.dtype):
        return RaggedPairChannelSum.apply(curvature, u_centre, floor, live)
    return PairChannelSum.apply(curvature, u_centre, floor, *live.padded())


def compiled_pair_sums(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled loop serves tensors of this device and dtype (the CPU, float64, the loop
    available): :func:`pair_sums`, :func:`pair_channel_sums`, :class:`PairChannelSum` and
    :func:`channel_runs` ask it; there the terms' memory goes with their pairs, not their channels."""
    return torch.device(device).type == "cpu" and dtype == torch.float64 and pair_channel_sum_module() is not None


def pair_sums(h: torch.Tensor, ncells: torch.Tensor, live: LiveTerms) -> torch.Tensor:
    """Per pair of ``live`` ``sum_k weight_k exp(-2 arg(u_k))`` below the cut-off with ``arg`` the
    pair's :func:`arg_quadratic` of its ``h`` (n, 3): in one compiled call (:class:`PairQuadraticSum`)
    on the CPU in float64 with one N for all pairs, where the compiled loop is available
    (:func:`compiled_pair_sums`), else :class:`PairChannelSum` of :func:`arg_quadratic` over the
    padded rows (the two agree to rounding)."""
    if (live.band.dtype == torch.float64 and ncells.shape == (3,) and compiled_pair_sums(h.device, h.dtype)):
        return PairQuadraticSum.apply(h, ncells, live)
    return PairChannelSum.apply(*arg_quadratic(h, live.hkl, ncells), *live.padded())


def increasing_band(inverse_wavelengths: torch.Tensor) -> bool:
    """Whether the band has two channels or more in strictly increasing order, as the sparse models'
    channel ranges (``searchsorted``) need."""
    return inverse_wavelengths.numel() >= 2 and not bool(torch.any(inverse_wavelengths[1:] <= inverse_wavelengths[:-1]))


def sparse_pixels_apply(crystal: CrystalState, inverse_wavelengths: torch.Tensor) -> bool:
    """Whether :func:`bragg_photons_pixels` can skip terms for this crystal and band: discrete domains
    (no analytic spread), channels sorted, and every N large enough that a live term's index is the
    one its fractional index rounds to (the dense kernel's nearest index) with room to find it: a
    rounding chord (:func:`rounding_chord`) of at least a tenth of an index (N >= 9.44)."""
    if crystal.mosaic_variance is not None or not increasing_band(inverse_wavelengths):
        return False
    return rounding_chord(crystal.ncells.detach()) >= 0.1 * float(crystal.ncells.detach().min())


def rounding_chord(ncells: torch.Tensor, arg_cutoff: float = ARG_CUTOFF) -> float:
    """Shortest chord, in N-scaled index units ``N * h``, that a line passing within the cut-off's
    reach ``R = sqrt(arg_cutoff * GAUSS_WIDTH)`` of a Miller index cuts from that index's rounding
    cell: ``2 sqrt((min N / 2)^2 - R^2)``, 0 when the cell does not hold the reach (N <= 2 R = 9.4
    at ARG_CUTOFF)."""
    half = float(ncells.min()) / 2
    return 2.0 * math.sqrt(max(half * half - arg_cutoff * GAUSS_WIDTH, 0.0))


@dataclass
class LiveTerms(PixelTerms):
    """:class:`PixelTerms` made ready to evaluate: with each pair's channels ``k_first <= k < k_first +
    n_channels`` of the ``band`` (the inverse wavelengths), its row of ``table`` (R, K), whose rows hold
    ``photons_k |F_k|^2`` of the pairs' indices (a zero row for those outside the amplitude table).
    The compiled loop reads these ragged rows as they are (:class:`PairQuadraticSum`,
    :class:`RaggedPairChannelSum`); the eager loop takes them padded (:meth:`padded`)."""

    row: torch.Tensor
    table: torch.Tensor
    band: torch.Tensor
    _padded: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's channels as a row (n, W) padded to the longest: the inverse wavelengths ``u`` and
        the weights (0 on padding), as :class:`PairChannelSum` takes them; made once, then kept."""
        if self._padded is None:
            with torch.no_grad():
                channel, valid = self.channel_grid(self.band.numel())
                self._padded = (self.band[channel],
                                torch.where(valid, self.table[self.row[:, None], channel], 0.0))
        return self._padded


def live_terms(terms: PixelTerms, u: torch.Tensor, beam: Beam, amplitudes: AmplitudeLookup) -> LiveTerms:
    """The rows :class:`PairQuadraticSum` and :class:`PairChannelSum` evaluate for ``terms`` (no gradient)."""
    with torch.no_grad():
        # photons_k |F_k|^2 of the few indices a set of shoeboxes holds, one row each (a small
        # table the per-term gather stays in), a zero row for those outside the amplitude table.
        flat, inside = amplitudes.cell_index(terms.hkl)
        cells, row = torch.unique(torch.where(inside, flat, -1), return_inverse=True)
        table = amplitudes.intensity[:, cells.clamp(min=0)].T.to(u.dtype) * beam.photons.to(u.dtype)
        table[cells < 0] = 0.0
        return LiveTerms(terms.pair, terms.hkl, terms.k_first, terms.n_channels, row, table.contiguous(),
                         u.contiguous())


#: The reach (an ``arg``) to which :class:`SparseTermCache` finds a set of pixels' terms: beyond
#: ARG_CUTOFF, so that they stay a superset of the live terms while the crystal moves a little. In
#: the N-scaled distance ``r = sqrt(arg * GAUSS_WIDTH)`` 5.32 against the cut-off's 4.70: a margin of
#: 0.63, about a hundredth of an index at N = 57 (a 0.01 deg turn moves an index of 30 by 0.005).
CACHE_ARG_CUTOFF = 45.0


@dataclass
class _CachedTerms:
    h_per_u: torch.Tensor
    u: torch.Tensor
    ncells: torch.Tensor
    terms: LiveTerms | None


class SparseTermCache:
    """The live terms of :func:`bragg_photons_pixels` kept between evaluations of the same pixels.

    Finding a set of pixels' terms (:func:`domain_pixel_terms`, the channel rows and the amplitude
    gather) is a third of an evaluation of stage 1's free domains, and between two iterations of a
    refinement they hardly change. So the terms are found once to the wider reach
    CACHE_ARG_CUTOFF and kept, per ``key`` (the evaluation's chunk), with the band, N and every
    (pixel, domain) pair's ``h_per_u`` they were found at. A later evaluation takes them while no
    term can have come from beyond that reach: with ``R`` the cut-off's and ``R_c`` the cache's
    N-scaled reach, a term now below the cut-off was found if ``rho R + u_max max |N_c (h - h_c)| <
    R_c``, ``rho`` the largest ratio of the cache's N to the present N (the triangle inequality on
    ``N_c (u h_c - hkl)``). Each evaluation keeps its own ``arg < ARG_CUTOFF``, so the photons are the
    uncached ones up to the order of a sum's terms (rounding). The bound is on h alone, so it holds
    whatever moved the pixels' directions (the detector too), and needs no record of the pixels. A cache serves one shot: the channel weights it keeps take
    the beam's photons and the amplitude table as they were when found. ``builds`` and ``reuses``
    count the two outcomes.
    """

    def __init__(self):
        self._entries: dict = {}
        self.builds = 0
        self.reuses = 0

    @staticmethod
    def applies(ncells: torch.Tensor) -> bool:
        """Whether N leaves room for the cache's reach (as :func:`sparse_pixels_apply` for the cut-off)."""
        return rounding_chord(ncells, CACHE_ARG_CUTOFF) >= 0.1 * float(ncells.min())

    def lookup(self, key, h_per_u: torch.Tensor, u: torch.Tensor, ncells: torch.Tensor) -> tuple[bool, LiveTerms | None]:
        """``(True, terms)`` when the terms kept for ``key`` still hold every live term, else ``(False, None)``."""
        entry = self._entries.get(key)
        if entry is None or entry.h_per_u.shape != h_per_u.shape or not torch.equal(entry.u, u):
            return False, None
        rho = float((entry.ncells / ncells).max())
        moved = float(torch.linalg.norm((h_per_u - entry.h_per_u) * entry.ncells, dim=1).max()) * float(u.max())
        if rho * math.sqrt(ARG_CUTOFF * GAUSS_WIDTH) + moved >= math.sqrt(CACHE_ARG_CUTOFF * GAUSS_WIDTH):
            return False, None
        self.reuses += 1
        return True, entry.terms

    def store(self, key, h_per_u, u, ncells, terms: LiveTerms | None) -> None:
        self.builds += 1
        self._entries[key] = _CachedTerms(h_per_u, u, ncells, terms)


def bragg_photons_pixels(detector: Detector | MultiPanelDetector, beam: Beam, crystal: CrystalState,
                         amplitudes: AmplitudeLookup, fast: torch.Tensor, slow: torch.Tensor,
                         panel: torch.Tensor | None = None, cache: SparseTermCache | None = None,
                         cache_key=None) -> torch.Tensor:
    """:func:`bragg_photons_dense` at the given pixels, visiting only the terms below the cut-off.

    The live (pixel, domain, index) pairs and their channels are found without gradient
    (:func:`domain_pixel_terms`); each term's ``arg`` is then its pair's quadratic in u
    (:func:`arg_quadratic`, differentiable), evaluated over the pair's channels as one padded row
    (:class:`PairChannelSum`), so the per-term work is a few operations, and the amplitudes are looked
    up once per index. Equal to the dense evaluation up to rounding. With 25 sharp domains (stage 1's
    free domains on an LY99 shot) 44 % of the (pixel, channel, domain) terms live: the cut-off
    (arg < 35) keeps about half the band at a pixel of a spot. Falls back to the dense evaluation where
    :func:`sparse_pixels_apply` says no. With a ``cache`` the terms are found once for ``cache_key``
    and kept while they hold every live term (:class:`SparseTermCache`).
    """
    u = beam.inverse_wavelengths.to(crystal.domain_matrices.dtype)
    if not sparse_pixels_apply(crystal, u):
        return bragg_photons_dense(detector, beam, crystal, amplitudes, fast, slow, panel)
    directions, factor = pixel_factors(detector, fast, slow, beam.polarization_fraction, panel)
    beam_direction = torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype, device=directions.device)
    u = u.to(directions.dtype).contiguous()
    ncells = crystal.ncells.to(directions.dtype)
    h_per_u = torch.einsum("dij,pj->pdi", crystal.domain_matrices, directions - beam_direction).reshape(-1, 3)
    use_cache = cache is not None and cache.applies(ncells.detach())
    found, live = cache.lookup(cache_key, h_per_u.detach(), u, ncells.detach()) if use_cache else (False, None)
    if not found:
        with torch.no_grad():
            terms = domain_pixel_terms(h_per_u.detach(), u, ncells.detach(),
                                       CACHE_ARG_CUTOFF if use_cache else ARG_CUTOFF)
            live = None if terms is None else live_terms(terms, u, beam, amplitudes)
        if use_cache:
            cache.store(cache_key, h_per_u.detach(), u, ncells.detach().clone(), live)
    totals = torch.zeros(directions.shape[0], dtype=directions.dtype, device=directions.device)
    if live is not None:
        per_pair = pair_sums(h_per_u[live.pair], ncells, live)
        totals = totals.index_add(0, live.pair // crystal.domain_matrices.shape[0], per_pair)
    return photon_prefactor(beam, crystal) * torch.prod(ncells) ** 2 * factor * totals


def channel_runs(h_per_u: torch.Tensor, inverse_wavelengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The runs of channels over which each pixel's nearest Miller index ``ceil(u_k h_per_u - 0.5)``
    stays the same (the dense kernels' rounding, operation for operation): per run its pixel (row of
    ``h_per_u`` (P, 3)), index (float (n, 3)) and channels ``k_start <= k < k_end``. On the CPU in
    float64 the compiled loop of :mod:`xfel_spread.sim.fused` finds them in one pass, with the same
    roundings (a half of the analytic eta's evaluation went into this torch version's (P, K, 3) arrays);
    the two give the same runs to the bit."""
    if inverse_wavelengths.dtype == torch.float64 and compiled_pair_sums(h_per_u.device, h_per_u.dtype):
        return tuple(pair_channel_sum_module().channel_runs(h_per_u.contiguous(), inverse_wavelengths.contiguous()))
    return channel_runs_eager(h_per_u, inverse_wavelengths)


def channel_runs_eager(h_per_u: torch.Tensor, inverse_wavelengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`channel_runs` in eager torch (CUDA tensors, or where the compiled loop is unavailable)."""
    n_channels = inverse_wavelengths.numel()
    indices = torch.ceil(inverse_wavelengths[None, :, None] * h_per_u[:, None, :] - 0.5)  # (P, K, 3)
    new_run = torch.ones(indices.shape[:2], dtype=torch.bool, device=h_per_u.device)
    new_run[:, 1:] = (indices[:, 1:] != indices[:, :-1]).any(dim=-1)
    pixel, k_start = torch.nonzero(new_run, as_tuple=True)
    k_end = torch.full_like(k_start, n_channels)
    same_pixel = pixel[1:] == pixel[:-1]
    k_end[:-1] = torch.where(same_pixel, k_start[1:], n_channels)
    return pixel, indices[pixel, k_start], k_start, k_end


def _bilinear(entries: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x^T M y`` (n,) for symmetric M given by ``entries`` (m00, m11, m22, m01, m02, m12), each (n,),
    and vectors ``x``, ``y`` (n, 3)."""
    m00, m11, m22, m01, m02, m12 = entries
    return (m00 * x[:, 0] * y[:, 0] + m11 * x[:, 1] * y[:, 1] + m22 * x[:, 2] * y[:, 2]
            + m01 * (x[:, 0] * y[:, 1] + x[:, 1] * y[:, 0]) + m02 * (x[:, 0] * y[:, 2] + x[:, 2] * y[:, 0])
            + m12 * (x[:, 1] * y[:, 2] + x[:, 2] * y[:, 1]))


def mosaic_arg_quadratic(g: torch.Tensor, hkl: torch.Tensor, inverse: tuple) -> tuple[torch.Tensor, ...]:
    """The analytic mosaic term's ``arg(u) = (u g - hkl)^T C^-1 (u g - hkl) / 4`` (the exponent
    of :func:`mosaic_lattice_transform`'s ``exp(-quadratic / 2)`` written as ``exp(-2 arg)``, as the
    sharp kernel's) as ``curvature (u - u_centre)^2 + floor`` for pairs of ``g`` (n, 3) and ``hkl``
    (n, 3) with ``inverse`` the entries of C^-1 (each (n,)); the floor is taken at ``u_centre`` itself
    (as :func:`arg_quadratic`)."""
    curvature = _bilinear(inverse, g, g)
    u_centre = _bilinear(inverse, g, hkl) / curvature
    offset = u_centre[:, None] * g - hkl
    return curvature / 4, u_centre, _bilinear(inverse, offset, offset) / 4


def bragg_photons_mosaic_pixels(detector: Detector | MultiPanelDetector, beam: Beam, crystal: CrystalState,
                                amplitudes: AmplitudeLookup, fast: torch.Tensor, slow: torch.Tensor,
                                panel: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`bragg_photons_dense` of one domain with the analytic mosaic spread (``crystal.mosaic_variance``),
    visiting only the terms below the cut-off; equal to it up to rounding.

    Each node's term at a pixel and channel is ``sqrt(det C_N / det C) exp(-q / 2)`` with ``q`` the
    quadratic form of ``C^-1`` (per pixel, :func:`mosaic_covariances`) in ``u g - hkl`` and ``hkl``
    the index ``u g`` rounds to. Over a run of channels with the same index (:func:`channel_runs`, the
    dense kernel's rounding) ``q`` is a quadratic in u, as the sharp domains' arg
    (:func:`mosaic_arg_quadratic`), so the same channel rows (:func:`pair_channel_sums`: ragged in the
    compiled loop, else padded) evaluate it and its gradient. Each run's channels are cut to those where
    the node of largest variance is below the cut-off (widened by a channel each side; each node's own ``arg < ARG_CUTOFF`` then
    decides): that node's ``q`` is the least at every point (``C`` grows with the variance), so its live
    channels hold every node's. With channels not sorted, or fewer than two, this is
    :func:`bragg_photons_dense`. On stage 1's LY99 shots about 40 % of the dense kernel's (pixel,
    channel) terms live.
    """
    u = beam.inverse_wavelengths.to(crystal.domain_matrices.dtype)
    if crystal.mosaic_variance is None or crystal.domain_matrices.shape[0] != 1 or not increasing_band(u):
        return bragg_photons_dense(detector, beam, crystal, amplitudes, fast, slow, panel)
    directions, factor = pixel_factors(detector, fast, slow, beam.polarization_fraction, panel)
    beam_direction = torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype, device=directions.device)
    u = u.to(directions.dtype).contiguous()
    ncells = crystal.ncells.to(directions.dtype)
    matrix = crystal.domain_matrices[0]
    w = directions - beam_direction
    g = w @ matrix.T
    lattice_variance = GAUSS_WIDTH / (4 * ncells[None, :] ** 2)
    variances = crystal.mosaic_variance.reshape(-1)
    nodes = mosaic_covariances(g, (w ** 2).sum(dim=-1), (matrix @ matrix.T).expand(g.shape[0], 3, 3), u,
                               lattice_variance, variances)
    widest = nodes[int(torch.argmax(variances))]
    with torch.no_grad():
        pixel, hkl, k_start, k_end = channel_runs(g.detach(), u)
        inverse = tuple((a / widest.determinant)[pixel] for a in widest.adjugate)
        curvature, u_centre, floor = mosaic_arg_quadratic(g.detach()[pixel], hkl, inverse)
        k_first, k_last, live = channel_range(curvature, u_centre, floor, u, widen=1)
        k_first, k_last = torch.maximum(k_first, k_start), torch.minimum(k_last, k_end)
        live = torch.nonzero(live & (k_last > k_first)).squeeze(1)
    totals = torch.zeros(directions.shape[0], dtype=directions.dtype, device=directions.device)
    if live.numel():
        terms = live_terms(PixelTerms(pixel[live], hkl[live], k_first[live], (k_last - k_first)[live]), u, beam,
                           amplitudes)
        g_pairs = g[terms.pair]
        per_pair = None
        for node in nodes:
            inverse = tuple((a / node.determinant)[terms.pair] for a in node.adjugate)
            node_sum = pair_channel_sums(*mosaic_arg_quadratic(g_pairs, terms.hkl, inverse), terms)
            node_sum = node_sum * torch.sqrt(torch.prod(lattice_variance) / node.determinant)[terms.pair]
            per_pair = node_sum if per_pair is None else per_pair + node_sum
        totals = totals.index_add(0, terms.pair, per_pair)
    return photon_prefactor(beam, crystal) * (torch.prod(ncells) ** 2 / len(nodes)) * factor * totals


def cutoff_radius(crystal: CrystalState) -> float:
    """Largest |s - q| (1/Angstrom) at which a domain's lattice transform is still non-zero.

    arg < 35 bounds |N * dh| by sqrt(35 * 0.63); ds = inv(A) diag(1/N) (N * dh), so |ds| is
    bounded by that times the largest singular value of inv(A) diag(1/N) (rotation-invariant,
    hence the same for every domain up to their tiny cell differences; the maximum is taken).
    """
    with torch.no_grad():
        inverse = torch.linalg.inv(crystal.domain_matrices) / crystal.ncells.to(crystal.domain_matrices.dtype)
        largest = torch.linalg.matrix_norm(inverse, ord=2).max()
    return float(largest) * math.sqrt(ARG_CUTOFF * GAUSS_WIDTH)


def _intersect_linear(u_low, u_high, coefficient, rhs, at_least: bool):
    """Narrow [u_low, u_high] to the u with ``coefficient * u >= rhs`` (or ``<=``)."""
    bound = rhs / torch.where(coefficient == 0, torch.ones_like(coefficient), coefficient)
    # Dividing by a negative coefficient turns ">=" into "<=".
    gives_lower = (coefficient > 0) if at_least else (coefficient < 0)
    gives_upper = (coefficient < 0) if at_least else (coefficient > 0)
    u_low = torch.where(gives_lower, torch.maximum(u_low, bound), u_low)
    u_high = torch.where(gives_upper, torch.minimum(u_high, bound), u_high)
    # A zero coefficient leaves "0 >= rhs" (or "0 <= rhs"), true or false for every u.
    unsatisfiable = (coefficient == 0) & ((rhs > 0) if at_least else (rhs < 0))
    u_high = torch.where(unsatisfiable, torch.full_like(u_high, -math.inf), u_high)
    return u_low, u_high


@dataclass
class Streaks:
    """Reflection-domain pairs that some channel can excite, and where their light can land.

    Across the excited channels [u_low, u_high] the spot centre runs along the straight segment
    from ``start_px`` to ``end_px`` (fast, slow pixel coordinates); every channel's light lies
    within ``footprint_px`` of that segment. On a multi-panel detector a pair has one entry per
    panel its light can reach, ``panel`` naming it, with the segment and footprint in that panel's
    frame; on a single panel ``panel`` is None.
    """

    reflection: torch.Tensor
    domain: torch.Tensor
    u_low: torch.Tensor
    u_high: torch.Tensor
    start_px: torch.Tensor
    end_px: torch.Tensor
    footprint_px: torch.Tensor
    panel: torch.Tensor | None = None

    def boxes(self, detector: Detector | MultiPanelDetector):
        """Inclusive pixel-index bounds (fast_lo, fast_hi, slow_lo, slow_hi), clipped to the panel."""
        low = torch.minimum(self.start_px, self.end_px) - self.footprint_px[:, None] - 0.5
        high = torch.maximum(self.start_px, self.end_px) + self.footprint_px[:, None] - 0.5
        fast_lo = torch.clamp(torch.floor(low[:, 0]), min=0).long()
        slow_lo = torch.clamp(torch.floor(low[:, 1]), min=0).long()
        if self.panel is not None:
            tables = detector.tables(self.panel.device)
            fast_hi = torch.minimum(torch.ceil(high[:, 0]).long(), tables["n_fast"][self.panel] - 1)
            slow_hi = torch.minimum(torch.ceil(high[:, 1]).long(), tables["n_slow"][self.panel] - 1)
            return fast_lo, fast_hi, slow_lo, slow_hi
        fast_hi = torch.clamp(torch.ceil(high[:, 0]), max=detector.n_fast - 1).long()
        slow_hi = torch.clamp(torch.ceil(high[:, 1]), max=detector.n_slow - 1).long()
        return fast_lo, fast_hi, slow_lo, slow_hi

    def select(self, index: torch.Tensor) -> "Streaks":
        return Streaks(*(None if getattr(self, name) is None else getattr(self, name)[index]
                         for name in self.__dataclass_fields__))


def excited_streaks(detector: Detector, crystal: CrystalState, hkl: torch.Tensor,
                    u_min: float, u_max: float, radius: float) -> Streaks:
    """Reflection-domain pairs whose cut-off ball meets an Ewald sphere with u in [u_min, u_max]."""
    with torch.no_grad():
        inverse = torch.linalg.inv(crystal.domain_matrices)
        q = torch.einsum("dij,mj->mdi", inverse, hkl.to(inverse.dtype))
        q_sq = (q ** 2).sum(-1)
        q_z = q[..., 2]
        # | |q - c(u)| - u | <= r  <=>  2u(q_z + r) >= q^2 - r^2  and  2u(q_z - r) <= q^2 - r^2
        rhs = q_sq - radius ** 2
        u_low = torch.full_like(q_sq, u_min)
        u_high = torch.full_like(q_sq, u_max)
        u_low, u_high = _intersect_linear(u_low, u_high, 2 * (q_z + radius), rhs, at_least=True)
        u_low, u_high = _intersect_linear(u_low, u_high, 2 * (q_z - radius), rhs, at_least=False)
        excited = (u_low <= u_high) & (q_sq > 0)
        reflection, domain = torch.nonzero(excited, as_tuple=True)
        q = q[reflection, domain]
        u_low, u_high = u_low[reflection, domain], u_high[reflection, domain]
        if isinstance(detector, MultiPanelDetector):
            return _streaks_on_panels(detector, reflection, domain, q, u_low, u_high, radius)

        ends_px, cos_normal = [], []
        towards = torch.ones_like(u_low, dtype=torch.bool)
        for u_end in (u_low, u_high):
            ray = q.clone()
            ray[:, 2] -= u_end
            ray = ray / torch.linalg.norm(ray, dim=-1, keepdim=True)
            fast_px, slow_px, forward = detector.project_directions_px(ray)
            ends_px.append(torch.stack((fast_px, slow_px), dim=-1))
            cos_normal.append(-ray[:, 2])
            towards &= forward
        # A cone of half-angle alpha around a ray at angle theta to the panel normal reaches at
        # most D (tan(theta + alpha) - tan(theta)) from the ray's hit; theta is largest at an end.
        alpha = torch.asin(torch.clamp(radius / torch.clamp(u_low - radius, min=1e-12), max=1.0))
        theta = torch.acos(torch.clamp(torch.minimum(*cos_normal), -1.0, 1.0))
        reach = theta + alpha
        towards &= reach < (math.pi / 2 - 1e-3)
        reach = torch.clamp(reach, max=math.pi / 2 - 1e-3)
        footprint_px = detector.distance_mm * (torch.tan(reach) - torch.tan(theta)) / detector.pixel_size_mm + 1.0
        streaks = Streaks(reflection, domain, u_low, u_high, ends_px[0], ends_px[1], footprint_px)
        streaks = streaks.select(torch.nonzero(towards).squeeze(1))
        fast_lo, fast_hi, slow_lo, slow_hi = streaks.boxes(detector)
        return streaks.select(torch.nonzero((fast_lo <= fast_hi) & (slow_lo <= slow_hi)).squeeze(1))


def _streaks_on_panels(detector: MultiPanelDetector, reflection, domain, q, u_low, u_high, radius: float) -> Streaks:
    """The excited pairs' streaks on every panel they can reach (see :func:`excited_streaks`).

    Each panel's plane gets the single panel's construction: the two ends of the streak projected
    into the panel's frame, and the footprint ``D (tan(theta + alpha) - tan(theta)) / pixel + 1``,
    with D the plane's distance from the sample and theta the larger angle of the two end rays to the
    plane's normal. Both ends must travel towards the plane (then every ray between does, as the
    rays' component along the normal is linear in u). Entries whose box misses their panel are dropped.
    """
    tables = detector.tables(q.device, q.dtype)
    ends_fast, ends_slow, cos_normal = [], [], []
    towards = None
    for u_end in (u_low, u_high):
        ray = q.clone()
        ray[:, 2] -= u_end
        ray = ray / torch.linalg.norm(ray, dim=-1, keepdim=True)
        fast_px, slow_px, forward, cosine, plane = detector.project_directions_px(ray)
        ends_fast.append(fast_px)
        ends_slow.append(slow_px)
        cos_normal.append(cosine)
        towards = forward if towards is None else towards & forward
    alpha = torch.asin(torch.clamp(radius / torch.clamp(u_low - radius, min=1e-12), max=1.0))[None, :]
    theta = torch.acos(torch.clamp(torch.minimum(*cos_normal), -1.0, 1.0))
    reach = theta + alpha
    towards &= reach < (math.pi / 2 - 1e-3)
    reach = torch.clamp(reach, max=math.pi / 2 - 1e-3)
    footprint_px = plane[:, None] * (torch.tan(reach) - torch.tan(theta)) / tables["pixel"][:, None] + 1.0
    panel, pair = torch.nonzero(towards, as_tuple=True)
    streaks = Streaks(reflection[pair], domain[pair], u_low[pair], u_high[pair],
                      torch.stack((ends_fast[0][panel, pair], ends_slow[0][panel, pair]), dim=-1),
                      torch.stack((ends_fast[1][panel, pair], ends_slow[1][panel, pair]), dim=-1),
                      footprint_px[panel, pair], panel)
    fast_lo, fast_hi, slow_lo, slow_hi = streaks.boxes(detector)
    return streaks.select(torch.nonzero((fast_lo <= fast_hi) & (slow_lo <= slow_hi)).squeeze(1))


def _pixels_near_segments(streaks: Streaks, detector: Detector | MultiPanelDetector):
    """(streak, fast, slow) for every pixel whose centre lies within the footprint of a streak."""
    fast_lo, fast_hi, slow_lo, slow_hi = streaks.boxes(detector)
    width = fast_hi - fast_lo + 1
    counts = width * (slow_hi - slow_lo + 1)
    streak = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(streak.numel(), device=counts.device) - first[streak]
    fast = fast_lo[streak] + local % width[streak]
    slow = slow_lo[streak] + local // width[streak]
    centre = torch.stack((fast, slow), dim=-1).to(streaks.start_px.dtype) + 0.5
    start, end = streaks.start_px[streak], streaks.end_px[streak]
    along = end - start
    length_sq = (along ** 2).sum(-1)
    t = torch.clamp(((centre - start) * along).sum(-1) / torch.clamp(length_sq, min=1e-12), 0.0, 1.0)
    distance = torch.linalg.norm(centre - (start + t[:, None] * along), dim=-1)
    near = torch.nonzero(distance <= streaks.footprint_px[streak]).squeeze(1)
    return streak[near], fast[near], slow[near]


@dataclass
class CandidateTerms:
    """The (pixel, channel, reflection, domain) terms of some streaks' candidate pixels.

    Per candidate (in the order passed): the
    Miller index ``hkl`` (float) and the pixel's ``factor`` (polar * omega * capture). Per term: its
    ``candidate``, ``channel``, the lattice-transform argument ``arg`` and whether the term is
    ``alive`` (arg below the cut-off, and the index nearest to the pixel's fractional index when N is
    small enough to need the check). A term's photons are
    ``prefactor * factor * photons_k * |F_k(hkl)|^2 * (Na Nb Nc)^2 exp(-2 arg)``.
    """

    hkl: torch.Tensor
    factor: torch.Tensor
    candidate: torch.Tensor
    channel: torch.Tensor
    arg: torch.Tensor
    alive: torch.Tensor


def candidate_terms(detector: Detector | MultiPanelDetector, beam: Beam, crystal: CrystalState, hkl: torch.Tensor,
                    streaks: Streaks, streak: torch.Tensor, fast: torch.Tensor, slow: torch.Tensor,
                    needs_rounding_check: bool, panel: torch.Tensor | None = None) -> CandidateTerms | None:
    """The channels each candidate (streak, pixel) can receive light from, as terms (None if none).

    ``streak``, ``fast``, ``slow`` list candidate pixels of streaks (e.g. every pixel near a streak's
    segment, or only those of some shoeboxes); on a :class:`MultiPanelDetector` ``panel`` names each
    candidate's panel (``fast``, ``slow`` in its frame). For each candidate, ``arg(u)`` is a quadratic in u whose
    sub-cut-off interval gives exactly the channels to evaluate (see the module docstring). This is
    the sparse evaluation's kernel, shared by :func:`bragg_photons_sparse` (whole panel) and the
    pixel-subset simulation (:mod:`xfel_spread.sim.subset`).
    """
    dtype = crystal.domain_matrices.dtype
    device = crystal.domain_matrices.device
    u_channels = beam.inverse_wavelengths.to(dtype)
    ncells = crystal.ncells.to(dtype)
    beam_direction = torch.as_tensor(BEAM_DIRECTION, dtype=dtype, device=device)
    pair_hkl = hkl[streaks.reflection[streak]].to(dtype)
    pair_domain = streaks.domain[streak]
    directions, factor = pixel_factors(detector, fast, slow, beam.polarization_fraction, panel)
    h_per_u = torch.einsum("pij,pj->pi", crystal.domain_matrices[pair_domain], directions - beam_direction)
    # arg(u) = |N (u h1 - hkl)|^2 / 0.63 = curvature (u - u_centre)^2 + floor
    scaled_h1 = h_per_u * ncells
    scaled_hkl = pair_hkl * ncells
    curvature = (scaled_h1 ** 2).sum(-1) / GAUSS_WIDTH
    u_centre = (scaled_h1 * scaled_hkl).sum(-1) / (scaled_h1 ** 2).sum(-1)
    floor = ((scaled_hkl ** 2).sum(-1) - (scaled_h1 * scaled_hkl).sum(-1) ** 2 / (scaled_h1 ** 2).sum(-1)) / GAUSS_WIDTH
    with torch.no_grad():
        k_first, k_last, live = channel_range(curvature, u_centre, floor, u_channels)
        live_index = torch.nonzero(live).squeeze(1)
    if live_index.numel() == 0:
        return None
    k_first, n_k = k_first[live_index], (k_last - k_first)[live_index]
    term_pair = torch.repeat_interleave(torch.arange(live_index.numel(), device=device), n_k)
    term_channel = k_first[term_pair] + (torch.arange(term_pair.numel(), device=device)
                                         - (torch.cumsum(n_k, 0) - n_k)[term_pair])
    pair = live_index[term_pair]
    du = u_channels[term_channel] - u_centre[pair]
    arg = curvature[pair] * du ** 2 + floor[pair]
    alive = arg < ARG_CUTOFF
    if needs_rounding_check:
        h = u_channels[term_channel, None] * h_per_u[pair]
        alive &= (torch.ceil(h - 0.5) == pair_hkl[pair]).all(dim=-1)
    return CandidateTerms(pair_hkl, factor, pair, term_channel, arg, alive)


def bragg_photons_sparse(detector: Detector | MultiPanelDetector, beam: Beam, crystal: CrystalState,
                         amplitudes: AmplitudeLookup, hkl: torch.Tensor | None = None):
    """Bragg photons on the whole panel (n_slow, n_fast), visiting only what the cut-off reaches.

    On a :class:`MultiPanelDetector`: a tuple of one (n_slow, n_fast) image per panel, each pixel
    evaluated in its own panel's frame and each streak's box found and clipped on every panel.
    """
    multipanel = isinstance(detector, MultiPanelDetector)
    dtype = crystal.domain_matrices.dtype
    device = crystal.domain_matrices.device
    if hkl is None:
        hkl = amplitudes.nonzero_indices()
    u_channels = beam.inverse_wavelengths.to(dtype)
    if torch.any(u_channels[1:] <= u_channels[:-1]):
        raise ValueError("beam channels must be sorted by increasing energy")
    radius = cutoff_radius(crystal)
    ncells = crystal.ncells.to(dtype)
    needs_rounding_check = bool(torch.any(ncells.detach() <= 2 * math.sqrt(ARG_CUTOFF * GAUSS_WIDTH)))
    image = torch.zeros(detector.n_pixels if multipanel else detector.n_slow * detector.n_fast,
                        dtype=dtype, device=device)
    weight_k = beam.photons.to(dtype)
    lattice_peak_sq = torch.prod(ncells) ** 2

    streaks = excited_streaks(detector, crystal, hkl.to(device), float(u_channels[0]), float(u_channels[-1]), radius)
    fast_lo, fast_hi, slow_lo, slow_hi = streaks.boxes(detector)
    box_end = torch.cumsum((fast_hi - fast_lo + 1) * (slow_hi - slow_lo + 1), 0)
    start = 0
    while start < box_end.numel():
        # Streaks whose boxes fit in one chunk (always at least one).
        budget = (int(box_end[start - 1]) if start else 0) + CHUNK_TERMS // 8
        stop = max(start + 1, int(torch.searchsorted(box_end, torch.tensor(budget, device=device), right=True)))
        streak, fast, slow = _pixels_near_segments(streaks.select(torch.arange(start, stop, device=device)), detector)
        streak = streak + start
        start = stop
        panel = streaks.panel[streak] if multipanel else None
        terms = candidate_terms(detector, beam, crystal, hkl, streaks, streak, fast, slow, needs_rounding_check, panel)
        if terms is None:
            continue
        flat_cell, inside = amplitudes.cell_index(terms.hkl)
        pair = terms.candidate
        if multipanel:
            tables = detector.tables(device)
            pixel_flat = tables["offset"][panel] + slow * tables["n_fast"][panel] + fast
        else:
            pixel_flat = slow * detector.n_fast + fast
        f_sq = torch.where(inside[pair], amplitudes.intensity[terms.channel, flat_cell[pair]], torch.zeros_like(terms.arg))
        contribution = torch.where(terms.alive, f_sq * weight_k[terms.channel] * lattice_peak_sq
                                   * torch.exp(-2 * terms.arg), torch.zeros_like(terms.arg)) * terms.factor[pair]
        image.index_add_(0, pixel_flat[pair], contribution)
    image = photon_prefactor(beam, crystal) * image
    if multipanel:
        return tuple(image[int(detector.pixel_offsets[p]):int(detector.pixel_offsets[p + 1])]
                     .reshape(int(detector.n_slow_per_panel[p]), int(detector.n_fast_per_panel[p]))
                     for p in range(len(detector)))
    return image.reshape(detector.n_slow, detector.n_fast)
