"""The detector from the pixels: a joint refinement of the level-0 detector with many lattices.

:func:`refine_detector` moves the whole panel (the beam centre along fast and slow, in pixels, and the
distance, in mm; a tiled detector as one rigid body, every panel by the same laboratory vector)
together with every lattice's own stage-1 parameters, against the shoebox pixels of
all the lattices at once. A single lattice cannot tell a shifted panel from a turned crystal; many
lattices in different orientations share one panel, which pins it down.

It runs in two steps:

1. every lattice is refined alone on the starting detector (:func:`~xfel_spread.stage1.refine.refine_shot`);
   those that do not converge are left out;
2. the detector is refined with every kept lattice's parameters (its last pass's space, from where step
   1 ended; ``detz_shift`` is the panel's here, so it is not a per-lattice parameter), minimising the
   sum of the lattices' NLLs, with gradients from torch autograd and the detector parameters scaled by
   :data:`DETECTOR_STEPS`, by one of two methods:

   - ``joint``: one L-BFGS-B over the three detector parameters and every lattice's parameters at once.
     Its curvature is that of a problem with thousands of parameters, and on 100 lattices it used up
     2000 iterations without meeting the tolerances.
   - ``profile``: L-BFGS-B over the three detector parameters alone, of the profile NLL: on each
     detector tried, every lattice is refined to its minimum (stage 1's tolerances, from the minima
     of the best detector so far), and the gradient is the summed partial derivative there. It
     converges in about ten outer iterations whatever the number of lattices.

With ``profile`` (and ``uncertainty``) the refined detector comes with two standard errors
(:func:`detector_uncertainty`), from the profile NLL's curvature at its minimum (forward differences of
its gradient, one more evaluation per detector parameter) and each lattice's part of its gradient:

- ``model``: the inverse curvature, right when the likelihood is (every pixel's noise as modelled,
  every lattice as the model draws it);
- ``robust``: the sandwich (M-estimation) form, inverse curvature x the scatter of the lattices'
  gradients x inverse curvature. It takes the lattices as independent but not as fitted exactly: a
  lattice whose own error (its mosaic domains, a misfit the Z-scores show) pulls the detector adds to
  the scatter. It needs at least two lattices, and many for a good estimate of itself.

The ``pixel_metrology`` rule (:mod:`xfel_spread.stage1.pixel_metrology`) calls it with the method of
``pixel_metrology.method``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import torch

from xfel_spread.progress import Progress
from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.sim.geometry import BEAM_DIRECTION, FAST_AXIS, SLOW_AXIS, Detector, MultiPanelDetector
from xfel_spread.stage1.model import PARAMETER_NAMES, Stage1Settings, refinement_passes
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.refine import FTOL, GTOL, ShotFit, ShotProblem, refine_shot
from xfel_spread.stage1.shot import ShotPixels

logger = logging.getLogger("xfel_spread.stage1")

#: One scaled unit of the detector parameters: beam-centre shifts along fast and slow (pixels) and
#: the distance shift (mm).
DETECTOR_STEPS = np.array([0.01, 0.01, 0.005])
#: Bounds of the detector parameters (pixels, pixels, mm).
DETECTOR_BOUNDS = ((-5.0, 5.0), (-5.0, 5.0), (-1.5, 1.5))
#: The joint method logs every this many evaluations (the profile method logs each of its few).
JOINT_LOG_EVERY = 100
#: The forward-difference step of the profile NLL's curvature, in scaled units (0.02 px, 0.01 mm).
HESSIAN_STEP = 2.0


@dataclass(frozen=True)
class MovedDetector(Detector):
    """A Detector whose ``beam_center_mm`` (two torch scalars) and ``distance_mm`` (a torch scalar)
    carry gradients: the forward model reads positions through ``origin_mm`` and the solid angle
    through ``distance_mm``."""

    @property
    def origin_mm(self) -> torch.Tensor:
        beam_x, beam_y = self.beam_center_mm
        return torch.stack((-beam_x, beam_y, -self.distance_mm))


def moved_detector(detector: Detector | MultiPanelDetector, shift: torch.Tensor) -> Detector | MultiPanelDetector:
    """``detector`` with its beam centre moved by ``shift[0:2]`` pixels (fast, slow) and its panel
    moved away from the sample by ``shift[2]`` mm, differentiable in ``shift``. A multi-panel detector
    moves rigidly, every panel by the same laboratory vector (:func:`level0_translation_mm`)."""
    if isinstance(detector, MultiPanelDetector):
        return detector.translated(level0_translation_mm(shift, detector.pixel_size_mm))
    pixel = detector.pixel_size_mm
    beam_x, beam_y = detector.beam_center_mm
    return MovedDetector(detector.n_fast, detector.n_slow, pixel, detector.distance_mm + shift[2],
                         (beam_x + shift[0] * pixel, beam_y + shift[1] * pixel),
                         detector.thickness_mm, detector.attenuation_length_mm)


def level0_translation_mm(shift, pixel_size_mm: float):
    """The laboratory vector (3,) that moves a detector as ``shift`` says: the direct beam ``shift[0:2]``
    pixels further along the laboratory fast and slow axes (the panels move the other way) and the
    detector ``shift[2]`` mm away from the sample (a torch vector keeps its gradient)."""
    shift = torch.as_tensor(shift, dtype=torch.float64)
    fast = torch.as_tensor(FAST_AXIS, dtype=shift.dtype, device=shift.device)
    slow = torch.as_tensor(SLOW_AXIS, dtype=shift.dtype, device=shift.device)
    beam = torch.as_tensor(BEAM_DIRECTION, dtype=shift.dtype, device=shift.device)
    return -pixel_size_mm * (shift[0] * fast + shift[1] * slow) + shift[2] * beam


@dataclass
class DetectorFit:
    """The outcome of :func:`refine_detector`."""

    #: Beam-centre shift (fast, slow; pixels) and distance shift (mm) of the refined panel.
    shift: np.ndarray
    converged: bool
    reason: str
    n_iterations: int
    n_evaluations: int
    nll_start: float  #: the kept lattices' summed NLL after step 1, on the starting detector
    nll_final: float
    #: Step 1's fit of every lattice (also those left out of step 2).
    single_fits: list[ShotFit]
    #: The lattices of step 2 (their positions in ``shots``) and their refined parameter values.
    kept: list[int] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    #: Standard errors of ``shift`` (fast px, slow px, distance mm; NaN where not refined) by
    #: :func:`detector_uncertainty`: ``model`` and ``robust``; None where not computed (``joint``,
    #: ``uncertainty`` off, a curvature that is not positive definite; ``robust`` from one lattice).
    sigma_model: np.ndarray | None = None
    sigma_robust: np.ndarray | None = None


def _lattice_nll(problem: ShotProblem, values: torch.Tensor, detector: Detector,
                 amplitudes: AmplitudeLookup) -> torch.Tensor:
    """One lattice's NLL (plus restraints) on ``detector``."""
    return problem.nll(values, problem.bragg(values, amplitudes, detector=detector))


