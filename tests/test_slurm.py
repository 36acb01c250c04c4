"""The Slurm profile on a real Slurm: a single-node cluster on this machine runs every MPI stage.

``scripts/slurm/single_node.sh up`` starts munged, slurmctld and slurmd (Debian's Slurm 22.05); then
``snakemake --profile profiles/slurm`` runs SLURM_TARGETS (both pixel refinements of every shard of the
psf dataset, which take simulation, index, metrology, reindex, the cells, merge and the annulus, plus
SPREAD, the DIALS cross-check and the exa score) on tests/pipeline_run.py's small config, submitting
every job with sbatch and
following it with squeue; the other scores and the report's figures, which no MPI stage needs, are left
out. The MPI stages (index, reindex, merge, stage1, exa, spread) run 2 ranks each under the
profile's ``srun --mpi=pmix``; their logs show both ranks at work. ``single_node.sh down`` stops the
daemons whatever happens, and the test checks they are gone. Needs root and the Slurm packages
(scripts/setup.sh installs them); skipped otherwise. The checks of what the plugin makes of the
profile's resources run its own code and need no cluster.

The profile's site and machine values (account, partition, GPUs, 32 ranks, tens of GB) do not fit a
2-core machine without GPUs, so the run overrides them on the command line, keeping the rest of the
profile (executor, status command, MPI launcher, resource keys) as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import job_stats, run_job
from pipeline_run import ALL_TRIGGERS, pipeline_config, snakemake, succeeded
from tiny_config import N_SHOTS, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO_ROOT / "Snakefile"
SLURM_PROFILE = REPO_ROOT / "profiles" / "slurm"
SINGLE_NODE = REPO_ROOT / "scripts" / "slurm" / "single_node.sh"
#: The partition single_node.sh defines.
PARTITION = "debug"
#: Where single_node.sh keeps its pid files (its default, unless the environment names another).
STATE_DIR = Path(os.environ.get("SPREAD_SLURM_STATE_DIR", "/var/tmp/spread-slurm"))
#: MPI ranks per MPI job here: all the cores of a 2-core machine.
RANKS = 2
#: One dataset: the nopsf one's jobs are the same rules with other wildcards (the pipeline test runs
#: both), and each sbatch job costs tens of seconds of status polling. psf's also carry the PSF options.
DATASETS = ("psf",)
#: The small config's shots, all in one shard: every MPI rule still runs its 2 ranks, with half the
#: sbatch jobs of the pipeline test's 2 shards (the Slurm plugin's status polling backs off by 10 s a
#: check, so each job costs far more than its own run time).
SHOTS_PER_SHARD = N_SHOTS
N_SHARDS = 1
#: Jobs that Snakemake runs itself, not through sbatch: the rules marked local (copying reference files,
#: writing a stage's settings).
LOCAL_RULES = {"reference_data", "stage_settings"}
#: The command each MPI rule launches.
MPI_COMMANDS = {"index": "spread-stills-process", "reindex": "spread-stills-process", "merge": "spread-merge",
                "stage1": "spread-stage1", "exa": "spread-exa", "spread": "spread-spread"}


def slurm_targets(workdir: Path) -> list[Path]:
    """What the run through Slurm asks for: both pixel refinements of every shard and dataset (which need
    every other MPI stage: index, reindex, merge), SPREAD of each dataset, the DIALS cross-check and the exa
    score; not the default target, whose other scores and figures no MPI stage needs."""
    results = workdir / "results"
    refined = [results / refinement / dataset / f"shard_{index:05d}{suffix}"
               for refinement in ("stage1", "exa") for dataset in DATASETS for index in range(N_SHARDS)
               for suffix in ("_refined.expt", "_shots.tsv")]
    return refined + [path for dataset in DATASETS
                      for path in (results / "merge" / dataset / "dials" / "merged.mtz",
                                   results / "score" / f"exa_{dataset}.tsv",
                                   results / "spread" / dataset / "spread_summary.json")]


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
    assert mpi_rules == ["exa", "index", "merge", "reindex", "spread", "stage1"]
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


def daemon_pids() -> dict[str, int]:
    """The daemons single_node.sh started and will stop, by name: slurmctld, slurmd, and munged when it
    started that one too."""
    pid_files = {"slurmctld": STATE_DIR / "slurmctld.pid", "slurmd": STATE_DIR / "slurmd.pid"}
    if (STATE_DIR / "munged.ours").exists():
        pid_files["munged"] = Path("/run/munge/munged.pid")
    return {name: int(path.read_text()) for name, path in pid_files.items()}


def is_running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a daemon that exited, waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"  # the state follows the command name in parentheses


@dataclass
class SlurmRun:
    """What the run through Slurm left: its directory and config, Snakemake's output, the jobs a dry run
    planned before it ({rule: count}), the daemons that ran it ({name: pid}) and those still running after
    single_node.sh down."""

    workdir: Path
    configfile: Path
    output: str
    planned: Counter
    daemons: dict
    running_after_down: list


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> SlurmRun:
    """slurm_targets on pipeline_run's small config (its shots in one shard), run through the Slurm profile
    on a single-node Slurm that is brought up for it and always shut down after."""
    workdir = tmp_path_factory.mktemp("slurm")
    (workdir / "index.phil").write_text((REPO_ROOT / "config" / "index.phil").read_text())
    configfile = write_config(workdir / "small.yaml", pipeline_config(workdir, shots_per_shard=SHOTS_PER_SHARD))
    targets = slurm_targets(workdir)
    planned = job_stats(succeeded(snakemake(workdir, configfile, "--dry-run", *targets)))
    command = [sys.executable, "-m", "snakemake", "--snakefile", SNAKEFILE, "--directory", workdir,
               "--profile", SLURM_PROFILE, *targets, *machine_overrides(profile_resources()),
               f"--configfile={configfile}"]
    started = time.monotonic()
    try:
        up = run_job([SINGLE_NODE, "up"], timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        daemons = daemon_pids()
        up_seconds = time.monotonic() - started
        result = run_job(command, timeout=2400)
        run_seconds = time.monotonic() - started - up_seconds
    finally:
        down = run_job([SINGLE_NODE, "down"], timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    print(f"Slurm up in {up_seconds:.1f} s; {sum(planned.values())} jobs through Slurm in {run_seconds:.0f} s")
    running = [name for name, pid in daemons.items() if is_running(pid)]
    return SlurmRun(workdir, configfile, output, planned, daemons, running)


@pytest.mark.slow
@requires_slurm
def test_every_job_goes_through_sbatch_and_the_run_completes(slurm_run):
    submitted = Counter(re.findall(r"submitted with SLURM jobid \d+ \(log: \S+/slurm_logs/rule_(\w+)/",
                                   slurm_run.output))
    local = Counter(re.findall(r"^localrule (\w+):$", slurm_run.output, re.MULTILINE))
    assert set(local) == LOCAL_RULES, local
    assert submitted + local == slurm_run.planned, slurm_run.output[-5000:]
    assert set(MPI_COMMANDS) | {"simulate", "metrology", "dials_merge", "score_exa"} <= set(submitted), submitted
    # Every output asked for is there and up to date: a dry run with every rerun trigger plans nothing.
    after = snakemake(slurm_run.workdir, slurm_run.configfile, "--dry-run", *slurm_targets(slurm_run.workdir),
                      *ALL_TRIGGERS)
    assert job_stats(succeeded(after)) == Counter()


@pytest.mark.slow
@requires_slurm
def test_the_mpi_stages_ran_two_ranks_under_srun(slurm_run):
    from xfel_spread.io.stills import read_shots_table

    results, logs = slurm_run.workdir / "results", slurm_run.workdir / "logs"
    # The profile's launcher ran each MPI job's command, inside the job sbatch submitted.
    launched = Counter(re.findall(rf"srun --mpi=pmix -n {RANKS} \S*/(spread-[\w-]+) ", slurm_run.output))
    assert launched == Counter(MPI_COMMANDS[rule] for rule in MPI_COMMANDS
                               for _ in range(slurm_run.planned[rule])), slurm_run.output[-5000:]
    for stage in ("index", "reindex"):
        for dataset in DATASETS:
            for index in range(N_SHARDS):
                shots = read_shots_table(results / stage / dataset / f"shard_{index:05d}_shots.tsv")
                assert [row["shot"] for row in shots] == list(range(index * SHOTS_PER_SHARD,
                                                                     (index + 1) * SHOTS_PER_SHARD))
                # Each of the 2 ranks took shots and left its own DIALS log, copied into the job's log.
                log = (logs / stage / dataset / f"shard_{index:05d}.log").read_text()
                for rank in range(RANKS):
                    assert f"----- info_rank{rank:04d}.out -----" in log, (stage, log[-3000:])
                assert f"----- info_rank{RANKS:04d}.out -----" not in log
    for dataset in DATASETS:
        # Ranks that had not joined one MPI world would each count 1, and each write the files.
        assert f"spread-merge: {RANKS} rank(s)" in (logs / "merge" / f"{dataset}.log").read_text()
        summary = json.loads((results / "merge" / dataset / "summary.json").read_text())
        assert summary["n_ranks"] == RANKS and summary["accepted"] > 0, summary
        for refinement in ("stage1", "exa"):
            for index in range(N_SHARDS):
                log = (logs / refinement / dataset / f"shard_{index:05d}.log").read_text()
                assert re.search(rf"spread-{refinement}: \d+ lattices of \S+ on {RANKS} rank\(s\)", log), log[-3000:]
        # SPREAD shares the dataset's shards among its ranks.
        log = (logs / "spread" / f"{dataset}.log").read_text()
        assert re.search(rf"spread {dataset}: \d+ lattices, \d+ pixels in \d+ shard\(s\) on {RANKS} rank\(s\)", log), \
            log[-3000:]


@pytest.mark.slow
@requires_slurm
def test_the_daemons_are_down_after_the_run(slurm_run):
    assert {"slurmctld", "slurmd"} <= set(slurm_run.daemons), slurm_run.daemons
    assert slurm_run.running_after_down == [], slurm_run.daemons
    assert not Path("/etc/slurm/slurm.conf").exists()  # down removes the config up wrote
