"""Per-energy-channel structure-factor amplitudes of the LY99 ferredoxin model.

The LY99 simulation uses one amplitude set per energy channel: Fcalc from the 1M2A model to
1.7 A with a flat bulk-solvent model (k_sol 0.435, b_sol 46), in which the iron atoms named FE1
take the oxidized f'/f'' table and those named FE2 the reduced table at the channel's energy.

Structure factors are linear in each atom's form factor, so the energy dependence is carried by
two complex "site sums" instead of 100 full Fcalc evaluations::

    F_k(h) = F_model(h; Fe f'=f''=0) + sum_site (f'_site(E_k) + i f''_site(E_k)) * G_site(h)

where ``G_site(h) = sum_{atoms j of the site, symmetry ops} T_j(h) exp(2 pi i h.x_j)`` is the
structure factor of that site's atoms with unit, resolution-independent scattering. The other
atoms take Henke f'/f'' at the mean channel energy: across the 100 eV band they change by less
than 1e-3 electrons (no absorption edge of C, N, O, S lies near 7.1 keV).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from xfel_spread.errors import UserInputError

#: hc in eV * Angstrom (CODATA 2018), used to convert channel energies to wavelengths.
HC_EV_ANGSTROM = 12398.419843320026


class ModelFileError(UserInputError, ValueError):
    """A model or scattering-factor table that cannot be used, with the file named."""


@dataclass(frozen=True)
class ChannelAmplitudes:
    """Amplitudes |F| for each energy channel on one anomalous asymmetric unit.

    ``indices`` are Miller indices in the space group's asymmetric unit with Friedel mates kept
    separate; ``amplitudes[k, m]`` is |F| of ``indices[m]`` at ``energies_ev[k]``.
    """

    energies_ev: np.ndarray
    unit_cell: tuple[float, float, float, float, float, float]
    space_group: str
    indices: np.ndarray
    amplitudes: np.ndarray

    @property
    def wavelengths_a(self) -> np.ndarray:
        return HC_EV_ANGSTROM / self.energies_ev


def channel_energies(start_ev: float, step_ev: float, n_channels: int) -> np.ndarray:
    """Energies of the simulation's channels: ``start + k * step`` for k = 0..n-1."""
    return start_ev + step_ev * np.arange(n_channels, dtype=np.float64)


