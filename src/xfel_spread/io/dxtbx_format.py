"""``FormatSPREADShard``: the dxtbx Format class that lets DIALS read simulated shards.

Registered through the ``dxtbx.format`` entry point ``"FormatSPREADShard:FormatHDF5"``, so dxtbx
asks it about every file that ``FormatHDF5`` accepts. A shard is a multi-image file of stills:
``dials.import`` makes one ImageSet of ``n_shots`` images and one experiment per image, each with
its own beam, because each shot has its own SASE spectrum.

All file access goes through :mod:`xfel_spread.io.shard`, which owns the layout and validation.

The same class reads image-list shards (:mod:`xfel_spread.io.images`): a shard of images from elsewhere
that holds no pixels, only each shot's file and frame, its spectrum and the run's mask. It opens each
listed file through the dxtbx format class that reads it, hands on its pixels and detector (every
panel, as that format builds them), gives each shot its own beam at its spectrum's weighted wavelength
and the mask as the static mask. dxtbx finds format classes through entry points, so one class
serving both kinds keeps the project at one entry point.
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np
from dxtbx.format.FormatHDF5 import FormatHDF5
from dxtbx.format.FormatStill import FormatStill
from dxtbx.model import Beam, Detector, SimplePxMmStrategy, Spectrum
from dxtbx.model.beam import BeamFactory
from dxtbx.model.detector import DetectorFactory
from libtbx.utils import Sorry
from scitbx.array_family import flex

from xfel_spread.io.images import (
    IMAGE_LIST_FORMAT,
    ImageInputError,
    format_class_for,
    read_image_list_shard,
    read_mask,
)
from xfel_spread.io.shard import SHARD_FORMAT, ShardFormatError, read_shard_image, read_shard_metadata

# The laboratory frame of docs/design.md: the beam travels along -z, the panel's fast axis is +x,
# its slow axis -y, and it lies in the plane z = -distance.
FAST_AXIS = (1.0, 0.0, 0.0)
SLOW_AXIS = (0.0, -1.0, 0.0)
# dxtbx stores the beam's ``direction`` from the sample towards the source, so s0 = -direction/lambda
# = (0, 0, -1/lambda): the beam travelling along -z.
SAMPLE_TO_SOURCE = (0.0, 0.0, 1.0)
#: How many of an image list's files a reader keeps open (dxtbx Format instances), oldest dropped first.
_OPEN_SOURCES = 4


class ShardFormatSorry(ShardFormatError, Sorry):
    """A :class:`ShardFormatError` that DIALS programs print as one line, ``Sorry: FILE: problem``.

    DIALS lets ``Sorry`` through its "please report this error" wrapper, and libtbx's exception
    hook prints it without a traceback: a broken shard is the user's data, not a DIALS bug.
    """


@contextlib.contextmanager
def _shard_errors_as_sorry():
    """Re-raise the shard reader's errors as :class:`ShardFormatSorry`."""
    try:
        yield
    except ShardFormatError as error:
        raise ShardFormatSorry(error.path, error.problem) from None


