"""Images the pipeline did not write: listing them, their spectra, their trusted-pixel mask.

``input.source: images`` points the pipeline at files or globs of anything dxtbx reads. This module
turns them into a list of shots, each a ``(file, frame)`` pair, without reading any pixels, and finds
each shot's spectrum and the run's mask:

- :func:`expand_images` expands the globs (a glob matching nothing, or a missing file, is a one-line
  :class:`ImageInputError`); :func:`plan_frames` gives each file its frames, one for single-image files
  and, for the container suffixes in :data:`MULTI_IMAGE_SUFFIXES`, as many as dxtbx counts, so a
  listing of 100,000 CBF or SMV files never opens them;
- :func:`check_images` asks dxtbx which format class reads each file: files that none reads are
  recorded with the reason and skipped, unless more than a fraction are unreadable (then one line
  naming the first);
- spectra (:func:`shot_spectra`) come from the format (``imageset``: dxtbx ``get_spectrum``), from a
  table (``table``: :func:`read_spectra_table`, layout below) or from the beam (``monochromatic``: one
  channel at the beam's wavelength); ``energy_offset_ev`` is added to every energy;
- :func:`read_mask` reads a DIALS mask pickle or an HDF5 mask and checks its shape against the detector.

Spectra table layout (tab-separated, one header line, one row per channel)::

    image   energy_ev   weight      [frame]

``image`` names the file as listed (absolute, relative to the table's directory, or its bare name when
no two listed files share it), ``frame`` (optional column, default 0) the image inside a multi-image
file, ``energy_ev`` a channel's energy in eV and ``weight`` its relative photon count (>= 0, not all 0
for one shot; they need not sum to 1). Rows of one shot may come in any order; channels are sorted by
energy. ``../shared/data/external/nanobragg/spectra.tsv`` is in this layout.
"""

from __future__ import annotations

import csv
import glob
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from xfel_spread.errors import UserInputError

#: hc in eV Angstrom, as dxtbx's Spectrum uses it (wavelength_A = HC_EV_A / energy_eV).
HC_EV_A = 12398.419843320026

#: File suffixes (lower case, after any ``.gz``/``.bz2``) that may hold several images: only these
#: files are opened (through dxtbx) to count their frames while planning; every other file is one image.
MULTI_IMAGE_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx5", ".cxi")

#: Where each shot's spectrum comes from (``input.spectra``).
SPECTRA_SOURCES = ("imageset", "table", "monochromatic")

SPECTRA_TABLE_COLUMNS = ("image", "energy_ev", "weight")


class ImageInputError(UserInputError):
    """An image, glob, spectra table or mask that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class Shot:
    """One image of a listed file: ``frame`` is its position inside ``path`` (0 for single-image files)."""

    path: str
    frame: int = 0


@dataclass
class ImageCheck:
    """What :func:`check_images` found: the readable files with their dxtbx format class name, and the
    unreadable ones with the reason."""

    formats: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Listing


def _is_glob(pattern: str) -> bool:
    return glob.has_magic(pattern)


def expand_images(patterns: Sequence[str], base_dir: str | os.PathLike | None = None) -> list[str]:
    """Every file named by ``patterns`` (paths or globs, relative ones to ``base_dir`` or the working
    directory), in the order given, each glob's matches sorted, duplicates dropped.

    Raises ImageInputError ``PATTERN: matches no file`` or ``PATH: no such file``."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ImageInputError("input.images: no image files or globs given")
    files, seen = [], set()
    for pattern in patterns:
        pattern = os.fspath(pattern)
        full = pattern if base_dir is None or os.path.isabs(pattern) else os.path.join(base_dir, pattern)
        if _is_glob(pattern):
            matches = sorted(path for path in glob.glob(full) if os.path.isfile(path))
            if not matches:
                raise ImageInputError(f"{pattern}: matches no file")
        else:
            if not os.path.isfile(full):
                raise ImageInputError(f"{pattern}: no such file")
            matches = [full]
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def _bare_suffix(path: str) -> str:
    """The file's suffix after dropping a compression suffix: ``x.img.gz`` -> ``.img``."""
    name = path.lower()
    for compression in (".gz", ".bz2"):
        if name.endswith(compression):
            name = name[: -len(compression)]
    return os.path.splitext(name)[1]


def may_hold_several_images(path: str) -> bool:
    """Whether planning opens ``path`` to count its frames (its suffix is in MULTI_IMAGE_SUFFIXES)."""
    return _bare_suffix(path) in MULTI_IMAGE_SUFFIXES


