"""Resuming after a kill: a Snakemake run killed in the middle of a shard (SIGKILL to its whole
process group, so nothing cleans up, as when a node is lost) leaves no output that looks complete, and
the rerun writes files identical, byte for byte, to those of a run that was never interrupted.

The job killed is the simulation of one shard of 4 shots of the tiny config (about 13 s on 2 busy
cores), killed once its log shows the first shot done.
"""

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_job
from tiny_config import tiny_config, write_config

#: Slow tier (make test-fast leaves it out): a shard's simulation killed midway, rerun, and run again uninterrupted.
pytestmark = pytest.mark.slow

SHOTS = 4
OUTPUTS = ("sim/nopsf/shard_00000.h5", "sim/psf/shard_00000.h5", "sim/truth/shard_00000.json")


def snakemake_command(workdir: Path, *arguments) -> list:
    """Snakemake on the repository's Snakefile in ``workdir``, local profile, config ``workdir/tiny.yaml``,
    asked for the outputs of the simulation of shard 0."""
    targets = [str(workdir / "results" / output) for output in OUTPUTS]
    return [sys.executable, "-m", "snakemake", "--snakefile", REPO_ROOT / "Snakefile", "--directory", workdir,
            "--profile", REPO_ROOT / "profiles" / "local", "--cores", "2", *arguments,
            f"--configfile={workdir / 'tiny.yaml'}", "--", *targets]


def prepared(workdir: Path) -> Path:
    workdir.mkdir()
    write_config(workdir / "tiny.yaml", tiny_config(workdir, n_shots=SHOTS, shots_per_shard=SHOTS))
    return workdir


def output_of(result) -> str:
    return result.stdout + result.stderr


def succeeded(result) -> str:
    assert result.returncode == 0, output_of(result)[-5000:]
    return output_of(result)


def kill_when_a_shot_is_done(workdir: Path, timeout: float = 300) -> None:
    """Start the run, and SIGKILL its process group once the shard's log reports its first shot."""
    process = subprocess.Popen([str(part) for part in snakemake_command(workdir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    log = workdir / "logs" / "simulate" / "shard_00000.log"
    deadline = time.monotonic() + timeout
    try:
        while not (log.is_file() and f"1/{SHOTS} shots" in log.read_text()):
            assert process.poll() is None, f"the run ended (status {process.returncode}) before its first shot"
            assert time.monotonic() < deadline, f"no shot done after {timeout} s"
            time.sleep(0.2)
        assert f"{SHOTS}/{SHOTS} shots" not in log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # The job's processes were in the group too: none is left to finish the shard behind our back.
    assert not processes_mentioning(workdir)


def processes_mentioning(path: Path) -> list[str]:
    """Command lines of running processes that name ``path``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if any(os.fsencode(path) in argument for argument in arguments):
            found.append(b" ".join(arguments).decode(errors="replace"))
    return found


def incomplete_markers(workdir: Path) -> set[str]:
    """The outputs Snakemake has marked incomplete (it marks a job's outputs when the job starts and
    unmarks them when it finishes)."""
    return {base64.urlsafe_b64decode(path.name).decode() for path in (workdir / ".snakemake" / "incomplete").iterdir()}


def test_a_shard_killed_midway_reruns_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    uninterrupted = prepared(tmp_path / "uninterrupted")
    succeeded(run_job(snakemake_command(uninterrupted), timeout=600))

    killed = prepared(tmp_path / "killed")
    kill_when_a_shot_is_done(killed)
    results = killed / "results"
    # Nothing under a final name: the writers were still on their hidden temporaries.
    assert not [output for output in OUTPUTS if (results / output).exists()]
    leftovers = sorted(path.relative_to(results).as_posix() for path in (results / "sim").rglob("*") if path.is_file())
    assert [Path(name).parent.as_posix() for name in leftovers] == ["sim/nopsf", "sim/psf"], leftovers
    assert all(Path(name).name.startswith(".shard_00000.h5.") and name.endswith(".partial") for name in leftovers)
    assert incomplete_markers(killed) == {str(results / output) for output in OUTPUTS}

    # The killed Snakemake could not release its lock: a plain rerun stops and says what to do.
    locked = run_job(snakemake_command(killed), timeout=300)
    assert locked.returncode != 0 and "LockException" in output_of(locked) and "--unlock" in output_of(locked)
    succeeded(run_job(snakemake_command(killed, "--unlock"), timeout=300))

    # Had a writer left a file under a final name (not through a temporary), the incomplete marker
    # keeps Snakemake from taking it for finished output.
    truncated = results / "sim" / "truth" / "shard_00000.json"
    truncated.write_text('{"seed": ')
    refused = run_job(snakemake_command(killed), timeout=300)
    assert refused.returncode != 0, output_of(refused)
    assert "IncompleteFilesException" in output_of(refused) and "--rerun-incomplete" in output_of(refused)
    assert str(truncated) in output_of(refused)
    assert truncated.read_text() == '{"seed": '

    succeeded(run_job(snakemake_command(killed, "--rerun-incomplete"), timeout=600))
    for output in OUTPUTS:
        assert (results / output).read_bytes() == (uninterrupted / "results" / output).read_bytes(), output
    # The rerun's writers removed the killed job's temporaries, and nothing is left to do.
    assert not list(results.rglob("*.partial"))
    assert incomplete_markers(killed) == set()
    assert "Nothing to be done" in succeeded(run_job(snakemake_command(killed, "--dry-run"), timeout=300))
