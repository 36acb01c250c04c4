"""MPI plumbing of the merge: exchanging observations by index owner, gathers in rank order, errors.

Indices are owned by ranks in contiguous key ranges (:func:`owner_splits`), so the owners' results,
concatenated in rank order, are already in key order: rank 0 gathers them in a canonical order that
does not depend on the number of ranks. Numeric columns travel as raw bytes (``Alltoallv`` and
``Gatherv``), not pickles.

Errors are agreed on or abort the job through :mod:`xfel_spread.mpi` (``first_error``,
``abort_on_unexpected_error``); ``SerialComm`` runs the merge in one process without MPI.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np



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