#: How step 2 refines: ``profile`` (the detector alone, every lattice re-refined to its minimum at each
#: detector tried) or ``joint`` (one L-BFGS-B over the detector and every lattice together).
METHODS = ("profile", "joint")


def refine_detector(shots: list[ShotPixels], amplitudes: AmplitudeLookup, settings: Stage1Settings,
                    psf: DetectorPsf | None = None, refine_distance: bool = True,
                    max_iterations: int = 2000, method: str = "profile", uncertainty: bool = True) -> DetectorFit:
    """The level-0 detector refined jointly with the lattices of ``shots`` (see the module docstring).

    Every shot must share the starting detector. ``settings`` are stage 1's; its ``detz_shift`` group,
    if any, is dropped (the distance is the panel's here, refined when ``refine_distance``), and so are
    its free domains (each lattice is one crystal with stage 1's eta here).

    ``method`` ``joint`` minimises the summed NLL over the detector and every lattice's parameters at
    once; ``profile`` minimises over the detector alone the profile NLL, the sum over lattices of each
    lattice's minimum NLL on that detector (each lattice re-refined to stage 1's tolerances from its
    minimum on the best detector tried so far), whose gradient is the summed partial derivative at those minima (the
    lattices' own gradients vanish there). The profile problem has three parameters, whatever the
    number of lattices, so its quasi-Newton steps do not slow down with more lattices; each of its
    evaluations costs one short refinement per lattice. ``max_iterations`` bounds the outer
    iterations of either. ``uncertainty`` (``profile`` only) adds the standard errors (module
    docstring) at the cost of one more profile evaluation per detector parameter.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    started = time.perf_counter()
    detectors = {shot.detector for shot in shots}
    if len(detectors) != 1:
        raise ValueError("the lattices of a detector refinement must share one starting detector")
    start_detector = detectors.pop()
    if type(start_detector) is not Detector and not isinstance(start_detector, MultiPanelDetector):
        raise ValueError("the detector refinement moves a Detector or a MultiPanelDetector")
    if isinstance(start_detector, MultiPanelDetector):
        _ = start_detector.pixel_size_mm  # one pixel size for a shift in pixels (ValueError otherwise)
    settings = _detector_settings(settings)
    progress = Progress(len(shots), "pixel metrology, step 1 (each lattice alone)", logger.info, items="lattices")
    singles = []
    for shot in shots:
        singles.append(refine_shot(shot, amplitudes, settings, psf))
        progress.advance()
    progress.finish()
    kept = [index for index, fit in enumerate(singles) if fit.converged]
    if not kept:
        return DetectorFit(np.zeros(3), False, "no lattice converged on the starting detector", 0, 0,
                           float("nan"), float("nan"), singles, seconds=time.perf_counter() - started)
    device = amplitudes.intensity.device
    problems, spaces, starts = [], [], []
    for index in kept:
        problem = ShotProblem(shots[index], settings, device, psf)
        problem.set_start_from_model(amplitudes)
        space = refinement_passes(problem.space)[-1]
        problems.append(problem)
        spaces.append(space)
        starts.append(space.scaled(np.array([singles[index].final[name] for name in PARAMETER_NAMES])))
    n_detector = 3 if refine_distance else 2
    sizes = [space.n_refined for space in spaces]
    offsets = np.concatenate(([n_detector], n_detector + np.cumsum(sizes)))
    x0 = np.concatenate([np.zeros(n_detector), *starts])
    bounds = ([(low / step, high / step) for (low, high), step in zip(DETECTOR_BOUNDS, DETECTOR_STEPS)][:n_detector]
              + [bound for space in spaces for bound in space.scaled_bounds()])
    steps = torch.as_tensor(DETECTOR_STEPS[:n_detector], dtype=torch.float64, device=device)
    if method == "profile":
        return _profile_refinement(problems, spaces, starts, start_detector, amplitudes, steps, bounds[:n_detector],
                                   refine_distance, max_iterations, settings.max_iterations, singles, kept, started,
                                   uncertainty)
    counts = [0]

    def total(x: np.ndarray) -> tuple[float, np.ndarray]:
        counts[0] += 1
        leaf = torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True)
        detector = _detector_at(start_detector, leaf[:n_detector], steps, refine_distance)
        value = 0.0
        for problem, space, first, last in zip(problems, spaces, offsets[:-1], offsets[1:]):
            nll = _lattice_nll(problem, space.physical(leaf[first:last]), detector, amplitudes)
            nll.backward(retain_graph=True)
            value += float(nll.detach())
        gradient = leaf.grad.detach().cpu().numpy()
        if not (np.isfinite(value) and np.all(np.isfinite(gradient))):
            raise ArithmeticError(f"non-finite NLL or gradient at evaluation {counts[0]}")
        if counts[0] % JOINT_LOG_EVERY == 0:
            logger.info("pixel metrology, step 2 (joint): evaluation %d, NLL %.3f, %.0f s so far", counts[0], value,
                        time.perf_counter() - started)
        return value, gradient

    nll_start = total(x0)[0]
    result = scipy.optimize.minimize(total, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                     options={"maxiter": max_iterations, "ftol": FTOL, "gtol": GTOL})
    values = [space.values(result.x[first:last]) for space, first, last in zip(spaces, offsets[:-1], offsets[1:])]
    return _detector_fit(result, result.x[:n_detector], counts[0], nll_start, singles, kept, values, started)


def _detector_fit(result, detector_x: np.ndarray, n_evaluations: int, nll_start: float, singles, kept, values,
                  started: float) -> DetectorFit:
    """The DetectorFit of step 2's L-BFGS-B ``result`` whose scaled detector parameters are ``detector_x``."""
    shift = np.zeros(3)
    shift[:len(detector_x)] = detector_x * DETECTOR_STEPS[:len(detector_x)]
    message = result.message.decode() if isinstance(result.message, bytes) else str(result.message)
    return DetectorFit(shift, bool(result.success), "" if result.success else f"L-BFGS-B did not converge: {message}",
                       int(result.nit), n_evaluations, nll_start, float(result.fun), singles, kept, values,
                       time.perf_counter() - started)


