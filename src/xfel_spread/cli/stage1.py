"""Entry points of the per-shot pixel refinement (stages 8-9) and of its scoring.

``spread-stage1``: refine every lattice of one annulus shard against its shoebox pixels, one shot at
a time (``stage1.refine.refine_shot``), under MPI (``mpirun -n N spread-stage1 ...``).
``spread-exa``: the same through the batched forward-model API (``stage1.batched.refine_batch``), in
batches of ``stage1.batch_shots`` on ``stage1.device``; run one rank per GPU.
``spread-score-stage1``: the refined lattices of a dataset against the simulation's truth.

Ranks take lattices round-robin by their position in the annulus experiment list (rank r: r, r + N,
...); rank 0 gathers the results in lattice order and writes both outputs, so the files are the same
for any number of ranks (torch runs ``--threads`` threads per rank, 1 by default: reductions split
over a different number of threads round differently). A lattice whose shoeboxes or refinement fail
becomes a row with converged 0 and the reason; the job goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable

from xfel_spread.cli.simulate import INPUT_ERRORS, _run
from xfel_spread.config import load_config

logger = logging.getLogger("xfel_spread.stage1")

#: Seconds between two progress lines of a rank.
PROGRESS_INTERVAL_S = 30.0


class Progress:
    """Logs, at most every ``interval`` seconds, lattices done, rate and time left of one rank's share."""

    def __init__(self, total: int, label: str, interval: float = PROGRESS_INTERVAL_S, clock=time.monotonic):
        self.total, self.label, self.interval, self.clock = total, label, interval, clock
        self.started = self.last_report = clock()
        self.done = 0

    def advance(self, count: int = 1) -> None:
        if count <= 0:
            return
        self.done += count
        now = self.clock()
        if now - self.last_report >= self.interval or self.done == self.total:
            self.last_report = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info("%s: %d/%d lattices, %.3f lattices/s, %.0f s left", self.label, self.done, self.total,
                        rate, left)


def _stage1_parser(program: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program, description=description)
    parser.add_argument("--config", required=True, help="pipeline settings of the stage (YAML, section stage1)")
    parser.add_argument("--annulus-prefix", required=True,
                        help="annulus shard prefix A: reads A_annulus.expt and A_annulus.refl")
    parser.add_argument("--shard", required=True, help="the simulated shard (HDF5) the experiments' images are in")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--mtz", help="merged intensities (MTZ; stage1.structure_factors: merged)")
    sources.add_argument("--amplitudes", help="per-channel amplitude table (HDF5; stage1.structure_factors: model)")
    parser.add_argument("--output-prefix", required=True, help="write P_refined.expt and P_shots.tsv")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default 1)")
    parser.add_argument("--psf-fwhm-mm", type=float,
                        help="model the detector's fiber point spread of this FWHM (mm); with --psf-radius-px")
    parser.add_argument("--psf-radius-px", type=int, help="radius of the point-spread kernel (pixels)")
    return parser


def detector_psf(arguments):
    """The DetectorPsf the options ask for, or None; ValueError when only one of the two is given."""
    from xfel_spread.stage1.psf import DetectorPsf

    given = (arguments.psf_fwhm_mm is not None, arguments.psf_radius_px is not None)
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--psf-fwhm-mm and --psf-radius-px go together; give both or neither")
    return DetectorPsf(arguments.psf_fwhm_mm, arguments.psf_radius_px)


def resolve_device(requested: str, local_rank: int) -> str:
    """``cpu``, or the CUDA device of this rank (``cuda:{local_rank mod GPUs}``); auto picks cuda when present."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError("stage1.device is cuda but torch sees no CUDA device")
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def local_rank(comm) -> int:
    """This rank's number on its node, from the launcher's environment (else the global rank)."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return comm.Get_rank()


def _prepared_lattices(annulus, grid, lattices: Iterable[int], shoebox_size_px: int, failures: list):
    """Yield ``(lattice, ShotPixels, n_pixels, n_rois_no_f)`` ready to refine; the rest go to ``failures``.

    ROIs without a background plane or a structure factor are dropped; a lattice left with none, or
    whose shoeboxes cannot be read, becomes a failed result.
    """
    from xfel_spread.stage1.io import failed_lattice_result
    from xfel_spread.stage1.refine import describe_exception
    from xfel_spread.stage1.rois import read_lattices, rois_with_amplitude, select_rois

    def identity(lattice):
        image = annulus.image_index(lattice)
        return int(annulus.metadata.shot_index[image]), image, annulus.experiments[lattice].identifier

    def on_error(lattice, error):
        failures.append(failed_lattice_result(lattice, *identity(lattice), f"shoeboxes: {describe_exception(error)}"))

    for lattice, shot, counts in read_lattices(annulus, lattices, shoebox_size_px, on_error):
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


