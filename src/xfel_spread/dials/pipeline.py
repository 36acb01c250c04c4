"""The drivers of the DIALS stages: what ``spread-stills-process``, ``spread-metrology`` and
``spread-score-dials`` run (index and integrate a shard, refine the detector of a dataset, score
both passes against the truth)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from xfel_spread.errors import OptionError


def run_stills_process(shard: str, shots: tuple[int, int], phils: Sequence[str], output_prefix: str,
                       progress_interval_s: float = 30.0, reference_geometry: str | None = None,
                       hits_table: str | None = None):
    """dials.stills_process on shots ``shots[0]..shots[1]-1`` of ``shard``; collective over the MPI world.

    The phil files and ``reference_geometry`` are checked first (PhilFileError, OptionError); with
    ``hits_table`` only the shots it marks as hits are processed. Returns the shot outcomes on rank 0
    and None on the others (:func:`xfel_spread.dials.stills.process_shard`)."""
    from xfel_spread.dials.phil import check_phil_file
    from xfel_spread.dials.stills import process_shard
    from xfel_spread.hitfind.tables import hit_images

    for phil in phils:
        check_phil_file(phil, "stills_process")
    if reference_geometry is not None and not os.path.isfile(reference_geometry):
        raise OptionError(f"--reference-geometry: {reference_geometry}: no such file")
    start, stop = shots
    hits = hit_images(hits_table, start, stop - start) if hits_table else None
    return process_shard(shard, tuple(shots), phils, output_prefix, progress_interval_s, reference_geometry, hits)


def run_metrology(settings: dict, dataset: str, phil: str, shard_prefixes: Sequence[str], outputs,
                  work_dir: str | os.PathLike, log_stream=sys.stdout) -> None:
    """Refine the detector of one dataset (``metrology`` settings) from its shards' indexed lattices, or
    apply the saved one, and write ``outputs`` (a :class:`~xfel_spread.dials.metrology.MetrologyOutputs`).

    The DIALS programs' output goes to ``log_stream``."""
    from xfel_spread.dials.metrology import plan_refinement, refine_detector, shard_lattices, write_metrology_outputs
    from xfel_spread.dials.phil import check_phil_file
    from xfel_spread.io.stills import output_paths

    plan = plan_refinement(settings["engine"], settings["max_lattices"])
    check_phil_file(phil, "refine")
    shards = []
    for prefix in shard_prefixes:
        paths = output_paths(prefix)
        shards.append(shard_lattices(paths["refined_experiments"], paths["indexed_reflections"], paths["shots"]))
    result = refine_detector(dataset, shards, phil, plan.engine, plan.max_lattices, Path(work_dir), log_stream,
                             settings["hierarchy_level"], settings["reference_geometry"], settings["min_lattices"])
    write_metrology_outputs(dataset, result, plan, outputs)


def score_dials(dataset: str, index_prefixes: Sequence[str], reindex_prefixes: Sequence[str],
                truths: Sequence[str], metrology_summary: str, table: str, text_path: str, image_shard: str,
                plot: str, echo: TextIO | None = None) -> str:
    """Score the index and reindex passes of one dataset against the truth; write the table, its text
    and the figure; return the text, also written to ``echo`` (before the figure is drawn) when given.
    OptionError unless every shard has one prefix of each and a truth."""
    from xfel_spread.atomic import atomic_output
    from xfel_spread.dials.metrology import MetrologyInputError
    from xfel_spread.dials.plots import plot_pipeline_outputs
    from xfel_spread.dials.scoring import format_score_table, score_pass, write_score_table

    if not len(index_prefixes) == len(reindex_prefixes) == len(truths):
        raise OptionError("--index-prefix, --reindex-prefix and --truth must be given once per shard")
    try:
        summary = json.loads(Path(metrology_summary).read_text())
    except json.JSONDecodeError as error:
        raise MetrologyInputError(f"{metrology_summary}: not a metrology summary (JSON: {error})") from None
    index_row, index_lattices = score_pass("index", index_prefixes, truths, summary, refined=False)
    reindex_row, reindex_lattices = score_pass("reindex", reindex_prefixes, truths, summary, refined=True)
    rows = [index_row, reindex_row]
    write_score_table(rows, table)
    text = format_score_table(dataset, rows)
    with atomic_output(text_path, "w") as stream:
        stream.write(text)
    if echo is not None:
        print(text, end="", file=echo, flush=True)
    plot_pipeline_outputs(plot, dataset, {"index": index_lattices, "reindex": reindex_lattices}, summary,
                          reindex_prefixes[0], image_shard, truths[0])
    return text
