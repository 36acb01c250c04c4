"""The three real LCLS CXI thermolysin stills on the 64-tile CSPAD (CSPAD_DIR; monochromatic, no spectra,
no model of the crystal) through Snakemake with config/examples/thermolysin_cspad.yaml, as far as three
images allow: hit finding over the 64 panels, index and reindex with the example's phil (the known
symmetry P 61 2 2), metrology, cells (a and c), the merge against the data, the annulus and stage 1 in the
crystal's own hexagonal cell with |F| from that merge, and the report's shot figure."""

import json

import numpy as np
import pytest
import yaml
from conftest import CSPAD_DIR, REPO_ROOT
from pipeline_run import snakemake, succeeded

from xfel_spread.dials.stills import INTEGRATED
from xfel_spread.io.refined_shots import read_refined_shots
from xfel_spread.io.stills import read_shots_table

#: Slow tier: Snakemake runs hit finding, dials.stills_process twice, metrology, the merge and stage 1.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CSPAD_DIR.is_dir(), reason="needs the CSPAD stills")]


@pytest.fixture(scope="module")
def cspad_run(tmp_path_factory):
    """The example config (paths made absolute, outputs in a scratch directory) run to stage 1 and the shot
    figure (its default target adds the batched refinement, which repeats stage 1, and more figures)."""
    workdir = tmp_path_factory.mktemp("cspad")
    config = yaml.safe_load((REPO_ROOT / "config/examples/thermolysin_cspad.yaml").read_text())
    config["input"]["images"] = [str(CSPAD_DIR / "*.cbf")]
    config["index"]["phil"] = str(REPO_ROOT / config["index"]["phil"])
    config["output_dir"], config["log_dir"] = str(workdir / "results"), str(workdir / "logs")
    configfile = workdir / "thermolysin.yaml"
    configfile.write_text(yaml.safe_dump(config))
    targets = [str(workdir / "results" / path) for path in ("hitfind/images/powder.json", "stage1/images/shard_00000_shots.tsv",
                                              "report/images_shot.png")]
    succeeded(snakemake(workdir, configfile, *targets))
    return workdir / "results"


def test_every_still_is_a_hit_over_the_64_panels(cspad_run):
    rows = (cspad_run / "hitfind/images/shard_00000_hits.tsv").read_text().splitlines()
    table = [dict(zip(rows[0].split("\t"), row.split("\t"))) for row in rows[1:]]
    # As measured in-process in an earlier session: 7861, 8536 and 8251 lit pixels. A pixel right at the
    # threshold may count or not with another summation order (another CPU's vector width): 0.2 % slack.
    assert [int(row["lit_pixels"]) for row in table] == pytest.approx([7861, 8536, 8251], rel=0.002)
    assert [row["is_hit"] for row in table] == ["1", "1", "1"]
    assert np.load(cspad_run / "hitfind/images/powder.npy").shape == (64, 185, 194)
    # One radial profile over the 64 panels, each pixel from its own panel's frame: the solvent ring of the
    # powder (measured 1.8171 1/A, d 3.46 A) inside the searched range.
    powder = json.loads((cspad_run / "hitfind/images/powder.json").read_text())
    assert powder["n_shots"] == 3 and 1.5 < powder["ring_q_inv_a"] < 2.5 and powder["ring_intensity"] > 0
    assert (cspad_run / "hitfind/images/powder.png").stat().st_size > 0


def test_every_still_indexes_in_p6122_with_the_known_cell(cspad_run):
    from cctbx import sgtbx
    from dxtbx.model.experiment_list import ExperimentList

    for stage in ("index", "reindex"):
        assert [row["status"] for row in read_shots_table(cspad_run / f"{stage}/images/shard_00000_shots.tsv")] == [
            INTEGRATED] * 3
    patterson = sgtbx.space_group_info("P 61 2 2").group().build_derived_patterson_group()
    experiments = ExperimentList.from_file(str(cspad_run / "index/images/shard_00000_integrated.expt"), check_format=False)
    assert len(experiments) == 3
    for experiment in experiments:
        # stills_process gives crystals the Patterson group of the known symmetry.
        assert experiment.crystal.get_space_group() == patterson
        cell = np.array(experiment.crystal.get_unit_cell().parameters())
        assert cell == pytest.approx([93.4, 93.4, 131.2, 90, 90, 120], rel=0.01)


