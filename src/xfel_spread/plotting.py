"""Matplotlib for the pipeline's figures: the headless Agg backend, and PNGs written atomically."""

from __future__ import annotations

from xfel_spread.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (jobs run on nodes without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as module

    return module


def save_png(figure, path) -> None:
    """Lay out ``figure``, write it to ``path`` as PNG atomically, and free it."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot().close(figure)


class PanelLayout:
    """A multi-panel image drawn as one picture: every panel's pixels at their laboratory x, y (the
    detector seen along the beam, distances dropped), on a grid of the pixel size.

    ``detector`` is a shard's ``/detector`` attributes with ``panel_origin_mm``, ``panel_fast_axis``,
    ``panel_slow_axis`` (laboratory frame, one row per panel) and ``pixel_size_mm``. Grid column grows
    with laboratory x, row with -y, so a single panel with the usual axes keeps its own orientation.
    """

    def __init__(self, detector: dict, shape: tuple[int, int, int]):
        import numpy as np

        self.origin = np.asarray(detector["panel_origin_mm"], dtype=np.float64)
        self.fast = np.asarray(detector["panel_fast_axis"], dtype=np.float64)
        self.slow = np.asarray(detector["panel_slow_axis"], dtype=np.float64)
        self.pixel = float(detector["pixel_size_mm"])
        n_panels, n_slow, n_fast = shape
        if len(self.origin) != n_panels:
            raise ValueError(f"the image has {n_panels} panels, the detector {len(self.origin)}")
        corners = np.array([[0, 0], [n_fast, 0], [0, n_slow], [n_fast, n_slow]], dtype=np.float64)
        xy = self.laboratory_xy(np.repeat(np.arange(n_panels), 4), np.tile(corners, (n_panels, 1)))
        self.x_min, self.y_max = float(xy[:, 0].min()), float(xy[:, 1].max())
        # The panels' extent in whole pixels (a rounding hair over a whole number does not add one).
        self.n_columns = max(1, int(np.ceil((xy[:, 0].max() - self.x_min) / self.pixel - 1e-6)))
        self.n_rows = max(1, int(np.ceil((self.y_max - xy[:, 1].min()) / self.pixel - 1e-6)))
        self.shape = shape

    def laboratory_xy(self, panel, pixel_xy):
        """Laboratory (x, y) mm of panel pixel coordinates (fast, slow; a pixel's centre is at i + 0.5)."""
        import numpy as np

        panel = np.asarray(panel, dtype=np.int64)
        pixel_xy = np.asarray(pixel_xy, dtype=np.float64).reshape(-1, 2)
        position = (self.origin[panel] + self.pixel * (pixel_xy[:, :1] * self.fast[panel]
                                                       + pixel_xy[:, 1:2] * self.slow[panel]))
        return position[:, :2]

    def to_picture(self, panel, pixel_xy):
        """Picture coordinates (column, row; continuous) of panel pixel coordinates."""
        import numpy as np

        xy = self.laboratory_xy(panel, pixel_xy)
        return np.stack(((xy[:, 0] - self.x_min) / self.pixel, (self.y_max - xy[:, 1]) / self.pixel), axis=1)

    def picture(self, image, fill: float | None = None):
        """``image`` (n_panels, n_slow, n_fast) as one 2-D picture; grid cells no pixel falls in hold
        ``fill`` (the image's minimum by default)."""
        import numpy as np

        n_panels, n_slow, n_fast = self.shape
        slow, fast = np.meshgrid(np.arange(n_slow) + 0.5, np.arange(n_fast) + 0.5, indexing="ij")
        centres = np.stack((fast.ravel(), slow.ravel()), axis=1)
        picture = np.full((self.n_rows, self.n_columns), float(np.min(image)) if fill is None else fill)
        for panel in range(n_panels):
            column, row = np.floor(self.to_picture(np.full(len(centres), panel), centres)).astype(np.int64).T
            column, row = np.clip(column, 0, self.n_columns - 1), np.clip(row, 0, self.n_rows - 1)
            picture[row, column] = np.asarray(image[panel], dtype=np.float64).ravel()
        return picture
