"""The per-shot refinement at a glance: one figure per dataset, written by its scoring step.

Three panels: the radial centroid RMSD before and after refinement over the strong spots (the goal's)
and over every ROI (histograms over the converged lattices), and each lattice's misorientation to the
truth's domain-mean orientation (the goal's reference), DIALS's against the refined one, with the
diagonal (points below it improved).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xfel_spread import plotting
from xfel_spread.stage1.scoring import RADIAL_RMSD_GOAL_PX


def _finite(scores: Sequence[dict], column: str, converged_only: bool = True) -> np.ndarray:
    values = np.array([score[column] for score in scores
                       if score[column] is not None and (score["converged"] == 1 or not converged_only)],
                      dtype=np.float64)
    return values[np.isfinite(values)]


def plot_stage1_summary(path, dataset: str, scores: Sequence[dict], summary: dict) -> None:
    """Write the three-panel figure to ``path`` (PNG), atomically."""
    figure, (strong_axes, every_roi_axes, misorientation_axes) = plotting.pyplot().subplots(1, 3,
                                                                                    figsize=(16, 5.2))
    figure.suptitle(f"Stage 1 against the simulation's truth, dataset {dataset}: "
                    f"{summary['converged']} of {summary['lattices']} lattices converged")

    for axes, name, title in ((strong_axes, "radial_strong", "radial, strong spots,"),
                              (every_roi_axes, "radial", "radial, every ROI,")):
        before = _finite(scores, f"rmsd_{name}_before_px")
        after = _finite(scores, f"rmsd_{name}_after_px")
        values = np.concatenate((before, after))
        bins = np.linspace(0, max(float(values.max()) if len(values) else 1.0, 1e-3) * 1.05, 30)
        axes.hist(before, bins=bins, alpha=0.6, label=f"start (median {_median_text(before)} px)")
        axes.hist(after, bins=bins, alpha=0.6, label=f"refined (median {_median_text(after)} px)")
        if name == "radial_strong":
            axes.axvline(RADIAL_RMSD_GOAL_PX, color="k", linestyle="--", linewidth=0.8, label="goal")
        axes.set_xlabel(f"{title} RMSD of spot centroids, model - observed (px)")
        axes.set_ylabel("lattices")
        axes.legend()

    dials = np.array([score["misorientation_dials_domain_mean_deg"] for score in scores], dtype=np.float64)
    refined = np.array([score["misorientation_refined_domain_mean_deg"] for score in scores], dtype=np.float64)
    converged = np.array([score["converged"] == 1 for score in scores], dtype=bool)
    if len(dials):
        misorientation_axes.scatter(dials[converged], refined[converged], s=14, label="converged")
        misorientation_axes.scatter(dials[~converged], refined[~converged], s=14, color="0.6",
                                    label="not converged (start kept)")
        positive = np.concatenate((dials, refined))
        positive = positive[positive > 0]
        low, high = (positive.min() / 1.5, positive.max() * 1.5) if len(positive) else (1e-3, 1.0)
        misorientation_axes.plot([low, high], [low, high], color="k", linewidth=0.8)
        misorientation_axes.set_xlim(low, high)
        misorientation_axes.set_ylim(low, high)
        misorientation_axes.set_xscale("log")
        misorientation_axes.set_yscale("log")
    misorientation_axes.set_xlabel("DIALS misorientation to the domains' mean orientation (deg)")
    misorientation_axes.set_ylabel("refined misorientation to it (deg)")
    misorientation_axes.set_title(f"{100 * summary['improved_fraction_domain_mean']:.1f} % of lattices below the diagonal")
    misorientation_axes.legend()

    plotting.save_png(figure, path)


def _median_text(values: np.ndarray) -> str:
    return f"{np.median(values):.3f}" if len(values) else "n/a"
