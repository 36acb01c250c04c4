"""The Slurm profile on a real Slurm: a single-node cluster on this machine runs part of the pipeline.

``scripts/slurm/single_node.sh up`` starts munged, slurmctld and slurmd (Debian's Slurm 22.05); then
``snakemake --profile profiles/slurm`` submits every job with sbatch and follows it with squeue, up to
the index stage of one shard: dials.stills_process as an MPI job of 2 ranks launched by the profile's
``srun --mpi=pmix``. The daemons are stopped whatever happens. Needs root and the Slurm packages
(scripts/setup.sh installs them); skipped otherwise. The checks of what the plugin makes of the
profile's resources run its own code and need no cluster.

The profile's site and machine values (account, partition, GPUs, 32 ranks, tens of GB) do not fit a
2-core machine without GPUs, so the run overrides them on the command line, keeping the rest of the
profile (executor, status command, MPI launcher, resource keys) as it is.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_job
from tiny_config import SHOTS_PER_SHARD, indexable_config, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO_ROOT / "Snakefile"
SLURM_PROFILE = REPO_ROOT / "profiles" / "slurm"
SINGLE_NODE = REPO_ROOT / "scripts" / "slurm" / "single_node.sh"
#: The partition single_node.sh defines.
PARTITION = "debug"
#: MPI ranks per MPI job here: all the cores of a 2-core machine.
RANKS = 2
DATASETS = ("nopsf", "psf")


def why_no_slurm_here() -> str | None:
    """Why this machine cannot run a single-node Slurm, or None when it can."""
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        return "Slurm is not installed (scripts/setup.sh installs slurmctld, slurmd, munge)"
    if os.geteuid() != 0:
        return "starting munged, slurmctld and slurmd needs root"
    return None


requires_slurm = pytest.mark.skipif(why_no_slurm_here() is not None, reason=str(why_no_slurm_here()))


def profile_resources() -> dict:
    """The per-rule resources of profiles/slurm, as written there."""
    return yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())["set-resources"]


class PluginJob:
    """What the Slurm plugin reads of a Snakemake job to build its sbatch call: threads and resources
    (read with .get and as attributes)."""

    class Resources(dict):
        __getattr__ = dict.__getitem__

    def __init__(self, resources: dict):
        self.threads = 1
        self.resources = self.Resources(resources)


def sbatch_options(resources: dict) -> str:
    """The options the Slurm plugin gives sbatch for a job with `resources` (its own code, no cluster)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = PluginJob(resources)
    params = {"run_uuid": "run", "slurm_logfile": "job.log", "comment_str": "rule", "account": "-A account",
              "partition": "-p partition", "workdir": None}
    return get_submit_command(job, params) + set_gres_string(job)


def test_the_plugin_turns_the_profiles_ranks_and_gpus_into_sbatch_options():
    resources = profile_resources()
    mpi_rules = sorted(rule for rule, values in resources.items() if "mpi" in values)
    assert mpi_rules == ["exa", "index", "merge", "reindex", "stage1"]
    for rule in mpi_rules:
        values = resources[rule]
        assert values["mpi"] == "srun --mpi=pmix"
        options = sbatch_options(values).split()
        assert f"--ntasks={values['tasks']}" in options, (rule, options)
        assert f"--cpus-per-task={values['cpus_per_task']}" in options
        assert options[options.index("--mem-per-cpu") + 1] == str(values["mem_mb_per_cpu"])
        assert options[options.index("-t") + 1] == str(values["runtime"])
    for rule in ("stage1", "exa"):
        options = sbatch_options(resources[rule]).split()
        assert {f"--gpus={resources[rule]['gpu']}", "--ntasks-per-gpu=1"} <= set(options), (rule, options)
    assert "--gpus=1" in sbatch_options(resources["simulate"]).split()
    assert "--ntasks=1" in sbatch_options(resources["metrology"]).split()


def test_the_plugin_refuses_an_mpi_job_of_one_task():
    """Why exa runs 2 ranks in the profile."""
    from snakemake_interface_common.exceptions import WorkflowError

    with pytest.raises(WorkflowError, match="'tasks' must be greater than 1"):
        sbatch_options({"mpi": "srun --mpi=pmix", "tasks": 1, "gpu": 1, "tasks_per_gpu": 1})


def fit_to_this_machine(rule_resources: dict) -> dict:
    """One rule's profile resources, fitted to a 2-core machine without GPUs: MPI rules keep their
    launcher with 2 single-core ranks, no GPU keys, 2 GB and 10 minutes a job."""
    fitted = {key: value for key, value in rule_resources.items() if key not in ("gpu", "tasks_per_gpu")}
    fitted["tasks"] = RANKS if "mpi" in rule_resources else 1
    fitted["cpus_per_task"] = 1
    fitted["runtime"] = 10
    if "mem_mb_per_cpu" in fitted:
        fitted["mem_mb_per_cpu"] = 2000 // fitted["tasks"]
    else:
        fitted["mem_mb"] = 2000
    return fitted


