"""The files of one shard's ``dials.stills_process`` run: their names and the per-shot table.

A shard with output prefix ``P`` has ``P_integrated.expt`` / ``P_integrated.refl`` (integrated
lattices and their reflections), ``P_refined.expt`` / ``P_indexed.refl`` (indexed, refined lattices and
their spots) and ``P_shots.tsv``, one row per shot with its outcome, counts and reason
(:data:`SHOTS_TABLE_COLUMNS`; a count DIALS did not report is an empty cell). They are written by
:mod:`xfel_spread.dials.stills`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from xfel_spread.errors import UserInputError
from xfel_spread.io.tables import read_table, write_table

#: The outputs of one shard, as suffixes of its prefix.
OUTPUT_SUFFIXES = {
    "integrated_experiments": "_integrated.expt",
    "integrated_reflections": "_integrated.refl",
    "refined_experiments": "_refined.expt",
    "indexed_reflections": "_indexed.refl",
    "shots": "_shots.tsv",
}
SHOTS_TABLE_COLUMNS = ("shot", "image", "status", "n_spots", "n_indexed", "n_integrated", "reason")


def output_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """The five output files of a shard, by name (see the module docstring)."""
    return {name: Path(f"{prefix}{suffix}") for name, suffix in OUTPUT_SUFFIXES.items()}


def write_shots_table(shots: Sequence, path) -> None:
    """The shots table of a shard, atomically: one row per shot (``ShotOutcome.as_row()``, in
    :data:`SHOTS_TABLE_COLUMNS` order)."""
    write_table(path, SHOTS_TABLE_COLUMNS, (shot.as_row() for shot in shots))


class ShotsTableError(UserInputError, ValueError):
    """A shots table that cannot be read; the message names it in one line."""


def read_shots_table(path) -> list[dict]:
    """Rows of a ``_shots.tsv`` table as dicts (counts as int or None)."""
    rows = [row for _, row in read_table(path, SHOTS_TABLE_COLUMNS, ShotsTableError, "shots table")]
    for row in rows:
        for key in ("shot", "image"):
            row[key] = int(row[key])
        for key in ("n_spots", "n_indexed", "n_integrated"):
            row[key] = int(row[key]) if row[key] else None
    return rows