def run_stage1(arguments, program: str, refine: Callable) -> None:
    """The body of ``spread-stage1`` and ``spread-exa``: ``refine(annulus, grid, lattices, settings,
    device, progress, psf)`` returns the rank's :class:`LatticeResult` list."""
    import torch
    from mpi4py import MPI

    from xfel_spread.merging.parallel import abort_on_unexpected_error, first_error
    from xfel_spread.stage1.io import load_amplitude_grid, output_paths, write_refined_experiments, write_shots_table
    from xfel_spread.stage1.model import Stage1Settings
    from xfel_spread.stage1.rois import open_annulus_shard

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    error = None
    try:
        if arguments.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {arguments.threads}")
        torch.set_num_threads(arguments.threads)
        psf = detector_psf(arguments)
        settings = Stage1Settings.from_config(load_config(arguments.config)["stage1"], arguments.config)
        _check_source(settings.structure_factors, arguments)
        annulus = open_annulus_shard(arguments.annulus_prefix, arguments.shard)
        grid = load_amplitude_grid(settings.structure_factors, annulus.metadata.energy_ev,
                                   arguments.mtz, arguments.amplitudes)
        device = resolve_device(settings.device, local_rank(comm))
        for path in output_paths(arguments.output_prefix).values():
            if not path.parent.is_dir():
                raise OSError(f"{path.parent}: output directory does not exist")
    except INPUT_ERRORS as caught:
        error = caught
    try:
        first_error(comm, error)
    except ValueError:
        if rank != 0:
            sys.exit(1)
        raise
    with abort_on_unexpected_error(comm):
        lattices = list(range(rank, annulus.n_lattices, size))
        if rank == 0:
            logger.info("%s: %d lattices of %s on %d rank(s), device %s, structure factors %s", program,
                        annulus.n_lattices, annulus.experiments_path, size, device, settings.structure_factors)
            logger.info("detector point spread: %s", "none modelled" if psf is None else
                        f"fiber, FWHM {psf.fwhm_mm:g} mm, kernel radius {psf.radius_px} px")
        progress = Progress(len(lattices), f"rank {rank}")
        results = refine(annulus, grid, lattices, settings, device, progress, psf)
        gathered = comm.gather(results, root=0)
        if rank != 0:
            return
        results = sorted((result for part in gathered for result in part), key=lambda result: result.lattice)
        if [result.lattice for result in results] != list(range(annulus.n_lattices)):
            raise RuntimeError("results do not cover every lattice exactly once")
        paths = output_paths(arguments.output_prefix)
        write_refined_experiments(annulus.experiments, results, paths["experiments"])
        write_shots_table(results, paths["shots"])
    converged = sum(result.row.get("converged") == 1 for result in results)
    print(f"{program}: {converged} of {len(results)} lattices converged ({paths['shots']})", file=sys.stderr)


def _check_source(source: str, arguments) -> None:
    """The structure-factor file given must be the one ``stage1.structure_factors`` asks for."""
    if source == "merged" and arguments.mtz is None:
        raise ValueError(f"{arguments.config}: stage1.structure_factors is merged; give --mtz, not --amplitudes")
    if source == "model" and arguments.amplitudes is None:
        raise ValueError(f"{arguments.config}: stage1.structure_factors is model; give --amplitudes, not --mtz")


def refine_one_by_one(annulus, grid, lattices, settings, device, progress, psf) -> list:
    """Stage 8: each lattice through ``refine_shot``."""
    from xfel_spread.sim.forward import AmplitudeLookup
    from xfel_spread.stage1.io import lattice_result
    from xfel_spread.stage1.refine import refine_shot

    amplitudes = AmplitudeLookup(grid, device)
    results = []
    for lattice, shot, n_pixels, no_f in _prepared_lattices(annulus, grid, lattices, settings.shoebox_size_px,
                                                            results):
        results.append(lattice_result(lattice, refine_shot(shot, amplitudes, settings, psf), no_f, n_pixels))
        progress.advance()
    progress.advance(len(lattices) - progress.done)
    return results


