"""Density clustering of unit cells and the covariance model merging filters lattices with.

This replaces LY99's ``uc_metrics.dbscan ... feature_vector=a,b,c eps=0.20 metric=L2norm
write_covariance=...`` (uc_metrics is not packaged). The cells' feature vectors (e.g. a, b, c) are
clustered with DBSCAN (Euclidean metric, the point itself counted among its neighbours, as in
scikit-learn); clusters are numbered by size, largest first (component 0 = the main cluster), noise
is labelled -1. Each cluster's mean and maximum-likelihood covariance (scikit-learn's
``EmpiricalCovariance``) form its model.

DBSCAN is computed here rather than by scikit-learn: LY99 cells scatter by a few hundredths of an
Angstrom, so with eps 0.2 almost every cell neighbours every other one, and scikit-learn's DBSCAN,
which stores every neighbour list, needs memory quadratic in the number of cells (0.5 GB at 6,000
cells, over 100 GB at 100,000). On a grid of side eps / sqrt(dimensions) all cells sharing a grid box
are neighbours, so only the cells of sparse boxes need their neighbours counted, and crowded cells
are joined box by box (two boxes join as soon as one pair of their core cells is within eps); sparse
cells are joined pair by pair. The labels are those of scikit-learn's DBSCAN, except that a border
cell within eps of two clusters joins the cluster of its nearest core cell (scikit-learn gives it to
whichever cluster reaches it first).

The pickle has the layout cctbx.xfel.merge's ``filter.unit_cell.cluster.covariance.file`` reads:
a dict with ``features`` (names), ``sample``, ``info`` and ``populations``, whose ``fit_components[k]``
has a scikit-learn-style ``mahalanobis(X)`` (squared distance) and whose
``basic_covariance_compact_report(feature_vectors=E)`` writes the legend merging logs. Its classes
live here, so the pickle loads wherever this package is installed.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output
from xfel_spread.cells.tdata import CELL_PARAMETERS, TdataError
from xfel_spread.config import ConfigError
from xfel_spread.errors import UserInputError

log = logging.getLogger(__name__)

#: Keys of the pickled dict (cctbx.xfel.merge reads them all).
PICKLE_KEYS = ("features", "sample", "info", "populations")
#: Boxes are made this much smaller than eps / sqrt(d) so rounding can never put two cells further
#: than eps apart into one box.
_GRID_SHRINK = 1.0 - 1e-9


class CovarianceFileError(UserInputError, ValueError):
    """A covariance pickle that cannot be used; the message is one line naming the file."""


class ClusteringError(UserInputError, ValueError):
    """Cells that give no usable covariance model; the message is one line naming the source."""


class CellCovariance:
    """Mean and covariance of one cluster's feature vectors, with scikit-learn's attribute names.

    ``location_`` (k,), ``covariance_`` (k, k) and ``precision_`` (its pseudo-inverse, as
    scikit-learn's ``EmpiricalCovariance`` keeps) make it usable wherever code expects that class.
    """

    def __init__(self, location: np.ndarray, covariance: np.ndarray):
        from scipy.linalg import pinvh

        self.location_ = np.asarray(location, dtype=float)
        self.covariance_ = np.asarray(covariance, dtype=float)
        self.precision_ = pinvh(self.covariance_)

    @classmethod
    def from_points(cls, points: np.ndarray) -> "CellCovariance":
        """Maximum-likelihood mean and covariance (divisor n) of the rows of ``points``."""
        points = np.asarray(points, dtype=float)
        location = points.mean(axis=0)
        centred = points - location
        return cls(location, centred.T @ centred / len(points))

    def mahalanobis(self, X: np.ndarray) -> np.ndarray:
        """SQUARED Mahalanobis distances of the rows of ``X`` (n, k), as scikit-learn returns them."""
        centred = np.atleast_2d(np.asarray(X, dtype=float)) - self.location_
        return ((centred @ self.precision_) * centred).sum(axis=1)


class CellPopulations:
    """The clustering of a set of cells, with the attributes cctbx.xfel.merge's cluster filter reads.

    ``labels``: per cell, its component (0 = largest cluster) or -1 for noise. ``populations``: the
    components' sizes. ``n_noise_``: the noise count. ``main_components``: the components in order
    of size (0, 1, ...). ``fit_components``: one :class:`CellCovariance` per component.
    """

    def __init__(self, labels: np.ndarray, fit_components: Sequence[CellCovariance]):
        self.labels = np.asarray(labels, dtype=int)
        self.fit_components = list(fit_components)
        self.populations = [int(size) for size in np.bincount(self.labels[self.labels >= 0],
                                                              minlength=len(self.fit_components))]
        self.n_noise_ = int(np.count_nonzero(self.labels < 0))
        self.main_components = list(range(len(self.fit_components)))

    def basic_covariance_compact_report(self, feature_vectors) -> io.StringIO:
        """Legend of the model: per component its size, the features' mean and sd, and the covariance.

        ``feature_vectors`` has ``features_`` (names), ``sample_name`` and ``output_info`` (the
        pickle's ``info``), as cctbx.xfel.merge builds it.
        """
        return io.StringIO(compact_report(self, list(feature_vectors.features_), feature_vectors.sample_name))


def _matrix_lines(matrix: np.ndarray, names: Sequence[str], indent: str) -> list[str]:
    """A square matrix with its rows and columns named."""
    lines = [indent + " " * 6 + "".join(f"{name:>13s}" for name in names)]
    for name, row in zip(names, matrix):
        lines.append(indent + f"{name:<6s}" + "".join(f"{value:13.4e}" for value in row))
    return lines


def compact_report(populations: CellPopulations, features: Sequence[str], sample: str) -> str:
    """Text legend of a clustering: a line of counts, then per component its size, mean +- sd and covariance."""
    n_cells, n_clusters = len(populations.labels), len(populations.fit_components)
    lines = [f"Unit-cell covariance model of {sample}: {n_cells} cells, features {', '.join(features)}, "
             f"{n_clusters} cluster{'' if n_clusters == 1 else 's'}, {populations.n_noise_} noise"]
    for component, (size, model) in enumerate(zip(populations.populations, populations.fit_components)):
        lines.append(f"component {component}: {size} cells ({100.0 * size / n_cells:.1f}%)")
        sd = np.sqrt(np.diag(model.covariance_))
        lines.append("  " + "  ".join(f"{name} {mean:.4f} +- {spread:.4f}"
                                      for name, mean, spread in zip(features, model.location_, sd)))
        lines.append("  covariance:")
        lines.extend(_matrix_lines(model.covariance_, features, "    "))
    return "\n".join(lines) + "\n"


# -- DBSCAN on a grid ------------------------------------------------------------------------------

#: Core points sampled to estimate how many neighbour pairs the point-by-point connection would list.
_PAIR_SAMPLE = 256


def _grid_boxes(points: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid boxes of side < eps / sqrt(d): (box of each point, integer coordinates of each box, box sizes)."""
    side = eps / math.sqrt(points.shape[1]) * _GRID_SHRINK
    coordinates = np.floor((points - points.min(axis=0)) / side).astype(np.int64)
    box_coordinates, box_of_point, box_sizes = np.unique(coordinates, axis=0, return_inverse=True,
                                                         return_counts=True)
    return box_of_point.reshape(-1), box_coordinates, box_sizes


def _core_mask(points: np.ndarray, tree, box_of_point: np.ndarray, box_sizes: np.ndarray,
               eps: float, min_samples: int) -> np.ndarray:
    """Which points have at least ``min_samples`` points (themselves included) within ``eps``.

    A box holds only mutual neighbours, so points of a box with ``min_samples`` points are core
    without counting; the others are counted with the k-d tree.
    """
    core = box_sizes[box_of_point] >= min_samples
    to_count = np.flatnonzero(~core)
    if len(to_count):
        counts = tree.query_ball_point(points[to_count], r=eps, return_length=True)
        core[to_count] = np.asarray(counts) >= min_samples
    return core


@functools.lru_cache(maxsize=None)
def _box_offsets(d: int) -> int:
    """How many grid offsets o can join two boxes of side eps / sqrt(d): sum(max(|o_i| - 1, 0)^2) <= d."""
    reach = 1 + math.isqrt(d)
    steps = np.arange(-reach, reach + 1)
    offsets = np.stack(np.meshgrid(*[steps] * d, indexing="ij"), axis=-1).reshape(-1, d)
    return int(np.count_nonzero((np.clip(np.abs(offsets) - 1, 0, None) ** 2).sum(axis=1) <= d))


def _neighbour_box_pairs(box_coordinates: np.ndarray) -> np.ndarray:
    """Pairs (i, j) of boxes close enough on the grid to hold points within eps of each other."""
    from scipy.spatial import cKDTree

    d = box_coordinates.shape[1]
    if len(box_coordinates) < 2:
        return np.empty((0, 2), dtype=np.int64)
    reach = 1 + math.isqrt(d)
    pairs = cKDTree(box_coordinates).query_pairs(r=reach + 0.5, p=np.inf, output_type="ndarray")
    gaps = np.clip(np.abs(box_coordinates[pairs[:, 0]] - box_coordinates[pairs[:, 1]]) - 1, 0, None)
    return pairs[(gaps ** 2).sum(axis=1) <= d]


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected component (0, 1, ...) of each of n nodes joined by ``edges`` (m, 2)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _components_by_point_pairs(core_xyz: np.ndarray, eps: float) -> np.ndarray:
    """Components of core points joined by every pair within eps (for sparse data, few pairs)."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(core_xyz).query_pairs(r=eps, output_type="ndarray")
    return _components(len(core_xyz), pairs)


def _components_by_boxes(core_xyz: np.ndarray, core_box: np.ndarray, box_coordinates: np.ndarray,
                         eps: float) -> np.ndarray:
    """Components of core points, boxes as nodes (for dense data, few boxes holding many points).

    Core points of one box are neighbours, so a box is one node; two neighbouring boxes are joined
    when some pair of their core points is within eps (nearest-neighbour query on a k-d tree of one
    box), which is not tested for boxes already joined.
    """
    from scipy.spatial import cKDTree

    boxes, box_index = np.unique(core_box, return_inverse=True)
    members = np.split(np.argsort(box_index, kind="stable"), np.cumsum(np.bincount(box_index))[:-1])
    parent = list(range(len(boxes)))

    def root(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    trees: dict[int, cKDTree] = {}
    bound = np.nextafter(eps, np.inf)
    for first, second in _neighbour_box_pairs(box_coordinates[boxes]).tolist():
        first_root, second_root = root(first), root(second)
        if first_root == second_root:
            continue
        if len(members[first]) > len(members[second]):
            first, second = second, first
        if second not in trees:
            trees[second] = cKDTree(core_xyz[members[second]])
        distances, _ = trees[second].query(core_xyz[members[first]], k=1, distance_upper_bound=bound)
        if np.any(distances <= eps):
            parent[first_root] = second_root
    box_component = np.unique([root(node) for node in range(len(boxes))], return_inverse=True)[1]
    return box_component.reshape(-1)[box_index.reshape(-1)]


def _core_components(core_xyz: np.ndarray, core_box: np.ndarray, box_coordinates: np.ndarray,
                     eps: float, rng: np.random.Generator) -> np.ndarray:
    """Connected components of the core points (joined when within eps), by the cheaper of two ways.

    Listing every pair of neighbouring core points costs their number, which grows as the square of
    the point count when the points crowd within eps (LY99 cells); testing neighbouring grid boxes
    costs the number of box pairs, which explodes when sparse points spread over many boxes in
    four or more dimensions. Both are estimated (the first from a sample of core points) and the
    smaller wins.
    """
    from scipy.spatial import cKDTree

    n_boxes = len(np.unique(core_box))
    box_pairs = n_boxes * min(n_boxes, _box_offsets(core_xyz.shape[1])) / 2
    sample = rng.choice(len(core_xyz), size=min(_PAIR_SAMPLE, len(core_xyz)), replace=False)
    neighbours = cKDTree(core_xyz).query_ball_point(core_xyz[sample], r=eps, return_length=True)
    point_pairs = np.mean(neighbours) * len(core_xyz) / 2
    if point_pairs <= box_pairs:
        log.debug("DBSCAN: joining %d core points pair by pair (about %.3g pairs)", len(core_xyz), point_pairs)
        return _components_by_point_pairs(core_xyz, eps)
    log.debug("DBSCAN: joining %d grid boxes (at most %.3g box pairs)", n_boxes, box_pairs)
    return _components_by_boxes(core_xyz, core_box, box_coordinates, eps)


def order_labels_by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... by decreasing size (ties: earliest first member first); -1 stays."""
    labels = np.asarray(labels)
    clustered = labels >= 0
    relabelled = np.full(len(labels), -1, dtype=int)
    if not clustered.any():
        return relabelled
    names, first_member, sizes = np.unique(labels[clustered], return_index=True, return_counts=True)
    order = np.lexsort((first_member, -sizes))
    new_name = np.empty(len(names), dtype=int)
    new_name[order] = np.arange(len(names))
    relabelled[clustered] = new_name[np.searchsorted(names, labels[clustered])]
    return relabelled


def dbscan_labels(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels of the rows of ``points`` (Euclidean), clusters numbered by size, noise -1.

    Neighbours are points within ``eps`` inclusive, the point itself included; a core point has at
    least ``min_samples`` neighbours. Clusters are the connected core points; a non-core point within
    eps of a core point joins the cluster of its nearest core point; the rest are noise.
    Deterministic: the random sample only chooses between two exact ways of joining core points.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=float)
    labels = np.full(len(points), -1, dtype=int)
    if len(points) == 0:
        return labels
    box_of_point, box_coordinates, box_sizes = _grid_boxes(points, eps)
    core = _core_mask(points, cKDTree(points), box_of_point, box_sizes, eps, min_samples)
    core_points = np.flatnonzero(core)
    if len(core_points) == 0:
        return labels
    labels[core_points] = _core_components(points[core_points], box_of_point[core_points], box_coordinates,
                                           eps, np.random.default_rng(0))
    border_candidates = np.flatnonzero(~core)
    if len(border_candidates):
        distances, nearest = cKDTree(points[core_points]).query(
            points[border_candidates], k=1, distance_upper_bound=np.nextafter(eps, np.inf))
        border = distances <= eps
        labels[border_candidates[border]] = labels[core_points[nearest[border]]]
    return order_labels_by_size(labels)


# -- the model -------------------------------------------------------------------------------------

def feature_columns(features: Sequence[str]) -> list[int]:
    """Columns of ``features`` among (a, b, c, alpha, beta, gamma); ValueError for an unknown name."""
    unknown = [name for name in features if name not in CELL_PARAMETERS]
    if unknown or not features:
        raise ValueError(f"features must be names among {', '.join(CELL_PARAMETERS)}, got {list(features)}")
    return [CELL_PARAMETERS.index(name) for name in features]


def is_singular(covariance: np.ndarray) -> bool:
    """Whether a covariance matrix cannot be inverted (not finite, or rank-deficient at double precision)."""
    covariance = np.asarray(covariance, dtype=float)
    return not np.all(np.isfinite(covariance)) or np.linalg.matrix_rank(covariance) < len(covariance)


def _degenerate_features(model: CellCovariance, features: Sequence[str]) -> list[str]:
    """Features whose variance is negligible next to the largest one (e.g. alpha fixed at 90 in C2)."""
    variances = np.diag(model.covariance_)
    return [name for name, variance in zip(features, variances) if variance <= 1e-12 * max(variances.max(), 0.0)]


def cluster_cells(cells: np.ndarray, features: Sequence[str], eps: float, min_samples: int,
                  source: str = "<cells>") -> CellPopulations:
    """DBSCAN clusters of the cells' feature vectors, each with its mean and covariance.

    ``cells`` is (n, 6) (a, b, c, alpha, beta, gamma). Raises ClusteringError, naming ``source``,
    when no cluster is found or the main cluster's covariance is singular (a feature that does not
    vary, or too few members); singular minor clusters are only logged.
    """
    points = np.asarray(cells, dtype=float)[:, feature_columns(features)]
    labels = dbscan_labels(points, eps, min_samples)
    n_clusters = int(labels.max()) + 1
    if n_clusters == 0:
        raise ClusteringError(
            f"{source}: no cluster found: all {len(points)} cells are noise with eps {eps} and min_samples "
            f"{min_samples} (L2 distance on {', '.join(features)}); raise cells.eps or lower cells.min_samples")
    models = [CellCovariance.from_points(points[labels == component]) for component in range(n_clusters)]
    for component, model in enumerate(models):
        if is_singular(model.covariance_):
            size = int(np.count_nonzero(labels == component))
            constant = _degenerate_features(model, features)
            reason = (f"{', '.join(constant)} does not vary" if constant
                      else f"{size} members do not span the {len(features)} features")
            if component == 0:
                raise ClusteringError(f"{source}: the main cluster's covariance is singular ({reason}); "
                                      "choose cells.features that vary")
            log.warning("cluster %d (%d cells) has a singular covariance (%s)", component, size, reason)
    return CellPopulations(labels, models)


def check_space_groups(symbols: Sequence[str], space_group: str, source: str) -> None:
    """TdataError (ConfigError for a bad ``space_group``) unless every symbol's Patterson group is that of
    ``space_group`` (settings cells.space_group); both are ValueErrors."""
    from cctbx import sgtbx

    def patterson(symbol):
        return sgtbx.space_group_info(symbol).group().build_derived_patterson_group().info().symbol_and_number()

    try:
        target = patterson(space_group)
    except RuntimeError:
        raise ConfigError(f"cells.space_group: {space_group!r} is not a space group symbol") from None
    groups = {}
    for symbol in dict.fromkeys(symbols):
        try:
            groups[symbol] = patterson(symbol)
        except RuntimeError:
            raise TdataError(f"{source}:{symbols.index(symbol) + 1}: {symbol!r} is not a space group symbol") from None
    mismatched = [number for number, symbol in enumerate(symbols) if groups[symbol] != target]
    if mismatched:
        symbol = symbols[mismatched[0]]
        raise TdataError(f"{source}:{mismatched[0] + 1}: space group {symbol} (Patterson group {groups[symbol]}) "
                         f"does not match cells.space_group {space_group} ({target}); {len(mismatched)} of "
                         f"{len(symbols)} cells differ")


def write_covariance_pickle(path: str | Path, populations: CellPopulations, features: Sequence[str],
                            sample: str, info: dict) -> None:
    """Write the model in the layout cctbx.xfel.merge's cluster filter reads, atomically."""
    document = {"features": list(features), "sample": sample, "info": dict(info), "populations": populations}
    with atomic_output(path, "wb") as stream:
        pickle.dump(document, stream, protocol=pickle.HIGHEST_PROTOCOL)


# -- reading the model back ------------------------------------------------------------------------

@dataclass(frozen=True)
class CellCluster:
    """One cluster of a covariance pickle: what the merge and annulus stages filter lattices with."""

    features: tuple[str, ...]
    mean: np.ndarray
    covariance: np.ndarray
    n_members: int

    def mahalanobis(self, cells: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (not squared) of each cell (n, 6: a, b, c, alpha, beta, gamma) to the cluster."""
        cells = np.atleast_2d(np.asarray(cells, dtype=float))
        if cells.ndim != 2 or cells.shape[1] != len(CELL_PARAMETERS):
            raise ValueError(f"cells must be (n, 6) arrays of a, b, c, alpha, beta, gamma, got shape {cells.shape}")
        centred = cells[:, feature_columns(self.features)] - self.mean
        squared = np.einsum("ij,ji->i", centred, np.linalg.solve(self.covariance, centred.T))
        return np.sqrt(np.clip(squared, 0.0, None))


def _load_pickle(path: Path) -> dict:
    """The pickled dict of a covariance file; CovarianceFileError if it is not one of ours."""
    try:
        with open(path, "rb") as stream:
            document = pickle.load(stream)
    except ModuleNotFoundError as error:
        raise CovarianceFileError(f"{path}: needs module {error.name!r} to load, not a covariance pickle "
                                  "written by spread-covariance") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as error:
        raise CovarianceFileError(f"{path}: not a covariance pickle ({type(error).__name__}: {error})") from None
    missing = [key for key in PICKLE_KEYS if not isinstance(document, dict) or key not in document]
    if missing:
        raise CovarianceFileError(f"{path}: not a covariance pickle (no {', '.join(missing)})")
    if not hasattr(document["populations"], "fit_components") or not hasattr(document["populations"], "populations"):
        raise CovarianceFileError(f"{path}: not a covariance pickle (populations has no fit_components)")
    return document


def read_covariance(path: str | Path, component: int = 0) -> CellCluster:
    """Cluster ``component`` (0 = main) of a covariance pickle; CovarianceFileError if unusable."""
    path = Path(path)
    document = _load_pickle(path)
    try:
        features = tuple(document["features"])
        feature_columns(features)
    except (TypeError, ValueError) as error:
        raise CovarianceFileError(f"{path}: bad feature list ({error})") from None
    populations = document["populations"]
    n_clusters = len(populations.fit_components)
    if not 0 <= component < n_clusters:
        raise CovarianceFileError(f"{path}: component {component} requested but the file has {n_clusters} "
                                  f"cluster{'' if n_clusters == 1 else 's'}")
    n_members = int(populations.populations[component])
    if n_members <= 0:
        raise CovarianceFileError(f"{path}: component {component} is an empty cluster")
    model = populations.fit_components[component]
    mean = np.asarray(model.location_, dtype=float)
    covariance = np.asarray(model.covariance_, dtype=float)
    k = len(features)
    if mean.shape != (k,) or covariance.shape != (k, k):
        raise CovarianceFileError(f"{path}: component {component} has mean {mean.shape} and covariance "
                                  f"{covariance.shape}, but {k} features ({', '.join(features)})")
    if is_singular(covariance):
        raise CovarianceFileError(f"{path}: component {component}'s covariance matrix is singular")
    return CellCluster(features, mean, covariance, n_members)


# -- summary ---------------------------------------------------------------------------------------

def format_summary(populations: CellPopulations, features: Sequence[str], sample: str, info: dict) -> str:
    """Text summary of a clustering: counts, settings, then the compact report.

    ``info`` is the pickle's: it names the ``tdata`` file, ``space_group``, ``eps`` and ``min_samples``.
    """
    lines = [
        f"cells: {len(populations.labels)} (space group {info['space_group']}) from {info['tdata']}",
        f"DBSCAN: eps {info['eps']}, min_samples {info['min_samples']}, L2 metric on {', '.join(features)}",
        f"clusters found: {len(populations.fit_components)}, sizes "
        + ", ".join(str(size) for size in populations.populations),
        f"noise: {populations.n_noise_} cells",
        "",
    ]
    return "\n".join(lines) + compact_report(populations, features, sample)
