"""Run ``dials.stills_process`` on one shard under MPI and gather its output into one set of files.

Every rank runs DIALS's own stills_process on its share of the shard's shots (``mp.method=mpi``, with
``mp.composite_stride`` equal to the number of ranks, so rank 0 receives everything). DIALS writes into
a private work directory; rank 0 then writes the shard's five outputs, each atomically:

``{prefix}_integrated.expt`` / ``_integrated.refl``
    integrated lattices and their reflections (the input of merging);
``{prefix}_refined.expt`` / ``_indexed.refl``
    indexed, refined lattices and their indexed spots (the input of detector metrology);
``{prefix}_shots.tsv``
    one row per shot: its outcome, spot and reflection counts and, for a failed shot, DIALS's reason.

A shot that DIALS cannot read, index or integrate is recorded in the table and does not stop the
shard; a shard whose file cannot be opened at all gives empty outputs with every shot marked
``unreadable_shard``, so one bad file does not stop the pipeline either.

Given the images that are hits (the hitfind stage), stills_process sees only those (its
``input.image_tag``); the others are recorded as ``not_a_hit``, and a shard without hits gives empty
outputs without running DIALS.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xfel_spread.atomic import atomic_path
from xfel_spread.dials.compat import install_mono_sim_stand_in
from xfel_spread.io.stills import output_paths, write_shots_table
from xfel_spread.mpi import abort_on_error, wait_for_all
from xfel_spread.progress import progress_line

#: stills_process's composite output of rank 0 (``idx-`` + composite tag ``0000``), by our output name.
_COMPOSITE_FILES = {
    "integrated_experiments": "idx-0000_integrated.expt",
    "integrated_reflections": "idx-0000_integrated.refl",
    "refined_experiments": "idx-0000_refined.expt",
    "indexed_reflections": "idx-0000_indexed.refl",
}
#: Shot outcomes: the last word DIALS's debug log gives a shot, without its trailing count. That count
#: is the integrated reflections for a success, the indexed ones when refinement or integration
#: failed, and the strong spots when spot finding or indexing did.
INTEGRATED = "integrate_ok"
_COUNTS_INDEXED = ("refine_failed", "integrate_failed")
NOT_PROCESSED = "not_processed"
UNREADABLE_SHARD = "unreadable_shard"
#: A shot of an image-list shard whose file dxtbx could not read (recorded when the list was made).
UNREADABLE_IMAGE = "unreadable_image"
NOT_A_HIT = "not_a_hit"

# stills_process prints one line per failed shot: "<what failed> <tag> <reason>", where the reason may
# continue over further lines (up to a blank one).
_FAILURE_LINE = re.compile(
    r"^(?:Couldn't index|Error spotfinding|Error in pre-process|Error refining|Error integrating"
    r"|Not enough spots to index|Too many spots to index - Possibly junk) (?P<tag>\S+) ?(?P<reason>.*)$"
)
_LAST_NUMBER = re.compile(r"^(?P<status>.*?)(?:_(?P<count>\d+))?$")


@dataclass
class ShotOutcome:
    """What stills_process made of one shot."""

    shot: int
    image: int
    status: str = NOT_PROCESSED
    n_spots: int | None = None
    n_indexed: int | None = None
    n_integrated: int | None = None
    reason: str = ""

    def as_row(self) -> list:
        return [self.shot, self.image, self.status, _blank_if_none(self.n_spots), _blank_if_none(self.n_indexed),
                _blank_if_none(self.n_integrated), self.reason]


def _blank_if_none(value) -> str:
    return "" if value is None else str(value)


def image_tag(shard_path: str | os.PathLike, image: int) -> str:
    """stills_process's tag for image ``image`` of a multi-image file: ``<file stem>_<image:05d>``."""
    return f"{Path(shard_path).stem}_{image:05d}"


def parse_debug_logs(debug_lines: Iterable[str]) -> dict[str, tuple[str, int | None]]:
    """Last outcome per image tag from stills_process's ``debug/debug_<rank>.txt`` lines.

    Lines read ``host,tag,timestamp,state,event``; the last event of a tag whose state is done, stop or
    fail is its outcome, e.g. ``integrate_ok_70`` -> ("integrate_ok", 70),
    ``indexing_failed_439`` -> ("indexing_failed", 439).
    """
    outcomes = {}
    for line in debug_lines:
        fields = line.rstrip("\n").split(",")
        if len(fields) != 5 or fields[3].strip() not in ("done", "stop", "fail"):
            continue
        match = _LAST_NUMBER.match(fields[4])
        count = match.group("count")
        outcomes[fields[1]] = (match.group("status"), None if count is None else int(count))
    return outcomes


