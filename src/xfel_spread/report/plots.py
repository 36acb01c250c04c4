"""Two figures for the Snakemake report, read from the DIALS stages' files.

* :func:`plot_shot_with_predictions`: one simulated shot, log-scaled, with the spots the reindex pass
  predicts for its lattice (``xyzcal.px`` of its integrated reflections) overlaid.
* :func:`plot_detector_refinement`: observed-minus-predicted centroids of the indexed spots in the
  index pass (nominal detector) and the reindex pass (detector refined by metrology): the detector
  refinement before and after, seen in the data it was refined against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfel_spread import plotting
from xfel_spread.dials.plots import laid_out, predicted_and_observed_px
from xfel_spread.dials.stills import INTEGRATED
from xfel_spread.io.shard import read_shard_image, read_shard_metadata
from xfel_spread.io.stills import output_paths, read_shots_table



# --- a shot with its predicted spots --------------------------------------------------------------------

#: Most image pixels a side drawn in the shot figure: its axes are about 700 screen pixels wide, so each
#: drawn pixel (a block's maximum) stays at least one screen pixel and no spot is dropped in resampling.
SHOT_FIGURE_SIDE = 400


def image_photons(image_adu: np.ndarray, detector: dict) -> np.ndarray:
    """Pixel values in photons: ADU minus the ADC offset, over the gain (readout noise can go below 0)."""
    offset, gain = (np.asarray(detector[key], dtype=np.float64) for key in ("adc_offset_adu", "gain_adu_per_photon"))
    if image_adu.ndim == 3:  # per-panel values where the panels differ
        offset, gain = (value.reshape(-1, 1, 1) if value.ndim else value for value in (offset, gain))
    return (image_adu.astype(np.float64) - offset) / gain


def block_maximum(image: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """``image`` reduced to at most ``max_side`` pixels a side by the maximum of square blocks, and the
    block size. A figure shows a 3840-pixel panel on a few hundred screen pixels: averaging would wash
    out spots a few pixels wide, the block maximum keeps each one visible."""
    block = max(1, -(-max(image.shape) // max_side))
    n_slow, n_fast = -(-image.shape[0] // block), -(-image.shape[1] // block)
    padded = np.full((n_slow * block, n_fast * block), -np.inf)
    padded[:image.shape[0], :image.shape[1]] = image
    return padded.reshape(n_slow, block, n_fast, block).max(axis=(1, 3)), block


def first_integrated_shot(reindex_prefix) -> dict | None:
    """The shots-table row of the first shot the reindex pass integrated in this shard, or None."""
    rows = read_shots_table(output_paths(reindex_prefix)["shots"])
    return next((row for row in rows if row["status"] == INTEGRATED), None)


def plot_shot_with_predictions(path, dataset: str, photons: np.ndarray, predicted_px: np.ndarray | None,
                               shot: int, n_panels: int = 1) -> None:
    """Write one shot's image (photons, log colour scale) with ``predicted_px`` (x, y) spots overlaid.
    A multi-panel shot (``n_panels`` > 1) comes laid out as one picture (``dials.plots.laid_out``)."""
    from matplotlib.colors import LogNorm

    pyplot = plotting.pyplot()
    figure, axes = pyplot.subplots(figsize=(9, 8.4))
    shown, block = block_maximum(photons, SHOT_FIGURE_SIDE)
    # The colour scale starts at the median (the background) so that spots stand out from it.
    low = max(float(np.median(photons)), 0.5)
    norm = LogNorm(vmin=low, vmax=max(float(shown.max()), 2 * low))
    image = axes.imshow(np.clip(shown, low, None), cmap="magma", norm=norm, origin="upper", interpolation="nearest",
                        extent=(0, shown.shape[1] * block, shown.shape[0] * block, 0))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02,
                    label=f"photons, log scale (maximum of {block} x {block} pixel blocks)")
    if predicted_px is not None:
        axes.scatter(predicted_px[:, 0], predicted_px[:, 1], s=40, facecolors="none", edgecolors="cyan",
                     linewidths=0.7, label=f"predicted by the reindex pass ({len(predicted_px)})")
        axes.legend(loc="upper right", fontsize="small")
        axes.set_title(f"dataset {dataset}, shot {shot}: image and predicted spots")
    else:
        axes.set_title(f"dataset {dataset}, shot {shot}: not integrated by the reindex pass")
    if n_panels > 1:
        axes.set_xlabel(f"laboratory x (px): {n_panels} panels at their positions seen along the beam")
        axes.set_ylabel("laboratory -y (px)")
    else:
        axes.set_xlabel("fast (px)")
        axes.set_ylabel("slow (px)")
    plotting.save_png(figure, path)


def plot_shot_from_files(path, dataset: str, reindex_prefix, shard_path) -> int:
    """:func:`plot_shot_with_predictions` for the first shot of ``shard_path`` that the reindex pass
    (output ``reindex_prefix``) integrated, or the shard's first shot when it integrated none.
    Returns the shot drawn."""
    metadata = read_shard_metadata(shard_path, multi_panel=True)
    row = first_integrated_shot(reindex_prefix)
    image = row["image"] if row is not None else 0
    spots = None
    if row is not None:
        files = output_paths(reindex_prefix)
        spots = predicted_and_observed_px(files["integrated_experiments"], files["integrated_reflections"], image,
                                          with_panel=True)
    photons = image_photons(read_shard_image(shard_path, image, multi_panel=True), metadata.detector)
    panels = 1 if photons.ndim == 2 else len(photons)
    photons, spots = laid_out(photons, metadata.detector, spots)
    shot = int(metadata.shot_index[image])
    plot_shot_with_predictions(path, dataset, photons, None if spots is None else spots[0], shot, panels)
    return shot


# --- detector refinement before and after ---------------------------------------------------------------


@dataclass
class CentroidResiduals:
    """Observed minus predicted spot centroids (px, fast and slow) of one pass over one shard."""

    by_image: dict[int, np.ndarray]  # image in the shard -> (n_spots, 2)

    @property
    def all(self) -> np.ndarray:
        return np.concatenate(list(self.by_image.values())) if self.by_image else np.empty((0, 2))

    def rmsd_by_image(self) -> dict[int, float]:
        return {image: float(np.sqrt((values ** 2).sum(axis=1).mean())) for image, values in self.by_image.items()
                if len(values)}


def centroid_residuals(prefix) -> CentroidResiduals:
    """Residuals of the indexed spots (``_indexed.refl``) of a stills pass's shard against the predictions
    of its refined lattices (``_refined.expt``), grouped by image."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    files = output_paths(prefix)
    experiments = ExperimentList.from_file(str(files["refined_experiments"]), check_format=False)
    reflections = flex.reflection_table.from_file(str(files["indexed_reflections"]))
    by_image: dict[int, np.ndarray] = {}
    if len(reflections) == 0:
        return CentroidResiduals(by_image)
    residuals = (np.array(reflections["xyzobs.px.value"]) - np.array(reflections["xyzcal.px"]))[:, :2]
    ids = np.array(reflections["id"])
    for experiment_id, experiment in enumerate(experiments):
        image = experiment.imageset.indices()[0]
        selected = residuals[ids == experiment_id]
        by_image[image] = np.concatenate((by_image[image], selected)) if image in by_image else selected
    return CentroidResiduals(by_image)


