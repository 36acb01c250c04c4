"""The driver of the per-shot pixel refinement (stages 8-9): what ``spread-stage1`` and ``spread-exa`` run.

:func:`run_stage1` refines every lattice of one annulus shard against its shoebox pixels and writes
``P_refined.expt``, ``P_shots.tsv`` and ``P_domains.tsv``. It is collective over an MPI communicator (``comm``; a
:class:`~xfel_spread.mpi.SerialComm` runs it in-process, without mpirun). Ranks take
lattices round-robin by their position in the annulus experiment list (rank r: r, r + N, ...); rank
0 gathers the results in lattice order and writes the outputs, so the files are the same for any
number of ranks (torch runs ``threads`` threads per rank: reductions split over a different number
of threads round differently). A lattice whose shoeboxes or refinement fail becomes a row with
converged 0 and the reason; the job goes on.

Two ways to refine a rank's lattices: :func:`refine_one_by_one` (stage 8, ``refine_shot`` per
lattice) and :func:`refine_in_batches` (stage 9, ``refine_batch`` in batches of
``stage1.batch_shots``, falling back to one shot at a time when a whole batch fails,
:func:`refine_batch_or_singly`). :func:`score_stage1` scores the refined lattices against the truth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from xfel_spread.config import ConfigError, load_config
from xfel_spread.errors import USER_ERRORS, OptionError
from xfel_spread.progress import Progress
from xfel_spread.stage1.io import Stage1FileError

logger = logging.getLogger("xfel_spread.stage1")

#: Seconds between two progress lines of a rank.
PROGRESS_INTERVAL_S = 30.0

#: ``refine(annulus, grid, lattices, settings, device, progress, psf)``: a rank's LatticeResult list.
Refine = Callable[..., list]


def detector_psf(fwhm_mm: float | None, radius_px: int | None):
    """The DetectorPsf of ``--psf-fwhm-mm`` and ``--psf-radius-px``, or None when neither is given.

    OptionError when only one is given, or when the two do not make a point spread."""
    from xfel_spread.stage1.psf import DetectorPsf

    given = (fwhm_mm is not None, radius_px is not None)
    if not any(given):
        return None
    if not all(given):
        raise OptionError("--psf-fwhm-mm and --psf-radius-px go together; give both or neither")
    try:
        return DetectorPsf(fwhm_mm, radius_px)
    except ValueError as error:
        raise OptionError(f"--psf-fwhm-mm {fwhm_mm} --psf-radius-px {radius_px}: {error}") from None


def resolve_device(requested: str, local_rank: int, source: str = "stage1.device") -> str:
    """``cpu``, or the CUDA device of this rank (``cuda:{local_rank mod GPUs}``); auto picks cuda when present.

    ConfigError (naming ``source``) when cuda is asked for and torch sees none."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"{source}: stage1.device is cuda but torch sees no CUDA device")
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def local_rank(comm) -> int:
    """This rank's number on its node, from the launcher's environment (else the global rank)."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return comm.Get_rank()


def check_source(source: str, config_path, mtz, amplitudes) -> None:
    """The structure-factor file given must be the one ``stage1.structure_factors`` asks for (ConfigError)."""
    if source == "merged" and mtz is None:
        raise ConfigError(f"{config_path}: stage1.structure_factors is merged; give --mtz, not --amplitudes")
    if source == "model" and amplitudes is None:
        raise ConfigError(f"{config_path}: stage1.structure_factors is model; give --amplitudes, not --mtz")


def prepared_lattices(annulus, grid, lattices: Iterable[int], shoebox_size_px: int, failures: list):
    """Yield ``(lattice, ShotPixels, n_pixels, n_rois_no_f)`` ready to refine; the rest go to ``failures``.

    Each shot's spectrum is on the annulus metadata's channels (those of ``grid``; see
    :func:`xfel_spread.stage1.rois.annulus_on_channels`).

    ROIs without a background plane or a structure factor are dropped; a lattice left with none, or
    whose shoeboxes cannot be read, becomes a failed result.
    """
    from xfel_spread.stage1.io import failed_lattice_result
    from xfel_spread.stage1.refine import describe_exception
    from xfel_spread.stage1.rois import read_lattices, rois_with_amplitude, select_rois, shot_on_channels

    def identity(lattice):
        image = annulus.image_index(lattice)
        return int(annulus.metadata.shot_index[image]), image, annulus.experiments[lattice].identifier

    def on_error(lattice, error):
        failures.append(failed_lattice_result(lattice, *identity(lattice), f"shoeboxes: {describe_exception(error)}"))

    for lattice, shot, counts in read_lattices(annulus, lattices, shoebox_size_px, on_error):
        shot = shot_on_channels(shot, annulus.metadata.energy_ev, annulus.shard_path)
        with_amplitude = rois_with_amplitude(grid, shot.miller_index)
        no_f = int((~with_amplitude).sum())
        shot = select_rois(shot, with_amplitude)
        if shot.n_rois == 0:
            failures.append(failed_lattice_result(
                lattice, *identity(lattice),
                f"no shoebox to refine ({counts.reflections} reflections: {counts.no_background} without "
                f"a background plane, {no_f} without a structure factor)", 0, no_f, 0))
            continue
        yield lattice, shot, shot.n_pixels, no_f


def refine_one_by_one(annulus, grid, lattices, settings, device, progress, psf) -> list:
    """Stage 8: each lattice through ``refine_shot``."""
    from xfel_spread.sim.forward import AmplitudeLookup
    from xfel_spread.stage1.io import lattice_result
    from xfel_spread.stage1.refine import refine_shot

    amplitudes = AmplitudeLookup(grid, device)
    results = []
    for lattice, shot, n_pixels, no_f in prepared_lattices(annulus, grid, lattices, settings.shoebox_size_px,
                                                           results):
        results.append(lattice_result(lattice, refine_shot(shot, amplitudes, settings, psf), no_f, n_pixels))
        progress.advance()
    progress.finish()
    return results


def refine_batch_or_singly(shots: Sequence, model, settings, psf=None) -> list:
    """``refine_batch`` of ``shots``; if the whole batch fails, each shot alone (one ShotFit or exception each).

    ``refine_batch`` never fails per shot, but the batch as a whole can (loading it on the device):
    then the shot that breaks it is found by refining them one at a time, and the others go on."""
    from xfel_spread.stage1.batched import refine_batch

    try:
        return refine_batch(shots, model, settings, psf=psf)
    except Exception:  # noqa: BLE001 - find the shot that breaks the batch; the others go on
        logger.warning("a batch of %d lattices failed; refining them one at a time", len(shots), exc_info=True)
    fits = []
    for shot in shots:
        try:
            fits.append(refine_batch([shot], model, settings, psf=psf)[0])
        except Exception as error:  # noqa: BLE001 - reported in the shot's row
            fits.append(error)
    return fits


def refine_in_batches(annulus, grid, lattices, settings, device, progress, psf) -> list:
    """Stage 9: lattices in batches of ``stage1.batch_shots`` through ``refine_batch``, with one
    batched forward model (structure factors resident on the device, buffers reused) per rank."""
    from xfel_spread.stage1.batched import BatchedForwardModel

    model = BatchedForwardModel(grid, annulus.metadata.energy_ev, device)
    results, batch = [], []
    for prepared in prepared_lattices(annulus, grid, lattices, settings.shoebox_size_px, results):
        batch.append(prepared)
        if len(batch) == settings.batch_shots:
            results += batch_results(batch, refine_batch_or_singly([shot for _, shot, _, _ in batch], model,
                                                                   settings, psf))
            progress.advance(len(batch))
            batch = []
    if batch:
        results += batch_results(batch, refine_batch_or_singly([shot for _, shot, _, _ in batch], model, settings, psf))
        progress.advance(len(batch))
    progress.finish()
    return results


def batch_results(batch: Sequence[tuple], fits: Sequence) -> list:
    """The LatticeResult of each ``(lattice, shot, n_pixels, n_rois_no_f)`` of a batch from its fit or exception."""
    from xfel_spread.stage1.io import failed_lattice_result, lattice_result
    from xfel_spread.stage1.refine import describe_exception

    results = []
    for (lattice, shot, n_pixels, no_f), fit in zip(batch, fits):
        if isinstance(fit, Exception):
            results.append(failed_lattice_result(lattice, shot.shot_index, shot.image_index, shot.identifier,
                                                 describe_exception(fit), shot.n_rois, no_f, n_pixels))
        else:
            results.append(lattice_result(lattice, fit, no_f, n_pixels))
    return results


@dataclass(frozen=True, kw_only=True)
class PixelModelOptions:
    """What a stage that evaluates the pixel model takes beside its files, given by keyword: the
    source of |F| (``mtz`` merged intensities or the model's ``amplitudes`` table), torch threads,
    and the detector point spread (FWHM and kernel radius; None without one)."""

    mtz: str | None = None
    amplitudes: str | None = None
    threads: int = 1
    psf_fwhm_mm: float | None = None
    psf_radius_px: int | None = None


@dataclass(frozen=True)
class Stage1Inputs(PixelModelOptions):
    """The files and options of one run of the stage (the command line of ``spread-stage1``/``spread-exa``)."""

    config: str
    annulus_prefix: str
    shard: str
    output_prefix: str


def _prepare(inputs: Stage1Inputs, comm):
    """Settings, annulus shard, amplitude grid, device and point spread of a run; user errors raised."""
    import torch

    from xfel_spread.stage1.io import load_amplitude_grid, output_paths, stage1_channels
    from xfel_spread.stage1.model import Stage1Settings
    from xfel_spread.stage1.rois import annulus_on_channels, open_annulus_shard

    if inputs.threads < 1:
        raise OptionError(f"--threads must be at least 1, got {inputs.threads}")
    torch.set_num_threads(inputs.threads)
    psf = detector_psf(inputs.psf_fwhm_mm, inputs.psf_radius_px)
    settings = Stage1Settings.from_config(load_config(inputs.config)["stage1"], inputs.config)
    check_source(settings.structure_factors, inputs.config, inputs.mtz, inputs.amplitudes)
    annulus = open_annulus_shard(inputs.annulus_prefix, inputs.shard)
    annulus = annulus_on_channels(annulus, stage1_channels(settings.structure_factors, annulus.metadata.energy_ev,
                                                           inputs.amplitudes))
    cells = [experiment.crystal.get_unit_cell().parameters() for experiment in annulus.experiments]
    grid = load_amplitude_grid(settings.structure_factors, annulus.metadata.energy_ev, inputs.mtz, inputs.amplitudes,
                               cells, str(annulus.experiments_path))
    device = resolve_device(settings.device, local_rank(comm), inputs.config)
    for path in output_paths(inputs.output_prefix).values():
        if not path.parent.is_dir():
            raise Stage1FileError(f"{path.parent}: output directory does not exist")
    return settings, annulus, grid, device, psf


def run_stage1(inputs: Stage1Inputs, program: str, refine: Refine, comm=None) -> list | None:
    """Refine every lattice of the annulus shard with ``refine`` and write the outputs; collective over ``comm``.

    ``comm`` defaults to ``MPI.COMM_WORLD``. Returns the LatticeResult list in lattice order on rank 0
    (None on the others). A user error found by any rank is raised on every rank as
    :class:`~xfel_spread.mpi.AgreedError`; a bug on one rank of several aborts the job.
    """
    from xfel_spread.mpi import abort_on_error, abort_on_unexpected_error, first_error, wait_for_all
    from xfel_spread.stage1.io import output_paths, write_domains_table, write_refined_experiments, write_shots_table

    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    error = None
    with abort_on_error(comm):
        try:
            settings, annulus, grid, device, psf = _prepare(inputs, comm)
        except USER_ERRORS as caught:
            error = caught
    first_error(comm, error)
    with abort_on_unexpected_error(comm):
        lattices = list(range(rank, annulus.n_lattices, size))
        if rank == 0:
            logger.info("%s: %d lattices of %s on %d rank(s), device %s, structure factors %s", program,
                        annulus.n_lattices, annulus.experiments_path, size, device, settings.structure_factors)
            logger.info("detector point spread: %s", "none modelled" if psf is None else
                        f"fiber, FWHM {psf.fwhm_mm:g} mm, kernel radius {psf.radius_px} px")
        progress = Progress(len(lattices), f"rank {rank}", logger.info, PROGRESS_INTERVAL_S, items="lattices")
        results = refine(annulus, grid, lattices, settings, device, progress, psf)
        wait_for_all(comm)  # lattices take unequal times: the ranks done first sleep, not spin
        gathered = comm.gather(results, root=0)
        if rank != 0:
            return None
        results = sorted((result for part in gathered for result in part), key=lambda result: result.lattice)
        if [result.lattice for result in results] != list(range(annulus.n_lattices)):
            raise RuntimeError("results do not cover every lattice exactly once")
        paths = output_paths(inputs.output_prefix)
        write_refined_experiments(annulus.experiments, results, paths["experiments"])
        write_shots_table(results, paths["shots"])
        write_domains_table(results, paths["domains"])
    return results


def score_stage1(dataset: str, stage1_prefixes: Sequence[str], dials_prefixes: Sequence[str], truths: Sequence[str],
                 table: str, text_path: str, plot: str, echo: TextIO | None = None) -> str:
    """Score the refined lattices of one dataset's shards against the truth (``spread-score-stage1``).

    Writes the per-lattice table, the summary text and its figure; returns the text, also written to
    ``echo`` (before the figure is drawn) when given. OptionError unless every stage-1 prefix has one
    DIALS prefix and one truth file."""
    from xfel_spread.atomic import atomic_output
    from xfel_spread.stage1.plots import plot_stage1_summary
    from xfel_spread.stage1.scoring import format_summary, score_shards, summarize, write_score_table

    if len({len(stage1_prefixes), len(dials_prefixes), len(truths)}) != 1:
        raise OptionError(f"give one --dials-prefix and one --truth per --stage1-prefix (got "
                          f"{len(stage1_prefixes)}, {len(dials_prefixes)}, {len(truths)})")
    scores = score_shards(stage1_prefixes, dials_prefixes, truths)
    summary = summarize(scores)
    write_score_table(scores, table)
    text = format_summary(dataset, summary)
    with atomic_output(text_path, "w") as stream:
        stream.write(text)
    if echo is not None:
        print(text, end="", file=echo, flush=True)
    plot_stage1_summary(plot, dataset, scores, summary)
    return text
