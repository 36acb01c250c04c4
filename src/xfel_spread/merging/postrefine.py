"""Per-lattice scaling and "rs" post-refinement, fitted for all lattices at once.

The model is cctbx.xfel.merge's ``postrefinement.algorithm=rs`` (``postrefine/postrefinement_rs.py``).
An observation of index h on a lattice with reciprocal orientation A in a beam s0 is predicted as

    I_obs = G * exp(-2 B d*^2) * P * I_ref,    P = RS^2 / (2 Rh^2 + RS^2),
    Rh = |R(theta_x, theta_y) A h + s0| - |s0|,    R = R_y(theta_y) R_x(theta_x),

with Rh the excitation error (distance of the reciprocal-lattice point from the Ewald sphere) and RS
the reciprocal-space radius of the spot. B is in upstream's convention (exp(-2 B d*^2), a quarter of
the usual crystallographic B). The five parameters (G, B, RS, theta_x, theta_y) start as upstream
starts them (G the slope of a straight-line fit of I_obs on I_ref, B 0, RS the rms Rh of the
observations, no rotation) and minimise the unit-weight sum of squared residuals, as upstream's
target does; upstream's phil default holds RS at its starting value, here it is refined.

Instead of upstream's per-lattice LBFGS with finite-difference gradients, every lattice is fitted at
once by Levenberg-Marquardt: analytic Jacobians for all observations, per-lattice 5x5 normal
equations accumulated with ``np.bincount`` and solved as one stacked ``np.linalg.solve``. Each
lattice's damping and convergence are its own, so a lattice's result does not depend, to the bit,
on which other lattices share the batch (or the MPI rank). Converged lattices leave the batch.

After the fit, observations with partiality above 0.2 are kept and divided by G exp(-2 B d*^2) P
(sigmas likewise); a lattice with fewer than three such "near-full" observations, a scale that is
not positive, |B| >= 150 or a fit that diverged is rejected with the reason below, and so is one
whose B or rotations are far out among all lattices' (:func:`parameter_outliers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Why post-refinement rejected a lattice (the lattice table's ``reason`` column).
DIVERGED = "postrefinement_diverged"  # parameters or residuals became non-finite
B_OUT_OF_RANGE = "b_factor_out_of_range"  # |B| reached upstream's limit
NON_POSITIVE_SCALE = "non_positive_scale"  # G <= 0: the lattice does not scale to the reference
FEW_NEAR_FULL = "few_near_full"  # fewer than MIN_NEAR_FULL observations with partiality > NEAR_FULL
B_OUTLIER = "b_factor_outlier"  # B far outside the distribution of all fitted lattices
ROTATION_OUTLIER = "rotation_outlier"  # a rotation far outside the distribution of all fitted lattices

#: Upstream's limits: B must stay within (-150, 150); observations with partiality above 0.2 are
#: merged; a lattice needs at least three of them.
B_LIMIT = 150.0
NEAR_FULL = 0.2
MIN_NEAR_FULL = 3
#: A fitted B or rotation more than this many robust standard deviations (1.4826 median absolute
#: deviations) from the median over all fitted lattices marks a fit that went astray. The unit-weight
#: target has poor local minima (large B and G that fit the strong low-resolution spots, or rotations
#: far beyond any indexing error); their scaled intensities are off by orders of magnitude and would
#: swamp the unweighted means of the ev11 error model. Not an upstream filter: on 10,000 synthetic
#: LY99-like lattices it rejects 2.6 % of them, and without it the ev11 merge correlates with the truth
#: not at all (CC 0.00 against 0.994 with it).
OUTLIER_ROBUST_SIGMAS = 5.0
#: Fewer fitted lattices than this say too little about the population's spread (four lattices can
#: have a median absolute deviation of almost nothing), so no lattice is called an outlier.
MIN_OUTLIER_POPULATION = 20
#: Levenberg-Marquardt control: initial damping, relative decrease of the residual sum of squares
#: below which a lattice has converged (upstream's LBFGS stops at a relative drop of 1e-5 too),
#: damping beyond which no step is tried any more.
INITIAL_DAMPING = 1e-3
RELATIVE_TOLERANCE = 1e-5
MAX_DAMPING = 1e8
MAX_ITERATIONS = 100
#: The batch is cut down to the unconverged lattices once they are fewer than this fraction of it.
COMPACT_FRACTION = 0.8


@dataclass
class ScalingProblem:
    """Observations of the lattices to fit, sorted by lattice (numbered 0..n_lattices-1).

    Vectors are stored as C-contiguous (3, n) arrays so that each component is contiguous.
    """

    lattice: np.ndarray  #: int64 lattice of each observation
    q0: np.ndarray  #: (3, n) A h of each observation (1/Angstrom), before the refined rotation
    s0: np.ndarray  #: (3, n) the observation's lattice's beam vector
    d_star_sq: np.ndarray  #: 1/d^2 in the lattice's own cell
    reference: np.ndarray  #: reference intensity
    observed: np.ndarray  #: observed intensity

    @classmethod
    def build(cls, lattice: np.ndarray, a_matrix: np.ndarray, s0: np.ndarray, hkl: np.ndarray, d: np.ndarray,
              reference: np.ndarray, observed: np.ndarray) -> ScalingProblem:
        """From per-lattice A matrices ((m, 3, 3)) and beams ((m, 3)), and per-observation indices."""
        return cls(lattice, reciprocal_vectors(a_matrix, lattice, hkl), np.ascontiguousarray(s0[lattice].T),
                   1.0 / (d * d), reference, observed)

    def select_lattices(self, lattices: np.ndarray, n_lattices: int) -> ScalingProblem:
        """The observations of ``lattices`` (sorted), renumbered 0..len(lattices)-1."""
        renumber = np.full(n_lattices, -1, np.int64)
        renumber[lattices] = np.arange(len(lattices))
        new_lattice = renumber[self.lattice]
        keep = new_lattice >= 0
        return ScalingProblem(new_lattice[keep], np.ascontiguousarray(self.q0[:, keep]),
                              np.ascontiguousarray(self.s0[:, keep]), self.d_star_sq[keep], self.reference[keep],
                              self.observed[keep])


    def select_observations(self, selection: np.ndarray) -> ScalingProblem:
        """The selected observations (a boolean mask), lattices numbered as before."""
        return ScalingProblem(self.lattice[selection], np.ascontiguousarray(self.q0[:, selection]),
                              np.ascontiguousarray(self.s0[:, selection]), self.d_star_sq[selection],
                              self.reference[selection], self.observed[selection])


def reciprocal_vectors(a_matrix: np.ndarray, lattice: np.ndarray, hkl: np.ndarray) -> np.ndarray:
    """(3, n) A h for each observation, A the (m, 3, 3) orientation of its lattice."""
    hkl = hkl.astype(float)
    return np.stack([sum(a_matrix[:, row, column][lattice] * hkl[:, column] for column in range(3))
                     for row in range(3)])


def _length(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y + z * z)


def _rotated(problem: ScalingProblem, theta_x: np.ndarray, theta_y: np.ndarray):
    """Components of R_y(theta_y) R_x(theta_x) q0 (angles per lattice), and the per-observation cos/sin of theta_y."""
    lattice = problem.lattice
    # Contiguous copies: numpy 1.24 evaluates sin and cos of strided float64 arrays by another
    # algorithm whose last bit varies from call to call, which would break rank-count independence.
    theta_x, theta_y = np.ascontiguousarray(theta_x), np.ascontiguousarray(theta_y)
    cos_x, sin_x = np.cos(theta_x)[lattice], np.sin(theta_x)[lattice]
    cos_y, sin_y = np.cos(theta_y)[lattice], np.sin(theta_y)[lattice]
    x0, y0, z0 = problem.q0
    z_x = sin_x * y0 + cos_x * z0
    return (cos_y * x0 + sin_y * z_x, cos_x * y0 - sin_x * z0, cos_y * z_x - sin_y * x0), cos_y, sin_y


def excitation_error(problem: ScalingProblem, theta_x: np.ndarray, theta_y: np.ndarray) -> np.ndarray:
    """Rh = |R q0 + s0| - |s0| of each observation: signed distance from the Ewald sphere."""
    (qx, qy, qz), _, _ = _rotated(problem, theta_x, theta_y)
    s0x, s0y, s0z = problem.s0
    return _length(qx + s0x, qy + s0y, qz + s0z) - _length(s0x, s0y, s0z)


def rs_partiality(rh: np.ndarray, rs: np.ndarray) -> np.ndarray:
    """Partiality of the rs model: RS^2 / (2 Rh^2 + RS^2)."""
    return rs * rs / (2.0 * rh * rh + rs * rs)


def initial_parameters(problem: ScalingProblem, n_lattices: int) -> np.ndarray:
    """Upstream's starting point (n, 5): G from a straight-line fit, B 0, RS the rms Rh, no rotation."""
    def sums(values):
        return np.bincount(problem.lattice, weights=values, minlength=n_lattices)

    x, y = problem.reference, problem.observed
    n = np.bincount(problem.lattice, minlength=n_lattices).astype(float)
    sum_x, sum_y = sums(x), sums(y)
    no_rotation = np.zeros(n_lattices)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (n * sums(x * y) - sum_x * sum_y) / (n * sums(x * x) - sum_x ** 2)
        rh = excitation_error(problem, no_rotation, no_rotation)
        rs = np.sqrt(sums(rh * rh) / n)
    parameters = np.zeros((n_lattices, 5))
    parameters[:, 0], parameters[:, 2] = slope, rs
    return parameters


