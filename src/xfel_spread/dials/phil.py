"""Check the users' DIALS phil files before any job runs.

A phil file with an unknown parameter, a value of the wrong type or a syntax error would otherwise fail
every stills_process job (or, worse, be ignored with a warning in a log nobody reads). Snakemake calls
:func:`check_phil_file` while it parses the workflow, so the run stops before any work with one line
naming the file, the line and the problem.
"""

from __future__ import annotations

import os

from xfel_spread.errors import UserInputError

#: The DIALS program whose parameters each kind of phil file sets.
PROGRAMS = ("stills_process", "refine")


class PhilFileError(UserInputError, ValueError):
    """A phil file DIALS would reject; the message is one line: ``path: problem``."""


def master_scope(program: str):
    """The master phil scope of a DIALS program (``stills_process`` or ``refine``)."""
    if program == "stills_process":
        from dials.command_line.stills_process import phil_scope

        return phil_scope
    if program == "refine":
        from dials.command_line.refine import working_phil

        return working_phil
    raise ValueError(f"no phil scope for program {program!r}; expected one of {PROGRAMS}")


def check_phil_file(path: str | os.PathLike, program: str) -> None:
    """Raise :class:`PhilFileError` unless ``path`` is a valid parameter file for ``program``."""
    from libtbx import phil
    from libtbx.utils import Sorry

    if not os.path.isfile(path):
        raise PhilFileError(f"{path}: no such file")
    # libtbx reports syntax and most type errors as RuntimeError, a bad choice as Sorry (over several
    # lines), and some malformed values (a unit cell of words) as a bare ValueError.
    try:
        source = phil.parse(file_name=str(path))
        working, unused = master_scope(program).fetch(sources=[source], track_unused_definitions=True)
        if not unused:  # values are interpreted only once every name is known
            working.extract()
    except (RuntimeError, Sorry, ValueError) as error:
        raise PhilFileError(f"{path}: {' '.join(str(error).split())}") from None
    if unused:
        names = ", ".join(f"{definition.path}{_line_of(definition)}" for definition in unused)
        raise PhilFileError(f"{path}: unknown parameter for dials.{program}: {names}")


def _line_of(definition) -> str:
    line = getattr(definition.object.words[0] if definition.object.words else None, "line_number", None)
    return f" (line {line})" if line else ""
