"""Driver pieces of the SPREAD stage: one shard's converged stage-1 lattices as SPREAD data.

For shard ``index`` of a dataset, stage 1 (rules/stage1.smk) leaves ``{stage1_prefix}_shots.tsv``
(one row per lattice of the annulus experiment list, in its order: ``converged`` and the refined
parameters, relative to the annulus start crystal) and ``{stage1_prefix}_refined.expt``. The
shoeboxes are rebuilt as stage 1 built them (:func:`xfel_spread.stage1.rois.read_lattices` on
``{annulus_prefix}_annulus.expt/.refl`` and the shard's image and spectrum), ROIs whose Miller index
has no structure factor dropped as stage 1 drops them; then each converged lattice's coefficients
are computed at its stage-1 parameters (:func:`xfel_spread.spread.assemble.lattice_arrays`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from xfel_spread.spread.assemble import LatticeArrays, lattice_arrays
from xfel_spread.spread.coefficients import AsuLookup
from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.stage1.io import read_shots_table
from xfel_spread.stage1.model import PARAMETER_NAMES, Stage1Settings
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.rois import open_annulus_shard, read_lattices, select_rois


def converged_parameters(shots_path: str | os.PathLike) -> dict[int, np.ndarray]:
    """{lattice: its 13 refined stage-1 parameters} for the converged rows of a shots table."""
    try:
        rows = read_shots_table(shots_path)
    except ValueError as error:  # Stage1FileError: one line naming the file
        raise SpreadInputError(str(error)) from None
    parameters = {}
    for lattice, row in enumerate(rows):
        if row["converged"] == 1:
            values = [row[name] for name in PARAMETER_NAMES]
            if any(value is None for value in values):
                raise SpreadInputError(f"{shots_path}: converged lattice {lattice} lacks refined parameters")
            parameters[lattice] = np.asarray(values, dtype=np.float64)
    return parameters


def shard_lattices(annulus_prefix: str, shard_path: str, stage1_prefix: str, lookup: AsuLookup,
                   settings: Stage1Settings, relative_cutoff: float, psf: DetectorPsf | None = None,
                   on_error: Callable[[int, Exception], None] | None = None,
                   max_lattices: int | None = None) -> list[LatticeArrays]:
    """Coefficients and pixels of every converged lattice of one shard (or the first ``max_lattices``)."""
    shots_path = f"{stage1_prefix}_shots.tsv"
    parameters = converged_parameters(shots_path)
    annulus = open_annulus_shard(annulus_prefix, shard_path)
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
        lattices.append(lattice_arrays(select_rois(shot, keep), parameters[lattice], settings.n_domains, lookup,
                                       settings.readout_sigma_adu, relative_cutoff, psf))
    return lattices
