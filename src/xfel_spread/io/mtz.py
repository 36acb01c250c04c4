"""Merged MTZ files: reading the intensities of ours or dials.merge's, Friedel mates separate and merged.

A merged MTZ needs the columns IMEAN, SIGIMEAN, I(+), SIGI(+), I(-), SIGI(-): our merge writes them
(:func:`write_merged_mtz`), and so does ``dials.merge`` (in its dataset, beside
N(+), N(-), F, DANO, ...). Indices are mapped to the asymmetric unit whatever convention the writer used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from xfel_spread.atomic import atomic_path
from xfel_spread.errors import UserInputError

#: Columns a merged MTZ must have: the Friedel-merged mean and the two Friedel mates.
MEAN_COLUMNS = ("IMEAN", "SIGIMEAN")
ANOMALOUS_COLUMNS = ("I(+)", "SIGI(+)", "I(-)", "SIGI(-)")


class MergedFileError(UserInputError, ValueError):
    """A merged MTZ that cannot be used, with the file named."""


@dataclass(frozen=True)
class MergedIntensities:
    """One merged data set: Friedel mates separate, and Friedel-merged.

    ``anomalous_indices`` are in the anomalous asymmetric unit (h and -h distinct) with their
    ``anomalous_intensities``/``anomalous_sigmas``; ``mean_indices`` in the Friedel-merged one with
    IMEAN and SIGIMEAN. Only measured values are held (an index with I(+) but no I(-) has one row).
    """

    path: str
    unit_cell: tuple[float, float, float, float, float, float]
    space_group: str
    anomalous_indices: np.ndarray
    anomalous_intensities: np.ndarray
    anomalous_sigmas: np.ndarray
    mean_indices: np.ndarray
    mean_intensities: np.ndarray
    mean_sigmas: np.ndarray

    def crystal_symmetry(self):
        """The unit cell and space group as a cctbx crystal symmetry."""
        from cctbx import crystal

        return crystal.symmetry(unit_cell=self.unit_cell, space_group_symbol=self.space_group)

    def anomalous_array(self):
        """The Friedel mates as a cctbx intensity array with ``anomalous_flag`` on."""
        return intensity_array(self.crystal_symmetry(), self.anomalous_indices, self.anomalous_intensities,
                                self.anomalous_sigmas, anomalous=True)

    def mean_array(self):
        """IMEAN/SIGIMEAN as a cctbx intensity array (Friedel mates merged)."""
        return intensity_array(self.crystal_symmetry(), self.mean_indices, self.mean_intensities,
                                self.mean_sigmas, anomalous=False)

    def d_range(self) -> tuple[float, float]:
        """(d_max, d_min) of the mean intensities, in Angstrom."""
        d = self.mean_array().d_spacings().data().as_numpy_array()
        return float(d.max()), float(d.min())


def intensity_array(symmetry, indices: np.ndarray, data: np.ndarray, sigmas: np.ndarray | None, anomalous: bool):
    """A cctbx intensity array from numpy indices (n, 3), values and sigmas (or None)."""
    from cctbx.array_family import flex

    columns = np.ascontiguousarray(np.asarray(indices, dtype=np.int32).reshape(-1, 3).T)
    return _flexintensity_array(symmetry, flex.miller_index(*(flex.int(column) for column in columns)),
                                 flex.double(np.asarray(data, dtype=np.float64)),
                                 None if sigmas is None else flex.double(np.asarray(sigmas, dtype=np.float64)),
                                 anomalous)


def _flexintensity_array(symmetry, indices, data, sigmas, anomalous: bool):
    from cctbx import miller

    array = miller.set(symmetry, indices, anomalous_flag=anomalous).array(data=data, sigmas=sigmas)
    return array.set_observation_type_xray_intensity()


def indices_as_numpy(indices) -> np.ndarray:
    """A flex.miller_index as an (n, 3) int64 array."""
    return indices.as_vec3_double().as_numpy_array().astype(np.int64).reshape(-1, 3)


def _crystal_symmetry_of_column(mtz, label: str):
    """Unit cell and space group of the MTZ crystal that holds the column ``label``."""
    for crystal in mtz.crystals():
        for dataset in crystal.datasets():
            if label in dataset.column_labels():
                return crystal.crystal_symmetry()
    raise KeyError(label)


def read_merged_mtz(path: str | os.PathLike) -> MergedIntensities:
    """Read a merged MTZ (ours or dials.merge's); the indices are mapped to the asymmetric unit."""
    import iotbx.mtz

    try:
        mtz = iotbx.mtz.object(file_name=str(path))
    except Exception as exc:  # iotbx raises RuntimeError or Sorry, with multi-line text
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergedFileError(f"{path}: cannot read MTZ ({reason})") from None
    labels = set(mtz.column_labels())
    missing = [label for label in MEAN_COLUMNS + ANOMALOUS_COLUMNS if label not in labels]
    if missing:
        raise MergedFileError(f"{path}: merged MTZ lacks column(s) {', '.join(missing)} "
                              f"(needs {', '.join(MEAN_COLUMNS + ANOMALOUS_COLUMNS)})")
    symmetry = _crystal_symmetry_of_column(mtz, MEAN_COLUMNS[0])

    mean = mtz.extract_observations(*MEAN_COLUMNS)
    anomalous = mtz.extract_observations_anomalous(*ANOMALOUS_COLUMNS)
    # Both arrays are mapped to the asymmetric unit, whatever convention the writer used.
    mean_array = _flexintensity_array(symmetry, mean.indices, mean.data, mean.sigmas, anomalous=False).map_to_asu()
    anomalous_array = _flexintensity_array(symmetry, anomalous.indices, anomalous.data, anomalous.sigmas,
                                            anomalous=True).map_to_asu()
    for name, array in (("IMEAN", mean_array), ("I(+)/I(-)", anomalous_array)):
        if not array.is_unique_set_under_symmetry():
            raise MergedFileError(f"{path}: {name} holds symmetry-equivalent indices twice; it is not merged data")
    return MergedIntensities(
        path=str(path),
        unit_cell=tuple(symmetry.unit_cell().parameters()),
        space_group=symmetry.space_group_info().type().lookup_symbol(),
        anomalous_indices=indices_as_numpy(anomalous_array.indices()),
        anomalous_intensities=anomalous_array.data().as_numpy_array(),
        anomalous_sigmas=anomalous_array.sigmas().as_numpy_array(),
        mean_indices=indices_as_numpy(mean_array.indices()),
        mean_intensities=mean_array.data().as_numpy_array(),
        mean_sigmas=mean_array.sigmas().as_numpy_array(),
    )


#: Columns :func:`write_merged_mtz` writes, in file order after H, K, L.
MTZ_LABELS = ("IMEAN", "SIGIMEAN", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "NIMEAN", "N(+)", "N(-)")


@dataclass(frozen=True)
class MergedColumns:
    """One kind of merged group as plain arrays: (n, 3) Miller indices, intensity, sigma, multiplicity.

    Friedel pairs carry their asymmetric-unit index; anomalous groups carry cctbx's anomalous convention
    (the I(-) member of pair h stored as -h)."""

    indices: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    multiplicity: np.ndarray


def flex_miller_index(hkl: np.ndarray):
    """cctbx ``flex.miller_index`` of an (n, 3) integer array."""
    from cctbx.array_family import flex

    hkl = np.asarray(hkl, dtype=np.int32).reshape(-1, 3)
    return flex.miller_index(*(flex.int(np.ascontiguousarray(hkl[:, axis])) for axis in range(3)))


def write_merged_mtz(path, pairs: MergedColumns, anomalous: MergedColumns, cell, space_group_symbol: str,
                     wavelength: float) -> None:
    """IMEAN/SIGIMEAN, I(+)/SIGI(+)/I(-)/SIGI(-) and the multiplicities NIMEAN, N(+), N(-), atomically."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex


    symmetry = crystal.symmetry(unit_cell=tuple(cell), space_group_symbol=space_group_symbol)
    pair_set = miller.set(symmetry, flex_miller_index(pairs.indices), anomalous_flag=False)
    anomalous_set = miller.set(symmetry, flex_miller_index(anomalous.indices), anomalous_flag=True)
    imean = miller.array(pair_set, flex.double(pairs.intensity), flex.double(pairs.sigma))
    ianom = miller.array(anomalous_set, flex.double(anomalous.intensity), flex.double(anomalous.sigma))
    dataset = imean.set_observation_type_xray_intensity().as_mtz_dataset(
        column_root_label="IMEAN", wavelength=wavelength)
    dataset.add_miller_array(ianom.set_observation_type_xray_intensity(), column_root_label="I")
    dataset.add_miller_array(miller.array(pair_set, flex.int(pairs.multiplicity.astype(np.int32))),
                             column_root_label="NIMEAN")
    dataset.add_miller_array(miller.array(anomalous_set, flex.int(anomalous.multiplicity.astype(np.int32))),
                             column_root_label="N")
    mtz = dataset.mtz_object()
    mtz.set_title("spread-merge: merged intensities, Friedel mates separate")
    with atomic_path(path) as temporary:
        mtz.write(str(temporary))