def _residuals_and_jacobian(problem: ScalingProblem, parameters: np.ndarray):
    """Residuals (model - observed) and the five Jacobian columns, for per-lattice ``parameters``."""
    lattice = problem.lattice
    scale, b_factor, rs = parameters[:, 0][lattice], parameters[:, 1][lattice], parameters[:, 2][lattice]
    (qx, qy, qz), cos_y, sin_y = _rotated(problem, parameters[:, 3], parameters[:, 4])
    s0x, s0y, s0z = problem.s0
    s1x, s1y, s1z = qx + s0x, qy + s0y, qz + s0z
    s1_length = _length(s1x, s1y, s1z)
    rh = s1_length - _length(s0x, s0y, s0z)
    rs_sq = rs * rs
    denominator = 2.0 * rh * rh + rs_sq
    partiality = rs_sq / denominator
    unscaled = np.exp(-2.0 * b_factor * problem.d_star_sq)
    unscaled *= problem.reference  # exp(-2 B d*^2) I_ref
    scaled = scale * unscaled
    model = scaled * partiality
    denominator_sq = denominator * denominator
    # d model / d Rh, divided by |s1| to turn the rotated q's derivatives into dRh/dtheta = s1/|s1| . dq/dtheta.
    along_s1 = scaled * (-4.0) * rs_sq * rh / (denominator_sq * s1_length)
    # The rotation about y turns q about y: dq = y x q = (qz, 0, -qx). The one about x turns it about
    # R_y x = (cos_y, 0, -sin_y): dq = (sin_y qy, -sin_y qx - cos_y qz, cos_y qy).
    d_theta_x = along_s1 * (s1x * sin_y * qy - s1y * (sin_y * qx + cos_y * qz) + s1z * cos_y * qy)
    d_theta_y = along_s1 * (s1x * qz - s1z * qx)
    jacobian = (unscaled * partiality, -2.0 * problem.d_star_sq * model, scaled * 4.0 * rs * rh * rh / denominator_sq,
                d_theta_x, d_theta_y)
    model -= problem.observed
    return model, jacobian


