"""A list of 100,000 image files plans jobs per shard, not per file (as tests/test_scale.py does for the
simulated production config). The files are empty: planning never opens a single-image file. ``make test``
runs this beside the Slurm test, with the other production-scale dry runs."""

import pytest
from conftest import job_stats
from test_images_workflow import dry_run, expected_jobs, nanobragg_input


@pytest.mark.slow  # makes 100,000 empty files and plans them in 200 shards
def test_a_list_of_100000_files_plans_in_seconds_with_jobs_per_shard(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for run in range(100):
        for shot in range(1000):
            (images / f"r{run:04d}_{shot:04d}.cbf").touch()
    config = nanobragg_input(images=[str(images / "r*.cbf")], shots_per_shard=500, spectra="monochromatic",
                             spectra_table=None)
    result, seconds = dry_run(tmp_path, config)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert job_stats(result.stdout + result.stderr) == expected_jobs(200)
    # The time is a figure, not a goal this test checks: benchmarks/bench_dryrun.py --images times it.
    print(f"100,000 files in 200 shards: dry run {seconds:.1f} s")
