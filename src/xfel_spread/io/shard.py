"""HDF5 shard files: the simulator writes them, DIALS (through ``FormatSPREADShard``) reads them.

The layout is the one in docs/design.md, section "Shard file (HDF5)":

- root attributes ``format``, ``format_version``, ``dataset``, ``n_shots``;
- ``/data``: int32 ``(n_shots, n_slow, n_fast)`` ADU, one gzip+shuffle chunk per image;
- ``/shot_index``, ``/spectrum/energy_ev``, ``/spectrum/photons``;
- ``/detector`` and ``/beam``: groups whose attributes describe the geometry and the sensor.

A multi-panel shard adds the ``/detector`` attributes of :data:`PANEL_ATTRS` (the panels' count and
laboratory frames; every panel ``n_fast`` x ``n_slow`` pixels) and stores ``/data`` as
``(n_shots, n_panels, n_slow, n_fast)``; a file without them is the single panel, as before.

Writing is atomic (a temporary file in the same directory, renamed when complete) and streams
one image at a time, so a shard never has to fit in memory. Every read validates the file and
turns any problem into a one-line :class:`ShardFormatError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import h5py
import numpy as np

from xfel_spread.atomic import atomic_path
from xfel_spread.errors import UserInputError

SHARD_FORMAT = "xfel_spread.shard"
SHARD_FORMAT_VERSION = 1

# Measured on a 3840 x 3840 int32 image (ADC offset 10 + Poisson background 0.3-1.5 photons + 3 ADU
# readout noise + 300 spots; 59 MB raw), per image with shuffle: level 1 8.5 MB, write 0.35 s;
# level 2 8.4 MB, 0.38 s; level 4 8.0 MB, 0.7 s; level 6 7.9 MB, 1.2-1.7 s; without shuffle level 1
# is 13.3 MB. Readout noise bounds the size (entropy), so higher levels buy ~6 % for twice the time
# spent in the simulate job; level 2 is the knee. Reading is 0.2-0.3 s at every level.
GZIP_LEVEL = 2

DETECTOR_ATTRS = (
    "pixel_size_mm",
    "distance_mm",
    "n_fast",
    "n_slow",
    "beam_center_mm",
    "gain_adu_per_photon",
    "adc_offset_adu",
    "trusted_range",
    "thickness_mm",
    "attenuation_length_mm",
    "material",
)
#: Optional /detector attributes of a multi-panel shard: panel count, and per panel (n_panels, 3) the
#: laboratory position of pixel corner (0, 0) and the unit fast and slow axes.
PANEL_ATTRS = ("n_panels", "panel_origin_mm", "panel_fast_axis", "panel_slow_axis")
BEAM_ATTRS = ("polarization_fraction", "polarization_normal")
REQUIRED_DATASETS = ("data", "shot_index", "spectrum/energy_ev", "spectrum/photons")


class ShardFormatError(UserInputError):
    """A file that should be a shard is not readable as one; the message is one line naming it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        # HDF5 messages can span lines; the contract is one line.
        self.problem = " ".join(problem.split())
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):
        # Rebuild from (path, problem), not from args, so the error survives the pickling that
        # carries it out of a multiprocessing worker (DIALS reads images in worker processes).
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class ShardMetadata:
    """Everything in a shard except the images."""

    dataset: str
    n_shots: int
    shot_index: np.ndarray
    energy_ev: np.ndarray
    photons_per_channel: np.ndarray
    detector: dict
    beam: dict


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Appends images, one at a time, to an open shard whose metadata is already written.

    Obtain one from :func:`open_shard_writer`, which owns the file and its atomic rename.
    """

    def __init__(self, h5: h5py.File, n_shots: int, image_shape: tuple[int, int]):
        self._data = h5.create_dataset(
            "data",
            shape=(n_shots, *image_shape),
            dtype=np.int32,
            chunks=(1, *image_shape),
            compression="gzip",
            compression_opts=GZIP_LEVEL,
            shuffle=True,
        )
        self.n_shots = n_shots
        self.n_written = 0

    def append(self, image_adu: np.ndarray) -> None:
        """Write the next image (int32, shape ``(n_slow, n_fast)``, or ``(n_panels, n_slow, n_fast)``)."""
        if self.n_written == self.n_shots:
            raise ValueError(f"shard already holds its {self.n_shots} images")
        # Values are never clipped, so a silent cast could wrap them: insist on the contract dtype.
        if image_adu.dtype != np.int32:
            raise TypeError(f"image {self.n_written}: dtype {image_adu.dtype}, expected int32")
        if image_adu.shape != self._data.shape[1:]:
            raise ValueError(f"image {self.n_written}: shape {image_adu.shape}, expected {self._data.shape[1:]}")
        self._data[self.n_written] = image_adu
        self.n_written += 1


@contextlib.contextmanager
def open_shard_writer(
    path: str | os.PathLike,
    *,
    shot_index,
    energy_ev,
    photons_per_channel,
    detector: dict,
    beam: dict,
    dataset: str,
) -> Iterator[ShardWriter]:
    """Create a shard at ``path``; yield a :class:`ShardWriter` to append its images.

    The file appears under its final name only when the block ends without an exception and
    every shot has its image; otherwise nothing is left behind.
    """
    shot_index = np.asarray(shot_index, dtype=np.int64)
    energy_ev = np.asarray(energy_ev, dtype=np.float64)
    photons_per_channel = np.asarray(photons_per_channel, dtype=np.float64)
    n_shots = _check_metadata(shot_index, energy_ev, photons_per_channel, detector, beam)
    image_shape = shard_image_shape(detector)

    with atomic_path(path) as temporary, h5py.File(temporary, "w") as h5:
        h5.attrs["format"] = SHARD_FORMAT
        h5.attrs["format_version"] = SHARD_FORMAT_VERSION
        h5.attrs["dataset"] = dataset
        h5.attrs["n_shots"] = n_shots
        h5.create_dataset("shot_index", data=shot_index)
        h5.create_dataset("spectrum/energy_ev", data=energy_ev)
        h5.create_dataset("spectrum/photons", data=photons_per_channel)
        h5.create_group("detector").attrs.update(detector)
        h5.create_group("beam").attrs.update(beam)
        writer = ShardWriter(h5, n_shots, image_shape)
        yield writer
        if writer.n_written != n_shots:
            raise ValueError(f"{os.fspath(path)}: got {writer.n_written} images for {n_shots} shots")


def write_shard(
    path: str | os.PathLike,
    images_adu: Iterable[np.ndarray],
    shot_index,
    energy_ev,
    photons_per_channel,
    detector: dict,
    beam: dict,
    dataset: str,
) -> None:
    """Write a whole shard atomically, consuming ``images_adu`` (any iterable) one image at a time."""
    with open_shard_writer(
        path,
        shot_index=shot_index,
        energy_ev=energy_ev,
        photons_per_channel=photons_per_channel,
        detector=detector,
        beam=beam,
        dataset=dataset,
    ) as writer:
        for image_adu in images_adu:
            writer.append(image_adu)


def shard_image_shape(detector) -> tuple[int, ...]:
    """Shape of one image: ``(n_slow, n_fast)``, or ``(n_panels, n_slow, n_fast)`` for a multi-panel
    shard (``detector``: the /detector attributes, a dict or h5py's attribute manager)."""
    shape = (int(detector["n_slow"]), int(detector["n_fast"]))
    return (int(detector["n_panels"]), *shape) if "n_panels" in detector else shape


def _check_metadata(shot_index, energy_ev, photons_per_channel, detector, beam) -> int:
    """Check the metadata is complete and consistent; return the number of shots."""
    panel_attrs = PANEL_ATTRS if any(name in detector for name in PANEL_ATTRS) else ()
    for group, given, expected in (("detector", detector, DETECTOR_ATTRS + panel_attrs), ("beam", beam, BEAM_ATTRS)):
        if set(given) != set(expected):
            missing = sorted(set(expected) - set(given))
            unknown = sorted(set(given) - set(expected))
            raise ValueError(f"{group} attributes: missing {missing}, unknown {unknown}")
    for name in PANEL_ATTRS[1:] if panel_attrs else ():
        if np.shape(detector[name]) != (int(detector["n_panels"]), 3):
            raise ValueError(f"detector attribute {name} has shape {np.shape(detector[name])}, "
                             f"expected (n_panels, 3) = {(int(detector['n_panels']), 3)}")
    if shot_index.ndim != 1 or energy_ev.ndim != 1:
        raise ValueError("shot_index and energy_ev must be 1-D")
    if photons_per_channel.shape != (len(shot_index), len(energy_ev)):
        raise ValueError(
            f"photons_per_channel has shape {photons_per_channel.shape}, "
            f"expected (n_shots, n_channels) = {(len(shot_index), len(energy_ev))}"
        )
    return len(shot_index)


# ---------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def _open_validated(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open ``path`` as a shard; any HDF5 or layout problem becomes a :class:`ShardFormatError`.

    Errors raised while the caller reads (e.g. a corrupt chunk) are translated too.
    """
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise ShardFormatError(path, f"not a readable HDF5 file ({error})") from None
    with h5:
        _check_layout(path, h5)
        try:
            yield h5
        except OSError as error:
            raise ShardFormatError(path, f"corrupt shard ({error})") from None


def _check_layout(path, h5: h5py.File) -> None:
    """Check the root attributes, the required datasets and their shapes against design.md."""
    found_format = h5.attrs.get("format")
    if found_format != SHARD_FORMAT:
        raise ShardFormatError(path, f"not a shard (root attribute format={found_format!r}, expected {SHARD_FORMAT!r})")
    if h5.attrs.get("format_version") != SHARD_FORMAT_VERSION:
        raise ShardFormatError(path, f"unsupported format_version {h5.attrs.get('format_version')!r}")
    missing_root_attrs = [name for name in ("dataset", "n_shots") if name not in h5.attrs]
    if missing_root_attrs:
        raise ShardFormatError(path, f"missing root attributes {missing_root_attrs}")
    for name in REQUIRED_DATASETS:
        if not isinstance(h5.get(name), h5py.Dataset):
            raise ShardFormatError(path, f"missing dataset /{name}")
    for group, names in (("detector", DETECTOR_ATTRS), ("beam", BEAM_ATTRS)):
        missing = [name for name in names if group not in h5 or name not in h5[group].attrs]
        if missing:
            raise ShardFormatError(path, f"missing /{group} attributes {missing}")
    n_shots = int(h5.attrs["n_shots"])
    shapes = {
        "data": (n_shots, *shard_image_shape(h5["detector"].attrs)),
        "shot_index": (n_shots,),
        "spectrum/photons": (n_shots, h5["spectrum/energy_ev"].shape[0]),
    }
    for name, expected in shapes.items():
        if h5[name].shape != expected:
            raise ShardFormatError(path, f"/{name} has shape {h5[name].shape}, expected {expected}")


def _check_shot(path, h5: h5py.File, i: int) -> None:
    n_shots = int(h5.attrs["n_shots"])
    if not 0 <= i < n_shots:
        raise IndexError(f"{os.fspath(path)}: shot {i} out of range (n_shots={n_shots})")


def _attrs_as_python(attrs: h5py.AttributeManager) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars and arrays become numbers and tuples)."""
    values = {}
    for name, value in attrs.items():
        if isinstance(value, np.ndarray):
            value = tuple(value.tolist())
        elif isinstance(value, np.generic):
            value = value.item()
        values[name] = value
    return values


def _image_list(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an image-list shard (images from elsewhere, :mod:`xfel_spread.io.images`), which
    the readers below serve through dxtbx."""
    from xfel_spread.io.images import is_image_list_shard

    return is_image_list_shard(path)


@contextlib.contextmanager
def _image_list_errors(path) -> Iterator[None]:
    from xfel_spread.io.images import ImageInputError

    try:
        yield
    except ImageInputError as error:
        raise ShardFormatError(path, str(error).removeprefix(f"{os.fspath(path)}: ")) from None


def read_shard_metadata(path: str | os.PathLike, multi_panel: bool = False) -> ShardMetadata:
    """Read and validate everything except the images (of an image-list shard: ``image_list_metadata``;
    ``multi_panel``: a stage that reads multi-panel images, to which an image list of several panels
    is described with :data:`PANEL_ATTRS` rather than refused)."""
    if _image_list(path):
        from xfel_spread.io.images import image_list_metadata

        with _image_list_errors(path):
            return image_list_metadata(path, multi_panel)
    with _open_validated(path) as h5:
        return ShardMetadata(
            dataset=str(h5.attrs["dataset"]),
            n_shots=int(h5.attrs["n_shots"]),
            shot_index=h5["shot_index"][()],
            energy_ev=h5["spectrum/energy_ev"][()],
            photons_per_channel=h5["spectrum/photons"][()],
            detector=_attrs_as_python(h5["detector"].attrs),
            beam=_attrs_as_python(h5["beam"].attrs),
        )


def read_shard_image(path: str | os.PathLike, i: int, multi_panel: bool = False) -> np.ndarray:
    """Image ``i`` (zero-based position in the shard) as int32 ``(n_slow, n_fast)`` ADU
    (``(n_panels, n_slow, n_fast)`` for a multi-panel shard; of an image-list shard: read from its file
    through dxtbx, multi-panel images only with ``multi_panel``)."""
    if _image_list(path):
        from xfel_spread.io.images import read_image_list_image

        with _image_list_errors(path):
            return read_image_list_image(path, i, multi_panel)
    with _open_validated(path) as h5:
        _check_shot(path, h5, i)
        return h5["data"][i]


def read_shard_mask(path: str | os.PathLike, multi_panel: bool = False) -> np.ndarray | None:
    """The trusted-pixel mask (bool ``(n_slow, n_fast)``, True = trusted) an image-list shard names
    (``input.mask``, one panel; with ``multi_panel`` also ``(n_panels, n_slow, n_fast)``); None for a
    simulated shard or an image list without a mask."""
    if not _image_list(path):
        return None
    from xfel_spread.io.images import image_list_mask

    with _image_list_errors(path):
        return image_list_mask(path, multi_panel)


def read_shard_spectrum(path: str | os.PathLike, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Spectrum of shot ``i``: (channel energies in eV, photons per channel; an image list's weights)."""
    if _image_list(path):
        from xfel_spread.io.images import read_image_list_shard

        with _image_list_errors(path):
            return read_image_list_shard(path).spectrum(i)
    with _open_validated(path) as h5:
        _check_shot(path, h5, i)
        return h5["spectrum/energy_ev"][()], h5["spectrum/photons"][i]
