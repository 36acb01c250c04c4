"""The Snakemake workflow end to end on a small config: outputs, logs, rerun semantics, early failures.

Snakemake runs as a subprocess (``python -m snakemake`` from the test's environment, so the rules
find the spread-* commands beside it) with the local profile (mpirun for the MPI stages) and
``--directory`` set to a temporary directory: nothing is written into the repository. The config keeps
the full physics (every default of the schema) but a 1536 x 1536 panel of 0.176 mm pixels that DIALS
indexes, and 4 shots in 2 shards, so a complete run, DIALS stages included, takes a minute or two.
"""

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xfel_spread.io.shard import read_shard_metadata
from xfel_spread.reference import REFERENCE_NAMES

from conftest import job_stats
from pipeline_run import (ALL_TRIGGERS, DATASETS, N_SHARDS, REPO_ROOT, output_of, pipeline_config, snakemake,
                          succeeded)
from tiny_config import (INDEXABLE_N_PIXELS, INDEXABLE_PIXEL_SIZE_MM, N_PIXELS, N_SHOTS, SHARED_DATA_DIR,
                         SHOTS_PER_SHARD, indexable_config, tiny_config, write_config)

#: Slow tier (make test-fast leaves it out): the small config run to completion, then reruns on it.
pytestmark = pytest.mark.slow


# --- tiny config and helpers -------------------------------------------------------------------------


JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


def planned_jobs(output):
    """(rule, wildcards) of every job a dry run lists, e.g. ("simulate", (("index", "00002"),)).

    Cross-checked against the "Job stats" table, so a change in Snakemake's output format fails
    loudly instead of silently planning nothing.
    """
    jobs, current = [], None
    for line in output.splitlines():
        header = JOB_HEADER.match(line)
        if header:
            current = [header.group(1), ()]
            jobs.append(current)
        elif current is not None and (match := WILDCARDS.match(line)):
            current[1] = tuple(tuple(item.split("=", 1)) for item in match.group(1).split(", "))
        elif not line.startswith((" ", "\t")):
            current = None
    jobs = [tuple(job) for job in jobs]
    assert Counter(rule for rule, _ in jobs) == job_stats(output), output
    return jobs


def dry_run(workdir, configfile):
    """Jobs a dry run with every rerun trigger plans, as a set of (rule, wildcards)."""
    return set(planned_jobs(succeeded(snakemake(workdir, configfile, "--dry-run", *ALL_TRIGGERS))))


def shard_job(index):
    return ("simulate", (("index", f"{index:05d}"),))


def stills_jobs(stage, shards):
    """The index or reindex jobs of `shards` in both datasets."""
    return {(stage, (("dataset", dataset), ("index", f"{index:05d}"))) for dataset in DATASETS for index in shards}


def per_dataset_jobs(*rules):
    """The jobs of per-dataset `rules` in both datasets."""
    return {(rule, (("dataset", dataset),)) for rule in rules for dataset in DATASETS}


#: The per-dataset stages after reindex, in stage order: each one's jobs rerun when an earlier one reruns.
MERGE_STAGES = ("tdata", "covariance", "merge", "dials_merge", "score_merge", "annulus")
#: The per-shard pixel refinements and their per-dataset scores, which follow the annulus.
PIXEL_REFINEMENTS = ("stage1", "exa")
PIXEL_SCORES = ("score_stage1", "score_exa")
#: SPREAD (per dataset), which follows the pixel refinement spread.refinement chose, and its score.
SPREAD_STAGES = ("spread", "score_spread")
#: The report's own figures (rules/report.smk), which read shard 0 of index and reindex.
REPORT_FIGURES = ("plot_shot", "plot_detector_refinement")


def pixel_refinement_jobs(n_shards=N_SHARDS):
    """Jobs that follow a new annulus selection: both pixel refinements of every shard, their scores, SPREAD."""
    shard_jobs = {(rule, (("dataset", dataset), ("index", f"{index:05d}")))
                  for rule in PIXEL_REFINEMENTS for dataset in DATASETS for index in range(n_shards)}
    return shard_jobs | per_dataset_jobs(*PIXEL_SCORES, *SPREAD_STAGES)


def metrology_and_after(n_shards=N_SHARDS):
    """Jobs that follow a new detector refinement: metrology, every reindex job, the cell analysis,
    merging, the annulus, the pixel refinements, the scores and the report's figures."""
    return (per_dataset_jobs("metrology", "score_dials", *MERGE_STAGES, *REPORT_FIGURES)
            | stills_jobs("reindex", range(n_shards))
            | pixel_refinement_jobs(n_shards))


