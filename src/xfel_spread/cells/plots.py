"""The unit-cell clusters at a glance: pairwise scatter of the clustered cell parameters.

One panel per pair of features (a-b, b-c, a-c for the LY99 features), cells coloured by cluster,
noise in grey, with the projection of the main cluster's Mahalanobis region at the distance merging
uses by default (the region of a k-dimensional Gaussian projects onto two coordinates as the
ellipse of its 2x2 sub-covariance at the same distance).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from xfel_spread.atomic import atomic_path
from xfel_spread.cells.covariance import CellPopulations, feature_columns

#: Mahalanobis distance of the drawn region: LY99's merge cut-off (settings merge.mahalanobis default).
ELLIPSE_DISTANCE = 4.0
#: Clusters beyond this many share the colour "other clusters".
MAX_COLOURED_CLUSTERS = 9


def ellipse_points(mean: np.ndarray, covariance: np.ndarray, distance: float, n: int = 200) -> np.ndarray:
    """(n, 2) points on the ellipse {x : (x - mean)^T covariance^-1 (x - mean) = distance^2}."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, dtype=float))
    angles = np.linspace(0.0, 2.0 * math.pi, n)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.asarray(mean, dtype=float) + distance * (circle * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def axis_label(feature: str) -> str:
    """Axis label with the unit: Angstrom for cell lengths, degrees for angles."""
    return f"{feature} ({'deg' if feature in ('alpha', 'beta', 'gamma') else 'A'})"


def _view_limits(values: np.ndarray, outline: np.ndarray) -> tuple[float, float]:
    """Axis range holding the drawn region and the clustered cells, so far noise does not squash them."""
    low = min(values.min(), outline.min()) if len(values) else outline.min()
    high = max(values.max(), outline.max()) if len(values) else outline.max()
    pad = 0.08 * (high - low) or 1e-3
    return low - pad, high + pad


def _feature_pairs(features: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs of the features to plot: a-b, b-c, a-c for three; every pair in general."""
    if len(features) == 3:
        return [(0, 1), (1, 2), (0, 2)]
    return list(itertools.combinations(range(len(features)), 2))


def _scatter_clusters(axes, x: np.ndarray, y: np.ndarray, labels: np.ndarray) -> None:
    """Noise grey underneath, then the clusters, the main one last (on top), rasterised."""
    # Dots shrink as cells get many, so 100,000 stay readable and 200 stay visible.
    marker = dict(s=float(np.clip(2e4 / len(labels), 1.0, 12.0)), linewidths=0, rasterized=True)
    axes.scatter(x[labels < 0], y[labels < 0], color="0.6", label=f"noise ({np.count_nonzero(labels < 0)})",
                 **marker)
    others = labels >= MAX_COLOURED_CLUSTERS
    if others.any():
        axes.scatter(x[others], y[others], color="tab:olive", label="other clusters", **marker)
    n_coloured = min(int(labels.max()) + 1, MAX_COLOURED_CLUSTERS)
    for component in reversed(range(n_coloured)):
        members = labels == component
        axes.scatter(x[members], y[members], color=f"C{component}",
                     label=f"cluster {component} ({np.count_nonzero(members)})", **marker)


def plot_cell_clusters(path, cells: np.ndarray, populations: CellPopulations, features: Sequence[str],
                       title: str) -> None:
    """Write the pairwise scatter of the clustered features to ``path`` (PNG), atomically.

    ``cells`` is (n, 6) (a, b, c, alpha, beta, gamma), in the order of ``populations.labels``.
    A single feature is shown as a histogram per cluster. The view holds the clusters; noise cells
    far from them fall outside it (their count is in the legend).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = np.asarray(cells, dtype=float)[:, feature_columns(features)]
    labels = np.asarray(populations.labels)
    main = populations.fit_components[0]
    pairs = _feature_pairs(features)
    n_panels = max(len(pairs), 1)
    n_columns = min(n_panels, 3)
    n_rows = math.ceil(n_panels / n_columns)
    figure, axes_grid = pyplot.subplots(n_rows, n_columns, figsize=(5.2 * n_columns, 4.8 * n_rows), squeeze=False)
    figure.suptitle(title)
    if not pairs:
        axes = axes_grid[0, 0]
        axes.hist([points[labels == c, 0] for c in range(len(populations.fit_components))] + [points[labels < 0, 0]],
                  bins=60, stacked=True, label=[f"cluster {c}" for c in range(len(populations.fit_components))]
                  + ["noise"])
        axes.set_xlabel(axis_label(features[0]))
        axes.legend(fontsize="small")
    for axes, (first, second) in zip(axes_grid.flat, pairs):
        _scatter_clusters(axes, points[:, first], points[:, second], labels)
        sub = np.ix_([first, second], [first, second])
        outline = ellipse_points(main.location_[[first, second]], main.covariance_[sub], ELLIPSE_DISTANCE)
        axes.plot(outline[:, 0], outline[:, 1], color="k", linewidth=1.0,
                  label=f"cluster 0, Mahalanobis {ELLIPSE_DISTANCE:g}")
        clustered = labels >= 0
        axes.set_xlim(_view_limits(points[clustered, first], outline[:, 0]))
        axes.set_ylim(_view_limits(points[clustered, second], outline[:, 1]))
        axes.set_xlabel(axis_label(features[first]))
        axes.set_ylabel(axis_label(features[second]))
    axes_grid.flat[0].legend(fontsize="small", markerscale=3)
    for axes in list(axes_grid.flat)[n_panels:]:
        axes.set_visible(False)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)
