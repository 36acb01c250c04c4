"""The batched forward model, and the per-shot pixel refinement run through it (the ``exa`` rule's path).

The batched path is what the pipeline's ``exa`` rule runs (command ``spread-exa``, outputs under
``exa/``); in the code it is called "batched" throughout. :class:`BatchedForwardModel` keeps the
per-channel |F|^2 of all channels on one device for its whole life and serves the NLL and gradient
of a batch of shots in one call.

Off a CPU (``gathered``, the default there) it evaluates the shoebox pixels of the batch in one
kernel call: the shots' pixels are concatenated with the index of their shot, and each shot brings
its own crystal (mosaic-domain matrices, N, G) and spectrum. The kernel is
:func:`xfel_spread.sim.forward.bragg_sum`, the one :func:`~xfel_spread.sim.forward.bragg_photons_dense`
(the reference) uses, fed per-pixel gathers of the per-shot inputs (:func:`batched_bragg_photons`).
The pixel arrays of a batch live in device buffers that are reused from batch to batch (grown when a
batch needs more), and the pixels' directions and geometric factors are computed once per batch
unless the detector distance is refined. On a CPU there are no kernel launches to save, and the
gathered inputs made an evaluation 8-22 % dearer per shot than the same dense kernel per shot (and
a shot's sparse models, which skip the terms beyond the cut-off, are cheaper still), so there each
shot of the batch is evaluated by its own model, with exactly
:func:`~xfel_spread.stage1.refine.refine_shot`'s arithmetic (``gathered=True`` runs a GPU's way on a
CPU, as the tests do).

:func:`refine_batch` runs exactly :func:`xfel_spread.stage1.refine.refine_shot`'s refinement for
every shot of a batch at once. Each shot keeps its own L-BFGS-B (its own parameters, iterations,
convergence and failure), running in its own thread; whenever every running shot waits for an
evaluation, one batched call computes the sum of their NLLs and its gradient. Shots are
independent, so the gradient of the sum with respect to a shot's parameters is that shot's
gradient, and each shot follows the path ``refine_shot`` would: bit for bit on a CPU (the same
evaluations, hence the same seconds per lattice), up to rounding through the gathered kernel.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from xfel_spread.sim.forward import (
    R_E_SQUARED_M2,
    AmplitudeLookup,
    bragg_sum,
    bragg_sum_mosaic,
    pixel_factors,
)
from xfel_spread.sim.geometry import BEAM_DIRECTION
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, AmplitudeGrid
from xfel_spread.stage1.likelihood import PixelPhotons, ShotDataError, pixel_nll
from xfel_spread.stage1.model import (
    INDEX,
    NCELLS,
    REFERENCE_BEAM_SIZE_M,
    ParameterSpace,
    Stage1Settings,
)
from xfel_spread.stage1.psf import DetectorPsf, ShotSpread, block_diagonal_spreads, spread
from xfel_spread.stage1.refine import (
    Evaluator,
    ShotFit,
    ShotProblem,
    all_pixels,
    better_start,
    can_free_domains,
    describe_exception,
    failed_fit,
    final_summary,
    finished_fit,
    minimize_shot,
    refine_free_domains,
    restart_with_broad_spots,
    should_try_broad,
    shot_evaluator,
    should_restart,
    summarize_model,
)
from xfel_spread.stage1.shot import ShotPixels


#: Most (pixel, channel, domain) terms per call of the gathered dense kernel
#: (:func:`batched_bragg_photons`). The kernel's own chunks hold 4M terms; on a CPU, calls of a
#: quarter million keep its temporaries in cache (measured when stage 1 ran the dense kernel per shot:
#: an evaluation, forward and backward, of 50 shoeboxes of 144 px, 100 channels, was 0.054 s instead
#: of 0.088 s with one domain, 1.1 s instead of 3.2 s with 25). A GPU takes larger calls best.
TERMS_PER_CALL = {"cpu": 1 << 18, "cuda": 1 << 24}


def pixels_per_call(device: torch.device, terms_per_pixel: int) -> int:
    """Pixels evaluated per forward-model call on ``device`` (see :data:`TERMS_PER_CALL`)."""
    return max(1, TERMS_PER_CALL.get(device.type, TERMS_PER_CALL["cpu"]) // terms_per_pixel)


def batched_bragg_photons(directions: torch.Tensor, factor: torch.Tensor, pixel_shot: torch.Tensor,
                          domain_matrices: torch.Tensor, ncells: torch.Tensor, scale: torch.Tensor,
                          photons: torch.Tensor, inverse_wavelengths: torch.Tensor,
                          amplitudes: AmplitudeLookup, beam_size_m: float,
                          mosaic_variance: torch.Tensor | None = None) -> torch.Tensor:
    """Bragg photons of pixels belonging to different shots, in one evaluation.

    Per pixel: unit diffracted direction ``directions`` (P, 3), polar * omega * capture ``factor``
    (P,) and its shot ``pixel_shot`` (P,). Per shot: ``domain_matrices`` (S, D, 3, 3), ``ncells``
    (S, 3), ``scale`` (S,) and ``photons`` (S, K) per channel of ``inverse_wavelengths`` (K,). Each
    pixel gets ``bragg_photons_dense`` of its own shot: the same kernel (:func:`bragg_sum`) on the
    pixel's crystal and spectrum, gathered per pixel, so that one call mixes shots (what a GPU takes
    best: few large calls). With ``mosaic_variance`` (S, J), each shot's one domain is averaged over
    its J analytic mosaic spreads instead (:func:`bragg_sum_mosaic`).
    """
    n_domains = domain_matrices.shape[1]
    beam_direction = torch.as_tensor(BEAM_DIRECTION, dtype=directions.dtype, device=directions.device)
    chunk = pixels_per_call(directions.device, inverse_wavelengths.numel() * n_domains)
    if mosaic_variance is not None:
        matrices = domain_matrices[:, 0]
        metrics = matrices @ matrices.transpose(1, 2)
    totals = []
    for start in range(0, directions.shape[0], chunk):
        which = pixel_shot[start:start + chunk]
        w = directions[start:start + chunk] - beam_direction
        if mosaic_variance is not None:
            totals.append(bragg_sum_mosaic(torch.einsum("pij,pj->pi", matrices[which], w), (w ** 2).sum(dim=-1),
                                           metrics[which], inverse_wavelengths, ncells[which], photons[which],
                                           amplitudes, mosaic_variance[which]))
        else:
            totals.append(bragg_sum(torch.einsum("pdij,pj->pdi", domain_matrices[which], w), inverse_wavelengths,
                                    ncells[which], photons[which], amplitudes))
    per_domain = 1 if mosaic_variance is not None else n_domains
    prefactor = scale * R_E_SQUARED_M2 / per_domain / beam_size_m ** 2
    return prefactor[pixel_shot] * factor * torch.cat(totals)


def lookup_on(amplitudes: AmplitudeLookup | AmplitudeGrid, device: torch.device) -> AmplitudeLookup:
    """The amplitude lookup on ``device`` (built from a grid, or copied from another device)."""
    if isinstance(amplitudes, AmplitudeGrid):
        return AmplitudeLookup(amplitudes, device)
    if amplitudes.intensity.device == device:
        return amplitudes
    moved = copy.copy(amplitudes)
    moved.intensity = amplitudes.intensity.to(device)
    moved.shape = amplitudes.shape.to(device)
    moved.hkl_min = amplitudes.hkl_min.to(device)
    return moved


class BatchedForwardModel:
    """Per-channel |F|^2 resident on one device; the shoebox pixels of a batch of shots in one call.

    ``energies_ev`` are the channels of the amplitude table's rows, shared by every shot. Use
    :meth:`load` to put a batch's pixels on the device, then :meth:`nll_and_gradients` and
    :meth:`bragg_all_pixels` on it. ``gathered`` (default: off a CPU) runs the batch through one
    gathered kernel; without it each shot is evaluated by its own model, as ``refine_shot`` does.
    """

    def __init__(self, amplitudes: AmplitudeLookup | AmplitudeGrid, energies_ev: np.ndarray, device,
                 gathered: bool | None = None):
        self.device = torch.device(device)
        self.gathered = self.device.type != "cpu" if gathered is None else bool(gathered)
        self.amplitudes = lookup_on(amplitudes, self.device)
        self.energies_ev = np.asarray(energies_ev, dtype=np.float64)
        if self.amplitudes.intensity.shape[0] != self.energies_ev.size:
            raise ValueError(f"amplitude table has {self.amplitudes.intensity.shape[0]} channel rows for "
                             f"{self.energies_ev.size} channel energies")
        self.inverse_wavelengths = torch.as_tensor(self.energies_ev / HC_EV_ANGSTROM, device=self.device)
        self._storage: dict[str, torch.Tensor] = {}
        self.problems: list[ShotProblem] = []
        self.spread: ShotSpread | None = None

    def check_shot(self, shot: ShotPixels) -> None:
        """ShotDataError unless the shot's channels are the model's."""
        energies = np.asarray(shot.energies_ev, dtype=np.float64)
        if energies.shape != self.energies_ev.shape or not np.array_equal(energies, self.energies_ev):
            raise ShotDataError("the shot's channel energies differ from those of the batched model")

    def _buffer(self, name: str, size: int, dtype: torch.dtype, width: tuple[int, ...] = ()) -> torch.Tensor:
        """A reusable device buffer of ``size`` rows, grown (never shrunk) when a batch needs more."""
        stored = self._storage.get(name)
        if stored is None or stored.shape[0] < size or stored.shape[1:] != width or stored.dtype != dtype:
            stored = torch.empty((size, *width), dtype=dtype, device=self.device)
            self._storage[name] = stored
        return stored[:size]

    def _fill(self, name: str, values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        values = np.ascontiguousarray(values)
        buffer = self._buffer(name, values.shape[0], dtype, values.shape[1:])
        buffer.copy_(torch.from_numpy(values).to(dtype))
        return buffer

    def load(self, problems: Sequence[ShotProblem]) -> None:
        """Put the shoebox pixels and spectra of a batch of shots (checked ShotProblems) on the device
        (the batch's buffers when ``gathered``; otherwise each problem holds its own)."""
        self.problems = list(problems)
        if not self.gathered:
            return
        shots = [problem.shot for problem in self.problems]
        counts = np.array([shot.n_pixels for shot in shots], dtype=np.int64)
        self.first_pixel = np.concatenate(([0], np.cumsum(counts)))
        self.fast = self._fill("fast", np.concatenate([shot.pixel_fast for shot in shots]), torch.int64)
        self.slow = self._fill("slow", np.concatenate([shot.pixel_slow for shot in shots]), torch.int64)
        self.pixel_shot = self._fill("pixel_shot", np.repeat(np.arange(len(shots)), counts), torch.int64)
        self.data = self._fill("data", np.concatenate([shot.data_photons for shot in shots]), torch.float64)
        self.background = self._fill("background", np.concatenate([shot.background_photons for shot in shots]),
                                     torch.float64)
        trusted = [self.first_pixel[i] + np.flatnonzero(np.asarray(shot.trusted, dtype=bool))
                   for i, shot in enumerate(shots)]
        self.trusted_of_shot = [torch.as_tensor(indices, device=self.device) for indices in trusted]
        self.photons = self._fill("photons", np.stack([shot.photons for shot in shots]), torch.float64)
        self.readout_variance = torch.as_tensor([problem.tensors.readout_variance for problem in self.problems],
                                                dtype=torch.float64, device=self.device)
        directions, factor = [], []
        for problem in self.problems:
            shot_directions, shot_factor = pixel_factors(problem.detector, problem.tensors.fast, problem.tensors.slow,
                                                         problem.shot.polarization_fraction, problem.tensors.panel)
            directions.append(shot_directions)
            factor.append(shot_factor)
        self.directions = self._buffer("directions", int(self.first_pixel[-1]), torch.float64, (3,))
        self.directions.copy_(torch.cat(directions))
        self.factor = self._buffer("factor", int(self.first_pixel[-1]), torch.float64)
        self.factor.copy_(torch.cat(factor))
        spreads = [problem.spread for problem in self.problems]
        if any(matrix is None for matrix in spreads) and any(matrix is not None for matrix in spreads):
            raise ValueError("a batch must model the point spread for all of its shots or for none")
        self.spread = block_diagonal_spreads(spreads) if spreads and spreads[0] is not None else None

    def _pixels(self, shots: Sequence[int], trusted: bool) -> torch.Tensor:
        """Indices (into the batch's pixel buffers) of the shots' trusted or all pixels, in shot order."""
        if trusted:
            return torch.cat([self.trusted_of_shot[shot] for shot in shots])
        return torch.cat([torch.arange(int(self.first_pixel[shot]), int(self.first_pixel[shot + 1]), device=self.device)
                          for shot in shots])

    def _geometry(self, shots: Sequence[int], values: torch.Tensor, pixels: torch.Tensor):
        """Directions and factors of the pixels: the cached ones, or recomputed for moved detectors."""
        if not any(self.problems[shot].moves_detector for shot in shots):
            return self.directions[pixels], self.factor[pixels]
        directions, factor = [], []
        for row, shot in enumerate(shots):
            problem = self.problems[shot]
            mine = pixels[self.pixel_shot[pixels] == shot]
            panel = (None if problem.tensors.panel is None
                     else problem.tensors.panel[mine - int(self.first_pixel[shot])])
            shot_directions, shot_factor = pixel_factors(problem.detector_at(values[row]), self.fast[mine],
                                                         self.slow[mine], problem.shot.polarization_fraction, panel)
            directions.append(shot_directions)
            factor.append(shot_factor)
        return torch.cat(directions), torch.cat(factor)

    def bragg(self, shots: Sequence[int], values: torch.Tensor,
              trusted: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G * Bragg photons of the shots' pixels for ``values`` (len(shots), 13), differentiable,
        spread by the detector's point spread when the batch models one (a ``gathered`` model's kernel).

        Returns the photons, the pixels' indices into the batch buffers and their row in ``shots``.
        """
        photons, pixels, rows = self._to_spread(shots, values, trusted)
        if self.spread is not None:
            photons = spread(self.spread.photons, photons)[pixels]
        return photons, pixels, rows

    def bragg_with_variance(self, shots: Sequence[int], values: torch.Tensor,
                            trusted: bool = True) -> tuple[PixelPhotons, torch.Tensor, torch.Tensor]:
        """:meth:`bragg` with the photons' Poisson variance
        (:meth:`xfel_spread.stage1.refine.ShotProblem.photons`)."""
        photons, pixels, rows = self._to_spread(shots, values, trusted)
        return PixelPhotons.from_unspread(self.spread, photons, pixels), pixels, rows

    def _to_spread(self, shots: Sequence[int], values: torch.Tensor,
                   trusted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unspread G * Bragg photons :meth:`bragg` needs: at the shots' pixels without a point
        spread; behind one, on the whole batch buffer (every shoebox pixel of the shots, zeros
        elsewhere), to be spread and then taken at the pixels. Returns them, the pixels and their rows."""
        pixels = self._pixels(shots, trusted)
        row_of_shot = torch.full((len(self.problems),), -1, dtype=torch.int64, device=self.device)
        row_of_shot[torch.as_tensor(list(shots), device=self.device)] = torch.arange(len(shots), device=self.device)
        rows = row_of_shot[self.pixel_shot[pixels]]
        if self.spread is None:
            return self._unspread_bragg(shots, values, pixels, rows), pixels, rows
        # Light reaches a trusted pixel from every pixel of its shot's shoeboxes. The batch's map is
        # block-diagonal, so the shots not asked for (zeros here) add nothing to those asked for.
        every = self._pixels(shots, trusted=False)
        bragg = self._unspread_bragg(shots, values, every, row_of_shot[self.pixel_shot[every]])
        batch = torch.zeros(self.pixel_shot.numel(), dtype=bragg.dtype, device=self.device).index_add(0, every, bragg)
        return batch, pixels, rows

    def _unspread_bragg(self, shots: Sequence[int], values: torch.Tensor, pixels: torch.Tensor,
                        rows: torch.Tensor) -> torch.Tensor:
        """G * Bragg photons at ``pixels`` (of the shots in ``rows``) before any point spread."""
        directions, factor = self._geometry(shots, values, pixels)
        states = [self.problems[shot].crystal.crystal_state(values[row]) for row, shot in enumerate(shots)]
        domain_matrices = torch.stack([state.domain_matrices for state in states])
        variances = [state.mosaic_variance for state in states]
        if any(variance is None for variance in variances) and any(variance is not None for variance in variances):
            raise ValueError("a batch must model an analytic mosaic spread for all of its shots or for none")
        mosaic_variance = None if variances[0] is None else torch.stack([v.reshape(-1) for v in variances])
        photons = self.photons[torch.as_tensor(list(shots), device=self.device)]
        return batched_bragg_photons(directions, factor, rows, domain_matrices, values[:, NCELLS],
                                     values[:, INDEX["G"]], photons, self.inverse_wavelengths, self.amplitudes,
                                     REFERENCE_BEAM_SIZE_M, mosaic_variance)

    def nll_and_gradients(self, requests: dict[int, tuple[ParameterSpace, np.ndarray]]
                          ) -> dict[int, tuple[float, np.ndarray]]:
        """Each requested shot's NLL (plus restraints) and gradient in its scaled parameters.

        ``requests`` maps a shot (its position in the loaded batch) to the parameter space of its
        current refinement pass and the scaled parameters to evaluate. One forward and one backward
        pass over the requested shots' trusted pixels serve them all; without ``gathered``, each
        shot's own (``shot_evaluator``: refine_shot's values to the bit).
        """
        if not self.gathered:
            return {shot: shot_evaluator(self.problems[shot], self.amplitudes)(*requests[shot])
                    for shot in sorted(requests)}
        shots = sorted(requests)
        leaves = [torch.tensor(requests[shot][1], dtype=torch.float64, device=self.device, requires_grad=True)
                  for shot in shots]
        values = torch.stack([requests[shot][0].physical(leaf) for shot, leaf in zip(shots, leaves)])
        bragg, pixels, rows = self.bragg(shots, values, trusted=True)
        if any(self.problems[shot].active_plane_share() is not None for shot in shots):
            # Each shot's planes less the share of its Bragg photons they hold, as refine_shot takes
            # them (ShotProblem.planes); its trusted pixels are contiguous, in the order of ``shots``.
            parts = torch.split(bragg, torch.bincount(rows, minlength=len(shots)).tolist())
            background = torch.cat([self.problems[shot].planes(part) for shot, part in zip(shots, parts)])
        else:
            background = self.background[pixels]
        model = background + bragg
        readout_variance = self.readout_variance[torch.as_tensor(shots, device=self.device)][rows]
        # The expected photons are their own variance, behind a point spread too (ShotProblem.nll).
        per_pixel = pixel_nll(model, self.data[pixels], readout_variance)
        per_shot = torch.zeros(len(shots), dtype=torch.float64, device=self.device).index_add(0, rows, per_pixel)
        per_shot = per_shot + torch.stack([self.problems[shot].space.restraint_penalty(values[row])
                                           for row, shot in enumerate(shots)])
        per_shot.sum().backward()
        return {shot: (float(per_shot[row].detach()), leaf.grad.detach().cpu().numpy())
                for row, (shot, leaf) in enumerate(zip(shots, leaves))}

    def bragg_all_pixels(self, shots: Sequence[int], values: torch.Tensor) -> list[PixelPhotons]:
        """G * Bragg photons and their variance on every shoebox pixel of each shot (no gradient),
        one per shot."""
        if not self.gathered:
            with torch.no_grad():
                return [self.problems[shot].photons(values[row], self.amplitudes, all_pixels(self.problems[shot]))
                        for row, shot in enumerate(shots)]
        with torch.no_grad():
            bragg, _, rows = self.bragg_with_variance(shots, values, trusted=False)
        counts = torch.bincount(rows, minlength=len(shots)).tolist()
        if bragg.variance is bragg.mean:
            return [PixelPhotons.poisson(part) for part in torch.split(bragg.mean, counts)]
        return [PixelPhotons(mean, variance) for mean, variance in zip(torch.split(bragg.mean, counts),
                                                                        torch.split(bragg.variance, counts))]


class Lockstep:
    """One minimisation per shot, each in its own thread, whose evaluations are served in batches.

    A task receives an :data:`~xfel_spread.stage1.refine.Evaluator` and returns its result. Whenever
    every running task waits for an evaluation, ``serve`` gets all their requests at once and returns
    one reply per task (a (NLL, gradient) pair, or an exception the task's evaluation raises).
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._requests: dict[int, tuple[ParameterSpace, np.ndarray]] = {}
        self._replies: dict[int, object] = {}
        self._running: set[int] = set()

    def _evaluator(self, key: int) -> Evaluator:
        def evaluate(space: ParameterSpace, scaled: np.ndarray) -> tuple[float, np.ndarray]:
            with self._condition:
                self._requests[key] = (space, scaled)
                self._condition.notify_all()
                self._condition.wait_for(lambda: key in self._replies)
                reply = self._replies.pop(key)
            if isinstance(reply, BaseException):
                raise reply
            return reply
        return evaluate

    def run(self, tasks: dict[int, Callable[[Evaluator], object]],
            serve: Callable[[dict[int, tuple[ParameterSpace, np.ndarray]]], dict[int, object]]) -> dict[int, object]:
        """Run every task to its end; returns each task's result, or the exception it raised."""
        results: dict[int, object] = {}

        def work(key: int, task: Callable[[Evaluator], object]) -> None:
            try:
                results[key] = task(self._evaluator(key))
            except BaseException as exc:  # noqa: BLE001 - reported per task
                results[key] = exc
            finally:
                with self._condition:
                    self._running.discard(key)
                    self._condition.notify_all()

        self._running = set(tasks)
        threads = [threading.Thread(target=work, args=item, daemon=True) for item in tasks.items()]
        for thread in threads:
            thread.start()
        while True:
            with self._condition:
                self._condition.wait_for(lambda: len(self._requests) == len(self._running))
                if not self._running:
                    break
                batch, self._requests = self._requests, {}
            try:
                replies = serve(batch)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its shots, not the stage
                replies = {key: exc for key in batch}
            with self._condition:
                self._replies.update(replies)
                self._condition.notify_all()
        for thread in threads:
            thread.join()
        return results


def refine_batch(shots: Sequence[ShotPixels], amplitudes: BatchedForwardModel | AmplitudeLookup | AmplitudeGrid,
                 settings: Stage1Settings, device=None, psf: DetectorPsf | None = None) -> list[ShotFit]:
    """Refine a batch of shots at once through the batched forward model; never raises per shot.

    ``amplitudes`` is an :class:`BatchedForwardModel` (kept and reused across batches; ``device`` is
    then its device) or a lookup/grid to build one from on ``device`` (default: ``settings.device``).
    Returns one ShotFit per shot, in order, as :func:`~xfel_spread.stage1.refine.refine_shot` would;
    ``seconds`` is the batch's wall time divided by its shots.
    """
    started = time.perf_counter()
    if not shots:
        return []
    if isinstance(amplitudes, BatchedForwardModel):
        model = amplitudes
    else:
        device = settings.torch_device() if device is None else torch.device(device)
        model = BatchedForwardModel(amplitudes, shots[0].energies_ev, device)
    reasons: dict[int, str] = {}
    problems: dict[int, ShotProblem] = {}
    for index, shot in enumerate(shots):
        try:
            model.check_shot(shot)
            problems[index] = ShotProblem(shot, settings, model.device, psf)
        except Exception as exc:  # noqa: BLE001 - reported per shot
            reasons[index] = describe_exception(exc)
    order = list(problems)
    if order:
        model.load([problems[index] for index in order])
    batch_of = {index: position for position, index in enumerate(order)}

    starts = _start_summaries(model, problems, order, reasons)
    running = [index for index in order if index not in reasons]

    def refine_task(index: int) -> Callable[[Evaluator], object]:
        return lambda evaluate: minimize_shot(problems[index], evaluate)

    def restart_task(index: int) -> Callable[[Evaluator], object]:
        return lambda evaluate: restart_with_broad_spots(problems[index], evaluate, minimizations[index])

    def serve(requests):
        replies = model.nll_and_gradients({batch_of[index]: request for index, request in requests.items()})
        return {index: replies[batch_of[index]] for index in requests}

    minimizations = Lockstep().run({index: refine_task(index) for index in running}, serve)
    finals = _final_summaries(model, problems, minimizations, batch_of, reasons)
    # A shot that lost its spots restarts with broad spots, as in refine_shot; the batch's other shots are done.
    again = [index for index, final in finals.items() if should_restart(problems[index], minimizations[index], final)]
    if again:
        restarts = Lockstep().run({index: restart_task(index) for index in again}, serve)
        minimizations.update(restarts)
        finals.update(_final_summaries(model, problems, restarts, batch_of, reasons))
    # stage1.broad_start: always refines every other shot from the broad-spot start too and keeps the lower NLL.
    tries = [index for index in finals if should_try_broad(problems[index], minimizations[index])]
    if tries:
        broad = Lockstep().run({index: restart_task(index) for index in tries}, serve)
        broad_finals = _final_summaries(model, problems, broad, batch_of, reasons)
        for index in tries:
            if index in broad_finals:
                minimizations[index], finals[index] = better_start(
                    problems[index], (minimizations[index], finals[index]), (broad[index], broad_finals[index]))
    # The free-domain refinement (stage1.free_domains) runs shot by shot through refine_shot's model: its
    # crystals have their own domains, which the batched model's per-shot layout does not hold.
    for index in list(finals):
        if index not in reasons and can_free_domains(problems[index], minimizations[index], finals[index]):
            try:
                minimizations[index] = refine_free_domains(problems[index], model.amplitudes, minimizations[index])
                finals[index] = final_summary(problems[index], model.amplitudes, minimizations[index],
                                              all_pixels(problems[index]))
            except Exception as exc:  # noqa: BLE001 - reported per shot
                reasons[index] = describe_exception(exc)

    seconds = (time.perf_counter() - started) / max(len(shots), 1)
    fits = []
    for index, shot in enumerate(shots):
        if index in reasons:
            fits.append(failed_fit(shot, settings, reasons[index], seconds, problems.get(index), starts.get(index)))
        else:
            fits.append(finished_fit(problems[index], starts[index], finals[index], minimizations[index], seconds))
    return fits


def _start_summaries(model: BatchedForwardModel, problems: dict[int, ShotProblem], order: list[int],
                     reasons: dict[int, str]) -> dict:
    """Start G (closed form when not given) and start summary of every loaded shot, in one evaluation
    (two with the broad-spot restart on: its start G is the closed form with broad spots)."""
    summaries = {}
    if not order:
        return summaries
    try:
        unit_values = torch.stack([problems[index].unit_start_values() for index in order])
        unit_bragg = model.bragg_all_pixels(range(len(order)), unit_values)
        broad_bragg = [None] * len(order)
        if any(problems[index].settings.broad_ncells is not None for index in order):
            broad_values = torch.stack([problems[index].broad_start_values() for index in order])
            broad_bragg = model.bragg_all_pixels(range(len(order)), broad_values)
    except Exception as exc:  # noqa: BLE001 - a failed batch fails its shots, not the stage
        reasons.update({index: describe_exception(exc) for index in order})
        return summaries
    for index, bragg, broad in zip(order, unit_bragg, broad_bragg):
        problem = problems[index]
        try:
            problem.set_start(bragg.mean[problem.tensors.trusted],
                              None if broad is None else broad.mean[problem.tensors.trusted])
            start_values = torch.as_tensor(problem.start_values, device=model.device)
            summaries[index] = summarize_model(problem, start_values, bragg.scaled(start_values[INDEX["G"]]))
        except Exception as exc:  # noqa: BLE001 - reported per shot
            reasons[index] = describe_exception(exc)
    return summaries


def _final_summaries(model: BatchedForwardModel, problems: dict[int, ShotProblem], minimizations: dict,
                     batch_of: dict[int, int], reasons: dict[int, str]) -> dict:
    """Summary of every minimised shot at its final values, in one evaluation."""
    for index, result in minimizations.items():
        if isinstance(result, BaseException):
            reasons[index] = describe_exception(result)
    done = sorted(index for index in minimizations if index not in reasons)
    summaries = {}
    if not done:
        return summaries
    try:
        values = torch.stack([torch.as_tensor(minimizations[index].values, device=model.device) for index in done])
        bragg = model.bragg_all_pixels([batch_of[index] for index in done], values)
    except Exception as exc:  # noqa: BLE001 - a failed batch fails its shots, not the stage
        reasons.update({index: describe_exception(exc) for index in done})
        return summaries
    for row, index in enumerate(done):
        summaries[index] = summarize_model(problems[index], values[row], bragg[row])
    return summaries