def count_frames(path: str) -> int:
    """How many images dxtbx reads from ``path``; ImageInputError when no format class reads it."""
    format_class = format_class_for(path)
    instance = format_class.get_instance(path)
    from dxtbx.format.FormatMultiImage import FormatMultiImage

    if isinstance(instance, FormatMultiImage):
        return int(instance.get_num_images())
    return 1


def plan_frames(files: Iterable[str]) -> list[Shot]:
    """Every shot of ``files``: one per single-image file, ``count_frames`` per multi-image container."""
    shots = []
    for path in files:
        n_frames = count_frames(path) if may_hold_several_images(path) else 1
        if n_frames < 1:
            raise ImageInputError(f"{path}: holds no images")
        shots.extend(Shot(path, frame) for frame in range(n_frames))
    return shots


def list_images(patterns: Sequence[str], base_dir: str | os.PathLike | None = None) -> list[Shot]:
    """The shots of ``patterns``: :func:`expand_images`, then :func:`plan_frames` (no pixels read)."""
    return plan_frames(expand_images(patterns, base_dir))


def shots_digest(shots: Iterable[Shot]) -> str:
    """A short digest of shots (absolute path, frame): an image shard's params, so that it reruns when its
    shots change, and its check that the files it lists are the ones the run planned."""
    import hashlib

    digest = hashlib.sha1()
    for shot in shots:
        digest.update(f"{os.path.abspath(shot.path)}\t{shot.frame}\n".encode())
    return digest.hexdigest()


def shard_shots(shots: Sequence[Shot], shots_per_shard: int) -> list[list[Shot]]:
    """``shots`` split, in order, into shards of ``shots_per_shard`` (the last may be shorter)."""
    if shots_per_shard < 1:
        raise ValueError(f"shots_per_shard must be >= 1, got {shots_per_shard}")
    return [list(shots[start:start + shots_per_shard]) for start in range(0, len(shots), shots_per_shard)]


def format_class_for(path: str):
    """The dxtbx Format class that reads ``path``; ImageInputError ``PATH: problem`` when none does."""
    from dxtbx.format.Registry import get_format_class_for_file

    try:
        format_class = get_format_class_for_file(path)
    except Exception as error:  # dxtbx raises whatever the file's reader raised
        raise ImageInputError(f"{path}: dxtbx cannot read it ({' '.join(str(error).split()) or type(error).__name__})"
                              ) from None
    if format_class is None:
        raise ImageInputError(f"{path}: dxtbx cannot read it (no format class understands the file)")
    return format_class


def check_images(files: Iterable[str], max_unreadable_fraction: float = 0.0) -> ImageCheck:
    """Ask dxtbx about every file: readable ones get their format class name, unreadable ones their reason.

    Raises the first unreadable file's ImageInputError when more than ``max_unreadable_fraction`` of the
    files are unreadable, or when none is readable."""
    check = ImageCheck()
    files = list(files)
    first_error = None
    for path in files:
        try:
            check.formats[path] = format_class_for(path).__name__
        except ImageInputError as error:
            check.unreadable[path] = str(error)
            first_error = first_error or error
    if first_error is not None and (not check.formats or len(check.unreadable) > max_unreadable_fraction * len(files)):
        raise first_error
    return check


# ---------------------------------------------------------------------------------------------
# Spectra


def _table_keys(table_path: str, image: str) -> list[str]:
    """The names a table's ``image`` entry may match: as written, resolved against the table's directory."""
    keys = [image]
    if not os.path.isabs(image):
        keys.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(table_path)), image)))
    return keys


