"""Read the integrated lattices and reflections of dials.stills_process shards into numpy arrays.

A shard with prefix ``P`` has ``P_integrated.expt`` (an experiment list, JSON) and
``P_integrated.refl`` (a reflection table). The experiment list is parsed with the json module, not
built into dxtbx models: merging needs only each lattice's identifier, real-space basis, space group
and beam, and at production scale (100,000 lattices) building the models would cost minutes.

Lattices are numbered shard by shard in the order the prefixes are given, then in experiment order
within a shard; :class:`Lattices` and :class:`Observations` hold one rank's share, observations
sorted by lattice (those of one lattice are contiguous).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from xfel_spread.errors import UserInputError
from xfel_spread.io.expt import load_experiment_json
from xfel_spread.io.stills import OUTPUT_SUFFIXES
from xfel_spread.progress import Progress

log = logging.getLogger(__name__)

EXPERIMENTS_SUFFIX = OUTPUT_SUFFIXES["integrated_experiments"]
REFLECTIONS_SUFFIX = OUTPUT_SUFFIXES["integrated_reflections"]
#: Columns of the reflection table merging reads.
REFLECTION_COLUMNS = ("id", "miller_index", "intensity.sum.value", "intensity.sum.variance", "d", "s1", "flags")


class ShardFileError(UserInputError, ValueError):
    """A shard's experiment list or reflection table cannot be read; the message names the file."""


@dataclass
class Lattices:
    """Per-lattice arrays (one row per lattice)."""

    shard: np.ndarray  #: int64 position of the lattice's shard in the prefix list
    identifier: np.ndarray  #: object array of experiment identifiers (str)
    cell: np.ndarray  #: (n, 6) a, b, c (Angstrom), alpha, beta, gamma (degrees)
    a_matrix: np.ndarray  #: (n, 3, 3) reciprocal orientation A = UB (columns a*, b*, c*), 1/Angstrom
    s0: np.ndarray  #: (n, 3) incident beam vector, 1/Angstrom (length 1/wavelength)
    polarization_normal: np.ndarray  #: (n, 3) normal to the beam's polarization plane
    hall_symbol: np.ndarray  #: object array of the crystal models' Hall symbols

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def concatenate(cls, parts: Sequence[Lattices]) -> Lattices:
        if not parts:
            return empty_lattices()
        return cls(**{field.name: np.concatenate([getattr(part, field.name) for part in parts])
                      for field in fields(cls)})

    @property
    def wavelength(self) -> np.ndarray:
        return 1.0 / np.linalg.norm(self.s0, axis=1)


@dataclass
class Observations:
    """Per-observation arrays, sorted by lattice."""

    lattice: np.ndarray  #: int64 row of the observation's lattice in the matching :class:`Lattices`
    hkl: np.ndarray  #: (n, 3) int32 Miller index as integrated (the lattice's own indexing)
    intensity: np.ndarray  #: summation-integrated intensity
    variance: np.ndarray  #: its variance (> 0)
    d: np.ndarray  #: resolution in the lattice's own cell (Angstrom)
    s1: np.ndarray | None  #: (n, 3) diffracted beam vector (dropped, None, once it has been used)

    def __len__(self) -> int:
        return len(self.lattice)

    def select(self, selection) -> Observations:
        return Observations(**{field.name: None if getattr(self, field.name) is None
                               else getattr(self, field.name)[selection] for field in fields(self)})

    @classmethod
    def concatenate(cls, parts: Sequence[Observations]) -> Observations:
        if not parts:
            return empty_observations()
        return cls(**{field.name: np.concatenate([getattr(part, field.name) for part in parts])
                      for field in fields(cls)})


def empty_lattices() -> Lattices:
    return Lattices(np.zeros(0, np.int64), np.zeros(0, object), np.zeros((0, 6)), np.zeros((0, 3, 3)),
                    np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, object))


def empty_observations() -> Observations:
    return Observations(np.zeros(0, np.int64), np.zeros((0, 3), np.int32), np.zeros(0), np.zeros(0), np.zeros(0),
                        np.zeros((0, 3)))


def shard_files(prefix: str) -> tuple[Path, Path]:
    """(experiment list, reflection table) of the shard with output prefix ``prefix``."""
    return Path(f"{prefix}{EXPERIMENTS_SUFFIX}"), Path(f"{prefix}{REFLECTIONS_SUFFIX}")


def shard_blocks(n_shards: int, n_ranks: int) -> list[range]:
    """Contiguous, ordered blocks of shard positions, one per rank, sizes differing by at most one."""
    return [range(n_shards * rank // n_ranks, n_shards * (rank + 1) // n_ranks) for rank in range(n_ranks)]


def cell_parameters(real_space: np.ndarray) -> np.ndarray:
    """(n, 6) cell parameters of (n, 3, 3) real-space bases whose rows are the vectors a, b, c."""
    lengths = np.linalg.norm(real_space, axis=2)

    def angle(first: int, second: int) -> np.ndarray:
        u, v = real_space[:, first], real_space[:, second]
        cosine = (u[:, 0] * v[:, 0] + u[:, 1] * v[:, 1] + u[:, 2] * v[:, 2]) / (lengths[:, first] * lengths[:, second])
        return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))  # contiguous: see postrefine._rotated

    return np.column_stack([lengths, angle(1, 2), angle(0, 2), angle(0, 1)])


