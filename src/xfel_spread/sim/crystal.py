"""Crystal orientation, unit cell and mosaic domains.

The crystal is described by its real-space matrix ``A`` whose rows are the cell vectors a, b, c
in the laboratory frame (Angstrom), so fractional Miller indices of a scattering vector s
(1/Angstrom) are ``h = A @ s`` and the reciprocal-lattice vector of integer ``hkl`` is
``inv(A) @ hkl``. This is dxtbx's ``Crystal(real_space_a, real_space_b, real_space_c)``.
"""

from __future__ import annotations

import math

import numpy as np


def orthogonalization_matrix(unit_cell) -> np.ndarray:
    """Cell vectors as rows in the PDB convention: a along x, b in the xy plane."""
    a, b, c, alpha, beta, gamma = unit_cell
    cos_alpha, cos_beta, cos_gamma = np.cos(np.radians([alpha, beta, gamma]))
    sin_gamma = np.sin(np.radians(gamma))
    c_x = c * cos_beta
    c_y = c * (cos_alpha - cos_beta * cos_gamma) / sin_gamma
    c_z = np.sqrt(c ** 2 - c_x ** 2 - c_y ** 2)
    return np.array([[a, 0.0, 0.0],
                     [b * cos_gamma, b * sin_gamma, 0.0],
                     [c_x, c_y, c_z]])


def unit_cell_from_matrix(real_space_matrix: np.ndarray) -> tuple[float, ...]:
    """(a, b, c, alpha, beta, gamma) of a real-space matrix with rows a, b, c."""
    a_vec, b_vec, c_vec = real_space_matrix
    lengths = [float(np.linalg.norm(v)) for v in (a_vec, b_vec, c_vec)]

    def angle(u, v):
        return float(np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))

    return (*lengths, angle(b_vec, c_vec), angle(a_vec, c_vec), angle(a_vec, b_vec))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (normalised Gaussian quaternion)."""
    w, x, y, z = rng.standard_normal(4)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def axis_angle_rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by ``angle_rad`` about the unit vector ``axis`` (Rodrigues' formula)."""
    x, y, z = axis
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle_rad) * cross + (1 - np.cos(angle_rad)) * cross @ cross


#: How the simulator draws the mosaic domains' rotation angles (``simulate.crystal.mosaic_model``).
MOSAIC_MODELS = ("gaussian", "nanobragg")


def mosaic_rotations(n_domains: int, spread_deg: float, rng: np.random.Generator,
                     model: str = "gaussian") -> np.ndarray:
    """Rotations of the mosaic domains, drawn as ``model`` says.

    ``gaussian`` (as the LY99 simulation drew them): each domain turns about an axis uniform on the
    sphere by an angle drawn from a normal distribution of standard deviation ``spread_deg`` (a
    sigma, not a FWHM). ``nanobragg``: :func:`nanobragg_mosaic_rotations`. With a spread of 0 every
    domain is the identity.
    """
    if model == "nanobragg":
        return nanobragg_mosaic_rotations(n_domains, spread_deg, rng)
    if model != "gaussian":
        raise ValueError(f"unknown mosaic model {model!r}; expected one of {', '.join(MOSAIC_MODELS)}")
    rotations = np.empty((n_domains, 3, 3))
    for domain in range(n_domains):
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        angle = rng.normal(0.0, np.radians(spread_deg))
        rotations[domain] = axis_angle_rotation(axis, angle)
    return rotations


def nanobragg_mosaic_rotations(n_domains: int, spread_deg: float, rng: np.random.Generator) -> np.ndarray:
    """Mosaic domains as nanoBragg draws them (``init_mosaicity`` and ``mosaic_rotation_umat`` of
    cctbx's simtbx/nanoBragg), with this generator's uniform deviates in place of its ``ran1``.

    Per domain three deviates r1, r2, r3 uniform on [-1, 1]: the axis is (sqrt(1 - r2^2) sin(pi r1),
    sqrt(1 - r2^2) cos(pi r1), r2), uniform on the sphere, and the angle is
    ``spread * (1 - r3^2)^(1/3)``: never above the spread and clustered near it (its cumulative
    distribution is 1 - sqrt(1 - (angle / spread)^3), its root-mean-square
    :data:`NANOBRAGG_RMS_FRACTION` of the spread). Domain 0 is the identity, as nanoBragg forces it
    after taking its three deviates.
    """
    return _nanobragg_rotations(rng.uniform(-1.0, 1.0, (n_domains, 3)), spread_deg)


