"""What every command of the package shares: its logging set-up and the way it reports errors.

``run_command(program, action)`` runs the command's one call; a :class:`~xfel_spread.errors.UserInputError`
(or an ``OSError`` naming a user's path, :data:`~xfel_spread.errors.USER_PATH_ERRORS`) is printed as one
line ``program: error: message`` with exit status 1; any other exception is a bug and propagates with
its traceback (Python exits with status 1 and prints it). The ``add_*`` functions give the options
that the pixel-level commands (stage 1, pixel metrology, spread) share the same spelling and help.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from xfel_spread.errors import USER_ERRORS, error_line


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr as ``time LEVEL message`` at ``level``, on the root logger and on its handlers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # The level goes on the handler too: a program that lowers the root logger's level later (DIALS
    # does) must not make this handler repeat what it logs to its own files.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)


def run_command(program: str, action: Callable[[], object], log_level: int = logging.INFO) -> int:
    """Run ``action`` after setting up logging; 0 when it returns, 1 (and one error line) on a user error."""
    configure_logging(log_level)
    try:
        action()
    except USER_ERRORS as error:
        print(error_line(program, error), file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def rank_zero_reports(comm) -> Iterator[None]:
    """Inside an MPI command's action: a user error every rank raised (an agreed one) is reported by rank 0.

    The other ranks leave quietly with exit status 1, so the job's log holds the error line once."""
    try:
        yield
    except USER_ERRORS:
        if comm.Get_rank() != 0:
            sys.exit(1)
        raise


def add_threads_and_psf(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (torch CPU threads per rank) and the detector point spread ``--psf-fwhm-mm``/``--psf-radius-px``."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default 1)")
    parser.add_argument("--psf-fwhm-mm", type=float,
                        help="model the detector's fiber point spread of this FWHM (mm); with --psf-radius-px")
    parser.add_argument("--psf-radius-px", type=int, help="radius of the point-spread kernel (pixels)")


def add_structure_factor_source(parser: argparse.ArgumentParser) -> None:
    """Where stage 1's |F| comes from: ``--mtz`` (merged intensities) or ``--amplitudes`` (the model's table)."""
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--mtz", help="merged intensities (MTZ; stage1.structure_factors: merged)")
    sources.add_argument("--amplitudes", help="per-channel amplitude table (HDF5; stage1.structure_factors: model)")


def add_dataset_shards(parser: argparse.ArgumentParser) -> None:
    """A dataset's shards for a stage after stage 1: ``--annulus-prefix``, ``--shard`` and
    ``--stage1-prefix``, each repeated once per shard in the same order."""
    parser.add_argument("--annulus-prefix", action="append", required=True,
                        help="annulus prefix A of one shard (A_annulus.expt/.refl); repeat per shard, in order")
    parser.add_argument("--shard", action="append", required=True,
                        help="the same shard's images (HDF5 shard or image list); repeat, same order")
    parser.add_argument("--stage1-prefix", action="append", required=True,
                        help="the same shard's pixel-refinement prefix P (P_refined.expt, P_shots.tsv); repeat")