def read_spectra_table(path: str | os.PathLike) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """The spectra table at ``path`` (layout in the module docstring): ``{(image, frame): (energies_ev,
    weights)}``, channels sorted by energy, ``image`` as written in the table.

    Raises ImageInputError ``PATH: problem`` (line number included) for a malformed table."""
    path = os.fspath(path)
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise ImageInputError(f"{path}: empty spectra table")
            header = [name.strip() for name in header]
            missing = [name for name in SPECTRA_TABLE_COLUMNS if name not in header]
            if missing:
                raise ImageInputError(f"{path}: spectra table lacks column(s) {', '.join(missing)} "
                                      f"(needs {' '.join(SPECTRA_TABLE_COLUMNS)} [frame], tab-separated)")
            column = {name: header.index(name) for name in header}
            for line_number, fields in enumerate(reader, start=2):
                if not fields or not "".join(fields).strip():
                    continue
                if len(fields) != len(header):
                    raise ImageInputError(f"{path}: line {line_number}: {len(fields)} fields, header has {len(header)}")
                try:
                    energy = float(fields[column["energy_ev"]])
                    weight = float(fields[column["weight"]])
                    frame = int(fields[column["frame"]]) if "frame" in column else 0
                except ValueError as error:
                    raise ImageInputError(f"{path}: line {line_number}: {error}") from None
                if not np.isfinite(energy) or energy <= 0:
                    raise ImageInputError(f"{path}: line {line_number}: energy_ev {energy} is not a positive number")
                if not np.isfinite(weight) or weight < 0:
                    raise ImageInputError(f"{path}: line {line_number}: weight {weight} is negative or not finite")
                rows.setdefault((fields[column["image"]].strip(), frame), []).append((energy, weight))
    except OSError as error:
        raise ImageInputError(f"{path}: cannot read spectra table: {error.strerror or error}") from None
    spectra = {}
    for key, channels in rows.items():
        channels.sort()
        energies = np.array([energy for energy, _ in channels])
        weights = np.array([weight for _, weight in channels])
        if weights.sum() <= 0:
            raise ImageInputError(f"{path}: {key[0]} frame {key[1]}: every weight is 0")
        spectra[key] = (energies, weights)
    return spectra