def parse_failure_reasons(stdout_lines: Sequence[str]) -> dict[str, str]:
    """Reason DIALS printed for each failed image tag, from a rank's redirected stdout."""
    reasons = {}
    for number, line in enumerate(stdout_lines):
        match = _FAILURE_LINE.match(line.rstrip("\n"))
        if not match:
            continue
        words = [match.group("reason")]
        for continuation in stdout_lines[number + 1:]:
            if not continuation.strip() or continuation.startswith("*") or _FAILURE_LINE.match(continuation):
                break
            words.append(continuation)
        reasons[match.group("tag")] = " ".join(" ".join(words).split())
    return reasons


def shot_outcomes(shard_path, first_shot: int, n_images: int, work_dir: Path) -> list[ShotOutcome]:
    """One :class:`ShotOutcome` per image of the shard, from the debug and stdout logs in ``work_dir``."""
    debug_lines, stdout_lines = [], []
    for debug_file in sorted((work_dir / "debug").glob("debug_*.txt")):
        debug_lines += debug_file.read_text().splitlines()
    for stdout_file in sorted(work_dir.glob("log_rank*.out")):
        stdout_lines += stdout_file.read_text().splitlines()
    outcomes, reasons = parse_debug_logs(debug_lines), parse_failure_reasons(stdout_lines)

    shots = []
    for image in range(n_images):
        # stills_process tags the image of a one-image file by the file's bare name.
        tag = image_tag(shard_path, image) if n_images > 1 else Path(shard_path).stem
        shot = ShotOutcome(shot=first_shot + image, image=image)
        if tag in outcomes:
            shot.status, count = outcomes[tag]
            if shot.status == INTEGRATED:
                shot.n_integrated = count
            elif shot.status in _COUNTS_INDEXED:
                shot.n_indexed = count
            else:
                shot.n_spots = count
            if shot.status != INTEGRATED:
                shot.reason = reasons.get(tag, "")
        shots.append(shot)
    return shots


def stills_process_arguments(shard_path, phil_paths: Sequence, work_dir: Path, n_ranks: int,
                             reference_geometry=None, only_images: Sequence[int] | None = None) -> list[str]:
    """Command-line arguments of stills_process for one shard (phil files, then the pipeline's own).

    ``reference_geometry``, an experiment list holding one detector, replaces the images' detector:
    stills_process copies its hierarchy's frames onto each image's detector (sync_reference_geom).
    ``only_images``: process just these images (by their tags); None processes every image.
    """
    geometry = [] if reference_geometry is None else [f"input.reference_geometry={os.path.abspath(reference_geometry)}"]
    return [
        os.path.abspath(shard_path),
        *map(str, phil_paths),
        *geometry,
        "mp.method=mpi",
        f"mp.composite_stride={n_ranks}",
        f"output.output_dir={work_dir}",
        f"output.logging_dir={work_dir}",
        # cctbx.xfel-style integration pickles duplicate the .refl output.
        "output.integration_pickle=None",
        *(f"input.image_tag={image_tag(shard_path, image)}" for image in only_images or ()),
    ]


