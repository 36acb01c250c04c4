"""Files of the hitfind stage: per-shard measurements, hits, radial profiles and powder sums.

Per shard (``hitfind/{dataset}/shard_NNNNN``):

``_lit.tsv``
    per shot: ``shot image lit_pixels photons trusted_pixels wavelength_a ring_q_inv_a ring_d_a
    ring_two_theta_deg ring_intensity`` (ring columns empty when the panel misses the ring window);
``_radial.npz``
    the bins (mean radius px, mean 2-theta rad, pixels), per shot its radial profile (photons per
    pixel at normal incidence, Bragg spots clipped), wavelength and spectrum, and the shard's
    detector and beam attributes (JSON), so later steps rebuild the geometry without the images;
``_powder.npz``
    the shard's powder sum (photons per pixel, shots trusting each pixel), added up per dataset;
``_hits.tsv``
    per shot: ``shot lit_pixels photons is_hit`` (1 or 0), written once the run's threshold is known.

Every file is written atomically; a table that cannot be read is a one-line :class:`HitfindFileError`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xfel_spread.atomic import atomic_output
from xfel_spread.errors import UserInputError
from xfel_spread.io.tables import NAN_TEXT, write_table

if TYPE_CHECKING:  # the measurements' module imports torch, which the tables' readers (index jobs) do not need
    from xfel_spread.hitfind.pixels import PowderSum, ShotMeasurement

LIT_COLUMNS = ("shot", "image", "lit_pixels", "photons", "trusted_pixels", "wavelength_a", "ring_q_inv_a",
               "ring_d_a", "ring_two_theta_deg", "ring_intensity")
HITS_COLUMNS = ("shot", "lit_pixels", "photons", "is_hit")


class HitfindFileError(UserInputError, ValueError):
    """A hitfind file that is missing, malformed or inconsistent; the message is one line naming it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {' '.join(str(problem).split())}")


def _number(value: float) -> str:
    """A float cell: six significant digits, a NaN or infinite value as the empty cell (NAN_TEXT)."""
    return NAN_TEXT if not math.isfinite(value) else f"{value:.6g}"


def read_tsv(path, columns: Sequence[str]) -> list[dict]:
    """Rows of a TSV whose header must be ``columns``; a missing file or header is a HitfindFileError."""
    try:
        with open(path, newline="") as stream:
            reader = csv.DictReader(stream, delimiter="\t")
            if tuple(reader.fieldnames or ()) != tuple(columns):
                raise HitfindFileError(path, f"header {reader.fieldnames}, expected {list(columns)}")
            return list(reader)
    except OSError as error:
        raise HitfindFileError(path, f"cannot read ({error.strerror or error})") from None


def write_lit_table(path, first_shot: int, measurements: Sequence[ShotMeasurement],
                    wavelengths_a: Sequence[float]) -> None:
    rows = []
    for image, (shot, wavelength) in enumerate(zip(measurements, wavelengths_a)):
        ring = shot.ring
        rows.append([first_shot + image, image, shot.lit_pixels, f"{shot.photons:.6g}", shot.trusted_pixels,
                     f"{wavelength:.6f}", _number(ring.q_inv_a), _number(ring.d_a), _number(ring.two_theta_deg),
                     _number(ring.intensity)])
    write_table(path, LIT_COLUMNS, rows)


def _float(value: str) -> float:
    return float(value) if value else float("nan")


def read_lit_table(path) -> list[dict]:
    """Rows of a ``_lit.tsv`` (shot, image, lit_pixels, trusted_pixels as int; the rest float, NaN if empty)."""
    rows = read_tsv(path, LIT_COLUMNS)
    try:
        return [{key: int(row[key]) if key in ("shot", "image", "lit_pixels", "trusted_pixels") else _float(row[key])
                 for key in LIT_COLUMNS} for row in rows]
    except ValueError as error:
        raise HitfindFileError(path, f"bad value ({error})") from None


def write_hits_table(path, rows: Sequence[dict], is_hit: Sequence[bool]) -> None:
    write_table(path, HITS_COLUMNS, [[row["shot"], row["lit_pixels"], f"{row['photons']:.6g}", int(bool(hit))]
                                   for row, hit in zip(rows, is_hit)])


