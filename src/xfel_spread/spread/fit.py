"""The SPREAD minimiser: L-BFGS on the global f', f'' grids with the per-shot nuisance profiled out.

Objective (dimensionless)::

    NLL(pixels) + sum_sites [smooth(f') + smooth(f'') + KK(f', f''; reference)]

Global parameters are the grids (n_sites x n_grid each of f' and f'', electrons); nuisance are each
shot's scale G and each shoebox's background plane (b0, b1, b2). For every evaluation of the grids
the nuisance is brought to its optimum by Fisher-scoring (Gauss-Newton) steps, warm-started from the
previous evaluation: the model is linear in the nuisance for fixed Bragg photons, so a shot's block
is solved exactly by eliminating the 3 x 3 plane of each shoebox (Schur complement) and solving for
G. The gradient in the grids at the nuisance optimum is the profile likelihood's gradient (envelope
theorem), which scipy's L-BFGS-B minimises. Bragg photons are computed once per evaluation (one
sparse product), the nuisance steps reuse them.

Preconditioning: the grids are badly scaled for a plain L-BFGS (f'' near the edge is measured by
far more photons than f' at the grid's ends, the KK restraint couples every f' to every f'', and
the two sites' sums share reflections), which took 70-170 evaluations. With
``preconditioner_lattices`` > 0 the fit first takes the profiled Fisher information of the first
lattices at the start (:func:`xfel_spread.spread.information.profile_fisher`, scaled to all the
pixels) plus the restraints' exact Hessian, H = L L^T, and minimises over z with
theta = theta_start + L^-T z, in which the objective's Hessian is close to the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.information import profile_fisher
from xfel_spread.spread.likelihood import nll_derivatives, total_nll
from xfel_spread.spread.model import (
    Decomposition,
    SpreadData,
    expected_photons,
    intensities,
    unit_bragg,
)
from xfel_spread.spread.restraints import kk_penalty, smoothness_penalty
from xfel_spread.stage1.likelihood import pixel_nll


@dataclass
class Restraints:
    """Restraint weights and the KK reference (grid values, n_sites x n_grid, electrons)."""

    smoothness_weight: float
    kk_weight: float
    fp_reference: torch.Tensor
    fdp_reference: torch.Tensor
    hilbert: torch.Tensor

    def value(self, fp_grid: torch.Tensor, fdp_grid: torch.Tensor) -> torch.Tensor:
        """The restraints' total (dimensionless, added to the NLL)."""
        return (smoothness_penalty(fp_grid, self.smoothness_weight)
                + smoothness_penalty(fdp_grid, self.smoothness_weight)
                + kk_penalty(fp_grid, fdp_grid, self.fp_reference, self.fdp_reference, self.hilbert,
                             self.kk_weight))


@dataclass
class Nuisance:
    """Per-shot scale G (n_shots,) and per-shoebox background planes (R, 3), float64."""

    scale: torch.Tensor
    background: torch.Tensor


