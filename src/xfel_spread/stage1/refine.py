"""Per-shot refinement of the crystal against its shoebox pixels (stage 8).

For one shot, :func:`refine_shot`:

1. checks the pixels and the start crystal (:class:`ShotProblem`);
2. evaluates the Bragg photons of the start model on every shoebox pixel (scale 1; spread by the
   detector's point spread where one is given, :mod:`xfel_spread.stage1.psf`) and takes the
   start G from ``initial.G`` or, when that is null, by least squares on the shoebox sums
   (:func:`xfel_spread.stage1.likelihood.closed_form_scale`);
3. minimises the negative log-likelihood (plus optional restraints) over the scaled refined
   parameters with scipy's L-BFGS-B, whose bounds are the parameters' bounds, with gradients from
   torch autograd through the forward model in float64; spot positions first, then everything
   (:func:`xfel_spread.stage1.model.refinement_passes`); a shot that loses its spots (G at a bound,
   or no Bragg photons left in the shoeboxes) starts again, once, with broad spots
   (:func:`restart_with_broad_spots`); with ``stage1.broad_start: always`` every other shot is
   refined from the broad-spot start too and the end of lower NLL kept (:func:`better_start`);
4. with ``stage1.free_domains`` on, refines the crystal again as that many mosaic domains of free
   rotation vectors (:func:`refine_free_domains`), which decides convergence;
5. evaluates the refined model on every shoebox pixel and reports, before and after, the
   model-predicted spot centroids, their RMSD against the observed ones (overall and radial; over
   every ROI and over the strong spots alone), the NLL and the Z-scores' standard deviation
   (:class:`ShotFit`).

A shot never raises: bad pixels, a start crystal the parameterisation cannot describe, a non-finite
likelihood or gradient, no convergence within ``max_iterations`` and any exception inside end as a
ShotFit with ``converged=False`` and the reason. Parameters always stay inside their bounds.

Predicted centroids are the centroids of the model's Bragg photons over each ROI's pixels, in the
dxtbx pixel convention (pixel i spans [i, i+1)), like ``observed_centroid_px``. The radial component
of a centroid error is its projection on the direction from the beam centre to the observed centroid.
The strong-spot RMSDs are those to compare with DIALS's refinement RMSD: only a spot the spot finder
found has an observed centroid that measures it (``ShotPixels.strong``). On the LY99 demo the true
model's own radial RMSD over every ROI is 0.2 to 2.4 px, from the weak ROIs' noisy centroids, and 0.07
to 0.69 px (median 0.2) over the strong spots.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch

from xfel_spread.sim.forward import AmplitudeLookup, SparseTermCache
from xfel_spread.sim.geometry import Detector
from xfel_spread.stage1.likelihood import (
    PixelPhotons,
    ShotDataError,
    ShotTensors,
    bragg_photons,
    check_amplitude_rows,
    closed_form_scale,
    pixel_nll,
    plane_share_map,
    poisson_variance,
    shot_tensors,
    z_score_sigma,
)
from xfel_spread.stage1.model import (
    INDEX,
    NCELLS,
    PARAMETER_NAMES,
    ROTATION,
    CrystalModel,
    FreeDomainCrystal,
    ParameterSpace,
    Stage1Settings,
    enter_pass,
    parameter_space,
    refinement_passes,
    shifted_detector,
)
from xfel_spread.stage1.psf import DetectorPsf, ShotSpread, spread
from xfel_spread.stage1.shot import ShotPixels

logger = logging.getLogger(__name__)

#: L-BFGS-B stops when the NLL falls by less than this fraction in an iteration, or when every
#: projected gradient component (scaled units) is below GTOL.
FTOL = 1e-10
GTOL = 1e-6
#: L-BFGS-B's memory (maxcor: correction pairs; scipy's default 10) in every minimisation of a shot.
#: The parameters are coupled (G with N, the orientation with the cell; the free domains' 3 D
#: vectors with all of them). On the demo's 8 psf lattices (Intel Xeon VM, 2026-12-07) 40 pairs
#: against 10 took a median 75 iterations per lattice instead of 109 with the default settings (2.9
#: against 4.1 s), and 442 instead of 612 with 25 free domains and three starts; the scores were the
#: same (with free domains 0.0050 deg from the domains' mean both; 100 pairs gave 433 iterations).
LBFGS_MAXCOR = 40


class NonFiniteError(ArithmeticError):
    """The NLL or its gradient became non-finite during the refinement."""


@dataclass
class ShotFit:
    """The outcome of one shot's refinement.

    ``start`` and ``final`` map every name of :data:`~xfel_spread.stage1.model.PARAMETER_NAMES` to
    its value (physical units; fixed parameters keep their start value). Values that could not be
    computed (a shot that failed before its model was evaluated) are NaN. ``seconds`` is the wall
    time of the shot (in a batch: the batch's wall time divided by its shots).
    """

    shot_index: int
    identifier: str
    shard: str
    image_index: int
    converged: bool
    reason: str
    refined: tuple[str, ...]
    start: dict[str, float]
    final: dict[str, float]
    n_iterations: int
    n_evaluations: int
    nll_start: float
    nll_final: float
    z_score_sigma_start: float
    z_score_sigma_final: float
    start_real_space_matrix: np.ndarray
    real_space_matrix: np.ndarray
    distance_mm: float
    model_centroid_px_start: np.ndarray
    model_centroid_px: np.ndarray
    rmsd_px_start: float
    rmsd_px: float
    radial_rmsd_px_start: float
    radial_rmsd_px: float
    strong_rmsd_px_start: float
    strong_rmsd_px: float
    strong_radial_rmsd_px_start: float
    strong_radial_rmsd_px: float
    dials_strong_radial_rmsd_px: float  #: DIALS's own (xyzcal.px), on the same strong spots
    n_rois: int
    n_strong_rois: int
    n_trusted_pixels: int
    seconds: float
    #: The free domains' centred rotation vectors (D, 3, deg) when ``stage1.free_domains`` ran, else None.
    domain_vectors_deg: np.ndarray | None = None


class ShotProblem:
    """One shot made ready for refinement: its tensors on a device, crystal model and parameters.

    Construction checks the pixels (ShotDataError) and the start crystal (StartModelError). The
    parameter space exists once the start G is known (:meth:`set_start`).
    """

    def __init__(self, shot: ShotPixels, settings: Stage1Settings, device, psf: DetectorPsf | None = None):
        self.shot = shot
        self.settings = settings
        self.device = torch.device(device)
        self.tensors: ShotTensors = shot_tensors(shot, settings.readout_sigma_adu, self.device)
        self.crystal = CrystalModel(shot.real_space_matrix, settings.n_domains, self.device,
                                    settings.mosaic_model if settings.analytic_mosaic else None, shot.space_group)
        self.moves_detector = "detz_shift" in settings.refine
        #: The detector's point spread among the shoebox pixels (of the photons and of their
        #: variance), or None.
        self.spread: ShotSpread | None = (
            None if psf is None else psf.shot_spread(shot.pixel_fast, shot.pixel_slow, shot.detector.pixel_size_mm,
                                                     self.device, shot.pixel_panel))
        #: The map from the trusted pixels' Bragg photons to the share of them the ROIs' background
        #: planes hold (:func:`~xfel_spread.stage1.likelihood.plane_share_map`), or None: built when
        #: ``stage1.plane_holds_bragg`` is true, or null (its default) and the point spread is modelled.
        holds = psf is not None if settings.plane_holds_bragg is None else settings.plane_holds_bragg
        self.plane_share = plane_share_map(shot, self.device) if holds else None
        #: Whether :meth:`expected` takes the planes' share out now: not while the spots are being
        #: placed (:func:`_run_passes`).
        self.plane_share_on = True
        self.space: ParameterSpace | None = None
        self.start_values: np.ndarray | None = None
        #: The sparse model's terms kept between evaluations (SparseTermCache), while the free-domain
        #: refinement runs (its evaluations repeat at nearby crystals; about 100 MB on a shot of 31
        #: shoeboxes with 25 domains, let go after it), else None.
        self.term_cache: SparseTermCache | None = None

    @property
    def detector(self) -> Detector:
        return self.shot.detector

    def unit_start_values(self) -> torch.Tensor:
        """Start values with G = 1, to evaluate the start model's Bragg photons per unit scale."""
        return torch.as_tensor(parameter_space(self.settings, self.crystal.start_cell, 1.0, self.crystal.cell_model.free).start,
                               dtype=torch.float64, device=self.device)

    def broad_start_values(self) -> torch.Tensor:
        """Start values with G = 1 and N at ``broad_start_ncells``: the broad-spot restart's unit model."""
        values = self.unit_start_values()
        values[NCELLS] = self.settings.broad_ncells
        return values

    def closed_form_G(self, unit_bragg_trusted: torch.Tensor) -> float:
        """Least-squares G of the shoebox sums given the trusted pixels' unit-G Bragg photons."""
        tensors = self.tensors
        if not float(unit_bragg_trusted.sum()) > 0:
            raise ShotDataError("the start model predicts no Bragg photons in the trusted pixels")
        scale = closed_form_scale(unit_bragg_trusted, tensors.data[tensors.trusted],
                                  tensors.background[tensors.trusted], tensors.roi[tensors.trusted])
        if not (np.isfinite(scale) and scale > 0):
            raise ShotDataError(f"no Bragg signal in the shoeboxes: the least-squares start G is {scale:.3g}")
        return scale

    def set_start(self, unit_bragg_trusted: torch.Tensor, broad_bragg_trusted: torch.Tensor | None = None) -> None:
        """Fix the start G (``initial.G`` or the closed form) and build the parameter space.

        ``unit_bragg_trusted`` are the trusted pixels' Bragg photons at G = 1 of the start;
        ``broad_bragg_trusted`` those of :meth:`broad_start_values`, given when the broad-spot restart
        is on: its start G is the closed form with those spots, where spots a few pixels from their
        data still overlap it, carried to the start N by keeping G N_a N_b N_c (the spots'
        integrated photons). With the start's sharp spots, a least-squares G over shoeboxes the
        spots have left runs to millions.
        """
        settings = self.settings
        if settings.initial_G is not None:
            scale = broad = settings.initial_G
        else:
            scale = float(np.clip(self.closed_form_G(unit_bragg_trusted), *settings.bounds_G))
            broad = None
            if broad_bragg_trusted is not None:
                try:
                    broad = self.closed_form_G(broad_bragg_trusted) * (
                        settings.broad_ncells ** 3 / float(np.prod(settings.initial_ncells)))
                except ShotDataError:  # no restart then; the sharp start still runs
                    broad = None
                else:
                    broad = float(np.clip(broad, *settings.bounds_G))
        self.space = parameter_space(settings, self.crystal.start_cell, scale, self.crystal.cell_model.free)
        self.start_values = self.space.start.copy()
        #: The parameter space of the broad-spot restart (G from the broad spots), or None when it is off.
        self.broad_space = None
        if settings.broad_ncells is not None and broad is not None:
            self.broad_space = parameter_space(settings, self.crystal.start_cell, broad, self.crystal.cell_model.free)

    def set_start_from_model(self, amplitudes: AmplitudeLookup) -> PixelPhotons:
        """Fix the start G from the start model (:meth:`set_start`, with the broad spots' model when
        the restart is on) and return the start model's Bragg photons at G = 1 on every shoebox pixel."""
        pixels = all_pixels(self)
        trusted = self.tensors.trusted
        with torch.no_grad():
            unit_bragg = self.photons(self.unit_start_values(), amplitudes, pixels)
            broad = (None if self.settings.broad_ncells is None
                     else self.bragg(self.broad_start_values(), amplitudes, pixels)[trusted])
        self.set_start(unit_bragg.mean[trusted], broad)
        return unit_bragg

    def detector_at(self, values: torch.Tensor) -> Detector:
        """The detector moved by the ``detz_shift_mm`` of ``values`` when the shift is refined."""
        if self.moves_detector:
            return shifted_detector(self.detector, values[INDEX["detz_shift_mm"]])
        return self.detector

    def bragg(self, values: torch.Tensor, amplitudes: AmplitudeLookup, pixels: torch.Tensor | None = None,
              detector: Detector | None = None) -> torch.Tensor:
        """G * Bragg photons at ``pixels`` (default: trusted) with the forward model
        (:func:`~xfel_spread.stage1.likelihood.bragg_photons`), spread by the detector's point spread
        when the shot models one, on ``detector`` if given."""
        photons, pixels = self._to_spread(values, amplitudes, pixels, detector)
        return photons if self.spread is None else spread(self.spread.photons, photons)[pixels]

    def photons(self, values: torch.Tensor, amplitudes: AmplitudeLookup,
                pixels: torch.Tensor | None = None) -> PixelPhotons:
        """:meth:`bragg` with the Bragg photons' Poisson variance (their spread by the squared
        kernel behind a point spread), which the Z-scores take."""
        return PixelPhotons.from_unspread(self.spread, *self._to_spread(values, amplitudes, pixels, None))

    def _to_spread(self, values: torch.Tensor, amplitudes: AmplitudeLookup, pixels: torch.Tensor | None,
                   detector: Detector | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward model's photons :meth:`bragg` needs before any spread: at ``pixels`` without a
        point spread; behind one at every shoebox pixel (light reaches a pixel from all of them),
        with the pixels to take after spreading (default: trusted)."""
        detector = self.detector_at(values) if detector is None else detector
        if self.spread is None:
            return bragg_photons(detector, self.crystal, values, self.tensors, amplitudes, pixels,
                                 self.term_cache), pixels
        every = bragg_photons(detector, self.crystal, values, self.tensors, amplitudes, all_pixels(self),
                              self.term_cache)
        return every, self.tensors.trusted if pixels is None else pixels

    def expected(self, bragg_trusted: PixelPhotons) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trusted pixels' expected photons given their :meth:`photons`, and their Poisson variance
        (None where it is the expected photons, without a point spread), which the Z-scores take.

        The expected photons are the background plane plus the Bragg photons, less the share of
        those the plane holds when ``stage1.plane_holds_bragg`` is on (:attr:`plane_share`).
        """
        background = self.planes(bragg_trusted.mean)
        return background + bragg_trusted.mean, poisson_variance(
            background, bragg_trusted, None if self.spread is None else self.spread.variance_share)

    def planes(self, bragg_trusted: torch.Tensor) -> torch.Tensor:
        """The trusted pixels' background planes, less the share of their G * Bragg photons
        ``bragg_trusted`` the planes hold while that is taken out (:meth:`active_plane_share`)."""
        tensors = self.tensors
        background = tensors.background[tensors.trusted]
        plane_share = self.active_plane_share()
        return background if plane_share is None else background - spread(plane_share, bragg_trusted)

    def active_plane_share(self):
        """:attr:`plane_share` while it is on (:attr:`plane_share_on`), else None."""
        return self.plane_share if self.plane_share_on else None

    def nll(self, values: torch.Tensor, bragg_trusted: torch.Tensor) -> torch.Tensor:
        """NLL of the trusted pixels given their G * Bragg photons (:meth:`bragg`), plus the restraints.

        The expected photons are their own Poisson variance here, behind a point spread too (see
        :mod:`xfel_spread.stage1.likelihood`); the Z-scores take the spread variance of :meth:`expected`."""
        tensors = self.tensors
        model = self.planes(bragg_trusted) + bragg_trusted
        return (pixel_nll(model, tensors.data[tensors.trusted], tensors.readout_variance).sum()
                + self.space.restraint_penalty(values))


def dials_strong_radial_rmsd(shot: ShotPixels) -> float:
    """Radial RMSD of DIALS's predicted centroids against the observed ones, over the strong spots."""
    strong = np.asarray(shot.strong, dtype=bool)
    beam_centre_px = roi_beam_centres_px(shot)
    if beam_centre_px.ndim == 2:
        beam_centre_px = beam_centre_px[strong]
    return centroid_rmsd(np.asarray(shot.dials_predicted_px, dtype=np.float64)[strong],
                         np.asarray(shot.observed_centroid_px, dtype=np.float64)[strong], beam_centre_px)[1]


def roi_beam_centres_px(shot: ShotPixels) -> np.ndarray:
    """Where the direct beam meets the detector, in pixels: (2,) on one panel; on a multi-panel
    detector (n_roi, 2), each ROI's in its own panel's frame (radial is away from it)."""
    if shot.roi_panel is None:
        return np.asarray(shot.detector.beam_center_mm) / shot.detector.pixel_size_mm
    return shot.detector.beam_centre_px()[np.asarray(shot.roi_panel, dtype=np.int64)]


def all_pixels(problem: ShotProblem) -> torch.Tensor:
    return torch.arange(problem.tensors.fast.numel(), device=problem.device)


def model_centroids(bragg: np.ndarray, fast: np.ndarray, slow: np.ndarray, roi: np.ndarray,
                    n_rois: int) -> np.ndarray:
    """Centroid (fast, slow) of the model's Bragg photons in each ROI; NaN where it predicts none."""
    total = np.bincount(roi, weights=bragg, minlength=n_rois)
    fast_sum = np.bincount(roi, weights=bragg * (fast + 0.5), minlength=n_rois)
    slow_sum = np.bincount(roi, weights=bragg * (slow + 0.5), minlength=n_rois)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = np.stack((fast_sum / total, slow_sum / total), axis=1)
    centroids[~(total > 0)] = np.nan
    return centroids


def centroid_rmsd(predicted: np.ndarray, observed: np.ndarray, beam_centre_px: np.ndarray) -> tuple[float, float]:
    """(overall, radial) RMSD in pixels over the ROIs with finite predicted and observed centroids.

    ``beam_centre_px`` is (2,), or (n, 2) with each ROI's own (ROIs on different panels).
    """
    usable = np.all(np.isfinite(predicted), axis=1) & np.all(np.isfinite(observed), axis=1)
    if not usable.any():
        return float("nan"), float("nan")
    delta = predicted[usable] - observed[usable]
    beam_centre_px = np.asarray(beam_centre_px)
    outward = observed[usable] - (beam_centre_px[usable] if beam_centre_px.ndim == 2 else beam_centre_px)
    length = np.linalg.norm(outward, axis=1, keepdims=True)
    radial = np.sum(delta * np.divide(outward, length, out=np.zeros_like(outward), where=length > 0), axis=1)
    return float(np.sqrt(np.mean(np.sum(delta ** 2, axis=1)))), float(np.sqrt(np.mean(radial ** 2)))


@dataclass
class ModelSummary:
    """What one evaluation of the model on every shoebox pixel says about a shot."""

    nll: float
    z_score_sigma: float
    centroids: np.ndarray
    rmsd_px: float
    radial_rmsd_px: float
    strong_rmsd_px: float
    strong_radial_rmsd_px: float
    real_space_matrix: np.ndarray
    distance_mm: float


def summarize_model(problem: ShotProblem, values: torch.Tensor, bragg_all: PixelPhotons) -> ModelSummary:
    """NLL, Z-scores, centroids and RMSDs of the model with ``values`` whose G * Bragg photons on
    every shoebox pixel are ``bragg_all`` (:meth:`ShotProblem.photons`)."""
    tensors, shot = problem.tensors, problem.shot
    with torch.no_grad():
        trusted = bragg_all.at(tensors.trusted)
        nll = float(problem.nll(values, trusted.mean))
        model, poisson = problem.expected(trusted)
        sigma = z_score_sigma(model, tensors.data[tensors.trusted], tensors.readout_variance, poisson)
        matrix = problem.crystal.real_space_matrix(values).cpu().numpy()
    centroids = model_centroids(bragg_all.mean.detach().cpu().numpy(), np.asarray(shot.pixel_fast),
                                np.asarray(shot.pixel_slow), np.asarray(shot.pixel_roi), shot.n_rois)
    beam_centre_px = roi_beam_centres_px(shot)
    observed = np.asarray(shot.observed_centroid_px, dtype=np.float64)
    rmsd, radial = centroid_rmsd(centroids, observed, beam_centre_px)
    strong = np.asarray(shot.strong, dtype=bool)
    strong_rmsd, strong_radial = centroid_rmsd(centroids[strong], observed[strong],
                                               beam_centre_px[strong] if beam_centre_px.ndim == 2 else beam_centre_px)
    distance = shot.detector.distance_mm + float(values[INDEX["detz_shift_mm"]])
    return ModelSummary(nll, sigma, centroids, rmsd, radial, strong_rmsd, strong_radial, matrix, distance)


#: ``evaluate(space, scaled)``: NLL and its gradient in the scaled parameters refined by ``space``.
Evaluator = Callable[[ParameterSpace, np.ndarray], tuple[float, np.ndarray]]


@dataclass
class Minimization:
    """Where a shot's minimisation ended: physical values (inside the bounds) and how it went."""

    values: np.ndarray
    n_iterations: int
    n_evaluations: int
    converged: bool
    reason: str
    #: True once the broad-spot restart has run (its counts include the first attempt's).
    restarted: bool = False


def outcome(result: scipy.optimize.OptimizeResult) -> tuple[bool, str]:
    """(converged, reason) of an L-BFGS-B result; the reason is empty for a converged shot."""
    message = result.message.decode() if isinstance(result.message, bytes) else str(result.message)
    if result.success:
        return True, ""
    return False, f"L-BFGS-B did not converge: {message}"


def g_at_bound(space: ParameterSpace, values: np.ndarray) -> bool:
    """True when the refined G sits at its lower bound or within 0.1 % of its upper one: the sign of
    a lost shot (spots out of their shoeboxes, where every gradient but G's vanishes)."""
    G = values[INDEX["G"]]
    return bool(space.refined[INDEX["G"]]
                and not space.lower[INDEX["G"]] < G < (1 - 1e-3) * space.upper[INDEX["G"]])


def minimize_shot(problem: ShotProblem, evaluate: Evaluator) -> Minimization:
    """L-BFGS-B over each refinement pass in turn (:func:`~xfel_spread.stage1.model.refinement_passes`).

    Each pass starts where the previous stopped (:func:`~xfel_spread.stage1.model.enter_pass`),
    within the shot's bounds, for at most ``max_iterations`` iterations; the last pass decides
    convergence. A non-finite NLL or gradient ends the minimisation at the last point evaluated.
    Whether the shot was lost and restarts (:func:`should_restart`) needs the model at the end, so
    the callers decide it.
    """
    return _run_passes(problem, evaluate, problem.start_values, refinement_passes(problem.space), [0, 0])


def should_restart(problem: ShotProblem, minimization: Minimization, final: ModelSummary) -> bool:
    """True when the minimisation lost the shot and the broad-spot restart has something to try.

    Lost: G at a bound (:func:`g_at_bound`) or no Bragg photons left in the shoeboxes (:func:`lost`,
    with G anywhere): the spots left their shoeboxes. The restart needs a broad-spot start
    (``stage1.broad_start_ncells``) not yet tried, and a minimisation that did not end on a
    non-finite NLL or gradient.
    """
    if problem.broad_space is None or minimization.restarted or minimization.reason.startswith("non-finite"):
        return False
    return g_at_bound(problem.space, minimization.values) or lost(final)


def restart_with_broad_spots(problem: ShotProblem, evaluate: Evaluator, previous: Minimization) -> Minimization:
    """Refine again from the start crystal with a broad-spot pass first; iterations and evaluations
    count ``previous`` too, and its result is the shot's."""
    counts = [previous.n_iterations, previous.n_evaluations]
    result = _run_passes(problem, evaluate, problem.broad_space.start,
                         refinement_passes(problem.broad_space, problem.settings.broad_ncells), counts)
    return dataclasses.replace(result, restarted=True)


def should_try_broad(problem: ShotProblem, minimization: Minimization) -> bool:
    """True when ``stage1.broad_start`` is always and the broad-spot start has not run yet: a
    minimisation that ended well is refined again from it, and :func:`better_start` keeps one end."""
    return (problem.settings.broad_start == "always" and problem.broad_space is not None
            and not minimization.restarted and not minimization.reason.startswith("non-finite"))


def better_start(problem: ShotProblem, first: tuple[Minimization, ModelSummary],
                 broad: tuple[Minimization, ModelSummary]) -> tuple[Minimization, ModelSummary]:
    """Of a shot's first minimisation and its broad-spot one (``stage1.broad_start: always``), the end
    of lower NLL, with the iterations and evaluations of both; a broad end that lost the shot (spots
    out of their shoeboxes, G at a bound) or has no finite NLL never wins."""
    (plain, plain_final), (other, other_final) = first, broad
    usable = not (lost(other_final) or g_at_bound(problem.space, other.values)
                  or other.reason.startswith("non-finite"))
    if usable and np.isfinite(other_final.nll) and other_final.nll < plain_final.nll:
        logger.debug("shot %d: the broad-spot start ended lower (NLL %.2f against %.2f)",
                     problem.shot.shot_index, other_final.nll, plain_final.nll)
        return other, other_final
    return dataclasses.replace(plain, n_iterations=other.n_iterations, n_evaluations=other.n_evaluations,
                               restarted=True), plain_final


def lost(summary: ModelSummary) -> bool:
    """True when the model predicts no Bragg photons in any shoebox (every centroid undefined)."""
    return not np.any(np.isfinite(summary.centroids))


def _checked(evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]], counts: list[int],
             last: list) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """L-BFGS-B's objective: ``evaluate`` of a copy of the point (kept in ``last[0]``), counted in
    ``counts[1]``; a non-finite NLL or gradient raises NonFiniteError."""

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        counts[1] += 1
        last[0] = np.array(x, dtype=np.float64)
        value, gradient = evaluate(last[0])
        if not (np.isfinite(value) and np.all(np.isfinite(gradient))):
            raise NonFiniteError(f"non-finite NLL or gradient at evaluation {counts[1]}")
        return value, gradient

    return fun