def read_hits_table(path) -> list[dict]:
    """Rows of a ``_hits.tsv``: shot and lit_pixels as int, photons float, is_hit bool."""
    rows = read_tsv(path, HITS_COLUMNS)
    try:
        parsed = [{"shot": int(row["shot"]), "lit_pixels": int(row["lit_pixels"]), "photons": float(row["photons"]),
                   "is_hit": int(row["is_hit"])} for row in rows]
    except ValueError as error:
        raise HitfindFileError(path, f"bad value ({error})") from None
    if any(row["is_hit"] not in (0, 1) for row in parsed):
        raise HitfindFileError(path, "is_hit must be 0 or 1")
    for row in parsed:
        row["is_hit"] = bool(row["is_hit"])
    return parsed


def hit_images(path, first_shot: int, n_images: int) -> list[int]:
    """Images (positions in the shard) of the shots ``path`` marks as hits; it must list every shot."""
    rows = read_hits_table(path)
    shots = [row["shot"] for row in rows]
    if shots != list(range(first_shot, first_shot + n_images)):
        raise HitfindFileError(path, f"lists shots {shots[:3]}... ({len(shots)}), expected "
                                     f"{first_shot}..{first_shot + n_images - 1}")
    return [row["shot"] - first_shot for row in rows if row["is_hit"]]


@dataclass
class ShardRadial:
    """The content of a ``_radial.npz``."""

    bin_radius_px: np.ndarray
    bin_two_theta_rad: np.ndarray
    pixels_per_bin: np.ndarray
    normal_pixel_factor: float
    bin_width_px: float
    shots: np.ndarray
    wavelengths_a: np.ndarray
    energy_ev: np.ndarray
    photons_per_channel: np.ndarray
    profiles: np.ndarray
    detector: dict
    beam: dict


def write_radial(path, radial: ShardRadial) -> None:
    with atomic_output(path, "wb") as stream:
        np.savez(stream, bin_radius_px=radial.bin_radius_px, bin_two_theta_rad=radial.bin_two_theta_rad,
                 pixels_per_bin=radial.pixels_per_bin, normal_pixel_factor=radial.normal_pixel_factor,
                 bin_width_px=radial.bin_width_px, shots=radial.shots, wavelengths_a=radial.wavelengths_a,
                 energy_ev=radial.energy_ev, photons_per_channel=radial.photons_per_channel,
                 profiles=radial.profiles, detector=json.dumps(radial.detector), beam=json.dumps(radial.beam))


def read_radial(path) -> ShardRadial:
    try:
        with np.load(path) as data:
            return ShardRadial(data["bin_radius_px"], data["bin_two_theta_rad"], data["pixels_per_bin"],
                               float(data["normal_pixel_factor"]), float(data["bin_width_px"]), data["shots"],
                               data["wavelengths_a"], data["energy_ev"], data["photons_per_channel"],
                               data["profiles"], json.loads(str(data["detector"])), json.loads(str(data["beam"])))
    except (OSError, KeyError, ValueError) as error:
        raise HitfindFileError(path, f"not a radial-profile file ({error})") from None


def write_powder(path, powder: PowderSum) -> None:
    """Float32 photons (7 digits: ample for a sum of photon counts) and uint32 shot counts: 8 bytes a pixel."""
    with atomic_output(path, "wb") as stream:
        np.savez(stream, photons=powder.photons.astype(np.float32),
                 trusted_shots=powder.trusted_shots.astype(np.uint32), shape=np.array(powder.shape),
                 n_shots=powder.n_shots)


def read_powder(path) -> PowderSum:
    from xfel_spread.hitfind.pixels import PowderSum

    try:
        with np.load(path) as data:
            powder = PowderSum(tuple(int(v) for v in data["shape"]))
            powder.photons[:] = data["photons"]
            powder.trusted_shots[:] = data["trusted_shots"]
            powder.n_shots = int(data["n_shots"])
            return powder
    except (OSError, KeyError, ValueError) as error:
        raise HitfindFileError(path, f"not a powder-sum file ({error})") from None
