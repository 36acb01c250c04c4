"""Miller indices as sortable integer keys, and their mapping to the model's asymmetric unit.

A key packs (h, k, l) into one int64 so that sorting keys sorts indices lexicographically; grouping,
matching and exchanging observations by index then run on plain numpy integer arrays.

Observations are mapped with cctbx's ``miller.map_to_asu`` twice, without and with the anomalous
flag: the non-anomalous asymmetric-unit index names the Friedel pair (IMEAN, the reference, the owner
rank), and the anomalous mapping tells I(+) from I(-). In cctbx's anomalous asymmetric unit an I(-)
observation maps to minus the pair's index; centric indices always map to I(+). Only the distinct
indices are mapped (a dataset has millions of observations of some tens of thousands of indices).
"""

from __future__ import annotations

import numpy as np

from xfel_spread.io.mtz import flex_miller_index as as_flex_miller_index

#: Bits per index component in a key; components must lie in [-_OFFSET, _OFFSET).
_BITS = 16
_OFFSET = 1 << (_BITS - 1)


class IndexRangeError(ValueError):
    """A Miller index component too large to pack into a key."""


def pack_hkl(hkl: np.ndarray) -> np.ndarray:
    """int64 keys of an (n, 3) integer array of Miller indices; key order is (h, k, l) order."""
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    if hkl.size and (hkl.min() < -_OFFSET or hkl.max() >= _OFFSET):
        raise IndexRangeError(f"Miller index component outside [{-_OFFSET}, {_OFFSET}): cannot be merged")
    shifted = hkl + _OFFSET
    return (shifted[:, 0] << (2 * _BITS)) | (shifted[:, 1] << _BITS) | shifted[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    """(n, 3) int32 Miller indices of int64 keys (inverse of :func:`pack_hkl`)."""
    keys = np.asarray(keys, dtype=np.int64)
    mask = (1 << _BITS) - 1
    return np.stack([(keys >> (2 * _BITS)) & mask, (keys >> _BITS) & mask, keys & mask], axis=1).astype(
        np.int32) - _OFFSET


def from_flex_miller_index(indices) -> np.ndarray:
    """(n, 3) int32 array of a cctbx ``flex.miller_index``."""
    return np.rint(indices.as_vec3_double().as_double().as_numpy_array()).astype(np.int32).reshape(-1, 3)


def map_to_asu(hkl: np.ndarray, space_group) -> tuple[np.ndarray, np.ndarray]:
    """(asu key, is I(-)) of each index in ``hkl`` ((n, 3) integers) under a cctbx ``space_group``.

    The key is that of the non-anomalous asymmetric-unit index (the Friedel pair); the flag is True
    where the observation is the pair's I(-) member.
    """
    from cctbx import miller

    distinct, inverse = np.unique(pack_hkl(hkl), return_inverse=True)
    raw = as_flex_miller_index(unpack_keys(distinct))
    space_group_type = space_group.type()
    pair, anomalous = raw.deep_copy(), raw.deep_copy()
    miller.map_to_asu(space_group_type, False, pair)
    miller.map_to_asu(space_group_type, True, anomalous)
    pair_hkl = from_flex_miller_index(pair)
    is_minus = ~np.all(from_flex_miller_index(anomalous) == pair_hkl, axis=1)
    return pack_hkl(pair_hkl)[inverse], is_minus[inverse]


def d_star_sq(hkl: np.ndarray, unit_cell_parameters) -> np.ndarray:
    """1/d^2 of each index of ``hkl`` ((n, 3)) in the cell (a, b, c, alpha, beta, gamma)."""
    from cctbx import uctbx

    metric = np.array(uctbx.unit_cell(tuple(unit_cell_parameters)).reciprocal_metrical_matrix())
    # reciprocal_metrical_matrix is (a*a*, b*b*, c*c*, a*b*, a*c*, b*c*)
    g = np.array([[metric[0], metric[3], metric[4]],
                  [metric[3], metric[1], metric[5]],
                  [metric[4], metric[5], metric[2]]])
    hkl = np.asarray(hkl, dtype=float).reshape(-1, 3)
    h, k, l = hkl[:, 0], hkl[:, 1], hkl[:, 2]
    # Spelled out in a fixed order: einsum's summation order may depend on memory alignment.
    return (g[0, 0] * h * h + g[1, 1] * k * k + g[2, 2] * l * l
            + 2.0 * (g[0, 1] * h * k + g[0, 2] * h * l + g[1, 2] * k * l))


def key_d_star_sq(keys: np.ndarray, unit_cell_parameters) -> np.ndarray:
    """1/d^2 of the indices of int64 ``keys`` in the given cell."""
    return d_star_sq(unpack_keys(keys), unit_cell_parameters)