@dataclass
class ProgressReporter:
    """Print shots done, rate and time left every ``interval_s`` seconds, from the debug logs."""

    debug_dir: Path
    n_shots: int
    stream: object
    interval_s: float = 30.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def count(self) -> tuple[int, int]:
        """(shots finished, shots integrated) so far."""
        lines = []
        for debug_file in self.debug_dir.glob("debug_*.txt"):
            with contextlib.suppress(OSError):
                lines += debug_file.read_text().splitlines()
        outcomes = parse_debug_logs(lines)
        return len(outcomes), sum(status == INTEGRATED for status, _ in outcomes.values())

    def report(self, start: float) -> None:
        """Print one progress line: shots finished (and integrated) since ``start``, rate and time left."""
        done, integrated = self.count()
        print(progress_line("stills_process", done, self.n_shots, time.monotonic() - start, "shots",
                            f" ({integrated} integrated)"), file=self.stream, flush=True)

    def _loop(self, start: float) -> None:
        while not self._stop.wait(self.interval_s):
            self.report(start)

    @contextlib.contextmanager
    def running(self):
        start = time.monotonic()
        thread = threading.Thread(target=self._loop, args=(start,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self.report(start)


@contextlib.contextmanager
def _restored_standard_streams():
    """stills_process points sys.stdout/stderr at per-rank files and leaves them there; undo that."""
    stdout, stderr = sys.stdout, sys.stderr
    try:
        yield
    finally:
        for redirected, original in ((sys.stdout, stdout), (sys.stderr, stderr)):
            if redirected is not original:
                redirected.close()
        sys.stdout, sys.stderr = stdout, stderr


def _mpi_world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _write_empty(name: str, path: Path) -> None:
    """An empty experiment list or reflection table, as DIALS writes one, at ``path``."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    if name.endswith("experiments"):
        # ExperimentList.as_file insists on an .expt name, which the temporary file does not have.
        path.write_text(ExperimentList().as_json())
    else:
        flex.reflection_table().as_file(str(path))


def _write_dials_outputs(work_dir: Path, paths: dict[str, Path]) -> None:
    """Move stills_process's composite files to their final names, writing empty ones it did not make."""
    for name, composite_name in _COMPOSITE_FILES.items():
        composite = work_dir / composite_name
        with atomic_path(paths[name]) as temporary:
            if composite.exists():
                shutil.copyfile(composite, temporary)
            else:
                _write_empty(name, temporary)


def _append_rank_logs(work_dir: Path, stream) -> None:
    """Copy DIALS's per-rank logs into the job's log, so one file tells the whole story."""
    for pattern in ("info_rank*.out", "error_rank*.out"):
        for rank_log in sorted(work_dir.glob(pattern)):
            text = rank_log.read_text()
            if text.strip():
                print(f"----- {rank_log.name} -----\n{text}", file=stream, flush=True)


def process_shard(shard_path, shots: tuple[int, int], phil_paths: Sequence, prefix,
                  progress_interval_s: float = 30.0, reference_geometry=None,
                  hit_images: Sequence[int] | None = None) -> list[ShotOutcome] | None:
    """Run stills_process on every shot of ``shard_path`` (shots ``shots[0]`` to ``shots[1] - 1``),
    with the detector of ``reference_geometry`` (see :func:`stills_process_arguments`) when given.

    ``hit_images``: when given, only these images (positions in the shard) are processed; the others
    are recorded as ``not_a_hit``. Collective over the MPI world. Returns the shot outcomes on rank 0
    (which writes the outputs) and None on the other ranks.
    """
    from xfel_spread.io.images import ImageInputError, is_image_list_shard, read_image_list_shard
    from xfel_spread.io.shard import ShardFormatError, read_shard_metadata

    comm = _mpi_world()
    rank, size = comm.Get_rank(), comm.Get_size()
    paths = output_paths(prefix)
    work_dir = Path(f"{prefix}.work")
    log_stream = sys.stderr

    first_shot, n_images = shots[0], shots[1] - shots[0]

    unreadable, unreadable_images = None, {}
    if rank == 0:
        try:
            if is_image_list_shard(shard_path):
                listing = read_image_list_shard(shard_path)
                n_in_file = listing.n_shots
                unreadable_images = {image: reason for image, reason in enumerate(listing.unreadable) if reason}
            else:
                n_in_file = read_shard_metadata(shard_path).n_shots
            if n_in_file != n_images:
                unreadable = f"{shard_path}: holds {n_in_file} shots, the pipeline expects {n_images}"
        except (ShardFormatError, ImageInputError) as error:
            unreadable = str(error)
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
    unreadable, unreadable_images = comm.bcast((unreadable, unreadable_images), root=0)

    if unreadable is not None:
        if rank != 0:
            return None
        print(f"warning: {unreadable}; its shots are recorded as {UNREADABLE_SHARD}", file=log_stream, flush=True)
        outcomes = [ShotOutcome(first_shot + image, image, UNREADABLE_SHARD, reason=unreadable)
                    for image in range(n_images)]
        return _finish(outcomes, paths, work_dir)

    selected = sorted(set(hit_images)) if hit_images is not None else list(range(n_images))
    selected = [image for image in selected if image not in unreadable_images]

    def excluded(image: int) -> ShotOutcome:
        if image in unreadable_images:
            return ShotOutcome(first_shot + image, image, UNREADABLE_IMAGE, reason=unreadable_images[image])
        return ShotOutcome(first_shot + image, image, NOT_A_HIT)

    if not selected:
        if rank != 0:
            return None
        what = "no readable hits" if unreadable_images else "no hits"
        print(f"{shard_path}: {what}; stills_process not run", file=log_stream, flush=True)
        return _finish([excluded(image) for image in range(n_images)], paths, work_dir)

    install_mono_sim_stand_in()
    from dials.command_line.stills_process import Script

    # stills_process tags an image of a one-image file by the file name alone, so an image filter only
    # works (and is only needed) when the shard holds several images and some are left out.
    only_images = selected if len(selected) < n_images else None
    arguments = stills_process_arguments(shard_path, phil_paths, work_dir.resolve(), size, reference_geometry,
                                         only_images)
    reporter = ProgressReporter(work_dir / "debug", len(selected), log_stream, progress_interval_s)
    progress = reporter.running() if rank == 0 else contextlib.nullcontext()
    with abort_on_error(comm), progress, _restored_standard_streams():
        Script().run(arguments)
    wait_for_all(comm)  # shots take unequal times: the ranks done first sleep, not spin
    if rank != 0:
        return None

    _append_rank_logs(work_dir, log_stream)
    outcomes = shot_outcomes(shard_path, first_shot, n_images, work_dir)
    outcomes = [outcome if outcome.image in selected else excluded(outcome.image) for outcome in outcomes]
    return _finish(outcomes, paths, work_dir)


def _finish(outcomes: list[ShotOutcome], paths, work_dir: Path) -> list[ShotOutcome]:
    """Write the shard's outputs (the shots table last: its presence marks a finished shard)."""
    _write_dials_outputs(work_dir, paths)
    write_shots_table(outcomes, paths["shots"])
    shutil.rmtree(work_dir)
    return outcomes