def _rmsd(values: np.ndarray) -> float:
    return float(np.sqrt((values ** 2).sum(axis=1).mean())) if len(values) else float("nan")


def plot_detector_refinement(path, dataset: str, before: CentroidResiduals, after: CentroidResiduals) -> None:
    """Three panels: the residuals of both passes in the detector plane with their means, the
    distribution of their lengths, and each shot's RMSD after against before (below the diagonal:
    better with the refined detector)."""
    pyplot = plotting.pyplot()
    figure, (plane, lengths, per_shot) = pyplot.subplots(1, 3, figsize=(16, 5.2))
    figure.suptitle(f"Detector refinement, dataset {dataset}: indexed spots, observed - predicted centroid")
    passes = (("index (nominal detector)", before, "tab:orange"), ("reindex (refined detector)", after, "tab:blue"))

    for name, residuals, colour in passes:
        values = residuals.all
        plane.scatter(values[:, 0], values[:, 1], s=4, alpha=0.3, color=colour, label=name)
        if len(values):
            mean = values.mean(axis=0)
            plane.plot(*mean, marker="X", markersize=12, markeredgecolor="black", color=colour,
                       label=f"mean ({mean[0]:+.3f}, {mean[1]:+.3f}) px")
    plane.axhline(0, color="0.7", zorder=0)
    plane.axvline(0, color="0.7", zorder=0)
    plane.set_xlabel("fast residual (px)")
    plane.set_ylabel("slow residual (px)")
    plane.set_aspect("equal", adjustable="datalim")
    plane.legend(fontsize="small")

    largest = max([float(np.hypot(*residuals.all.T).max()) for _, residuals, _ in passes if len(residuals.all)],
                  default=1.0)
    bins = np.linspace(0, largest * 1.02, 40)
    for name, residuals, colour in passes:
        values = residuals.all
        lengths.hist(np.hypot(values[:, 0], values[:, 1]), bins=bins, histtype="step", color=colour, linewidth=1.5,
                     label=f"{name}: RMSD {_rmsd(values):.3f} px, {len(values)} spots")
    lengths.set_xlabel("|observed - predicted| (px)")
    lengths.set_ylabel("spots")
    lengths.legend(fontsize="small")

    rmsd_before, rmsd_after = before.rmsd_by_image(), after.rmsd_by_image()
    images = sorted(set(rmsd_before) & set(rmsd_after))
    x = np.array([rmsd_before[image] for image in images])
    y = np.array([rmsd_after[image] for image in images])
    per_shot.scatter(x, y, s=16, color="tab:purple")
    limit = max(float(np.concatenate((x, y)).max()) * 1.05 if images else 1.0, 1e-3)
    per_shot.plot([0, limit], [0, limit], color="0.6", linewidth=1)
    per_shot.set_xlim(0, limit)
    per_shot.set_ylim(0, limit)
    per_shot.set_xlabel("shot RMSD, index pass (px)")
    per_shot.set_ylabel("shot RMSD, reindex pass (px)")
    per_shot.set_title(f"{int((y < x).sum())} of {len(images)} shots closer with the refined detector")
    plotting.save_png(figure, path)


