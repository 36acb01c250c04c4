"""Stage 1 on the nanoBragg stills, scored against the orientation their mosaic domains encode.

``../shared/data/external/nanobragg`` holds eight stills written by the nanoBragg program, with
``truth.json`` giving each crystal's real-space matrix. Each image also has 10 mosaic domains of 0.05
deg that nanoBragg drew from ``-mosaic_seed`` (in ``make.log``) and did not write down. Against the
crystal matrix alone, no refinement can do better than the domains' mean lies from it (about
0.05 / sqrt(10) deg): the CI test of these stills found stage 1 at a median 0.017 deg, DIALS at 0.019.

This script draws the domains again, from each image's seed, with nanoBragg's own generator
(``sim.crystal.nanobragg_seeded_mosaic_rotations``: its ``ran1`` and ``mosaic_rotation_umat``), turns
them into DIALS's frame, and scores each refined crystal against the domains' mean orientation as the
simulation's lattices are scored (``stage1.scoring.turned_by_mean``; misorientation over C2's
rotations). A wrong draw would leave the refined crystals as far from its mean as from the crystal
matrix, so the drop of the figures is itself the check of the draw.

Printed per image: DIALS's index and reindex passes and each stage-1 output given, against the crystal
matrix and the domains' mean; eta against the domains' RMS angle about their mean; N (truth 57).

Measured 2026-12-07 on the 2-core VM: ``config/examples/nanobragg.yaml`` merged over
``config/config.yaml`` (stage 1 against the model's |F|, each image's 20 channels put on its 100), three
stage-1 runs on the same annulus: the schema's crystal model; the analytic eta; eta with 25 free domains
(two starts). Misorientation medians (deg), against the crystal matrix | against the domains' mean:

| | index | reindex | default | eta | free domains |
| --- | --- | --- | --- | --- | --- |
| crystal matrix | 0.0731 | 0.0189 | 0.0117 | 0.0113 | 0.0098 |
| domains' mean | 0.0700 | 0.0149 | 0.0065 | 0.0067 | 0.0059 |

The domains' mean lies 0.0023-0.0177 deg (median 0.0073) from the crystal matrix. Every stage-1 run is
closer than DIALS's reindex to the domains' mean on 8 of 8 lattices and converges on 8 of 8. Median N
37, 37, 44 (default), 49, 46, 52 (eta), 60, 68, 61 (free domains; two lattices' Nb 147 and 206), truth 57;
eta 0.031-0.044 deg (analytic) and 0.039-0.054 (free domains) against the domains' RMS angle 0.036-0.044;
seconds per lattice median 0.4, 1.2 and 7.4 (free domains 5.2-20.5), two ranks on the two cores.

With ``--detector``, refined detectors against the origin nanoBragg drew the pattern with (its
``DIALS_ORIGIN``; dxtbx's header origin is half a pixel off in both directions). Measured 2026-12-07 on the
same run: DIALS's level-0 metrology (8 lattices) left the beam centre +0.0051, -0.0417 px and the distance
+0.022 mm off; ``spread-pixel-metrology`` from it, run by hand on the default stage 1's 8 lattices with the run's
stage-1 settings (``pixel_metrology``'s defaults), -0.0051, -0.0044 px and -0.003 mm against the model's
|F|, and +0.0066, -0.0016 px and -0.006 mm against the merge's (each about 100 s on the two cores).

Usage (after a run of ``config/examples/nanobragg.yaml`` to stage 1; ``--stage1`` as often as there
are stage-1 outputs to compare, each a directory with ``shard_0000N_refined.expt`` and ``_shots.tsv``)::

    .venv/bin/python benchmarks/stage1_nanobragg_truth.py --results results_nanobragg \\
        [--stage1 default=results_nanobragg/stage1/images] [--stage1 domains=copy/of/another/run] \\
        [--detector metrology=results_nanobragg/metrology/images/refined_detector.expt]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from xfel_spread.dials.scoring import misorientation_deg, point_group_rotations
from xfel_spread.io.refined_shots import read_refined_shots
from xfel_spread.sim import crystal as xtal
from xfel_spread.stage1.scoring import mean_rotation, turned_by_mean

NANOBRAGG_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "external" / "nanobragg"
#: The stills' pixel (mm): a 4x4-binned Rayonix MX340.
NANOBRAGG_PIXEL_MM = 0.176


def mosaic_seeds(make_log: Path) -> dict[str, int]:
    """Each image's ``-mosaic_seed`` from nanoBragg's command lines in ``make.log``, by image file."""
    seeds = {}
    for line in make_log.read_text().splitlines():
        seed, image = re.search(r"-mosaic_seed (\d+)", line), re.search(r"-noisefile (\S+)", line)
        if seed and image:
            seeds[Path(image.group(1)).name + ".gz"] = int(seed.group(1))
    return seeds


def crystals_by_image(path: Path) -> dict[int, tuple[str, np.ndarray]]:
    """(identifier, real-space matrix) of each experiment, by its image's index in the shard."""
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(path), check_format=False)
    return {experiment.imageset.indices()[0]: (experiment.identifier, np.array(
        [list(vector) for vector in experiment.crystal.get_real_space_vectors()])) for experiment in experiments}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="output_dir of the nanoBragg run")
    parser.add_argument("--stage1", action="append", default=[], metavar="LABEL=DIR",
                        help="a stage-1 output directory to score (default: the run's own)")
    parser.add_argument("--detector", action="append", default=[], metavar="LABEL=EXPT",
                        help="a refined detector (metrology's or pixel metrology's experiment list) to score "
                             "against the origin nanoBragg drew the pattern with")
    parser.add_argument("--nanobragg-dir", type=Path, default=NANOBRAGG_DIR)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shots-per-shard", type=int, default=4)
    arguments = parser.parse_args()
    stage1_dirs = dict(item.split("=", 1) for item in arguments.stage1) or {
        "stage1": str(arguments.results / "stage1" / "images")}

    truth = json.loads((arguments.nanobragg_dir / "truth.json").read_text())["images"]
    seeds = mosaic_seeds(arguments.nanobragg_dir / "make.log")
    point_group = point_group_rotations("C 1 2 1")
    columns = ["index", "reindex", *stage1_dirs]
    rows = []
    for shard in range(arguments.shards):
        passes = {stage: crystals_by_image(arguments.results / stage / "images" / f"shard_{shard:05d}_integrated.expt")
                  for stage in ("index", "reindex")}
        refined = {label: (crystals_by_image(Path(directory) / f"shard_{shard:05d}_refined.expt"),
                           {row["identifier"]: row for row in read_refined_shots(
                               Path(directory) / f"shard_{shard:05d}_shots.tsv")})
                   for label, directory in stage1_dirs.items()}
        for image in range(arguments.shots_per_shard):
            image_truth = truth[shard * arguments.shots_per_shard + image]
            rotations = xtal.nanobragg_seeded_domains_dials(int(image_truth["mosaic_domains"]),
                                                            float(image_truth["mosaic_spread_deg"]),
                                                            seeds[image_truth["file"]])
            matrix = np.array(image_truth["real_space_a_b_c_dials_frame"])
            mean = turned_by_mean(matrix, rotations)
            rms = xtal.rms_rotation_deg(rotations @ mean_rotation(rotations).T)
            row = {"file": image_truth["file"], "seed": seeds[image_truth["file"]], "rms_deg": rms,
                   "mean_to_matrix_deg": misorientation_deg(mean, matrix, point_group)}
            estimates = {stage: passes[stage].get(image) for stage in ("index", "reindex")}
            for label, (crystals, shots) in refined.items():
                estimates[label] = crystals.get(image)
                if estimates[label] is not None:
                    shot = shots[estimates[label][0]]
                    row[f"{label}_eta"] = shot["eta_deg"]
                    row[f"{label}_N"] = (shot["Na"], shot["Nb"], shot["Nc"])
                    row[f"{label}_converged"] = shot["converged"]
                    row[f"{label}_seconds"] = shot["seconds"]
            for label, estimate in estimates.items():
                if estimate is not None:
                    row[f"{label}_matrix"] = misorientation_deg(estimate[1], matrix, point_group)
                    row[f"{label}_mean"] = misorientation_deg(estimate[1], mean, point_group)
            rows.append(row)

    print("misorientation (deg) against the crystal matrix | against the domains' mean orientation")
    print(f"{'image':18s} {'mean-matrix':>11s} " + " ".join(f"{c:>9s}" for c in columns) + " | "
          + " ".join(f"{c:>9s}" for c in columns))
    for row in rows:
        print(f"{row['file']:18s} {row['mean_to_matrix_deg']:11.4f} "
              + " ".join(_cell(row, f"{c}_matrix") for c in columns) + " | "
              + " ".join(_cell(row, f"{c}_mean") for c in columns))
    print(f"{'median':18s} {np.median([r['mean_to_matrix_deg'] for r in rows]):11.4f} "
          + " ".join(_median(rows, f"{c}_matrix") for c in columns) + " | "
          + " ".join(_median(rows, f"{c}_mean") for c in columns))
    score_detectors(dict(item.split("=", 1) for item in arguments.detector), truth[0])
    for label in stage1_dirs:
        closer = [row[f"{label}_mean"] < row["reindex_mean"] for row in rows
                  if f"{label}_mean" in row and "reindex_mean" in row]
        print(f"{label}: closer than DIALS's reindex to the domains' mean on {sum(closer)} of {len(closer)}; "
              f"converged {sum(bool(row.get(f'{label}_converged')) for row in rows)} of {len(rows)}")
        print("  eta (deg) against the domains' RMS angle about their mean: "
              + ", ".join(f"{row.get(f'{label}_eta', float('nan')):.4f}/{row['rms_deg']:.4f}" for row in rows))
        ncells = np.array([row[f"{label}_N"] for row in rows if f"{label}_N" in row])
        seconds = np.array([row[f"{label}_seconds"] for row in rows if f"{label}_seconds" in row])
        if len(ncells):
            print(f"  median Na, Nb, Nc {', '.join(f'{value:.1f}' for value in np.median(ncells, axis=0))} "
                  f"(truth 57); seconds per lattice median {np.median(seconds):.1f} "
                  f"({seconds.min():.1f}-{seconds.max():.1f})")


def score_detectors(detectors: dict[str, str], image_truth: dict) -> None:
    """Each refined detector's origin against nanoBragg's (``true_detector_origin_dials_mm``, the same for
    every image): the beam-centre error in pixels (fast = -x, slow = +y) and the distance error (mm)."""
    from dxtbx.model.experiment_list import ExperimentList

    true_origin = np.array(image_truth["true_detector_origin_dials_mm"])
    origins = {"header (dxtbx)": np.array(image_truth["dxtbx_detector_origin_mm"])}
    for label, path in detectors.items():
        origins[label] = np.array(ExperimentList.from_file(path, check_format=False)[0].detector[0].get_origin())
    for label, origin in origins.items():
        error, pixel = origin - true_origin, NANOBRAGG_PIXEL_MM
        print(f"detector {label}: beam centre error fast {-error[0] / pixel:+.4f} px, slow {error[1] / pixel:+.4f} px, "
              f"distance {-error[2]:+.4f} mm")


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:9.4f}" if key in row else f"{'-':>9s}"


def _median(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows if key in row]
    return f"{np.median(values):9.4f}" if values else f"{'-':>9s}"


if __name__ == "__main__":
    main()
