"""Shoeboxes of the per-shot refinement: square boxes around reflection centroids, and who owns a pixel.

The rule stage 1 applies to DIALS's observed centroids (:mod:`xfel_spread.stage1.rois`) and the
pixel-subset simulation (:mod:`xfel_spread.sim.subset`) to predicted ones, kept here so that both
use the same code and the simulator imports no stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def shoebox_bounds(centroids_px: np.ndarray, size: int, n_fast, n_slow) -> np.ndarray:
    """Square boxes of ``size`` pixels centred on the centroids, clipped at the panel edges.

    ``n_fast``, ``n_slow`` are the panel's shape, or (n,) arrays: each box's own panel's.

    ``centroids_px`` is (n, 2) fast, slow in pixel coordinates (pixel i spans [i, i + 1)). Returns
    (n, 4) int ``x0, x1, y0, y1`` with the box covering ``x0 <= x < x1``, ``y0 <= y < y1``; a box
    entirely off the panel comes back empty (``x1 <= x0`` or ``y1 <= y0``).
    """
    centroids_px = np.asarray(centroids_px, dtype=np.float64).reshape(-1, 2)
    start = np.floor(centroids_px - size / 2.0 + 0.5).astype(np.int64)
    stop = start + size
    limits = np.stack(np.broadcast_arrays(np.asarray(n_fast, dtype=np.int64), np.asarray(n_slow, dtype=np.int64)),
                      axis=-1)
    start_clipped = np.clip(start, 0, limits)
    stop_clipped = np.clip(stop, 0, limits)
    return np.stack((start_clipped[:, 0], stop_clipped[:, 0], start_clipped[:, 1], stop_clipped[:, 1]), axis=1)


@dataclass
class BoxPixels:
    """The pixels of a set of boxes after the overlap rule: one entry per kept pixel."""

    fast: np.ndarray  #: (n_pix,) int
    slow: np.ndarray  #: (n_pix,) int
    roi: np.ndarray  #: (n_pix,) int, the box owning the pixel
    in_other_spot: np.ndarray  #: (n_pix,) bool, within the strong-spot radius of another box's centroid
    on_border: np.ndarray  #: (n_pix,) bool, on the outermost rows or columns of its (clipped) box
    panel: np.ndarray | None = None  #: (n_pix,) int, the pixel's panel (multi-panel detectors), or None


def assign_box_pixels(bounds: np.ndarray, centroids_px: np.ndarray, spot_radius_px: float,
                      box_panel: np.ndarray | None = None) -> BoxPixels:
    """Every pixel of the boxes, given to the box whose centroid is nearest to the pixel centre.

    ``box_panel`` (n,) puts each box on a panel of a multi-panel detector (bounds and centroids in
    that panel's frame): pixels are then (panel, fast, slow), and boxes compete only for pixels of
    their own panel.

    Ties go to the box listed first. Pixels come out grouped by box, in box order, and inside a box in
    image order (slow, then fast). ``in_other_spot`` marks pixels closer than ``spot_radius_px`` to
    the centroid of a box (containing the pixel) other than their owner.
    """
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 4)
    centroids_px = np.asarray(centroids_px, dtype=np.float64).reshape(-1, 2)
    fast, slow, roi, border = [], [], [], []
    for index, (x0, x1, y0, y1) in enumerate(bounds):
        if x1 <= x0 or y1 <= y0:
            continue
        box_slow, box_fast = np.mgrid[y0:y1, x0:x1]
        fast.append(box_fast.ravel())
        slow.append(box_slow.ravel())
        roi.append(np.full(box_fast.size, index, dtype=np.int64))
        border.append(((box_fast == x0) | (box_fast == x1 - 1) | (box_slow == y0) | (box_slow == y1 - 1)).ravel())
    if not fast:
        empty = np.zeros(0, dtype=np.int64)
        return BoxPixels(empty, empty.copy(), empty.copy(), np.zeros(0, bool), np.zeros(0, bool),
                         None if box_panel is None else empty.copy())
    fast, slow, roi, border = (np.concatenate(parts) for parts in (fast, slow, roi, border))
    panel = None if box_panel is None else np.asarray(box_panel, dtype=np.int64)[roi]

    centre_fast, centre_slow = fast + 0.5, slow + 0.5
    distance_sq = (centre_fast - centroids_px[roi, 0]) ** 2 + (centre_slow - centroids_px[roi, 1]) ** 2
    # Group the candidates by pixel, nearest first (then lowest box): the first of each group owns it.
    pixel_key = slow * (int(fast.max()) + 1) + fast
    if panel is not None:
        pixel_key = (panel * (int(slow.max()) + 1) + slow) * (int(fast.max()) + 1) + fast
    order = np.lexsort((roi, distance_sq, pixel_key))
    sorted_key = pixel_key[order]
    group_start = np.ones(len(order), dtype=bool)
    group_start[1:] = sorted_key[1:] != sorted_key[:-1]
    # A non-owning candidate within the spot radius makes the owner's pixel part of another spot.
    near_other = np.zeros(len(order), dtype=bool)
    near_other[~group_start] = distance_sq[order][~group_start] < spot_radius_px ** 2
    group_id = np.cumsum(group_start) - 1
    group_near_other = np.zeros(int(group_id[-1]) + 1, dtype=bool)
    np.logical_or.at(group_near_other, group_id, near_other)

    owners = order[group_start]
    in_other_spot = np.zeros(len(fast), dtype=bool)
    in_other_spot[owners] = group_near_other
    keep = np.zeros(len(fast), dtype=bool)
    keep[owners] = True
    return BoxPixels(fast[keep], slow[keep], roi[keep], in_other_spot[keep], border[keep],
                     None if panel is None else panel[keep])