@dataclass
class SpreadProblem:
    """Everything the fit needs: data, structure-factor pieces, interpolation, restraints."""

    data: SpreadData
    decomposition: Decomposition
    interpolation: torch.Tensor  #: (n_channels, n_grid)
    restraints: Restraints

    @property
    def n_sites(self) -> int:
        return int(self.decomposition.site_re.shape[0])

    @property
    def n_grid(self) -> int:
        return int(self.interpolation.shape[1])

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grids (f', f'') of a flat parameter vector [f'.ravel(), f''.ravel()]."""
        half = self.n_sites * self.n_grid
        return theta[:half].reshape(self.n_sites, self.n_grid), theta[half:].reshape(self.n_sites, self.n_grid)

    def intensity(self, theta: torch.Tensor) -> torch.Tensor:
        fp, fdp = self.split(theta)
        return intensities(fp, fdp, self.interpolation, self.decomposition)

    def restraint_hessian(self, theta: np.ndarray) -> np.ndarray:
        """Hessian of the (quadratic) restraints in the flat grids."""
        def restraint(values):
            fp, fdp = self.split(values)
            return self.restraints.value(fp, fdp)

        return torch.autograd.functional.hessian(restraint, torch.as_tensor(theta, dtype=torch.float64)).numpy()

    def objective(self, theta: torch.Tensor, nuisance: Nuisance) -> torch.Tensor:
        """NLL + restraints at the given grids and nuisance."""
        fp, fdp = self.split(theta)
        mu = expected_photons(unit_bragg(self.intensity(theta), self.data), nuisance.scale,
                              nuisance.background, self.data)
        return total_nll(mu, self.data) + self.restraints.value(fp, fdp)


def _sum_by(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=values.dtype).index_add_(0, index, values)


def nuisance_direction(bragg: torch.Tensor, mu: torch.Tensor, data: SpreadData, damping: float = 1e-9) -> Nuisance:
    """The Newton step of every shot's G and shoebox planes for fixed Bragg photons per unit G, at
    expected photons ``mu``.

    The plane of each shoebox is eliminated first (3 x 3 Schur complement), then G of each shot.
    """
    gradient, weight = nll_derivatives(mu, data, observed=True)
    R, S = data.n_shoeboxes, data.n_shots
    box, shot_of_box, pixel_shot = data.shoebox, data.shot.long(), data.pixel_shot()
    design = (torch.ones_like(data.dx, dtype=bragg.dtype), data.dx.to(bragg.dtype), data.dy.to(bragg.dtype))
    h_bb = torch.empty(R, 3, 3, dtype=bragg.dtype)
    for i in range(3):
        for j in range(i, 3):
            h_bb[:, i, j] = h_bb[:, j, i] = _sum_by(box, weight * design[i] * design[j], R)
    diagonal = h_bb.diagonal(dim1=1, dim2=2).amax(1)
    h_bb = h_bb + damping * (1 + diagonal)[:, None, None] * torch.eye(3, dtype=bragg.dtype)
    # The derivative of mu in G is the Bragg photons per unit G.
    h_bg = torch.stack([_sum_by(box, weight * d * bragg, R) for d in design], dim=1)
    g_b = torch.stack([_sum_by(box, gradient * d, R) for d in design], dim=1)
    h_gg = _sum_by(pixel_shot, weight * bragg ** 2, S)
    g_g = _sum_by(pixel_shot, gradient * bragg, S)
    solved = torch.linalg.solve(h_bb, torch.stack([h_bg, g_b], dim=2))  # (R, 3, 2)
    reduced_h = h_gg - _sum_by(shot_of_box, (h_bg * solved[:, :, 0]).sum(1), S)
    reduced_g = g_g - _sum_by(shot_of_box, (h_bg * solved[:, :, 1]).sum(1), S)
    delta_g = -reduced_g / torch.clamp(reduced_h, min=1e-300)
    delta_b = -(solved[:, :, 1] + solved[:, :, 0] * delta_g[shot_of_box][:, None])
    return Nuisance(delta_g, delta_b)


def _shot_sums(mu: torch.Tensor, data: SpreadData) -> torch.Tensor:
    return _sum_by(data.pixel_shot(), pixel_nll(mu, data.data.to(mu.dtype), data.readout_var.to(mu.dtype)),
                   data.n_shots)


def nuisance_step(bragg: torch.Tensor, nuisance: Nuisance, data: SpreadData,
                  halvings: int = 3) -> tuple[Nuisance, float]:
    """One Newton step (:func:`nuisance_direction`), halved shot by shot until that shot's NLL does
    not rise (after ``halvings`` halvings the shot keeps its old values). Returns the new nuisance
    and the decrease of the total NLL. mu is linear in the nuisance, so every trial is
    ``mu0 + fraction * delta_mu``."""
    mu0 = expected_photons(bragg, nuisance.scale, nuisance.background, data)
    direction = nuisance_direction(bragg, mu0, data)
    delta_mu = expected_photons(bragg, direction.scale, direction.background, data)
    before = _shot_sums(mu0, data)
    slack = 1e-12 * torch.abs(before) + 1e-12
    fraction = torch.ones(data.n_shots, dtype=bragg.dtype)
    pixel_shot = data.pixel_shot()
    for _ in range(halvings + 1):
        after = _shot_sums(mu0 + fraction[pixel_shot] * delta_mu, data)
        worse = after > before + slack
        if not bool(worse.any()):
            break
        fraction = torch.where(worse, 0.5 * fraction, fraction)
    else:
        fraction = torch.where(worse, torch.zeros_like(fraction), fraction)
        after = torch.where(worse, before, after)
    shot = data.shot.long()
    return (Nuisance(nuisance.scale + fraction * direction.scale,
                     nuisance.background + fraction[shot][:, None] * direction.background),
            float((before - after).sum()))


def optimise_nuisance(bragg: torch.Tensor, nuisance: Nuisance, data: SpreadData, steps: int,
                      nll_tolerance: float = 1e-4) -> Nuisance:
    """Up to ``steps`` steps of :func:`nuisance_step`, stopping once a step lowers the NLL by less
    than ``nll_tolerance`` (absolute, or 1e-10 per pixel, whichever is larger)."""
    tolerance = max(nll_tolerance, 1e-10 * data.n_pixels)
    for _ in range(steps):
        nuisance, decrease = nuisance_step(bragg, nuisance, data)
        if decrease < tolerance:
            break
    return nuisance


def start_nuisance(data: SpreadData, dtype=torch.float64) -> Nuisance:
    """G = 1 for every shot and each shoebox's plane flat at its mean pixel value."""
    counts = _sum_by(data.shoebox, torch.ones(data.n_pixels, dtype=dtype), data.n_shoeboxes)
    mean = _sum_by(data.shoebox, data.data.to(dtype), data.n_shoeboxes) / torch.clamp(counts, min=1)
    background = torch.zeros(data.n_shoeboxes, 3, dtype=dtype)
    background[:, 0] = mean
    return Nuisance(torch.ones(data.n_shots, dtype=dtype), background)


