"""Synthetic integrated lattices for the merging benchmark, in the layout dials.stills_process writes.

Each shard prefix ``P`` gets ``P_integrated.expt`` (one experiment per lattice: its identifier, a C2
crystal, its own beam and one shared detector) and ``P_integrated.refl`` (a DIALS reflection table
with the columns stills_process writes), plus ``P_truth.npz`` with the true parameters behind them.
A dataset directory also holds ``truth_intensities.npz``, the intensities every lattice samples.

The physics, per lattice (all of it vectorised numpy, deterministic from one seed; shard ``s``
draws from its own stream ``SeedSequence(seed, spawn_key=(0, s))``, so shards can be made in any
order or in parallel):

* Truth: ``I(h) = sum_k w_k |F_k(h)|^2`` over the simulation's energy channels, with ``w`` the mean
  SASE spectrum (a Gaussian envelope, 7120 eV, FWHM 25 eV). The channel amplitudes carry the Fe
  f'/f'' of both sites, so Bijvoet mates differ.
* Crystal: a uniformly random orientation; the cell is the model's C2 cell with Gaussian scatter of
  a, b, c (0.15 %) and beta. The orientation written to the .expt (what indexing found) is the true
  one turned by a small random rotation, which post-refinement has to recover.
* Beam: the shot's mean wavelength, jittered by the SASE centre jitter.
* Reflections: the predictor's choice, made with the recorded model: every index with d >= d_min
  whose excitation error ``Rh = |A* h + s0| - 1/lambda`` lies within ``excitation_cutoff * RS`` and
  whose diffracted ray meets the panel (about 100 per lattice with the defaults).
* Signal: ``G exp(-B d*^2 / 2) P(2theta, phi) p(Rh_true) I(h)`` photons, times a constant that makes
  a full spot of mean intensity at d_min give ``full_spot_photons``. ``p = RS^2 / (RS^2 + 2 Rh^2)``
  is the partiality that cctbx.xfel.merge's "rs" post-refinement fits (with its BFACTOR = B / 4,
  since it writes the Debye-Waller term as ``exp(-2 BFACTOR d*^2)``); P is the polarization of a
  beam fully polarized along x (what its polarization correction undoes); G is log-normal.
* Measurement: summation integration. Poisson signal and background photons in the foreground
  pixels plus readout noise; the background is estimated from the surrounding pixels, and the
  variance is what DIALS reports, ``I + B (1 + m / n)`` (m foreground, n background pixels), which
  does not know about the readout noise (the merge's error model has that to find).
* Outliers: a fixed number per shard of lattices from a second cell cluster (a non-isomorphous form:
  its intensities carry a per-index log-normal factor shared by all such lattices) and of lattices
  whose intensities belong to other indices of similar resolution (unrelated to the truth).

The defaults are calibrated against the validation run's reindexed LY99 lattices. Those have mean
I/sigma 16 at 1.8-2.1 A, 100 at 3.2-3.9 A and 140 at low resolution, 10,000-25,000 background photons
under a spot, a median of 92 foreground and 560 background pixels, 41 % of reflections flagged
strong, centroids about 1 px from prediction; the defaults give 16, 76 and 113, 8,000-18,000, 94 and
880, and 44 %.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output, atomic_path
from xfel_spread.dials.stills import OUTPUT_SUFFIXES
from xfel_spread.sim.spectrum import FWHM_TO_SIGMA
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, ChannelAmplitudes

LOGGER = logging.getLogger(__name__)

#: Per-shard file of true lattice and reflection parameters, beside the integrated files.
TRUTH_SUFFIX = "_truth.npz"
#: The truth intensities of a dataset directory.
TRUTH_INTENSITIES = "truth_intensities.npz"
#: Written first in a dataset directory: how it was generated (a reused directory must match).
GENERATION_FILE = "generation.json"
#: Written last: every shard of the dataset is on disk.
COMPLETE_MARKER = "complete"

#: Lattice kinds recorded in the truth files.
KIND_NORMAL, KIND_OFF_CLUSTER, KIND_UNRELATED = 0, 1, 2

#: Reflection-table flags (dials.array_family.flex.reflection_table.flags values).
FLAG_PREDICTED, FLAG_INDEXED, FLAG_USED_IN_REFINEMENT = 1, 4, 8
FLAG_STRONG, FLAG_REFERENCE_SPOT, FLAG_INTEGRATED_SUM = 32, 64, 256
#: Flags of a reflection whose spot was found and indexed (the "strong" ones in stills_process output).
FLAGS_FOUND_SPOT = FLAG_INDEXED | FLAG_USED_IN_REFINEMENT | FLAG_STRONG | FLAG_REFERENCE_SPOT

#: The flex type of every column written, by name (the types stills_process writes).
COLUMN_TYPES = {
    "background.dispersion": "double", "background.mean": "double", "background.mse": "double",
    "background.sum.value": "double", "background.sum.variance": "double", "bbox": "int6", "d": "double",
    "delpsical.rad": "double", "entering": "bool", "flags": "size_t", "id": "int",
    "intensity.sum.value": "double", "intensity.sum.variance": "double", "miller_index": "miller_index",
    "num_pixels.background": "int", "num_pixels.background_used": "int", "num_pixels.foreground": "int",
    "num_pixels.valid": "int", "panel": "size_t", "partial_id": "size_t", "partiality": "double",
    "s1": "vec3_double", "xyzcal.mm": "vec3_double", "xyzcal.px": "vec3_double",
    "xyzobs.mm.value": "vec3_double", "xyzobs.mm.variance": "vec3_double",
    "xyzobs.px.value": "vec3_double", "xyzobs.px.variance": "vec3_double",
}


class SyntheticDataError(ValueError):
    """Synthetic-data input or directory that cannot be used, with the file named."""


@dataclass(frozen=True)
class SyntheticSettings:
    """Everything the generator draws from, with LY99-like defaults (lengths in A, angles in degrees)."""

    #: Mean cell of the main cluster (the 1M2A model's cell) and the crystal's Hall symbol (C 1 2/m 1).
    unit_cell: tuple[float, ...] = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
    space_group_hall: str = "-C 2y"
    #: Relative Gaussian scatter of a, b, c from lattice to lattice, and absolute scatter of beta.
    cell_scatter_fraction: float = 0.0015
    beta_scatter_deg: float = 0.05
    #: Mean cell of the second cluster (non-isomorphous outliers), about 8 sigma off in a and b.
    off_cluster_cell: tuple[float, ...] = (66.4, 60.5, 47.6, 90.0, 110.3, 90.0)
    off_cluster_fraction: float = 0.02
    #: Log-normal sigma of the per-index intensity factor that the second form's lattices share.
    nonisomorphism_sigma: float = 0.5
    unrelated_fraction: float = 0.01
    #: Resolution cut of the predictor (in each lattice's recorded cell).
    d_min: float = 1.9
    #: Mean photon energy, its shot-to-shot jitter (sigma) and the mean spectrum's width (for the truth).
    energy_ev: float = 7120.0
    energy_jitter_ev: float = 3.5
    spectrum_fwhm_ev: float = 25.0
    #: Reciprocal-space spot radius RS (1/A): median and log-normal sigma over lattices.
    rs_median: float = 3.4e-4
    rs_log_sigma: float = 0.2
    #: Predicted reflections have |Rh| below this many RS (partiality above 1 / (1 + 2 cutoff^2)).
    excitation_cutoff: float = 2.0
    #: Sigma of the indexing error, a rotation about each laboratory axis.
    misorientation_deg: float = 0.01
    #: Per-lattice scale G: log-normal with this sigma (median 1); B factor: Gaussian, mean 0 (A^2).
    scale_log_sigma: float = 0.6
    b_factor_sigma: float = 5.0
    #: Photons of a full spot (G = 1, B = 0, no polarization loss) of mean truth intensity at d_min.
    full_spot_photons: float = 5000.0
    #: Background photons per pixel: median level, log-normal sigma over lattices, water-ring shape.
    background_per_pixel: float = 120.0
    background_log_sigma: float = 0.3
    water_ring_d_star: float = 0.33
    water_ring_width: float = 0.1
    #: Readout noise per pixel, in photons (not in the reported variances).
    readout_noise: float = 2.0
    #: Spot shoebox side in pixels (uniform range) and the fraction of it that is foreground.
    box_side_px: tuple[int, int] = (20, 44)
    foreground_fraction: tuple[float, float] = (0.05, 0.15)
    #: Observed centroid scatter about the prediction (px).
    centroid_error_px: float = 1.0
    #: Median I/sigma at which half the spots are found by spot finding (flagged strong, indexed).
    strong_i_over_sigma: float = 25.0
    #: Detector (the LY99 Rayonix: one 3840 x 3840 panel of 0.088 mm at 141.7 mm, centred beam).
    distance_mm: float = 141.7
    pixel_size_mm: float = 0.088
    n_pixels: int = 3840
    beam_center_mm: tuple[float, float] = (169.0, 169.0)
    polarization_normal: tuple[float, float, float] = (0.0, 1.0, 0.0)

    def as_dict(self) -> dict:
        """Plain JSON-able values (tuples as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


# --- truth -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TruthIntensities:
    """True intensities on one anomalous asymmetric unit (Friedel mates separate)."""

    unit_cell: tuple[float, ...]
    space_group: str
    miller_index: np.ndarray
    intensity: np.ndarray


def spectrum_weights(energies_ev: np.ndarray, centre_ev: float, fwhm_ev: float) -> np.ndarray:
    """Weights of the channels under a Gaussian spectrum envelope, summing to 1."""
    sigma = fwhm_ev * FWHM_TO_SIGMA
    weights = np.exp(-0.5 * ((np.asarray(energies_ev, dtype=np.float64) - centre_ev) / sigma) ** 2)
    return weights / weights.sum()


def truth_intensities(amplitudes: ChannelAmplitudes, weights: np.ndarray) -> TruthIntensities:
    """``I(h) = sum_k w_k |F_k(h)|^2``: what a shot of the mean spectrum measures."""
    from xfel_spread.analysis.truth import true_intensities

    indices, intensity = true_intensities(amplitudes, weights)
    return TruthIntensities(unit_cell=tuple(float(v) for v in amplitudes.unit_cell),
                            space_group=amplitudes.space_group,
                            miller_index=np.asarray(indices, dtype=np.int32), intensity=intensity)


def save_truth_intensities(truth: TruthIntensities, path: str | os.PathLike) -> None:
    """Write the truth as .npz (miller_index, intensity, unit_cell, space_group), atomically."""
    with atomic_output(path, "wb") as stream:
        np.savez(stream, miller_index=truth.miller_index, intensity=truth.intensity,
                 unit_cell=np.asarray(truth.unit_cell), space_group=np.asarray(truth.space_group))


def load_truth_intensities(path: str | os.PathLike) -> TruthIntensities:
    """Read a file written by :func:`save_truth_intensities`."""
    try:
        with np.load(path) as data:
            return TruthIntensities(unit_cell=tuple(float(v) for v in data["unit_cell"]),
                                    space_group=str(data["space_group"]),
                                    miller_index=data["miller_index"], intensity=data["intensity"])
    except (OSError, KeyError, ValueError) as exc:
        raise SyntheticDataError(f"{path}: cannot read truth intensities ({exc})") from None


@dataclass(frozen=True)
class P1Lookup:
    """Every P1 index to a resolution limit (Friedel mates distinct) and its truth column.

    Rows are sorted by resolution in the reference cell, so neighbouring rows have similar d.
    """

    miller_index: np.ndarray
    truth_column: np.ndarray


def p1_lookup(truth: TruthIntensities, d_min: float) -> P1Lookup:
    """Expand the asymmetric unit to P1 down to ``d_min`` (in the truth's cell), sorted by d."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=truth.unit_cell, space_group_symbol=truth.space_group)
    asu_set = miller.set(symmetry, flex.miller_index(truth.miller_index.astype(np.int32)), anomalous_flag=True)
    p1_set, asu_selection = asu_set.expand_to_p1(return_iselection=True)
    indices = np.asarray(p1_set.indices(), dtype=np.int32).reshape(-1, 3)
    d_spacing = np.asarray(p1_set.d_spacings().data())
    keep = np.flatnonzero(d_spacing >= d_min)
    order = keep[np.argsort(-d_spacing[keep], kind="stable")]
    return P1Lookup(miller_index=indices[order], truth_column=np.asarray(asu_selection, dtype=np.int64)[order].astype(np.int32))


def mean_intensity_in_shell(truth: TruthIntensities, d_min: float, d_max: float) -> float:
    """Mean truth intensity of the asymmetric-unit indices with d_min <= d < d_max."""
    d_spacing = d_spacings(truth.miller_index, reciprocal_metric(truth.unit_cell))
    in_shell = (d_spacing >= d_min) & (d_spacing < d_max)
    if not in_shell.any():
        raise SyntheticDataError(f"truth intensities have no index between {d_min:g} and {d_max:g} A")
    return float(truth.intensity[in_shell].mean())


def nonisomorphous_factors(n_columns: int, sigma: float, seed: int) -> np.ndarray:
    """Per-index intensity factors (log-normal, mean 1) shared by every lattice of the second form."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return np.exp(sigma * rng.standard_normal(n_columns) - 0.5 * sigma ** 2)


@dataclass(frozen=True)
class Source:
    """What every shard samples: truth, its P1 lookup, photon scale and the second form's factors."""

    truth: TruthIntensities
    lookup: P1Lookup
    photons_per_intensity: float
    nonisomorphous: np.ndarray


def prepare_source(truth: TruthIntensities, settings: SyntheticSettings, seed: int) -> Source:
    """Build the shared inputs of :func:`generate_shard` once per dataset.

    The lookup reaches 3 % past d_min so that lattices with larger cells than the reference still
    find all their indices within d_min.
    """
    lookup = p1_lookup(truth, settings.d_min * 0.97)
    shell_mean = mean_intensity_in_shell(truth, settings.d_min, settings.d_min * 1.1)
    return Source(truth=truth, lookup=lookup,
                  photons_per_intensity=settings.full_spot_photons / shell_mean,
                  nonisomorphous=nonisomorphous_factors(len(truth.intensity), settings.nonisomorphism_sigma, seed))


# --- crystal geometry -------------------------------------------------------------------------------

def orthogonalization_matrices(cells: np.ndarray) -> np.ndarray:
    """Cell vectors as rows (n, 3, 3) in the PDB convention (a along x, b in the xy plane)."""
    a, b, c = cells[:, 0], cells[:, 1], cells[:, 2]
    cos_alpha, cos_beta, cos_gamma = np.cos(np.radians(cells[:, 3:6])).T
    sin_gamma = np.sin(np.radians(cells[:, 5]))
    c_x = c * cos_beta
    c_y = c * (cos_alpha - cos_beta * cos_gamma) / sin_gamma
    c_z = np.sqrt(c ** 2 - c_x ** 2 - c_y ** 2)
    zero = np.zeros_like(a)
    return np.stack([np.stack([a, zero, zero], axis=-1),
                     np.stack([b * cos_gamma, b * sin_gamma, zero], axis=-1),
                     np.stack([c_x, c_y, c_z], axis=-1)], axis=1)


def reciprocal_metric(unit_cell: Sequence[float]) -> np.ndarray:
    """G* (3, 3) such that d*^2 = h . G* . h."""
    reciprocal = np.linalg.inv(orthogonalization_matrices(np.asarray([unit_cell], dtype=np.float64))[0])
    return reciprocal.T @ reciprocal


def d_spacings(miller_index: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """d = 1 / sqrt(h . G* . h) for each row of ``miller_index``."""
    h = np.asarray(miller_index, dtype=np.float64)
    return 1.0 / np.sqrt(np.einsum("ni,ij,nj->n", h, metric, h))


def uniform_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices drawn uniformly from SO(3) (normalised Gaussian quaternions)."""
    quaternion = rng.standard_normal((n, 4))
    w, x, y, z = (quaternion / np.linalg.norm(quaternion, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
    ], axis=1)


def small_rotations(rotation_vectors: np.ndarray) -> np.ndarray:
    """Rotation matrices (n, 3, 3) for rotation vectors (n, 3) in radians (Rodrigues' formula)."""
    angle = np.linalg.norm(rotation_vectors, axis=1)
    axis = rotation_vectors / np.where(angle > 0, angle, 1.0)[:, None]
    x, y, z = axis.T
    zero = np.zeros_like(x)
    cross = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], axis=1)
    sin, one_minus_cos = np.sin(angle)[:, None, None], (1 - np.cos(angle))[:, None, None]
    return np.eye(3) + sin * cross + one_minus_cos * cross @ cross


def scattered_cells(mean_cell: Sequence[float], n: int, fraction: float, beta_sigma_deg: float,
                    rng: np.random.Generator) -> np.ndarray:
    """n monoclinic cells (n, 6): Gaussian relative scatter of a, b, c, absolute scatter of beta."""
    cells = np.tile(np.asarray(mean_cell, dtype=np.float64), (n, 1))
    deviates = rng.standard_normal((n, 4))
    cells[:, :3] *= 1 + fraction * deviates[:, :3]
    cells[:, 4] += beta_sigma_deg * deviates[:, 3]
    return cells


def excitation_errors(reciprocal_vectors: np.ndarray, wavelength: float | np.ndarray) -> np.ndarray:
    """Rh = |x + s0| - 1/lambda for a beam along -z (s0 = (0, 0, -1/lambda)), as the rs model defines it."""
    k = 1.0 / wavelength
    x, y, z = reciprocal_vectors[:, 0], reciprocal_vectors[:, 1], reciprocal_vectors[:, 2] - k
    return np.sqrt(x * x + y * y + z * z) - k


def rs_partiality(excitation_error: np.ndarray, rs: np.ndarray | float) -> np.ndarray:
    """Partiality of the "rs" model: RS^2 / (RS^2 + 2 Rh^2), 1 on the Ewald sphere."""
    rs_squared = np.square(rs)
    return rs_squared / (rs_squared + 2.0 * np.square(excitation_error))


def polarization_factors(s1_unit: np.ndarray, polarization_normal: Sequence[float]) -> np.ndarray:
    """Fraction of intensity kept for a beam along -z fully polarized along e = n x beam: 1 - (s1.e)^2.

    This is what cctbx.xfel.merge's Kahn (1982) correction divides out for polarization fraction 1.
    """
    electric = np.cross(np.asarray(polarization_normal, dtype=np.float64), (0.0, 0.0, -1.0))
    return 1.0 - (s1_unit @ electric) ** 2


def panel_coordinates_mm(s1: np.ndarray, settings: SyntheticSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where rays along s1 meet the panel: fast and slow mm from its corner, and whether they face it."""
    towards_panel = s1[:, 2] < 0
    scale = settings.distance_mm / np.where(towards_panel, -s1[:, 2], 1.0)
    fast_mm = s1[:, 0] * scale + settings.beam_center_mm[0]
    slow_mm = settings.beam_center_mm[1] - s1[:, 1] * scale
    return fast_mm, slow_mm, towards_panel


# --- lattices --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lattices:
    """True and recorded parameters of the lattices of one shard (arrays over lattices)."""

    identifier: np.ndarray
    kind: np.ndarray
    unit_cell: np.ndarray
    true_matrix: np.ndarray
    recorded_matrix: np.ndarray
    misorientation_deg: np.ndarray
    wavelength: np.ndarray
    scale: np.ndarray
    b_factor: np.ndarray
    rs: np.ndarray
    background_per_pixel: np.ndarray


def shard_rng(seed: int, shard_index: int) -> np.random.Generator:
    """The independent random stream of one shard."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, shard_index)))


def identifiers_from_bytes(raw: bytes, n: int) -> np.ndarray:
    """n experiment identifiers in DIALS's UUID layout (8-4-4-4-12 hex digits) from 16 n random bytes."""
    hex_digits = raw.hex()
    identifiers = []
    for i in range(n):
        d = hex_digits[32 * i:32 * (i + 1)]
        identifiers.append(f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}")
    return np.asarray(identifiers)


def lattice_kinds(n: int, settings: SyntheticSettings, rng: np.random.Generator) -> np.ndarray:
    """Kinds at random positions: round(fraction * n) off-cluster and unrelated lattices, the rest normal."""
    n_off = int(round(settings.off_cluster_fraction * n))
    n_unrelated = int(round(settings.unrelated_fraction * n))
    if n_off + n_unrelated > n:
        raise SyntheticDataError(f"outlier fractions {settings.off_cluster_fraction} + {settings.unrelated_fraction} exceed 1")
    kinds = np.full(n, KIND_NORMAL, dtype=np.int8)
    kinds[:n_off] = KIND_OFF_CLUSTER
    kinds[n_off:n_off + n_unrelated] = KIND_UNRELATED
    return rng.permutation(kinds)


def draw_lattices(n: int, settings: SyntheticSettings, rng: np.random.Generator) -> Lattices:
    """Draw the n lattices of a shard: kind, cell, orientation, indexing error, beam, scale, B, RS."""
    kind = lattice_kinds(n, settings, rng)
    cells = np.where((kind == KIND_OFF_CLUSTER)[:, None],
                     scattered_cells(settings.off_cluster_cell, n, settings.cell_scatter_fraction,
                                     settings.beta_scatter_deg, rng),
                     scattered_cells(settings.unit_cell, n, settings.cell_scatter_fraction,
                                     settings.beta_scatter_deg, rng))
    rotations = uniform_rotations(n, rng)
    # Rows a, b, c of the lab-frame real-space matrix: each PDB-frame cell vector turned by U.
    true_matrix = orthogonalization_matrices(cells) @ np.transpose(rotations, (0, 2, 1))
    rotation_vectors = np.radians(settings.misorientation_deg) * rng.standard_normal((n, 3))
    recorded_matrix = true_matrix @ np.transpose(small_rotations(rotation_vectors), (0, 2, 1))
    energy = settings.energy_ev + settings.energy_jitter_ev * rng.standard_normal(n)
    return Lattices(
        identifier=identifiers_from_bytes(rng.bytes(16 * n), n),
        kind=kind,
        unit_cell=cells,
        true_matrix=true_matrix,
        recorded_matrix=recorded_matrix,
        misorientation_deg=np.degrees(np.linalg.norm(rotation_vectors, axis=1)),
        wavelength=HC_EV_ANGSTROM / energy,
        scale=np.exp(settings.scale_log_sigma * rng.standard_normal(n)),
        b_factor=settings.b_factor_sigma * rng.standard_normal(n),
        rs=settings.rs_median * np.exp(settings.rs_log_sigma * rng.standard_normal(n)),
        background_per_pixel=settings.background_per_pixel * np.exp(settings.background_log_sigma * rng.standard_normal(n)),
    )


@dataclass(frozen=True)
class Predictions:
    """Reflections predicted for a shard (arrays over reflections)."""

    lattice: np.ndarray
    lookup_row: np.ndarray
    miller_index: np.ndarray
    d: np.ndarray
    d_star_sq_true: np.ndarray
    excitation_recorded: np.ndarray
    excitation_true: np.ndarray
    s1: np.ndarray
    fast_mm: np.ndarray
    slow_mm: np.ndarray


def quadratic_terms(miller_index: np.ndarray) -> np.ndarray:
    """Per index (h^2, k^2, l^2, hk, hl, kl, h, k, l) as float32, for :func:`sphere_and_resolution_terms`."""
    h, k, l = np.asarray(miller_index, dtype=np.float64).T
    return np.stack([h * h, k * k, l * l, h * k, h * l, k * l, h, k, l], axis=1).astype(np.float32)


def sphere_and_resolution_coefficients(reciprocal_matrix: np.ndarray, wavelength: float) -> np.ndarray:
    """Coefficients (9, 2) that turn :func:`quadratic_terms` into (|x + s0|^2 - k^2, |x|^2).

    With x = A* h, |x|^2 = h.G*.h (G* = A*^T A*) and |x + s0|^2 - k^2 = |x|^2 - 2 k x_z for the beam
    along -z; both are linear in the quadratic terms, so one matrix product screens every index.
    """
    metric = reciprocal_matrix.T @ reciprocal_matrix
    quadratic = [metric[0, 0], metric[1, 1], metric[2, 2], 2 * metric[0, 1], 2 * metric[0, 2], 2 * metric[1, 2]]
    k = 1.0 / wavelength
    sphere = quadratic + list(-2 * k * reciprocal_matrix[2])
    return np.array([sphere, quadratic + [0.0, 0.0, 0.0]], dtype=np.float64).T


def predict_lattice(terms: np.ndarray, miller_index: np.ndarray, reciprocal_matrix: np.ndarray, wavelength: float,
                    half_width: float, settings: SyntheticSettings) -> np.ndarray:
    """Rows of ``miller_index`` the stills predictor keeps for one lattice's recorded model A*.

    d >= d_min, |Rh| <= half_width, and the diffracted ray lands on the panel (with room for its
    shoebox). A float32 screen (``terms`` from :func:`quadratic_terms`) finds the rows near the
    sphere, |x + s0|^2 - k^2 = 2 k Rh + Rh^2, with a 10 % margin; the exact Rh then decides.
    """
    k = 1.0 / wavelength
    screen = terms @ sphere_and_resolution_coefficients(reciprocal_matrix, wavelength).astype(np.float32)
    near = np.flatnonzero((np.abs(screen[:, 0]) < 2.2 * k * half_width) & (screen[:, 1] <= 1.0 / settings.d_min ** 2))
    x = miller_index[near] @ reciprocal_matrix.T
    rh = excitation_errors(x, wavelength)
    inside = np.abs(rh) <= half_width
    near, x = near[inside], x[inside]
    s1 = x + (0.0, 0.0, -k)
    fast_mm, slow_mm, towards_panel = panel_coordinates_mm(s1, settings)
    margin = settings.box_side_px[1] / 2 * settings.pixel_size_mm
    size = settings.n_pixels * settings.pixel_size_mm
    on_panel = towards_panel & (fast_mm >= margin) & (fast_mm < size - margin) & (slow_mm >= margin) & (slow_mm < size - margin)
    return near[on_panel]


def predict_reflections(lattices: Lattices, lookup: P1Lookup, settings: SyntheticSettings) -> Predictions:
    """Predict every lattice's reflections from its recorded model; Rh also from its true one."""
    hkl = lookup.miller_index.astype(np.float64)
    terms = quadratic_terms(hkl)
    recorded_reciprocal = np.linalg.inv(lattices.recorded_matrix)
    rows = [predict_lattice(terms, hkl, matrix, wavelength, settings.excitation_cutoff * rs, settings)
            for matrix, wavelength, rs in zip(recorded_reciprocal, lattices.wavelength, lattices.rs)]
    lattice = np.repeat(np.arange(len(rows), dtype=np.int32), [len(r) for r in rows])
    lookup_row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    h = hkl[lookup_row]
    recorded_reciprocal = recorded_reciprocal[lattice]
    true_reciprocal = np.linalg.inv(lattices.true_matrix)[lattice]
    x_recorded = np.einsum("nij,nj->ni", recorded_reciprocal, h)
    x_true = np.einsum("nij,nj->ni", true_reciprocal, h)
    wavelength = lattices.wavelength[lattice]
    k = 1.0 / wavelength
    s1 = x_recorded.copy()
    s1[:, 2] -= k
    # stills_process puts s1 on the Ewald sphere (length 1/lambda).
    s1 *= (k / np.linalg.norm(s1, axis=1))[:, None]
    fast_mm, slow_mm, _ = panel_coordinates_mm(s1, settings)
    return Predictions(
        lattice=lattice, lookup_row=lookup_row, miller_index=lookup.miller_index[lookup_row],
        d=1.0 / np.linalg.norm(x_recorded, axis=1), d_star_sq_true=np.einsum("ij,ij->i", x_true, x_true),
        excitation_recorded=excitation_errors(x_recorded, wavelength),
        excitation_true=excitation_errors(x_true, wavelength),
        s1=s1, fast_mm=fast_mm, slow_mm=slow_mm)


def reflection_true_intensities(predictions: Predictions, lattices: Lattices, source: Source,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Truth intensity behind each reflection and its truth column, by lattice kind.

    Normal lattices sample the truth; the second form multiplies it by its per-index factors;
    unrelated lattices take the intensity of another index up to 1,000 rows away in resolution order.
    """
    column = source.lookup.truth_column[predictions.lookup_row].astype(np.int64)
    kind = lattices.kind[predictions.lattice]
    unrelated = kind == KIND_UNRELATED
    n_rows = len(source.lookup.truth_column)
    shifted = np.clip(predictions.lookup_row[unrelated] + rng.integers(-1000, 1001, unrelated.sum()), 0, n_rows - 1)
    sampled = column.copy()
    sampled[unrelated] = source.lookup.truth_column[shifted]
    intensity = source.truth.intensity[sampled]
    off_cluster = kind == KIND_OFF_CLUSTER
    intensity[off_cluster] *= source.nonisomorphous[sampled[off_cluster]]
    return intensity, column


def background_profile(d_star: np.ndarray, settings: SyntheticSettings) -> np.ndarray:
    """Relative background against d*: a flat part plus the water ring (Gaussian in d*)."""
    return 0.5 + np.exp(-0.5 * ((d_star - settings.water_ring_d_star) / settings.water_ring_width) ** 2)


@dataclass(frozen=True)
class Measurement:
    """Summation-integration results per reflection."""

    intensity: np.ndarray
    variance: np.ndarray
    background_sum: np.ndarray
    background_sum_variance: np.ndarray
    background_mean: np.ndarray
    background_dispersion: np.ndarray
    n_foreground: np.ndarray
    n_background: np.ndarray
    box_fast: np.ndarray
    box_slow: np.ndarray


def integrate(signal_photons: np.ndarray, background_per_pixel: np.ndarray, settings: SyntheticSettings,
              rng: np.random.Generator) -> Measurement:
    """Simulate summation integration of spots with the given expected signal and background level.

    Foreground counts: Poisson signal + Poisson background + readout noise over m pixels.
    Background estimate: the mean of n surrounding pixels (Poisson + readout). I = counts - m b_est;
    the reported variance is DIALS's ``I + B (1 + m / n)``, B = m b_est, blind to the readout.
    """
    n = len(signal_photons)
    box_fast = rng.integers(settings.box_side_px[0], settings.box_side_px[1] + 1, n)
    box_slow = rng.integers(settings.box_side_px[0], settings.box_side_px[1] + 1, n)
    n_valid = box_fast * box_slow
    fraction = rng.uniform(*settings.foreground_fraction, n)
    n_foreground = np.clip(np.rint(fraction * n_valid), 9, n_valid - 9).astype(np.int64)
    n_background = n_valid - n_foreground
    readout = settings.readout_noise
    foreground_counts = (rng.poisson(signal_photons) + rng.poisson(background_per_pixel * n_foreground)
                         + readout * np.sqrt(n_foreground) * rng.standard_normal(n))
    background_counts = rng.poisson(background_per_pixel * n_background) + readout * np.sqrt(n_background) * rng.standard_normal(n)
    background_mean = background_counts / n_background
    background_sum = background_mean * n_foreground
    background_sum_variance = background_sum * (1 + n_foreground / n_background)
    intensity = foreground_counts - background_sum
    # Counts in the foreground cannot be negative, so DIALS's variance stays at least B m / n.
    variance = np.maximum(intensity + background_sum_variance, background_sum * n_foreground / n_background)
    # Variance-to-mean ratio of the background pixels: readout adds to Poisson; its estimate scatters.
    dispersion = (1 + readout ** 2 / np.maximum(background_per_pixel, 1.0)) * (
        1 + np.sqrt(2.0 / n_background) * rng.standard_normal(n))
    return Measurement(intensity=intensity, variance=variance, background_sum=background_sum,
                       background_sum_variance=background_sum_variance, background_mean=background_mean,
                       background_dispersion=dispersion, n_foreground=n_foreground, n_background=n_background,
                       box_fast=box_fast, box_slow=box_slow)


@dataclass(frozen=True)
class Shard:
    """One shard's lattices, predicted reflections, their true signal and the measured columns."""

    lattices: Lattices
    predictions: Predictions
    truth_column: np.ndarray
    partiality: np.ndarray
    expected_photons: np.ndarray
    columns: dict


def simulate_shard(shard_index: int, n_lattices: int, source: Source, settings: SyntheticSettings,
                   seed: int) -> Shard:
    """Draw the lattices of one shard, predict, compute the true signal and measure it."""
    rng = shard_rng(seed, shard_index)
    lattices = draw_lattices(n_lattices, settings, rng)
    predictions = predict_reflections(lattices, source.lookup, settings)
    lattice = predictions.lattice
    intensity, truth_column = reflection_true_intensities(predictions, lattices, source, rng)
    partiality = rs_partiality(predictions.excitation_true, lattices.rs[lattice])
    k = 1.0 / lattices.wavelength[lattice]
    s1_unit = predictions.s1 / k[:, None]
    expected = (source.photons_per_intensity * lattices.scale[lattice]
                * np.exp(-0.5 * lattices.b_factor[lattice] * predictions.d_star_sq_true)
                * polarization_factors(s1_unit, settings.polarization_normal) * partiality * intensity)
    background = lattices.background_per_pixel[lattice] * background_profile(1.0 / predictions.d, settings)
    measurement = integrate(expected, background, settings, rng)
    columns = reflection_columns(predictions, lattices, measurement, settings, rng)
    return Shard(lattices=lattices, predictions=predictions, truth_column=truth_column.astype(np.int32),
                 partiality=partiality, expected_photons=expected, columns=columns)


def reflection_columns(predictions: Predictions, lattices: Lattices, measurement: Measurement,
                       settings: SyntheticSettings, rng: np.random.Generator) -> dict:
    """The reflection-table columns stills_process writes, as numpy arrays (see COLUMN_TYPES)."""
    n = len(predictions.lattice)
    pixel = settings.pixel_size_mm
    calculated_px = np.stack([predictions.fast_mm / pixel, predictions.slow_mm / pixel, np.zeros(n)], axis=1)
    observed_px = calculated_px + np.column_stack([settings.centroid_error_px * rng.standard_normal((n, 2)),
                                                   np.full(n, 0.5)])
    observed_px_variance = np.stack([rng.uniform(0.08, 0.12, n), rng.uniform(0.08, 0.12, n),
                                     np.full(n, 1.0 / 12.0)], axis=1)
    centre_fast, centre_slow = np.floor(calculated_px[:, 0]).astype(np.int32), np.floor(calculated_px[:, 1]).astype(np.int32)
    x0 = centre_fast - measurement.box_fast // 2
    y0 = centre_slow - measurement.box_slow // 2
    bbox = np.stack([x0, x0 + measurement.box_fast, y0, y0 + measurement.box_slow,
                     np.zeros(n, np.int64), np.ones(n, np.int64)], axis=1).astype(np.int32)
    i_over_sigma = measurement.intensity / np.sqrt(measurement.variance)
    found = i_over_sigma > settings.strong_i_over_sigma * np.exp(0.8 * rng.standard_normal(n))
    flags = np.where(found, FLAG_PREDICTED | FLAG_INTEGRATED_SUM | FLAGS_FOUND_SPOT,
                     FLAG_PREDICTED | FLAG_INTEGRATED_SUM).astype(np.uint64)
    d_star = 1.0 / predictions.d
    two_theta = 2 * np.arcsin(np.clip(d_star * lattices.wavelength[predictions.lattice] / 2, 0, 1))
    counts = np.bincount(predictions.lattice, minlength=len(lattices.kind))
    first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return {
        "background.dispersion": measurement.background_dispersion,
        "background.mean": measurement.background_mean,
        "background.mse": measurement.background_mean * measurement.background_dispersion,
        "background.sum.value": measurement.background_sum,
        "background.sum.variance": measurement.background_sum_variance,
        "bbox": bbox,
        "d": predictions.d,
        # Rotation about the beam-normal axis that would bring the point onto the sphere.
        "delpsical.rad": -predictions.excitation_recorded / (d_star * np.cos(two_theta / 2)),
        "entering": np.zeros(n, dtype=bool),
        "flags": flags,
        "id": predictions.lattice.astype(np.int32),
        "intensity.sum.value": measurement.intensity,
        "intensity.sum.variance": measurement.variance,
        "miller_index": predictions.miller_index.astype(np.int32),
        "num_pixels.background": measurement.n_background.astype(np.int32),
        "num_pixels.background_used": measurement.n_background.astype(np.int32),
        "num_pixels.foreground": measurement.n_foreground.astype(np.int32),
        "num_pixels.valid": (measurement.n_foreground + measurement.n_background).astype(np.int32),
        "panel": np.zeros(n, dtype=np.uint64),
        "partial_id": (np.arange(n) - first_row[predictions.lattice]).astype(np.uint64),
        # stills_process writes 1 (it does not model partiality); the truth file has the real one.
        "partiality": np.ones(n),
        "s1": predictions.s1,
        "xyzcal.mm": calculated_px * (pixel, pixel, 0.0),
        "xyzcal.px": calculated_px,
        "xyzobs.mm.value": observed_px * (pixel, pixel, 0.0),
        "xyzobs.mm.variance": observed_px_variance * (pixel ** 2, pixel ** 2, 0.0),
        "xyzobs.px.value": observed_px,
        "xyzobs.px.variance": observed_px_variance,
    }


# --- files -----------------------------------------------------------------------------------------

def experiment_list_json(lattices: Lattices, settings: SyntheticSettings) -> dict:
    """The .expt content: one experiment per lattice with its crystal and beam, one shared detector.

    There is no image behind synthetic lattices, so no imageset (dxtbx reads experiments without one).
    """
    panel = {
        "name": "Panel", "type": "SENSOR_CCD", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, -1.0, 0.0],
        "origin": [-settings.beam_center_mm[0], settings.beam_center_mm[1], -settings.distance_mm],
        "raw_image_offset": [0, 0], "image_size": [settings.n_pixels, settings.n_pixels],
        "pixel_size": [settings.pixel_size_mm, settings.pixel_size_mm], "trusted_range": [-0.5, 2147483646.5],
        "thickness": 0.032, "material": "Gd2O2S", "mu": 58.8235294117647, "identifier": "", "mask": [],
        "gain": 1.0, "pedestal": 10.0, "px_mm_strategy": {"type": "SimplePxMmStrategy"},
    }
    hierarchy = {
        "name": "", "type": "", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, 1.0, 0.0],
        "origin": [0.0, 0.0, 0.0], "raw_image_offset": [0, 0], "image_size": [0, 0], "pixel_size": [0.0, 0.0],
        "trusted_range": [0.0, 0.0], "thickness": 0.0, "material": "", "mu": 0.0, "identifier": "", "mask": [],
        "gain": 1.0, "pedestal": 0.0, "px_mm_strategy": {"type": "SimplePxMmStrategy"}, "children": [{"panel": 0}],
    }
    experiments, crystals, beams = [], [], []
    for i, identifier in enumerate(lattices.identifier):
        experiments.append({"__id__": "Experiment", "identifier": str(identifier), "beam": i, "detector": 0, "crystal": i})
        a, b, c = lattices.recorded_matrix[i]
        crystals.append({"__id__": "crystal", "real_space_a": a.tolist(), "real_space_b": b.tolist(),
                         "real_space_c": c.tolist(), "space_group_hall_symbol": settings.space_group_hall,
                         # The rs model's spot radius is the inverse domain size; it has no mosaic spread.
                         "ML_half_mosaicity_deg": 0.0, "ML_domain_size_ang": float(1.0 / lattices.rs[i])})
        beams.append({"direction": [0.0, 0.0, 1.0], "wavelength": float(lattices.wavelength[i]), "divergence": 0.0,
                      "sigma_divergence": 0.0, "polarization_normal": list(settings.polarization_normal),
                      "polarization_fraction": 1.0, "flux": 0.0, "transmission": 1.0})
    return {"__id__": "ExperimentList", "experiment": experiments, "imageset": [], "beam": beams,
            "detector": [{"panels": [panel], "hierarchy": hierarchy}], "goniometer": [], "scan": [],
            "crystal": crystals, "profile": [], "scaling_model": []}


def _to_flex(flex, type_name: str, values: np.ndarray):
    """Convert one numpy column to its flex type.

    Vector columns go through a flat flex array: flex's own numpy conversion of (n, 3) and (n, 6)
    arrays loops in Python (0.1-0.2 s per column of 50,000 rows), the flat route is a copy.
    """
    if type_name == "vec3_double":
        return flex.vec3_double(flex.double(np.ascontiguousarray(values, dtype=np.float64).ravel()))
    if type_name == "int6":
        return flex.int6(flex.int(np.ascontiguousarray(values, dtype=np.int32).ravel()))
    if type_name == "miller_index":
        return flex.miller_index(*(flex.int(np.ascontiguousarray(values[:, axis], dtype=np.int32)) for axis in range(3)))
    return getattr(flex, type_name)(np.ascontiguousarray(values))


def reflection_table(columns: dict, identifiers: Sequence[str]):
    """A ``flex.reflection_table`` of the columns, with the experiment-identifier map id -> identifier."""
    from dials.array_family import flex

    table = flex.reflection_table()
    for name, values in columns.items():
        table[name] = _to_flex(flex, COLUMN_TYPES[name], values)
    identifier_map = table.experiment_identifiers()
    for index, identifier in enumerate(identifiers):
        identifier_map[index] = str(identifier)
    return table


def write_shard(prefix: str | os.PathLike, shard: Shard, settings: SyntheticSettings) -> None:
    """Write ``P_integrated.expt``, ``P_integrated.refl`` and ``P_truth.npz``, each atomically.

    The truth file is written last, so its presence marks a finished shard.
    """
    prefix = str(prefix)
    with atomic_output(prefix + OUTPUT_SUFFIXES["integrated_experiments"], "w") as stream:
        json.dump(experiment_list_json(shard.lattices, settings), stream)
    with atomic_path(prefix + OUTPUT_SUFFIXES["integrated_reflections"]) as temporary:
        reflection_table(shard.columns, shard.lattices.identifier).as_file(str(temporary))
    lattices, predictions = shard.lattices, shard.predictions
    with atomic_output(prefix + TRUTH_SUFFIX, "wb") as stream:
        np.savez(stream, identifier=lattices.identifier, kind=lattices.kind, unit_cell=lattices.unit_cell,
                 true_matrix=lattices.true_matrix, recorded_matrix=lattices.recorded_matrix,
                 misorientation_deg=lattices.misorientation_deg, wavelength=lattices.wavelength,
                 scale=lattices.scale, b_factor=lattices.b_factor, rs=lattices.rs,
                 background_per_pixel=lattices.background_per_pixel,
                 reflection_lattice=predictions.lattice, reflection_truth_column=shard.truth_column,
                 reflection_partiality=shard.partiality.astype(np.float32),
                 reflection_expected_photons=shard.expected_photons.astype(np.float32))


def shard_prefix(directory: str | os.PathLike, shard_index: int) -> str:
    """The pipeline's shard prefix ``DIR/shard_NNNNN``."""
    return str(Path(directory) / f"shard_{shard_index:05d}")


def shard_sizes(n_lattices: int, lattices_per_shard: int) -> list[int]:
    """Lattices in each shard: full shards, then the remainder."""
    if n_lattices < 1 or lattices_per_shard < 1:
        raise SyntheticDataError(f"need at least one lattice and one per shard, got {n_lattices} and {lattices_per_shard}")
    full, remainder = divmod(n_lattices, lattices_per_shard)
    return [lattices_per_shard] * full + ([remainder] if remainder else [])


def generate_shard(directory: str | os.PathLike, shard_index: int, n_lattices: int, source: Source,
                   settings: SyntheticSettings, seed: int) -> str:
    """Simulate and write one shard; return its prefix."""
    prefix = shard_prefix(directory, shard_index)
    write_shard(prefix, simulate_shard(shard_index, n_lattices, source, settings, seed), settings)
    return prefix


def generation_record(n_lattices: int, lattices_per_shard: int, seed: int, settings: SyntheticSettings,
                      truth_source: str) -> dict:
    """What identifies a dataset: a directory is reused only when this matches."""
    return {"n_lattices": n_lattices, "lattices_per_shard": lattices_per_shard, "seed": seed,
            "truth_source": truth_source, "settings": settings.as_dict()}


def _shard_done(prefix: str) -> bool:
    return all(Path(prefix + suffix).is_file() for suffix in (
        OUTPUT_SUFFIXES["integrated_experiments"], OUTPUT_SUFFIXES["integrated_reflections"], TRUTH_SUFFIX))


_WORKER_STATE: dict = {}


def _init_worker(directory, source, settings, seed):
    _WORKER_STATE.update(directory=directory, source=source, settings=settings, seed=seed)


def _generate_in_worker(task: tuple[int, int]) -> str:
    shard_index, n_lattices = task
    state = _WORKER_STATE
    return generate_shard(state["directory"], shard_index, n_lattices, state["source"], state["settings"], state["seed"])


def generate_dataset(directory: str | os.PathLike, n_lattices: int, lattices_per_shard: int,
                     truth: TruthIntensities, settings: SyntheticSettings, seed: int,
                     truth_source: str = "", processes: int = 1) -> list[str]:
    """Generate (or finish, or reuse) a dataset directory; return its shard prefixes in order.

    ``generation.json`` records the parameters; a directory made with other parameters is refused.
    Shards already on disk are kept (each was written atomically), missing ones are generated with
    ``processes`` worker processes, then the ``complete`` marker is written (JSON: shard and lattice
    counts, and the shards generated by the run that completed the dataset, with its seconds).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = generation_record(n_lattices, lattices_per_shard, seed, settings, truth_source)
    record_path = directory / GENERATION_FILE
    if record_path.is_file():
        existing = json.loads(record_path.read_text())
        if existing != record:
            raise SyntheticDataError(f"{record_path}: directory holds a dataset generated with other parameters; "
                                     "use another directory")
    else:
        with atomic_output(record_path, "w") as stream:
            json.dump(record, stream, indent=1)
    sizes = shard_sizes(n_lattices, lattices_per_shard)
    prefixes = [shard_prefix(directory, index) for index in range(len(sizes))]
    if (directory / COMPLETE_MARKER).is_file():
        return prefixes
    save_truth_intensities(truth, directory / TRUTH_INTENSITIES)
    tasks = [(index, size) for index, size in enumerate(sizes) if not _shard_done(prefixes[index])]
    source = prepare_source(truth, settings, seed)
    start = time.perf_counter()

    def log_progress(done):
        elapsed = time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        LOGGER.info("synthetic shards: %d/%d done, %.2f shards/s, %.0f s left", done, len(tasks), rate,
                    (len(tasks) - done) / rate if rate > 0 else float("nan"))

    if processes > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes, _init_worker, (directory, source, settings, seed)) as pool:
            for done, _ in enumerate(pool.imap_unordered(_generate_in_worker, tasks), start=1):
                log_progress(done)
    else:
        for done, (index, size) in enumerate(tasks, start=1):
            generate_shard(directory, index, size, source, settings, seed)
            log_progress(done)
    with atomic_output(directory / COMPLETE_MARKER, "w") as stream:
        json.dump({"n_shards": len(sizes), "n_lattices": n_lattices, "shards_generated": len(tasks),
                   "seconds": time.perf_counter() - start, "processes": processes}, stream)
    return prefixes
