"""The merge's per-lattice table (``lattices.tsv``): one row per lattice read, with the merge's decision.

Written by the merge stage (:func:`write_lattice_table`), read by the annulus stage and the DIALS
cross-check (:func:`read_accepted_identifiers`), which need its ``identifier`` and ``accepted`` columns.
Tab-separated with a header; numbers written by :func:`xfel_spread.io.tables.format_cell`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from xfel_spread.errors import UserInputError
from xfel_spread.io.tables import format_cell, read_table, write_table

#: Columns of the lattice table, in file order.
LATTICE_COLUMNS = ("global_id", "shard_prefix", "identifier", "accepted", "reason", "G", "B", "RS",
                   "theta_x_mrad", "theta_y_mrad", "mahalanobis", "reference_cc", "n_reflections")
#: The columns a reader of the table needs: the lattice's DIALS identifier and whether it was merged (1 or 0).
REQUIRED_COLUMNS = ("identifier", "accepted")


class LatticeTableError(UserInputError, ValueError):
    """A lattice table that cannot be used; the message names it (and the line) in one line."""


def write_lattice_table(rows: Mapping[str, Sequence], path) -> None:
    """One row per lattice, atomically; ``rows`` maps each of LATTICE_COLUMNS to a column of values."""
    n = len(rows["global_id"])
    write_table(path, LATTICE_COLUMNS,
                ([format_cell(rows[column][row]) for column in LATTICE_COLUMNS] for row in range(n)))


def read_accepted_identifiers(path: str | os.PathLike) -> list[str]:
    """DIALS experiment identifiers of the lattices the merge accepted (``accepted`` = 1), in table order."""
    accepted = []
    for line_number, row in read_table(path, REQUIRED_COLUMNS, LatticeTableError, "lattice table"):
        if row["accepted"] not in ("0", "1"):
            raise LatticeTableError(f"{path}:{line_number}: accepted must be 1 or 0, got {row['accepted']!r}")
        if row["accepted"] == "1":
            accepted.append(row["identifier"])
    return accepted
