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
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output, atomic_path

#: The per-lattice table of the merge stage must have these columns (tab-separated, with a header).
LATTICE_TABLE_COLUMNS = ("identifier", "accepted")
#: Reflection-table columns the selection reads.
REQUIRED_REFLECTION_COLUMNS = ("id", "d", "bbox", "miller_index", "flags")
#: Outputs of one shard, as suffixes of its output prefix.
ANNULUS_SUFFIXES = {"experiments": "_annulus.expt", "reflections": "_annulus.refl"}

logger = logging.getLogger(__name__)


class AnnulusError(ValueError):
    """An annulus, lattice table or shard that cannot be used; the message names it in one line."""


def check_annulus(d_max: float, d_min: float, source: str = "annulus") -> None:
    """Raise AnnulusError unless 0 < d_min < d_max."""
    if not 0 < d_min < d_max:
        raise AnnulusError(f"{source}: d_min ({d_min:g} A) must be positive and below d_max ({d_max:g} A)")


def read_accepted_identifiers(path: str | os.PathLike) -> list[str]:
    """DIALS experiment identifiers of the lattices the merge accepted (``accepted`` = 1), in table order."""
    try:
        with open(path, newline="") as stream:
            reader = csv.DictReader(stream, delimiter="\t")
            missing = [name for name in LATTICE_TABLE_COLUMNS if name not in (reader.fieldnames or [])]
            if missing:
                raise AnnulusError(f"{path}: lattice table lacks column(s) {', '.join(missing)}")
            accepted = []
            for line_number, row in enumerate(reader, start=2):
                if row["accepted"] not in ("0", "1"):
                    raise AnnulusError(f"{path}:{line_number}: accepted must be 1 or 0, got {row['accepted']!r}")
                if row["accepted"] == "1":
                    accepted.append(row["identifier"])
    except UnicodeDecodeError:
        raise AnnulusError(f"{path}: lattice table is not text") from None
    return accepted


#: Lists of models in a DIALS experiment-list document that experiments refer to by position.
_MODEL_LISTS = ("beam", "detector", "goniometer", "scan", "crystal", "profile", "scaling_model", "imageset")
#: Fields of an image-set entry that may hold file names relative to the document's directory.
_IMAGESET_PATH_FIELDS = ("images", "template", "mask", "gain", "pedestal", "dx", "dy")


def read_experiment_document(path: str | os.PathLike) -> dict:
    """A DIALS experiment list (.expt) as its JSON document, image file names made absolute.

    Selections work on the document rather than on dxtbx models: building and writing 500 stills
    lattices as models takes about 1.5 s, their JSON 0.06 s, which matters over a few hundred shards.
    """
    try:
        with open(path) as stream:
            document = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnulusError(f"{path}: cannot read experiments ({_first_line(exc)})") from None
    if not isinstance(document, dict) or document.get("__id__") != "ExperimentList":
        raise AnnulusError(f"{path}: not a DIALS experiment list")
    directory = Path(path).resolve().parent
    for imageset in document.get("imageset", []):
        for name in _IMAGESET_PATH_FIELDS:
            value = imageset.get(name)
            if isinstance(value, str):
                imageset[name] = str(directory / value)
            elif name == "images" and isinstance(value, list):
                imageset[name] = [str(directory / image) for image in value]
    return document


def experiment_identifiers(document: dict) -> list[str]:
    """The experiments' identifiers, in order."""
    return [experiment.get("identifier", "") for experiment in document.get("experiment", [])]


def subset_document(document: dict, positions: Sequence[int]) -> dict:
    """The experiment-list document of the experiments at ``positions`` (in that order), holding only
    the models they use, renumbered."""
    subset = {"__id__": "ExperimentList", "experiment": []}
    renumbering = {name: {} for name in _MODEL_LISTS}
    for name in _MODEL_LISTS:
        subset[name] = []
    for position in positions:
        experiment = dict(document["experiment"][int(position)])
        for name in _MODEL_LISTS:
            if experiment.get(name) is None:
                continue
            old = experiment[name]
            if old not in renumbering[name]:
                renumbering[name][old] = len(subset[name])
                subset[name].append(document[name][old])
            experiment[name] = renumbering[name][old]
        subset["experiment"].append(experiment)
    return subset