def index_and_after(shards, n_shards=N_SHARDS):
    """Jobs that follow new index output for `shards`."""
    return stills_jobs("index", shards) | metrology_and_after(n_shards)


def hitfind_jobs(shards):
    """Jobs that follow new images in `shards`: their hitfind measurements, then the run's threshold
    (which rewrites every shard's hits table, so every shard is indexed again) and its score."""
    measured = {("hitfind_shard", (("dataset", dataset), ("index", f"{index:05d}")))
                for dataset in DATASETS for index in shards}
    return measured | per_dataset_jobs("hitfind", "powder", "score_hitfind")


def settings_job(stage):
    return ("stage_settings", (("stage", stage),))


ALL_JOB = ("all", ())


# --- a completed run, shared by the tests that inspect or extend it -----------------------------------




def test_end_to_end_outputs_logs_and_benchmarks(completed_run):
    workdir, configfile = completed_run
    results, logs = workdir / "results", workdir / "logs"
    n_shards = N_SHOTS // SHOTS_PER_SHARD

    for name in REFERENCE_NAMES:
        assert (workdir / "resources" / "reference" / name).read_bytes() == (SHARED_DATA_DIR / name).read_bytes()
        assert (logs / "reference" / f"{name}.log").is_file()
    for stage in ("structure_factors", "simulate"):
        assert (results / "settings" / f"{stage}.yaml").is_file()
        assert (logs / "settings" / f"{stage}.log").is_file()
    assert (results / "structure_factors" / "amplitudes.h5").is_file()
    assert (logs / "structure_factors.log").is_file()
    assert (logs / "benchmarks" / "structure_factors.tsv").is_file()

    nominal_centre_mm = INDEXABLE_N_PIXELS * INDEXABLE_PIXEL_SIZE_MM / 2
    for index in range(n_shards):
        shots = list(range(index * SHOTS_PER_SHARD, (index + 1) * SHOTS_PER_SHARD))
        for dataset in ("nopsf", "psf"):
            metadata = read_shard_metadata(results / "sim" / dataset / f"shard_{index:05d}.h5")
            assert metadata.dataset == dataset
            assert metadata.n_shots == SHOTS_PER_SHARD
            assert metadata.shot_index.tolist() == shots
            assert metadata.detector["beam_center_mm"] == pytest.approx((nominal_centre_mm, nominal_centre_mm))
            assert (metadata.detector["n_fast"], metadata.detector["n_slow"]) == (INDEXABLE_N_PIXELS,) * 2
        truth = json.loads((results / "sim" / "truth" / f"shard_{index:05d}.json").read_text())
        assert [shot["shot_index"] for shot in truth["shots"]] == shots
        for shot in truth["shots"]:
            assert shot["true_beam_center_offset_px"] == pytest.approx([0.5, 0.5])
            assert shot["nominal_beam_center_mm"] == pytest.approx([nominal_centre_mm, nominal_centre_mm])
            assert shot["true_beam_center_mm"] == pytest.approx([nominal_centre_mm + 0.5 * INDEXABLE_PIXEL_SIZE_MM] * 2)
        assert (logs / "simulate" / f"shard_{index:05d}.log").is_file()
        assert (logs / "benchmarks" / "simulate" / f"shard_{index:05d}.tsv").is_file()
    assert not (results / "sim" / "nopsf" / f"shard_{n_shards:05d}.h5").exists()
    # Every write is atomic: no temporary file is left behind anywhere.
    assert not [path for path in workdir.rglob("*.partial")]
    # ... and the DIALS stages' scratch directories are gone.
    assert not [path for path in workdir.rglob("*.work")]
    assert not (results / "metrology" / "nopsf" / "work").exists()


