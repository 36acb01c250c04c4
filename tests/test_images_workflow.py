"""The workflow on images from elsewhere (input.source: images): what a dry run plans and the one-line
refusals at parse time. Dry runs in scratch directories. A list of 100,000 files: tests/test_images_scale.py."""

import subprocess
import sys
import time

import pytest
import yaml
from conftest import NANOBRAGG_DIR, REPO_ROOT, SHARED_DATA_DIR, job_stats

from xfel_spread.config import load_config
from xfel_spread.workflow import RunSettingsError, plan_image_shots

#: One job per shard of the single dataset `images`.
PER_SHARD = ("image_shard", "index", "reindex", "stage1", "exa")
#: One job per run.
PER_RUN = ("list_images", "metrology", "tdata", "covariance", "merge", "annulus", "spread", "plot_shot",
           "plot_detector_refinement", "plot_stage1", "plot_exa", "plot_spread", "all")
#: The report's figures that need no truth, planned for the nanoBragg images (paths under the work directory).
TRUTH_FREE_FIGURES = ("results/report/images_shot.png", "results/report/images_detector_refinement.png",
                      "results/metrology/images/residuals_before.png", "results/metrology/images/residuals_after.png",
                      "results/cells/images_clusters.png", "results/merge/images/statistics.png",
                      "results/report/images_stage1.png", "results/report/images_exa.png",
                      "results/report/images_spread.png")


def nanobragg_input(**overrides) -> dict:
    return {"input": {"source": "images", "images": [str(NANOBRAGG_DIR / "image_*.img.gz")], "shots_per_shard": 4,
                      "spectra": "table", "spectra_table": str(NANOBRAGG_DIR / "spectra.tsv"), **overrides},
            "hitfind": {"enabled": False}}


def dry_run(tmp_path, config: dict):
    configfile = tmp_path / "images.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "snakemake", "--dry-run", "--quiet", "rules", "--snakefile",
               str(REPO_ROOT / "Snakefile"), "--directory", str(workdir), f"--configfile={configfile}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return result, time.perf_counter() - start


def expected_jobs(n_shards: int) -> dict:
    # Reference copies: the model (1m2a.pdb) and SPREAD's start table (Fe_fake.dat, spread.sites' default); settings
    # of 7 stages (images, metrology, cells, merge, annulus, stage1, spread).
    return {"reference_data": 2, "stage_settings": 7, **{rule: n_shards for rule in PER_SHARD},
            **{rule: 1 for rule in PER_RUN}}


def test_images_plan_per_shard_jobs_and_no_truth_or_score(tmp_path):
    result, _ = dry_run(tmp_path, nanobragg_input())
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = job_stats(result.stdout + result.stderr)
    assert jobs == expected_jobs(2)
    assert not {rule for rule in jobs if rule.startswith("score") or rule in ("simulate", "structure_factors")}