def machine_overrides(set_resources: dict) -> list[str]:
    """Command-line options that replace the profile's site and machine values for this machine.

    --set-resources on the command line replaces the profile's whole table, so every rule of the
    profile is given again, fitted by :func:`fit_to_this_machine`. No account is given (without an
    accounting database there is none to check it against): the plugin tries to guess one with sacct,
    fails, and submits without. The first status check after 2 s instead of 40 keeps the run short
    (MinJobAge is 300 s, above the 3 x 2 s the plugin wants).
    """
    set_resources = [f"{rule}:{key}={value!r}" if isinstance(value, str) else f"{rule}:{key}={value}"
                     for rule, resources in set_resources.items()
                     for key, value in fit_to_this_machine(resources).items()]
    return ["--slurm-init-seconds-before-status-checks", "2",
            "--default-resources", f"slurm_partition={PARTITION}", "mem_mb=2000", "runtime=10",
            "--set-resources", *set_resources]


def test_fit_to_this_machine_keeps_the_launcher_and_drops_gpus():
    fitted = fit_to_this_machine({"mpi": "srun --mpi=pmix", "tasks": 4, "gpu": 4, "tasks_per_gpu": 1,
                                  "cpus_per_task": 2, "mem_mb_per_cpu": 4000, "runtime": 120})
    assert fitted == {"mpi": "srun --mpi=pmix", "tasks": 2, "cpus_per_task": 1, "mem_mb_per_cpu": 1000,
                      "runtime": 10}
    assert fit_to_this_machine({"mem_mb": 64000, "runtime": 240}) == {
        "mem_mb": 2000, "runtime": 10, "tasks": 1, "cpus_per_task": 1}


@pytest.fixture(scope="module")
def single_node_slurm():
    """A running single-node Slurm; yields the seconds it took to come up; always shut down after."""
    started = time.monotonic()
    try:
        up = run_job([SINGLE_NODE, "up"], timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        yield time.monotonic() - started
    finally:
        down = run_job([SINGLE_NODE, "down"], timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="module")
def slurm_run(single_node_slurm, tmp_path_factory):
    """The index stage of shard 0 (both datasets) run through the Slurm profile; returns (workdir, output)."""
    workdir = tmp_path_factory.mktemp("slurm")
    config = indexable_config(workdir)
    config["index"] = {"phil": str(REPO_ROOT / "config" / "index.phil")}
    configfile = write_config(workdir / "slurm.yaml", config)
    targets = [str(workdir / "results" / "index" / dataset / "shard_00000_integrated.expt") for dataset in DATASETS]
    command = [sys.executable, "-m", "snakemake", "--snakefile", SNAKEFILE, "--directory", workdir,
               "--profile", SLURM_PROFILE, *machine_overrides(profile_resources()), f"--configfile={configfile}",
               "--", *targets]
    started = time.monotonic()
    result = run_job(command, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    print(f"Slurm up in {single_node_slurm:.1f} s; pipeline through Slurm in {time.monotonic() - started:.0f} s")
    return workdir, output


@requires_slurm
def test_index_runs_through_slurm_with_two_srun_ranks(slurm_run):
    from xfel_spread.dials.stills import read_shots_table

    workdir, output = slurm_run
    for dataset in DATASETS:
        rows = read_shots_table(workdir / "results" / "index" / dataset / "shard_00000_shots.tsv")
        assert [row["shot"] for row in rows] == list(range(SHOTS_PER_SHARD))
        assert {row["status"] for row in rows} == {"integrate_ok"}, rows
        # Each of the 2 ranks took a shot and left its own DIALS log, copied into the job's log.
        log = (workdir / "logs" / "index" / dataset / "shard_00000.log").read_text()
        for rank in range(RANKS):
            assert f"----- info_rank{rank:04d}.out -----" in log, log[-3000:]
        assert f"----- info_rank{RANKS:04d}.out -----" not in log
    # The launcher was the profile's srun, inside jobs that sbatch submitted.
    assert output.count(f"srun --mpi=pmix -n {RANKS} ") >= len(DATASETS), output[-5000:]
    submitted = re.findall(r"submitted with SLURM jobid \d+ \(log: \S+/slurm_logs/rule_(\w+)/", output)
    assert sorted(submitted) == ["index", "index", "simulate", "structure_factors"], output[-5000:]
