"""MPI plumbing of the merge: exchanging observations by index owner, gathers in rank order, errors.

Indices are owned by ranks in contiguous key ranges (:func:`owner_splits`), so the owners' results,
concatenated in rank order, are already in key order: rank 0 gathers them in a canonical order that
does not depend on the number of ranks. Numeric columns travel as raw bytes (``Alltoallv`` and
``Gatherv``), not pickles.

Errors: an input error found by one rank (an unreadable shard) is agreed on by all ranks with
:func:`first_error`, so every rank raises the same error and none waits for the others forever; any
other exception on one rank aborts the whole job (:func:`abort_on_unexpected_error`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from xfel_spread.errors import UserInputError
from xfel_spread.mpi import abort_on_error


class SerialComm:
    """A one-rank stand-in for an mpi4py communicator: the merge in one process without MPI.

    Initialising MPI in a process leaves variables in its environment that make any ``mpirun`` it
    starts later fail, so library users (and the tests) that run other MPI jobs use this instead.
    """

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def bcast(self, value, root: int = 0):
        return value

    def allreduce(self, value):
        return value

    def gather(self, value, root: int = 0):
        return [value]

    def allgather(self, value):
        return [value]


def owner_splits(reference_keys: np.ndarray, n_ranks: int) -> np.ndarray:
    """Keys at which ownership passes to the next rank: equal shares of the (sorted) reference keys."""
    n = len(reference_keys)
    return np.array([reference_keys[n * rank // n_ranks] for rank in range(1, n_ranks)], dtype=np.int64)


def owners(keys: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Rank owning each key."""
    return np.searchsorted(splits, keys, side="right")


def exchange(comm, columns: Mapping[str, np.ndarray], destination: np.ndarray) -> dict[str, np.ndarray]:
    """Send row i of every column to rank ``destination[i]``; return the rows received, by source rank.

    Rows keep their relative order within each source rank.
    """
    if comm.Get_size() == 1:
        return dict(columns)
    from mpi4py import MPI

    size = comm.Get_size()
    order = np.argsort(destination, kind="stable")
    send_counts = np.bincount(destination, minlength=size).astype(np.int64)
    receive_counts = np.empty(size, np.int64)
    comm.Alltoall(send_counts, receive_counts)
    received = {}
    for name, column in columns.items():
        column = np.ascontiguousarray(column[order])
        row_bytes = column.itemsize * int(np.prod(column.shape[1:], dtype=np.int64))
        incoming = np.empty((int(receive_counts.sum()),) + column.shape[1:], dtype=column.dtype)
        send_sizes, receive_sizes = send_counts * row_bytes, receive_counts * row_bytes
        comm.Alltoallv([column.view(np.uint8).reshape(-1), (_int32(send_sizes), _int32(_offsets(send_sizes))),
                        MPI.BYTE],
                       [incoming.view(np.uint8).reshape(-1), (_int32(receive_sizes), _int32(_offsets(receive_sizes))),
                        MPI.BYTE])
        received[name] = incoming
    return received


def gather(comm, columns: Mapping[str, np.ndarray], root: int = 0) -> dict[str, np.ndarray] | None:
    """Every rank's rows concatenated in rank order, on ``root`` (None elsewhere)."""
    if comm.Get_size() == 1:
        return dict(columns)
    from mpi4py import MPI

    rank = comm.Get_rank()
    counts = np.array(comm.allgather(len(next(iter(columns.values())))), dtype=np.int64)
    gathered = {}
    for name, column in columns.items():
        column = np.ascontiguousarray(column)
        row_bytes = column.itemsize * int(np.prod(column.shape[1:], dtype=np.int64))
        if rank == root:
            incoming = np.empty((int(counts.sum()),) + column.shape[1:], dtype=column.dtype)
            sizes = counts * row_bytes
            comm.Gatherv([column.view(np.uint8).reshape(-1), MPI.BYTE],
                         [incoming.view(np.uint8).reshape(-1), (_int32(sizes), _int32(_offsets(sizes))), MPI.BYTE],
                         root=root)
            gathered[name] = incoming
        else:
            comm.Gatherv([column.view(np.uint8).reshape(-1), MPI.BYTE], None, root=root)
    return gathered if rank == root else None


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _int32(values: np.ndarray) -> np.ndarray:
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise OverflowError("an MPI message would exceed 2 GiB; run with more ranks")
    return values.astype(np.int32)


class AgreedError(UserInputError, ValueError):
    """An input error one rank found, raised by every rank after they agreed on it."""


def first_error(comm, error: Exception | None) -> None:
    """Collective: raise AgreedError with the first error in rank order, if any rank had one."""
    messages = comm.allgather(None if error is None else str(error))
    for message in messages:
        if message is not None:
            raise AgreedError(message)


def abort_on_unexpected_error(comm):
    """Abort the MPI job on an exception other than an agreed one (which every rank raises)."""
    return abort_on_error(comm, passthrough=(AgreedError,))
