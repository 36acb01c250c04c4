"""MPI helpers shared by the MPI stages (stills_process shards, merging, pixel refinement)."""

from __future__ import annotations

import contextlib
import sys
import traceback


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