def read_shard_lattices(experiments_path: str | os.PathLike, reflections_path: str | os.PathLike):
    """A shard's integrated lattices (experiment-list document) and reflections; checks they belong together."""
    from dials.array_family import flex

    document = read_experiment_document(experiments_path)
    try:
        reflections = flex.reflection_table.from_file(str(reflections_path))
    except Exception as exc:  # DIALS raises RuntimeError or msgpack errors
        raise AnnulusError(f"{reflections_path}: cannot read reflections ({_first_line(exc)})") from None
    if reflections.size() == 0:
        return document, reflections
    missing = [name for name in REQUIRED_REFLECTION_COLUMNS if name not in reflections]
    if missing:
        raise AnnulusError(f"{reflections_path}: reflection table lacks column(s) {', '.join(missing)}")
    identifiers = experiment_identifiers(document)
    for index, identifier in dict(reflections.experiment_identifiers()).items():
        if index >= len(identifiers) or identifiers[index] != identifier:
            raise AnnulusError(f"{reflections_path}: experiment {index} ({identifier}) is not the one in "
                               f"{experiments_path}")
    return document, reflections


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def select_lattices(document: dict, reflections, identifiers: Iterable[str],
                    d_range: tuple[float, float] | None = None, limit: int | None = None):
    """The given lattices and their integrated reflections, optionally only those with d_min <= d < d_max.

    ``d_range`` is (d_max, d_min). Lattices keep their order; those left without a reflection are
    dropped, at most ``limit`` are kept, and the reflections' ``id`` is renumbered to the positions in
    the returned experiment list, with the identifier map to match. Returns (document, reflections).
    """
    from dials.array_family import flex

    wanted = set(identifiers)
    names = experiment_identifiers(document)
    if reflections.size() == 0 or not wanted:
        return subset_document(document, []), flex.reflection_table()
    ids = reflections["id"].as_numpy_array()
    keep_experiment = np.array([name in wanted for name in names], dtype=bool)
    keep = (ids >= 0) & (ids < len(names))
    keep[keep] = keep_experiment[ids[keep]]
    keep &= reflections.get_flags(reflections.flags.integrated, all=False).as_numpy_array()
    if d_range is not None:
        d = reflections["d"].as_numpy_array()
        keep &= (d >= d_range[1]) & (d < d_range[0])

    present = np.unique(ids[keep])
    if limit is not None:
        present = present[:limit]
        keep &= np.isin(ids, present)
    new_id = np.full(len(names), -1, dtype=np.int64)
    new_id[present] = np.arange(len(present))

    selected = reflections.select(flex.bool(keep))
    selected["id"] = flex.int(new_id[ids[keep]].astype(np.int32))
    for old_index in list(selected.experiment_identifiers().keys()):
        del selected.experiment_identifiers()[old_index]
    for position, old_index in enumerate(present):
        selected.experiment_identifiers()[position] = names[int(old_index)]
    return subset_document(document, present), selected


def write_lattices(document: dict, reflections, experiments_path, reflections_path) -> None:
    """Write an experiment-list document and its reflections, each atomically."""
    with atomic_output(experiments_path, "w") as stream:
        stream.write(json.dumps(document))  # one call, so that json's C encoder does the work
    with atomic_path(reflections_path) as temporary:
        reflections.as_file(str(temporary))


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
    """Counts of a selection made by :func:`select_lattices`, in ``space_group`` (:func:`acentric_space_group`)."""
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


@dataclass(frozen=True)
class ShardAnnulus:
    """One shard's part: where it came from and went, accepted lattices found in it, and the counts."""

    shard_prefix: str
    output_prefix: str
    accepted_lattices: int
    counts: AnnulusCounts
    space_group: object


def annulus_shard(shard_prefix, output_prefix, accepted: set[str], d_max: float, d_min: float) -> ShardAnnulus:
    """Select one shard's annulus reflections, write ``{output_prefix}_annulus.expt/.refl``, count them."""
    from xfel_spread.dials.stills import output_paths

    inputs = output_paths(shard_prefix)
    document, reflections = read_shard_lattices(inputs["integrated_experiments"], inputs["integrated_reflections"])
    n_accepted = sum(identifier in accepted for identifier in experiment_identifiers(document))
    selected_document, selected = select_lattices(document, reflections, accepted, (d_max, d_min))
    space_group = acentric_space_group(document)
    outputs = annulus_paths(output_prefix)
    write_lattices(selected_document, selected, outputs["experiments"], outputs["reflections"])
    counts = count_annulus(selected_document, selected, space_group) if space_group else AnnulusCounts()
    return ShardAnnulus(str(shard_prefix), str(output_prefix), n_accepted, counts, space_group)


def select_annulus(shard_prefixes: Sequence, output_prefixes: Sequence, lattices_table, d_max: float,
                   d_min: float, progress_interval: float = 30.0) -> dict:
    """Select every shard's annulus (:func:`annulus_shard`); returns the JSON summary: settings, the
    dataset's counts (``total``) and each shard's."""
    check_annulus(d_max, d_min)
    if len(shard_prefixes) != len(output_prefixes):
        raise AnnulusError(f"{len(shard_prefixes)} shard prefixes but {len(output_prefixes)} output prefixes; "
                           "give one output prefix per shard")
    accepted = set(read_accepted_identifiers(lattices_table))
    shards, start, last_report = [], time.monotonic(), time.monotonic()
    for number, (shard_prefix, output_prefix) in enumerate(zip(shard_prefixes, output_prefixes), start=1):
        shards.append(annulus_shard(shard_prefix, output_prefix, accepted, d_max, d_min))
        now = time.monotonic()
        if now - last_report >= progress_interval and number < len(shard_prefixes):
            rate = number / (now - start)
            logger.info("annulus: %d of %d shards, %.1f shards/s, about %.0f s left", number, len(shard_prefixes),
                        rate, (len(shard_prefixes) - number) / rate)
            last_report = now

    groups = {shard.space_group.type().number(): shard.space_group for shard in shards if shard.space_group}
    if len(groups) > 1:
        raise AnnulusError(f"the shards' lattices have different space groups (numbers {sorted(groups)})")
    n_found = sum(shard.accepted_lattices for shard in shards)
    if n_found < len(accepted):
        logger.warning("annulus: %d of the %d lattices %s accepts are in none of the %d shards",
                       len(accepted) - n_found, len(accepted), lattices_table, len(shards))
    total = combine_counts([shard.counts for shard in shards])
    return {
        "d_max": d_max,
        "d_min": d_min,
        "lattice_table": str(lattices_table),
        "space_group": next(iter(groups.values())).info().type().lookup_symbol() if groups else None,
        "accepted_lattices_in_table": len(accepted),
        "accepted_lattices_in_shards": n_found,
        "pixels_from": "integration bounding boxes, (x1 - x0) * (y1 - y0) summed over the selected reflections",
        "total": total.as_dict(),
        "shards": [{"shard_prefix": shard.shard_prefix, "output_prefix": shard.output_prefix,
                    "accepted_lattices": shard.accepted_lattices, **shard.counts.as_dict()} for shard in shards],
    }


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