def _detector_at(start_detector: Detector | MultiPanelDetector, leaf: torch.Tensor, steps: torch.Tensor,
                 refine_distance: bool) -> Detector | MultiPanelDetector:
    shift = leaf * steps
    if not refine_distance:
        shift = torch.cat((shift, torch.zeros(1, dtype=shift.dtype, device=shift.device)))
    return moved_detector(start_detector, shift)


def _profile_refinement(problems, spaces, starts, start_detector, amplitudes, steps, detector_bounds,
                        refine_distance, max_iterations, lattice_iterations, singles, kept, started,
                        uncertainty) -> DetectorFit:
    """Step 2 by the profile NLL (``method="profile"`` of :func:`refine_detector`)."""
    device = steps.device
    step_sizes = steps.detach().cpu().numpy()  # one scaled unit of each detector parameter
    # Each lattice's minimum on the last detector tried (scaled), and on the best one so far: every
    # evaluation starts the lattices from the best one's, so that a wild trial step of the line search
    # (a lattice pulled off its spots) does not carry over into later evaluations.
    current = [np.array(start, dtype=np.float64) for start in starts]
    anchor = {"value": np.inf, "states": [state.copy() for state in current]}
    counts = [0]

    def lattice_minimum(index: int, detector: Detector) -> None:
        problem, space = problems[index], spaces[index]

        def nll_and_gradient(x: np.ndarray) -> tuple[float, np.ndarray]:
            leaf = torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True)
            nll = _lattice_nll(problem, space.physical(leaf), detector, amplitudes)
            nll.backward()
            return float(nll.detach()), leaf.grad.detach().cpu().numpy()

        result = scipy.optimize.minimize(nll_and_gradient, anchor["states"][index], jac=True, method="L-BFGS-B",
                                         bounds=space.scaled_bounds(),
                                         options={"maxiter": lattice_iterations, "ftol": FTOL, "gtol": GTOL})
        current[index] = result.x

    last = [None]
    lattice_gradients = [None]  # each lattice's part of the last evaluation's gradient (n_lattices, n_detector)

    def profile(x: np.ndarray) -> tuple[float, np.ndarray]:
        counts[0] += 1
        last[0] = np.array(x, dtype=np.float64)
        with torch.no_grad():
            fixed = _detector_at(start_detector, torch.as_tensor(x, dtype=torch.float64, device=device), steps,
                                 refine_distance)
        for index in range(len(problems)):
            lattice_minimum(index, fixed)
        leaf = torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True)
        detector = _detector_at(start_detector, leaf, steps, refine_distance)
        value, parts = 0.0, []
        for problem, space, values in zip(problems, spaces, current):
            nll = _lattice_nll(problem, space.physical(torch.as_tensor(values, dtype=torch.float64, device=device)),
                               detector, amplitudes)
            # retain_graph: the detector's part of the graph is every lattice's
            parts.append(torch.autograd.grad(nll, leaf, retain_graph=True)[0].detach().cpu().numpy())
            value += float(nll.detach())
        lattice_gradients[0] = np.array(parts)
        gradient = lattice_gradients[0].sum(axis=0)
        if not (np.isfinite(value) and np.all(np.isfinite(gradient))):
            raise ArithmeticError(f"non-finite profile NLL or gradient at evaluation {counts[0]}")
        if value < anchor["value"]:
            anchor["value"], anchor["states"] = value, [state.copy() for state in current]
        shift = np.asarray(x) * step_sizes
        logger.info("pixel metrology, step 2: evaluation %d at shift %s, profile NLL %.3f, %.0f s so far", counts[0],
                    ", ".join(f"{part:+.4f}" for part in shift), value, time.perf_counter() - started)
        return value, gradient

    n_detector = len(detector_bounds)
    nll_start = profile(np.zeros(n_detector))[0]
    result = scipy.optimize.minimize(profile, np.zeros(n_detector), jac=True, method="L-BFGS-B", bounds=detector_bounds,
                                     options={"maxiter": max_iterations, "ftol": FTOL, "gtol": GTOL})
    if not np.array_equal(last[0], result.x):  # the lattices' minima belong to the last detector tried
        profile(result.x)
    values = [space.values(x) for space, x in zip(spaces, current)]
    fit = _detector_fit(result, result.x, counts[0], nll_start, singles, kept, values, started)
    if uncertainty:
        at_minimum = lattice_gradients[0]  # each lattice's pull at result.x, before the steps below replace it
        gradient_at_minimum = at_minimum.sum(axis=0)
        curvature = np.empty((n_detector, n_detector))
        for k, (_low, high) in enumerate(detector_bounds):
            step = HESSIAN_STEP if result.x[k] + HESSIAN_STEP <= high else -HESSIAN_STEP
            shifted = result.x.copy()
            shifted[k] += step
            curvature[k] = (profile(shifted)[1] - gradient_at_minimum) / step
        model, robust = detector_uncertainty((curvature + curvature.T) / 2, at_minimum)
        fit.sigma_model, fit.sigma_robust = (None if sigma is None else _padded(sigma * step_sizes) for sigma in (model, robust))
        logger.info("pixel metrology: standard errors (fast px, slow px[, distance mm]): model %s, robust %s",
                    fit.sigma_model, fit.sigma_robust)
        fit.n_evaluations, fit.seconds = counts[0], time.perf_counter() - started
    return fit