# --- images from elsewhere: the pixel refinements and SPREAD without a truth ------------------------------

#: The before/after columns of a pixel refinement's shots table that the truth-free figure draws: (column stem
#: or (before, after) pair, axis label).
REFINEMENT_PANELS = (
    (("rmsd_radial_strong_before_px", "rmsd_radial_strong_after_px"), "radial RMSD, strong spots (px)"),
    (("rmsd_overall_before_px", "rmsd_overall_after_px"), "overall RMSD, every ROI (px)"),
    (("zscore_sigma_before", "zscore_sigma"), "sigma of the pixels' Z-scores (1: Poisson + readout)"),
)


def _converged_column(rows, column: str) -> np.ndarray:
    values = np.array([row[column] for row in rows if row["converged"] == 1 and row[column] is not None],
                      dtype=np.float64)
    return values[np.isfinite(values)]


def plot_refinement_without_truth(path, dataset: str, refinement: str, rows) -> str:
    """A pixel refinement's converged lattices from its shots tables alone (rows of
    ``io.refined_shots.read_refined_shots``): the start and refined radial RMSD of the strong spots, the overall
    RMSD and the sigma of the Z-scores, as histograms with their medians. Writes ``path`` (PNG); returns a
    one-line summary."""
    converged = sum(row["converged"] == 1 for row in rows)
    figure, axes = plotting.pyplot().subplots(1, len(REFINEMENT_PANELS), figsize=(16, 4.8), squeeze=False)
    figure.suptitle(f"{refinement}, dataset {dataset} (no truth): {converged} of {len(rows)} lattices converged")
    for axis, ((before_column, after_column), label) in zip(axes[0], REFINEMENT_PANELS):
        before, after = _converged_column(rows, before_column), _converged_column(rows, after_column)
        values = np.concatenate((before, after))
        top = max(float(values.max()) * 1.05 if len(values) else 1.0, 1e-3)
        bins = np.linspace(0, top, 30)
        for name, data in (("start", before), ("refined", after)):
            median = f"{np.median(data):.3f}" if len(data) else "n/a"
            axis.hist(data, bins=bins, alpha=0.6, label=f"{name} (median {median})")
        axis.set_xlabel(label)
        axis.set_ylabel("lattices")
        axis.legend(fontsize="small")
    plotting.save_png(figure, path)
    return f"{path}: {refinement} {dataset}, {converged} of {len(rows)} lattices converged"


def plot_spread_without_truth(path, dataset: str, prefix: str, lattices: int | None = None) -> str:
    """SPREAD's f' and f'' of each site with their 1-sigma bands, the start tables and the two negative controls
    (``spread.scoring.plot_spread`` with no truth), from the stage's outputs ``prefix``. Returns a one-line summary."""
    from xfel_spread.spread.scoring import plot_spread, read_fits

    grid, sites, fits, sigmas = read_fits(prefix)
    plot_spread(path, dataset, grid, sites, fits, sigmas, None, lattices)
    return f"{path}: SPREAD {dataset}, sites {', '.join(sites)}, {len(grid)} grid energies"
