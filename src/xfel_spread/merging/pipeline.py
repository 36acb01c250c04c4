"""The merge of one dataset, collective over an MPI communicator (``spread-merge``).

1. Each rank loads a contiguous block of shards; lattices get global ids in shard, then experiment
   order (the same for any number of ranks). Intensities are corrected for polarization.
2. Rank 0 computes the model's reference and checks its cell and space group against the data.
3. Each rank filters its lattices (space group, cell cluster, significance, reference resolution and
   correlation) and scales or post-refines them, all lattices at once; rank 0 then rejects the fits
   whose B or rotations are outliers among all lattices'.
4. The scaled observations go to the rank owning their index (contiguous key ranges); each owner
   sorts them canonically, computes the ev11 deviations, and after rank 0 has fitted the error model
   on the gathered deviations, merges its indices.
5. Rank 0 gathers the merged indices and the lattice records and writes every file.

Without a model (``merge.reference: data``, cctbx.xfel.merge's "mark1" spirit) step 2 takes the space
group (the lattices' most common Patterson group, without inversion) and the cell (the average of the
lattices that pass the cell filter) from the data, and steps 3-4 run 1 + ``self_reference_cycles``
times. The first pass has no reference intensities: no correlation filter, no post-refinement, and each
lattice's scale is its mean intensity over the mean of all lattices' (:func:`_mean_intensity_scale`).
Each later pass filters, scales and post-refines the lattices afresh against the previous pass's
merged Friedel-pair intensities of at least ``minimum_multiplicity`` observations (rank 0 gathers
them in key order and broadcasts them), exactly as a model's reference would be used; the last pass
is written.

Every sum runs over canonically ordered values, and every global fit on rank 0 over values gathered
in key or global-id order, so the results are the same, to the bit, for any number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output
from xfel_spread.errors import OptionError
from xfel_spread.merging import filters, postrefine
from xfel_spread.merging.error_model import ErrorModel, deviations, fit_ev11, group_means
from xfel_spread.merging.indices import IndexRangeError, d_star_sq, key_d_star_sq, map_to_asu
from xfel_spread.merging.loading import Lattices, Observations, ShardFileError, load_shards, shard_blocks
from xfel_spread.merging.merge import MergedIntensities, canonical_order, group_numbers, lattice_half, \
    merge_observations
from xfel_spread.merging.polarization import polarization_factor
from xfel_spread.merging.parallel import exchange, gather, owner_splits, owners
from xfel_spread.merging.reference import ModelError, Reference, check_model_matches_data, data_reference, \
    data_space_group_symbol, format_cell, model_reference, self_reference
from xfel_spread.mpi import AgreedError, abort_on_unexpected_error, first_error

log = logging.getLogger(__name__)

#: Rejection reasons in the order the filters apply them (the first that applies is recorded).
REASONS = (filters.NO_REFLECTIONS, filters.SPACE_GROUP, filters.CELL_OUTLIER, filters.SIGNIFICANCE,
           filters.NO_REFERENCE_MATCH, filters.LOW_SIGNAL, filters.LOW_REFERENCE_CC, postrefine.DIVERGED,
           postrefine.B_OUT_OF_RANGE, postrefine.NON_POSITIVE_SCALE, postrefine.FEW_NEAR_FULL,
           postrefine.B_OUTLIER, postrefine.ROTATION_OUTLIER)


@dataclass(frozen=True)
class MergeSettings:
    """The ``merge`` section of the config (schema defaults here for callers without a config)."""

    d_min: float = 1.9
    covariance_component: int = 0
    mahalanobis: float = 4.0
    significance_sigma: float = -0.5
    min_reference_cc: float = 0.1
    resolution_scalar: float = 0.993420862158964
    postrefinement: str = "rs"
    error_model: str = "ev11"
    minimum_multiplicity: int = 2
    n_bins: int = 20
    reference: str = "model"
    self_reference_cycles: int = 3

    @classmethod
    def from_config(cls, section) -> MergeSettings:
        return cls(**{field.name: section[field.name] for field in fields(cls)})


@dataclass(frozen=True)
class MergeOutputs:
    """Paths of the files rank 0 writes."""

    mtz: Path
    stats_table: Path
    stats_text: Path
    stats_plot: Path
    lattices: Path
    summary: Path


class StepTimer:
    """Wall time of each named step, logged as it ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        start = time.monotonic()
        yield
        # A step that runs once per self-reference pass adds up.
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start
        log.info("step %s: %.2f s", name, self.seconds[name])