def test_dials_stages_index_refine_the_detector_and_reindex_with_it(completed_run):
    from dxtbx.model.experiment_list import ExperimentList

    from xfel_spread.io.stills import OUTPUT_SUFFIXES, read_shots_table

    workdir, _ = completed_run
    results, logs = workdir / "results", workdir / "logs"
    for dataset in DATASETS:
        summary = json.loads((results / "metrology" / dataset / "summary.json").read_text())
        assert summary["n_lattices"] == N_SHOTS
        assert "before" in (results / "metrology" / dataset / "report.txt").read_text()
        metrology = results / "metrology" / dataset
        assert len(ExperimentList.from_file(str(metrology / "refined_detector.expt"),
                                            check_format=False).detectors()) == 1
        residuals = {(row["stage"], row["panel"]): row for row in csv_rows(metrology / "residuals.tsv")}
        assert float(residuals["after", "all"]["rmsd_px"]) < float(residuals["before", "all"]["rmsd_px"])
        for stage in ("before", "after"):
            assert (metrology / f"residuals_{stage}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (logs / "metrology" / f"{dataset}.log").is_file()
        assert (logs / "benchmarks" / "metrology" / f"{dataset}.tsv").is_file()

        for stage in ("index", "reindex"):
            for index in range(N_SHARDS):
                prefix = results / stage / dataset / f"shard_{index:05d}"
                rows = read_shots_table(f"{prefix}_shots.tsv")
                assert [row["shot"] for row in rows] == list(range(index * SHOTS_PER_SHARD, (index + 1) * SHOTS_PER_SHARD))
                assert {row["status"] for row in rows} == {"integrate_ok"}, rows
                experiments = ExperimentList.from_file(f"{prefix}_integrated.expt", check_format=False)
                assert len(experiments) == SHOTS_PER_SHARD
                origin = experiments[0].detector[0].get_origin()
                # index uses the nominal detector of the image files; reindex the refined one.
                expected = summary["before" if stage == "index" else "after"]["panels"][0]["origin_mm"]
                assert origin == pytest.approx(expected, abs=1e-6)
                assert all(Path(f"{prefix}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES.values())
                assert "shots done" in (logs / stage / dataset / f"shard_{index:05d}.log").read_text()
                assert (logs / "benchmarks" / stage / dataset / f"shard_{index:05d}.tsv").is_file()

        score = {row["pass"]: row for row in csv_rows(results / "score" / f"dials_{dataset}.tsv")}
        assert float(score["index"]["indexed_fraction"]) == 1.0
        # The images' header centre is 0.5 px off the truth; the refined detector is closer.
        assert float(score["index"]["beam_centre_error_fast_px"]) == pytest.approx(-0.5)
        for axis in ("fast", "slow"):
            assert abs(float(score["reindex"][f"beam_centre_error_{axis}_px"])) < 0.25
        assert (logs / "score" / f"dials_{dataset}.log").read_text().startswith("DIALS stages scored")
        assert (results / "score" / f"dials_{dataset}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hitfind_calls_every_simulated_shot_a_hit_and_draws_the_powder_pattern(completed_run):
    workdir, _ = completed_run
    results, logs = workdir / "results", workdir / "logs"
    for dataset in DATASETS:
        for index in range(N_SHARDS):
            rows = csv_rows(results / "hitfind" / dataset / f"shard_{index:05d}_hits.tsv")
            assert [int(row["shot"]) for row in rows] == list(range(index * SHOTS_PER_SHARD, (index + 1) * SHOTS_PER_SHARD))
            assert {row["is_hit"] for row in rows} == {"1"}, rows
            assert (logs / "hitfind" / dataset / f"shard_{index:05d}.log").is_file()
            assert (results / "hitfind" / dataset / f"shard_{index:05d}_powder.npz").is_file()
        summary = json.loads((results / "hitfind" / dataset / "summary.json").read_text())
        assert summary["n_hits"] == N_SHOTS and summary["threshold_rule"] == "floor"
        powder_summary = json.loads((results / "hitfind" / dataset / "powder.json").read_text())
        assert powder_summary["n_shots"] == N_SHOTS and 1.9 < powder_summary["ring_q_inv_a"] < 2.1  # water
        powder = np.load(results / "hitfind" / dataset / "powder.npy")
        assert powder.shape == (INDEXABLE_N_PIXELS, INDEXABLE_N_PIXELS)
        assert len(csv_rows(results / "hitfind" / dataset / "ring_peaks.tsv")) == N_SHOTS
        assert csv_rows(results / "hitfind" / dataset / "powder_radial.tsv")
        for plot in ("powder.png", "shots.png"):
            assert (results / "hitfind" / dataset / plot).read_bytes()[:4] == b"\x89PNG"
        score = {row["quantity"]: row["value"] for row in csv_rows(results / "score" / f"hitfind_{dataset}.tsv")}
        assert float(score["accuracy"]) == 1.0 and int(score["true_hits"]) == N_SHOTS
        assert float(score["profile_correlation_with_model"]) > 0.99


def test_cell_analysis_merging_and_annulus_for_both_datasets(completed_run):
    from dials.array_family import flex
    from iotbx import mtz

    from xfel_spread.cells.covariance import read_covariance

    workdir, _ = completed_run
    results, logs = workdir / "results", workdir / "logs"
    png_signature = b"\x89PNG\r\n\x1a\n"
    for dataset in DATASETS:
        tdata = (results / "cells" / f"{dataset}.tdata").read_text().splitlines()
        assert len(tdata) == N_SHOTS
        for line in tdata:
            *cell, symbol = line.split()
            assert symbol == "C12/m1"
            assert [float(value) for value in cell] == pytest.approx([67.2, 59.8, 47.2, 90, 110.3, 90], abs=0.5)
        cluster = read_covariance(results / "cells" / f"{dataset}_covariance.pickle", 0)
        assert cluster.n_members == N_SHOTS and cluster.features == ("a", "b", "c")
        assert (results / "cells" / f"{dataset}_clusters.png").read_bytes()[:8] == png_signature

        merge_dir = results / "merge" / dataset
        lattices = csv_rows(merge_dir / "lattices.tsv")
        assert len(lattices) == N_SHOTS
        accepted = [row for row in lattices if row["accepted"] == "1"]
        assert accepted and all(row["reason"] == "" for row in accepted)
        merged = mtz.object(str(merge_dir / "merged.mtz"))
        labels = set(merged.column_labels())
        assert {"IMEAN", "SIGIMEAN", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)"} <= labels
        assert str(merged.space_group_info()) == "C 1 2 1"
        assert merged.n_reflections() > 100
        statistics = csv_rows(merge_dir / "statistics.tsv")
        assert len(statistics) == 20 + 1  # the bins and the overall row
        summary = json.loads((merge_dir / "summary.json").read_text())
        assert summary["lattices_read"] == N_SHOTS and summary["accepted"] == len(accepted)
        assert (merge_dir / "statistics.png").read_bytes()[:8] == png_signature
        assert set(mtz.object(str(merge_dir / "dials" / "merged.mtz")).column_labels()) >= {"IMEAN", "I(+)", "I(-)"}

        scores = {row["comparison"]: row for row in csv_rows(results / "score" / f"merge_{dataset}.tsv")
                  if row["bin"] == "overall"}
        assert set(scores) == {"ours vs truth", "DIALS vs truth", "ours vs DIALS"}
        assert float(scores["ours vs truth"]["cc"]) > 0.5

        annulus = json.loads((results / "annulus" / dataset / "summary.json").read_text())
        total = annulus["total"]
        assert 0 < total["lattices"] <= len(accepted)
        assert total["shoeboxes"] > 0 and total["shoebox_pixels"] > 0
        selected = [flex.reflection_table.from_file(str(results / "annulus" / dataset / f"shard_{index:05d}_annulus.refl"))
                    for index in range(N_SHARDS)]
        assert sum(len(table) for table in selected) == total["shoeboxes"]
        for table in selected:
            d = table["d"].as_numpy_array()
            assert ((d >= 2.1) & (d < 2.5)).all()

        for log in (f"cells/tdata_{dataset}", f"cells/covariance_{dataset}", f"merge/{dataset}",
                    f"merge/dials_{dataset}", f"score/merge_{dataset}", f"annulus/{dataset}"):
            assert (logs / f"{log}.log").stat().st_size > 0, log


def test_pixel_refinements_cover_every_annulus_lattice(completed_run):
    from dxtbx.model.experiment_list import ExperimentList

    workdir, _ = completed_run
    results, logs = workdir / "results", workdir / "logs"
    for dataset in DATASETS:
        for refinement in ("stage1", "exa"):
            for index in range(N_SHARDS):
                annulus = ExperimentList.from_file(
                    str(results / "annulus" / dataset / f"shard_{index:05d}_annulus.expt"), check_format=False)
                prefix = results / refinement / dataset / f"shard_{index:05d}"
                rows = csv_rows(f"{prefix}_shots.tsv")
                assert [row["identifier"] for row in rows] == list(annulus.identifiers())
                refined = ExperimentList.from_file(f"{prefix}_refined.expt", check_format=False)
                assert list(refined.identifiers()) == list(annulus.identifiers())
                for row in rows:
                    if row["converged"] == "1":
                        assert float(row["rmsd_overall_after_px"]) >= 0 and int(row["iterations"]) >= 1
                    else:
                        assert row["reason"], row
                # The psf dataset's images were spread by the detector; the refinement models it there.
                expected_psf = ("fiber, FWHM 0.08 mm, kernel radius 10 px" if dataset == "psf" else "none modelled")
                log = (logs / refinement / dataset / f"shard_{index:05d}.log").read_text()
                assert f"detector point spread: {expected_psf}" in log
                assert (logs / "benchmarks" / refinement / dataset / f"shard_{index:05d}.tsv").is_file()
            scores = csv_rows(results / "score" / f"{refinement}_{dataset}.tsv")
            assert len(scores) == sum(len(csv_rows(results / refinement / dataset / f"shard_{index:05d}_shots.tsv"))
                                      for index in range(N_SHARDS))
            assert (results / "score" / f"{refinement}_{dataset}.png").read_bytes()[:4] == b"\x89PNG"


def test_spread_fits_every_dataset_with_its_controls(completed_run):
    workdir, _ = completed_run
    results, logs = workdir / "results", workdir / "logs"
    for dataset in DATASETS:
        prefix = results / "spread" / dataset / "spread"
        summary = json.loads(Path(f"{prefix}_summary.json").read_text())
        converged = sum(row["converged"] == "1" for index in range(N_SHARDS)
                        for row in csv_rows(results / "exa" / dataset / f"shard_{index:05d}_shots.tsv"))
        assert summary["settings"]["refinement"] == "exa" and 0 < summary["lattices"] <= converged
        assert summary["controls_run"] == ["miller_l_plus_1", "shuffled_channels"]
        table = csv_rows(f"{prefix}_fp_fdp.tsv")
        assert len(table) == summary["grid_ev"][2]
        for site in ("FE1", "FE2"):
            for part in ("fp", "fdp"):
                values = [float(row[f"{site}_{part}"]) for row in table]
                sigmas = [float(row[f"{site}_{part}_sigma"]) for row in table]
                assert np.isfinite(values).all() and (np.asarray(sigmas) > 0).all()
        edges = csv_rows(f"{prefix}_edges.tsv")
        assert [row["site"] for row in edges] == ["FE1", "FE2"]
        assert all(7070 <= float(row["half_rise_ev"]) <= 7170 and float(row["half_rise_sigma_ev"]) > 0
                   for row in edges)
        scales = csv_rows(f"{prefix}_scales.tsv")
        assert len(scales) == summary["lattices"] and all(np.isfinite(float(row["scale"])) for row in scales)
        scores = csv_rows(results / "score" / f"spread_{dataset}.tsv")
        assert {row["fit"] for row in scores} == {"start", "spread", "miller_l_plus_1", "shuffled_channels"}
        assert all(np.isfinite(float(row["fdp_rms_error_e"])) for row in scores)
        assert (results / "score" / f"spread_{dataset}.png").read_bytes()[:4] == b"\x89PNG"
        assert "the sites' difference" in (results / "score" / f"spread_{dataset}.txt").read_text()
        assert (logs / "benchmarks" / "spread" / f"{dataset}.tsv").is_file()


def csv_rows(path):
    import csv

    with open(path, newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def test_dry_run_on_a_fresh_directory_lists_every_stage(tmp_path):
    configfile = write_config(tmp_path / "small.yaml", indexable_config(tmp_path))
    jobs = planned_jobs(succeeded(snakemake(tmp_path, configfile, "--dry-run")))

    assert Counter(rule for rule, _ in jobs) == {
        "reference_data": len(REFERENCE_NAMES), "stage_settings": 11, "structure_factors": 1,
        "hitfind_shard": 2 * N_SHARDS, "hitfind": 2, "powder": 2, "score_hitfind": 2,
        "simulate": N_SHARDS, "index": 2 * N_SHARDS, "metrology": 2, "reindex": 2 * N_SHARDS,
        "score_dials": 2, **{rule: 2 for rule in MERGE_STAGES}, **{rule: 2 * N_SHARDS for rule in PIXEL_REFINEMENTS},
        **{rule: 2 for rule in PIXEL_SCORES}, **{rule: 2 for rule in REPORT_FIGURES},
        **{rule: 2 for rule in SPREAD_STAGES}, "all": 1}
    assert {wildcards for rule, wildcards in jobs if rule == "stage_settings"} == {
        (("stage", stage),) for stage in ("structure_factors", "simulate", "metrology", "cells", "merge",
                                          "dials_merge", "annulus", "stage1", "spread", "hitfind_shard",
                                          "hitfind")}
    assert {wildcards for rule, wildcards in jobs if rule == "reference_data"} == {
        (("name", name),) for name in REFERENCE_NAMES}
    # A dry run plans; it writes no results.
    assert not (tmp_path / "results").exists()


def test_pixel_metrology_is_planned_per_dataset_only_when_enabled(tmp_path):
    """Off by default (the test above plans no pixel_metrology job); enabled, one job per dataset after stage 1
    of every shard, with its own settings file, and nothing else changes."""
    default = Counter(rule for rule, _ in planned_jobs(succeeded(snakemake(
        tmp_path, write_config(tmp_path / "default.yaml", indexable_config(tmp_path)), "--dry-run"))))
    config = indexable_config(tmp_path)
    config["pixel_metrology"] = {"enabled": True, "max_lattices": 50}
    jobs = planned_jobs(succeeded(snakemake(tmp_path, write_config(tmp_path / "on.yaml", config), "--dry-run")))
    assert "pixel_metrology" not in default
    assert Counter(rule for rule, _ in jobs) - default == {"pixel_metrology": 2, "stage_settings": 1}
    assert {wildcards for rule, wildcards in jobs if rule == "pixel_metrology"} == {
        (("dataset", dataset),) for dataset in DATASETS}
    assert (("stage", "pixel_metrology"),) in {wildcards for rule, wildcards in jobs if rule == "stage_settings"}


# --- rerun semantics (dry runs against the completed run) ----------------------------------------------


def test_unchanged_config_plans_nothing(completed_run):
    workdir, configfile = completed_run
    assert dry_run(workdir, configfile) == set()


@pytest.mark.parametrize("simulate_change", [{"seed": 7}, {"beam": {"total_photons": 5.0e11}}],
                         ids=["seed", "total_photons"])
def test_simulation_setting_reruns_simulation_only(completed_run, tmp_path, simulate_change):
    workdir, _ = completed_run
    configfile = write_config(tmp_path / "changed.yaml", pipeline_config(workdir, **simulate_change))
    assert dry_run(workdir, configfile) == {
        settings_job("simulate"), shard_job(0), shard_job(1), ALL_JOB} | index_and_after(range(N_SHARDS)) \
        | hitfind_jobs(range(N_SHARDS))


def test_structure_factor_setting_reruns_structure_factors_and_simulation(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["structure_factors"] = {"k_sol": 0.35}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {
        settings_job("structure_factors"), settings_job("simulate"), settings_job("spread"), ("structure_factors", ()),
        shard_job(0), shard_job(1), ALL_JOB} | index_and_after(range(N_SHARDS)) | hitfind_jobs(range(N_SHARDS))


def test_shots_per_shard_reruns_the_shards_whose_shots_changed(completed_run, tmp_path):
    workdir, _ = completed_run
    configfile = write_config(tmp_path / "changed.yaml", pipeline_config(workdir, shots_per_shard=3))
    assert dry_run(workdir, configfile) == {shard_job(0), shard_job(1), ALL_JOB} | index_and_after(range(N_SHARDS)) \
        | hitfind_jobs(range(N_SHARDS))


def test_index_phil_edit_reruns_index_and_what_follows_nothing_upstream(completed_run):
    workdir, configfile = completed_run
    phil = workdir / "index.phil"
    original_text, original_stat = phil.read_text(), phil.stat()
    try:
        phil.write_text(original_text.replace("min_spot_size = 3", "min_spot_size = 4"))
        assert dry_run(workdir, configfile) == {ALL_JOB} | index_and_after(range(N_SHARDS))
    finally:
        phil.write_text(original_text)
        os.utime(phil, ns=(original_stat.st_atime_ns, original_stat.st_mtime_ns))
    assert dry_run(workdir, configfile) == set()


def test_metrology_setting_reruns_metrology_and_what_follows(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["metrology"] = {"max_lattices": 2}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("metrology"), ALL_JOB} | metrology_and_after()


def test_saved_detector_reruns_metrology_and_what_follows(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    saved = workdir / "results" / "metrology" / "nopsf" / "refined_detector.expt"
    config["metrology"] = {"reference_geometry": str(saved)}
    result = snakemake(workdir, write_config(tmp_path / "own_output.yaml", config), "--dry-run")
    assert result.returncode != 0
    assert f"metrology.reference_geometry: {saved} is written by this run's metrology" in output_of(result)

    copy = tmp_path / "saved_detector.expt"
    copy.write_bytes(saved.read_bytes())
    config["metrology"] = {"reference_geometry": str(copy)}
    configfile = write_config(tmp_path / "saved.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("metrology"), ALL_JOB} | metrology_and_after()


def test_cell_clustering_setting_reruns_covariance_and_what_follows_not_tdata(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["cells"]["eps"] = 0.3
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("cells"), ALL_JOB} | per_dataset_jobs(
        "covariance", "merge", "dials_merge", "score_merge", "annulus") | pixel_refinement_jobs()


def test_merge_setting_reruns_merge_cross_check_scores_and_annulus(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["merge"]["d_min"] = 2.0
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("merge"), settings_job("dials_merge"), ALL_JOB} | \
        per_dataset_jobs("merge", "dials_merge", "score_merge", "annulus") | pixel_refinement_jobs()


def test_cross_check_setting_reruns_the_cross_check_and_its_score_only(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["merge"]["dials_crosscheck"] = {"max_lattices": 3}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("dials_merge"), ALL_JOB} | per_dataset_jobs(
        "dials_merge", "score_merge")


def test_annulus_setting_reruns_the_annulus_and_the_pixel_refinements(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["annulus"] = {"d_min": 2.2}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("annulus"), ALL_JOB} | per_dataset_jobs("annulus") | \
        pixel_refinement_jobs()


def test_stage1_setting_reruns_the_pixel_refinements_only(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["stage1"]["readout_sigma_adu"] = 2.0
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("stage1"), settings_job("spread"), ALL_JOB} | \
        pixel_refinement_jobs()


def test_spread_setting_reruns_spread_and_its_score_only(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["spread"] = {"kk_weight": 5.0}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("spread"), ALL_JOB} | per_dataset_jobs(*SPREAD_STAGES)


def test_hit_threshold_setting_reruns_the_threshold_and_indexing_not_the_measurements(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["hitfind"] = {"lit_pixel_floor": 3}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("hitfind"), ALL_JOB} \
        | per_dataset_jobs("hitfind", "score_hitfind") | index_and_after(range(N_SHARDS))


def test_lit_pixel_setting_reruns_the_measurements_too(completed_run, tmp_path):
    workdir, _ = completed_run
    config = pipeline_config(workdir)
    config["hitfind"] = {"lit_pixel_sigma": 7.0}
    configfile = write_config(tmp_path / "changed.yaml", config)
    assert dry_run(workdir, configfile) == {settings_job("hitfind_shard"), ALL_JOB} \
        | hitfind_jobs(range(N_SHARDS)) | index_and_after(range(N_SHARDS))


def test_hitfind_disabled_plans_no_hitfind_job(tmp_path):
    config = indexable_config(tmp_path)
    config["hitfind"] = {"enabled": False}
    jobs = planned_jobs(succeeded(snakemake(tmp_path, write_config(tmp_path / "small.yaml", config), "--dry-run")))
    rules = Counter(rule for rule, _ in jobs)
    assert not {"hitfind_shard", "hitfind", "powder", "score_hitfind"} & set(rules)
    assert rules["index"] == 2 * N_SHARDS and rules["stage_settings"] == 9


def test_more_shots_add_only_the_new_shard_and_keep_the_old_ones(completed_run, tmp_path):
    workdir, _ = completed_run
    configfile = write_config(tmp_path / "more.yaml", pipeline_config(workdir, n_shots=N_SHOTS + 2))
    # The new shard is simulated and measured (the old ones' measurements are kept); the run's hit
    # threshold is chosen again, so every shard is indexed again (and the detector refined again, so
    # every shard is reindexed).
    after_the_new_shard = {ALL_JOB} | hitfind_jobs([2]) | index_and_after(range(N_SHARDS + 1), N_SHARDS + 1)
    assert dry_run(workdir, configfile) == {shard_job(2)} | after_the_new_shard

    old_shards = sorted((workdir / "results" / "sim").glob("*/shard_0000[01].*"))
    assert len(old_shards) == 6
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in old_shards}
    # Only what the new shard needs: its simulation. What follows it is the same jobs as planned above,
    # which the other tests run already; here they would redo the science of every shard.
    new_shard = [workdir / "results" / "sim" / name
                 for name in ("nopsf/shard_00002.h5", "psf/shard_00002.h5", "truth/shard_00002.json")]
    succeeded(snakemake(workdir, configfile, *new_shard))
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in old_shards} == before
    metadata = read_shard_metadata(workdir / "results" / "sim" / "psf" / "shard_00002.h5")
    assert metadata.shot_index.tolist() == [4, 5]
    # The new shard is done and nothing before it is redone: what remains is exactly what follows it.
    assert dry_run(workdir, configfile) == after_the_new_shard


# --- failures before any work, and a failing job ---------------------------------------------------------


def test_missing_saved_detector_stops_before_any_work(tmp_path):
    config = indexable_config(tmp_path)
    config["metrology"] = {"reference_geometry": "saved/refined_detector.expt"}
    result = snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "--dry-run")

    assert result.returncode != 0
    lines = [line for line in output_of(result).splitlines() if "reference_geometry" in line]
    assert lines == ["Config error: bad.yaml: metrology.reference_geometry: saved/refined_detector.expt: no such file"]


@pytest.mark.parametrize(
    "simulate_change, key",
    [({"detector": {"n_fast": N_PIXELS, "n_slow": N_PIXELS, "pixel_sise_mm": 0.6}}, "simulate.detector.pixel_sise_mm"),
     ({"detector": {"n_fast": N_PIXELS, "n_slow": N_PIXELS, "pixel_size_mm": -0.6}}, "simulate.detector.pixel_size_mm")],
    ids=["unknown_key", "negative_pixel_size"])
def test_bad_config_stops_before_any_work(tmp_path, simulate_change, key):
    configfile = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, **simulate_change))
    result = snakemake(tmp_path, configfile)

    assert result.returncode != 0
    assert "Traceback" not in output_of(result)
    lines = [line for line in output_of(result).splitlines() if key in line]
    assert len(lines) == 1, output_of(result)
    assert re.fullmatch(rf"Config error: bad\.yaml: {re.escape(key)}: .+", lines[0]), lines[0]
    for directory in ("results", "logs", "resources"):
        assert not (tmp_path / directory).exists()


def test_phil_with_unknown_parameter_stops_before_any_work(tmp_path):
    phil = tmp_path / "index.phil"
    phil.write_text((REPO_ROOT / "config" / "index.phil").read_text() + "spotfinder.filter.min_spot_sise = 3\n")
    config = pipeline_config(tmp_path)
    result = snakemake(tmp_path, write_config(tmp_path / "small.yaml", config))

    assert result.returncode != 0
    assert "Traceback" not in output_of(result)
    lines = [line for line in output_of(result).splitlines() if "min_spot_sise" in line]
    assert lines == [f"Phil error: {phil}: unknown parameter for dials.stills_process: "
                     f"spotfinder.filter.min_spot_sise (line {len(phil.read_text().splitlines())})"]
    for directory in ("results", "logs", "resources"):
        assert not (tmp_path / directory).exists()


def test_dense_engine_with_too_many_lattices_stops_before_any_work(tmp_path):
    config = indexable_config(tmp_path)
    config["metrology"] = {"engine": "LevMar", "max_lattices": 30000}
    result = snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "--dry-run")

    assert result.returncode != 0
    lines = [line for line in output_of(result).splitlines() if "max_lattices" in line]
    assert len(lines) == 1 and lines[0].startswith("Config error: bad.yaml: metrology.max_lattices: 30000 "), lines


def test_missing_mirror_file_stops_before_any_work_naming_it(tmp_path):
    mirror = tmp_path / "empty_mirror"
    mirror.mkdir()
    config = tiny_config(tmp_path)
    config["reference"]["mirror_dir"] = str(mirror)
    result = snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", config))

    # The mirror copies are the reference jobs' inputs, so Snakemake refuses to plan them at all.
    assert result.returncode != 0
    assert "MissingInputException" in output_of(result)
    assert str(mirror / "1m2a.pdb") in output_of(result)
    for directory in ("results", "logs", "resources"):
        assert not (tmp_path / directory).exists()


def test_corrupt_mirror_file_fails_its_job_with_one_line_in_the_log(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in REFERENCE_NAMES:
        (mirror / name).symlink_to(SHARED_DATA_DIR / name)
    (mirror / "1m2a.pdb").unlink()
    (mirror / "1m2a.pdb").write_text("HEADER    NOT THE 1M2A MODEL\n")
    config = tiny_config(tmp_path)
    config["reference"]["mirror_dir"] = str(mirror)
    result = snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", config))

    assert result.returncode != 0
    log = (tmp_path / "logs" / "reference" / "1m2a.pdb.log").read_text()
    assert log.count("\n") == 1, log
    assert log.startswith(f"spread-fetch-reference: error: 1m2a.pdb: sha256 mismatch for the copy from {mirror / '1m2a.pdb'}")
    assert not (tmp_path / "resources" / "reference" / "1m2a.pdb").exists()
    assert not (tmp_path / "results" / "structure_factors").exists()
    assert not (tmp_path / "results" / "sim").exists()
