"""One SPREAD refinement from assembled data to result files: settings, start tables, fit, errors.

Settings (a proposed ``spread`` config section; absent keys take these defaults):

``sites``
    ``{atom name: start table}``, the table ``oxidized``, ``reduced``, ``metallic`` (shipped in the
    shared data directory) or a path to a three-column (eV, f', f'') file. Default: FE1 and FE2 both
    from ``metallic``. The start table is also each site's Kramers-Kronig reference.
``grid_spacing_ev`` (1.0)
    Spacing of the f', f'' grid, which runs from the lowest channel energy (rounded down to a whole
    eV) past the highest.
``smoothness_weight`` (1.0), ``kk_weight`` (10.0)
    Restraint weights (see :mod:`xfel_spread.spread.restraints`).
``relative_cutoff`` (1e-3)
    Coefficient terms below this fraction of the pixel's largest are dropped.
``max_iterations`` (200), ``pixels_per_chunk`` (1048576), ``posterior_samples`` (500)
    L-BFGS iterations, pixels per evaluation chunk, draws for the edge positions' sigmas.
``preconditioner_lattices`` (100)
    Lattices whose profiled Fisher information at the start preconditions the fit
    (:mod:`xfel_spread.spread.fit`); 0 runs the plain L-BFGS-B.
``refinement`` (exa), ``controls`` (true), ``seed`` (0)
    Whose lattices the stage reads (the rule's inputs), whether the stage also fits the two negative
    controls (:mod:`xfel_spread.spread.pipeline`), and the seed of the shuffled-channel control and of
    the edges' posterior draws.

Outputs for prefix P: ``P_fp_fdp.tsv`` (energy and, per site, f', its sigma, f'', its sigma, and
the start table's f', f'') and ``P_edges.tsv`` (per site: half-rise and f'-minimum energies with
sigmas, the same of the start table, and the post-edge half-rise with its sigma).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.atomic import atomic_path
from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.fit import FitResult, Restraints, SpreadProblem, fit
from xfel_spread.spread.model import Decomposition, SpreadData
from xfel_spread.spread.outputs import output_paths
from xfel_spread.spread.restraints import hilbert_matrix
from xfel_spread.spread.tables import (
    energy_grid,
    interpolation_matrix,
    read_table,
    table_on_grid,
    table_path,
)
from xfel_spread.spread.uncertainty import (
    EdgeEstimate,
    edge_estimates,
    fp_minimum_energy,
    grid_covariance,
    half_rise_energy,
    step_edge_energy,
)

DEFAULTS = {"sites": {"FE1": "metallic", "FE2": "metallic"}, "grid_spacing_ev": 1.0, "smoothness_weight": 1.0,
            "kk_weight": 10.0, "relative_cutoff": 1e-3, "max_iterations": 200, "pixels_per_chunk": 1 << 20,
            "preconditioner_lattices": 100,
            "posterior_samples": 500, "refinement": "exa", "controls": True, "seed": 0}


#: Keys of the ``spread`` section that wire the stage into the workflow and are no setting of the fit
#: (the schema gives them defaults, so a settings file read through the config loader has them).
WORKFLOW_KEYS = ("enabled",)


@dataclass(frozen=True)
class SpreadSettings:
    """The ``spread`` settings, defaults filled and checked (see the module docstring)."""

    sites: tuple[tuple[str, str], ...]
    grid_spacing_ev: float
    smoothness_weight: float
    kk_weight: float
    relative_cutoff: float
    max_iterations: int
    pixels_per_chunk: int
    posterior_samples: int
    refinement: str = "exa"
    controls: bool = True
    seed: int = 0
    preconditioner_lattices: int = 100

    @classmethod
    def from_mapping(cls, section: Mapping | None, source: str = "<spread settings>") -> SpreadSettings:
        """Settings from a mapping; one-line SpreadInputError ``source: spread.key: problem`` otherwise."""
        values = dict(DEFAULTS)
        for key, value in dict(section or {}).items():
            if key in WORKFLOW_KEYS:
                continue
            if key not in DEFAULTS:
                raise SpreadInputError(f"{source}: spread.{key}: unknown setting")
            values[key] = value
        sites = values["sites"]
        if not isinstance(sites, Mapping) or not sites or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
            raise SpreadInputError(f"{source}: spread.sites: expected a mapping of atom name to start table")
        for key in ("grid_spacing_ev", "relative_cutoff", "smoothness_weight", "kk_weight"):
            number = values[key]
            bad_type = isinstance(number, bool) or not isinstance(number, (int, float))
            if bad_type or not np.isfinite(number) or number < 0 or (key == "grid_spacing_ev" and number == 0):
                raise SpreadInputError(f"{source}: spread.{key}: expected a non-negative number"
                                       f"{' above 0' if key == 'grid_spacing_ev' else ''}, got {number!r}")
        if values["relative_cutoff"] >= 1:
            raise SpreadInputError(f"{source}: spread.relative_cutoff: must be below 1, got {values['relative_cutoff']}")
        for key in ("max_iterations", "pixels_per_chunk", "posterior_samples"):
            if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 1:
                raise SpreadInputError(f"{source}: spread.{key}: expected a positive integer, got {values[key]!r}")
        lattices = values["preconditioner_lattices"]
        if isinstance(lattices, bool) or not isinstance(lattices, int) or lattices < 0:
            raise SpreadInputError(f"{source}: spread.preconditioner_lattices: expected a non-negative integer, "
                                   f"got {lattices!r}")
        if values["refinement"] not in ("exa", "stage1"):
            raise SpreadInputError(f"{source}: spread.refinement: expected exa or stage1, got {values['refinement']!r}")
        if not isinstance(values["controls"], bool):
            raise SpreadInputError(f"{source}: spread.controls: expected true or false, got {values['controls']!r}")
        if isinstance(values["seed"], bool) or not isinstance(values["seed"], int) or values["seed"] < 0:
            raise SpreadInputError(f"{source}: spread.seed: expected a non-negative integer, got {values['seed']!r}")
        return cls(tuple(sites.items()), float(values["grid_spacing_ev"]), float(values["smoothness_weight"]),
                   float(values["kk_weight"]), float(values["relative_cutoff"]), values["max_iterations"],
                   values["pixels_per_chunk"], values["posterior_samples"], values["refinement"],
                   values["controls"], values["seed"], lattices)


@dataclass
class SpreadResult:
    """Refined grids (n_sites, n_grid, electrons) with standard errors, edges, starts and the fit."""

    site_names: tuple[str, ...]
    grid_ev: np.ndarray
    fp: np.ndarray
    fdp: np.ndarray
    fp_sigma: np.ndarray
    fdp_sigma: np.ndarray
    fp_start: np.ndarray
    fdp_start: np.ndarray
    edges: list[EdgeEstimate]
    fit: FitResult


def refine(data: SpreadData, energies_ev: np.ndarray, model_sites: tuple[str, ...], f_rest: np.ndarray,
           site_sums: np.ndarray, settings: SpreadSettings, data_dir: str) -> SpreadResult:
    """Fit the sites' grids to the data and estimate their errors.

    ``f_rest`` (n_used,) and ``site_sums`` (len(model_sites), n_used) are the complex pieces of the
    reflections the data use (e.g. ``SiteDecomposition`` restricted to ``concatenate``'s columns);
    ``model_sites`` names their rows. Settings' sites must be among them.
    """
    names = tuple(name for name, _ in settings.sites)
    missing = [name for name in names if name not in model_sites]
    if missing:
        raise SpreadInputError(f"spread.sites: {', '.join(missing)} not among the model's sites "
                               f"({', '.join(model_sites)})")
    rows = [model_sites.index(name) for name in names]
    energies_ev = np.asarray(energies_ev, dtype=np.float64)
    grid = energy_grid(float(np.floor(energies_ev.min())), float(energies_ev.max()), settings.grid_spacing_ev)
    starts = []
    for _, choice in settings.sites:
        path = table_path(choice, data_dir)
        starts.append(table_on_grid(read_table(path), grid, path))
    fp_start = np.stack([start[0] for start in starts])
    fdp_start = np.stack([start[1] for start in starts])
    restraints = Restraints(settings.smoothness_weight, settings.kk_weight, torch.tensor(fp_start),
                            torch.tensor(fdp_start), torch.tensor(hilbert_matrix(grid)))
    problem = SpreadProblem(data, Decomposition.from_complex(np.asarray(f_rest), np.asarray(site_sums)[rows]),
                            torch.tensor(interpolation_matrix(grid, energies_ev)), restraints)
    result = fit(problem, fp_start, fdp_start, max_iterations=settings.max_iterations,
                 pixels_per_chunk=settings.pixels_per_chunk, preconditioner_lattices=settings.preconditioner_lattices)
    theta = np.concatenate([result.fp.ravel(), result.fdp.ravel()])
    covariance = grid_covariance(problem, theta, result.nuisance)
    sigma = np.sqrt(np.clip(np.diag(covariance), 0, None)).reshape(2, len(names), len(grid))
    edges = edge_estimates(grid, result.fp, result.fdp, covariance, n_samples=settings.posterior_samples)
    return SpreadResult(names, grid, result.fp, result.fdp, sigma[0], sigma[1], fp_start, fdp_start, edges, result)


def write_results(result: SpreadResult, prefix: str | os.PathLike) -> None:
    """``{prefix}_fp_fdp.tsv`` and ``{prefix}_edges.tsv`` (see the module docstring), atomically."""
    header = ["energy_ev"]
    columns = [result.grid_ev]
    for s, name in enumerate(result.site_names):
        header += [f"{name}_fp", f"{name}_fp_sigma", f"{name}_fdp", f"{name}_fdp_sigma", f"{name}_fp_start",
                   f"{name}_fdp_start"]
        columns += [result.fp[s], result.fp_sigma[s], result.fdp[s], result.fdp_sigma[s], result.fp_start[s],
                    result.fdp_start[s]]
    paths = output_paths(prefix)
    with atomic_path(paths["fp_fdp"]) as tmp:
        np.savetxt(tmp, np.stack(columns, axis=1), delimiter="\t", header="\t".join(header), comments="", fmt="%.6f")
    lines = [("site\thalf_rise_ev\thalf_rise_sigma_ev\tfp_minimum_ev\tfp_minimum_sigma_ev\tstart_half_rise_ev"
              "\tstart_fp_minimum_ev\thalf_rise_post_ev\thalf_rise_post_sigma_ev\tstep_edge_ev\tstep_edge_sigma_ev"
              "\tstart_step_edge_ev")]
    for s, (name, edge) in enumerate(zip(result.site_names, result.edges)):
        lines.append(f"{name}\t{edge.half_rise_ev:.3f}\t{edge.half_rise_sigma_ev:.3f}\t{edge.fp_minimum_ev:.3f}\t"
                     f"{edge.fp_minimum_sigma_ev:.3f}\t{half_rise_energy(result.grid_ev, result.fdp_start[s]):.3f}\t"
                     f"{fp_minimum_energy(result.grid_ev, result.fp_start[s]):.3f}\t{edge.half_rise_post_ev:.3f}\t"
                     f"{edge.half_rise_post_sigma_ev:.3f}\t{edge.step_edge_ev:.3f}\t{edge.step_edge_sigma_ev:.3f}\t"
                     f"{step_edge_energy(result.grid_ev, result.fdp_start[s]):.3f}")
    with atomic_path(paths["edges"]) as tmp, open(tmp, "w") as stream:
        stream.write("\n".join(lines) + "\n")
