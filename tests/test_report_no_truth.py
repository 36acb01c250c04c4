"""The report's figures of images from elsewhere that stand in for the score rules' (no truth): a pixel
refinement's RMSDs and Z-scores from its shots tables, and SPREAD's curves with their 1-sigma bands. Drawn
from small hand-written tables through the commands the rules run (`python -m xfel_spread.cli.report`)."""

import json

import numpy as np

from xfel_spread.cli.report import main
from xfel_spread.io.refined_shots import write_refined_shots


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_refinement_figure_reads_only_the_shots_tables(tmp_path):
    rows = [{"shot": i, "image": i, "identifier": f"id{i}", "converged": int(i < 3), "reason": "",
             "rmsd_radial_strong_before_px": 0.5 + i, "rmsd_radial_strong_after_px": 0.2 + i,
             "rmsd_overall_before_px": 1.0, "rmsd_overall_after_px": 0.6, "zscore_sigma_before": 1.4,
             "zscore_sigma": 1.1} for i in range(4)]
    write_refined_shots(rows[:2], tmp_path / "shard_00000_shots.tsv")
    write_refined_shots(rows[2:], tmp_path / "shard_00001_shots.tsv")
    plot = tmp_path / "images_stage1.png"
    status = main(["refinement", "--dataset", "images", "--refinement", "stage1", "--shots",
                   str(tmp_path / "shard_00000_shots.tsv"), "--shots", str(tmp_path / "shard_00001_shots.tsv"),
                   "--plot", str(plot)])
    assert status == 0 and is_png(plot)


def test_the_spread_figure_draws_the_fit_without_a_truth(tmp_path):
    grid = np.arange(7100.0, 7110.0)
    columns = {"energy_ev": grid}
    for site in ("FE1", "FE2"):
        columns |= {f"{site}_fp": -2 + 0 * grid, f"{site}_fdp": 1 + 0 * grid, f"{site}_fp_sigma": 0.1 + 0 * grid,
                    f"{site}_fdp_sigma": 0.1 + 0 * grid, f"{site}_fp_start": -1.5 + 0 * grid,
                    f"{site}_fdp_start": 0.8 + 0 * grid}
    controls = {"energy_ev": grid, **{f"shuffled_{site}_{part}": 0 * grid for site in ("FE1", "FE2")
                                      for part in ("fp", "fdp")}}
    prefix = tmp_path / "spread"
    for suffix, table in (("_fp_fdp.tsv", columns), ("_controls.tsv", controls)):
        np.savetxt(f"{prefix}{suffix}", np.column_stack(list(table.values())), delimiter="\t",
                   header="\t".join(table), comments="")
    (tmp_path / "spread_summary.json").write_text(json.dumps({"lattices": 8}))
    plot = tmp_path / "images_spread.png"
    assert main(["spread", "--dataset", "images", "--prefix", str(prefix), "--plot", str(plot)]) == 0
    assert is_png(plot)


def test_the_shot_figure_reads_an_image_list_shards_pixels_through_dxtbx(tmp_path, monkeypatch):
    """plot_shot's function on a nanoBragg image-list shard (no pixels in the shard; dxtbx reads the file it
    names). The reindex pass is left out (no integrated shot: the shard's first shot, no predictions)."""
    from conftest import NANOBRAGG_DIR

    from xfel_spread.io.images import list_images, make_image_list_shard
    from xfel_spread.report import plots

    shard = tmp_path / "shard_00000.h5"
    make_image_list_shard(shard, list_images([str(NANOBRAGG_DIR / "image_00[0-1].img.gz")]), 0, "table",
                          str(NANOBRAGG_DIR / "spectra.tsv"))
    monkeypatch.setattr(plots, "first_integrated_shot", lambda prefix: None)
    plot = tmp_path / "images_shot.png"
    assert plots.plot_shot_from_files(plot, "images", tmp_path / "reindex_shard_00000", shard) == 0
    assert is_png(plot)