def match_table_spectra(table_path: str | os.PathLike, table: Mapping, shots: Sequence[Shot]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each shot's spectrum from a table :func:`read_spectra_table` read, matching the table's ``image``
    to the shot's file by path (absolute or relative to the table) or, when unique, by bare name.

    Raises ImageInputError ``TABLE: no spectrum for FILE frame N`` for a listed shot it lacks."""
    table_path = os.fspath(table_path)
    by_path, by_name, names = {}, {}, {}
    for (image, frame), spectrum in table.items():
        for key in _table_keys(table_path, image):
            by_path[(os.path.normpath(os.path.abspath(key)), frame)] = spectrum
        by_name.setdefault((os.path.basename(image), frame), []).append(spectrum)
    for shot in shots:
        names.setdefault(os.path.basename(shot.path), set()).add(shot.path)
    spectra = []
    for shot in shots:
        spectrum = by_path.get((os.path.normpath(os.path.abspath(shot.path)), shot.frame))
        name = os.path.basename(shot.path)
        if spectrum is None and len(names[name]) == 1 and len(by_name.get((name, shot.frame), [])) == 1:
            spectrum = by_name[(name, shot.frame)][0]
        if spectrum is None:
            raise ImageInputError(f"{table_path}: no spectrum for {shot.path} frame {shot.frame}")
        spectra.append(spectrum)
    return spectra


def shot_spectra(shots: Sequence[Shot], source: str, table_path: str | os.PathLike | None = None,
                 energy_offset_ev: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(energies_ev, weights)`` of every shot, from ``source`` (one of SPECTRA_SOURCES), each energy
    shifted by ``energy_offset_ev``.

    Raises ImageInputError naming the file for a frame without a spectrum (``imageset``), a table
    missing a listed shot (``table``), or a beam without a wavelength (``monochromatic``)."""
    if source not in SPECTRA_SOURCES:
        raise ImageInputError(f"input.spectra: {source!r} is not one of {', '.join(SPECTRA_SOURCES)}")
    if source == "table":
        if table_path is None:
            raise ImageInputError("input.spectra_table: needed with spectra: table")
        spectra = match_table_spectra(table_path, read_spectra_table(table_path), shots)
    else:
        spectra = []
        instances: dict[str, object] = {}
        for shot in shots:
            if shot.path not in instances:
                instances[shot.path] = format_class_for(shot.path).get_instance(shot.path)
            spectra.append(_format_spectrum(instances[shot.path], shot, source))
    return [(energies + energy_offset_ev, weights) for energies, weights in spectra]


def _format_spectrum(instance, shot: Shot, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One shot's spectrum from its dxtbx Format instance (``imageset`` or ``monochromatic``)."""
    from dxtbx.format.FormatMultiImage import FormatMultiImage

    index = shot.frame if isinstance(instance, FormatMultiImage) else None
    if source == "imageset":
        try:
            spectrum = instance.get_spectrum(index) if index is not None else instance.get_spectrum()
        except Exception as error:  # formats raise anything from a missing dataset
            spectrum, problem = None, " ".join(str(error).split())
        else:
            problem = ""
        if spectrum is None and may_hold_several_images(shot.path):
            # NeXus: dxtbx 3.12's FormatNXmx has no spectra; read the NXbeam's own (io.nexus).
            from xfel_spread.io.nexus import read_nexus_spectrum

            try:
                found = read_nexus_spectrum(shot.path, shot.frame)
            except (OSError, KeyError, IndexError, ValueError):
                found = None
            if found is not None:
                return found
        if spectrum is None and problem:
            raise ImageInputError(f"{shot.path}: frame {shot.frame} has no spectrum (spectra: imageset): {problem}")
        if spectrum is None:
            raise ImageInputError(f"{shot.path}: frame {shot.frame} has no spectrum (spectra: imageset); "
                                  "use spectra: table or monochromatic")
        energies = np.array(spectrum.get_energies_eV(), dtype=float)
        weights = np.array(spectrum.get_weights(), dtype=float)
        if energies.size == 0 or weights.sum() <= 0:
            raise ImageInputError(f"{shot.path}: frame {shot.frame} has an empty spectrum (spectra: imageset)")
        return energies, weights
    beam = instance.get_beam(index) if index is not None else instance.get_beam()
    wavelength = None if beam is None else beam.get_wavelength()
    if not wavelength or wavelength <= 0:
        raise ImageInputError(f"{shot.path}: frame {shot.frame} has no beam wavelength (spectra: monochromatic)")
    return np.array([HC_EV_A / wavelength]), np.array([1.0])


# ---------------------------------------------------------------------------------------------
# Masks


def detector_shapes(detector) -> list[tuple[int, int]]:
    """``(n_slow, n_fast)`` of every panel of a dxtbx detector."""
    return [(panel.get_image_size()[1], panel.get_image_size()[0]) for panel in detector]


def read_mask(path: str | os.PathLike, shapes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """The trusted-pixel mask at ``path``, one bool array (True = trusted) per panel, shape (n_slow, n_fast).

    Accepts a DIALS mask pickle (a tuple of flex.bool, one per panel, as dials.generate_mask writes) and
    HDF5: a dataset ``mask`` (bool or integer, nonzero = trusted; 2-D for one panel or panels x slow x
    fast) or a NeXus ``pixel_mask`` (``/entry/instrument/detector/pixel_mask``, nonzero = not trusted).
    With ``shapes`` (e.g. :func:`detector_shapes`), a mask of another shape is an ImageInputError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageInputError(f"{path}: no such mask file")
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        panels = _read_hdf5_mask(path)
    else:
        panels = _read_pickle_mask(path)
    if shapes is not None:
        found = [panel.shape for panel in panels]
        expected = [tuple(shape) for shape in shapes]
        if found != expected:
            raise ImageInputError(f"{path}: mask of {_describe_shapes(found)} does not fit the detector's "
                                  f"{_describe_shapes(expected)}")
    return panels


def _describe_shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    if len(set(shapes)) == 1:
        return f"{len(shapes)} panel(s) of {' x '.join(map(str, shapes[0]))}"
    return f"{len(shapes)} panels of shapes {', '.join(' x '.join(map(str, shape)) for shape in shapes)}"


def _read_pickle_mask(path: str) -> list[np.ndarray]:
    try:
        with open(path, "rb") as handle:
            value = pickle.load(handle)
    except Exception as error:  # unpickling raises many types
        raise ImageInputError(f"{path}: not a DIALS mask pickle nor HDF5 ({type(error).__name__}: "
                              f"{' '.join(str(error).split())})") from None
    items = value if isinstance(value, (tuple, list)) else (value,)
    panels = []
    for item in items:
        try:
            array = item.as_numpy_array() if hasattr(item, "as_numpy_array") else np.asarray(item)
        except Exception:  # noqa: BLE001 - anything not array-like
            array = None
        if array is None or array.ndim != 2:
            raise ImageInputError(f"{path}: a mask pickle holds one 2-D flex.bool per panel, found {type(item).__name__}")
        panels.append(array.astype(bool))
    if not panels:
        raise ImageInputError(f"{path}: the mask pickle holds no panel")
    return panels


def _read_hdf5_mask(path: str) -> list[np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if "mask" in h5:
                array, trusted_when = np.asarray(h5["mask"][()]), True
            elif "entry/instrument/detector/pixel_mask" in h5:
                array, trusted_when = np.asarray(h5["entry/instrument/detector/pixel_mask"][()]), False
            else:
                raise ImageInputError(f"{path}: HDF5 mask has neither a 'mask' dataset nor "
                                      "/entry/instrument/detector/pixel_mask")
    except OSError as error:
        raise ImageInputError(f"{path}: cannot read HDF5 mask: {' '.join(str(error).split())}") from None
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ImageInputError(f"{path}: mask has {array.ndim} dimensions, expected 2 (one panel) or 3 (panels)")
    trusted = array != 0 if trusted_when else array == 0
    return [panel for panel in trusted]



# ---------------------------------------------------------------------------------------------
# Image-list shards: a shard of images from elsewhere, as a list of (file, frame) with spectra

#: Root attribute ``format`` of an image-list shard (``FormatSPREADShard`` reads both kinds of shard).
IMAGE_LIST_FORMAT = "xfel_spread.image_list"
IMAGE_LIST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImageListShard:
    """A shard of images the pipeline did not write: where each shot's pixels are, its spectrum, the mask.

    Spectra share one grid, as in a simulated shard: ``energy_ev`` ``(n_channels,)`` holds every energy
    any shot of the shard has (sorted, to 1e-6 eV), ``weights`` ``(n_shots, n_channels)`` each shot's
    weight there (0 where the shot has no channel). ``unreadable`` holds, per shot, the reason dxtbx
    could not read its file, or "" when it can."""

    path: str
    shots: list[Shot]
    shot_index: np.ndarray
    energy_ev: np.ndarray
    weights: np.ndarray
    unreadable: list[str]
    mask: str | None
    spectra: str

    @property
    def n_shots(self) -> int:
        return len(self.shots)

    def spectrum(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(energies_ev, weights) of shot ``i`` on the shard's grid."""
        return self.energy_ev, self.weights[i]


def is_image_list_shard(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file whose root attribute ``format`` names an image-list shard."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("format") == IMAGE_LIST_FORMAT
    except OSError:
        return False


def write_image_list_shard(path: str | os.PathLike, shots: Sequence[Shot], first_shot: int,
                           spectra: Sequence[tuple[np.ndarray, np.ndarray] | None], unreadable: Sequence[str],
                           mask: str | None, spectra_source: str) -> None:
    """Write an image-list shard atomically (no pixels: the files' paths, frames, spectra on one grid, the
    mask's path); ``spectra[i]`` is None for an unreadable shot."""
    import h5py

    from xfel_spread.atomic import atomic_path

    known = [np.round(np.asarray(spectrum[0], dtype=float), 6) for spectrum in spectra if spectrum is not None]
    energy = np.unique(np.concatenate(known)) if known else np.zeros(0)
    weights = np.zeros((len(shots), len(energy)))
    for i, spectrum in enumerate(spectra):
        if spectrum is not None:
            np.add.at(weights[i], np.searchsorted(energy, np.round(np.asarray(spectrum[0], dtype=float), 6)),
                      spectrum[1])
    files = list(dict.fromkeys(os.path.abspath(shot.path) for shot in shots))
    file_number = {path: number for number, path in enumerate(files)}
    strings = h5py.string_dtype()
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as h5:
        h5.attrs.update({"format": IMAGE_LIST_FORMAT, "format_version": IMAGE_LIST_FORMAT_VERSION,
                         "n_shots": len(shots), "spectra": spectra_source, "mask": mask or ""})
        h5.create_dataset("files", data=np.array(files, dtype=object), dtype=strings)
        h5.create_dataset("file_number", data=np.array([file_number[os.path.abspath(s.path)] for s in shots],
                                                       dtype=np.int64))
        h5.create_dataset("frame", data=np.array([shot.frame for shot in shots], dtype=np.int64))
        h5.create_dataset("shot_index", data=np.arange(first_shot, first_shot + len(shots), dtype=np.int64))
        h5.create_dataset("unreadable", data=np.array(list(unreadable), dtype=object), dtype=strings)
        h5.create_dataset("spectrum/energy_ev", data=energy)
        h5.create_dataset("spectrum/weights", data=weights)


def read_image_list_shard(path: str | os.PathLike) -> ImageListShard:
    """Read an image-list shard; ImageInputError ``PATH: problem`` when it is not one."""
    import h5py

    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != IMAGE_LIST_FORMAT:
                raise ImageInputError(f"{path}: not an image-list shard (format={h5.attrs.get('format')!r})")
            files = [name.decode() if isinstance(name, bytes) else str(name) for name in h5["files"][()]]
            shots = [Shot(files[number], int(frame)) for number, frame in zip(h5["file_number"][()], h5["frame"][()])]
            unreadable = [text.decode() if isinstance(text, bytes) else str(text) for text in h5["unreadable"][()]]
            return ImageListShard(path=path, shots=shots, shot_index=h5["shot_index"][()],
                                  energy_ev=h5["spectrum/energy_ev"][()], weights=h5["spectrum/weights"][()],
                                  unreadable=unreadable, mask=str(h5.attrs["mask"]) or None,
                                  spectra=str(h5.attrs["spectra"]))
    except (OSError, KeyError) as error:
        raise ImageInputError(f"{path}: not a readable image-list shard ({' '.join(str(error).split())})") from None


#: How far (eV) a spectrum's channel may lie outside the structure-factor grid (sim.spectrum.rebin_spectrum's tolerance).
GRID_TOLERANCE_EV = 1e-6


def check_spectra_on_grid(shard: str | os.PathLike, shots: Sequence[Shot],
                          spectra: Sequence[tuple[np.ndarray, np.ndarray] | None], grid_ev: np.ndarray) -> None:
    """Refuse spectra that SPREAD and stage 1 (``stage1.structure_factors: model``) could not put on the
    structure-factor channel grid ``grid_ev`` (increasing energies, eV): ImageInputError, one line naming
    ``shard``, the first shot with a channel outside the grid by more than GRID_TOLERANCE_EV, the spectra's
    energy range, the grid's range and the keys to change. ``spectra[i]`` is None for an unreadable shot
    (skipped). The same bounds as :func:`xfel_spread.sim.spectrum.rebin_spectrum`, checked before the long
    stages rather than when SPREAD reads the shard."""
    grid = np.asarray(grid_ev, dtype=np.float64)
    energies = [np.asarray(spectrum[0], dtype=np.float64) for spectrum in spectra if spectrum is not None]
    energies = [values for values in energies if values.size]
    if not energies or not grid.size:
        return
    low, high = grid[0] - GRID_TOLERANCE_EV, grid[-1] + GRID_TOLERANCE_EV
    for shot, spectrum in zip(shots, spectra):
        if spectrum is None or not np.asarray(spectrum[0]).size:
            continue
        values = np.asarray(spectrum[0], dtype=np.float64)
        if values.min() < low or values.max() > high:
            lowest = min(float(values.min()) for values in energies)
            highest = max(float(values.max()) for values in energies)
            raise ImageInputError(
                f"{os.fspath(shard)}: {shot.path} frame {shot.frame}: spectrum at {values.min():.3f}-"
                f"{values.max():.3f} eV (the shard's spectra {lowest:.3f}-{highest:.3f} eV) lies outside the "
                f"structure-factor channel grid {grid[0]:.3f}-{grid[-1]:.3f} eV on which SPREAD (and stage 1 with "
                "stage1.structure_factors model) evaluates spectra; change structure_factors.channel_start_ev, "
                "channel_step_ev or n_channels (or input.energy_offset_ev), or with no spectra to fit set "
                "spread.enabled false (and stage1.structure_factors merged)")


def make_image_list_shard(path: str | os.PathLike, shots: Sequence[Shot], first_shot: int, spectra_source: str,
                          spectra_table: str | None = None, energy_offset_ev: float = 0.0, mask: str | None = None,
                          max_unreadable_fraction: float = 0.0,
                          channel_grid_ev: np.ndarray | None = None) -> ImageListShard:
    """Check one shard's shots with dxtbx, find their spectra and check the mask, then write the shard.

    Unreadable files are recorded (with dxtbx's reason) and get no spectrum, unless more than
    ``max_unreadable_fraction`` of the shard's files are unreadable (then the first one's one-line
    ImageInputError). The mask must fit the first readable image's detector. With ``channel_grid_ev``
    (the structure-factor channels, given when a stage that evaluates spectra on them will run) every
    spectrum must lie on it (:func:`check_spectra_on_grid`); nothing is written otherwise."""
    files = list(dict.fromkeys(shot.path for shot in shots))
    check = check_images(files, max_unreadable_fraction)
    readable = [shot for shot in shots if shot.path in check.formats]
    found = iter(shot_spectra(readable, spectra_source, spectra_table, energy_offset_ev))
    spectra = [next(found) if shot.path in check.formats else None for shot in shots]
    if channel_grid_ev is not None:
        check_spectra_on_grid(path, shots, spectra, channel_grid_ev)
    if mask is not None:
        first = readable[0].path
        read_mask(mask, detector_shapes(format_class_for(first).get_instance(first).get_detector()))
        mask = os.path.abspath(mask)
    unreadable = [check.unreadable.get(shot.path, "") for shot in shots]
    write_image_list_shard(path, shots, first_shot, spectra, unreadable, mask, spectra_source)
    return read_image_list_shard(path)


def write_list_table(path: str | os.PathLike, shots: Sequence[Shot]) -> None:
    """Write the run's image list atomically: one row per shot, ``shot file frame`` (tab-separated)."""
    from xfel_spread.atomic import atomic_output

    with atomic_output(path, "w") as handle:
        handle.write("shot\tfile\tframe\n")
        handle.writelines(f"{number}\t{os.path.abspath(shot.path)}\t{shot.frame}\n" for number, shot in enumerate(shots))


# ---------------------------------------------------------------------------------------------
# An image-list shard seen as a shard (xfel_spread.io.shard's readers dispatch here)


def _first_readable(listing: ImageListShard) -> int:
    for i, reason in enumerate(listing.unreadable):
        if not reason:
            return i
    raise ImageInputError(f"{listing.path}: no shot of the image list is readable")


def _source(shot: Shot):
    """(dxtbx Format instance of ``shot``'s file, frame to pass it or None for a one-image file)."""
    from dxtbx.format.FormatMultiImage import FormatMultiImage

    instance = format_class_for(shot.path).get_instance(shot.path)
    return instance, (shot.frame if isinstance(instance, FormatMultiImage) else None)


def image_list_metadata(path: str | os.PathLike, multi_panel: bool = False):
    """:class:`xfel_spread.io.shard.ShardMetadata` of an image-list shard, for the stages that read one-panel
    shards (stage 1): detector attributes from the first readable image's dxtbx detector (origin to beam
    centre and distance in the project's frame; gain, pedestal as ADC offset, trusted range, sensor
    thickness and 1/mu), beam polarization, the spectra on the shard's grid. With ``multi_panel`` (the
    stages that read multi-panel images: hit finding) a detector of several panels is described by
    :func:`multipanel_attrs` instead of refused."""
    from xfel_spread.io.shard import ShardMetadata

    listing = read_image_list_shard(path)
    instance, frame = _source(listing.shots[_first_readable(listing)])
    detector = instance.get_detector(frame) if frame is not None else instance.get_detector()
    beam = instance.get_beam(frame) if frame is not None else instance.get_beam()
    beam_attrs = {"polarization_fraction": float(beam.get_polarization_fraction()),
                  "polarization_normal": tuple(float(value) for value in beam.get_polarization_normal())}
    if multi_panel and len(detector) > 1:
        return ShardMetadata(dataset="images", n_shots=listing.n_shots, shot_index=listing.shot_index,
                             energy_ev=listing.energy_ev, photons_per_channel=listing.weights,
                             detector=multipanel_attrs(detector, listing.path), beam=beam_attrs)
    if len(detector) != 1:
        raise ImageInputError(f"{listing.path}: its images' detector has {len(detector)} panels; this stage reads "
                              "one-panel images")
    panel = detector[0]
    origin_x, origin_y, origin_z = panel.get_origin()
    n_fast, n_slow = panel.get_image_size()
    mu = panel.get_mu()
    detector_attrs = {
        "pixel_size_mm": float(panel.get_pixel_size()[0]), "distance_mm": float(-origin_z),
        "n_fast": int(n_fast), "n_slow": int(n_slow), "beam_center_mm": (float(-origin_x), float(origin_y)),
        "gain_adu_per_photon": float(panel.get_gain()), "adc_offset_adu": float(panel.get_pedestal()),
        "trusted_range": tuple(float(value) for value in panel.get_trusted_range()),
        "thickness_mm": float(panel.get_thickness()), "attenuation_length_mm": 1.0 / mu if mu > 0 else 1.0,
        "material": str(panel.get_material() or ""),
    }
    return ShardMetadata(dataset="images", n_shots=listing.n_shots, shot_index=listing.shot_index,
                         energy_ev=listing.energy_ev, photons_per_channel=listing.weights, detector=detector_attrs,
                         beam=beam_attrs)


def _one_or_all(values: list):
    """A per-panel quantity: the single value when every panel has it, else the list."""
    return values[0] if all(value == values[0] for value in values) else values


def multipanel_attrs(detector, path: str) -> dict:
    """``/detector`` attributes of a multi-panel dxtbx detector, as a tiled simulated shard has them
    (``xfel_spread.io.shard.PANEL_ATTRS``: every panel's origin and axes in the laboratory frame), with
    gain, pedestal (ADC offset) and trusted range one value, or one per panel where the panels differ.
    The panels must share one shape, one square pixel size and one sensor (ImageInputError naming
    ``path`` otherwise)."""
    shapes = set(detector_shapes(detector))
    pixels = {tuple(round(float(v), 9) for v in panel.get_pixel_size()) for panel in detector}
    sensors = {(float(panel.get_thickness()), float(panel.get_mu())) for panel in detector}
    square = all(fast == slow for fast, slow in pixels)
    if len(shapes) != 1 or len(pixels) != 1 or len(sensors) != 1 or not square:
        raise ImageInputError(f"{path}: its images' {len(detector)} panels have {len(shapes)} shapes, {len(pixels)} "
                              f"pixel sizes (square: {square}) and {len(sensors)} sensors; hit finding needs one "
                              "shape, one square pixel size and one sensor")
    n_slow, n_fast = shapes.pop()
    first = detector[0]
    mu = float(first.get_mu())
    return {
        "pixel_size_mm": float(first.get_pixel_size()[0]),
        "distance_mm": float(np.mean([abs(float(np.dot(panel.get_origin(), panel.get_normal()))) for panel in detector])),
        "n_fast": int(n_fast), "n_slow": int(n_slow), "beam_center_mm": (0.0, 0.0),
        "gain_adu_per_photon": _one_or_all([float(panel.get_gain()) for panel in detector]),
        "adc_offset_adu": _one_or_all([float(panel.get_pedestal()) for panel in detector]),
        "trusted_range": _one_or_all([tuple(float(v) for v in panel.get_trusted_range()) for panel in detector]),
        "thickness_mm": float(first.get_thickness()), "attenuation_length_mm": 1.0 / mu if mu > 0 else 1.0,
        "material": str(first.get_material() or ""),
        "n_panels": len(detector),
        "panel_origin_mm": [[float(v) for v in panel.get_origin()] for panel in detector],
        "panel_fast_axis": [[float(v) for v in panel.get_fast_axis()] for panel in detector],
        "panel_slow_axis": [[float(v) for v in panel.get_slow_axis()] for panel in detector],
    }


def read_image_list_image(path: str | os.PathLike, i: int, multi_panel: bool = False) -> np.ndarray:
    """Image ``i`` of an image-list shard, read from its file through dxtbx: (n_slow, n_fast), int32 for
    integer data; a multi-panel image or an unreadable shot is an ImageInputError. With ``multi_panel``
    a multi-panel image is ``(n_panels, n_slow, n_fast)`` (its panels must share one shape)."""
    listing = read_image_list_shard(path)
    if not 0 <= i < listing.n_shots:
        raise IndexError(f"{os.fspath(path)}: shot {i} out of range (n_shots={listing.n_shots})")
    if listing.unreadable[i]:
        raise ImageInputError(listing.unreadable[i])
    instance, frame = _source(listing.shots[i])
    data = instance.get_raw_data(frame) if frame is not None else instance.get_raw_data()
    if isinstance(data, tuple):
        if multi_panel and len(data) > 1:
            return _stacked([panel.as_numpy_array() for panel in data], listing.shots[i].path)
        if len(data) != 1:
            raise ImageInputError(f"{listing.shots[i].path}: {len(data)} panels; this stage reads one-panel images")
        data = data[0]
    array = data.as_numpy_array()
    return array.astype(np.int32) if np.issubdtype(array.dtype, np.integer) else array


def _stacked(panels: Sequence[np.ndarray], path: str) -> np.ndarray:
    """Panels of one shape as one ``(n_panels, n_slow, n_fast)`` array (int32 for integer data)."""
    if len({panel.shape for panel in panels}) != 1:
        raise ImageInputError(f"{path}: its {len(panels)} panels differ in shape; hit finding needs one shape")
    array = np.stack(panels)
    return array.astype(np.int32) if np.issubdtype(array.dtype, np.integer) else array


def image_list_mask(path: str | os.PathLike, multi_panel: bool = False) -> np.ndarray | None:
    """The one-panel mask (True = trusted) an image-list shard names, checked against its detector; None without.
    With ``multi_panel`` a mask of several panels is ``(n_panels, n_slow, n_fast)``."""
    listing = read_image_list_shard(path)
    if listing.mask is None:
        return None
    instance, frame = _source(listing.shots[_first_readable(listing)])
    detector = instance.get_detector(frame) if frame is not None else instance.get_detector()
    panels = read_mask(listing.mask, detector_shapes(detector))
    if multi_panel and len(panels) > 1:
        return np.stack(panels).astype(bool)
    if len(panels) != 1:
        raise ImageInputError(f"{listing.path}: its mask has {len(panels)} panels; this stage reads one-panel images")
    return panels[0]
