"""Driver pieces of the SPREAD stage: one shard's converged stage-1 lattices as SPREAD data.

For shard ``index`` of a dataset, stage 1 (rules/stage1.smk) leaves ``{stage1_prefix}_shots.tsv``
(one row per lattice of the annulus experiment list, in its order: ``converged`` and the refined
parameters, relative to the annulus start crystal) and ``{stage1_prefix}_refined.expt``. The
shoeboxes are rebuilt as stage 1 built them (:func:`xfel_spread.stage1.rois.read_lattices` on
``{annulus_prefix}_annulus.expt/.refl`` and the shard's image and spectrum), ROIs whose Miller index
has no structure factor dropped as stage 1 drops them; then each converged lattice's coefficients
are computed at its stage-1 parameters (:func:`xfel_spread.spread.assemble.lattice_arrays`), as the
free mosaic domains stage 1 refined where ``{stage1_prefix}_domains.tsv`` gives them
(``stage1.free_domains``; :func:`stage1_domains`).

SPREAD needs every shot's spectrum on one channel grid, the ``structure_factors`` section's: images from
elsewhere bring spectra at their own energies (the nanoBragg stills: 20 channels of 1 eV at other
energies per image), so each shot's spectrum is rebinned onto the grid first, total weight and mean
energy kept (:func:`xfel_spread.sim.spectrum.rebin_spectrum`); a spectrum already on the grid (the
simulated shards') is used as it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.spread.assemble import LatticeArrays, lattice_arrays
from xfel_spread.spread.coefficients import AsuLookup
from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.fit import SpreadProblem
from xfel_spread.spread.outputs import output_paths
from xfel_spread.io.mosaic_domains import read_domain_vectors
from xfel_spread.io.refined_shots import read_refined_shots
from xfel_spread.sim.spectrum import SpectrumGridError
from xfel_spread.sim.structure_factors import channel_energies
from xfel_spread.stage1.io import Stage1FileError, check_model_cell
from xfel_spread.stage1.model import PARAMETER_NAMES, Stage1Settings
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.rois import open_annulus_shard, read_lattices, select_rois, spectrum_on_channels


def converged_parameters(shots_path: str | os.PathLike) -> dict[int, np.ndarray]:
    """{lattice: its 13 refined stage-1 parameters} for the converged rows of a shots table."""
    try:
        rows = read_refined_shots(shots_path)
    except ValueError as error:  # RefinedShotsError: one line naming the file
        raise SpreadInputError(str(error)) from None
    parameters = {}
    for lattice, row in enumerate(rows):
        if row["converged"] == 1:
            values = [row[name] for name in PARAMETER_NAMES]
            if any(value is None for value in values):
                raise SpreadInputError(f"{shots_path}: converged lattice {lattice} lacks refined parameters")
            parameters[lattice] = np.asarray(values, dtype=np.float64)
    return parameters


#: A lattice's eta in the shots table and its domains' RMS angle (degrees) agree to this when both come
#: from one stage-1 run (the table's 10 significant digits are far finer).
DOMAINS_ETA_TOLERANCE_DEG = 1e-6


def stage1_domains(stage1_prefix: str, parameters: dict[int, np.ndarray],
                   free_domains: bool = False) -> dict[int, np.ndarray]:
    """{lattice: its free domains' rotation vectors (D, 3, deg)} of ``{stage1_prefix}_domains.tsv``, for the
    converged lattices ``parameters`` of the same run's shots table (:func:`converged_parameters`).

    A stage-1 output without the file (written before stage 1 wrote it) gives no domains, unless
    ``free_domains`` (``stage1.free_domains`` is on): then its lattices would be modelled otherwise than
    stage 1 fitted them, and the file is asked for in one line (SpreadInputError; Snakemake does not
    remake a missing intermediate file whose consumers are up to date). Domains of a lattice the shots
    table does not hold as converged, or whose RMS angle is not the table's eta (the files of two runs),
    are refused in one line too."""
    path = f"{stage1_prefix}_domains.tsv"
    if not os.path.exists(path):
        if free_domains:
            raise SpreadInputError(f"{path}: no such file, but stage1.free_domains is on: this stage-1 output was "
                                   "written before stage 1 wrote its domains; run stage 1 again (snakemake "
                                   "--forcerun stage1 exa)")
        return {}
    try:
        vectors = read_domain_vectors(path)
    except ValueError as error:  # MosaicDomainsError: one line naming the file
        raise SpreadInputError(str(error)) from None
    eta = PARAMETER_NAMES.index("eta_deg")
    for lattice, domains in vectors.items():
        if lattice not in parameters:
            raise SpreadInputError(f"{path}: domains of lattice {lattice}, which {stage1_prefix}_shots.tsv does not "
                                   "hold as converged (files of different runs?)")
        rms = float(np.sqrt((domains ** 2).sum(axis=1).mean()))
        if abs(rms - parameters[lattice][eta]) > DOMAINS_ETA_TOLERANCE_DEG:
            raise SpreadInputError(f"{path}: lattice {lattice}'s domains turn {rms:.6g} deg RMS, its eta in "
                                   f"{stage1_prefix}_shots.tsv is {parameters[lattice][eta]:.6g} (files of different runs?)")
    return vectors


def shard_lattices(annulus_prefix: str, shard_path: str, stage1_prefix: str, lookup: AsuLookup,
                   settings: Stage1Settings, relative_cutoff: float, psf: DetectorPsf | None = None,
                   on_error: Callable[[int, Exception], None] | None = None,
                   max_lattices: int | None = None, channel_grid_ev: np.ndarray | None = None,
                   model_cell=None, model_path: str = "") -> list[LatticeArrays]:
    """Coefficients and pixels of every converged lattice of one shard (or the first ``max_lattices``).

    With ``model_cell`` (the model's a, b, c, alpha, beta, gamma) the shard's lattices must be the
    model's crystal (:func:`xfel_spread.stage1.io.check_model_cell`; SpreadInputError naming
    ``model_path`` otherwise): SPREAD's fixed part comes from the model.

    With ``channel_grid_ev`` each shot's spectrum is first put on those channels
    (:func:`xfel_spread.stage1.rois.spectrum_on_channels`; unchanged when already on them); a spectrum outside
    the grid is refused with one line naming the shard and image."""
    shots_path = f"{stage1_prefix}_shots.tsv"
    parameters = converged_parameters(shots_path)
    domains = stage1_domains(stage1_prefix, parameters, settings.free_domains > 0)
    annulus = open_annulus_shard(annulus_prefix, shard_path)
    if model_cell is not None:
        try:
            check_model_cell(model_path, model_cell, [experiment.crystal.get_unit_cell().parameters()
                                                      for experiment in annulus.experiments],
                             str(annulus.experiments_path))
        except Stage1FileError as error:
            raise SpreadInputError(str(error)) from None
    if max(parameters, default=-1) >= annulus.n_lattices:
        raise SpreadInputError(f"{shots_path}: rows for {max(parameters) + 1}+ lattices, the annulus has "
                               f"{annulus.n_lattices}")
    wanted = sorted(parameters)[:max_lattices]
    errors = on_error or (lambda lattice, error: None)
    lattices = []
    for lattice, shot, _counts in read_lattices(annulus, wanted, settings.shoebox_size_px, errors):
        keep = lookup.columns(shot.miller_index) >= 0
        if not keep.any():
            continue
        rebinned = False
        if channel_grid_ev is not None:
            try:
                energies, photons = spectrum_on_channels(shot.energies_ev, shot.photons, channel_grid_ev,
                                                         f"{shard_path}: image {shot.image_index} (lattice {lattice})")
            except SpectrumGridError as error:
                raise SpreadInputError(str(error)) from None
            rebinned = energies is not shot.energies_ev
            shot = dataclasses.replace(shot, energies_ev=energies, photons=photons)
        arrays = lattice_arrays(select_rois(shot, keep), parameters[lattice], settings.n_domains, lookup,
                                settings.readout_sigma_adu, relative_cutoff, psf,
                                settings.mosaic_model if settings.analytic_mosaic else None, domains.get(lattice))
        arrays.lattice = lattice
        arrays.spectrum_rebinned = rebinned
        lattices.append(arrays)
    return lattices


# --- the stage's driver: what ``spread-spread`` runs ---------------------------------------------------

#: Names of the negative controls (:func:`control_problem`), in the order they are fitted.
CONTROLS = ("miller_l_plus_1", "shuffled_channels")


@dataclass(frozen=True)
class SpreadInputs:
    """The files and options of one run of the stage (the command line of ``spread-spread``).

    ``annulus_prefixes``, ``shards`` and ``stage1_prefixes`` hold one entry per shard, in shard order;
    ``tables_dir`` holds the named start tables (``Fe_fake.dat``, ``pf-rd-ox_fftkk.out``,
    ``pf-rd-red_fftkk.out``)."""

    config: str
    dataset: str
    annulus_prefixes: tuple[str, ...]
    shards: tuple[str, ...]
    stage1_prefixes: tuple[str, ...]
    pdb: str
    tables_dir: str
    output_prefix: str
    threads: int = 1
    psf_fwhm_mm: float | None = None
    psf_radius_px: int | None = None


@dataclass
class ShardProblem:
    """One shard's SPREAD data: its problem (structure-factor pieces of the columns it uses), the
    columns, and the lattice (annulus position) and pixel count of every shot."""

    shard: int
    problem: SpreadProblem
    columns: np.ndarray
    lattices: list[int]
    pixels_per_shot: list[int]
    #: How many of its shots' spectra were rebinned onto the structure_factors channels.
    spectra_rebinned: int = 0
    #: How many of its lattices are modelled by the free domains stage 1 refined.
    free_domain_lattices: int = 0


def _sum_in_shard_order(parts: list[list[tuple]]) -> tuple[float, np.ndarray | None]:
    """Sum ``(shard, value, array)`` triples gathered from every rank, in shard order (the same bytes on
    every rank and for every rank count)."""
    value, total = 0.0, None
    for _, part_value, array in sorted((item for part in parts for item in part), key=lambda item: item[0]):
        value += part_value
        total = array.copy() if total is None else total + array
    return value, total


class DistributedNLL:
    """The profiled NLL of every shard, summed in shard order over the ranks: ``fit``'s ``nll``.

    Each rank evaluates its own shards (their nuisance stays on the rank); the ranks allgather the
    per-shard values and gradients and each sums them in shard order. ``n_shards`` is the dataset's
    shard count (all ranks'), which shares the preconditioner's lattices out (:meth:`information`)."""

    def __init__(self, comm, shards: list[ShardProblem], settings, progress=None, n_shards: int = 1, log=None):
        from xfel_spread.spread.fit import ProfiledNLL

        self.comm = comm
        self.log = log
        self.shards = shards
        self.n_shards = max(n_shards, 1)
        self.local = [ProfiledNLL(shard.problem, pixels_per_chunk=settings.pixels_per_chunk) for shard in shards]
        self.evaluations = 0
        self.progress = progress

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        mine = []
        for shard, nll in zip(self.shards, self.local):
            value, gradient = nll(theta)
            mine.append((shard.shard, value, gradient))
        value, gradient = _sum_in_shard_order(self.comm.allgather(mine))
        self.evaluations += 1
        if self.progress is not None:
            self.progress.advance(detail=f" (objective NLL {value:.6g})")
        return value, (gradient if gradient is not None else np.zeros_like(theta))

    def information(self, theta: np.ndarray, lattices: int) -> np.ndarray:
        """The fit's preconditioner: each shard's estimate from its first ceil(lattices / n_shards)
        lattices (:meth:`xfel_spread.spread.fit.ProfiledNLL.information`), summed in shard order."""
        import time

        started = time.perf_counter()
        per_shard = -(-lattices // self.n_shards)
        mine = [(shard.shard, 0.0, nll.information(theta, per_shard)) for shard, nll in zip(self.shards, self.local)]
        total = _sum_in_shard_order(self.comm.allgather(mine))[1]
        if self.log is not None:
            self.log(f"preconditioner: information of the first {per_shard} lattices of each shard in "
                     f"{time.perf_counter() - started:.1f} s")
        return total if total is not None else np.zeros((theta.size, theta.size))


def _lookup_of(decomposition):
    from xfel_spread.spread.coefficients import asu_lookup

    return asu_lookup(decomposition.unit_cell, decomposition.space_group, decomposition.indices)


def control_problem(name: str, shard: ShardProblem, decomposition, lookup, rows: list[int], seed: int) -> SpreadProblem:
    """The shard's problem spoiled for negative control ``name``.

    ``miller_l_plus_1``: the site sums of (h, k, l+1) in place of h's (0 where l+1 has none), F_rest
    kept, so the sites' signal lands on the wrong reflections. ``shuffled_channels``: each shot's
    channels permuted in the coefficients (seeded by ``seed`` and the shard number), so the spectrum
    no longer says which energy lit which pixel."""
    from xfel_spread.spread.model import Decomposition, SpreadData

    problem = shard.problem
    if name == "miller_l_plus_1":
        shifted = lookup.columns(decomposition.indices[shard.columns] + np.array([0, 0, 1]))
        sums = np.where(shifted >= 0, decomposition.site_sums[rows][:, np.maximum(shifted, 0)], 0)
        spoiled = Decomposition.from_complex(decomposition.f_rest[shard.columns], sums)
        return SpreadProblem(problem.data, spoiled, problem.interpolation, problem.restraints)
    if name == "shuffled_channels":
        data = problem.data
        n_channels = int(problem.interpolation.shape[0])
        n_used = problem.decomposition.n_reflections
        rng = np.random.default_rng([seed, shard.shard])
        permutation = torch.as_tensor(np.stack([rng.permutation(n_channels) for _ in range(data.n_shots)]))
        # In slices of terms: whole-array temporaries took five times the term pairs' memory.
        term_pair = torch.empty_like(data.term_pair)
        step = 1 << 22
        for lo in range(0, term_pair.numel(), step):
            pair = data.term_pair[lo:lo + step]
            term_shot = data.shot[data.shoebox[data.term_pixel[lo:lo + step]]].long()
            term_pair[lo:lo + step] = permutation[term_shot, pair // n_used] * n_used + pair % n_used
        shuffled = SpreadData(data.data, data.shoebox, data.dx, data.dy, data.readout_var, data.shot,
                              data.term_pixel, term_pair, data.term_coeff, data.n_shots)
        return SpreadProblem(shuffled, problem.decomposition, problem.interpolation, problem.restraints)
    raise ValueError(f"unknown control {name}")


def _prepare_spread(inputs: SpreadInputs):
    """Settings (spread, stage 1, structure factors), point spread and data source (`images` for the dataset of
    images from elsewhere, else `simulate`) of a run; user errors raised."""
    from xfel_spread.config import IMAGE_DATASET, load_config
    from xfel_spread.errors import OptionError
    from xfel_spread.spread.run import SpreadSettings
    from xfel_spread.stage1.pipeline import detector_psf

    if inputs.threads < 1:
        raise OptionError(f"--threads must be at least 1, got {inputs.threads}")
    counts = {len(inputs.annulus_prefixes), len(inputs.shards), len(inputs.stage1_prefixes)}
    if len(counts) != 1 or not inputs.shards:
        raise OptionError(f"give one --annulus-prefix, --shard and --stage1-prefix per shard (got "
                          f"{len(inputs.annulus_prefixes)}, {len(inputs.shards)}, {len(inputs.stage1_prefixes)})")
    torch.set_num_threads(inputs.threads)
    psf = detector_psf(inputs.psf_fwhm_mm, inputs.psf_radius_px)
    config = load_config(inputs.config)
    settings = SpreadSettings.from_mapping(config.get("spread"), inputs.config)
    stage1 = Stage1Settings.from_config(config.get("stage1"), inputs.config)
    structure = config["structure_factors"]
    prefix_dir = os.path.dirname(os.path.abspath(inputs.output_prefix))
    if not os.path.isdir(prefix_dir):
        raise SpreadInputError(f"{prefix_dir}: output directory does not exist")
    # The stage's settings file holds no input section: the dataset says where the data came from.
    source = "images" if inputs.dataset == IMAGE_DATASET else "simulate"
    return settings, stage1, structure, psf, source


def _site_decomposition(inputs: SpreadInputs, settings, structure):
    """The model's decomposition for the settings' sites, at the simulation's mean channel energy."""
    from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, site_decomposition

    energies = channel_energies(structure["channel_start_ev"], structure["channel_step_ev"], structure["n_channels"])
    names = tuple(name for name, _ in settings.sites)
    return site_decomposition(inputs.pdb, structure["d_min_a"], structure["k_sol"], structure["b_sol"], names,
                              HC_EV_ANGSTROM / float(np.mean(energies)))


def _shard_problems(inputs, numbers, settings, stage1, psf, decomposition, lookup, grid, restraints, progress,
                    channel_grid_ev=None):
    """The ShardProblem of every shard in ``numbers`` with converged lattices (the others are left out);
    every shot's spectrum on ``channel_grid_ev`` (:func:`shard_lattices`)."""
    from xfel_spread.spread.assemble import concatenate
    from xfel_spread.spread.model import Decomposition
    from xfel_spread.spread.tables import interpolation_matrix

    problems = []
    for number in numbers:
        lattices = shard_lattices(inputs.annulus_prefixes[number], inputs.shards[number],
                                  inputs.stage1_prefixes[number], lookup, stage1, settings.relative_cutoff, psf,
                                  channel_grid_ev=channel_grid_ev, model_cell=decomposition.unit_cell,
                                  model_path=inputs.pdb)
        progress.advance()
        if not lattices:
            continue
        data, columns = concatenate(lattices, f"{inputs.stage1_prefixes[number]}_shots.tsv")
        interpolation = torch.tensor(interpolation_matrix(grid, lattices[0].energies_ev))
        problem = SpreadProblem(data, Decomposition.from_complex(decomposition.f_rest[columns],
                                                                 decomposition.site_sums[:, columns]),
                                interpolation, restraints)
        problems.append(ShardProblem(number, problem, columns, [lattice.lattice for lattice in lattices],
                                     [len(lattice.data) for lattice in lattices],
                                     sum(lattice.spectrum_rebinned for lattice in lattices),
                                     sum(lattice.free_domains > 0 for lattice in lattices)))
    return problems


def _edges_of(grid, fp, fdp) -> list[dict]:
    from xfel_spread.spread.uncertainty import (fp_minimum_energy, half_rise_energy, half_rise_post_edge_energy,
                                                step_edge_energy)

    return [{"half_rise_ev": half_rise_energy(grid, fdp[s]), "fp_minimum_ev": fp_minimum_energy(grid, fp[s]),
             "half_rise_post_ev": half_rise_post_edge_energy(grid, fdp[s]),
             "step_edge_ev": step_edge_energy(grid, fdp[s])}
            for s in range(len(fp))]


def run_spread(inputs: SpreadInputs, comm=None, log=None) -> dict | None:
    """Fit the sites' f', f'' grids to every converged lattice of a dataset; collective over ``comm``.

    ``comm`` defaults to ``MPI.COMM_WORLD`` (a :class:`~xfel_spread.mpi.SerialComm` runs
    it in-process). Rank r assembles shards r, r + N, ...; the objective, its gradient and the Fisher
    information are summed per shard in shard order on every rank, so the outputs are the same bytes
    for any rank count. With ``spread.controls`` the two negative controls (:data:`CONTROLS`) are
    fitted from the same start. Rank 0 writes the outputs (:func:`~xfel_spread.spread.outputs.output_paths`) and returns the
    summary (None on the other ranks).
    """
    import json
    import logging
    import time

    from xfel_spread.atomic import atomic_output
    from xfel_spread.errors import USER_ERRORS
    from xfel_spread.mpi import abort_on_error, abort_on_unexpected_error, first_error
    from xfel_spread.progress import Progress
    from xfel_spread.spread.fit import Restraints, fit
    from xfel_spread.spread.model import Decomposition, SpreadData
    from xfel_spread.spread.restraints import hilbert_matrix
    from xfel_spread.spread.run import SpreadResult, write_results
    from xfel_spread.spread.tables import energy_grid, read_table, table_on_grid, table_path
    from xfel_spread.spread.information import profile_fisher
    from xfel_spread.spread.uncertainty import covariance_from_information, edge_estimates

    logger = logging.getLogger("xfel_spread.spread")
    log = log or logger.info
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    started = time.perf_counter()
    error, decomposition = None, None
    with abort_on_error(comm):
        try:
            settings, stage1, structure, psf, source = _prepare_spread(inputs)
            if rank == 0:
                decomposition = _site_decomposition(inputs, settings, structure)
        except USER_ERRORS as caught:
            error = caught
    first_error(comm, error)
    with abort_on_unexpected_error(comm):
        decomposition = comm.bcast(decomposition, root=0)
        lookup = _lookup_of(decomposition)
        names = tuple(name for name, _ in settings.sites)
        energies = channel_energies(structure["channel_start_ev"], structure["channel_step_ev"], structure["n_channels"])
        error = None
        try:
            grid = energy_grid(float(np.floor(energies.min())), float(energies.max()), settings.grid_spacing_ev)
            starts = []
            for _, choice in settings.sites:
                path = table_path(choice, inputs.tables_dir)
                starts.append(table_on_grid(read_table(path), grid, path))
        except USER_ERRORS as caught:
            error = caught
    first_error(comm, error)
    with abort_on_unexpected_error(comm):
        fp_start = np.stack([start[0] for start in starts])
        fdp_start = np.stack([start[1] for start in starts])
        restraints = Restraints(settings.smoothness_weight, settings.kk_weight, torch.tensor(fp_start),
                                torch.tensor(fdp_start), torch.tensor(hilbert_matrix(grid)))
        numbers = list(range(rank, len(inputs.shards), size))
        progress = Progress(len(numbers), f"rank {rank}: assembling", log, 30.0, items="shards")
        error, shards = None, []
        try:
            shards = _shard_problems(inputs, numbers, settings, stage1, psf, decomposition, lookup, grid,
                                     restraints, progress, channel_grid_ev=energies)
            for shard in shards:
                # Every spectrum was put on the structure_factors channels (shard_lattices): a check.
                lattice_energies = shard.problem.interpolation @ torch.tensor(grid)
                if (lattice_energies.shape != energies.shape
                        or not np.allclose(lattice_energies.numpy(), energies, rtol=0, atol=1e-6)):
                    raise SpreadInputError(f"{inputs.shards[shard.shard]}: channel energies ({lattice_energies.shape[0]}) "
                                           f"differ from the structure_factors section's ({energies.shape[0]}) of "
                                           f"{inputs.config}")
        except USER_ERRORS as caught:
            error = caught
    first_error(comm, error)
    with abort_on_unexpected_error(comm):
        counts = comm.allgather([(shard.shard, len(shard.lattices), shard.problem.data.n_pixels, shard.spectra_rebinned,
                                  shard.free_domain_lattices) for shard in shards])
        per_shard = sorted(item for part in counts for item in part)
        n_rebinned = sum(item[3] for item in per_shard)
        n_free_domains = sum(item[4] for item in per_shard)
        n_lattices = sum(item[1] for item in per_shard)
        n_pixels = sum(item[2] for item in per_shard)
    if n_lattices == 0:
        raise SpreadInputError(f"{', '.join(f'{prefix}_shots.tsv' for prefix in inputs.stage1_prefixes)}: "
                               "no converged lattices to refine")
    with abort_on_unexpected_error(comm):
        if rank == 0:
            log(f"spread {inputs.dataset}: {n_lattices} lattices, {n_pixels} pixels in {len(per_shard)} shard(s) "
                f"on {size} rank(s); sites {', '.join(f'{n} from {t}' for n, t in settings.sites)}; "
                f"{n_free_domains} lattice(s) as stage 1's free domains")
        empty = SpreadData(*(torch.zeros(0, dtype=torch.float64) for _ in range(5)), torch.zeros(0, dtype=torch.int64),
                           torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                           torch.zeros(0, dtype=torch.float64), 0)
        template = SpreadProblem(empty, Decomposition.from_complex(np.zeros(0, complex),
                                                                   np.zeros((len(names), 0), complex)),
                                 torch.zeros(len(energies), len(grid), dtype=torch.float64), restraints)

        def fit_shards(problems, label):
            # Evaluations, counted against the iteration limit (a line search may take more); the last
            # line is the fit's own.
            fit_progress = Progress(settings.max_iterations, f"{label} fit", log if rank == 0 else (lambda _: None),
                                    30.0, items="evaluations", report_end=False)
            nll = DistributedNLL(comm, problems, settings, fit_progress, n_shards=len(inputs.shards),
                                 log=log if rank == 0 else None)
            result = fit(template, fp_start, fdp_start, max_iterations=settings.max_iterations, nll=nll,
                         preconditioner_lattices=settings.preconditioner_lattices)
            if rank == 0:
                log(f"{label} fit: {result.evaluations} evaluations, objective {result.objective:.9g} ({result.message})")
            return result, nll

        result, nll = fit_shards(shards, "spread")
        theta = np.concatenate([result.fp.ravel(), result.fdp.ravel()])
        fishers = comm.allgather([(shard.shard, 0.0, profile_fisher(shard.problem, theta, local.nuisance))
                                  for shard, local in zip(shards, nll.local)])
        covariance = covariance_from_information(_sum_in_shard_order(fishers)[1] + template.restraint_hessian(theta))
        sigma = np.sqrt(np.clip(np.diag(covariance), 0, None)).reshape(2, len(names), len(grid))
        edges = edge_estimates(grid, result.fp, result.fdp, covariance, n_samples=settings.posterior_samples,
                               seed=settings.seed)
        scales = comm.allgather([(shard.shard, lattice, float(scale), pixels)
                                 for shard, local in zip(shards, nll.local)
                                 for lattice, scale, pixels in zip(shard.lattices, local.nuisance.scale.tolist(),
                                                                   shard.pixels_per_shot)])
        controls = {}
        if settings.controls:
            rows = list(range(len(names)))
            for name in CONTROLS:
                spoiled = [ShardProblem(shard.shard, control_problem(name, shard, decomposition, lookup, rows,
                                                                     settings.seed),
                                        shard.columns, shard.lattices, shard.pixels_per_shot) for shard in shards]
                controls[name] = fit_shards(spoiled, f"control {name}")[0]
        if rank != 0:
            return None
        spread_result = SpreadResult(names, grid, result.fp, result.fdp, sigma[0], sigma[1], fp_start, fdp_start,
                                     edges, result)
        paths = output_paths(inputs.output_prefix)
        write_results(spread_result, inputs.output_prefix)
        with atomic_output(paths["scales"], "w") as stream:
            stream.write("shard\tlattice\tscale\tn_pixels\n")
            for shard, lattice, scale, pixels in sorted(item for part in scales for item in part):
                stream.write(f"{shard}\t{lattice}\t{scale:.6g}\t{pixels}\n")
        header = ["energy_ev"] + [f"{control}_{site}_{part}" for control in controls for site in names
                                  for part in ("fp", "fdp")]
        columns = [grid] + [values[s] for control in controls.values() for s in range(len(names))
                            for values in (control.fp, control.fdp)]
        with atomic_output(paths["controls"], "w") as stream:
            np.savetxt(stream, np.stack(columns, axis=1), delimiter="\t", header="\t".join(header), comments="",
                       fmt="%.6f")

        def fit_summary(fitted, with_sigma):
            summary = {"objective": fitted.objective, "evaluations": fitted.evaluations, "message": fitted.message,
                       "edges": {}}
            for s, (site, edge) in enumerate(zip(names, _edges_of(grid, fitted.fp, fitted.fdp))):
                summary["edges"][site] = edge
                if with_sigma:
                    edge.update(half_rise_sigma_ev=edges[s].half_rise_sigma_ev,
                                fp_minimum_sigma_ev=edges[s].fp_minimum_sigma_ev,
                                half_rise_post_sigma_ev=edges[s].half_rise_post_sigma_ev,
                                step_edge_sigma_ev=edges[s].step_edge_sigma_ev)
            return summary

        summary = {
            "dataset": inputs.dataset,
            "settings": {"sites": dict(settings.sites), "refinement": settings.refinement,
                         "grid_spacing_ev": settings.grid_spacing_ev, "smoothness_weight": settings.smoothness_weight,
                         "kk_weight": settings.kk_weight, "relative_cutoff": settings.relative_cutoff,
                         "max_iterations": settings.max_iterations, "posterior_samples": settings.posterior_samples,
                         "preconditioner_lattices": settings.preconditioner_lattices,
                         "seed": settings.seed, "point_spread_modelled": psf is not None},
            "grid_ev": [float(grid[0]), float(grid[-1]), len(grid)],
            "shards": [{"shard": shard, "lattices": n, "pixels": p} for shard, n, p, _, _ in per_shard],
            "lattices": n_lattices, "pixels": n_pixels, "ranks": size,
            # Images from elsewhere bring spectra at their own energies (rebinned onto the channels) and no truth.
            "spectra_rebinned": n_rebinned,
            # Lattices modelled by the free mosaic domains stage 1 refined (stage1.free_domains), not by eta.
            "free_domain_lattices": n_free_domains,
            "input_source": source,
            "truth": ("the simulation's tables (rule score_spread)" if source == "simulate" else
                      "none: images from elsewhere (input.source: images); the fit is not scored"),
            "fit": fit_summary(result, True),
            "controls_run": list(controls),
            "controls": {name: fit_summary(control, False) for name, control in controls.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        with atomic_output(paths["summary"], "w") as stream:
            json.dump(summary, stream, indent=2)
            stream.write("\n")
        log(f"spread {inputs.dataset}: objective {result.objective:.6g} after {result.evaluations} evaluations "
            f"({result.message}); " + "; ".join(f"{site} half-rise {edge.half_rise_ev:.1f} +- "
                                                f"{edge.half_rise_sigma_ev:.1f} eV" for site, edge in zip(names, edges)))
    return summary