def read_fp_fdp_table(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a three-column (energy eV, f', f'') table such as ``pf-rd-ox_fftkk.out``."""
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read scattering-factor table ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ModelFileError(f"{path}: not a numeric three-column table ({exc})") from None
    if table.shape[1] != 3 or table.shape[0] < 2:
        raise ModelFileError(f"{path}: expected three columns (energy, f', f'') and at least two rows, got shape {table.shape}")
    energy = table[:, 0]
    if np.any(np.diff(energy) <= 0):
        raise ModelFileError(f"{path}: energies are not strictly increasing")
    return energy, table[:, 1], table[:, 2]


def interpolate_fp_fdp(table: tuple[np.ndarray, np.ndarray, np.ndarray], energies_ev: np.ndarray,
                       source: str) -> tuple[np.ndarray, np.ndarray]:
    """f', f'' at the given energies by linear interpolation, refusing to extrapolate."""
    energy, fp, fdp = table
    if energies_ev.min() < energy[0] or energies_ev.max() > energy[-1]:
        raise ModelFileError(
            f"{source}: table covers {energy[0]:g}-{energy[-1]:g} eV, channels need "
            f"{energies_ev.min():g}-{energies_ev.max():g} eV")
    return np.interp(energies_ev, energy, fp), np.interp(energies_ev, energy, fdp)


def _read_xray_structure(pdb_path: str):
    import iotbx.pdb

    try:
        pdb_input = iotbx.pdb.input(file_name=pdb_path)
        xray_structure = pdb_input.xray_structure_simple()
    except Exception as exc:  # iotbx raises OSError, Sorry or CifParserError with multi-line text
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{pdb_path}: cannot read model ({first_line})") from None
    if xray_structure.scatterers().size() == 0:
        raise ModelFileError(f"{pdb_path}: model has no atoms")
    atom_names = [atom.name.strip() for atom in pdb_input.atoms()]
    return xray_structure, atom_names


def _site_sum(miller_set, xray_structure, selection):
    """G_site(h): structure factor of the selected atoms per unit of (f' + i f'')."""
    from cctbx import xray

    site = xray_structure.select(selection)
    with_unit_fp = site.deep_copy_scatterers()
    without_fp = site.deep_copy_scatterers()
    for scatterer in with_unit_fp.scatterers():
        scatterer.fp, scatterer.fdp = 1.0, 0.0
    for scatterer in without_fp.scatterers():
        scatterer.fp, scatterer.fdp = 0.0, 0.0

    def fcalc(structure):
        return xray.structure_factors.from_scatterers(
            miller_set=miller_set, cos_sin_table=False)(
            xray_structure=structure, miller_set=miller_set, algorithm="direct").f_calc().data()

    return np.asarray(fcalc(with_unit_fp) - fcalc(without_fp))


def compute_channel_amplitudes(pdb_path: str, oxidized_table_path: str, reduced_table_path: str,
                               energies_ev: np.ndarray, d_min_a: float, k_sol: float, b_sol: float,
                               oxidized_atom: str = "FE1", reduced_atom: str = "FE2") -> ChannelAmplitudes:
    """Amplitudes for every channel: Fmodel with bulk solvent plus the energy-dependent Fe terms of LY99's
    two sites (:func:`compute_site_amplitudes` with the oxidized and the reduced table)."""
    return compute_site_amplitudes(pdb_path, {oxidized_atom: oxidized_table_path, reduced_atom: reduced_table_path},
                                   energies_ev, d_min_a, k_sol, b_sol)


def compute_site_amplitudes(pdb_path: str, site_tables: Mapping[str, str], energies_ev: np.ndarray, d_min_a: float,
                            k_sol: float, b_sol: float) -> ChannelAmplitudes:
    """Amplitudes for every channel: Fmodel with bulk solvent plus each anomalous site's energy-dependent term.

    ``site_tables`` maps the atom name of each site to its f', f'' table (three columns: eV, f', f'').
    The model's :func:`site_decomposition` (other atoms at the mean channel energy's Henke f', f'')
    with each site's f', f'' interpolated from its table at every channel energy."""
    if not site_tables:
        raise ModelFileError(f"{pdb_path}: no anomalous site named (an atom name and its f', f'' table each)")
    form_factors = [interpolate_fp_fdp(read_fp_fdp_table(path), energies_ev, path) for path in site_tables.values()]
    decomposition = site_decomposition(pdb_path, d_min_a, k_sol, b_sol, tuple(site_tables),
                                       HC_EV_ANGSTROM / float(np.mean(energies_ev)))
    fp = np.stack([values[0] for values in form_factors])
    fdp = np.stack([values[1] for values in form_factors])
    return ChannelAmplitudes(
        energies_ev=np.asarray(energies_ev, dtype=np.float64),
        unit_cell=decomposition.unit_cell,
        space_group=decomposition.space_group,
        indices=decomposition.indices,
        amplitudes=decomposition.amplitudes(fp, fdp).astype(np.float32),
    )


def save_channel_amplitudes(amplitudes: ChannelAmplitudes, path: str) -> None:
    """Write the table as HDF5, atomically."""
    import h5py

    from xfel_spread.atomic import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["format"] = "xfel_spread.channel_amplitudes"
        handle.attrs["unit_cell"] = np.asarray(amplitudes.unit_cell)
        handle.attrs["space_group"] = amplitudes.space_group
        handle["energy_ev"] = amplitudes.energies_ev
        handle["miller_index"] = amplitudes.indices
        handle.create_dataset("amplitude", data=amplitudes.amplitudes, compression="gzip",
                              compression_opts=4, shuffle=True)


def load_channel_amplitudes(path: str) -> ChannelAmplitudes:
    """Read a table written by :func:`save_channel_amplitudes`."""
    return _read_table(path, lambda handle: ChannelAmplitudes(
        energies_ev=handle["energy_ev"][()],
        unit_cell=tuple(float(v) for v in handle.attrs["unit_cell"]),
        space_group=str(handle.attrs["space_group"]),
        indices=handle["miller_index"][()],
        amplitudes=handle["amplitude"][()],
    ))


def load_channel_energies(path: str) -> np.ndarray:
    """The channel energies (eV) of a table written by :func:`save_channel_amplitudes`, without reading
    its amplitudes."""
    return _read_table(path, lambda handle: handle["energy_ev"][()])


def _read_table(path: str, read):
    """``read(handle)`` of the channel-amplitude table at ``path``; ModelFileError naming it otherwise."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != "xfel_spread.channel_amplitudes":
                raise ModelFileError(f"{path}: not a channel-amplitude table")
            return read(handle)
    except (OSError, KeyError) as exc:
        raise ModelFileError(f"{path}: cannot read channel-amplitude table ({exc})") from None


@dataclass(frozen=True)
class AmplitudeGrid:
    """Dense P1 lookup table: ``values[k, h - h_min, k - k_min, l - l_min]`` = |F|, 0 outside."""

    values: np.ndarray
    hkl_min: np.ndarray


def expand_to_p1_grid(amplitudes: ChannelAmplitudes) -> AmplitudeGrid:
    """Expand the asymmetric unit to all P1 indices (Friedel mates distinct) on a dense grid.

    The simulator looks up amplitudes by integer Miller index; a dense grid makes that an indexed
    load on CPU and GPU alike. Indices beyond d_min keep amplitude 0 (nanoBragg's default_F = 0).
    """
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=amplitudes.unit_cell, space_group_symbol=amplitudes.space_group)
    asu_set = miller.set(symmetry, flex.miller_index([tuple(int(v) for v in row) for row in amplitudes.indices]),
                         anomalous_flag=True)
    p1_set, asu_selection = asu_set.expand_to_p1(return_iselection=True)
    p1_indices = np.asarray(p1_set.indices(), dtype=np.int64).reshape(-1, 3)
    source_columns = np.asarray(asu_selection, dtype=np.int64)

    hkl_min = p1_indices.min(axis=0)
    shape = p1_indices.max(axis=0) - hkl_min + 1
    grid = np.zeros((amplitudes.amplitudes.shape[0], *shape), dtype=np.float32)
    offset = p1_indices - hkl_min
    grid[:, offset[:, 0], offset[:, 1], offset[:, 2]] = amplitudes.amplitudes[:, source_columns]
    return AmplitudeGrid(values=grid, hkl_min=hkl_min)


def true_intensities(amplitudes: ChannelAmplitudes, mean_spectrum_weights) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous asymmetric-unit indices, sum_k w_k |F_k(h)|^2) with the weights normalised to sum 1.

    ``mean_spectrum_weights`` has one non-negative weight per channel of ``amplitudes``.
    """
    weights = np.asarray(mean_spectrum_weights, dtype=np.float64)
    n_channels = amplitudes.amplitudes.shape[0]
    if weights.shape != (n_channels,):
        raise ValueError(f"true intensities: {weights.size} spectrum weights for {n_channels} amplitude channels")
    if np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError("true intensities: spectrum weights must be non-negative and not all zero")
    squared = np.square(amplitudes.amplitudes.astype(np.float64))
    return np.asarray(amplitudes.indices), (weights / weights.sum()) @ squared


@dataclass(frozen=True)
class SiteDecomposition:
    """The complex pieces of the per-channel structure factors on the anomalous asymmetric unit.

    ``F_k(h) = f_rest[m] + sum_s (f'_s(E_k) + i f''_s(E_k)) * site_sums[s, m]`` for ``h =
    indices[m]`` (electrons): ``f_rest`` is Fmodel with bulk solvent and every site atom's f', f''
    set to 0, the other atoms taking Henke f', f'' at the mean wavelength; ``site_sums[s]`` is the
    structure factor of the atoms of site ``site_names[s]`` per unit of (f' + i f'').
    """

    unit_cell: tuple[float, float, float, float, float, float]
    space_group: str
    indices: np.ndarray
    site_names: tuple[str, ...]
    f_rest: np.ndarray
    site_sums: np.ndarray

    def amplitudes(self, fp: np.ndarray, fdp: np.ndarray) -> np.ndarray:
        """|F| for channel form factors ``fp[s, k]``, ``fdp[s, k]`` (electrons): shape (channels, indices).

        The sites are added one after the other, in order, to F_rest (the simulation's amplitude
        table is made this way, so its bits do not depend on a library's summation order)."""
        fp, fdp = np.asarray(fp, dtype=np.float64), np.asarray(fdp, dtype=np.float64)
        complex_f = np.repeat(self.f_rest[None, :], fp.shape[1], axis=0)
        for site in range(len(self.site_names)):
            complex_f += (fp[site] + 1j * fdp[site])[:, None] * self.site_sums[site][None, :]
        return np.abs(complex_f)


def site_decomposition(pdb_path: str, d_min_a: float, k_sol: float, b_sol: float,
                       site_atoms: tuple[str, ...] | list[str], mean_wavelength_a: float) -> SiteDecomposition:
    """Complex F_rest and site sums G_s of the model, as :func:`compute_channel_amplitudes` builds them.

    ``site_atoms`` are the atom names of the anomalous sites (e.g. ``("FE1", "FE2")``), each a site;
    ``mean_wavelength_a`` (Angstrom) sets the Henke f', f'' of the other atoms (the simulation uses
    hc over the mean channel energy). Combined with a site's f', f'' at channel energy E_k this
    gives exactly the complex F_k(h) whose modulus :func:`compute_channel_amplitudes` stores.
    """
    import mmtbx.f_model
    from cctbx.array_family import flex
    from cctbx.eltbx import henke

    xray_structure, atom_names = _read_xray_structure(pdb_path)
    site_names = tuple(site_atoms)
    if not site_names or len(set(site_names)) != len(site_names):
        raise ModelFileError(f"{pdb_path}: site atom names must be distinct and at least one, got {site_names}")
    selections = []
    for name in site_names:
        selection = flex.bool([atom_name == name for atom_name in atom_names])
        if selection.count(True) == 0:
            raise ModelFileError(f"{pdb_path}: no atom named {name} for the anomalous site")
        selections.append(selection)
    is_site_atom = selections[0]
    for selection in selections[1:]:
        is_site_atom = is_site_atom | selection
    for scatterer, in_site in zip(xray_structure.scatterers(), is_site_atom):
        if in_site:
            scatterer.fp, scatterer.fdp = 0.0, 0.0
        else:
            henke_factors = henke.table(scatterer.element_symbol()).at_angstrom(mean_wavelength_a)
            scatterer.fp, scatterer.fdp = henke_factors.fp(), henke_factors.fdp()

    miller_set = xray_structure.build_miller_set(anomalous_flag=True, d_min=d_min_a)
    placeholder_fobs = miller_set.array(data=flex.double(miller_set.size(), 1.0))
    fmodel = mmtbx.f_model.manager(f_obs=placeholder_fobs, xray_structure=xray_structure,
                                   k_sol=k_sol, b_sol=b_sol)
    f_rest = np.asarray(fmodel.f_model().data())
    site_sums = np.stack([_site_sum(miller_set, xray_structure, selection) for selection in selections])
    symmetry = xray_structure.crystal_symmetry()
    return SiteDecomposition(
        unit_cell=tuple(symmetry.unit_cell().parameters()),
        space_group=symmetry.space_group_info().type().lookup_symbol(),
        indices=np.asarray(miller_set.indices(), dtype=np.int32).reshape(-1, 3),
        site_names=site_names,
        f_rest=f_rest.astype(np.complex128),
        site_sums=site_sums.astype(np.complex128),
    )