def nanobragg_seeded_mosaic_rotations(n_domains: int, spread_deg: float, mosaic_seed: int) -> np.ndarray:
    """The mosaic domains the nanoBragg program itself drew with ``-mosaic_seed mosaic_seed``, in its
    own laboratory frame: :func:`nanobragg_mosaic_rotations` with the deviates of its ``ran1``
    (:class:`NanoBraggRan1`) seeded by ``-mosaic_seed``, three per domain, domain 0's taken and
    discarded. nanoBragg applies each to the cell vectors (``a_domain = U a``) before it sums the
    domains; turn them into another frame ``F`` by ``F U F^T``.
    """
    generator = NanoBraggRan1(-abs(int(mosaic_seed)))
    deviates = np.array([[2.0 * generator.next() - 1.0 for _ in range(3)] for _ in range(n_domains)])
    return _nanobragg_rotations(deviates, spread_deg)


#: nanoBragg's MOSFLM laboratory frame (beam along +x) to DIALS's (beam along -z): x_dials = z,
#: y_dials = y, z_dials = -x. A rotation U of nanoBragg's frame is ``F @ U @ F.T`` in DIALS's.
NANOBRAGG_MOSFLM_TO_DIALS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def nanobragg_seeded_domains_dials(n_domains: int, spread_deg: float, mosaic_seed: int) -> np.ndarray:
    """:func:`nanobragg_seeded_mosaic_rotations` in DIALS's laboratory frame (``F U F^T``, F
    :data:`NANOBRAGG_MOSFLM_TO_DIALS`): the domains of a nanoBragg image whose crystal is given in DIALS's
    frame, as the shared data's ``truth.json`` gives it."""
    frame = NANOBRAGG_MOSFLM_TO_DIALS
    return frame @ nanobragg_seeded_mosaic_rotations(n_domains, spread_deg, mosaic_seed) @ frame.T


def _nanobragg_rotations(deviates: np.ndarray, spread_deg: float) -> np.ndarray:
    """Rotations (D, 3, 3) from nanoBragg's three deviates on [-1, 1] per domain (rows of ``deviates``)."""
    rotations = np.empty((len(deviates), 3, 3))
    for domain, (r1, r2, r3) in enumerate(deviates):
        xy = np.sqrt(1.0 - r2 * r2)
        axis = np.array([xy * np.sin(np.pi * r1), xy * np.cos(np.pi * r1), r2])
        angle = np.radians(spread_deg) * (1.0 - r3 * r3) ** (1.0 / 3.0)
        rotations[domain] = np.eye(3) if domain == 0 else axis_angle_rotation(axis, angle)
    return rotations


class NanoBraggRan1:
    """The nanoBragg program's uniform generator ``ran1`` (Numerical Recipes' "ran1": Park and Miller's
    minimal standard generator x -> 16807 x mod (2^31 - 1) by Schrage's method, behind a Bays-Durham
    shuffle table of 32), so that the domains of its images can be drawn again from their seed.

    A seed <= 0 (nanoBragg negates the command line's) fills the table after eight warm-up steps; each
    deviate is single precision on (0, 1), never above 1 - 1.2e-7, as nanoBragg returns it.
    """

    MULTIPLIER, MODULUS, QUOTIENT, REMAINDER = 16807, 2147483647, 127773, 2836
    TABLE = 32
    DIVISOR = 1 + (MODULUS - 1) // TABLE
    LARGEST = 1.0 - 1.2e-7

    def __init__(self, seed: int):
        state = max(-int(seed), 1)
        table = [0] * self.TABLE
        for slot in range(self.TABLE + 7, -1, -1):
            state = self._step(state)
            if slot < self.TABLE:
                table[slot] = state
        self._state, self._table, self._last = state, table, table[0]

    @classmethod
    def _step(cls, state: int) -> int:
        """One step of the minimal standard generator, without overflow (Schrage)."""
        high = state // cls.QUOTIENT
        state = cls.MULTIPLIER * (state - high * cls.QUOTIENT) - cls.REMAINDER * high
        return state + cls.MODULUS if state < 0 else state

    def next(self) -> float:
        """The next deviate."""
        self._state = self._step(self._state)
        slot = self._last // self.DIVISOR
        self._last = self._table[slot]
        self._table[slot] = self._state
        value = float(np.float32((1.0 / self.MODULUS) * self._last))
        return float(np.float32(self.LARGEST)) if value > self.LARGEST else value