@dataclass
class FitResult:
    """The refined grids (n_sites, n_grid, electrons), nuisance, objective and the optimiser's record."""

    fp: np.ndarray
    fdp: np.ndarray
    nuisance: Nuisance | None
    objective: float
    evaluations: int
    message: str
    history: list = field(default_factory=list)


def chunk_bounds(data: SpreadData, pixels_per_chunk: int) -> list[tuple[int, ...]]:
    """Whole-shot chunks of about ``pixels_per_chunk`` pixels: (p0, p1, b0, b1, s0, s1, t0, t1) ranges of
    pixels, shoeboxes, shots and terms. Pixels must be ordered by shoebox, shoeboxes by shot and terms
    by pixel (as :mod:`xfel_spread.spread.assemble` and :mod:`xfel_spread.spread.synthetic` make them)."""
    if data.n_pixels and not (bool((torch.diff(data.shoebox) >= 0).all()) and bool((torch.diff(data.shot) >= 0).all())
                              and bool((torch.diff(data.term_pixel) >= 0).all())):
        raise ValueError("SPREAD data must be ordered by shot, shoebox and pixel")
    pixel_shot = data.pixel_shot()
    shots = torch.arange(data.n_shots + 1, dtype=pixel_shot.dtype)
    shot_pixel_start = torch.searchsorted(pixel_shot, shots).tolist()
    shot_box_start = torch.searchsorted(data.shot.long(), shots).tolist()
    bounds, s0 = [], 0
    while s0 < data.n_shots:
        s1 = s0 + 1
        while s1 < data.n_shots and shot_pixel_start[s1 + 1] - shot_pixel_start[s0] <= pixels_per_chunk:
            s1 += 1
        p0, p1 = shot_pixel_start[s0], shot_pixel_start[s1]
        t0, t1 = torch.searchsorted(data.term_pixel, torch.tensor([p0, p1], dtype=data.term_pixel.dtype)).tolist()
        bounds.append((p0, p1, shot_box_start[s0], shot_box_start[s1], s0, s1, t0, t1))
        s0 = s1
    return bounds


def leading_bounds(data: SpreadData, n_shots: int) -> tuple[int, ...]:
    """The :func:`chunk_bounds` range of the first ``n_shots`` shots (ordered data)."""
    n_shots = min(n_shots, data.n_shots)
    p1 = int(torch.searchsorted(data.pixel_shot(), torch.tensor([n_shots]))[0])
    b1 = int(torch.searchsorted(data.shot.long(), torch.tensor([n_shots]))[0])
    t1 = int(torch.searchsorted(data.term_pixel, torch.tensor([p1], dtype=data.term_pixel.dtype))[0])
    return (0, p1, 0, b1, 0, n_shots, 0, t1)


