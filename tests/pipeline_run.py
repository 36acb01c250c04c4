"""Running the workflow in the tests: Snakemake on the repository's Snakefile in a temporary working
directory, and the small config whose complete run tests/test_pipeline.py, test_report.py and
test_slurm.py share (a helper module, imported by name; conftest.py's `completed_run` builds on it).
"""

import subprocess
import sys
from pathlib import Path

from tiny_config import N_SHOTS, SHOTS_PER_SHARD, indexable_config, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO_ROOT / "Snakefile"
LOCAL_PROFILE = REPO_ROOT / "profiles" / "local"
DATASETS = ("nopsf", "psf")
N_SHARDS = N_SHOTS // SHOTS_PER_SHARD
ALL_TRIGGERS = ["--rerun-triggers", "mtime", "params", "input", "code", "software-env"]

#: A guard against a hung pipeline, not a timing goal: the whole tiny pipeline took 11.5 minutes on
#: this 2-core machine while other work loaded it (load 8-12).
PIPELINE_TIMEOUT_S = 1800


def snakemake(workdir, configfile, *arguments):
    """Run Snakemake on the repository's Snakefile in `workdir`; return the CompletedProcess.

    The config file goes last as --configfile=FILE: the option takes several values and would
    swallow targets or options after it.
    """
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--profile", str(LOCAL_PROFILE), "--cores", "2", *arguments, f"--configfile={configfile}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=PIPELINE_TIMEOUT_S)


def output_of(result):
    return result.stdout + result.stderr


def succeeded(result):
    assert result.returncode == 0, output_of(result)[-5000:]
    return output_of(result)


def pipeline_config(workdir, **simulate_overrides):
    """The indexable config, with its own copy of the index phil (tests edit it) in `workdir`.

    A cell cluster needs min_samples lattices within eps of each other, and 4 shots give 4 lattices,
    too few to observe any index twice.
    """
    config = indexable_config(workdir, **simulate_overrides)
    config["index"] = {"phil": str(workdir / "index.phil")}
    config["cells"] = {"min_samples": 3}
    config["merge"] = {"minimum_multiplicity": 1}
    config["stage1"] = {}
    return config


# `completed_run` (tests/conftest.py): the small config run to completion once per session, in a
# working directory made by `completed_pipeline_run` below; tests/test_pipeline.py and
# tests/test_report.py inspect and extend it.


def completed_pipeline_run(workdir):
    """Run the small config to completion in `workdir`; returns (workdir, configfile)."""
    (workdir / "index.phil").write_text((REPO_ROOT / "config" / "index.phil").read_text())
    configfile = write_config(workdir / "small.yaml", pipeline_config(workdir))
    succeeded(snakemake(workdir, configfile))
    return workdir, configfile