def _run_passes(problem: ShotProblem, evaluate: Evaluator, start: np.ndarray, passes: list[ParameterSpace],
                counts: list[int]) -> Minimization:
    """L-BFGS-B over ``passes`` from ``start`` (physical values); ``counts`` (iterations,
    evaluations) accumulate over calls.

    The background planes' share of the Bragg photons (``stage1.plane_holds_bragg``) is taken out
    in the last pass only, once the spots are placed; a single pass runs twice, without it and then
    with it. While spots sit pixels from their data, part of their light lies on the shoebox
    borders, and with the planes' share taken out the likelihood no longer leads them back: a start
    6.6 px off (the refine tests' "G at its upper bound") was lost even from broad spots, and
    converged with the share left in place until the last pass.
    """
    if problem.plane_share is not None and len(passes) == 1:
        passes = [passes[0], passes[0]]
    try:
        return _minimize_passes(problem, evaluate, start, passes, counts)
    finally:
        problem.plane_share_on = True


def _minimize_passes(problem: ShotProblem, evaluate: Evaluator, start: np.ndarray, passes: list[ParameterSpace],
                     counts: list[int]) -> Minimization:
    """:func:`_run_passes`' minimisations."""
    values = np.asarray(start, dtype=np.float64).copy()
    converged, reason = False, "no refinement pass ran"
    for number, space in enumerate(passes):
        problem.plane_share_on = number == len(passes) - 1
        values = enter_pass(values, space)
        last = [space.scaled(values)]

        fun = _checked(lambda scaled, space=space: evaluate(space, scaled), counts, last)
        try:
            result = scipy.optimize.minimize(fun, space.scaled(values), jac=True, method="L-BFGS-B",
                                             bounds=space.scaled_bounds(),
                                             options={"maxiter": problem.settings.max_iterations,
                                                      "ftol": FTOL, "gtol": GTOL, "maxcor": LBFGS_MAXCOR})
        except NonFiniteError as exc:
            return Minimization(space.values(last[0]), counts[0], counts[1], False, str(exc))
        values = space.values(result.x)
        counts[0] += int(result.nit)
        converged, reason = outcome(result)
    return Minimization(values, counts[0], counts[1], converged, reason)


