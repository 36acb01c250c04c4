"""Files the merge writes: the MTZ and the JSON summary (each atomically).

The per-lattice table is written by :func:`xfel_spread.io.lattices.write_lattice_table`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from xfel_spread.atomic import atomic_output
from xfel_spread.io.mtz import MergedColumns, write_merged_mtz
from xfel_spread.merging.indices import unpack_keys
from xfel_spread.merging.merge import MergedIntensities

def anomalous_indices(merged: MergedIntensities) -> np.ndarray:
    """(n, 3) indices in cctbx's anomalous asymmetric unit: I(-) of pair h is stored as -h."""
    hkl = unpack_keys(merged.key)
    return np.where(merged.is_minus[:, None], -hkl, hkl)


def write_mtz(path, pairs: MergedIntensities, anomalous: MergedIntensities, cell: Sequence[float],
              space_group_symbol: str, wavelength: float) -> None:
    """The merge's MTZ (:func:`xfel_spread.io.mtz.write_merged_mtz`) of its Friedel-pair and anomalous groups."""
    write_merged_mtz(
        path,
        MergedColumns(unpack_keys(pairs.key), pairs.intensity, pairs.sigma, pairs.multiplicity),
        MergedColumns(anomalous_indices(anomalous), anomalous.intensity, anomalous.sigma, anomalous.multiplicity),
        cell, space_group_symbol, wavelength)


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
