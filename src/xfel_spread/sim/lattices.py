"""Synthetic integrated lattices for the merging benchmark: the physics behind them.

What a lattice is, what the predictor keeps and what summation integration reports; the files are
written by :mod:`xfel_spread.io.synthetic_lattices`, a dataset directory by
:mod:`xfel_spread.sim.lattice_dataset`.

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

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from xfel_spread.io.synthetic_lattices import (
    FLAG_INTEGRATED_SUM,
    FLAG_PREDICTED,
    FLAGS_FOUND_SPOT,
    DetectorModel,
    SyntheticDataError,
    TruthIntensities,
)
from xfel_spread.sim.crystal import (
    d_spacings,
    orthogonalization_matrices,
    reciprocal_metric,
    small_rotations,
    uniform_rotations,
)
from xfel_spread.sim.spectrum import FWHM_TO_SIGMA
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, ChannelAmplitudes, true_intensities

#: Lattice kinds recorded in the truth files.
KIND_NORMAL, KIND_OFF_CLUSTER, KIND_UNRELATED = 0, 1, 2


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

    def detector_model(self) -> DetectorModel:
        """The shared panel, polarization and space group that the .expt files record."""
        return DetectorModel(distance_mm=self.distance_mm, pixel_size_mm=self.pixel_size_mm, n_pixels=self.n_pixels,
                             beam_center_mm=self.beam_center_mm, polarization_normal=self.polarization_normal,
                             space_group_hall=self.space_group_hall)


# --- truth -----------------------------------------------------------------------------------------

def spectrum_weights(energies_ev: np.ndarray, centre_ev: float, fwhm_ev: float) -> np.ndarray:
    """Weights of the channels under a Gaussian spectrum envelope, summing to 1."""
    sigma = fwhm_ev * FWHM_TO_SIGMA
    weights = np.exp(-0.5 * ((np.asarray(energies_ev, dtype=np.float64) - centre_ev) / sigma) ** 2)
    return weights / weights.sum()


def truth_intensities(amplitudes: ChannelAmplitudes, weights: np.ndarray) -> TruthIntensities:
    """``I(h) = sum_k w_k |F_k(h)|^2``: what a shot of the mean spectrum measures."""
    indices, intensity = true_intensities(amplitudes, weights)
    return TruthIntensities(unit_cell=tuple(float(v) for v in amplitudes.unit_cell),
                            space_group=amplitudes.space_group,
                            miller_index=np.asarray(indices, dtype=np.int32), intensity=intensity)


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