def _normal_equations(problem: ScalingProblem, parameters: np.ndarray, n_lattices: int):
    """Per-lattice (sum of squared residuals, 5x5 J^T J, J^T r)."""
    residuals, jacobian = _residuals_and_jacobian(problem, parameters)

    def sums(values):
        return np.bincount(problem.lattice, weights=values, minlength=n_lattices)

    normal = np.empty((n_lattices, 5, 5))
    for row in range(5):
        for column in range(row, 5):
            normal[:, row, column] = normal[:, column, row] = sums(jacobian[row] * jacobian[column])
    gradient = np.stack([sums(jacobian[row] * residuals) for row in range(5)], axis=1)
    return sums(residuals * residuals), normal, gradient


def _damped_steps(normal: np.ndarray, gradient: np.ndarray, damping: np.ndarray) -> np.ndarray:
    """Levenberg-Marquardt steps solving (N + damping diag(N)) step = -g for each lattice."""
    diagonal = np.diagonal(normal, axis1=1, axis2=2)
    # A parameter the data do not constrain (a zero column) gets a tiny diagonal so the system stays solvable.
    floor = 1e-12 * diagonal.max(axis=1, keepdims=True) + np.finfo(float).tiny
    matrix = normal + (damping[:, None] * np.maximum(diagonal, floor) + floor)[:, :, None] * np.eye(5)
    return np.linalg.solve(matrix, -gradient[:, :, None])[:, :, 0]