def refine_in_batches(annulus, grid, lattices, settings, device, progress, psf) -> list:
    """Stage 9: lattices in batches of ``stage1.batch_shots`` through ``refine_batch``, with one
    batched forward model (structure factors resident on the device, buffers reused) per rank."""
    from xfel_spread.stage1.batched import BatchedForwardModel, refine_batch
    from xfel_spread.stage1.io import failed_lattice_result, lattice_result
    from xfel_spread.stage1.refine import describe_exception

    model = BatchedForwardModel(grid, annulus.metadata.energy_ev, device)
    results, batch = [], []

    def flush():
        try:
            fits = refine_batch([shot for _, shot, _, _ in batch], model, settings, psf=psf)
        except Exception:  # noqa: BLE001 - find the shot that breaks the batch; the others go on
            logger.warning("a batch of %d lattices failed; refining them one at a time", len(batch), exc_info=True)
            fits = [_single(shot) for _, shot, _, _ in batch]
        for (lattice, shot, n_pixels, no_f), fit in zip(batch, fits):
            if isinstance(fit, Exception):
                results.append(failed_lattice_result(lattice, shot.shot_index, shot.image_index, shot.identifier,
                                                     describe_exception(fit), shot.n_rois, no_f, n_pixels))
            else:
                results.append(lattice_result(lattice, fit, no_f, n_pixels))
        progress.advance(len(batch))
        batch.clear()

    def _single(shot):
        try:
            return refine_batch([shot], model, settings, psf=psf)[0]
        except Exception as error:  # noqa: BLE001 - reported in the shot's row
            return error

    for prepared in _prepared_lattices(annulus, grid, lattices, settings.shoebox_size_px, results):
        batch.append(prepared)
        if len(batch) == settings.batch_shots:
            flush()
    if batch:
        flush()
    progress.advance(len(lattices) - progress.done)
    return results


def stage1_main(argv: list[str] | None = None) -> int:
    parser = _stage1_parser("spread-stage1", "Refine every lattice of one annulus shard against its shoebox "
                                             "pixels, shot by shot (run it under MPI).")
    arguments = parser.parse_args(argv)
    return _run("spread-stage1", lambda: run_stage1(arguments, "spread-stage1", refine_one_by_one))


def exa_main(argv: list[str] | None = None) -> int:
    parser = _stage1_parser("spread-exa", "Refine every lattice of one annulus shard through the batched "
                                          "forward-model API (one MPI rank per GPU).")
    arguments = parser.parse_args(argv)
    return _run("spread-exa", lambda: run_stage1(arguments, "spread-exa", refine_in_batches))


def score_stage1_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spread-score-stage1",
        description="Score the per-shot refinement of one dataset against the simulation's truth.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the titles")
    parser.add_argument("--stage1-prefix", action="append", required=True,
                        help="output prefix of one shard's stage 1 (repeat for every shard, in order)")
    parser.add_argument("--dials-prefix", action="append", required=True,
                        help="output prefix of the same shard's reindex stage (repeat, same order)")
    parser.add_argument("--truth", action="append", required=True,
                        help="the same shard's truth JSON (repeat, same order)")
    parser.add_argument("--table", required=True, help="per-lattice scores to write (TSV)")
    parser.add_argument("--text", required=True, help="summary to write (text)")
    parser.add_argument("--plot", required=True, help="summary figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.atomic import atomic_output
        from xfel_spread.stage1.plots import plot_stage1_summary
        from xfel_spread.stage1.scoring import format_summary, score_shards, summarize, write_score_table

        counts = {len(arguments.stage1_prefix), len(arguments.dials_prefix), len(arguments.truth)}
        if len(counts) != 1:
            raise ValueError(f"give one --dials-prefix and one --truth per --stage1-prefix (got "
                             f"{len(arguments.stage1_prefix)}, {len(arguments.dials_prefix)}, {len(arguments.truth)})")
        scores = score_shards(arguments.stage1_prefix, arguments.dials_prefix, arguments.truth)
        summary = summarize(scores)
        write_score_table(scores, arguments.table)
        text = format_summary(arguments.dataset, summary)
        with atomic_output(arguments.text, "w") as stream:
            stream.write(text)
        print(text, end="")
        plot_stage1_summary(arguments.plot, arguments.dataset, scores, summary)

    return _run("spread-score-stage1", action)


if __name__ == "__main__":
    sys.exit(stage1_main())
