"""Cross-check of our merge: ``dials.scale`` then ``dials.merge`` on the lattices our merge accepted.

The lattices (those the merge's per-lattice table marks accepted, the first shards first, at most
``merge.dials_crosscheck.max_lattices``) and their integrated reflections are gathered into one
experiment list and reflection table in the work directory, then scaled and merged by Debian's
DIALS 3.12, run as ``python -m dials.command_line.*`` so it sees this package's dxtbx Format class.

Choices, and why (measured on the validation set, 200 LY99 lattices of ~85 reflections each):

* space group: stills_process gives each crystal the lattice's Patterson group (C 1 2/m 1), and
  dials.scale (3.12 has no ``space_group=`` option) scales in the crystals' group, which would merge
  Friedel mates. The crystals are given its chiral subgroup on the same basis (C 1 2 1 for LY99), as
  ``dials.reindex space_group=`` would, and so are the merged indices;
* ``model=KB`` (one scale and one B per lattice), what dials.scale picks for stills anyway;
* ``full_matrix=False``: the final full-matrix round only estimates the scale factors' errors, and
  took 63 of 68 s on 200 lattices (it grows as the cube of the lattice count);
* ``reflection_selection.method=use_all``: the default quasi-random selection kept 97 reflections
  for 400 parameters, because few symmetry groups connect stills at this multiplicity;
* ``intensity.choice=sum``: stills_process integrates by summation only (no profile intensities);
* ``anomalous=True`` in both programs, ``d_min`` = ``merge.d_min``;
* dials.merge: ``wavelength_tolerance`` spans the lattices' wavelengths, since each still has its
  own and dials.merge would otherwise write one MAD data set per wavelength (``IMEAN_WAVE1``, ...);
  ``truncate=False`` (no amplitudes are needed); ``assess_space_group=False`` (it is given).

The merged MTZ has the columns IMEAN, SIGIMEAN, I(+), SIGI(+), I(-), SIGI(-), N(+), N(-).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from xfel_spread.atomic import atomic_output, atomic_path
from xfel_spread.dials.metrology import dials_command
from xfel_spread.errors import UserInputError
from xfel_spread.io.expt import read_lattices, select_lattices
from xfel_spread.io.lattices import read_accepted_identifiers
from xfel_spread.io.stills import output_paths

logger = logging.getLogger(__name__)

#: dials.scale options for stills that do not depend on the data (see the module docstring).
SCALE_OPTIONS = ("model=KB", "anomalous=True", "full_matrix=False", "reflection_selection.method=use_all",
                 "intensity_choice=sum", "output.html=None")
#: dials.merge options that do not depend on the data.
MERGE_OPTIONS = ("anomalous=True", "truncate=False", "assess_space_group=False", "output.html=None")
#: Added to the lattices' wavelength spread, so that every lattice falls in dials.merge's one group.
WAVELENGTH_MARGIN_A = 1e-4
#: Lines of a DIALS program's output kept to find its error line (a traceback's end).
TAIL_LINES = 200
#: Where dials.scale's log has its merging-statistics summary.
_SUMMARY_START = re.compile(r"-+Summary of merging statistics-+")


class DialsMergeError(UserInputError, RuntimeError):
    """The cross-check could not run, or a DIALS program failed; the message says which, in one line."""


def gather_lattices(shard_prefixes: Sequence, accepted: Sequence[str], max_lattices: int):
    """The accepted lattices of the shards, in shard order, at most ``max_lattices``, in one
    experiment list and reflection table (ids renumbered); also the number of shards they come from."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListDict

    wanted = set(accepted)
    experiments, tables, n_shards = ExperimentList(), [], 0
    for prefix in shard_prefixes:
        if len(experiments) >= max_lattices:
            break
        paths = output_paths(prefix)
        shard_document, shard_reflections = read_lattices(paths["integrated_experiments"],
                                                             paths["integrated_reflections"])
        selected_document, selected = select_lattices(shard_document, shard_reflections, wanted,
                                                      limit=max_lattices - len(experiments))
        if selected_document["experiment"]:
            experiments.extend(ExperimentListDict(selected_document, check_format=False).decode())
            tables.append(selected)
            n_shards += 1
    reflections = flex.reflection_table.concat(tables) if tables else flex.reflection_table()
    return experiments, reflections, n_shards


def set_chiral_space_group(experiments):
    """Give every crystal the chiral subgroup of its (Patterson) space group on the same basis; return it."""
    groups = {experiment.crystal.get_space_group().type().hall_symbol() for experiment in experiments}
    if len(groups) != 1:
        raise DialsMergeError(f"the lattices have different space groups (Hall symbols {', '.join(sorted(groups))})")
    space_group = experiments[0].crystal.get_space_group().build_derived_acentric_group()
    for experiment in experiments:
        experiment.crystal.set_space_group(space_group)
    return space_group


