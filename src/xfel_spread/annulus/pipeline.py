"""The annulus stage: every shard's accepted lattices cut to the resolution shell, written and counted.

For each shard, :func:`annulus_shard` reads its integrated lattices (:mod:`xfel_spread.io.expt`),
keeps those the merge accepted (:mod:`xfel_spread.io.lattices`) and their reflections in the shell,
writes them as ``{output_prefix}_annulus.expt/.refl`` and counts them (:mod:`xfel_spread.annulus.select`);
:func:`select_annulus` does it for the dataset and sums the counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from xfel_spread.annulus.select import (AnnulusCounts, AnnulusError, acentric_space_group, annulus_paths,
                                        check_annulus, combine_counts, count_annulus)
from xfel_spread.io.expt import experiment_identifiers, read_lattices, select_lattices, write_lattices
from xfel_spread.io.lattices import read_accepted_identifiers
from xfel_spread.io.stills import output_paths
from xfel_spread.progress import Progress

logger = logging.getLogger(__name__)


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
    inputs = output_paths(shard_prefix)
    document, reflections = read_lattices(inputs["integrated_experiments"], inputs["integrated_reflections"])
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
    shards = []
    progress = Progress(len(shard_prefixes), "annulus", logger.info, progress_interval, items="shards",
                        report_end=False)
    for shard_prefix, output_prefix in zip(shard_prefixes, output_prefixes):
        shards.append(annulus_shard(shard_prefix, output_prefix, accepted, d_max, d_min))
        progress.advance()

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
