"""What the per-shot pixel refinement works on for one lattice (one shot), in plain arrays.

The shoebox pixels come from the shot's image in its shard; the spectrum from the same shard (the
shot's own SASE spectrum, as dxtbx reads it); the detector, start crystal and reflections from the
annulus stage's experiment and reflection files. Pixel values are in photons: (ADU - ADC offset) /
gain. The forward model adds its Bragg photons to ``background_photons``, the tilted plane fitted on
each shoebox's border.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfel_spread.sim.geometry import Detector, MultiPanelDetector


@dataclass
class ShotPixels:
    """One lattice's shoeboxes. Pixel arrays have one entry per shoebox pixel, ROI arrays one per reflection."""

    shard: str  #: the simulated shard file holding the image
    shot_index: int  #: global shot number
    image_index: int  #: index of the image inside the shard
    identifier: str  #: DIALS experiment identifier of the lattice
    detector: Detector | MultiPanelDetector  #: the (refined) detector of the lattice's experiment
    energies_ev: np.ndarray  #: (n_channels,) channel energies
    photons: np.ndarray  #: (n_channels,) photons per channel of this shot
    polarization_fraction: float
    gain_adu_per_photon: float
    real_space_matrix: np.ndarray  #: (3, 3) start crystal, rows a, b, c in the laboratory frame (Angstrom)
    space_group: str  #: the crystal's space group symbol, e.g. "C 1 2 1"
    miller_index: np.ndarray  #: (n_roi, 3) int
    roi_bounds: np.ndarray  #: (n_roi, 4) int: x0, x1, y0, y1 (pixels x0 <= x < x1, y0 <= y < y1)
    observed_centroid_px: np.ndarray  #: (n_roi, 2) DIALS's observed centroid (fast, slow), pixel units
    #: (n_roi,) bool: DIALS's spot finder found the reflection (flag ``strong``). Only there is the
    #: observed centroid a measurement of the spot; elsewhere it is the integration centroid of a
    #: weak or absent spot, dominated by background noise.
    strong: np.ndarray
    dials_predicted_px: np.ndarray  #: (n_roi, 2) DIALS's predicted centroid (fast, slow): its xyzcal.px
    pixel_fast: np.ndarray  #: (n_pix,) int
    pixel_slow: np.ndarray  #: (n_pix,) int
    pixel_roi: np.ndarray  #: (n_pix,) int, the ROI each pixel belongs to
    data_photons: np.ndarray  #: (n_pix,) float, measured photons
    background_photons: np.ndarray  #: (n_pix,) float, the ROI's tilted-plane background at the pixel
    trusted: np.ndarray  #: (n_pix,) bool, inside the trusted range and not shared with another ROI
    #: On a :class:`MultiPanelDetector`: (n_pix,) int, each pixel's panel (``pixel_fast``,
    #: ``pixel_slow``, ``roi_bounds`` and the centroids are in that panel's frame); None on one panel.
    pixel_panel: np.ndarray | None = None
    roi_panel: np.ndarray | None = None  #: (n_roi,) int, the panel of each ROI's reflection, or None
    #: (n_pix,) bool: the pixels each ROI's background plane was fitted to (trusted border pixels
    #: the fit's clipping kept), or None where the shot's builder does not say.
    background_fit: np.ndarray | None = None

    @property
    def n_rois(self) -> int:
        return len(self.miller_index)

    @property
    def n_pixels(self) -> int:
        return len(self.pixel_fast)
