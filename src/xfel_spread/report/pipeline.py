"""The driver of ``spread-plot-detector-refinement``: centroid residuals before and after metrology."""

from __future__ import annotations

from xfel_spread.report.plots import centroid_residuals, plot_detector_refinement


def detector_refinement_figure(plot: str, dataset: str, index_prefix: str, reindex_prefix: str) -> list[str]:
    """Plot the observed - predicted centroids of a shard's index pass against its reindex pass.

    Returns one line per pass: lattices, spots and mean residual (px)."""
    before = centroid_residuals(index_prefix)
    after = centroid_residuals(reindex_prefix)
    plot_detector_refinement(plot, dataset, before, after)
    lines = []
    for name, residuals in (("index", before), ("reindex", after)):
        values = residuals.all
        mean = values.mean(axis=0) if len(values) else [float("nan")] * 2
        lines.append(f"{name}: {len(residuals.by_image)} lattices, {len(values)} spots, "
                     f"mean residual ({mean[0]:+.3f}, {mean[1]:+.3f}) px")
    return lines
