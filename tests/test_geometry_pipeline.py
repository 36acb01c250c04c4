"""The pipeline on a simulated multi-panel detector read from a file (simulate.detector.geometry): the
real CSPAD's 64-panel geometry, taken from one of its CBFs in CSPAD_DIR, rendered by the simulator and run
by Snakemake through hit finding, dials.stills_process, metrology, reindex and the report's shot figure
(nopsf). The panels are moved by up to 1 px each and the beam by 0.5 px. Stage 1 on 64 panels under
Snakemake is tested on the real CSPAD stills (tests/test_cspad_pipeline.py); a run of this config through
stage 1 and SPREAD is in docs/multipanel.md."""

import json

import numpy as np
import pytest
import yaml
from conftest import CSPAD_DIR
from pipeline_run import snakemake, succeeded
from tiny_config import tiny_config

from xfel_spread.dials.stills import INTEGRATED
from xfel_spread.io.stills import read_shots_table

#: Slow tier: Snakemake runs the simulator, hit finding, dials.stills_process and metrology.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CSPAD_DIR.is_dir(), reason="needs ../shared/data/real/thermolysin_cspad")]


def test_a_cspad_geometry_runs_through_hit_finding_and_dials(tmp_path):
    config = tiny_config(tmp_path, n_shots=4, shots_per_shard=4,
                         background={"water_thickness_mm": 0.025, "air_path_mm": 2.5})
    config["simulate"]["detector"] = {"geometry": str(sorted(CSPAD_DIR.glob("*.cbf"))[0]),
                                      "tiles": {"shift_px": 1.0, "seed": 4}, "psf_fwhm_mm": 0.1, "psf_radius_px": 3}
    config.update({"hitfind": {"enabled": True}})
    configfile = tmp_path / "cspad_geometry.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    results = tmp_path / "results"
    targets = [results / "score" / "hitfind_nopsf.tsv", results / "score" / "dials_nopsf.tsv",
               results / "report" / "nopsf_shot.png", results / "hitfind" / "nopsf" / "powder.png"]
    succeeded(snakemake(tmp_path, configfile, *map(str, targets)))

    # Hit finding over the 64 panels: every shot a hit, the powder kept per panel.
    score = dict(line.split(None, 1) for line in (results / "score" / "hitfind_nopsf.txt").read_text().splitlines()[1:])
    assert float(score["accuracy"]) == 1.0 and int(score["true_hits"]) == 4
    assert np.load(results / "hitfind" / "nopsf" / "powder.npy").shape == (64, 185, 194)
    # DIALS indexes and integrates every shot on the 64 panels.
    assert [row["status"] for row in read_shots_table(results / "index" / "nopsf" / "shard_00000_shots.tsv")] == [INTEGRATED] * 4
    # Metrology (level 0) moves the beam centre towards the truth: 0.5 px off before.
    rows = {row.split("\t")[0]: row.split("\t") for row in (results / "score" / "dials_nopsf.tsv").read_text().splitlines()}
    header = rows["pass"]
    error = {name: np.hypot(float(rows[name][header.index("beam_centre_error_fast_px")]),
                            float(rows[name][header.index("beam_centre_error_slow_px")])) for name in ("index", "reindex")}
    assert error["index"] == pytest.approx(np.hypot(0.5, 0.5), abs=0.01) and error["reindex"] < 0.5 * error["index"]
    assert (results / "report" / "nopsf_shot.png").read_bytes().startswith(b"\x89PNG")
    truth = json.loads((results / "sim" / "truth" / "shard_00000.json").read_text())["shots"][0]
    assert len(truth["true_tile_origin_mm"]) == 64
