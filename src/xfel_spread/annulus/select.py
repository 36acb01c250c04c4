"""The reflections of a resolution annulus, selected from the merged lattices for per-shot refinement.

Stage 7 refines each shot against its pixels, but only in a shell of resolution (LY99: 2.5 > d >= 2.1
Angstrom, where the Fe anomalous signal is strong and the spots are still measurable). This module
takes, for every shard, the lattices our merge accepted and their integrated reflections inside the
shell, and writes them as a DIALS pair (``{prefix}_annulus.expt`` / ``.refl``) for that refinement.
It also counts what the refinement will have to work with: lattices, shoeboxes (selected
reflections), unique Miller indices with Friedel mates apart and merged, their multiplicity, and the
pixels of the shoeboxes (the integration bounding boxes, ``(x1 - x0) * (y1 - y0)``).

cctbx.xfel.merge's annulus worker had its shell hard-coded; here it comes from the settings
(``annulus.d_max``, ``annulus.d_min``).

This module holds the selection's pieces (settings check, space group, counts, report); the stage
itself, shard by shard, is :func:`xfel_spread.annulus.pipeline.select_annulus`. The lattice table is
read by :mod:`xfel_spread.io.lattices`, the shards' lattices by :mod:`xfel_spread.io.expt`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output
from xfel_spread.errors import UserInputError

#: Outputs of one shard, as suffixes of its output prefix.
ANNULUS_SUFFIXES = {"experiments": "_annulus.expt", "reflections": "_annulus.refl"}


class AnnulusError(UserInputError, ValueError):
    """An annulus, lattice table or shard that cannot be used; the message names it in one line."""


def check_annulus(d_max: float, d_min: float, source: str = "annulus") -> None:
    """Raise AnnulusError unless 0 < d_min < d_max."""
    if not 0 < d_min < d_max:
        raise AnnulusError(f"{source}: d_min ({d_min:g} A) must be positive and below d_max ({d_max:g} A)")


def acentric_space_group(document: dict):
    """The chiral space group of the lattices (their crystals carry the Patterson group, e.g. C 1 2/m 1
    for C 1 2 1): the rotations Friedel pairs are merged under; None without a crystal."""
    from cctbx import sgtbx

    symbols = {crystal["space_group_hall_symbol"] for crystal in document.get("crystal", [])}
    if not symbols:
        return None
    if len(symbols) > 1:
        raise AnnulusError(f"the lattices have different space groups (Hall symbols {', '.join(sorted(symbols))})")
    return sgtbx.space_group(symbols.pop()).build_derived_acentric_group()


def asu_indices(miller_indices, space_group, anomalous: bool) -> np.ndarray:
    """Miller indices mapped to the asymmetric unit of ``space_group``, as an (n, 3) int array."""
    from cctbx import miller, sgtbx

    indices = miller_indices.deep_copy()
    miller.map_to_asu(sgtbx.space_group_type(space_group), anomalous, indices)
    return indices.as_vec3_double().as_numpy_array().astype(np.int64).reshape(-1, 3)


@dataclass
class AnnulusCounts:
    """What a set of annulus reflections gives the pixel refinement."""

    lattices: int = 0
    shoeboxes: int = 0
    pixels: int = 0
    #: The distinct asymmetric-unit indices measured, Friedel mates apart and merged (rows of 3).
    anomalous_indices: np.ndarray = field(default_factory=lambda: np.empty((0, 3), dtype=np.int64))
    mean_indices: np.ndarray = field(default_factory=lambda: np.empty((0, 3), dtype=np.int64))

    def as_dict(self) -> dict:
        """Counts for the report: unique indices and multiplicity (observations per unique index)."""
        unique_anomalous, unique_mean = len(self.anomalous_indices), len(self.mean_indices)
        return {
            "lattices": self.lattices,
            "shoeboxes": self.shoeboxes,
            "unique_indices_anomalous": unique_anomalous,
            "unique_indices_friedel_merged": unique_mean,
            "multiplicity_anomalous": self.shoeboxes / unique_anomalous if unique_anomalous else 0.0,
            "multiplicity_friedel_merged": self.shoeboxes / unique_mean if unique_mean else 0.0,
            "shoebox_pixels": self.pixels,
        }


def _distinct_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The distinct rows of some (n, 3) index arrays taken together."""
    return np.unique(np.concatenate([np.empty((0, 3), dtype=np.int64), *arrays]), axis=0)