def detector_uncertainty(curvature: np.ndarray, lattice_gradients: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Standard errors (model, robust) of a minimum of a sum of lattice NLLs over a few parameters.

    ``curvature`` is the sum's second derivative (p, p) at the minimum, ``lattice_gradients`` (n, p)
    each lattice's first derivative there. ``model`` is sqrt(diag(H^-1)), the error if the NLL is the
    true likelihood. ``robust`` is sqrt(diag(H^-1 B H^-1)) with B = n / (n - 1) sum_i (g_i - mean g)
    (g_i - mean g)^T, the sandwich estimate that takes the scatter of the lattices' pulls as measured
    (for the mean of n numbers it is their sample standard deviation over sqrt(n), whatever the NLL's
    assumed noise). Either is None where H is not positive definite; ``robust`` is None below two
    lattices."""
    curvature = np.atleast_2d(np.asarray(curvature, dtype=np.float64))
    gradients = np.asarray(lattice_gradients, dtype=np.float64).reshape(-1, len(curvature))
    if not np.all(np.isfinite(curvature)) or np.any(np.linalg.eigvalsh(curvature) <= 0):
        return None, None
    inverse = np.linalg.inv(curvature)
    model = np.sqrt(np.diag(inverse))
    n = len(gradients)
    if n < 2:
        return model, None
    centred = gradients - gradients.mean(axis=0)
    scatter = centred.T @ centred * n / (n - 1)
    return model, np.sqrt(np.diag(inverse @ scatter @ inverse))


def _padded(sigma: np.ndarray) -> np.ndarray:
    """(fast, slow[, distance]) to three entries, NaN for a distance that was not refined."""
    return np.concatenate((sigma, np.full(3 - len(sigma), np.nan)))


def _detector_settings(settings: Stage1Settings) -> Stage1Settings:
    """Stage 1's settings for the detector's lattices: no distance shift of their own (the panel's is
    refined), and no free domains (``stage1.free_domains``): the joint refinement models each lattice as
    one crystal with stage 1's eta, so free domains refined in step 1 would cost several times its
    refinement and be dropped."""
    return dataclasses.replace(settings, refine=tuple(group for group in settings.refine if group != "detz_shift"),
                               free_domains=0)


