"""xfel_spread.mpi's waiting collective, under a real mpirun (two ranks)."""

import sys

from conftest import mpirun_command, run_job

#: Rank 0 works for WAIT_S seconds, then both call wait_for_all; rank 1 reports when it came back (from
#: rank 0's start) and the CPU time it used while it waited.
PROGRAM = """
import time
from mpi4py import MPI
from xfel_spread.mpi import SerialComm, wait_for_all

WAIT_S = 1.5
comm = MPI.COMM_WORLD
wait_for_all(SerialComm())  # one rank: returns at once
start_wall, start_cpu = time.perf_counter(), time.process_time()
if comm.rank == 0:
    time.sleep(WAIT_S)
wait_for_all(comm, poll_s=0.01)
end_wall, waited_cpu = time.perf_counter(), time.process_time() - start_cpu
# From rank 0's start (perf_counter is the machine's monotonic clock, the same in both ranks): each rank
# starting its own clock would let rank 1, started a moment later, see less than WAIT_S.
waited_wall = end_wall - comm.bcast(start_wall, root=0)
if comm.rank == 1:
    print(f"waited {waited_wall:.3f} s wall, {waited_cpu:.3f} s cpu", flush=True)
"""


def test_a_rank_waiting_for_a_slower_one_returns_after_it_and_sleeps_meanwhile(tmp_path):
    """Rank 1 comes back only once rank 0 has arrived, and used a small part of a core while it waited
    (a blocking MPI barrier polls: it would use the whole wait)."""
    script = tmp_path / "wait.py"
    script.write_text(PROGRAM)
    result = run_job(mpirun_command([sys.executable, str(script)], 2), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("waited"))
    wall, cpu = float(line.split()[1]), float(line.split()[4])
    assert wall >= 1.5
    assert cpu < 0.25 * wall, line
