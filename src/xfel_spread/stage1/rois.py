"""Regions of interest of the per-shot refinement: the annulus reflections' shoeboxes, as ``ShotPixels``.

For every lattice of one annulus shard pair (``{prefix}_annulus.expt`` / ``.refl``) this module reads
the lattice's image once from its shard and keeps only the pixels of a square shoebox around each
reflection:

- **Box.** ``shoebox_size_px`` pixels on a side, placed so that its centre is as close as possible to
  the reflection's observed centroid (``xyzobs.px.value``): ``x0 = round(x - size / 2)``, and the same
  along slow. A box reaching past the panel is clipped at the edge, so it keeps fewer pixels.
- **Overlaps.** A pixel inside two boxes belongs to the reflection whose centroid is nearer to the
  pixel's centre (ties to the reflection listed first), and only to it: every pixel is modelled once.
  A box therefore loses the pixels a nearer neighbour claims.
- **Trusted pixels.** A pixel is trusted when its value lies inside the detector's trusted range
  (inclusive, ADU, from the shard metadata), the mask of an image-list shard (``input.mask``) trusts it,
  and it is outside the *strong spot* of every other
  reflection: closer than ``shoebox_size_px / 4`` to another reflection's centroid. (The shoebox is
  sized to hold the spot in its inner half plus a border; a pixel that close to another centroid
  carries that reflection's light even when it is nearer to its own centroid, as happens for two
  spots closer than half a shoebox.)
- **Background.** A tilted plane ``a + b x + c y`` fitted by least squares to the trusted pixels on
  the box's border (its outermost rows and columns, as clipped), with iterative 3-sigma clipping on
  the median absolute deviation so that a neighbouring spot or a hot pixel on the border does not
  lift the plane, then evaluated at every pixel of the box.
- **Units.** Pixel values become photons, ``(ADU - adc_offset) / gain``, from the shard metadata.

A reflection whose shoebox keeps fewer than three trusted border pixels on a plane (an impossible
background) is dropped, and so is one whose Miller index has no structure factor
(:func:`rois_with_amplitude`); callers count and report them.

The shot's spectrum is read through dxtbx (the experiment's image set asks ``FormatSPREADShard``)
and must equal the shard's own record (:func:`xfel_spread.io.shard.read_shard_spectrum`). The DIALS
panel becomes the simulator's :class:`~xfel_spread.sim.geometry.Detector`, which requires an
axis-aligned panel (the metrology stage keeps the axes fixed).

**Multi-panel detectors.** A DIALS detector of several panels becomes a
:class:`~xfel_spread.sim.geometry.MultiPanelDetector` (any panel orientation). Each reflection's box
lives on the panel of its reflection (the reflection table's ``panel``), in that panel's pixel frame,
and is clipped at that panel's edges: a box that crosses a tile edge keeps only its own panel's
pixels, and pixels of two boxes compete only within one panel. The trusted range is each panel's
(dxtbx's ``get_trusted_range``, which the Format class sets), and a per-panel mask may remove pixels.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from xfel_spread.errors import UserInputError
from xfel_spread.io.shard import (
    ShardMetadata,
    read_shard_image,
    read_shard_mask,
    read_shard_metadata,
    read_shard_spectrum,
)
from xfel_spread.sim.geometry import FAST_AXIS, SLOW_AXIS, Detector, MultiPanelDetector
from xfel_spread.sim.spectrum import rebin_spectrum
from xfel_spread.sim.shoeboxes import BoxPixels, assign_box_pixels, shoebox_bounds  # noqa: F401 (re-exported)
from xfel_spread.sim.structure_factors import AmplitudeGrid
from xfel_spread.stage1.shot import ShotPixels

#: Panel axes must match the simulator's to this tolerance (unit vectors).
AXIS_TOLERANCE = 1e-6
#: Outlier threshold of the border-plane fit, in robust standard deviations.
BACKGROUND_CLIP_SIGMA = 3.0
#: Most rounds of clipping in the border-plane fit.
BACKGROUND_CLIP_ROUNDS = 10
#: The polarization normal the forward model assumes (``sim.geometry.polarization_factor``).
POLARIZATION_NORMAL = (0.0, 1.0, 0.0)


class RoiInputError(UserInputError, ValueError):
    """Annulus files or a shard that cannot give shoeboxes; the message is one line naming the file."""


# ---------------------------------------------------------------------------------------------
# Geometry of the boxes


# ---------------------------------------------------------------------------------------------
# Background


def fit_plane(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """Coefficients (a, b, c) of ``a + b x + c y`` fitted robustly to the points, or None.

    Least squares, then repeatedly dropping points further than 3 robust standard deviations
    (1.4826 x the median absolute deviation) from the plane and refitting, until nothing changes.
    When the spread is zero (an exact plane with a few outliers) anything not on the plane within
    rounding is dropped. None when fewer than three points remain or they lie on a line.
    """
    return fit_plane_points(x, y, values)[0]


def fit_plane_points(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """:func:`fit_plane`'s coefficients (or None) and which points (bool) its last least-squares fit used."""
    x, y, values = (np.asarray(array, dtype=np.float64) for array in (x, y, values))
    keep = np.ones(len(values), dtype=bool)
    coefficients, used = None, keep
    rounding = 1e-9 * max(1.0, float(np.abs(values).max(initial=0.0)))
    for _ in range(BACKGROUND_CLIP_ROUNDS):
        design = np.stack((np.ones(int(keep.sum())), x[keep], y[keep]), axis=1)
        if len(design) < 3 or np.linalg.matrix_rank(design) < 3:
            return None, np.zeros(len(values), dtype=bool)
        coefficients, used = np.linalg.lstsq(design, values[keep], rcond=None)[0], keep
        residuals = values - (coefficients[0] + coefficients[1] * x + coefficients[2] * y)
        spread = 1.4826 * np.median(np.abs(residuals[keep] - np.median(residuals[keep])))
        new_keep = np.abs(residuals) <= max(BACKGROUND_CLIP_SIGMA * spread, rounding)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return coefficients, used