def refine_rs(problem: ScalingProblem, initial: np.ndarray, max_iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """Least-squares (G, B, RS, theta_x, theta_y) of every lattice, from ``initial`` ((n, 5)).

    Lattices whose start or fit is not finite come back with NaN parameters.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # wild trial steps are rejected below
        return _levenberg_marquardt(problem, initial, max_iterations)


def _levenberg_marquardt(problem: ScalingProblem, initial: np.ndarray, max_iterations: int) -> np.ndarray:
    """Damped Gauss-Newton iterations, each lattice with its own damping and convergence."""
    n_lattices = len(initial)
    parameters = initial.copy()
    ssr, normal, gradient = _normal_equations(problem, parameters, n_lattices)
    broken = ~(np.isfinite(ssr) & np.all(np.isfinite(parameters), axis=1))
    done = broken.copy()
    damping = np.full(n_lattices, INITIAL_DAMPING)
    batch, batch_lattices = problem, np.arange(n_lattices)
    for _ in range(max_iterations):
        if done.all():
            break
        if (~done).sum() < COMPACT_FRACTION * len(batch_lattices):
            batch_lattices = np.flatnonzero(~done)
            batch = problem.select_lattices(batch_lattices, n_lattices)
        working = ~done[batch_lattices]
        fitting = batch_lattices[working]
        trial = parameters[batch_lattices].copy()
        trial[working] += _damped_steps(normal[fitting], gradient[fitting], damping[fitting])
        trial_ssr, trial_normal, trial_gradient = _normal_equations(batch, trial, len(batch_lattices))
        trial_ssr, trial_normal, trial_gradient = trial_ssr[working], trial_normal[working], trial_gradient[working]

        better = np.isfinite(trial_ssr) & (trial_ssr < ssr[fitting])
        improved = fitting[better]
        converged = improved[ssr[improved] - trial_ssr[better] <= RELATIVE_TOLERANCE * ssr[improved]]
        parameters[improved] = trial[working][better]
        ssr[improved], normal[improved], gradient[improved] = trial_ssr[better], trial_normal[better], \
            trial_gradient[better]
        damping[improved] = np.maximum(damping[improved] / 10.0, 1e-12)
        worse = fitting[~better]
        damping[worse] *= 10.0
        done[converged] = True
        done[worse[damping[worse] > MAX_DAMPING]] = True
    if not done.all():
        log.info("post-refinement: %d lattices still moving after %d iterations (kept as they are)",
                 int((~done).sum()), max_iterations)
    parameters[broken] = np.nan
    parameters[:, 2] = np.abs(parameters[:, 2])  # only RS^2 enters the model
    return parameters


def rs_scale_factors(problem: ScalingProblem, parameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G exp(-2 B d*^2) P, P) of every observation under its lattice's parameters."""
    lattice = problem.lattice
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged lattice's factors are not used
        rh = excitation_error(problem, parameters[:, 3], parameters[:, 4])
        partiality = rs_partiality(rh, parameters[:, 2][lattice])
        attenuation = np.exp(-2.0 * parameters[:, 1][lattice] * problem.d_star_sq)
        return parameters[:, 0][lattice] * attenuation * partiality, partiality


def rs_failures(parameters: np.ndarray, lattice: np.ndarray, partiality: np.ndarray) -> np.ndarray:
    """Rejection reason per lattice after the rs fit ("" for an accepted lattice)."""
    n_lattices = len(parameters)
    near_full = np.bincount(lattice, weights=(partiality > NEAR_FULL).astype(float), minlength=n_lattices)
    reason = np.full(n_lattices, "", dtype=object)
    reason[near_full < MIN_NEAR_FULL] = FEW_NEAR_FULL
    reason[parameters[:, 0] <= 0] = NON_POSITIVE_SCALE
    reason[np.abs(parameters[:, 1]) >= B_LIMIT] = B_OUT_OF_RANGE
    reason[~np.all(np.isfinite(parameters), axis=1)] = DIVERGED
    return reason


def scale_only(lattice: np.ndarray, observed: np.ndarray, reference: np.ndarray, n_lattices: int) -> np.ndarray:
    """G per lattice of the scale-only model I_obs = G I_ref (upstream's "mark0" scaling).

    Upstream multiplies observations by sum(I_obs I_ref) / sum(I_obs^2), the least-squares slope of
    I_ref on I_obs; G is its inverse. G is NaN or not positive where the lattice cannot be scaled.
    """
    cross = np.bincount(lattice, weights=observed * reference, minlength=n_lattices)
    square = np.bincount(lattice, weights=observed * observed, minlength=n_lattices)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cross > 0, square / cross, np.nan)


