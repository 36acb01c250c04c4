"""Shared fixtures and helpers: where the repository and the project's reference-data mirror are, and
how the command-line tests run MPI jobs, and the job counts of a Snakemake dry run."""

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's shared, checksummed copies of the reference data; always present beside the repository.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
#: Images the pipeline did not simulate: nanoBragg's stills, and real LCLS stills (CSPAD, Rayonix MFX).
NANOBRAGG_DIR = SHARED_DATA_DIR / "external" / "nanobragg"
CSPAD_DIR = SHARED_DATA_DIR / "real" / "thermolysin_cspad"
RAYONIX_DIR = SHARED_DATA_DIR / "real" / "rayonix_mfx"


@pytest.fixture(autouse=True)
def mpi_stays_uninitialised(request):
    """Fail the test that initialises MPI in the pytest process (importing ``mpi4py.MPI`` does): every mpirun
    a later test starts would then exit 1 with no output. Run MPI entry points in a child process instead."""
    yield
    assert "mpi4py.MPI" not in sys.modules, f"{request.node.nodeid} initialised MPI in the pytest process"


def compiled_loop_or_skip():
    """The built per-term loop (sim.fused); skipped where it is switched off or the machine lacks the
    toolchain, a failure where the toolchain is there and the build fails."""
    from xfel_spread.sim import fused

    module = fused.pair_channel_sum_module()
    if module is None and fused.unavailable_reason() == f"{fused.SWITCH}=0":
        pytest.skip(f"the compiled loop is switched off ({fused.SWITCH}=0)")
    if module is None and fused.missing_toolchain():
        pytest.skip(f"this machine lacks {fused.missing_toolchain()} to build the compiled loop")
    assert module is not None, fused.unavailable_reason()
    return module


@pytest.fixture
def compiled_loop():
    return compiled_loop_or_skip()


@pytest.fixture(params=["compiled", "eager"])
def pair_channel_loop(request, monkeypatch):
    """Run a test with the sparse models' per-term loop compiled (:func:`compiled_loop_or_skip`) and in
    eager torch (``XFEL_SPREAD_FUSED=0``); the process's choice is restored after."""
    from xfel_spread.sim import fused

    if request.param == "compiled":
        compiled_loop_or_skip()
    else:
        monkeypatch.setenv(fused.SWITCH, "0")
        fused.reset()
        assert fused.pair_channel_sum_module() is None
    yield request.param
    monkeypatch.undo()
    fused.reset()


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def shared_data_dir() -> Path:
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory):
    """A working directory in which tests/pipeline_run.py's small config ran to completion, made once
    per session for the tests that inspect or extend it (test_pipeline, test_report); returns
    (workdir, configfile)."""
    from pipeline_run import completed_pipeline_run

    return completed_pipeline_run(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def amplitude_table():
    """The LY99 per-channel amplitude table (tests/sim_fixtures.py's ly99_amplitudes, computed once per
    process); tests must not modify its arrays."""
    from sim_fixtures import ly99_amplitudes

    return ly99_amplitudes()


def mpirun_command(command, ranks: int) -> list:
    """``command`` under ``mpirun -n ranks`` (allowed as root, and with more ranks than cores)."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), *command]


def run_job(command, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; fail the test (killing the group) if it outlives ``timeout`` s.

    A hung MPI job is killed whole, ranks included, not only its mpirun.
    """
    command = [str(part) for part in command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{Path(command[0]).name} ... still running after {timeout} s (killed):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def job_stats(output: str) -> Counter:
    """{rule: count} from the first "Job stats" table of a dry run (empty when nothing is to be done)."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        assert "Nothing to be done" in output, output
        return Counter()
    counts = Counter()
    for line in lines[lines.index("Job stats:") + 3:]:  # skip the header and the dashes
        rule, count = line.split()
        if rule == "total":
            assert int(count) == sum(counts.values()), output
            return counts
        counts[rule] = int(count)
    raise AssertionError(f"no total line in the job stats table:\n{output}")