def count_annulus(document: dict, reflections, space_group) -> AnnulusCounts:
    """Counts of a selection made by :func:`xfel_spread.io.expt.select_lattices`, in ``space_group`` (:func:`acentric_space_group`)."""
    if reflections.size() == 0:
        return AnnulusCounts()
    bbox = reflections["bbox"].as_int().as_numpy_array().astype(np.int64).reshape(-1, 6)
    pixels = int(((bbox[:, 1] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 2])).sum())
    return AnnulusCounts(
        lattices=len(document["experiment"]),
        shoeboxes=int(reflections.size()),
        pixels=pixels,
        anomalous_indices=_distinct_rows([asu_indices(reflections["miller_index"], space_group, anomalous=True)]),
        mean_indices=_distinct_rows([asu_indices(reflections["miller_index"], space_group, anomalous=False)]),
    )


def combine_counts(counts: Sequence[AnnulusCounts]) -> AnnulusCounts:
    """The counts of several shards taken together (unique indices over all of them)."""
    return AnnulusCounts(
        lattices=sum(count.lattices for count in counts),
        shoeboxes=sum(count.shoeboxes for count in counts),
        pixels=sum(count.pixels for count in counts),
        anomalous_indices=_distinct_rows([count.anomalous_indices for count in counts]),
        mean_indices=_distinct_rows([count.mean_indices for count in counts]),
    )


def annulus_paths(output_prefix) -> dict[str, Path]:
    """The two output files of one shard, by name."""
    return {name: Path(f"{output_prefix}{suffix}") for name, suffix in ANNULUS_SUFFIXES.items()}


def format_annulus_report(summary: dict) -> str:
    """The dataset's counts as text."""
    total = summary["total"]
    lines = [
        f"Resolution annulus {summary['d_max']:g} > d >= {summary['d_min']:g} A "
        f"(space group {summary['space_group'] or 'unknown: no lattice'})",
        f"lattices accepted by the merge: {summary['accepted_lattices_in_table']} "
        f"({summary['accepted_lattices_in_shards']} found in the {len(summary['shards'])} shards)",
        f"{'lattices with an annulus reflection':48s}{total['lattices']:>14d}",
        f"{'shoeboxes (annulus reflections)':48s}{total['shoeboxes']:>14d}",
        f"{'unique Miller indices, Friedel mates apart':48s}{total['unique_indices_anomalous']:>14d}",
        f"{'unique Miller indices, Friedel mates merged':48s}{total['unique_indices_friedel_merged']:>14d}",
        f"{'multiplicity, Friedel mates apart':48s}{total['multiplicity_anomalous']:>14.2f}",
        f"{'multiplicity, Friedel mates merged':48s}{total['multiplicity_friedel_merged']:>14.2f}",
        f"{'shoebox pixels available':48s}{total['shoebox_pixels']:>14d}",
        "(shoebox pixels: the integration bounding boxes, (x1 - x0) * (y1 - y0), summed over the shoeboxes)",
    ]
    return "\n".join(lines) + "\n"


def write_annulus_report(summary: dict, summary_path, text_path) -> str:
    """Write the JSON summary and the text report, each atomically; returns the text."""
    text = format_annulus_report(summary)
    with atomic_output(summary_path, "w") as stream:
        json.dump(summary, stream, indent=1)
        stream.write("\n")
    with atomic_output(text_path, "w") as stream:
        stream.write(text)
    return text
