"""MPI helpers shared by the MPI stages (stills_process shards, merging, pixel refinement, SPREAD).

Errors: an input error found by one rank (an unreadable shard) is agreed on by all ranks with
:func:`first_error`, so every rank raises the same error and none waits for the others forever; any
other exception on one rank aborts the whole job (:func:`abort_on_error`,
:func:`abort_on_unexpected_error`). :class:`SerialComm` stands in for a communicator in one process.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

from xfel_spread.errors import UserInputError


@contextlib.contextmanager
def abort_on_error(comm, passthrough: tuple[type[BaseException], ...] = ()):
    """Abort the whole MPI job when this rank raises anything but ``passthrough``.

    A rank that dies alone leaves the others waiting for it forever (srun does not kill them by
    default), so the error is printed and ``comm.Abort`` ends every rank. ``passthrough`` errors are
    those every rank raises together (agreed input errors), which end the job normally. On one rank
    the exception simply propagates.
    """
    try:
        yield
    except passthrough:
        raise
    except BaseException:
        if comm.Get_size() == 1:
            raise
        traceback.print_exc(file=sys.__stderr__)
        sys.__stderr__.flush()
        comm.Abort(1)


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


def wait_for_all(comm, poll_s: float = 0.05) -> None:
    """Collective: return once every rank has called it, sleeping (not spinning) while waiting.

    Open MPI's blocking collectives poll at full speed, so a rank that finished its lattices first
    burns a core until the slowest rank arrives; where ranks share cores with other jobs (the local
    profile runs jobs side by side) that core is taken from them. Call this before the collective
    that follows uneven work; ``poll_s`` bounds the delay it adds.
    """
    if comm.Get_size() == 1:
        return
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


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
