"""Pipeline overhead of the index stage: spread-stills-process against a bare dials.stills_process.

Both run the same phil on the same full-size shard, one process each, and are timed from start to
exit; the figures are seconds per shot and the pipeline's overhead in percent (goal: at most 5 %).
The bare run is the smallest call that indexes on Debian's DIALS: stills_process's own ``run()`` with
the xfel_mono_sim_ext stand-in installed (without it no shot indexes, which would be faster and
meaningless). The pipeline adds its shard check, MPI set-up, progress thread, the gathering of the
outputs into one set per shard and the shots table. The two runs alternate, ``--repeats`` times each,
and the medians are compared. Snakemake adds a fixed cost per job on top (on a cluster, each job parses
the workflow again); the last line measures it as a dry run of the demo and relates it to one
production shard of 500 shots.

Usage: .venv/bin/python benchmarks/bench_stills.py [--shard results/sim/psf/shard_00000.h5] [--repeats 2]
(the default shard is the demo's: run ``make demo`` first, or give any simulated shard).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xfel_spread.io.shard import read_shard_metadata

REPO = Path(__file__).resolve().parents[1]
BARE_STILLS_PROCESS = (
    "import sys; from xfel_spread.dials.compat import install_mono_sim_stand_in; install_mono_sim_stand_in(); "
    "from dials.command_line.stills_process import run; run(sys.argv[1:])"
)


def timed_run(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default=str(REPO / "results" / "sim" / "psf" / "shard_00000.h5"))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each command")
    parser.add_argument("--phil", default=str(REPO / "config" / "index.phil"))
    arguments = parser.parse_args()

    shard = Path(arguments.shard).resolve()
    if not shard.is_file():
        sys.exit(f"{shard}: no such shard (run `make demo` first, or pass --shard)")
    n_shots = read_shard_metadata(shard).n_shots
    bin_dir = Path(sys.executable).parent

    bare_times, pipeline_times = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(arguments.repeats):
            bare_dir = Path(scratch) / f"bare{repeat}"
            bare_dir.mkdir()
            bare_times.append(timed_run(
                [sys.executable, "-c", BARE_STILLS_PROCESS, str(shard), arguments.phil,
                 f"output.output_dir={bare_dir}", "output.integration_pickle=None"], bare_dir))
            pipeline_dir = Path(scratch) / f"pipeline{repeat}"
            pipeline_dir.mkdir()
            pipeline_times.append(timed_run(
                [str(bin_dir / "spread-stills-process"), "--shard", str(shard), "--shots", "0", str(n_shots),
                 "--phil", arguments.phil, "--output-prefix", str(pipeline_dir / "shard")], pipeline_dir))

    bare, pipeline = statistics.median(bare_times), statistics.median(pipeline_times)
    print(f"shard {shard} ({n_shots} shots), {arguments.repeats} runs each, one process")
    print(f"bare dials.stills_process : {bare:8.2f} s  ({bare / n_shots:.2f} s per shot)  runs: "
          + ", ".join(f"{value:.2f}" for value in bare_times))
    print(f"spread-stills-process     : {pipeline:8.2f} s  ({pipeline / n_shots:.2f} s per shot)  runs: "
          + ", ".join(f"{value:.2f}" for value in pipeline_times))
    print(f"pipeline overhead         : {100 * (pipeline - bare) / bare:+.1f} %  (goal: at most +5 %)")

    parse = timed_run([str(bin_dir / "snakemake"), "--dry-run", "--quiet", "--cores", "1"], REPO)
    shard_seconds = 500 * bare / n_shots
    print(f"Snakemake job start-up    : {parse:8.2f} s per job (a dry run of the demo): "
          f"{100 * parse / shard_seconds:.2f} % of a 500-shot shard's {shard_seconds:.0f} CPU s")


if __name__ == "__main__":
    main()