#: Root-mean-square angle of nanoBragg's draw over its spread: sqrt(E[(1 - u^2)^(2/3)]) for u uniform
#: on [-1, 1], i.e. sqrt(B(1/2, 5/3) / 2) = 0.8598.
NANOBRAGG_RMS_FRACTION = float(np.sqrt(0.5 * np.exp(math.lgamma(0.5) + math.lgamma(5 / 3) - math.lgamma(13 / 6))))


def domain_matrices(real_space_matrix: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Real-space matrices of the domains: each cell vector turned by the domain's rotation."""
    return np.einsum("dij,rj->dri", rotations, real_space_matrix)


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation nearest to a 3 x 3 matrix (the orthogonal factor of its polar decomposition)."""
    u, _, vt = np.linalg.svd(matrix)
    return u @ vt


def rms_rotation_deg(rotations: np.ndarray) -> float:
    """Root-mean-square rotation angle (degrees) of rotation matrices (D, 3, 3)."""
    cos_angle = np.clip((np.trace(rotations, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)
    return float(np.degrees(np.sqrt(np.mean(np.arccos(cos_angle) ** 2))))


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle (degrees) of a proper rotation matrix, to full precision at every angle.

    ``atan2(|skew part|, trace - 1)``: the arccos of (trace - 1) / 2 alone loses half the digits
    near 0 (about 1e-6 deg of rounding), which is the size of a good orientation's error here.
    """
    rotation = np.asarray(rotation, dtype=np.float64)
    skew = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0], rotation[1, 0] - rotation[0, 1]])
    return float(np.degrees(np.arctan2(np.linalg.norm(skew), np.trace(rotation) - 1.0)))


def misorientation_deg(matrix_a: np.ndarray, matrix_b: np.ndarray) -> float:
    """Angle of the rotation taking the orientation of ``matrix_b`` to that of ``matrix_a``.

    Both are real-space matrices (rows a, b, c) of the same cell setting; the cell shape is
    removed with a polar decomposition so that small cell differences do not count as rotation.
    """
    return rotation_angle_deg(nearest_rotation(matrix_a.T) @ nearest_rotation(matrix_b.T).T)


# --- many crystals at once (the synthetic lattices of xfel_spread.sim.lattices) ------------------------
# The batched forms below are not the per-matrix functions above applied in a loop: their numpy
# arithmetic differs from those in the last bit (about 1 in 2,000 cells, 1 in 15 rotations), and both
# the simulator's images and the synthetic lattices are kept bit for bit, so each keeps its own.

def orthogonalization_matrices(cells: np.ndarray) -> np.ndarray:
    """Cell vectors as rows (n, 3, 3) of cells (n, 6), in the PDB convention (a along x, b in the xy plane)."""
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


def reciprocal_metric(unit_cell) -> np.ndarray:
    """G* (3, 3) of a cell (a, b, c, alpha, beta, gamma), such that d*^2 = h . G* . h."""
    reciprocal = np.linalg.inv(orthogonalization_matrices(np.asarray([unit_cell], dtype=np.float64))[0])
    return reciprocal.T @ reciprocal


def d_spacings(miller_index: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """d = 1 / sqrt(h . G* . h) for each row of ``miller_index``, with ``metric`` from :func:`reciprocal_metric`."""
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