def plane_backgrounds(pixels: BoxPixels, values: np.ndarray, trusted: np.ndarray, n_rois: int,
                      centroids_px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each box's border plane evaluated at its pixels, which boxes have one, and which pixels
    the planes were fitted to.

    The plane is fitted on the trusted border pixels of each box, in coordinates relative to the
    box's centroid (pixel centres), and evaluated at all the box's pixels.
    """
    background = np.zeros(len(values), dtype=np.float64)
    has_background = np.zeros(n_rois, dtype=bool)
    fitted = np.zeros(len(values), dtype=bool)
    x = pixels.fast + 0.5 - centroids_px[pixels.roi, 0]
    y = pixels.slow + 0.5 - centroids_px[pixels.roi, 1]
    starts = np.searchsorted(pixels.roi, np.arange(n_rois + 1))
    for index in range(n_rois):
        box = slice(starts[index], starts[index + 1])
        fit_points = pixels.on_border[box] & trusted[box]
        coefficients, used = fit_plane_points(x[box][fit_points], y[box][fit_points], values[box][fit_points])
        if coefficients is not None:
            background[box] = coefficients[0] + coefficients[1] * x[box] + coefficients[2] * y[box]
            has_background[index] = True
            fitted[starts[index] + np.flatnonzero(fit_points)[used]] = True
    return background, has_background, fitted


# ---------------------------------------------------------------------------------------------
# Detector, spectrum, crystal


def detector_from_dials(dials_detector, shard_detector: dict, source: str | os.PathLike) -> Detector:
    """The simulator's :class:`Detector` for a one-panel DIALS detector with axes (1,0,0), (0,-1,0).

    Distance is ``-origin_z`` and the beam centre ``(-origin_x, origin_y)`` mm; sensor thickness and
    attenuation length come from the shard's metadata (``shard_detector``). A detector of several
    panels becomes a :class:`MultiPanelDetector` (every panel's own frame, the same sensor).
    """
    if len(dials_detector) > 1:
        try:
            return MultiPanelDetector.from_dxtbx(dials_detector, float(shard_detector["thickness_mm"]),
                                                 float(shard_detector["attenuation_length_mm"]))
        except ValueError as error:
            raise RoiInputError(f"{source}: {error}") from None
    if len(dials_detector) != 1:
        raise RoiInputError(f"{source}: detector has {len(dials_detector)} panels; stage 1 needs one")
    panel = dials_detector[0]
    fast_axis, slow_axis = np.array(panel.get_fast_axis()), np.array(panel.get_slow_axis())
    if (np.abs(fast_axis - FAST_AXIS).max() > AXIS_TOLERANCE
            or np.abs(slow_axis - SLOW_AXIS).max() > AXIS_TOLERANCE):
        raise RoiInputError(
            f"{source}: panel axes fast {tuple(np.round(fast_axis, 8))} slow {tuple(np.round(slow_axis, 8))} "
            f"are not {FAST_AXIS} and {SLOW_AXIS}; the forward model needs an axis-aligned panel")
    pixel_fast, pixel_slow = panel.get_pixel_size()
    if abs(pixel_fast - pixel_slow) > 1e-9:
        raise RoiInputError(f"{source}: pixels are not square ({pixel_fast} x {pixel_slow} mm)")
    origin_x, origin_y, origin_z = panel.get_origin()
    n_fast, n_slow = panel.get_image_size()
    return Detector(n_fast=int(n_fast), n_slow=int(n_slow), pixel_size_mm=float(pixel_fast),
                    distance_mm=float(-origin_z), beam_center_mm=(float(-origin_x), float(origin_y)),
                    thickness_mm=float(shard_detector["thickness_mm"]),
                    attenuation_length_mm=float(shard_detector["attenuation_length_mm"]))


def check_polarization(beam, source: str | os.PathLike) -> None:
    """The forward model polarizes with the normal (0, 1, 0); a dxtbx beam with another is an error."""
    normal = np.array(beam.get_polarization_normal())
    if np.abs(normal - POLARIZATION_NORMAL).max() > AXIS_TOLERANCE:
        raise RoiInputError(f"{source}: beam polarization normal {tuple(normal)} is not {POLARIZATION_NORMAL}")


def shot_spectrum(experiment, shard_path: str | os.PathLike, image_index: int) -> tuple[np.ndarray, np.ndarray]:
    """The shot's (energies in eV, photons per channel) through dxtbx, checked against the shard's record."""
    spectrum = experiment.imageset.get_spectrum(0)
    energies = np.array(spectrum.get_energies_eV(), dtype=np.float64)
    photons = np.array(spectrum.get_weights(), dtype=np.float64)
    shard_energies, shard_photons = read_shard_spectrum(shard_path, image_index)
    if not (np.array_equal(energies, shard_energies) and np.array_equal(photons, shard_photons)):
        raise RoiInputError(f"{shard_path}: image {image_index}: the spectrum dxtbx reads differs from the shard's")
    return energies, photons


def real_space_matrix(crystal) -> np.ndarray:
    """A dxtbx crystal's real-space matrix, rows a, b, c in the laboratory frame (Angstrom)."""
    return np.array([list(vector) for vector in crystal.get_real_space_vectors()], dtype=np.float64)


def space_group_symbol(crystal) -> str:
    return crystal.get_space_group().info().type().lookup_symbol()


# ---------------------------------------------------------------------------------------------
# Reading an annulus shard


@dataclass
class AnnulusShard:
    """One annulus file pair opened for stage 1, with the shard it points at."""

    experiments_path: Path
    reflections_path: Path
    shard_path: Path
    experiments: object  #: dxtbx ExperimentList, image sets with their Format class
    reflections: object  #: DIALS reflection table
    metadata: ShardMetadata
    #: The image-list shard's trusted-pixel mask (input.mask; True = trusted), or None.
    mask: np.ndarray | None = None

    @property
    def n_lattices(self) -> int:
        return len(self.experiments)

    def image_index(self, lattice: int) -> int:
        return int(self.experiments[lattice].imageset.indices()[0])


#: Reflection columns the shoeboxes need.
REQUIRED_COLUMNS = ("id", "miller_index", "xyzobs.px.value")


def open_annulus_shard(prefix: str | os.PathLike, shard_path: str | os.PathLike) -> AnnulusShard:
    """Open ``{prefix}_annulus.expt`` / ``.refl``; check that every experiment's image is in
    ``shard_path`` and that its panel and beam are ones the forward model describes."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments_path = Path(f"{prefix}_annulus.expt")
    reflections_path = Path(f"{prefix}_annulus.refl")
    metadata = read_shard_metadata(shard_path, multi_panel=True)
    for path in (experiments_path, reflections_path):
        if not path.is_file():
            raise RoiInputError(f"{path}: no such file")
    try:
        experiments = ExperimentList.from_file(str(experiments_path), check_format=True)
    except Exception as error:  # dxtbx raises many kinds, with multi-line text
        raise RoiInputError(f"{experiments_path}: cannot read experiments ({_first_line(error)})") from None
    try:
        reflections = flex.reflection_table.from_file(str(reflections_path))
    except Exception as error:
        raise RoiInputError(f"{reflections_path}: cannot read reflections ({_first_line(error)})") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in reflections]
    if missing:
        raise RoiInputError(f"{reflections_path}: reflections lack column(s) {', '.join(missing)}")
    for position, experiment in enumerate(experiments):
        paths = experiment.imageset.paths()
        if len(paths) != 1 or not _same_file(paths[0], shard_path):
            raise RoiInputError(f"{experiments_path}: experiment {position} reads {list(paths)}, not {shard_path}")
        # Geometry the forward model cannot describe is the whole shard's problem, not one shot's.
        detector_from_dials(experiment.detector, metadata.detector, experiments_path)
        check_polarization(experiment.beam, experiments_path)
    return AnnulusShard(experiments_path, reflections_path, Path(shard_path), experiments, reflections, metadata,
                        read_shard_mask(shard_path, multi_panel=True))


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class RoiCounts:
    """What happened to one lattice's reflections on the way to shoeboxes."""

    reflections: int = 0  #: annulus reflections of the lattice
    no_background: int = 0  #: dropped: no plane could be fitted on the border
    no_amplitude: int = 0  #: dropped: no structure factor (set by the caller)


def shot_pixels(annulus: AnnulusShard, lattice: int, image_adu: np.ndarray,
                shoebox_size_px: int) -> tuple[ShotPixels, RoiCounts]:
    """The shoeboxes of lattice ``lattice`` (its position in the experiment list) on its image.

    ``image_adu`` is the lattice's image (n_slow, n_fast) as stored in the shard; on a multi-panel
    detector one (n_slow, n_fast) image per panel (a sequence, or an array (n_panels, n_slow, n_fast)).
    """
    experiment = annulus.experiments[lattice]
    image_index = annulus.image_index(lattice)
    metadata = annulus.metadata
    detector = detector_from_dials(experiment.detector, metadata.detector, annulus.experiments_path)
    multipanel = isinstance(detector, MultiPanelDetector)
    if multipanel:
        shapes = [tuple(np.shape(image)) for image in image_adu]
        expected = [(int(p.n_slow), int(p.n_fast)) for p in detector.panels]
        if shapes != expected:
            raise RoiInputError(f"{annulus.shard_path}: image {image_index} has panel shapes {shapes[:3]}... "
                                f"({len(shapes)} panels), the detector {expected[:3]}... ({len(expected)} panels)")
    elif image_adu.shape != (detector.n_slow, detector.n_fast):
        raise RoiInputError(f"{annulus.shard_path}: image {image_index} has shape {image_adu.shape}, "
                            f"the detector {(detector.n_slow, detector.n_fast)}")
    beam = experiment.beam
    check_polarization(beam, annulus.experiments_path)
    energies, photons = shot_spectrum(experiment, annulus.shard_path, image_index)

    selection = np.flatnonzero(annulus.reflections["id"].as_numpy_array() == lattice)
    table = annulus.reflections.select(_flex_size_t(selection))
    miller_index = np.array(table["miller_index"].as_vec3_double(), dtype=np.int64).reshape(-1, 3)
    centroids = np.array(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, :2]
    strong = (table["flags"].as_numpy_array() & int(table.flags.strong)) != 0
    dials_predicted = np.array(table["xyzcal.px"], dtype=np.float64).reshape(-1, 3)[:, :2]
    counts = RoiCounts(reflections=len(selection))

    roi_panel = None
    if multipanel:
        roi_panel = table["panel"].as_numpy_array().astype(np.int64)
        bounds, pixels = panel_box_pixels(detector, roi_panel, centroids, shoebox_size_px)
        adu = panel_values(image_adu, pixels.panel, pixels.slow, pixels.fast)
        ranges = np.array([panel.get_trusted_range() for panel in experiment.detector], dtype=np.float64)
        minimum_adu, maximum_adu = ranges[pixels.panel, 0], ranges[pixels.panel, 1]
    else:
        bounds = shoebox_bounds(centroids, shoebox_size_px, detector.n_fast, detector.n_slow)
        pixels = assign_box_pixels(bounds, centroids, shoebox_size_px / 4.0)
        adu = image_adu[pixels.slow, pixels.fast].astype(np.float64)
        minimum_adu, maximum_adu = metadata.detector["trusted_range"]
    trusted = (adu >= minimum_adu) & (adu <= maximum_adu) & ~pixels.in_other_spot
    if annulus.mask is not None:
        if annulus.mask.ndim == 3:  # one mask per panel
            trusted &= annulus.mask[pixels.panel, pixels.slow, pixels.fast]
        else:
            trusted &= annulus.mask[pixels.slow, pixels.fast]
    offset = np.asarray(metadata.detector["adc_offset_adu"], dtype=np.float64)
    if offset.ndim:  # an image list's panels may each have their own (io.images.multipanel_attrs)
        offset = offset[pixels.panel]
    gain = np.asarray(metadata.detector["gain_adu_per_photon"], dtype=np.float64)
    if gain.ndim:
        # The likelihood's readout variance takes one gain (ADU per photon) for the shot.
        raise RoiInputError(f"{annulus.shard_path}: its panels' gains differ ({sorted(set(gain.tolist()))[:3]}...); "
                            "stage 1 needs one gain for every panel")
    photons_px = (adu - offset) / gain
    background, has_background, fitted = plane_backgrounds(pixels, photons_px, trusted, len(miller_index), centroids)
    counts.no_background = int((~has_background).sum())

    shot = ShotPixels(
        shard=str(annulus.shard_path),
        shot_index=int(metadata.shot_index[image_index]),
        image_index=image_index,
        identifier=experiment.identifier,
        detector=detector,
        energies_ev=energies,
        photons=photons,
        polarization_fraction=float(beam.get_polarization_fraction()),
        gain_adu_per_photon=float(metadata.detector["gain_adu_per_photon"]),
        real_space_matrix=real_space_matrix(experiment.crystal),
        space_group=space_group_symbol(experiment.crystal),
        miller_index=miller_index,
        roi_bounds=bounds,
        observed_centroid_px=centroids,
        strong=strong,
        dials_predicted_px=dials_predicted,
        pixel_fast=pixels.fast,
        pixel_slow=pixels.slow,
        pixel_roi=pixels.roi,
        data_photons=photons_px,
        background_photons=background,
        trusted=trusted,
        pixel_panel=pixels.panel,
        roi_panel=roi_panel,
        background_fit=fitted,
    )
    return select_rois(shot, has_background), counts


def panel_box_pixels(detector: MultiPanelDetector, roi_panel: np.ndarray, centroids_px: np.ndarray,
                     shoebox_size_px: int) -> tuple[np.ndarray, BoxPixels]:
    """Boxes (bounds) and their pixels on a multi-panel detector: each box on its reflection's panel,
    clipped at that panel's edges, pixels shared only within a panel (:func:`assign_box_pixels`)."""
    roi_panel = np.asarray(roi_panel, dtype=np.int64)
    bounds = shoebox_bounds(centroids_px, shoebox_size_px, detector.n_fast_per_panel[roi_panel],
                            detector.n_slow_per_panel[roi_panel])
    return bounds, assign_box_pixels(bounds, centroids_px, shoebox_size_px / 4.0, roi_panel)


def panel_values(images, panel: np.ndarray, slow: np.ndarray, fast: np.ndarray) -> np.ndarray:
    """Values (float64) of pixels (panel, slow, fast) of per-panel images (a sequence or a 3-D array)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return images[panel, slow, fast].astype(np.float64)
    values = np.empty(len(panel), dtype=np.float64)
    for index in np.unique(panel):
        mine = panel == index
        values[mine] = np.asarray(images[int(index)])[slow[mine], fast[mine]]
    return values


def _flex_size_t(indices: np.ndarray):
    from scitbx.array_family import flex

    return flex.size_t(indices.astype(np.uint64))


def select_rois(shot: ShotPixels, keep: np.ndarray) -> ShotPixels:
    """The shot with only the ROIs where ``keep`` is true (and their pixels), ROIs renumbered."""
    keep = np.asarray(keep, dtype=bool)
    new_number = np.cumsum(keep) - 1
    pixel_keep = keep[shot.pixel_roi]
    return replace(
        shot,
        miller_index=shot.miller_index[keep],
        roi_bounds=shot.roi_bounds[keep],
        observed_centroid_px=shot.observed_centroid_px[keep],
        strong=shot.strong[keep],
        dials_predicted_px=shot.dials_predicted_px[keep],
        pixel_fast=shot.pixel_fast[pixel_keep],
        pixel_slow=shot.pixel_slow[pixel_keep],
        pixel_roi=new_number[shot.pixel_roi[pixel_keep]],
        data_photons=shot.data_photons[pixel_keep],
        background_photons=shot.background_photons[pixel_keep],
        trusted=shot.trusted[pixel_keep],
        pixel_panel=None if shot.pixel_panel is None else shot.pixel_panel[pixel_keep],
        roi_panel=None if shot.roi_panel is None else shot.roi_panel[keep],
        background_fit=None if shot.background_fit is None else shot.background_fit[pixel_keep],
    )


def rois_with_amplitude(grid: AmplitudeGrid, miller_index: np.ndarray) -> np.ndarray:
    """Which Miller indices (n, 3) have a non-zero amplitude in some channel of the grid."""
    miller_index = np.asarray(miller_index, dtype=np.int64).reshape(-1, 3)
    offset = miller_index - np.asarray(grid.hkl_min)
    inside = ((offset >= 0) & (offset < np.array(grid.values.shape[1:]))).all(axis=1)
    present = np.zeros(len(miller_index), dtype=bool)
    if inside.any():
        inner = offset[inside]
        present[inside] = (grid.values[:, inner[:, 0], inner[:, 1], inner[:, 2]] > 0).any(axis=0)
    return present


#: Channels this close (eV) are the same channels (:func:`xfel_spread.sim.spectrum.rebin_spectrum`'s bound).
SAME_CHANNEL_EV = 1e-6


def same_channels(energies_ev: np.ndarray, channels_ev: np.ndarray) -> bool:
    """Whether a spectrum's channel energies are ``channels_ev``, each within SAME_CHANNEL_EV."""
    energies, channels = np.asarray(energies_ev, dtype=np.float64), np.asarray(channels_ev, dtype=np.float64)
    return energies.shape == channels.shape and bool(np.all(np.abs(energies - channels) <= SAME_CHANNEL_EV))


def spectrum_on_channels(energies_ev: np.ndarray, weights: np.ndarray, channels_ev: np.ndarray,
                         source: str) -> tuple[np.ndarray, np.ndarray]:
    """A spectrum on the channels ``channels_ev``: its channels of nonzero weight put on them by
    :func:`xfel_spread.sim.spectrum.rebin_spectrum` (total weight and mean energy kept; the same arrays
    when already on them, within SAME_CHANNEL_EV). A spectrum outside them is refused with one line starting with ``source``
    (:class:`~xfel_spread.sim.spectrum.SpectrumGridError`)."""
    energies, values = np.asarray(energies_ev, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if same_channels(energies, channels_ev):
        return energies_ev, weights
    channels = np.asarray(channels_ev, dtype=np.float64)
    lit = values != 0
    return rebin_spectrum(energies[lit], values[lit], channels, source)


def shot_on_channels(shot: ShotPixels, channels_ev: np.ndarray, shard_path) -> ShotPixels:
    """The shot with its spectrum on ``channels_ev`` (:func:`spectrum_on_channels`); the same shot when
    already on them."""
    energies, photons = spectrum_on_channels(shot.energies_ev, shot.photons, channels_ev,
                                             f"{shard_path}: image {shot.image_index}")
    return shot if energies is shot.energies_ev else replace(shot, energies_ev=energies, photons=photons)


def annulus_on_channels(annulus: AnnulusShard, channels_ev: np.ndarray) -> AnnulusShard:
    """The annulus shard with its metadata's spectra on ``channels_ev``, those of a model's amplitude
    table when they are not the shard's (images from elsewhere carry their spectra on their own energies).

    Every shot's spectrum is put on them here, before any lattice is refined, so a spectrum outside
    them is refused at once with one line naming the shard and image (SpectrumGridError); each lattice's
    shot is then put on the same channels as it is read (:func:`shot_on_channels`). Unchanged when the
    shard's channels are these."""
    metadata = annulus.metadata
    if same_channels(metadata.energy_ev, channels_ev):
        return annulus
    channels = np.asarray(channels_ev, dtype=np.float64)
    photons = np.array([spectrum_on_channels(metadata.energy_ev, row, channels,
                                             f"{annulus.shard_path}: image {image}")[1]
                        for image, row in enumerate(metadata.photons_per_channel)]).reshape(-1, channels.size)
    return replace(annulus, metadata=replace(metadata, energy_ev=channels, photons_per_channel=photons))


def read_lattices(annulus: AnnulusShard, lattices, shoebox_size_px: int, on_error):
    """Yield ``(lattice, ShotPixels, RoiCounts)`` for the given lattices, reading each image once.

    Lattices are taken in the given order, grouped by image (an image holding two lattices is read
    once for both, when both are asked for). A lattice whose shoeboxes cannot be made (unreadable
    image, bad geometry) is passed to ``on_error(lattice, error)`` and skipped, so one bad shot does
    not stop the others.
    """
    by_image: dict[int, list[int]] = defaultdict(list)
    for lattice in lattices:
        by_image[annulus.image_index(lattice)].append(int(lattice))
    for image_index, image_lattices in by_image.items():
        try:
            image_adu = read_shard_image(annulus.shard_path, image_index, multi_panel=True)
        except Exception as error:  # a corrupt chunk fails this image's lattices only
            for lattice in image_lattices:
                on_error(lattice, error)
            continue
        for lattice in image_lattices:
            try:
                shot, counts = shot_pixels(annulus, lattice, image_adu, shoebox_size_px)
            except Exception as error:
                on_error(lattice, error)
                continue
            yield lattice, shot, counts