def test_images_plan_every_report_figure_that_needs_no_truth(tmp_path):
    """The default target of an image run draws the report's truth-free figures (the shot from the image-list
    shard, the detector refinement, metrology's residuals, the cell clusters, the merging statistics, both pixel
    refinements' RMSDs and Z-scores, SPREAD's curves) and runs no score rule."""
    configfile = tmp_path / "images.yaml"
    configfile.write_text(yaml.safe_dump(nanobragg_input()))
    (tmp_path / "work").mkdir()
    command = [sys.executable, "-m", "snakemake", "--dry-run", "--snakefile", str(REPO_ROOT / "Snakefile"),
               "--directory", str(tmp_path / "work"), f"--configfile={configfile}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    plan = result.stdout + result.stderr
    assert [figure for figure in TRUTH_FREE_FIGURES if figure not in plan] == []
    assert "results/score/" not in plan and "rule score" not in plan
    # The shot figure reads the image-list shard, not a simulated one.
    shot = plan[plan.index("rule plot_shot:"):].split("\n\n")[0]
    assert "results/images/images/shard_00000.h5" in shot and "results/sim/" not in shot


def test_hit_finding_on_images_plans_per_shard_measurements_and_no_score(tmp_path):
    result, _ = dry_run(tmp_path, {**nanobragg_input(), "hitfind": {"enabled": True}})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    # Measured once per shard; the threshold and the powder once per run; two more settings files.
    expected = expected_jobs(2) | {"hitfind_shard": 2, "hitfind": 1, "powder": 1, "stage_settings": 9}
    assert job_stats(result.stdout + result.stderr) == expected


def test_starting_geometry_and_model_reach_the_index_and_merge_commands(tmp_path):
    geometry = SHARED_DATA_DIR / "real/rayonix_mfx/experiments_000.json"
    model = SHARED_DATA_DIR / "1m2a.pdb"
    configfile = tmp_path / "images.yaml"
    configfile.write_text(yaml.safe_dump({**nanobragg_input(reference_geometry=str(geometry), model=str(model)),
                                          "stage1": {"structure_factors": "model"}}))
    (tmp_path / "work").mkdir()
    command = [sys.executable, "-m", "snakemake", "--dry-run", "--printshellcmds", "--snakefile",
               str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path / "work"), f"--configfile={configfile}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = result.stdout.splitlines()
    index = [line for line in lines if "spread-stills-process" in line and "results/index/" in line]
    reindex = [line for line in lines if "spread-stills-process" in line and "results/reindex/" in line]
    merge = [line for line in lines if "spread-merge " in line]
    spread = [line for line in lines if "spread-spread " in line]
    shards = [line for line in lines if "xfel_spread.cli.images shard" in line]
    assert len(shards) == 2 and all("--channel-grid 7070.5 1.0 100 " in line for line in shards)
    assert len(index) == 2 and all(f"--reference-geometry {geometry}" in line for line in index)
    assert reindex and all(str(geometry) not in line for line in reindex)  # reindex takes metrology's detector
    assert len(merge) == 1 and f"--model {model}" in merge[0]
    assert len(spread) == 1 and f"--pdb {model}" in spread[0]
    # The amplitude table of images from elsewhere puts spread.sites' start tables on spread.sites' atoms (the
    # truth is unknown; a model of another crystal needs no atom named as LY99's).
    (amplitudes,) = [line for line in lines if "spread-structure-factors" in line]
    assert f"--pdb {model}" in amplitudes
    assert "--site FE1=resources/reference/Fe_fake.dat --site FE2=resources/reference/Fe_fake.dat" in amplitudes
    # The model given is the merge's and SPREAD's, so no reference copy of 1m2a.pdb is made (only SPREAD's start table).
    assert "resources/reference/1m2a.pdb" not in result.stdout
    assert job_stats(result.stdout + result.stderr)["reference_data"] == 1


def test_the_cspad_example_merges_without_a_model(tmp_path):
    """config/examples/thermolysin_cspad.yaml (input.model none, merge.reference data) plans a merge whose
    command has no --model; with merge.reference model and the default model the same run passes LY99's."""
    example = yaml.safe_load((REPO_ROOT / "config/examples/thermolysin_cspad.yaml").read_text())
    example["input"]["images"] = [str(SHARED_DATA_DIR / "real/thermolysin_cspad/*.cbf")]
    example["index"]["phil"] = str(REPO_ROOT / example["index"]["phil"])
    example.pop("output_dir"), example.pop("log_dir")

    def merge_commands(config, name):
        configfile = tmp_path / f"{name}.yaml"
        configfile.write_text(yaml.safe_dump(config))
        (tmp_path / name).mkdir()
        command = [sys.executable, "-m", "snakemake", "--dry-run", "--printshellcmds", "--snakefile",
                   str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path / name), f"--configfile={configfile}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        shards = [line for line in result.stdout.splitlines() if "xfel_spread.cli.images shard" in line]
        # No SPREAD, stage 1 on merged |F|: the monochromatic ~9.5 keV spectra are not held to the Fe-edge grid.
        assert shards and all("--channel-grid" not in line for line in shards)
        return [line for line in result.stdout.splitlines() if "spread-merge " in line]

    assert example["merge"]["reference"] == "data"
    data = merge_commands(example, "data")
    assert len(data) == 1 and "--model" not in data[0] and "--covariance" in data[0]
    assert example["input"]["model"] == "none"
    model = merge_commands({**example, "input": {**example["input"], "model": None},
                            "merge": {**example["merge"], "reference": "model"}}, "model")
    assert len(model) == 1 and "--model " in model[0] and "1m2a.pdb" in model[0]


def test_the_channel_grid_is_checked_where_shards_are_made_only_when_a_stage_uses_it(tmp_path):
    """--channel-grid reaches the image_shard command when SPREAD runs (spread.enabled) or stage 1 takes the
    model's amplitudes; the CSPAD example (monochromatic, merged without a model, spread.enabled false) has none."""
    from xfel_spread.workflow import channel_grid_option

    def option(config):
        configfile = tmp_path / "run.yaml"
        configfile.write_text(yaml.safe_dump(config))
        return channel_grid_option(load_config(configfile))

    assert option(nanobragg_input()) == "--channel-grid 7070.5 1.0 100"
    cspad = yaml.safe_load((REPO_ROOT / "config/examples/thermolysin_cspad.yaml").read_text())
    assert cspad["spread"]["enabled"] is False and option(cspad) == ""
    assert option({**cspad, "stage1": {"structure_factors": "model"}}) == "--channel-grid 7070.5 1.0 100"
    assert option({"input": {"source": "simulate"}}) == ""
    result, _ = dry_run(tmp_path, {**nanobragg_input(), "spread": {"enabled": False}})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = job_stats(result.stdout + result.stderr)
    assert "spread" not in jobs and "plot_spread" not in jobs and jobs["image_shard"] == 2


def test_a_glob_matching_nothing_stops_the_run_with_one_line(tmp_path):
    result, _ = dry_run(tmp_path, nanobragg_input(images=[str(tmp_path / "nothing_*.cbf")]))
    assert result.returncode != 0
    assert (f"Input error: {tmp_path / 'images.yaml'}: input.images: {tmp_path / 'nothing_*.cbf'}: matches no file"
            in result.stderr.splitlines())


def test_parse_time_refusals_name_the_key():
    def refusal(**overrides):
        config = load_config(nanobragg_input(**overrides))
        with pytest.raises(RunSettingsError) as error:
            plan_image_shots(config, "run.yaml")
        return str(error.value)

    assert refusal(images=[]) == "Input error: run.yaml: input.images: source: images needs at least one file or glob"
    assert refusal(spectra_table=None) == "Input error: run.yaml: input.spectra_table: spectra: table needs the table's path"
    assert refusal(mask="/nowhere/mask.pickle") == "Input error: run.yaml: input.mask: /nowhere/mask.pickle: no such file"
    assert len(plan_image_shots(load_config(nanobragg_input()), "run.yaml")) == 8


@pytest.mark.slow  # makes two image-list shards with dxtbx, then plans again (about a minute)
def test_more_files_add_only_their_shards_and_a_spectra_setting_remakes_every_shard(tmp_path):
    from pipeline_run import snakemake, succeeded

    images = tmp_path / "images"
    images.mkdir()

    def arrive(numbers):  # new files in the directory the glob names (links to the shared images)
        for number in numbers:
            (images / f"image_{number:03d}.img.gz").symlink_to(NANOBRAGG_DIR / f"image_{number:03d}.img.gz")

    def config(**overrides):
        return {**nanobragg_input(images=[str(images / "image_*.img.gz")], shots_per_shard=2, **overrides),
                "reference": {"mirror_dir": str(SHARED_DATA_DIR)}}

    configfile = tmp_path / "images.yaml"
    configfile.write_text(yaml.safe_dump(config()))
    targets = ["results/images/list.tsv"] + [f"results/images/images/shard_{index:05d}.h5" for index in range(3)]
    arrive(range(4))
    succeeded(snakemake(tmp_path, configfile, *targets[:3]))
    before = [(tmp_path / shard).stat().st_mtime_ns for shard in targets[1:3]]

    arrive(range(4, 6))
    plan = succeeded(snakemake(tmp_path, configfile, "--dry-run", *targets))
    assert job_stats(plan) == {"list_images": 1, "image_shard": 1}
    assert "wildcards: dataset=images, index=00002" in plan
    succeeded(snakemake(tmp_path, configfile, *targets))
    assert len((tmp_path / "results/images/list.tsv").read_text().splitlines()) == 7
    assert [(tmp_path / shard).stat().st_mtime_ns for shard in targets[1:3]] == before

    configfile.write_text(yaml.safe_dump(config(energy_offset_ev=1.0)))
    plan = succeeded(snakemake(tmp_path, configfile, "--dry-run", *targets))
    assert job_stats(plan) == {"stage_settings": 1, "image_shard": 3}


def render_description(config: dict) -> str:
    """report/workflow.rst as `snakemake --report` renders it (Jinja with `snakemake.config`), as text."""
    from types import SimpleNamespace

    import jinja2

    template = (REPO_ROOT / "report/workflow.rst").read_text()
    return jinja2.Template(template).render(snakemake=SimpleNamespace(config=config))


def test_the_report_description_of_an_image_run_says_there_is_no_truth():
    images = render_description({"input": {"source": "images", "shots_per_shard": 4, "spectra": "table"}})
    assert "**No truth: these data were not simulated, so nothing in this report is scored against a truth.**" in images
    assert images.count("No truth") == 1 and "simulated shots" not in images
    simulated = render_description({"input": {"source": "simulate"}, "simulate": {"n_shots": 8, "shots_per_shard": 4}})
    assert simulated.startswith("SPREAD analysis of ferredoxin LY99: 8 simulated shots in shards of\n4,")
    assert "No truth" not in simulated and "scored against the simulation's truth" in simulated
