"""Positional residual maps of detector metrology: observed minus predicted spot centroids, per panel.

The residuals of one experiment list are taken on the reflections dials.refine used, predicted with
that list's models (``positional_residuals``), so "before" (the lattices as indexed, on the starting
detector) and "after" (the refined models) are compared on the same spots. They are summarised three
ways: per panel mean and RMSD in x (fast) and y (slow) (``residual_statistics``, written as TSV);
binned means on a grid over every panel (``binned_residual_means``); and two colour maps, x and y,
showing every panel where it lies on the detector (``plot_residual_maps``). A detector whose panels
are misplaced shows as per-panel offsets (a uniform colour per panel) and rotations (a gradient
across a panel); after a good refinement the maps are flat noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xfel_spread import plotting
from xfel_spread.io.tables import NAN_TEXT, write_table

#: Bins along each side of a panel in the maps: fine enough to show a gradient (a rotated panel),
#: coarse enough that a bin averages many spots.
MAP_BINS_PER_SIDE = 8
STATISTICS_COLUMNS = ("stage", "panel", "name", "n_reflections", "mean_dx_px", "mean_dy_px", "rmsd_x_px",
                      "rmsd_y_px", "rmsd_px")
#: The ``panel`` value of the row that pools every panel.
ALL_PANELS = "all"


@dataclass(frozen=True)
class PositionalResiduals:
    """Observed spot positions (px, on their panel) and observed minus predicted centroids (px)."""

    panel: np.ndarray
    x: np.ndarray
    y: np.ndarray
    dx: np.ndarray
    dy: np.ndarray


def positional_residuals(experiments, reflections) -> PositionalResiduals:
    """Residuals of the reflections flagged ``used_in_refinement``, predicted with ``experiments``.

    The stills predictor of dials.refine puts each reflection on its own panel, so the residual is in
    that panel's pixels: x along its fast axis, y along its slow axis.
    """
    from dials.algorithms.refinement.prediction.managed_predictors import ExperimentsPredictorFactory
    from dials.array_family import flex

    used = reflections.select(reflections.get_flags(reflections.flags.used_in_refinement))
    used = used.copy()
    ExperimentsPredictorFactory.from_experiments(experiments, force_stills=True)(used)
    panel = np.array(used["panel"], dtype=int)
    observed = np.array(used["xyzobs.px.value"])[:, :2]
    calculated_mm = np.array(used["xyzcal.mm"])[:, :2]
    calculated = np.empty_like(calculated_mm)
    detector = experiments[0].detector
    for index in np.unique(panel):
        on_panel = panel == index
        calculated[on_panel] = np.array(detector[int(index)].millimeter_to_pixel(
            flex.vec2_double(flex.double(calculated_mm[on_panel, 0]), flex.double(calculated_mm[on_panel, 1]))))
    return PositionalResiduals(panel, observed[:, 0], observed[:, 1], observed[:, 0] - calculated[:, 0],
                               observed[:, 1] - calculated[:, 1])


def residual_statistics(residuals: PositionalResiduals, panel_names: Sequence[str]) -> list[dict]:
    """Per panel (and pooled, panel ``all``): reflection count, mean residual and RMSD in x and y (px)."""
    rows = []
    selections = [(str(index), name, residuals.panel == index) for index, name in enumerate(panel_names)]
    selections.append((ALL_PANELS, "", np.ones(len(residuals.panel), dtype=bool)))
    for panel, name, selected in selections:
        dx, dy = residuals.dx[selected], residuals.dy[selected]
        n = int(selected.sum())
        rows.append({
            "panel": panel, "name": name, "n_reflections": n,
            "mean_dx_px": float(dx.mean()) if n else math.nan, "mean_dy_px": float(dy.mean()) if n else math.nan,
            "rmsd_x_px": _rms(dx), "rmsd_y_px": _rms(dy), "rmsd_px": _rms(np.hypot(dx, dy)),
        })
    return rows


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values ** 2))) if len(values) else math.nan


def write_residual_statistics(rows_by_stage: dict[str, list[dict]], path) -> None:
    """The statistics of each stage (before, after) as one TSV table, atomically."""
    write_table(path, STATISTICS_COLUMNS, ([stage] + [_cell(row[column]) for column in STATISTICS_COLUMNS[1:]]
                                           for stage, rows in rows_by_stage.items() for row in rows))


def _cell(value) -> str:
    """A cell of the statistics table: floats to four decimals (NaN, a panel without spots, is the
    empty cell), anything else as str."""
    if isinstance(value, float):
        return NAN_TEXT if math.isnan(value) else f"{value:.4f}"
    return str(value)


def binned_residual_means(residuals: PositionalResiduals, panel_index: int, image_size: Sequence[int],
                          bins: int = MAP_BINS_PER_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Mean dx and dy (px) of one panel's spots on a ``bins`` x ``bins`` grid (slow, fast); NaN where empty."""
    on_panel = residuals.panel == panel_index
    fast_bin = _bin_of(residuals.x[on_panel], image_size[0], bins)
    slow_bin = _bin_of(residuals.y[on_panel], image_size[1], bins)
    flat = slow_bin * bins + fast_bin
    counts = np.bincount(flat, minlength=bins * bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_dx = np.bincount(flat, residuals.dx[on_panel], bins * bins) / counts
        mean_dy = np.bincount(flat, residuals.dy[on_panel], bins * bins) / counts
    return mean_dx.reshape(bins, bins), mean_dy.reshape(bins, bins)


def _bin_of(position_px: np.ndarray, size_px: int, bins: int) -> np.ndarray:
    return np.clip((position_px / size_px * bins).astype(int), 0, bins - 1)


def colour_limit(*residual_sets: PositionalResiduals, detector) -> float:
    """A symmetric colour range (px) covering every binned mean of every set, so maps compare by colour."""
    largest = 0.0
    for residuals in residual_sets:
        for index, panel in enumerate(detector):
            for means in binned_residual_means(residuals, index, panel.get_image_size()):
                if np.isfinite(means).any():
                    largest = max(largest, float(np.nanmax(np.abs(means))))
    return largest or 1.0


def panel_bin_corners(detector, panel_index: int, bins: int = MAP_BINS_PER_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Corners of a panel's map bins in the detector plane (mm along panel 0's fast and slow axes).

    Drawing every panel in one frame shows the maps where the panels lie, rotations included.
    """
    panel, reference = detector[panel_index], detector[0]
    origin = np.array(reference.get_origin())
    fast_axis, slow_axis = np.array(reference.get_fast_axis()), np.array(reference.get_slow_axis())
    width, height = panel.get_image_size()
    fast_edges, slow_edges = np.meshgrid(np.linspace(0, width, bins + 1), np.linspace(0, height, bins + 1))
    corners = np.array([panel.get_pixel_lab_coord((f, s)) for f, s in zip(fast_edges.ravel(), slow_edges.ravel())])
    relative = corners - origin
    return (relative @ fast_axis).reshape(fast_edges.shape), (relative @ slow_axis).reshape(fast_edges.shape)


def plot_residual_maps(path, residuals: PositionalResiduals, detector, title: str, limit: float) -> None:
    """Two colour maps (x and y residual, binned means) over every panel, written as PNG, atomically."""
    figure, axes = plotting.pyplot().subplots(1, 2, figsize=(12, 5.6))
    figure.suptitle(f"{title}\nbinned means of observed - predicted centroids (grey: no spots)")
    corners = [panel_bin_corners(detector, index) for index in range(len(detector))]
    means = [binned_residual_means(residuals, index, panel.get_image_size()) for index, panel in enumerate(detector)]
    for component, (axis, label) in enumerate(zip(axes, ("x (fast)", "y (slow)"))):
        axis.set_facecolor("0.85")  # shows through empty (masked) bins, which white would pass off as zero
        for index, ((fast_mm, slow_mm), panel_means) in enumerate(zip(corners, means)):
            mesh = axis.pcolormesh(fast_mm, slow_mm, np.ma.masked_invalid(panel_means[component]), cmap="RdBu_r",
                                   vmin=-limit, vmax=limit, shading="flat")
            outline = [(0, 0), (0, -1), (-1, -1), (-1, 0), (0, 0)]
            axis.plot([fast_mm[i, j] for i, j in outline], [slow_mm[i, j] for i, j in outline], color="0.4",
                      linewidth=0.8)
            if len(detector) > 1:
                axis.text(fast_mm.mean(), slow_mm.mean(), str(index), ha="center", va="center", color="0.3")
        rms = _rms(residuals.dx if component == 0 else residuals.dy)
        axis.set_title(f"observed - predicted, {label}: RMSD {rms:.3f} px")
        axis.set_xlabel("fast (mm)")
        axis.set_ylabel("slow (mm)")
        axis.set_aspect("equal")
        axis.invert_yaxis()  # slow increases downwards, as in an image
        figure.colorbar(mesh, ax=axis, label=f"mean residual {label} (px)", shrink=0.8)
    plotting.save_png(figure, path)