def lattice_mean_intensity(lattice: np.ndarray, observed: np.ndarray, n_lattices: int) -> np.ndarray:
    """Mean observed intensity of each lattice (NaN for one without observations).

    The scale of a model-free merge's first pass (no reference to fit against, cctbx.xfel.merge's
    "mark1" spirit): lattices are brought to one scale by their mean intensities, which differ from
    lattice to lattice mainly by the scale (and much less by the mean partiality and resolution
    range of the reflections each still happens to record).
    """
    total = np.bincount(lattice, weights=observed, minlength=n_lattices)
    count = np.bincount(lattice, minlength=n_lattices)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def parameter_outliers(parameters: np.ndarray) -> np.ndarray:
    """Rejection reason ("" if none) of each fitted lattice from its place among all of them ((n, 5)).

    None below MIN_OUTLIER_POPULATION lattices.
    """
    reason = np.full(len(parameters), "", dtype=object)
    if len(parameters) < MIN_OUTLIER_POPULATION:
        return reason
    rotated_far = (robust_outliers(parameters[:, 3], OUTLIER_ROBUST_SIGMAS)
                   | robust_outliers(parameters[:, 4], OUTLIER_ROBUST_SIGMAS))
    reason[rotated_far] = ROTATION_OUTLIER
    reason[robust_outliers(parameters[:, 1], OUTLIER_ROBUST_SIGMAS)] = B_OUTLIER
    return reason


def robust_outliers(values: np.ndarray, limit: float) -> np.ndarray:
    """Values more than ``limit`` robust standard deviations (1.4826 MAD) from their median."""
    if len(values) == 0:
        return np.zeros(0, bool)
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    return np.abs(values - median) > limit * spread