class FormatSPREADShard(FormatHDF5, FormatStill):
    """Multi-shot still HDF5 shards written by :func:`xfel_spread.io.shard.write_shard`, and image-list
    shards written by :func:`xfel_spread.io.images.write_image_list_shard`."""

    @staticmethod
    def understand(image_file):
        """True for HDF5 files whose root attribute ``format`` names the shard or image-list format."""
        try:
            with h5py.File(image_file, "r") as h5:
                return h5.attrs.get("format") in (SHARD_FORMAT, IMAGE_LIST_FORMAT)
        except OSError:
            return False

    def setup(self):
        self._image_list = None
        with h5py.File(self._image_file, "r") as h5:
            is_image_list = h5.attrs.get("format") == IMAGE_LIST_FORMAT
        if is_image_list:
            self._setup_image_list()
            return
        # Replaces FormatStill.setup, which swallows errors while building the models: a shard
        # with bad metadata should say what is wrong (ShardFormatError), not load without a beam.
        with _shard_errors_as_sorry():
            self._metadata = read_shard_metadata(self._image_file)
        self._detector_instance = self._detector()
        self._beams = [self._beam(i) for i in range(self._metadata.n_shots)]
        self._beam_instance = self._beams[0]

    def _detector(self) -> Detector:
        """One flat panel at the nominal beam centre, as the simulator's metadata describes it; or,
        for a multi-panel shard, its panels as children of the detector's root (hierarchy level 1)."""
        detector = self._metadata.detector
        if "n_panels" in detector:
            return self._multipanel_detector(detector)
        pixel_size_mm = detector["pixel_size_mm"]
        beam_x_mm, beam_y_mm = detector["beam_center_mm"]
        # The corner of pixel (0, 0) sits so that the direct beam meets the panel at the beam centre.
        origin = (-beam_x_mm, beam_y_mm, -detector["distance_mm"])
        minimum_adu, maximum_adu = detector["trusted_range"]
        return DetectorFactory.make_detector(
            # The Rayonix MX340-HS is a phosphor-coupled CCD.
            stype="SENSOR_CCD",
            fast_axis=FAST_AXIS,
            slow_axis=SLOW_AXIS,
            origin=origin,
            pixel_size=(pixel_size_mm, pixel_size_mm),
            image_size=(detector["n_fast"], detector["n_slow"]),
            # The file's range is inclusive on integer ADU. dxtbx up to 3.12 masks outside the
            # open interval (min, max) and later versions outside [min, max]; widening by half an
            # ADU gives the same mask on integer data under either rule.
            trusted_range=(minimum_adu - 0.5, maximum_adu + 0.5),
            # The simulator models how many photons the sensor captures at oblique incidence but
            # not where inside its depth they are absorbed, so spots carry no parallax shift and
            # DIALS must not correct for one: no ParallaxCorrectedPxMmStrategy.
            px_mm=SimplePxMmStrategy(),
            thickness=detector["thickness_mm"],
            material=detector["material"],
            mu=1.0 / detector["attenuation_length_mm"],
            # With gain and pedestal set, ImageSet.get_corrected_data (what spot finding and
            # integration read) is (ADU - offset) / gain, i.e. photons.
            gain=detector["gain_adu_per_photon"],
            pedestal=detector["adc_offset_adu"],
        )

    def _multipanel_detector(self, detector: dict) -> Detector:
        """The panels of a multi-panel shard, each with the frame the file gives and the sensor of
        the single panel (same trusted range, gain, pedestal, no parallax correction)."""
        multipanel = Detector()
        root = multipanel.hierarchy()
        minimum_adu, maximum_adu = detector["trusted_range"]
        pixel_size_mm = detector["pixel_size_mm"]
        for index in range(int(detector["n_panels"])):
            panel = root.add_panel()
            panel.set_name(f"panel_{index}")
            panel.set_type("SENSOR_PAD")
            panel.set_frame(tuple(detector["panel_fast_axis"][index]), tuple(detector["panel_slow_axis"][index]),
                            tuple(detector["panel_origin_mm"][index]))
            panel.set_pixel_size((pixel_size_mm, pixel_size_mm))
            panel.set_image_size((int(detector["n_fast"]), int(detector["n_slow"])))
            panel.set_trusted_range((minimum_adu - 0.5, maximum_adu + 0.5))
            panel.set_px_mm_strategy(SimplePxMmStrategy())
            panel.set_thickness(detector["thickness_mm"])
            panel.set_material(detector["material"])
            panel.set_mu(1.0 / detector["attenuation_length_mm"])
            panel.set_gain(detector["gain_adu_per_photon"])
            panel.set_pedestal(detector["adc_offset_adu"])
        return multipanel

    def _beam(self, index: int = 0) -> Beam:
        """The beam of shot ``index``: wavelength from that shot's photon-weighted mean energy."""
        beam = self._metadata.beam
        return BeamFactory.make_polarized_beam(
            sample_to_source=SAMPLE_TO_SOURCE,
            wavelength=self.get_spectrum(index).get_weighted_wavelength(),
            polarization=beam["polarization_normal"],
            polarization_fraction=beam["polarization_fraction"],
        )

    def _setup_image_list(self):
        """Models of an image-list shard: the first readable image's detector and beam, per-shot wavelengths."""
        try:
            self._image_list = read_image_list_shard(self._image_file)
        except ImageInputError as error:
            raise Sorry(str(error)) from None
        readable = [i for i, reason in enumerate(self._image_list.unreadable) if not reason]
        if not readable:
            raise Sorry(f"{self._image_file}: no shot of the image list is readable")
        self._sources = {}
        first, frame = self._source(readable[0])
        self._detector_instance = first.get_detector(frame) if frame is not None else first.get_detector()
        template = first.get_beam(frame) if frame is not None else first.get_beam()
        self._beams = []
        for i in range(self._image_list.n_shots):
            beam = Beam(template)
            if not self._image_list.unreadable[i]:
                beam.set_wavelength(self.get_spectrum(i).get_weighted_wavelength())
            self._beams.append(beam)
        self._beam_instance = self._beams[0]

    def _source(self, index: int):
        """(dxtbx Format instance of shot ``index``'s file, the frame to pass it or None for a one-image file)."""
        shot = self._image_list.shots[index]
        if shot.path not in self._sources:
            if len(self._sources) >= _OPEN_SOURCES:  # a shard of 500 one-image files: keep a few open
                self._sources.pop(next(iter(self._sources)))
            try:
                self._sources[shot.path] = format_class_for(shot.path).get_instance(shot.path)
            except ImageInputError as error:
                raise Sorry(str(error)) from None
        instance = self._sources[shot.path]
        from dxtbx.format.FormatMultiImage import FormatMultiImage

        return instance, (shot.frame if isinstance(instance, FormatMultiImage) else None)

    def get_static_mask(self):
        """An image list's static mask (True = trusted), one flex.bool per panel: input.mask, combined with
        the first readable image's own format's static mask; None when neither has one."""
        if self._image_list is None:
            return None
        readable = [i for i, reason in enumerate(self._image_list.unreadable) if not reason]
        first, _ = self._source(readable[0])
        own = first.get_static_mask()
        if self._image_list.mask is None:
            return own
        try:
            from xfel_spread.io.images import detector_shapes

            panels = read_mask(self._image_list.mask, detector_shapes(self._detector_instance))
        except ImageInputError as error:
            raise Sorry(str(error)) from None
        masks = [flex.bool(panel) for panel in panels]
        if own is not None:
            masks = [mask & other for mask, other in zip(masks, own)]
        return tuple(masks)

    def get_num_images(self) -> int:
        if self._image_list is not None:
            return self._image_list.n_shots
        return self._metadata.n_shots

    def get_beam(self, index=None) -> Beam:
        return self._beams[0 if index is None else index]

    def get_spectrum(self, index=None) -> Spectrum:
        """Spectrum of shot ``index`` (position in the file; ``ImageSet.get_spectrum`` passes it)."""
        index = 0 if index is None else index
        if self._image_list is not None:
            energies, weights = self._image_list.spectrum(index)
            if weights.sum() <= 0:
                raise Sorry(f"{self._image_file}: shot {index} has no spectrum")
            return Spectrum(flex.double(energies), flex.double(weights))
        photons = self._metadata.photons_per_channel[index]
        if photons.sum() <= 0:
            raise ShardFormatSorry(self._image_file, f"shot {index} has no photons in its spectrum")
        return Spectrum(flex.double(self._metadata.energy_ev), flex.double(photons))

    def get_raw_data(self, index=None):
        """Image ``index`` in ADU as flex.int with shape (n_slow, n_fast); a tuple of one per panel
        for a multi-panel shard; an image list's images as their own format gives them (a tuple of
        panels for a multi-panel detector)."""
        if self._image_list is not None:
            instance, frame = self._source(0 if index is None else index)
            return instance.get_raw_data(frame) if frame is not None else instance.get_raw_data()
        with _shard_errors_as_sorry():
            image = read_shard_image(self._image_file, 0 if index is None else index)
        if image.ndim == 3:
            return tuple(flex.int(np.ascontiguousarray(panel)) for panel in image)
        return flex.int(image)
