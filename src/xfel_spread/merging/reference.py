"""The scaling reference: intensities |Fcalc|^2 of the PDB model, as cctbx.xfel.merge computes them.

cctbx.xfel.merge (``model/crystal_model.py``, with its phil defaults) computes F_model of the model's
atoms with a flat bulk-solvent contribution (k_sol 0.35, b_sol 46 A^2, ``scaling.pdb`` defaults) to
``merging.d_min * scaling.resolution_scalar`` in the model's own cell and space group, squares it, and
maps it to the asymmetric unit. The model has no anomalous scatterers, so I(+) = I(-) and one value
per Friedel pair suffices; it is stored by the pair's asymmetric-unit key (see
:mod:`xfel_spread.merging.indices`). The reference's index set is also the resolution limit of the
observations used in scaling (upstream drops observations that match no reference index).

Without a model (``merge.reference: data``, cctbx.xfel.merge's "mark1" spirit) the reference comes
from the data instead: :func:`data_reference` gives the index set (every asymmetric-unit index of the
lattices' space group to the same resolution, in their average cell) with no intensities, and
:func:`self_reference` the intensities of a previous merge of the same data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xfel_spread.errors import UserInputError
from xfel_spread.merging.indices import from_flex_miller_index, pack_hkl

#: Bulk-solvent parameters of cctbx.xfel.merge's reference (``scaling.pdb.k_sol``, ``b_sol``).
K_SOL, B_SOL = 0.35, 46.0
#: The average data cell must match the model's to this fraction in each length and this many degrees in
#: each angle. Averages over many lattices agree to much better than a percent when the model is the
#: right one; a wrong model or setting differs by far more.
CELL_RELATIVE_LENGTH_TOLERANCE = 0.03
CELL_ANGLE_TOLERANCE_DEG = 2.0


class ModelError(UserInputError, ValueError):
    """The model cannot be read or does not describe the data; the message names the file."""


@dataclass(frozen=True)
class Reference:
    """Reference intensities per Friedel pair, sorted by asymmetric-unit key."""

    space_group_symbol: str  #: the model's space group (Hermann-Mauguin, e.g. "C 1 2 1")
    cell: tuple[float, ...]  #: the model's cell parameters
    keys: np.ndarray  #: sorted int64 keys of the non-anomalous asymmetric-unit indices
    intensity: np.ndarray  #: |Fcalc|^2 per key

    def space_group(self):
        from cctbx import sgtbx

        return sgtbx.space_group_info(self.space_group_symbol).group()

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, intensity) for asymmetric-unit ``keys``; intensity is 0 where not found."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), bool), np.zeros(len(keys))
        position = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[position] == keys
        return found, np.where(found, self.intensity[position], 0.0)


def model_reference(pdb_path, d_min: float) -> Reference:
    """Reference intensities of the model ``pdb_path`` to resolution ``d_min`` (its own cell)."""
    import mmtbx.command_line.fmodel
    import mmtbx.utils
    from iotbx import file_reader

    try:
        model_file = file_reader.any_file(str(pdb_path), force_type="pdb")
        model_file.assert_file_type("pdb")
        structure = model_file.file_object.xray_structure_simple()
    except Exception as error:  # iotbx reports unreadable models as Sorry, RuntimeError, ...
        raise ModelError(f"{pdb_path}: not a readable PDB model ({' '.join(str(error).split())})") from error
    if structure.scatterers().size() == 0:
        raise ModelError(f"{pdb_path}: the model has no atoms")
    symmetry = structure.crystal_symmetry()
    if symmetry is None or symmetry.unit_cell() is None or symmetry.space_group_info() is None:
        raise ModelError(f"{pdb_path}: the model has no CRYST1 cell and space group")

    params = mmtbx.command_line.fmodel.fmodel_from_xray_structure_master_params.extract()
    params.high_resolution = d_min
    params.output.type = "real"
    params.fmodel.k_sol = K_SOL
    params.fmodel.b_sol = B_SOL
    f_model = mmtbx.utils.fmodel_from_xray_structure(
        xray_structure=structure, f_obs=None, add_sigmas=True, params=params).f_model
    intensities = f_model.as_intensity_array().map_to_asu()
    keys = pack_hkl(from_flex_miller_index(intensities.indices()))
    order = np.argsort(keys, kind="stable")
    return Reference(str(symmetry.space_group_info()), tuple(symmetry.unit_cell().parameters()), keys[order],
                     intensities.data().as_numpy_array()[order])


def data_space_group_symbol(hall_symbols: Sequence[str]) -> str:
    """The merging space group of lattices with these Hall symbols (one per lattice), without a model.

    Indexing gives each lattice a Patterson group (centrosymmetric); the most common one (ties: the
    first in sorted order, so the choice does not depend on the order of the lattices) stands for the
    data, and its acentric subgroup (the rotations with the lattice centring) is what the merge maps
    indices with, since a protein crystal has no inversion. Screw axes cannot be told from a Patterson
    group, so a model-free merge's space group is the symmorphic one (P 6 2 2 for P 61 2 2); intensities
    and their asymmetric unit are the same.
    """
    from cctbx import sgtbx

    counts = Counter(hall_symbols)
    hall = min(counts, key=lambda symbol: (-counts[symbol], symbol))
    return str(sgtbx.space_group_info(group=sgtbx.space_group(hall).build_derived_acentric_group()))


def data_reference(space_group_symbol: str, cell: Sequence[float], d_min: float) -> Reference:
    """The index set of a model-free merge: every non-anomalous asymmetric-unit index of
    ``space_group_symbol`` in ``cell`` to ``d_min``, with NaN intensities (there is no model to say them)."""
    from cctbx import crystal

    indices = crystal.symmetry(tuple(cell), space_group_symbol).build_miller_set(anomalous_flag=False, d_min=d_min)
    keys = np.sort(pack_hkl(from_flex_miller_index(indices.map_to_asu().indices())))
    return Reference(space_group_symbol, tuple(float(value) for value in cell), keys, np.full(len(keys), np.nan))


def self_reference(previous: Reference, keys: np.ndarray, intensity: np.ndarray, multiplicity: np.ndarray,
                   minimum_multiplicity: int) -> Reference:
    """The reference of a self-reference cycle: on ``previous``'s index set, the merged pair intensities of
    the previous cycle (at ``keys``, a subset of ``previous.keys``) where at least ``minimum_multiplicity``
    observations made them, NaN elsewhere.

    The index set stays the full one so that the merge keeps the observations of rarely observed
    indices; only the scaling and the correlation filter leave out those without a reference intensity.
    """
    position = np.searchsorted(previous.keys, keys)
    if len(keys) and (position.max() >= len(previous.keys) or np.any(previous.keys[position] != keys)):
        raise ValueError("merged indices outside the reference's index set")  # a bug, not the user's input
    keep = (multiplicity >= minimum_multiplicity) & np.isfinite(intensity)
    values = np.full(len(previous.keys), np.nan)
    values[position[keep]] = intensity[keep]
    return Reference(previous.space_group_symbol, previous.cell, previous.keys, values)


def patterson_symbol(space_group) -> str:
    """Symbol and number of the Patterson group of a cctbx space group (lattices index in it)."""
    return space_group.build_derived_patterson_group().info().symbol_and_number()


def check_model_matches_data(reference: Reference, model_name: str, mean_cell: Sequence[float],
                             hall_symbols: Sequence[str]) -> None:
    """Raise ModelError unless the model's space group and cell describe the lattices.

    ``hall_symbols`` are the lattices' space groups (one per lattice) and ``mean_cell`` their average
    cell. The lattices' most common Patterson group must be the model's, and the average cell must
    match the model's within the tolerances above.
    """
    from cctbx import sgtbx, uctbx

    model_patterson = patterson_symbol(reference.space_group())
    if hall_symbols:
        hall, _ = Counter(hall_symbols).most_common(1)[0]
        data_patterson = patterson_symbol(sgtbx.space_group(hall))
        if data_patterson != model_patterson:
            raise ModelError(f"{model_name}: space group {reference.space_group_symbol} (Patterson group "
                             f"{model_patterson}) disagrees with the lattices' Patterson group {data_patterson}")
    model_cell = uctbx.unit_cell(reference.cell)
    if not uctbx.unit_cell(tuple(mean_cell)).is_similar_to(model_cell, CELL_RELATIVE_LENGTH_TOLERANCE,
                                                           CELL_ANGLE_TOLERANCE_DEG):
        tolerance = f"{CELL_RELATIVE_LENGTH_TOLERANCE:.0%} in lengths, {CELL_ANGLE_TOLERANCE_DEG:g} deg in angles"
        raise ModelError(f"{model_name}: model cell {format_cell(reference.cell)} disagrees with the lattices' "
                         f"average cell {format_cell(mean_cell)} (tolerance {tolerance})")


def format_cell(cell: Sequence[float]) -> str:
    return "(" + ", ".join(f"{value:.3f}" for value in cell[:3]) + ", " + ", ".join(
        f"{value:.2f}" for value in cell[3:]) + ")"
