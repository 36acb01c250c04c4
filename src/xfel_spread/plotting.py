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
