"""Scale of the workflow: the production DAG has jobs per shard, never per shot.

A dry run of config/production.yaml (100,000 shots in shards of 500) in a scratch working directory;
the jobs per rule must be the expected function of the number of shards. (A partial last shard is
shard_ranges's arithmetic, tested in tests/test_config.py; a second production-scale dry run with
shards of 333 added 26 s to CI and nothing the Snakefile does differently.) How long the dry run takes is measured by benchmarks/bench_dryrun.py, not here; that the parse imports no torch is checked here.
"""

import os
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from conftest import REPO_ROOT, job_stats
from xfel_spread.config import IMAGE_ONLY_STAGES, STAGE_SECTIONS
from xfel_spread.reference import REFERENCE_NAMES

PRODUCTION = REPO_ROOT / "config" / "production.yaml"
#: One job per shard and dataset.
PER_SHARD_AND_DATASET = ("hitfind_shard", "index", "reindex", "stage1", "exa")
#: One job per dataset, whatever the number of shots.
PER_DATASET = ("metrology", "score_dials", "tdata", "covariance", "merge", "dials_merge", "score_merge", "annulus",
               "score_stage1", "score_exa", "plot_shot", "plot_detector_refinement", "hitfind", "powder",
               "score_hitfind", "spread", "score_spread")


#: Stages whose settings job is planned only when the stage is switched on (off in the production config).
OPT_IN_STAGES = ("pixel_metrology",)


def expected_jobs(n_shards: int) -> Counter:
    settings_jobs = len(STAGE_SECTIONS) - len(IMAGE_ONLY_STAGES) - len(OPT_IN_STAGES)
    return Counter({"reference_data": len(REFERENCE_NAMES), "stage_settings": settings_jobs,
                    "structure_factors": 1,
                    "simulate": n_shards, **{rule: 2 * n_shards for rule in PER_SHARD_AND_DATASET},
                    **{rule: 2 for rule in PER_DATASET}, "all": 1})


@pytest.mark.slow  # a production-scale dry run, 10-12 s
def test_production_dag_has_jobs_per_shard_not_per_shot(tmp_path):
    production = yaml.safe_load(PRODUCTION.read_text())["simulate"]
    assert (production["n_shots"], production["shots_per_shard"]) == (100_000, 500)
    n_shards = 200
    workdir = tmp_path / "work"
    workdir.mkdir()
    command = [sys.executable, "-m", "snakemake", "--dry-run", "--snakefile", str(REPO_ROOT / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(PRODUCTION)]
    # Python's import timing on stderr: which modules the parse imports.
    environment = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    assert job_stats(result.stdout + result.stderr) == expected_jobs(n_shards)
    # Every run, dry run and Slurm job parses the workflow: it must not import torch (2 s of a 4.5-s dry run
    # when rules/common.smk took SPREAD's output names from the stage's driver).
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "snakemake" in imported and "torch" not in imported
    # Planning writes nothing but Snakemake's own bookkeeping.
    assert [path.name for path in workdir.iterdir()] in ([], [".snakemake"])