def wavelength_tolerance(experiments) -> float:
    """A dials.merge wavelength tolerance that puts every lattice in one group (Angstrom)."""
    wavelengths = [experiment.beam.get_wavelength() for experiment in experiments]
    return max(wavelengths) - min(wavelengths) + WAVELENGTH_MARGIN_A


def last_error_line(output: str) -> str:
    """The line of a DIALS program's output that says what went wrong: the last line naming an error,
    else the last non-blank line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|sorry", line, re.IGNORECASE):
            return line
    return lines[-1] if lines else "no output"


def run_dials_program(program: str, arguments: Sequence[str], work_dir: Path, log_stream) -> None:
    """Run a DIALS program in ``work_dir``, its output passed on to ``log_stream`` as it comes (DIALS
    logs its own progress); raise DialsMergeError naming the program and its error line on failure."""
    log_stream.flush()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(dials_command(program, arguments), cwd=work_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as process:
        for line in process.stdout:
            log_stream.write(line)
            tail.append(line)
    log_stream.flush()
    if process.returncode != 0:
        raise DialsMergeError(f"dials.{program} failed (exit status {process.returncode}): "
                              f"{last_error_line(''.join(tail))}")


def merging_summary(scale_log: str) -> str:
    """The 'Summary of merging statistics' block of dials.scale's log (up to the next blank-line pair)."""
    match = _SUMMARY_START.search(scale_log)
    if match is None:
        return "(dials.scale printed no merging summary)\n"
    block = scale_log[match.start():].split("\n\n\n")[0]
    return block.rstrip() + "\n"


def dials_scale_and_merge(shard_prefixes: Sequence, lattices_table, d_min: float, max_lattices: int, work_dir: Path,
                          mtz_path, summary_path, log_stream) -> str:
    """Scale and merge the accepted lattices with DIALS; write the MTZ and a text summary (returned).

    ``log_stream`` receives the DIALS programs' output. The work directory is emptied first and
    removed after success (the summary and the log keep the story).
    """
    accepted = read_accepted_identifiers(lattices_table)
    experiments, reflections, n_shards = gather_lattices(shard_prefixes, accepted, max_lattices)
    if len(experiments) == 0:
        raise DialsMergeError(f"{lattices_table}: none of its {len(accepted)} accepted lattices is in the "
                              f"{len(shard_prefixes)} shards; there is nothing for dials.scale")
    space_group = set_chiral_space_group(experiments)
    logger.info("DIALS cross-check: %d lattices (%d reflections) from %d shards, in %s",
                len(experiments), reflections.size(), n_shards, space_group.info())

    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    experiments.as_file(str(work_dir / "lattices.expt"))
    reflections.as_file(str(work_dir / "lattices.refl"))
    scale_arguments = ["lattices.expt", "lattices.refl", *SCALE_OPTIONS, f"d_min={d_min:g}",
                       "output.experiments=scaled.expt", "output.reflections=scaled.refl",
                       "output.log=dials.scale.log"]
    merge_arguments = ["scaled.expt", "scaled.refl", *MERGE_OPTIONS, f"d_min={d_min:g}",
                       f"wavelength_tolerance={wavelength_tolerance(experiments):.6f}",
                       "output.mtz=merged.mtz", "output.log=dials.merge.log"]
    timings = {}
    for program, arguments in (("scale", scale_arguments), ("merge", merge_arguments)):
        start = time.monotonic()
        run_dials_program(program, arguments, work_dir, log_stream)
        timings[program] = time.monotonic() - start

    lines = [
        f"DIALS cross-check: dials.scale and dials.merge (DIALS {_dials_version()})",
        f"lattices: {len(experiments)} accepted by our merge ({lattices_table}), from {n_shards} of "
        f"{len(shard_prefixes)} shards (at most {max_lattices}); {reflections.size()} integrated reflections",
        f"space group: {space_group.info().type().lookup_symbol()} (the crystals' Patterson group "
        "without its inversion centre, on the same basis)",
        f"dials.scale {' '.join(scale_arguments)}",
        f"dials.merge {' '.join(merge_arguments)}",
        f"time: dials.scale {timings['scale']:.1f} s, dials.merge {timings['merge']:.1f} s",
        "",
        merging_summary((work_dir / "dials.scale.log").read_text(errors="replace")),
    ]
    text = "\n".join(lines)
    with atomic_path(mtz_path) as temporary:
        shutil.copyfile(work_dir / "merged.mtz", temporary)
    with atomic_output(summary_path, "w") as stream:
        stream.write(text)
    shutil.rmtree(work_dir)
    return text


def _dials_version() -> str:
    from dials.util.version import dials_version

    return dials_version().replace("DIALS ", "")