#: Seed of the free domains' start draw; with the shot's number it gives each shot the same start
#: whatever the rank count or batch.
FREE_DOMAIN_SEED = 20261206
#: One scaled unit of a free domain's rotation-vector component (rad): 0.01 deg.
FREE_DOMAIN_UNIT_RAD = float(np.radians(0.01))
#: The free-domain refinement's relative NLL tolerance (L-BFGS-B's ftol): looser than FTOL, since
#: with 3 D more parameters L-BFGS-B creeps on for hundreds of iterations at changes far below the
#: NLL's noise (one unit). On three 25-domain shots (10 channels, 12 shoeboxes) 1e-6, 1e-7 and 1e-8
#: ended within 3e-5 deg of each other in orientation after 340-360, 410-720 and 530-860 iterations.
FREE_DOMAIN_FTOL = 1e-6
#: A free domain putting fewer photons than this fraction of the median domain's into the shoeboxes
#: is dark (pushed out of the crystal) and drawn again; on a validation lattice (nopsf shot 0) the
#: lit domains carried 0.65-1.62 of the mean, the five pushed out 0.03-0.37.
FREE_DOMAIN_DARK_FRACTION = 0.25
#: Most minimisations of the free-domain refinement from one start (the first, and one after each redraw).
FREE_DOMAIN_ROUNDS = 3
#: Marks the seeds of the starts after the first (``stage1.free_domains_starts``), apart from the redraws'.
FREE_DOMAIN_START_TAG = 7