def read_experiments(path: Path, shard: int) -> Lattices:
    """The lattices of one experiment list (JSON), tagged with shard position ``shard``."""
    try:
        document = load_experiment_json(path)
        crystals, beams = document["crystal"], document["beam"]
        real_space, halls, directions, wavelengths, normals, identifiers = [], [], [], [], [], []
        for experiment in document["experiment"]:
            crystal, beam = crystals[experiment["crystal"]], beams[experiment["beam"]]
            real_space.append((crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"]))
            halls.append(crystal["space_group_hall_symbol"])
            directions.append(beam["direction"])
            wavelengths.append(beam["wavelength"])
            normals.append(beam["polarization_normal"])
            identifiers.append(experiment.get("identifier", ""))
    except OSError as error:
        raise ShardFileError(f"{path}: cannot read the experiment list ({error.strerror or error})") from error
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ShardFileError(f"{path}: not a readable experiment list ({type(error).__name__}: {error})") from error

    n = len(identifiers)
    if n == 0:
        return empty_lattices()
    basis = np.asarray(real_space, dtype=float).reshape(n, 3, 3)
    direction = np.asarray(directions, dtype=float).reshape(n, 3)
    wavelength = np.asarray(wavelengths, dtype=float)
    if not (np.all(np.isfinite(basis)) and np.all(wavelength > 0) and np.all(np.linalg.norm(direction, axis=1) > 0)):
        raise ShardFileError(f"{path}: a crystal basis or beam is not finite or has zero length")
    # dxtbx's beam direction points from the sample to the source; s0 points along the beam.
    s0 = -direction / np.linalg.norm(direction, axis=1)[:, None] / wavelength[:, None]
    # The rows of the real-space matrix are a, b, c, so its inverse has a*, b*, c* as columns: A = UB.
    a_matrix = np.linalg.inv(basis)
    return Lattices(np.full(n, shard, np.int64), np.array(identifiers, dtype=object), cell_parameters(basis),
                    a_matrix, s0, np.asarray(normals, dtype=float).reshape(n, 3), np.array(halls, dtype=object))


def read_reflections(path: Path, n_lattices: int, identifiers: Sequence[str]) -> Observations:
    """Observations of one reflection table: integrated by summation, positive variance, sorted by lattice.

    ``n_lattices`` and ``identifiers`` are those of the shard's experiment list; the table's ``id``
    column must index it (and its identifier map, where present, must agree).
    """
    from dials.array_family import flex

    try:
        table = flex.reflection_table.from_file(str(path))
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as error:
        # msgpack and dials report a truncated or foreign file in all of these ways (a file that is not
        # msgpack is tried as a legacy pickle)
        raise ShardFileError(f"{path}: not a readable reflection table ({type(error).__name__}: {error})") from error
    if len(table) == 0:
        return empty_observations()
    missing = [column for column in REFLECTION_COLUMNS if column not in table]
    if missing:
        raise ShardFileError(f"{path}: reflection table lacks column(s) {', '.join(missing)}")
    id_map = table.experiment_identifiers()
    for key in id_map.keys():
        if key >= n_lattices or id_map[key] != identifiers[key]:
            raise ShardFileError(f"{path}: experiment identifiers disagree with those of the experiment list")

    lattice = table["id"].as_numpy_array().astype(np.int64)
    if lattice.min() < 0 or lattice.max() >= n_lattices:
        raise ShardFileError(f"{path}: reflection ids outside the {n_lattices} experiments of the experiment list")
    variance = table["intensity.sum.variance"].as_numpy_array()
    keep = table.get_flags(table.flags.integrated_sum).as_numpy_array() & (variance > 0)
    order = np.flatnonzero(keep)
    order = order[np.argsort(lattice[order], kind="stable")]
    hkl = table["miller_index"].as_vec3_double().as_double().as_numpy_array().reshape(-1, 3)
    s1 = table["s1"].as_double().as_numpy_array().reshape(-1, 3)
    return Observations(lattice[order], np.rint(hkl[order]).astype(np.int32),
                        table["intensity.sum.value"].as_numpy_array()[order], variance[order],
                        table["d"].as_numpy_array()[order], s1[order])


def load_shards(prefixes: Sequence[str], positions: Sequence[int],
                progress_interval_s: float = 10.0) -> tuple[Lattices, Observations]:
    """Lattices and observations of the shards ``prefixes[p]`` for p in ``positions``, in that order.

    Observation lattice numbers index the returned :class:`Lattices`.
    """
    lattice_parts, observation_parts = [], []
    n_lattices = n_observations = 0
    start = time.monotonic()
    progress = Progress(len(positions), "loading", log.info, progress_interval_s, items="shards",
                        report_end=False)  # the end has its own line below
    for count, position in enumerate(positions, 1):
        experiments_path, reflections_path = shard_files(prefixes[position])
        lattices = read_experiments(experiments_path, position)
        observations = read_reflections(reflections_path, len(lattices), list(lattices.identifier))
        observations.lattice += n_lattices
        lattice_parts.append(lattices)
        observation_parts.append(observations)
        n_lattices += len(lattices)
        n_observations += len(observations)
        progress.update(count, detail=f" ({n_lattices} lattices)")
    elapsed = time.monotonic() - start
    log.info("loaded %d shards: %d lattices, %d observations in %.1f s (%.0f lattices/s)", len(positions),
             n_lattices, n_observations, elapsed, n_lattices / elapsed if elapsed > 0 else 0.0)
    return Lattices.concatenate(lattice_parts), Observations.concatenate(observation_parts)
