"""A tiled shard through DIALS and stage 1's read path, against the same shots on one panel.

The indexable test config (tests/tiny_config.py: 1536 x 1536 px of 0.176 mm), 2 shots, simulated
on ``--tiles`` x ``--tiles`` tiles (``simulate.detector.tiles``, 4 px gaps; 1: the single panel);
dials.stills_process (``run_stills_process``, config/index.phil) on the nopsf shard; its integrated
files opened as an annulus pair (``open_annulus_shard``, ``read_lattices``: the shard's per-panel
image and dxtbx's multi-panel detector); the 40 strongest strong shoeboxes refined with the default
settings and the model's amplitudes. Metrology is skipped, so the start keeps the nominal beam
centre (0.5 px off the truth). Printed: outcomes, ROIs and their panels, misorientation of DIALS's
and stage 1's crystal to the truth, strong-spot RMSDs.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/multipanel_through_dials.py WORKDIR [--tiles 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    from sim_fixtures import ly99_amplitudes
    from tiny_config import indexable_config

    from xfel_spread.config import load_config
    from xfel_spread.dials.pipeline import run_stills_process
    from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations
    from xfel_spread.sim.forward import AmplitudeLookup
    from xfel_spread.sim.shard import setup_from_config, simulate_shard
    from xfel_spread.sim.structure_factors import expand_to_p1_grid, save_channel_amplitudes
    from xfel_spread.stage1.model import Stage1Settings
    from xfel_spread.stage1.refine import refine_shot
    from xfel_spread.stage1.rois import open_annulus_shard, read_lattices, select_rois

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--tiles", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(arguments.workdir)
    out.mkdir(parents=True, exist_ok=True)
    table = ly99_amplitudes()
    amplitudes = out / "amplitudes.h5"
    save_channel_amplitudes(table, amplitudes)
    config = indexable_config(seed=2, n_shots=2, shots_per_shard=2)
    config["simulate"]["detector"]["tiles"] = {"fast": arguments.tiles, "slow": arguments.tiles,
                                               "gap_px": 4 if arguments.tiles > 1 else 0}
    config["hitfind"] = {"enabled": False}
    config = load_config(config)
    paths = {dataset: str(out / f"{dataset}.h5") for dataset in ("nopsf", "psf")}
    simulate_shard(setup_from_config(config, str(amplitudes)), 0, 2, paths, str(out / "truth.json"))
    prefix = out / "index"
    outcomes = run_stills_process(paths["nopsf"], (0, 2), [str(REPO / "config" / "index.phil")], str(prefix))
    print("stills_process:", [outcome.as_row() for outcome in outcomes])
    for suffix in ("expt", "refl"):
        shutil.copy(f"{prefix}_integrated.{suffix}", f"{prefix}_annulus.{suffix}")
    annulus = open_annulus_shard(prefix, paths["nopsf"])
    print(f"detector: {len(annulus.experiments[0].detector)} panel(s)")
    lookup = AmplitudeLookup(expand_to_p1_grid(table), "cpu")
    truth = json.loads((out / "truth.json").read_text())["shots"]
    rotations = point_group_rotations("C 1 2 1")
    errors = []
    for lattice, shot, _ in read_lattices(annulus, range(annulus.n_lattices), 12,
                                          lambda lattice, error: errors.append((lattice, repr(error)))):
        signal = np.bincount(shot.pixel_roi, shot.data_photons - shot.background_photons, minlength=shot.n_rois)
        keep = np.zeros(shot.n_rois, dtype=bool)
        keep[np.argsort(signal)[::-1][:40]] = True
        shot = select_rois(shot, keep & shot.strong)
        panels = sorted(set(shot.roi_panel.tolist())) if shot.roi_panel is not None else [0]
        fit = refine_shot(shot, lookup, Stage1Settings.from_config({}))
        true = np.array(truth[shot.image_index]["real_space_a_b_c"])
        print(f"lattice {lattice}: {shot.n_rois} ROIs on panels {panels}; converged {fit.converged} {fit.reason}, "
              f"{fit.seconds:.1f} s; misorientation DIALS {misorientation_deg(fit.start_real_space_matrix, true, rotations):.4f}"
              f" -> stage 1 {misorientation_deg(fit.real_space_matrix, true, rotations):.4f} deg; strong RMSD "
              f"{fit.strong_rmsd_px_start:.3f} -> {fit.strong_rmsd_px:.3f} px")
    print("errors:", errors)


if __name__ == "__main__":
    main()
