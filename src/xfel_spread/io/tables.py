"""Tab-separated tables: the one writer every stage's TSV goes through, and how a cell is spelt.

A table is a header line of column names, then one line per row, cells separated by tabs, lines
ended by ``\\n`` (csv's minimal quoting, so a cell holding a tab or quote is quoted). A missing
number (None or NaN) is an empty cell, :data:`NAN_TEXT`; :func:`parse_float` reads it back as NaN.
Each file is written atomically; :func:`read_table` reads one back, checking its header.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from xfel_spread.atomic import atomic_output

#: How a missing number (None, NaN) is written.
NAN_TEXT = ""


def format_cell(value, float_format: str = ".6g") -> str:
    """One cell: None and NaN as :data:`NAN_TEXT`, other floats with ``float_format``, anything else as str."""
    if value is None:
        return NAN_TEXT
    if isinstance(value, (float, np.floating)):
        return NAN_TEXT if math.isnan(value) else format(value, float_format)
    return str(value)


def parse_float(text: str) -> float:
    """A number cell as written by :func:`format_cell`: the empty cell (or ``nan``) is NaN."""
    return math.nan if text == NAN_TEXT else float(text)


def write_table(path, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Write a header of ``columns`` and ``rows`` (sequences of cells, already text or plain values)
    as a tab-separated table, atomically."""
    with atomic_output(path, "w", newline="") as stream:
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def read_table(path, required: Sequence[str], error: Callable[[str], Exception],
               what: str = "table") -> list[tuple[int, dict]]:
    """(line number, row as a dict of text cells) of every row of a table written by :func:`write_table`.

    A header without all the ``required`` columns, or a file that cannot be opened or is not text,
    raises ``error(message)``, the message naming ``path`` and ``what`` it should be in one line.
    """
    try:
        with open(path, newline="") as stream:
            reader = csv.DictReader(stream, delimiter="\t")
            missing = [name for name in required if name not in (reader.fieldnames or [])]
            if missing:
                raise error(f"{path}: {what} lacks column(s) {', '.join(missing)}")
            return list(enumerate(reader, start=2))
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not text") from None
    except OSError as problem:
        raise error(f"{path}: cannot read {what} ({problem})") from None
