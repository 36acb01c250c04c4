"""Scale of the workflow itself: how long Snakemake takes to plan the production run, and how its DAG
grows with the number of shards.

Times ``snakemake -n --configfile config/production.yaml`` (100,000 shots in 200 shards of 500, both
datasets) in a scratch working directory, so nothing real is read or written (goal: under 10 s), and
prints the jobs per rule. Then plans the same run with shards half as large (400 shards) and checks
that every per-shard rule doubled while every other rule kept its count: the DAG grows with the
shards, not with the shots. Wall time depends on what else the machine runs, so the CPU time of the
Snakemake process (user + system) is printed beside it. Last, what profiles/slurm asks for each rule's
jobs (tasks, CPUs, GPUs, time limit), and at most at once under its `jobs` limit.

With ``--images N``: the same timing for a run on images from elsewhere (``input.source: images``), a
glob over N empty ``.cbf`` files in shards of 500 (the listing reads no pixels; goal: as fast as the
simulated production config).

Usage: .venv/bin/python benchmarks/bench_dryrun.py [--repeats 3] [--images 100000]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = REPO / "config" / "production.yaml"
SLURM_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
#: Rules with one job per shard and dataset (or per shard, for simulate, which writes both datasets).
PER_SHARD_RULES = {"simulate", "hitfind_shard", "index", "reindex", "stage1", "exa"}
JOB_STATS_ROW = re.compile(r"^(\w+)\s+(\d+)$")


def job_stats(output: str) -> Counter:
    """{rule: jobs} from the first "Job stats" table a dry run prints."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        sys.exit(f"no job stats in the dry run's output:\n{output[-3000:]}")
    counts = Counter()
    for line in lines[lines.index("Job stats:") + 3:]:
        rule, count = JOB_STATS_ROW.match(line.strip()).groups()
        if rule == "total":
            return counts
        counts[rule] = int(count)
    sys.exit("no total line in the job stats table")


def timed_dry_run(configfiles: list[Path]) -> tuple[float, float, Counter]:
    """(wall seconds, CPU seconds, jobs per rule) of one dry run in a fresh scratch directory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as scratch:
        command = [str(Path(sys.executable).parent / "snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"),
                   "--directory", scratch, "--configfile", *map(str, configfiles)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"dry run failed: {' '.join(command)}\n{(result.stdout + result.stderr)[-3000:]}")
        if os.listdir(scratch) not in ([], [".snakemake"]):
            sys.exit(f"the dry run wrote into its working directory: {os.listdir(scratch)}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, job_stats(result.stdout + result.stderr)


def print_slurm_requests(counts: Counter) -> None:
    """Per rule: jobs, and per job the tasks, CPUs, GPUs and time limit profiles/slurm asks for."""
    import yaml

    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    default, limit = profile.get("default-resources", {}), int(profile.get("jobs", 1))
    print(f"profiles/slurm asks (at most {limit} jobs queued or running at once):")
    print(f"  {'rule':26s} {'jobs':>5s} {'tasks':>5s} {'CPUs':>5s} {'GPUs':>5s} {'limit':>7s}  at once")
    for rule, count in counts.items():
        if rule in {"all", "stage_settings", "reference_data"}:  # local rules, run by Snakemake itself
            continue
        asked = {**default, **profile.get("set-resources", {}).get(rule, {})}
        tasks, gpus = int(asked.get("tasks", 1)), int(asked.get("gpu", 0))
        cpus = tasks * int(asked.get("cpus_per_task", 1))
        at_once = min(count, limit)
        print(f"  {rule:26s} {count:5d} {tasks:5d} {cpus:5d} {gpus:5d} {asked.get('runtime', '?'):>5} min"
              f"  {at_once} jobs: {at_once * cpus} CPUs, {at_once * gpus} GPUs")


def time_image_run(n_files: int, repeats: int) -> None:
    """Time dry runs of ``input.source: images`` over ``n_files`` empty .cbf files in shards of 500."""
    import yaml

    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        for number in range(n_files):
            (images / f"r{number // 1000:04d}_{number % 1000:04d}.cbf").touch()
        configfile = Path(scratch) / "images.yaml"
        configfile.write_text(yaml.safe_dump({"input": {
            "source": "images", "images": [str(images / "r*.cbf")], "shots_per_shard": 500,
            "spectra": "monochromatic"}}))
        runs = [timed_dry_run([configfile]) for _ in range(repeats)]
    walls, cpus, counts = [run[0] for run in runs], [run[1] for run in runs], runs[0][2]
    print(f"input.source images, {n_files} files in shards of 500: {statistics.median(walls):.1f} s wall "
          f"(runs: {', '.join(f'{wall:.1f}' for wall in walls)}), {statistics.median(cpus):.1f} s CPU; "
          f"{sum(counts.values())} jobs; load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed dry runs of the production config")
    parser.add_argument("--images", type=int, default=0,
                        help="also time a dry run on this many image files from elsewhere (0: skip)")
    arguments = parser.parse_args()
    if arguments.images:
        time_image_run(arguments.images, arguments.repeats)

    runs = [timed_dry_run([PRODUCTION]) for _ in range(arguments.repeats)]
    walls, cpus, counts = [run[0] for run in runs], [run[1] for run in runs], runs[0][2]
    print(f"snakemake -n --configfile config/production.yaml: {statistics.median(walls):.1f} s wall "
          f"(runs: {', '.join(f'{wall:.1f}' for wall in walls)}), {statistics.median(cpus):.1f} s CPU; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; goal < 10 s")
    print(f"{sum(counts.values())} jobs:")
    for rule, count in counts.items():
        print(f"  {rule:26s} {count:5d}{'  (per shard)' if rule in PER_SHARD_RULES else ''}")

    with tempfile.TemporaryDirectory() as scratch:
        smaller_shards = Path(scratch) / "shards_of_250.yaml"
        smaller_shards.write_text("simulate:\n  shots_per_shard: 250\n")
        _, _, doubled = timed_dry_run([PRODUCTION, smaller_shards])
    changed = {rule: (counts[rule], doubled[rule]) for rule in counts.keys() | doubled.keys()
               if doubled[rule] != (2 * counts[rule] if rule in PER_SHARD_RULES else counts[rule])}
    print(f"shards of 250 instead of 500: {sum(doubled.values())} jobs; per-shard rules doubled, the others "
          f"unchanged: {'yes' if not changed else f'NO, {changed}'}")
    print_slurm_requests(counts)


if __name__ == "__main__":
    main()