def chunk_data(data: SpreadData, bounds: tuple[int, ...]) -> SpreadData:
    """The chunk's data with local pixel, shoebox and shot numbers (index arrays copied, the rest views)."""
    p0, p1, b0, b1, s0, s1, t0, t1 = bounds
    return SpreadData(data.data[p0:p1], data.shoebox[p0:p1] - b0, data.dx[p0:p1], data.dy[p0:p1],
                      data.readout_var[p0:p1], data.shot[b0:b1] - s0, data.term_pixel[t0:t1] - p0,
                      data.term_pair[t0:t1], data.term_coeff[t0:t1], s1 - s0)


class ProfiledNLL:
    """The NLL of one problem's pixels with its nuisance profiled out, as a function of the flat grids.

    ``nll(theta)`` returns the NLL at the nuisance optimum (warm-started from the previous call, which
    it keeps in ``nuisance``) and its gradient in the grids (profile likelihood, envelope theorem).
    The first call runs ``start_nuisance_steps`` nuisance steps, later ones ``nuisance_steps``. The
    pixels are visited in whole-shot chunks of about ``pixels_per_chunk`` (the objective is a sum over
    shots given the intensities): the chunk's temporaries bound the memory, and d NLL / d I
    accumulates over chunks before the one backward pass to the grids. An MPI rank runs one per shard
    it holds; :func:`fit` takes their sum through its ``nll`` argument.
    """

    def __init__(self, problem: SpreadProblem, nuisance: Nuisance | None = None, nuisance_steps: int = 3,
                 start_nuisance_steps: int = 30, pixels_per_chunk: int = 1 << 20):
        self.problem = problem
        start = nuisance if nuisance is not None else start_nuisance(problem.data)
        self.nuisance = Nuisance(start.scale.clone(), start.background.clone())
        self.nuisance_steps, self.start_nuisance_steps = nuisance_steps, start_nuisance_steps
        self.bounds = chunk_bounds(problem.data, pixels_per_chunk)
        self.first = True

    def __call__(self, theta_np: np.ndarray) -> tuple[float, np.ndarray]:
        problem, state = self.problem, self.nuisance
        theta = torch.tensor(theta_np, dtype=torch.float64, requires_grad=True)
        intensity = problem.intensity(theta)
        intensity_leaf = intensity.detach().requires_grad_(True)
        steps = self.start_nuisance_steps if self.first else self.nuisance_steps
        total = 0.0
        for bound in self.bounds:
            _, _, b0, b1, s0, s1, _, _ = bound
            chunk = chunk_data(problem.data, bound)
            bragg = unit_bragg(intensity_leaf, chunk)
            local = optimise_nuisance(bragg.detach(), Nuisance(state.scale[s0:s1], state.background[b0:b1]),
                                      chunk, steps)
            state.scale[s0:s1], state.background[b0:b1] = local.scale, local.background
            nll = total_nll(expected_photons(bragg, local.scale, local.background, chunk), chunk)
            nll.backward()
            total += float(nll.detach())
        self.first = False
        if intensity_leaf.grad is None:  # no pixels
            return total, np.zeros_like(np.asarray(theta_np, dtype=np.float64))
        (intensity * intensity_leaf.grad).sum().backward()
        return total, theta.grad.numpy().copy()

    def information(self, theta: np.ndarray, lattices: int) -> np.ndarray:
        """An estimate of the problem's profiled Fisher information in the grids (the fit's
        preconditioner): that of its first ``lattices`` shots at the current nuisance, times all its
        pixels over theirs."""
        problem = self.problem
        bounds = leading_bounds(problem.data, lattices)
        _, p1, _, b1, _, s1, _, _ = bounds
        if p1 == 0:
            return np.zeros((theta.size, theta.size))
        leading = SpreadProblem(chunk_data(problem.data, bounds), problem.decomposition, problem.interpolation,
                                problem.restraints)
        fisher = profile_fisher(leading, theta, Nuisance(self.nuisance.scale[:s1], self.nuisance.background[:b1]))
        return fisher * (problem.data.n_pixels / p1)