@dataclass
class LatticeRecords:
    """What the merge decided about each of one rank's lattices (one row per lattice)."""

    global_id: np.ndarray
    shard: np.ndarray
    identifier: np.ndarray
    cell: np.ndarray
    wavelength: np.ndarray
    reason: np.ndarray  #: object array, "" for an accepted lattice
    mahalanobis: np.ndarray
    reference_cc: np.ndarray
    parameters: np.ndarray  #: (n, 5) G, B, RS, theta_x, theta_y (NaN where not fitted)
    n_reflections: np.ndarray  #: observations merged

    def reject(self, selection: np.ndarray, reason: str) -> None:
        """Record ``reason`` for the selected lattices that have none yet."""
        self.reason[selection & (self.reason == "")] = reason

    @property
    def alive(self) -> np.ndarray:
        return self.reason == ""


def _load(comm, prefixes: Sequence[str]) -> tuple[Lattices, Observations, np.ndarray, int]:
    """This rank's lattices and observations, their global ids, and the total lattice count."""
    error, lattices, observations = None, None, None
    try:
        lattices, observations = load_shards(prefixes, shard_blocks(len(prefixes), comm.Get_size())[comm.Get_rank()])
    except ShardFileError as problem:
        error = problem
    first_error(comm, error)
    counts = comm.allgather(len(lattices))
    if sum(counts) == 0:
        raise AgreedError(f"the {len(prefixes)} shard(s) hold no lattice (first: {prefixes[0]})")
    first = sum(counts[:comm.Get_rank()])
    return lattices, observations, np.arange(first, first + len(lattices), dtype=np.int64), sum(counts)


def _reference(comm, model_path, settings: MergeSettings, lattices: Lattices) -> Reference:
    """The model's reference, computed on rank 0 after checking the model against the lattices."""
    cells = gather(comm, {"cell": lattices.cell})
    hall_symbols = comm.gather(list(lattices.hall_symbol))
    reference, error = None, None
    if comm.Get_rank() == 0:
        try:
            reference = model_reference(model_path, settings.d_min * settings.resolution_scalar)
            check_model_matches_data(reference, str(model_path), cells["cell"].mean(axis=0),
                                     [hall for part in hall_symbols for hall in part])
        except ModelError as problem:
            error = problem
    first_error(comm, error)
    reference = comm.bcast(reference)
    log.info("reference: %d indices of %s to %.3f A, model cell %s", len(reference.keys),
             reference.space_group_symbol, settings.d_min * settings.resolution_scalar, format_cell(reference.cell))
    return reference


def _data_reference(comm, settings: MergeSettings, lattices: Lattices, cluster) -> Reference:
    """The index set of a model-free merge (no intensities), from the lattices' space groups and cells.

    Rank 0 decides on the gathered values (global-id order), so it is the same for any number of ranks.
    The cell is the average of the lattices within the cell filter's cutoff (of all of them if none is).
    """
    keep_cell, _ = filters.cell_filter(lattices.cell, cluster, settings.mahalanobis)
    cells = gather(comm, {"cell": lattices.cell, "keep": keep_cell})
    hall_symbols = comm.gather(list(lattices.hall_symbol))
    reference = None
    if comm.Get_rank() == 0:
        chosen = cells["cell"][cells["keep"]] if cells["keep"].any() else cells["cell"]
        reference = data_reference(data_space_group_symbol([hall for part in hall_symbols for hall in part]),
                                   chosen.mean(axis=0), settings.d_min * settings.resolution_scalar)
    reference = comm.bcast(reference)
    log.info("reference: none (merge.reference data): %d indices of %s to %.3f A, average cell %s",
             len(reference.keys), reference.space_group_symbol, settings.d_min * settings.resolution_scalar,
             format_cell(reference.cell))
    return reference


