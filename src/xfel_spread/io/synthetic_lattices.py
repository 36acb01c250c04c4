"""Files of synthetic integrated lattices, in the layout dials.stills_process writes.

Each shard prefix ``P`` gets ``P_integrated.expt`` (one experiment per lattice: its identifier, a C2
crystal, its own beam and one shared detector), ``P_integrated.refl`` (a DIALS reflection table with
the columns stills_process writes) and ``P_truth.npz`` (the true parameters behind them). A dataset
directory also holds ``truth_intensities.npz``, the intensities every lattice samples. The lattices
themselves are made by :mod:`xfel_spread.sim.lattices`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from xfel_spread.atomic import atomic_output, atomic_path
from xfel_spread.errors import UserInputError
from xfel_spread.io.stills import OUTPUT_SUFFIXES

#: stills_process's integrated outputs of a prefix (``xfel_spread.io.stills.OUTPUT_SUFFIXES``).
INTEGRATED_EXPERIMENTS_SUFFIX = OUTPUT_SUFFIXES["integrated_experiments"]
INTEGRATED_REFLECTIONS_SUFFIX = OUTPUT_SUFFIXES["integrated_reflections"]
#: Per-shard file of true lattice and reflection parameters, beside the integrated files.
TRUTH_SUFFIX = "_truth.npz"
#: The truth intensities of a dataset directory.
TRUTH_INTENSITIES = "truth_intensities.npz"

#: Reflection-table flags (dials.array_family.flex.reflection_table.flags values).
FLAG_PREDICTED, FLAG_INDEXED, FLAG_USED_IN_REFINEMENT = 1, 4, 8
FLAG_STRONG, FLAG_REFERENCE_SPOT, FLAG_INTEGRATED_SUM = 32, 64, 256
#: Flags of a reflection whose spot was found and indexed (the "strong" ones in stills_process output).
FLAGS_FOUND_SPOT = FLAG_INDEXED | FLAG_USED_IN_REFINEMENT | FLAG_STRONG | FLAG_REFERENCE_SPOT

#: The flex type of every column written, by name (the types stills_process writes).
COLUMN_TYPES = {
    "background.dispersion": "double", "background.mean": "double", "background.mse": "double",
    "background.sum.value": "double", "background.sum.variance": "double", "bbox": "int6", "d": "double",
    "delpsical.rad": "double", "entering": "bool", "flags": "size_t", "id": "int",
    "intensity.sum.value": "double", "intensity.sum.variance": "double", "miller_index": "miller_index",
    "num_pixels.background": "int", "num_pixels.background_used": "int", "num_pixels.foreground": "int",
    "num_pixels.valid": "int", "panel": "size_t", "partial_id": "size_t", "partiality": "double",
    "s1": "vec3_double", "xyzcal.mm": "vec3_double", "xyzcal.px": "vec3_double",
    "xyzobs.mm.value": "vec3_double", "xyzobs.mm.variance": "vec3_double",
    "xyzobs.px.value": "vec3_double", "xyzobs.px.variance": "vec3_double",
}


class SyntheticDataError(UserInputError, ValueError):
    """Synthetic-data input or directory that cannot be used, with the file named."""


@dataclass(frozen=True)
class TruthIntensities:
    """True intensities on one anomalous asymmetric unit (Friedel mates separate)."""

    unit_cell: tuple[float, ...]
    space_group: str
    miller_index: np.ndarray
    intensity: np.ndarray


def save_truth_intensities(truth: TruthIntensities, path: str | os.PathLike) -> None:
    """Write the truth as .npz (miller_index, intensity, unit_cell, space_group), atomically."""
    with atomic_output(path, "wb") as stream:
        np.savez(stream, miller_index=truth.miller_index, intensity=truth.intensity,
                 unit_cell=np.asarray(truth.unit_cell), space_group=np.asarray(truth.space_group))


def load_truth_intensities(path: str | os.PathLike) -> TruthIntensities:
    """Read a file written by :func:`save_truth_intensities`."""
    try:
        with np.load(path) as data:
            return TruthIntensities(unit_cell=tuple(float(v) for v in data["unit_cell"]),
                                    space_group=str(data["space_group"]),
                                    miller_index=data["miller_index"], intensity=data["intensity"])
    except (OSError, KeyError, ValueError) as exc:
        raise SyntheticDataError(f"{path}: cannot read truth intensities ({exc})") from None


@dataclass(frozen=True)
class DetectorModel:
    """The one panel every lattice shares (mm) and the crystal and beam settings written with it."""

    distance_mm: float
    pixel_size_mm: float
    n_pixels: int
    beam_center_mm: tuple[float, float]
    polarization_normal: tuple[float, float, float]
    space_group_hall: str


def experiment_list_json(identifiers: Sequence[str], recorded_matrix: np.ndarray, wavelength: np.ndarray,
                         rs: np.ndarray, model: DetectorModel) -> dict:
    """The .expt content: one experiment per lattice with its crystal and beam, one shared detector.

    ``recorded_matrix`` (n, 3, 3) holds each lattice's real-space rows a, b, c; ``rs`` its spot radius.
    There is no image behind synthetic lattices, so no imageset (dxtbx reads experiments without one).
    """
    panel = {
        "name": "Panel", "type": "SENSOR_CCD", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, -1.0, 0.0],
        "origin": [-model.beam_center_mm[0], model.beam_center_mm[1], -model.distance_mm],
        "raw_image_offset": [0, 0], "image_size": [model.n_pixels, model.n_pixels],
        "pixel_size": [model.pixel_size_mm, model.pixel_size_mm], "trusted_range": [-0.5, 2147483646.5],
        "thickness": 0.032, "material": "Gd2O2S", "mu": 58.8235294117647, "identifier": "", "mask": [],
        "gain": 1.0, "pedestal": 10.0, "px_mm_strategy": {"type": "SimplePxMmStrategy"},
    }
    hierarchy = {
        "name": "", "type": "", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, 1.0, 0.0],
        "origin": [0.0, 0.0, 0.0], "raw_image_offset": [0, 0], "image_size": [0, 0], "pixel_size": [0.0, 0.0],
        "trusted_range": [0.0, 0.0], "thickness": 0.0, "material": "", "mu": 0.0, "identifier": "", "mask": [],
        "gain": 1.0, "pedestal": 0.0, "px_mm_strategy": {"type": "SimplePxMmStrategy"}, "children": [{"panel": 0}],
    }
    experiments, crystals, beams = [], [], []
    for i, identifier in enumerate(identifiers):
        experiments.append({"__id__": "Experiment", "identifier": str(identifier), "beam": i, "detector": 0, "crystal": i})
        a, b, c = recorded_matrix[i]
        crystals.append({"__id__": "crystal", "real_space_a": a.tolist(), "real_space_b": b.tolist(),
                         "real_space_c": c.tolist(), "space_group_hall_symbol": model.space_group_hall,
                         # The rs model's spot radius is the inverse domain size; it has no mosaic spread.
                         "ML_half_mosaicity_deg": 0.0, "ML_domain_size_ang": float(1.0 / rs[i])})
        beams.append({"direction": [0.0, 0.0, 1.0], "wavelength": float(wavelength[i]), "divergence": 0.0,
                      "sigma_divergence": 0.0, "polarization_normal": list(model.polarization_normal),
                      "polarization_fraction": 1.0, "flux": 0.0, "transmission": 1.0})
    return {"__id__": "ExperimentList", "experiment": experiments, "imageset": [], "beam": beams,
            "detector": [{"panels": [panel], "hierarchy": hierarchy}], "goniometer": [], "scan": [],
            "crystal": crystals, "profile": [], "scaling_model": []}


def _to_flex(flex, type_name: str, values: np.ndarray):
    """Convert one numpy column to its flex type.

    Vector columns go through a flat flex array: flex's own numpy conversion of (n, 3) and (n, 6)
    arrays loops in Python (0.1-0.2 s per column of 50,000 rows), the flat route is a copy.
    """
    if type_name == "vec3_double":
        return flex.vec3_double(flex.double(np.ascontiguousarray(values, dtype=np.float64).ravel()))
    if type_name == "int6":
        return flex.int6(flex.int(np.ascontiguousarray(values, dtype=np.int32).ravel()))
    if type_name == "miller_index":
        return flex.miller_index(*(flex.int(np.ascontiguousarray(values[:, axis], dtype=np.int32)) for axis in range(3)))
    return getattr(flex, type_name)(np.ascontiguousarray(values))


def reflection_table(columns: Mapping[str, np.ndarray], identifiers: Sequence[str]):
    """A ``flex.reflection_table`` of the columns, with the experiment-identifier map id -> identifier."""
    from dials.array_family import flex

    table = flex.reflection_table()
    for name, values in columns.items():
        table[name] = _to_flex(flex, COLUMN_TYPES[name], values)
    identifier_map = table.experiment_identifiers()
    for index, identifier in enumerate(identifiers):
        identifier_map[index] = str(identifier)
    return table


def write_integrated(prefix: str | os.PathLike, experiments: dict, columns: Mapping[str, np.ndarray],
                     identifiers: Sequence[str]) -> None:
    """Write ``P_integrated.expt`` (the JSON of :func:`experiment_list_json`) and ``P_integrated.refl``, atomically."""
    prefix = str(prefix)
    with atomic_output(prefix + INTEGRATED_EXPERIMENTS_SUFFIX, "w") as stream:
        json.dump(experiments, stream)
    with atomic_path(prefix + INTEGRATED_REFLECTIONS_SUFFIX) as temporary:
        reflection_table(columns, identifiers).as_file(str(temporary))


def save_lattice_truth(prefix: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``P_truth.npz`` with the named arrays (in the given order), atomically."""
    with atomic_output(str(prefix) + TRUTH_SUFFIX, "wb") as stream:
        np.savez(stream, **arrays)


def load_lattice_truth(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of ``P_truth.npz`` (written by :func:`save_lattice_truth`), by name."""
    path = str(prefix) + TRUTH_SUFFIX
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise SyntheticDataError(f"{path}: cannot read lattice truth ({exc})") from None


def shard_written(prefix: str | os.PathLike) -> bool:
    """Whether all three files of a shard prefix are on disk (each is written atomically)."""
    prefix = str(prefix)
    return all(os.path.isfile(prefix + suffix) for suffix in (
        INTEGRATED_EXPERIMENTS_SUFFIX, INTEGRATED_REFLECTIONS_SUFFIX, TRUTH_SUFFIX))