def preconditioner(information: np.ndarray, relative_floor: float = 1e-10) -> np.ndarray:
    """A lower-triangular L with L L^T = the symmetric part of ``information`` (the Cholesky factor;
    where that fails, of the matrix with its eigenvalues raised to ``relative_floor`` times the largest)."""
    symmetric = 0.5 * (information + information.T)
    try:
        return np.linalg.cholesky(symmetric)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(symmetric)
        values = np.maximum(values, relative_floor * max(float(values.max()), 1e-300))
        return np.linalg.cholesky((vectors * values) @ vectors.T)


def fit(problem: SpreadProblem, fp_start: np.ndarray, fdp_start: np.ndarray, nuisance: Nuisance | None = None,
        max_iterations: int = 200, nuisance_steps: int = 3, start_nuisance_steps: int = 30,
        tolerance: float = 1e-10, pixels_per_chunk: int = 1 << 20,
        nll: Callable[[np.ndarray], tuple[float, np.ndarray]] | None = None,
        preconditioner_lattices: int = 0) -> FitResult:
    """Minimise the profile objective over the grids from ``fp_start``, ``fdp_start`` (n_sites, n_grid).

    The NLL part is ``nll(theta) -> (value, gradient)``, by default :class:`ProfiledNLL` of the
    problem's pixels (with ``nuisance``, ``nuisance_steps``, ``start_nuisance_steps`` and
    ``pixels_per_chunk``); the driver of the stage passes the sum of its shards' NLLs over the MPI
    ranks instead (then ``problem`` only gives the grids' shape and the restraints). Stops after
    ``max_iterations`` L-BFGS iterations or when the relative objective change falls below
    ``tolerance``. The result's nuisance is the default NLL's (None with a given ``nll``).

    With ``preconditioner_lattices`` > 0 the grids are preconditioned (module docstring) by the
    information ``nll.information(theta, preconditioner_lattices)`` estimates after the first
    evaluation at the start; an ``nll`` without that method is not preconditioned. The first
    evaluation is counted once.
    """
    from scipy.linalg import solve_triangular
    from scipy.optimize import minimize

    if nll is None:
        data = problem.data
        if data.n_shots == 0 or data.n_pixels == 0:
            raise SpreadInputError("no converged lattices to refine: the stage-1 results hold no usable shot")
        nll = ProfiledNLL(problem, nuisance, nuisance_steps, start_nuisance_steps, pixels_per_chunk)
    options = {"maxiter": max_iterations, "ftol": tolerance, "gtol": 1e-8, "maxcor": 20}
    theta0 = np.concatenate([np.ravel(fp_start), np.ravel(fdp_start)]).astype(np.float64)
    history = []

    def evaluate(theta_np):
        value, gradient = nll(theta_np)
        theta = torch.tensor(theta_np, dtype=torch.float64, requires_grad=True)
        fp, fdp = problem.split(theta)
        restraint = problem.restraints.value(fp, fdp)
        restraint.backward()
        value = value + float(restraint.detach())
        history.append(value)
        return value, gradient + theta.grad.numpy()

    information = getattr(nll, "information", None)
    if preconditioner_lattices > 0 and information is not None:
        first = evaluate(theta0)  # brings the nuisance to its optimum at the start
        factor = preconditioner(information(theta0, preconditioner_lattices) + problem.restraint_hessian(theta0))

        def to_theta(z):
            return theta0 + solve_triangular(factor, z, trans="T", lower=True)

        def evaluate_z(z):
            if not np.any(z):
                value, gradient = first
            else:
                value, gradient = evaluate(to_theta(z))
            return value, solve_triangular(factor, gradient, lower=True)

        result = minimize(evaluate_z, np.zeros_like(theta0), jac=True, method="L-BFGS-B", options=options)
        theta_best = to_theta(result.x)
    else:
        result = minimize(evaluate, theta0, jac=True, method="L-BFGS-B", options=options)
        theta_best = result.x
    fp, fdp = problem.split(torch.as_tensor(theta_best))
    return FitResult(fp=fp.numpy().copy(), fdp=fdp.numpy().copy(),
                     nuisance=getattr(nll, "nuisance", None) if isinstance(nll, ProfiledNLL) else None,
                     objective=float(result.fun), evaluations=len(history), message=str(result.message),
                     history=history)
