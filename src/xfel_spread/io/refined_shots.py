"""The shots table of the pixel refinements (stage 1 and its batched path, ``P_shots.tsv``): writer and reader.

One row per lattice, in the annulus experiment list's order (:data:`SHOT_COLUMNS`; see
``xfel_spread.stage1.io`` for what each column means). Integers as such, floats to 10 significant
digits, None and NaN blank; text cells on one line without tabs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from xfel_spread.atomic import atomic_output
from xfel_spread.errors import UserInputError
from xfel_spread.io.tables import read_table

#: Columns of the shots table, in order.
SHOT_COLUMNS = (
    "shot", "image", "identifier", "converged", "reason", "n_rois", "n_rois_strong", "n_rois_no_f", "n_pixels",
    "n_trusted",
    "G", "rot_x_deg", "rot_y_deg", "rot_z_deg", "a", "b", "c", "beta_deg", "Na", "Nb", "Nc", "eta_deg",
    "detz_shift_mm", "nll_before", "nll_after", "iterations",
    "rmsd_radial_before_px", "rmsd_radial_after_px", "rmsd_overall_before_px", "rmsd_overall_after_px",
    "rmsd_radial_strong_before_px", "rmsd_radial_strong_after_px", "rmsd_overall_strong_before_px",
    "rmsd_overall_strong_after_px", "rmsd_radial_strong_dials_px", "zscore_sigma_before", "zscore_sigma", "seconds",
)
#: Refined parameters, as the shots table names them (those of ``stage1.model.PARAMETER_NAMES``).
PARAMETER_COLUMNS = ("G", "rot_x_deg", "rot_y_deg", "rot_z_deg", "a", "b", "c", "beta_deg", "Na", "Nb", "Nc",
                     "eta_deg", "detz_shift_mm")
INTEGER_COLUMNS = ("shot", "image", "converged", "n_rois", "n_rois_strong", "n_rois_no_f", "n_pixels", "n_trusted",
                   "iterations")
TEXT_COLUMNS = ("identifier", "reason")


class RefinedShotsError(UserInputError, ValueError):
    """A shots table that cannot be read; one line naming the file."""


def format_value(column: str, value) -> str:
    """One table cell: integers as such, floats to 10 significant digits, None and NaN blank."""
    if value is None:
        return ""
    if column in TEXT_COLUMNS:
        return " ".join(str(value).split())  # one line, no tabs
    if column in INTEGER_COLUMNS:
        return str(int(value))
    value = float(value)
    return "" if math.isnan(value) else f"{value:.10g}"


def write_refined_shots(rows: Sequence[Mapping], path: str | os.PathLike) -> None:
    """The shots table (TSV with a header, one row per mapping of :data:`SHOT_COLUMNS` values, in order), atomically."""
    with atomic_output(path, "w", newline="") as stream:
        stream.write("\t".join(SHOT_COLUMNS) + "\n")
        for row in rows:
            stream.write("\t".join(format_value(column, row.get(column)) for column in SHOT_COLUMNS) + "\n")


def read_refined_shots(path: str | os.PathLike) -> list[dict]:
    """Rows of a shots table; numbers parsed, blank cells None."""
    rows = []
    for line_number, raw in read_table(path, SHOT_COLUMNS, RefinedShotsError, "shots table"):
        try:
            rows.append({name: _parse(name, raw[name]) for name in SHOT_COLUMNS})
        except (TypeError, ValueError):
            raise RefinedShotsError(f"{path}:{line_number}: not a shots-table row") from None
    return rows


def _parse(column: str, text: str):
    if column in TEXT_COLUMNS:
        return text
    if text == "":
        return None
    return int(text) if column in INTEGER_COLUMNS else float(text)
