"""The free mosaic domains of the pixel refinements (``P_domains.tsv``): writer and reader.

With ``stage1.free_domains`` on, stage 1 (and its batched path) refines each lattice as D mosaic
domains, each turned by its own rotation vector about the lattice's refined orientation. The shots
table holds the lattice's parameters (its eta: the domains' RMS angle); this table holds the domains,
so that a later stage (SPREAD) models the lattice as stage 1 fitted it.

One row per domain of every converged lattice that has them, lattices in the annulus experiment list's
order: ``lattice`` (position in that list, the shots table's row), ``domain`` (0 to D-1) and the
rotation vector's components about the laboratory x, y, z axes (degrees; axis times angle), centred
(they sum to zero over the lattice's domains). Floats to 10 significant digits. A lattice without rows
has no free domains (free domains off, or a lattice that did not converge): its model is the shots
table's alone. With the free domains off the table is its header.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from xfel_spread.errors import UserInputError
from xfel_spread.io.tables import read_table, write_table

#: Columns of the domains table, in order.
DOMAIN_COLUMNS = ("lattice", "domain", "rot_x_deg", "rot_y_deg", "rot_z_deg")
#: A lattice's domain vectors must sum to zero to this (degrees; the table's rounding is far below it).
CENTRED_TOLERANCE_DEG = 1e-6


class MosaicDomainsError(UserInputError, ValueError):
    """A domains table that cannot be read; one line naming the file."""


def write_domain_vectors(vectors: Mapping[int, np.ndarray], path: str | os.PathLike) -> None:
    """The domains table of ``vectors`` ({lattice: its (D, 3) rotation vectors, degrees}), lattices in
    increasing order, atomically."""
    rows = []
    for lattice in sorted(vectors):
        for domain, vector in enumerate(np.asarray(vectors[lattice], dtype=np.float64).reshape(-1, 3)):
            rows.append((int(lattice), domain, *(format(float(value), ".10g") for value in vector)))
    write_table(path, DOMAIN_COLUMNS, rows)


def read_domain_vectors(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """{lattice: its (D, 3) rotation vectors, degrees} of a domains table; MosaicDomainsError (one line
    naming the file and line) for a row that is not numbers, domains not numbered 0 to D-1 in order,
    a lattice given twice, or vectors that are not finite or not centred."""
    rows: dict[int, list] = {}
    previous = None
    for line_number, raw in read_table(path, DOMAIN_COLUMNS, MosaicDomainsError, "domains table"):
        try:
            lattice, domain = int(raw["lattice"]), int(raw["domain"])
            vector = [float(raw[name]) for name in DOMAIN_COLUMNS[2:]]
        except (TypeError, ValueError):
            raise MosaicDomainsError(f"{path}:{line_number}: not a domains-table row") from None
        if lattice < 0 or not all(math.isfinite(value) for value in vector):
            raise MosaicDomainsError(f"{path}:{line_number}: lattice must be at least 0 and the vector finite")
        if lattice != previous and lattice in rows:
            raise MosaicDomainsError(f"{path}:{line_number}: lattice {lattice} given twice")
        domains = rows.setdefault(lattice, [])
        if domain != len(domains):
            raise MosaicDomainsError(f"{path}:{line_number}: lattice {lattice}'s domains must be numbered 0, 1, ... "
                                     "in order")
        domains.append(vector)
        previous = lattice
    vectors = {lattice: np.asarray(domains, dtype=np.float64) for lattice, domains in rows.items()}
    for lattice, values in vectors.items():
        if len(values) < 2:
            raise MosaicDomainsError(f"{path}: lattice {lattice} has {len(values)} domain; free domains are at least 2")
        if np.abs(values.sum(axis=0)).max() > CENTRED_TOLERANCE_DEG * len(values):
            raise MosaicDomainsError(f"{path}: lattice {lattice}'s domain vectors do not sum to zero (they are "
                                     "centred on the lattice's orientation)")
    return vectors
