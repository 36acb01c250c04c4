"""Files the merge writes: the MTZ and the JSON summary (each atomically).

The per-lattice table is written by :func:`xfel_spread.io.lattices.write_lattice_table`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from xfel_spread.atomic import atomic_output, atomic_path
from xfel_spread.merging.indices import as_flex_miller_index, unpack_keys
from xfel_spread.merging.merge import MergedIntensities

#: MTZ column labels, in file order after H, K, L.
MTZ_LABELS = ("IMEAN", "SIGIMEAN", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "NIMEAN", "N(+)", "N(-)")


def anomalous_indices(merged: MergedIntensities) -> np.ndarray:
    """(n, 3) indices in cctbx's anomalous asymmetric unit: I(-) of pair h is stored as -h."""
    hkl = unpack_keys(merged.key)
    return np.where(merged.is_minus[:, None], -hkl, hkl)


def write_mtz(path, pairs: MergedIntensities, anomalous: MergedIntensities, cell: Sequence[float],
              space_group_symbol: str, wavelength: float) -> None:
    """IMEAN/SIGIMEAN, I(+)/SIGI(+)/I(-)/SIGI(-) and the multiplicities NIMEAN, N(+), N(-)."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=tuple(cell), space_group_symbol=space_group_symbol)
    pair_set = miller.set(symmetry, as_flex_miller_index(unpack_keys(pairs.key)), anomalous_flag=False)
    anomalous_set = miller.set(symmetry, as_flex_miller_index(anomalous_indices(anomalous)), anomalous_flag=True)
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


def json_ready(value):
    """``value`` with numpy scalars as Python numbers and NaN/inf as None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_summary(summary: Mapping, path) -> None:
    with atomic_output(path, "w") as stream:
        json.dump(json_ready(summary), stream, indent=2)
        stream.write("\n")