def free_domain_seed(shot_index: int, start: int, *more: int) -> list[int]:
    """The random seed of a shot's free-domain start ``start`` (0, 1, ...) and its redraws (``more``)."""
    return [FREE_DOMAIN_SEED, int(shot_index), *([] if start == 0 else [FREE_DOMAIN_START_TAG, int(start)]), *more]


def free_domain_start(shot_index: int, n_domains: int, eta_deg: float, start: int = 0) -> np.ndarray:
    """Start rotation vectors (D, 3, rad, centred) of the free domains: components drawn from
    N(0, eta^2 / 3), so that their RMS angle is eta, seeded by the shot's number and the start's."""
    rng = np.random.default_rng(free_domain_seed(shot_index, start))
    vectors = rng.normal(0.0, np.radians(eta_deg) / np.sqrt(3.0), (n_domains, 3))
    return vectors - vectors.mean(axis=0)


def can_free_domains(problem: ShotProblem, minimization: Minimization, final: ModelSummary) -> bool:
    """True when ``stage1.free_domains`` is on and the first refinement kept the shot (spots in their
    shoeboxes, G inside its bounds, a finite NLL): there is a crystal to split into domains."""
    return bool(problem.settings.free_domains) and not (
        lost(final) or g_at_bound(problem.space, minimization.values)
        or minimization.reason.startswith("non-finite"))


