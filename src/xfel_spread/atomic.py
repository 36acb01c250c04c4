"""Atomic file writing: a file appears under its final name complete, or not at all.

Output is written to a hidden temporary file in the destination directory (same file system, so the
final ``os.replace`` is atomic) and renamed into place only when writing finished without an
exception. A job killed half-way therefore never leaves a truncated file that a later run would take
for finished output, and a complete file that was already there stays untouched. A kill (SIGKILL, a
node lost) runs no clean-up, so its temporary stays behind; the next writer of the same file deletes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# The process umask, read once at import (reading it means setting it; do that before any threads
# exist). Temporary files are created 0600; the finished file gets the usual 0666 & ~umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (h5py, numpy, ...).

    The temporary file already exists (empty) so that its name is reserved; writers open it in
    truncating mode. On normal exit it is flushed to disk and renamed to ``path``; on an exception it
    is deleted and ``path`` is left as it was.
    """
    final_path = Path(path)
    _remove_stale_temporaries(final_path)
    descriptor, temporary_name = tempfile.mkstemp(
        prefix=f".{final_path.name}.", suffix=".partial", dir=final_path.parent
    )
    os.close(descriptor)
    temporary_path = Path(temporary_name)
    try:
        yield temporary_path
        _sync_to_disk(temporary_path)
        os.chmod(temporary_path, 0o666 & ~_UMASK)
        os.replace(temporary_path, final_path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Yield an open file object whose contents replace ``path`` atomically when the block succeeds.

    ``mode`` is a truncating write mode such as ``"wb"`` or ``"w"``; extra keyword arguments
    (``encoding``, ``newline``) go to :func:`open`.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_output needs a 'w' mode, got {mode!r}")
    with atomic_path(path) as temporary_path:
        with open(temporary_path, mode, **open_kwargs) as stream:
            yield stream


def _remove_stale_temporaries(final_path: Path) -> None:
    """Delete the temporaries that killed writers of ``final_path`` left (a production shard's is GBs).

    The pipeline never has two writers of one file at once (Snakemake runs one job per output), so any
    temporary of this name is stale. The match is exact: mkstemp's random part has no dot, so the
    temporaries of another name (``out.bin.gz``'s for ``out.bin``) never match.
    """
    stale = re.compile(re.escape(f".{final_path.name}.") + r"[a-z0-9_]+\.partial")
    with os.scandir(final_path.parent) as entries:
        for entry in entries:
            if stale.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


def _sync_to_disk(path: Path) -> None:
    """fsync ``path`` so that the rename cannot be persisted before the data after a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