def _next_self_reference(comm, reference: Reference, pairs: MergedIntensities | None,
                         settings: MergeSettings) -> Reference:
    """The reference of the next self-reference pass, from rank 0's merged pairs of this pass (broadcast)."""
    following = None
    if comm.Get_rank() == 0:
        order = np.argsort(pairs.key, kind="stable")  # already key order as gathered; made sure of
        following = self_reference(reference, pairs.key[order], pairs.intensity[order], pairs.multiplicity[order],
                                   settings.minimum_multiplicity)
    following = comm.bcast(following)
    n_indices = int(np.isfinite(following.intensity).sum())
    if n_indices == 0:
        raise AgreedError(f"no self reference: no index is observed at least {settings.minimum_multiplicity} times "
                          "(merge.minimum_multiplicity) in the merge of the previous pass")
    log.info("self reference: %d merged indices observed at least %d times", n_indices,
             settings.minimum_multiplicity)
    return following


def _log_rejections(comm, records: LatticeRecords, stage: str) -> None:
    counts = sum(comm.allgather(Counter(records.reason[~records.alive])), Counter())
    alive = comm.allreduce(int(records.alive.sum()))
    if comm.Get_rank() == 0:
        rejected = ", ".join(f"{reason} {counts[reason]}" for reason in REASONS if counts.get(reason))
        log.info("%s: %d lattices left%s", stage, alive, f" (rejected: {rejected})" if rejected else "")


def _filter(comm, lattices: Lattices, observations: Observations, global_id: np.ndarray, cluster,
            reference: Reference, settings: MergeSettings, correlate: bool = True):
    """Lattice records after the filters, and the surviving observations with their keys and reference.

    ``correlate`` False skips the reference-correlation filter (a reference without intensities)."""
    n = len(lattices)
    records = LatticeRecords(global_id, lattices.shard, lattices.identifier, lattices.cell, lattices.wavelength,
                             np.full(n, "", dtype=object), np.full(n, np.nan), np.full(n, np.nan),
                             np.full((n, 5), np.nan), np.zeros(n, np.int64))
    row = np.arange(len(observations), dtype=np.int64)  # load order: a canonical order within each lattice
    records.reject(np.bincount(observations.lattice, minlength=n) == 0, filters.NO_REFLECTIONS)
    records.reject(~filters.space_group_filter(list(lattices.hall_symbol), reference.space_group()),
                   filters.SPACE_GROUP)
    keep_cell, records.mahalanobis[:] = filters.cell_filter(lattices.cell, cluster, settings.mahalanobis)
    records.reject(~keep_cell, filters.CELL_OUTLIER)

    def surviving(selection):
        nonlocal observations, row
        observations, row = observations.select(selection), row[selection]

    surviving(records.alive[observations.lattice])
    significant = filters.significance_filter(
        observations.lattice, d_star_sq(observations.hkl, reference.cell),
        observations.intensity / np.sqrt(observations.variance), n, settings.significance_sigma)
    before = np.bincount(observations.lattice, minlength=n)
    surviving(significant)
    records.reject((before > 0) & (np.bincount(observations.lattice, minlength=n) == 0), filters.SIGNIFICANCE)

    error, key, is_minus = None, np.zeros(len(observations), np.int64), np.zeros(len(observations), bool)
    try:
        key, is_minus = map_to_asu(observations.hkl, reference.space_group())
    except IndexRangeError as problem:
        error = problem
    first_error(comm, error)
    found, reference_intensity = reference.lookup(key)
    surviving(found)
    key, is_minus, reference_intensity = key[found], is_minus[found], reference_intensity[found]
    records.reject(records.alive & (np.bincount(observations.lattice, minlength=n) == 0), filters.NO_REFERENCE_MATCH)

    if correlate:
        # A self reference has no intensity (NaN) for rarely observed indices: they do not correlate.
        usable = np.isfinite(reference_intensity)
        cc, _ = filters.reference_correlation(observations.lattice[usable], observations.intensity[usable],
                                              reference_intensity[usable], n)
        records.reference_cc[:] = cc
        records.reject(records.alive & np.isnan(cc), filters.LOW_SIGNAL)
        records.reject(records.alive & (cc < settings.min_reference_cc), filters.LOW_REFERENCE_CC)
    keep = records.alive[observations.lattice]
    return records, observations.select(keep), row[keep], key[keep], is_minus[keep], reference_intensity[keep]