def domain_photons(problem: ShotProblem, amplitudes: AmplitudeLookup, values: np.ndarray) -> np.ndarray:
    """Bragg photons (D,) each free domain of ``problem.crystal`` puts into the trusted pixels."""
    crystal = problem.crystal
    values_t = torch.as_tensor(values, dtype=torch.float64, device=problem.device)
    photons = []
    with torch.no_grad():
        for domain in range(crystal.n_domains):
            crystal.selected = domain
            photons.append(float(problem.bragg(values_t, amplitudes).sum()))
    crystal.selected = None
    return np.asarray(photons)


def redraw_dark_domains(vectors: np.ndarray, values: np.ndarray, dark: np.ndarray, rng: np.random.Generator,
                        sigma_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """New vectors (D, 3, rad) with the ``dark`` ones drawn from N(0, sigma^2) per component about the
    lit domains' mean, and values whose crystal rotation follows the domains' new mean, so that every
    lit domain keeps its orientation (to first order in the angles; the next minimisation takes up the
    rest). The domains enter centred on their mean: moving the dark ones moves that mean, and without
    the rotation every lit domain would move with it."""
    vectors = np.array(vectors, dtype=np.float64)
    old_mean = vectors.mean(axis=0)
    vectors[dark] = vectors[~dark].mean(axis=0) + rng.normal(0.0, sigma_rad, (int(np.count_nonzero(dark)), 3))
    values = np.array(values, dtype=np.float64)
    values[ROTATION] += np.degrees(vectors.mean(axis=0) - old_mean)
    return vectors, values


def refine_free_domains(problem: ShotProblem, amplitudes: AmplitudeLookup, previous: Minimization) -> Minimization:
    """The free-domain refinement (``stage1.free_domains``) from the end of ``previous``.

    The shot's crystal becomes a :class:`~xfel_spread.stage1.model.FreeDomainCrystal` of D domains
    started at :func:`free_domain_start` (eta: the refined one, else ``initial.eta_deg``), and
    L-BFGS-B refines the first refinement's parameters but eta together with the domains' vectors
    (in units of 0.01 deg, unbounded), under the mosaic's own prior: the vectors' components drawn
    from N(0, eta^2 / 3), as the start. A domain placed where the pixels hold no spot of it is pushed
    out until it lights nothing, and would then sit there, off the crystal, taking no part in the fit
    but in its mean orientation; so after each minimisation every domain putting fewer than
    FREE_DOMAIN_DARK_FRACTION of the median domain's photons into the shoeboxes is drawn again about
    the domains' mean, and the minimisation goes on, for at most FREE_DOMAIN_ROUNDS minimisations and
    ``free_domains_max_iterations`` iterations in all per start; the last one decides convergence. The domains'
    landscape has many minima (which true domain each model domain takes): with
    ``free_domains_starts`` S > 1 this runs from S start draws and keeps the one of least objective
    (NLL plus the prior; a start ending in a non-finite NLL loses). Iterations and evaluations of
    every start add to ``previous``'s. The returned values hold the domains' RMS angle as eta; the
    crystal (``problem.crystal``) keeps the refined vectors. The shot's evaluations keep their sparse
    terms meanwhile (:class:`~xfel_spread.sim.forward.SparseTermCache`).
    """
    problem.term_cache = SparseTermCache()
    try:
        return _refine_free_domains(problem, amplitudes, previous)
    finally:
        problem.term_cache = None


def _refine_free_domains(problem: ShotProblem, amplitudes: AmplitudeLookup, previous: Minimization) -> Minimization:
    settings = problem.settings
    values = np.asarray(previous.values, dtype=np.float64).copy()
    refined_eta = "eta" in settings.refine and values[INDEX["eta_deg"]] > 0
    eta_deg = float(values[INDEX["eta_deg"]]) if refined_eta else settings.initial_eta_deg
    crystal = FreeDomainCrystal(problem.crystal.start_matrix, settings.free_domains, problem.device,
                                problem.shot.space_group)
    problem.crystal = crystal
    flags = problem.space.refined.copy()
    flags[INDEX["eta_deg"]] = False
    space = problem.space.with_refined(flags)
    n = space.n_refined
    counts = [previous.n_iterations, previous.n_evaluations]
    prior_variance = float(np.radians(eta_deg)) ** 2 / 3
    last = [None]

    def evaluate(x: np.ndarray) -> tuple[float, np.ndarray]:
        leaf = torch.tensor(x, dtype=torch.float64, device=problem.device, requires_grad=True)
        physical = space.physical(leaf[:n])
        crystal.vectors = (FREE_DOMAIN_UNIT_RAD * leaf[n:]).reshape(-1, 3)
        nll = (problem.nll(physical, problem.bragg(physical, amplitudes))
               + 0.5 * (crystal.centred_vectors() ** 2).sum() / prior_variance)
        nll.backward()
        return float(nll.detach()), leaf.grad.detach().cpu().numpy()

    fun = _checked(evaluate, counts, last)

    bounds = space.scaled_bounds() + [(None, None)] * (3 * settings.free_domains)
    first = values
    best = None
    for start in range(settings.free_domains_starts):
        values = first.copy()
        vectors = free_domain_start(problem.shot.shot_index, settings.free_domains, eta_deg, start)
        converged, reason, objective = False, "no free-domain minimisation ran", np.inf
        iterations_start = counts[0]
        for round_number in range(FREE_DOMAIN_ROUNDS):
            iterations_left = settings.free_domains_max_iterations - (counts[0] - iterations_start)
            if iterations_left < 1:
                break
            x0 = np.concatenate([space.scaled(values), (vectors / FREE_DOMAIN_UNIT_RAD).ravel()])
            try:
                result = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                                 options={"maxiter": iterations_left, "ftol": FREE_DOMAIN_FTOL,
                                                          "gtol": GTOL, "maxcor": LBFGS_MAXCOR})
            except NonFiniteError as exc:
                x, converged, reason, objective = last[0], False, str(exc), np.inf
                values, vectors = space.values(x[:n]), FREE_DOMAIN_UNIT_RAD * x[n:].reshape(-1, 3)
                break
            converged, reason = outcome(result)
            objective = float(result.fun)
            counts[0] += int(result.nit)
            values, vectors = space.values(result.x[:n]), FREE_DOMAIN_UNIT_RAD * result.x[n:].reshape(-1, 3)
            crystal.vectors = torch.as_tensor(vectors, device=problem.device)
            photons = domain_photons(problem, amplitudes, values)
            dark = photons < FREE_DOMAIN_DARK_FRACTION * np.median(photons)
            if not dark.any() or round_number == FREE_DOMAIN_ROUNDS - 1:
                break
            logger.debug("shot %d: %d dark free domain(s) drawn again", problem.shot.shot_index, int(dark.sum()))
            rng = np.random.default_rng(free_domain_seed(problem.shot.shot_index, start, round_number + 1))
            vectors, values = redraw_dark_domains(vectors, values, dark, rng, np.sqrt(prior_variance))
        if settings.free_domains_starts > 1:
            logger.debug("shot %d: free-domain start %d ended at objective %.3f", problem.shot.shot_index,
                         start, objective)
        if best is None or objective < best[0]:
            best = (objective, values, vectors, converged, reason)
    _, values, vectors, converged, reason = best
    crystal.vectors = torch.as_tensor(vectors, device=problem.device)
    values[INDEX["eta_deg"]] = crystal.rms_angle_deg()
    return Minimization(values, counts[0], counts[1], converged, reason, previous.restarted)


