"""The DIALS stages at a glance: one figure per dataset, written by the scoring step.

Three panels: misorientation to the truth for both passes, the beam centre before and after
metrology against the true one, and a shot with the reindex pass's predicted spots over the image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_path
from xfel_spread.dials.stills import INTEGRATED
from xfel_spread.io.stills import output_paths, read_shots_table


def predicted_and_observed_px(integrated_experiments: Path, integrated_reflections: Path, image: int,
                              with_panel: bool = False):
    """(predicted, observed) spot centres in px (x, y, each in its own panel's frame) of the lattice of
    ``image``, or None if it has none; with ``with_panel`` also each spot's panel (predicted, observed,
    panel)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(integrated_experiments), check_format=False)
    ids = [i for i, experiment in enumerate(experiments) if experiment.imageset.indices()[0] == image]
    if not ids:
        return None
    reflections = flex.reflection_table.from_file(str(integrated_reflections))
    lattice = reflections.select(reflections["id"] == ids[0])
    predicted = np.array(lattice["xyzcal.px"])[:, :2]
    observed = np.array(lattice["xyzobs.px.value"])[:, :2] if "xyzobs.px.value" in lattice else np.empty((0, 2))
    if with_panel:
        return predicted, observed, np.array(lattice["panel"], dtype=np.int64)
    return predicted, observed


def laid_out(image: np.ndarray, detector: dict, spots: tuple | None):
    """A shot ready to draw: a one-panel ``image`` and ``spots`` (predicted, observed) as they are; a
    multi-panel image (n_panels, n_slow, n_fast) as one picture of its panels at their laboratory
    positions (:class:`xfel_spread.plotting.PanelLayout`, from the shard's ``detector`` attributes),
    with ``spots`` (predicted, observed, panel) moved onto it. Returns (image, (predicted, observed) or None)."""
    from xfel_spread.plotting import PanelLayout

    if image.ndim == 2:
        return image, (None if spots is None else spots[:2])
    layout = PanelLayout(detector, image.shape)
    if spots is not None:
        predicted, observed, panel = spots
        spots = (layout.to_picture(panel, predicted), layout.to_picture(panel[:len(observed)], observed))
    return layout.picture(image), spots


def plot_dials_summary(path, dataset: str, misorientations: dict[str, Sequence[float]],
                       beam_centre_px: dict[str, Sequence[float]], image: np.ndarray | None,
                       spots: tuple[np.ndarray, np.ndarray] | None, shot: int | None) -> None:
    """Write the three-panel figure to ``path`` (PNG), atomically.

    ``misorientations`` maps a pass name to its lattices' misorientations (deg); ``beam_centre_px``
    maps "nominal", "refined" and "true" to (fast, slow) beam centres in px.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, middle, right) = pyplot.subplots(1, 3, figsize=(16, 5.2))
    figure.suptitle(f"DIALS stages against the simulation's truth, dataset {dataset}")

    for name, values in misorientations.items():
        values = np.sort(np.asarray(values, dtype=float))
        if len(values):
            left.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                      label=f"{name} (median {np.median(values):.3f} deg)")
    left.set_xlabel("misorientation to truth (deg)")
    left.set_ylabel("fraction of lattices")
    left.set_xscale("log")
    left.legend()

    true_centre = np.asarray(beam_centre_px["true"], dtype=float)
    for name, marker in (("nominal", "s"), ("refined", "o"), ("true", "*")):
        offset = np.asarray(beam_centre_px[name], dtype=float) - true_centre
        middle.plot(offset[0], offset[1], marker, markersize=12, label=f"{name} ({offset[0]:+.3f}, {offset[1]:+.3f})")
    middle.axhline(0, color="0.8", zorder=0)
    middle.axvline(0, color="0.8", zorder=0)
    middle.set_xlabel("beam centre - true, fast (px)")
    middle.set_ylabel("beam centre - true, slow (px)")
    middle.set_aspect("equal", adjustable="datalim")
    middle.legend(title="metrology")

    if image is not None and spots is not None:
        predicted, observed = spots
        background = np.percentile(image, 50)
        right.imshow(np.clip(image - background, 0, None), cmap="gray_r",
                     vmax=max(np.percentile(image - background, 99.9), 1.0), origin="upper")
        right.scatter(observed[:, 0], observed[:, 1], s=60, facecolors="none", edgecolors="tab:blue",
                      linewidths=0.8, label="observed")
        right.scatter(predicted[:, 0], predicted[:, 1], s=12, marker="+", color="tab:red", linewidths=0.8,
                      label="predicted (reindex)")
        right.set_title(f"shot {shot}: {len(predicted)} integrated reflections")
        right.legend(loc="upper right", fontsize="small")
    else:
        right.text(0.5, 0.5, "no integrated shot in the first shard", ha="center", va="center")
    right.set_xlabel("fast (px)")
    right.set_ylabel("slow (px)")

    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)


def plot_pipeline_outputs(path, dataset: str, lattices_by_pass: dict, metrology_summary: dict, reindex_prefix,
                          image_shard, truth_path) -> None:
    """:func:`plot_dials_summary` from the stages' files: the scored lattices of each pass, the metrology
    summary, and the first integrated shot of the reindex pass's first shard (``reindex_prefix``), whose
    image is read from ``image_shard`` and whose truth file gives the true beam centre."""
    from xfel_spread.io.shard import read_shard_image, read_shard_metadata

    first_shard = output_paths(reindex_prefix)
    integrated = [row for row in read_shots_table(first_shard["shots"]) if row["status"] == INTEGRATED]
    image = spots = shot = None
    if integrated:
        shot = integrated[0]["shot"]
        image = read_shard_image(image_shard, integrated[0]["image"], multi_panel=True)
        spots = predicted_and_observed_px(first_shard["integrated_experiments"],
                                          first_shard["integrated_reflections"], integrated[0]["image"],
                                          with_panel=True)
        image, spots = laid_out(image, read_shard_metadata(image_shard, multi_panel=True).detector, spots)
    true_mm = np.array(json.loads(Path(truth_path).read_text())["shots"][0]["true_beam_center_mm"])
    pixel_mm = np.array(metrology_summary["before"]["panels"][0]["pixel_size_mm"])
    centres = {"nominal": metrology_summary["before"]["panels"][0]["beam_centre_px"],
               "refined": metrology_summary["after"]["panels"][0]["beam_centre_px"], "true": list(true_mm / pixel_mm)}
    misorientations = {name: [lattice.misorientation_deg for lattice in lattices]
                       for name, lattices in lattices_by_pass.items()}
    plot_dials_summary(path, dataset, misorientations, centres, image, spots, shot)
