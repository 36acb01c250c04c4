"""Figures of the hitfind stage (matplotlib Agg, written atomically).

``plot_powder``: the powder pattern (sum of all shots) beside its radial profile and some shots' own; a
multi-panel powder is drawn with its panels at their laboratory positions (x, y seen along the beam),
or side by side in index order (:func:`panel_montage`) when its radial file has no panel frames; the
radial profile beside it is the one computed over all panels.
``plot_shots``: lit pixels per shot with the hit threshold, and each shot's solvent-ring peak.
``plot_score``: the mean solvent profile against the simulator's background model, and lit pixels of
true hits and blanks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xfel_spread.hitfind.radial import RingPeak
from xfel_spread import plotting

#: Most shot profiles drawn in the powder figure (evenly spaced through the run).
MAX_SHOT_PROFILES = 200
#: The powder image is block-summed down to at most this many pixels a side for display.
DISPLAY_PIXELS = 960


def block_sum(image: np.ndarray, max_pixels: int = DISPLAY_PIXELS) -> np.ndarray:
    """``image`` summed over square blocks so that neither side exceeds ``max_pixels`` (edges cropped)."""
    block = max(1, -(-max(image.shape) // max_pixels))
    n_slow, n_fast = image.shape[0] // block * block, image.shape[1] // block * block
    return image[:n_slow, :n_fast].reshape(n_slow // block, block, n_fast // block, block).sum(axis=(1, 3))


def panel_montage(panels: np.ndarray, max_pixels: int = DISPLAY_PIXELS) -> np.ndarray:
    """Panels ``(n_panels, n_slow, n_fast)`` side by side in index order, row by row on a near-square
    grid, each block-summed by one common factor so the whole fits ``max_pixels`` a side; NaN between
    panels and in unused grid cells."""
    n_panels, n_slow, n_fast = panels.shape
    columns = int(np.ceil(np.sqrt(n_panels)))
    rows = -(-n_panels // columns)
    block = max(1, -(-max(rows * (n_slow + 1), columns * (n_fast + 1)) // max_pixels))
    shown = [block_sum(panel, max(n_slow, n_fast) // block) if block > 1 else panel for panel in panels]
    tile_slow, tile_fast = shown[0].shape
    montage = np.full((rows * (tile_slow + 1) - 1, columns * (tile_fast + 1) - 1), np.nan)
    for index, tile in enumerate(shown):
        row, column = divmod(index, columns)
        montage[row * (tile_slow + 1):row * (tile_slow + 1) + tile_slow,
                column * (tile_fast + 1):column * (tile_fast + 1) + tile_fast] = tile
    return montage


def plot_powder(path, powder: np.ndarray, q_inv_a: np.ndarray, profile: np.ndarray, solvent_profile: np.ndarray,
                shot_profiles: np.ndarray, ring: RingPeak, n_shots: int, detector: dict | None = None) -> None:
    """Powder image (log scale) and radial profiles (photons per pixel at normal incidence) against q.
    A multi-panel powder is drawn with its panels at their laboratory positions when ``detector`` (the
    shard's ``/detector`` attributes) gives them (:class:`xfel_spread.plotting.PanelLayout`), else as
    :func:`panel_montage`."""
    pyplot = plotting.pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(14, 6))
    laid_out = powder.ndim == 3 and detector is not None and "panel_origin_mm" in detector
    if powder.ndim == 2:
        shown = block_sum(powder)
    elif laid_out:
        shown = block_sum(plotting.PanelLayout(detector, powder.shape).picture(powder, fill=0.0))
    else:
        shown = panel_montage(powder)
    positive = shown[shown > 0]
    low = np.percentile(positive, 1) if positive.size else 1.0
    image = left.imshow(np.log10(np.clip(shown, low, None)), cmap="magma", origin="upper")
    figure.colorbar(image, ax=left, label="log10 photons (summed over shots and display blocks)")
    if powder.ndim == 2:
        left.set_title(f"powder pattern: sum of {n_shots} shots")
    elif laid_out:
        left.set_title(f"powder pattern: sum of {n_shots} shots; its {powder.shape[0]} panels at their\n"
                       "laboratory positions seen along the beam", fontsize="medium")
    else:
        left.set_title(f"powder pattern: sum of {n_shots} shots; its {powder.shape[0]} panels in index order,\n"
                       "not at their laboratory positions (the profile uses every panel's own frame)",
                       fontsize="medium")
    left.set_xlabel("laboratory x (display px)" if laid_out else "fast (display px)")
    left.set_ylabel("laboratory -y (display px)" if laid_out else "slow (display px)")

    for shot_profile in shot_profiles:
        right.plot(q_inv_a, shot_profile, color="tab:blue", alpha=0.25, linewidth=0.7)
    right.plot([], [], color="tab:blue", label=f"{len(shot_profiles)} shots' own (Bragg spots clipped)")
    right.plot(q_inv_a, profile, color="black", linewidth=1.5, label="powder sum / shots")
    right.plot(q_inv_a, solvent_profile, color="tab:green", linewidth=1.0, linestyle=":",
               label="powder, Bragg spots clipped (solvent)")
    if np.isfinite(ring.q_inv_a):
        right.axvline(ring.q_inv_a, color="0.4", linestyle="--",
                      label=f"powder ring q = {ring.q_inv_a:.3f} 1/A (d = {ring.d_a:.2f} A)")
    right.set_xlabel("q (1/A)")
    right.set_ylabel("photons per pixel at normal incidence")
    right.set_title("radial profiles")
    right.legend(fontsize="small")
    plotting.save_png(figure, path)


def plot_shots(path, rows: Sequence[dict], is_hit: np.ndarray, threshold) -> None:
    """Lit pixels per shot with the threshold; ring position and intensity per shot."""
    pyplot = plotting.pyplot()
    figure, (left, middle, right) = pyplot.subplots(1, 3, figsize=(17, 5))
    shots = np.array([row["shot"] for row in rows])
    lit = np.array([row["lit_pixels"] for row in rows], dtype=float)
    for mask, colour, label in ((is_hit, "tab:blue", "hit"), (~is_hit, "tab:orange", "miss")):
        left.scatter(shots[mask], 1 + lit[mask], s=10, color=colour, label=f"{label} ({int(mask.sum())})")
        middle.scatter(shots[mask], [rows[i]["ring_q_inv_a"] for i in np.flatnonzero(mask)], s=10, color=colour,
                       label=label)
        right.scatter(shots[mask], [rows[i]["ring_intensity"] for i in np.flatnonzero(mask)], s=10, color=colour,
                      label=label)
    left.axhline(1 + threshold.min_lit_pixels, color="black", linestyle="--",
                 label=f"threshold {threshold.min_lit_pixels:.0f} ({threshold.rule})")
    left.set_yscale("log")
    left.set_xlabel("shot")
    left.set_ylabel("1 + lit pixels")
    left.legend(fontsize="small")
    middle.set_xlabel("shot")
    middle.set_ylabel("solvent-ring peak q (1/A)")
    right.set_xlabel("shot")
    right.set_ylabel("ring peak (photons per pixel at normal incidence)")
    for axis in (middle, right):
        axis.legend(fontsize="small")
    plotting.save_png(figure, path)


def plot_score(path, dataset: str, q_inv_a: np.ndarray, observed: np.ndarray, model: np.ndarray, scale: float,
               lit_true_hits: Sequence[int], lit_blanks: Sequence[int], threshold: float | None) -> None:
    """The mean solvent profile against the scaled background model; lit pixels by true class."""
    pyplot = plotting.pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(14, 5.5))
    figure.suptitle(f"hit finding and solvent profile against the simulation, dataset {dataset}")
    left.plot(q_inv_a, observed, color="black", label="mean of the shots' profiles")
    left.plot(q_inv_a, scale * model, color="tab:red", linestyle="--", label=f"background model x {scale:.3f}")
    left.plot(q_inv_a, observed - scale * model, color="0.5", linewidth=0.8, label="residual")
    left.set_xlabel("q (1/A)")
    left.set_ylabel("photons per pixel at normal incidence")
    left.legend(fontsize="small")
    upper = max([1, *lit_true_hits, *lit_blanks])
    bins = np.logspace(0, np.log10(upper + 1) + 0.1, 40)
    right.hist(1 + np.asarray(lit_true_hits, dtype=float), bins=bins, alpha=0.6, label="crystal in the beam")
    right.hist(1 + np.asarray(lit_blanks, dtype=float), bins=bins, alpha=0.6, label="blank (truth)")
    if threshold is not None:
        right.axvline(1 + threshold, color="black", linestyle="--", label="hit threshold")
    right.set_xscale("log")
    right.set_xlabel("1 + lit pixels")
    right.set_ylabel("shots")
    right.legend(fontsize="small")
    plotting.save_png(figure, path)