def test_stage1_refines_the_hexagonal_lattices_on_their_own_panels(cspad_run):
    """Stage 1 reads the 64-panel image list (boxes on their reflections' panels, pixel values from the
    CBFs through dxtbx), keeps each crystal hexagonal (b = a, gamma 120) and converges on every lattice; on
    the lattices with strong annulus spots the strong-spot RMSD drops."""
    from dxtbx.model.experiment_list import ExperimentList

    from xfel_spread.io.shard import read_shard_image
    from xfel_spread.stage1.rois import open_annulus_shard, shot_pixels

    shots = read_refined_shots(cspad_run / "stage1/images/shard_00000_shots.tsv")
    assert len(shots) == 3 and all(shot["converged"] for shot in shots), [shot["reason"] for shot in shots]
    strong = [shot for shot in shots if shot["rmsd_overall_strong_before_px"] is not None]
    assert len(strong) >= 2
    for shot in strong:
        assert shot["rmsd_overall_strong_after_px"] < shot["rmsd_overall_strong_before_px"]
    assert all(shot["b"] == shot["a"] and shot["beta_deg"] == pytest.approx(90.0) for shot in shots)
    refined = ExperimentList.from_file(str(cspad_run / "stage1/images/shard_00000_refined.expt"), check_format=False)
    for experiment in refined:
        a, b, c, alpha, beta, gamma = experiment.crystal.get_unit_cell().parameters()
        assert b == pytest.approx(a, rel=1e-9) and gamma == pytest.approx(120.0, abs=1e-6)

    annulus = open_annulus_shard(cspad_run / "annulus/images/shard_00000", cspad_run / "images/images/shard_00000.h5")
    image_adu = read_shard_image(annulus.shard_path, annulus.image_index(0), multi_panel=True)
    assert image_adu.shape == (64, 185, 194)
    shot, counts = shot_pixels(annulus, 0, image_adu, 12)
    assert len(set(shot.roi_panel.tolist())) > 10
    # The CBF's panels have gain 1 and pedestal 0: photons are its ADU values.
    assert np.array_equal(shot.data_photons, image_adu[shot.pixel_panel, shot.pixel_slow, shot.pixel_fast])
    assert np.all(shot.pixel_panel == shot.roi_panel[shot.pixel_roi]) and shot.trusted.mean() > 0.5


def test_the_shot_figure_draws_the_64_panels(cspad_run):
    assert (cspad_run / "report/images_shot.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_of_the_image_run_says_there_is_no_truth(cspad_run, tmp_path):
    """`snakemake --report` of the run: the figures the data alone give (the shot, the detector refinement's
    residuals, the cell clusters), the statement that nothing is scored against a truth, and no score."""
    import re

    workdir = cspad_run.parent
    path = tmp_path / "report.html"
    targets = [str(cspad_run / name) for name in ("hitfind/images/powder.json", "stage1/images/shard_00000_shots.tsv",
                                                   "report/images_shot.png")]
    succeeded(snakemake(workdir, workdir / "thermolysin.yaml", *targets, "--report", str(path)))
    html = path.read_text()
    match = re.search(r'<script id="categories">\s*var \w+ = (.*?);\s*</script>', html, re.DOTALL)
    assert match, "no categories block in the report"
    categories = json.loads(match.group(1))
    figures = {name for subcategories in categories.values() for names in subcategories.values() for name in names}
    assert "1. Shots (images from elsewhere)" in categories
    assert str(cspad_run / "report/images_shot.png") in figures
    assert str(cspad_run / "metrology/images/residuals_after.png") in figures
    assert str(cspad_run / "cells/images_clusters.png") in figures
    assert not any("/score/" in name for name in figures), sorted(figures)
    description = re.search(r'<script id="workflow-desc">\s*var \w+ = (.*?);\s*</script>', html, re.DOTALL)
    assert "No truth: these data were not simulated" in re.sub(r"\s+", " ", json.loads(description.group(1)))