def shot_evaluator(problem: ShotProblem, amplitudes: AmplitudeLookup) -> Evaluator:
    """NLL and gradient of one shot with the forward model and torch autograd (float64): the terms
    below the cut-off, equal to the dense evaluation to rounding (:func:`~xfel_spread.stage1.likelihood.bragg_photons`)."""

    def evaluate(space: ParameterSpace, scaled: np.ndarray) -> tuple[float, np.ndarray]:
        leaf = torch.tensor(scaled, dtype=torch.float64, device=problem.device, requires_grad=True)
        values = space.physical(leaf)
        nll = problem.nll(values, problem.bragg(values, amplitudes))
        nll.backward()
        return float(nll.detach()), leaf.grad.detach().cpu().numpy()

    return evaluate


def describe_exception(exc: BaseException) -> str:
    """One line naming an exception raised inside a shot's refinement."""
    if isinstance(exc, (ValueError, ArithmeticError)) and str(exc):
        return str(exc).strip().splitlines()[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failed_fit(shot: ShotPixels, settings: Stage1Settings, reason: str, seconds: float,
               problem: ShotProblem | None = None, start: ModelSummary | None = None) -> ShotFit:
    """The ShotFit of a shot whose refinement did not run to the end; known start figures are kept."""
    nan_parameters = {name: float("nan") for name in PARAMETER_NAMES}
    start_values = (ParameterSpace.as_dict(problem.start_values)
                    if problem is not None and problem.start_values is not None else nan_parameters)
    nan_centroids = np.full((shot.n_rois, 2), np.nan)
    matrix = np.asarray(shot.real_space_matrix, dtype=np.float64)
    return ShotFit(
        shot_index=shot.shot_index, identifier=shot.identifier, shard=shot.shard, image_index=shot.image_index,
        converged=False, reason=reason, refined=settings.refined_names,
        start=start_values, final=dict(start_values), n_iterations=0, n_evaluations=0,
        nll_start=start.nll if start else float("nan"), nll_final=float("nan"),
        z_score_sigma_start=start.z_score_sigma if start else float("nan"), z_score_sigma_final=float("nan"),
        start_real_space_matrix=start.real_space_matrix if start else matrix,
        real_space_matrix=start.real_space_matrix if start else matrix,
        distance_mm=float(shot.detector.distance_mm),
        model_centroid_px_start=start.centroids if start else nan_centroids,
        model_centroid_px=nan_centroids,
        rmsd_px_start=start.rmsd_px if start else float("nan"), rmsd_px=float("nan"),
        radial_rmsd_px_start=start.radial_rmsd_px if start else float("nan"), radial_rmsd_px=float("nan"),
        strong_rmsd_px_start=start.strong_rmsd_px if start else float("nan"), strong_rmsd_px=float("nan"),
        strong_radial_rmsd_px_start=start.strong_radial_rmsd_px if start else float("nan"),
        strong_radial_rmsd_px=float("nan"), dials_strong_radial_rmsd_px=dials_strong_radial_rmsd(shot),
        n_rois=shot.n_rois, n_strong_rois=int(np.count_nonzero(shot.strong)), n_trusted_pixels=int(np.count_nonzero(shot.trusted)), seconds=seconds)


def finished_fit(problem: ShotProblem, start: ModelSummary, final: ModelSummary, minimization: Minimization,
                 seconds: float) -> ShotFit:
    """The ShotFit of a shot whose minimisation ran (converged or not).

    A refinement that ends with no Bragg photons in the shoeboxes (G at 0, or every spot moved out)
    has lost the shot even where L-BFGS-B reports convergence: there every gradient but G's vanishes.
    So has one whose refined G ends at a bound, or within 0.1 % of the upper one (from sharp spots out of their shoeboxes the least
    squares scale runs to the upper bound, and every other gradient vanishes there too).
    """
    shot = problem.shot
    converged, reason = minimization.converged, minimization.reason
    if lost(final):
        converged, reason = False, "the refined model predicts no Bragg photons in the shoeboxes"
    elif g_at_bound(problem.space, minimization.values):
        converged, reason = False, (f"G ended at its bound ({minimization.values[INDEX['G']]:.3g}): "
                                    "the spots are not where the model puts them")
    return ShotFit(
        shot_index=shot.shot_index, identifier=shot.identifier, shard=shot.shard, image_index=shot.image_index,
        converged=converged, reason=reason, refined=problem.settings.refined_names,
        start=ParameterSpace.as_dict(problem.start_values), final=ParameterSpace.as_dict(problem.crystal.cell_model.tied(minimization.values)),
        n_iterations=minimization.n_iterations, n_evaluations=minimization.n_evaluations,
        nll_start=start.nll, nll_final=final.nll,
        z_score_sigma_start=start.z_score_sigma, z_score_sigma_final=final.z_score_sigma,
        start_real_space_matrix=start.real_space_matrix, real_space_matrix=final.real_space_matrix,
        distance_mm=final.distance_mm,
        model_centroid_px_start=start.centroids, model_centroid_px=final.centroids,
        rmsd_px_start=start.rmsd_px, rmsd_px=final.rmsd_px,
        radial_rmsd_px_start=start.radial_rmsd_px, radial_rmsd_px=final.radial_rmsd_px,
        strong_rmsd_px_start=start.strong_rmsd_px, strong_rmsd_px=final.strong_rmsd_px,
        strong_radial_rmsd_px_start=start.strong_radial_rmsd_px, strong_radial_rmsd_px=final.strong_radial_rmsd_px,
        dials_strong_radial_rmsd_px=dials_strong_radial_rmsd(shot),
        n_rois=shot.n_rois, n_strong_rois=int(np.count_nonzero(shot.strong)), n_trusted_pixels=int(problem.tensors.trusted.numel()), seconds=seconds,
        domain_vectors_deg=(np.degrees(problem.crystal.centred_vectors().detach().cpu().numpy())
                            if isinstance(problem.crystal, FreeDomainCrystal) else None))


def final_summary(problem: ShotProblem, amplitudes: AmplitudeLookup, minimization: Minimization,
                  pixels: torch.Tensor) -> ModelSummary:
    """The model's summary at the end of ``minimization`` (every shoebox pixel)."""
    values = torch.as_tensor(minimization.values, device=problem.device)
    with torch.no_grad():
        return summarize_model(problem, values, problem.photons(values, amplitudes, pixels))


def refine_shot(shot: ShotPixels, amplitudes: AmplitudeLookup, settings: Stage1Settings,
                psf: DetectorPsf | None = None) -> ShotFit:
    """Refine one shot against its shoebox pixels (see the module docstring); never raises.

    The forward model runs on the device of ``amplitudes`` (per-channel |F|^2, one row per channel
    of the shot's spectrum); ``psf``, when given, is the detector's point spread, applied to the
    model's Bragg photons (:mod:`xfel_spread.stage1.psf`).
    """
    started = time.perf_counter()
    problem, start = None, None
    try:
        check_amplitude_rows(amplitudes, len(shot.energies_ev))
        problem = ShotProblem(shot, settings, amplitudes.intensity.device, psf)
        pixels = all_pixels(problem)
        unit_bragg = problem.set_start_from_model(amplitudes)
        start_values = torch.as_tensor(problem.start_values, device=problem.device)
        start = summarize_model(problem, start_values, unit_bragg.scaled(start_values[INDEX["G"]]))
        evaluate = shot_evaluator(problem, amplitudes)
        minimization = minimize_shot(problem, evaluate)
        final = final_summary(problem, amplitudes, minimization, pixels)
        if should_restart(problem, minimization, final):
            logger.debug("shot %d: the spots left their shoeboxes; restarting with broad spots", shot.shot_index)
            minimization = restart_with_broad_spots(problem, evaluate, minimization)
            final = final_summary(problem, amplitudes, minimization, pixels)
        elif should_try_broad(problem, minimization):
            broad = restart_with_broad_spots(problem, evaluate, minimization)
            minimization, final = better_start(problem, (minimization, final),
                                               (broad, final_summary(problem, amplitudes, broad, pixels)))
        if can_free_domains(problem, minimization, final):
            minimization = refine_free_domains(problem, amplitudes, minimization)
            final = final_summary(problem, amplitudes, minimization, pixels)
        fit = finished_fit(problem, start, final, minimization, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - a shot must never stop the stage; the reason is reported
        fit = failed_fit(shot, settings, describe_exception(exc), time.perf_counter() - started, problem, start)
    logger.debug("shot %d (%s): converged=%s %s; RMSD %.3f -> %.3f px in %.1f s", shot.shot_index,
                 shot.identifier, fit.converged, fit.reason, fit.rmsd_px_start, fit.rmsd_px, fit.seconds)
    return fit