def _scale(lattices: Lattices, records: LatticeRecords, observations: Observations, reference_intensity: np.ndarray,
           settings: MergeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Fit every surviving lattice; return (kept observations mask, scale factor of each observation).

    Only observations with a reference intensity enter the fits (a self reference has none, NaN, for
    rarely observed indices); every observation gets its lattice's scale factor."""
    usable = np.isfinite(reference_intensity)
    fitted = np.flatnonzero(records.alive)
    renumber = np.full(len(lattices), -1, np.int64)
    renumber[fitted] = np.arange(len(fitted))
    lattice = renumber[observations.lattice]
    if settings.postrefinement == "rs":
        problem = postrefine.ScalingProblem.build(lattice, lattices.a_matrix[fitted], lattices.s0[fitted],
                                                  observations.hkl, observations.d, reference_intensity,
                                                  observations.intensity)
        fit = problem if usable.all() else problem.select_observations(usable)
        parameters = postrefine.refine_rs(fit, postrefine.initial_parameters(fit, len(fitted)))
        factor, partiality = postrefine.rs_scale_factors(problem, parameters)
        reason = postrefine.rs_failures(parameters, lattice, partiality)
        kept = partiality > postrefine.NEAR_FULL
    else:
        scale = postrefine.scale_only(lattice[usable], observations.intensity[usable], reference_intensity[usable],
                                      len(fitted))
        parameters = np.full((len(fitted), 5), np.nan)
        parameters[:, 0] = scale
        factor = scale[lattice]
        reason = np.where(np.isfinite(scale) & (scale > 0), "", postrefine.NON_POSITIVE_SCALE).astype(object)
        kept = np.ones(len(observations), bool)
    records.parameters[fitted] = parameters
    records.reason[fitted] = reason  # every fitted lattice had passed the filters (reason "")
    kept &= records.alive[observations.lattice]
    records.n_reflections[:] = np.bincount(observations.lattice[kept], minlength=len(lattices))
    return kept, factor


def _mean_intensity_scale(comm, records: LatticeRecords, observations: Observations) -> tuple[np.ndarray, np.ndarray]:
    """First pass of a model-free merge: (kept observations mask, scale factor of each observation).

    A lattice's scale G is its mean intensity over the mean of every surviving lattice's mean
    intensity (rank 0 averages them in global-id order), so the first merge is on the lattices' common
    scale without any reference; G is recorded as the lattice's parameter, a lattice whose G is not
    positive is rejected (non_positive_scale).
    """
    n = len(records.reason)
    mean = postrefine.lattice_mean_intensity(observations.lattice, observations.intensity, n)
    alive = records.alive
    gathered = gather(comm, {"mean": mean[alive]})
    overall = float(np.mean(gathered["mean"])) if comm.Get_rank() == 0 else None
    overall = comm.bcast(overall)
    scale = mean / overall if overall > 0 else np.full(n, np.nan)
    records.parameters[alive, 0] = scale[alive]
    records.reject(alive & ~(np.isfinite(scale) & (scale > 0)), postrefine.NON_POSITIVE_SCALE)
    kept = records.alive[observations.lattice]
    records.n_reflections[:] = np.bincount(observations.lattice[kept], minlength=n)
    return kept, scale[observations.lattice]


def _reject_parameter_outliers(comm, records: LatticeRecords) -> None:
    """Reject fitted lattices whose B or rotations are robust outliers among all of them (rank 0 decides)."""
    fitted = records.alive & np.all(np.isfinite(records.parameters), axis=1)
    gathered = gather(comm, {"global_id": records.global_id[fitted], "parameters": records.parameters[fitted]})
    decision = None
    if comm.Get_rank() == 0:  # parameters in global-id order: the same decision for any number of ranks
        reason = postrefine.parameter_outliers(gathered["parameters"])
        rejected = reason != ""
        decision = (gathered["global_id"][rejected], reason[rejected])
    global_ids, reasons = comm.bcast(decision)
    # This rank's global ids are the contiguous range starting at its first lattice's.
    local = global_ids - (records.global_id[0] if len(records.global_id) else 0)
    mine = (local >= 0) & (local < len(records.global_id))
    records.reason[local[mine]] = reasons[mine]


def _no_survivor_error(comm, records: LatticeRecords, n_lattices: int) -> None:
    """Raise (on every rank) the one-line error listing what each filter removed, if nothing survived."""
    survivors = comm.allreduce(int(records.alive.sum()))
    if survivors:
        return
    counts = sum(comm.allgather(Counter(records.reason)), Counter())
    removed = ", ".join(f"{reason} removed {counts[reason]}" for reason in REASONS if counts.get(reason))
    raise AgreedError(f"no lattice survives the filters: {n_lattices} read; {removed}")


def _merge_owned(comm, columns: dict[str, np.ndarray], settings: MergeSettings):
    """Error model and merge of the observations this rank owns; rank 0 returns everything gathered."""
    order = canonical_order(columns["key"], columns["is_minus"], columns["global_id"], columns["row"])
    key, is_minus, global_id = columns["key"][order], columns["is_minus"][order], columns["global_id"][order]
    intensity, variance = columns["intensity"][order], columns["variance"][order]

    model = ErrorModel(note="not used (error_model none)")
    if settings.error_model == "ev11":
        group, starts = group_numbers(key, is_minus)
        mean, _ = group_means(group, intensity, len(starts))
        work, delta = deviations(group, intensity, len(starts), settings.minimum_multiplicity)
        gathered = gather(comm, {"delta_sq": delta[work] ** 2, "variance": variance[work], "mean": mean[group][work]})
        if comm.Get_rank() == 0:
            model = fit_ev11(gathered["delta_sq"], gathered["variance"], gathered["mean"])
        model = comm.bcast(model)
        variance = model.variance(variance, mean[group])

    anomalous, pairs = merge_observations(key, is_minus, lattice_half(global_id), intensity, variance)
    gathered_anomalous = gather(comm, {field.name: getattr(anomalous, field.name) for field in fields(anomalous)})
    gathered_pairs = gather(comm, {field.name: getattr(pairs, field.name) for field in fields(pairs)})
    if comm.Get_rank() != 0:
        return model, None, None
    return model, MergedIntensities(**gathered_anomalous), MergedIntensities(**gathered_pairs)


def check_model_given(settings: MergeSettings, model_path) -> None:
    """Raise OptionError (on every rank alike) if ``merge.reference`` is model and no model was given."""
    if settings.reference == "model" and model_path is None:
        raise OptionError("no reference model: merge.reference is model but no --model was given (give the PDB "
                          "model, or set merge.reference: data to merge without one)")


def _merge_pass(comm, timer: StepTimer, data, cluster, reference: Reference, splits: np.ndarray,
                settings: MergeSettings, with_intensities: bool, label: str):
    """Filter, scale (or post-refine) and merge every lattice against ``reference``, collectively.

    ``data`` is (lattices, polarization-corrected observations, global ids, total lattice count), left
    as they are. Without reference intensities (``with_intensities`` False, a model-free first pass)
    there is no correlation filter and each lattice gets its mean-intensity scale. Returns (this
    rank's lattice records, error model, and on rank 0 the merged anomalous and pair intensities).
    """
    lattices, observations, global_id, n_lattices = data
    with timer.step("filter"):
        records, observations, row, key, is_minus, reference_intensity = _filter(
            comm, lattices, observations, global_id, cluster, reference, settings, correlate=with_intensities)
        _log_rejections(comm, records, f"{label}filters")
        _no_survivor_error(comm, records, n_lattices)
    with timer.step("scale"):
        if with_intensities:
            kept, factor = _scale(lattices, records, observations, reference_intensity, settings)
            if settings.postrefinement == "rs":
                _reject_parameter_outliers(comm, records)
                kept &= records.alive[observations.lattice]
                records.n_reflections[~records.alive] = 0
            scaling = f"scaling ({settings.postrefinement})"
        else:
            kept, factor = _mean_intensity_scale(comm, records, observations)
            scaling = "scaling (mean intensity, no reference)"
        _log_rejections(comm, records, f"{label}{scaling}")
        _no_survivor_error(comm, records, n_lattices)
    with timer.step("exchange"):
        columns = {"key": key[kept], "is_minus": is_minus[kept], "global_id": global_id[observations.lattice[kept]],
                   "row": row[kept], "intensity": observations.intensity[kept] / factor[kept],
                   "variance": observations.variance[kept] / factor[kept] ** 2}
        columns = exchange(comm, columns, owners(columns["key"], splits))
    with timer.step("merge"):
        error_model, anomalous, pairs = _merge_owned(comm, columns, settings)
    return records, error_model, anomalous, pairs


def _gather_records(comm, records: LatticeRecords) -> LatticeRecords | None:
    numeric = gather(comm, {field.name: getattr(records, field.name) for field in fields(records)
                            if field.name not in ("identifier", "reason")})
    identifiers, reasons = comm.gather(list(records.identifier)), comm.gather(list(records.reason))
    if comm.Get_rank() != 0:
        return None
    return LatticeRecords(identifier=np.array([i for part in identifiers for i in part], dtype=object),
                          reason=np.array([r for part in reasons for r in part], dtype=object), **numeric)


def run_merge(comm, prefixes: Sequence[str], cluster, model_path, settings: MergeSettings,
              outputs: MergeOutputs) -> dict | None:
    """Merge the lattices of shards ``prefixes``; rank 0 writes ``outputs`` and returns the summary.

    ``cluster`` is the unit-cell cluster (any object with ``mahalanobis(cells)``). ``model_path`` is the
    PDB model of ``settings.reference`` model (not read, and may be None, with reference data). Collective
    over ``comm``; input errors are raised on every rank as :class:`AgreedError` (a ValueError).
    """
    check_model_given(settings, model_path)
    from xfel_spread.io.lattices import write_lattice_table
    from xfel_spread.merging.output import write_mtz, write_summary
    from xfel_spread.merging.statistics import format_statistics, merging_statistics, plot_statistics, \
        resolution_bins, write_statistics_table

    timer = StepTimer()
    rank = comm.Get_rank()
    with abort_on_unexpected_error(comm):
        with timer.step("load"):
            lattices, observations, global_id, n_lattices = _load(comm, prefixes)
            n_observations = comm.allreduce(len(observations))
        with timer.step("polarization"):
            factor = polarization_factor(observations.s1, observations.d, observations.lattice, lattices.s0,
                                         lattices.polarization_normal)
            observations.intensity /= factor
            observations.variance /= factor * factor
            observations.s1 = None
        with timer.step("reference"):
            if settings.reference == "model":
                reference = _reference(comm, model_path, settings, lattices)
            else:
                reference = _data_reference(comm, settings, lattices, cluster)
        splits = owner_splits(reference.keys, comm.Get_size())  # the same ownership in every pass
        passes = 1 if settings.reference == "model" else 1 + settings.self_reference_cycles
        self_reference_log = []
        for number in range(passes):
            # A model-free merge's first pass has a reference without intensities.
            with_intensities = settings.reference == "model" or number > 0
            label = "" if passes == 1 else f"pass {number + 1} of {passes}, "
            records, error_model, anomalous, pairs = _merge_pass(
                comm, timer, (lattices, observations, global_id, n_lattices), cluster, reference, splits, settings,
                with_intensities, label)
            self_reference_log.append({"reference_indices": int(np.isfinite(reference.intensity).sum()),
                                       "accepted": comm.allreduce(int(records.alive.sum()))})
            if number + 1 < passes:
                with timer.step("reference"):
                    reference = _next_self_reference(comm, reference, pairs, settings)
        with timer.step("merge"):
            all_records = _gather_records(comm, records)
        if rank != 0:
            return None

        with timer.step("statistics"):
            accepted = all_records.reason == ""
            average_cell = all_records.cell[accepted].mean(axis=0)
            wavelength = float(all_records.wavelength[accepted].mean())
            bins = resolution_bins(average_cell, reference.space_group_symbol, settings.d_min, settings.n_bins)
            rows = merging_statistics(anomalous, average_cell, bins, settings.minimum_multiplicity)

        with timer.step("write"):
            minimum = settings.minimum_multiplicity

            def written(merged: MergedIntensities) -> MergedIntensities:
                in_range = bins.bin_of(key_d_star_sq(merged.key, average_cell)) >= 0
                return merged.select(in_range & (merged.multiplicity >= minimum))

            written_pairs, written_anomalous = written(pairs), written(anomalous)
            if len(written_pairs.key) == 0:
                raise AgreedError(
                    f"nothing to merge: no index of the {int(accepted.sum())} accepted lattices is observed at "
                    f"least {minimum} times (merge.minimum_multiplicity) to {settings.d_min} A")
            write_mtz(outputs.mtz, written_pairs, written_anomalous, average_cell, reference.space_group_symbol,
                      wavelength)
            title = (f"merging statistics: {int(accepted.sum())} lattices, Friedel mates separate, "
                     f"d_min {settings.d_min} A, cell {format_cell(average_cell)}")
            text = format_statistics(rows, title)
            write_statistics_table(rows, outputs.stats_table)
            with atomic_output(outputs.stats_text, "w") as stream:
                stream.write(text)
            plot_statistics(rows, outputs.stats_plot, title)
            write_lattice_table(_lattice_table_columns(all_records, prefixes), outputs.lattices)
        log.info("\n%s", text)
        summary = _summary(all_records, n_observations, error_model, written_pairs, written_anomalous,
                           average_cell, wavelength, rows, settings, comm.Get_size(), timer.seconds)
        if settings.reference == "data":
            summary["space_group"] = reference.space_group_symbol
            summary["self_reference_passes"] = self_reference_log
        write_summary(summary, outputs.summary)
        return summary


def _lattice_table_columns(records: LatticeRecords, prefixes: Sequence[str]) -> dict:
    parameters = records.parameters
    return {"global_id": records.global_id, "shard_prefix": [prefixes[shard] for shard in records.shard],
            "identifier": records.identifier, "accepted": (records.reason == "").astype(int),
            "reason": records.reason, "G": parameters[:, 0], "B": parameters[:, 1], "RS": parameters[:, 2],
            "theta_x_mrad": 1e3 * parameters[:, 3], "theta_y_mrad": 1e3 * parameters[:, 4],
            "mahalanobis": records.mahalanobis, "reference_cc": records.reference_cc,
            "n_reflections": records.n_reflections}


def _summary(records: LatticeRecords, n_observations: int, error_model: ErrorModel, pairs: MergedIntensities,
             anomalous: MergedIntensities, average_cell, wavelength: float, rows, settings: MergeSettings,
             n_ranks: int, timings: dict) -> dict:
    accepted = records.reason == ""
    rejected = Counter(records.reason[~accepted])
    return {
        "lattices_read": len(records.reason),
        "observations_read": n_observations,
        "rejected": {reason: rejected[reason] for reason in REASONS if rejected.get(reason)},
        "accepted": int(accepted.sum()),
        "observations_merged": int(records.n_reflections.sum()),
        "unique_written": {"IMEAN": len(pairs), "anomalous": len(anomalous)},
        "average_cell": list(average_cell),
        "average_wavelength": wavelength,
        "error_model": {"sdfac": error_model.sdfac, "sdb": error_model.sdb, "sdadd": error_model.sdadd,
                        "target": error_model.target, "n_deviations": error_model.n_deviations,
                        "note": error_model.note},
        "settings": {field.name: getattr(settings, field.name) for field in fields(settings)},
        "overall": rows[-1],
        "statistics": rows[:-1],
        "n_ranks": n_ranks,
        "timings_s": dict(timings),
    }


def merge_dataset(comm, section: dict, prefixes: Sequence[str], covariance_path, model_path,
                  outputs: MergeOutputs) -> dict | None:
    """:func:`run_merge` with the settings of the config's ``merge`` section (``section``) and the unit-cell
    cluster of the covariance pickle (``spread-merge``); rank 0 returns the summary, the others None.

    Every rank reads the settings and the pickle, so every rank meets the same input error."""
    from xfel_spread.cells.covariance import read_covariance

    settings = MergeSettings.from_config(section)
    cluster = read_covariance(covariance_path, settings.covariance_component)
    return run_merge(comm, prefixes, cluster, model_path, settings, outputs)
