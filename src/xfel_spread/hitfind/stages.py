"""The three steps of the hitfind stage: measure a shard, decide the run's hits, score against truth.

``measure_shard``
    reads every image of one shard once: lit pixels, photons, radial profile and ring peak per shot
    (``_lit.tsv``, ``_radial.npz``) and the shard's powder sum (``_powder.npz``); an image dxtbx cannot
    read (recorded by the image list, or failing now) is logged and measured as nothing: no trusted
    pixel, never a hit, left out of the threshold and the powder (the index stage records it as
    ``unreadable_image``);
``find_hits``
    the run's threshold from every shard's lit pixels; ``_hits.tsv`` per shard, the per-shot ring
    peaks, a summary and a figure;
``sum_powder``
    the powder pattern (sum of all shots), its radial table and ring, and its figure (apart from
    ``find_hits``, so that a new threshold does not need the shards' powder sums again);
``score_hits``
    hit/miss accuracy against the truth files' ``blank`` flags, and the mean solvent profile against
    the background model the simulator used (simulated data only).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from xfel_spread.hitfind.radial import (
    WATER_RING_Q_RANGE_INV_A,
    background_model_profile,
    clipped_radial_statistics,
    compare_profiles,
    NO_PEAK,
    detector_from_attrs,
    mean_wavelength_a,
    multipanel_radial_geometry,
    panels_from_attrs,
    radial_geometry,
    radial_mean,
    ring_peak,
)
from xfel_spread.atomic import atomic_output
from xfel_spread.config import ConfigError
from xfel_spread.errors import OptionError
from xfel_spread.hitfind import tables
from xfel_spread.hitfind.pixels import LitPixelSettings, PowderSum, ShotMeasurement, measure_shot
from xfel_spread.hitfind.threshold import choose_hit_threshold
from xfel_spread.io.shard import ShardFormatError
from xfel_spread.io.tables import write_table
from xfel_spread.progress import Progress

log = logging.getLogger(__name__)

#: Seconds between two progress lines of a shard's measurement.
PROGRESS_INTERVAL_S = 10.0


def geometry_of(detector: dict, beam: dict, bin_width_px: float):
    """The radial geometry of a shard's ``/detector`` and ``/beam``: of its one panel, or, when it names
    ``n_panels``, of every panel from its own frame."""
    normal = tuple(float(v) for v in beam["polarization_normal"])
    if "n_panels" in detector:
        return multipanel_radial_geometry(panels_from_attrs(detector), float(beam["polarization_fraction"]), normal,
                                          bin_width_px)
    return radial_geometry(detector_from_attrs(detector), float(beam["polarization_fraction"]), normal, bin_width_px)


def measure_shard(shard_path, first_shot: int, settings: LitPixelSettings, bin_width_px: float,
                  lit_path, radial_path, powder_path) -> list:
    """Measure every shot of a shard and write its three files; return the measurements."""
    from xfel_spread.io.shard import read_shard_image, read_shard_mask, read_shard_metadata

    metadata = read_shard_metadata(shard_path, multi_panel=True)
    mask = read_shard_mask(shard_path, multi_panel=True)
    if metadata.n_shots and int(metadata.shot_index[0]) != first_shot:
        raise tables.HitfindFileError(shard_path, f"starts at shot {int(metadata.shot_index[0])}, "
                                                  f"the pipeline expects {first_shot}")
    geometry = geometry_of(metadata.detector, metadata.beam, bin_width_px)
    powder = PowderSum(geometry.shape)
    is_image_list, unreadable = _unreadable_images(shard_path, metadata.n_shots)
    wavelengths = [float("nan") if unreadable[image] else mean_wavelength_a(metadata.energy_ev, photons)
                   for image, photons in enumerate(metadata.photons_per_channel)]
    progress = Progress(metadata.n_shots, f"hitfind {shard_path}", log.info, PROGRESS_INTERVAL_S, items="shots")
    measurements = []
    for image in range(metadata.n_shots):
        image_adu = None
        if not unreadable[image]:
            try:
                image_adu = read_shard_image(shard_path, image, multi_panel=True)
            except ShardFormatError as error:
                if not is_image_list:
                    raise  # a shard the pipeline wrote is never half readable: that is a real fault
                unreadable[image] = str(error)
        if image_adu is None:
            log.warning("hitfind %s: image %d unreadable (%s); measured as nothing, never a hit", shard_path, image,
                        unreadable[image])
            wavelengths[image] = float("nan")
            measurements.append(ShotMeasurement(0, 0.0, 0, NO_PEAK, np.full(geometry.n_bins, np.nan)))
            progress.advance()
            continue
        measurement, photons, trusted = measure_shot(image_adu, metadata.detector,
                                                     geometry, settings, wavelengths[image], mask)
        powder.add(photons, trusted)
        measurements.append(measurement)
        progress.advance()
    tables.write_lit_table(lit_path, first_shot, measurements, wavelengths)
    profiles = np.array([m.profile for m in measurements]).reshape(len(measurements), geometry.n_bins)
    tables.write_radial(radial_path, tables.ShardRadial(
        geometry.bin_radius_px, geometry.bin_two_theta_rad, geometry.pixels_per_bin, geometry.normal_pixel_factor,
        geometry.bin_width_px, np.asarray(metadata.shot_index), np.asarray(wavelengths), metadata.energy_ev,
        metadata.photons_per_channel, profiles.astype(np.float32), metadata.detector, metadata.beam))
    tables.write_powder(powder_path, powder)
    return measurements


def _unreadable_images(shard_path, n_shots: int) -> tuple[bool, list[str]]:
    """Whether the shard is an image list, and per image the reason its file cannot be read, or "" (the
    reasons the image list records; none for a simulated shard)."""
    from xfel_spread.io.images import is_image_list_shard, read_image_list_shard

    if is_image_list_shard(shard_path):
        return True, list(read_image_list_shard(shard_path).unreadable)
    return False, [""] * n_shots


@dataclass(frozen=True)
class HitfindSummary:
    """What ``find_hits`` decided, for ``summary.json``."""

    n_shots: int
    n_hits: int
    hit_rate: float
    n_unreadable: int
    threshold_min_lit_pixels: float
    threshold_rule: str
    separation_decades: float | None


def find_hits(lit_paths: Sequence, hits_paths: Sequence, hitfind: dict, outputs: dict) -> HitfindSummary:
    """The run's threshold; a hits table per shard, the ring-peak table, the summary and the shots figure.

    ``outputs`` names the files: ``ring_peaks`` (TSV), ``summary`` (JSON), ``shots_plot`` (PNG).
    """
    from xfel_spread.hitfind import plots

    if len(lit_paths) != len(hits_paths):
        raise OptionError("give one lit table and one hits table per shard")
    shards = [tables.read_lit_table(path) for path in lit_paths]
    lit = np.array([row["lit_pixels"] for rows in shards for row in rows], dtype=np.float64)
    # An image with no trusted pixel (unreadable, or masked whole) says nothing about the threshold.
    measured = np.array([row["trusted_pixels"] > 0 for rows in shards for row in rows], dtype=bool)
    threshold = choose_hit_threshold(lit[measured], hitfind["lit_pixel_floor"], hitfind["min_separation_decades"],
                                     hitfind["min_lit_pixels"])
    is_hit = threshold.is_hit(lit) & measured
    first = 0
    for rows, path in zip(shards, hits_paths):
        tables.write_hits_table(path, rows, is_hit[first:first + len(rows)])
        first += len(rows)
    all_rows = [dict(row, shard=index) for index, rows in enumerate(shards) for row in rows]
    _write_ring_peaks(outputs["ring_peaks"], all_rows, is_hit)
    summary = HitfindSummary(len(lit), int(is_hit.sum()), float(is_hit.mean()), int((~measured).sum()),
                             threshold.min_lit_pixels, threshold.rule, threshold.separation_decades)
    with atomic_output(outputs["summary"], "w") as stream:
        json.dump(_finite_or_none(asdict(summary)), stream, indent=1)
    plots.plot_shots(outputs["shots_plot"], all_rows, is_hit, threshold)
    return summary


@dataclass(frozen=True)
class PowderSummary:
    """The powder pattern's numbers, for ``powder.json``."""

    n_shots: int
    mean_wavelength_a: float
    ring_q_inv_a: float
    ring_d_a: float
    ring_two_theta_deg: float
    ring_intensity: float


def sum_powder(radial_paths: Sequence, powder_paths: Sequence, ring_q_range_inv_a: tuple[float, float],
               outputs: dict) -> PowderSummary:
    """The powder pattern of a run (sum of every shot), its radial table, its ring, and its figure.

    ``outputs`` names the files: ``powder`` (.npy, float32 photons summed over shots, image-shaped:
    ``(n_panels, n_slow, n_fast)`` for a multi-panel detector),
    ``powder_radial`` (TSV), ``summary`` (JSON), ``plot`` (PNG, with up to
    :data:`plots.MAX_SHOT_PROFILES` shots' own profiles).
    """
    from xfel_spread.hitfind import plots

    if len(radial_paths) != len(powder_paths):
        raise OptionError("give one radial file and one powder file per shard")
    radials = [tables.read_radial(path) for path in radial_paths]
    _check_same_panel(radials, radial_paths)
    powder = tables.read_powder(powder_paths[0])
    for path in powder_paths[1:]:
        powder.merge(tables.read_powder(path))
    first = radials[0]
    geometry = geometry_of(first.detector, first.beam, first.bin_width_px)
    wavelengths = np.concatenate([radial.wavelengths_a for radial in radials])
    wavelength = float(np.mean(wavelengths[np.isfinite(wavelengths)]))  # unreadable images have none
    per_shot, covered = powder.mean_per_shot()
    raw_profile, n_pixels = radial_mean(per_shot, covered, geometry)
    corrected = per_shot / geometry.relative_factor
    corrected_profile, _ = radial_mean(corrected, covered, geometry)
    # The powder's Bragg rings pull a plain mean's maximum off the solvent ring: find it on the clipped one.
    solvent_profile, _ = clipped_radial_statistics(corrected, covered, geometry, geometry.root_relative_factor)
    ring = ring_peak(solvent_profile, geometry.bin_two_theta_rad, wavelength, ring_q_range_inv_a)

    with atomic_output(outputs["powder"], "wb") as stream:
        np.save(stream, powder.photons.reshape(geometry.shape).astype(np.float32))
    _write_powder_radial(outputs["powder_radial"], geometry, wavelength, n_pixels, raw_profile, corrected_profile,
                         solvent_profile)
    summary = PowderSummary(powder.n_shots, wavelength, ring.q_inv_a, ring.d_a, ring.two_theta_deg, ring.intensity)
    with atomic_output(outputs["summary"], "w") as stream:
        json.dump(_finite_or_none(asdict(summary)), stream, indent=1)
    plots.plot_powder(outputs["plot"], powder.photons.reshape(geometry.shape), geometry.q_inv_a(wavelength),
                      corrected_profile, solvent_profile, _some_profiles(radials), ring, powder.n_shots,
                      detector=first.detector)
    return summary


def _some_profiles(radials: Sequence[tables.ShardRadial]) -> np.ndarray:
    """At most :data:`plots.MAX_SHOT_PROFILES` shots' profiles, evenly spread through the run."""
    from xfel_spread.hitfind.plots import MAX_SHOT_PROFILES

    n_shots = sum(len(radial.profiles) for radial in radials)
    chosen = set(np.linspace(0, n_shots - 1, min(n_shots, MAX_SHOT_PROFILES)).astype(int).tolist())
    profiles, offset = [], 0
    for radial in radials:
        profiles += [radial.profiles[i] for i in range(len(radial.profiles)) if offset + i in chosen]
        offset += len(radial.profiles)
    return np.array(profiles).reshape(len(profiles), len(radials[0].pixels_per_bin))


def _check_same_panel(radials: Sequence[tables.ShardRadial], paths: Sequence) -> None:
    for radial, path in zip(radials[1:], paths[1:]):
        if radial.detector != radials[0].detector or radial.bin_width_px != radials[0].bin_width_px:
            raise tables.HitfindFileError(path, f"detector or binning differs from {paths[0]}'s; one run has one "
                                               "detector")


def _finite_or_none(values: dict) -> dict:
    """JSON has no NaN: a quantity that could not be measured is null."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in values.items()}


#: Per bin: photons per pixel per shot (Bragg spots included), the same at normal incidence, and the
#: solvent's share (normal incidence, Bragg spots clipped).
POWDER_RADIAL_COLUMNS = ("bin", "radius_px", "two_theta_deg", "q_inv_a", "d_a", "n_pixels", "photons_per_pixel",
                         "photons_per_pixel_normal_incidence", "solvent_photons_per_pixel_normal_incidence")


def _write_powder_radial(path, geometry, wavelength_a: float, n_pixels, raw, corrected, solvent) -> None:
    q = geometry.q_inv_a(wavelength_a)
    rows = []
    for index in np.flatnonzero(n_pixels):
        rows.append([index, f"{geometry.bin_radius_px[index]:.3f}",
                     f"{math.degrees(geometry.bin_two_theta_rad[index]):.4f}", f"{q[index]:.5f}",
                     tables._number(2 * math.pi / q[index]) if q[index] > 0 else "", n_pixels[index],
                     f"{raw[index]:.6g}", f"{corrected[index]:.6g}", f"{solvent[index]:.6g}"])
    write_table(path, POWDER_RADIAL_COLUMNS, rows)


RING_PEAK_COLUMNS = ("shard", "shot", "is_hit", "lit_pixels", "photons", "wavelength_a", "ring_q_inv_a", "ring_d_a",
                     "ring_two_theta_deg", "ring_intensity")


def _write_ring_peaks(path, rows: Sequence[dict], is_hit: np.ndarray) -> None:
    number = tables._number
    write_table(path, RING_PEAK_COLUMNS, [
        [row["shard"], row["shot"], int(hit), row["lit_pixels"], f"{row['photons']:.6g}",
         f"{row['wavelength_a']:.6f}", number(row["ring_q_inv_a"]), number(row["ring_d_a"]),
         number(row["ring_two_theta_deg"]), number(row["ring_intensity"])] for row, hit in zip(rows, is_hit)])


# ---------------------------------------------------------------------------------------------
# Scoring against the simulation


@dataclass(frozen=True)
class HitAccuracy:
    """Hits and misses against the truth: true/false positives/negatives and the derived rates."""

    true_hits: int
    missed_hits: int
    true_blanks: int
    false_hits: int

    @property
    def accuracy(self) -> float:
        total = self.true_hits + self.missed_hits + self.true_blanks + self.false_hits
        return (self.true_hits + self.true_blanks) / total

    @property
    def hit_recall(self) -> float:
        crystals = self.true_hits + self.missed_hits
        return self.true_hits / crystals if crystals else float("nan")

    @property
    def blank_recall(self) -> float:
        blanks = self.true_blanks + self.false_hits
        return self.true_blanks / blanks if blanks else float("nan")


def hit_accuracy(hits_paths: Sequence, truth_paths: Sequence) -> tuple[HitAccuracy, list[tuple[int, bool, bool, int]]]:
    """Accuracy, and per shot (shot, is_hit, is_blank, lit_pixels), from hits tables and truth files."""
    if len(hits_paths) != len(truth_paths):
        raise OptionError("give one truth file per hits table")
    shots = []
    for hits_path, truth_path in zip(hits_paths, truth_paths):
        truth = _truth_blanks(truth_path)
        for row in tables.read_hits_table(hits_path):
            if row["shot"] not in truth:
                raise tables.HitfindFileError(truth_path, f"has no record of shot {row['shot']} of {hits_path}")
            shots.append((row["shot"], row["is_hit"], truth[row["shot"]], row["lit_pixels"]))
    counts = HitAccuracy(
        true_hits=sum(hit and not blank for _, hit, blank, _ in shots),
        missed_hits=sum(not hit and not blank for _, hit, blank, _ in shots),
        true_blanks=sum(not hit and blank for _, hit, blank, _ in shots),
        false_hits=sum(hit and blank for _, hit, blank, _ in shots))
    return counts, shots


def _truth_blanks(path) -> dict[int, bool]:
    from pathlib import Path

    try:
        records = json.loads(Path(path).read_text())["shots"]
        return {int(record["shot_index"]): bool(record["blank"]) for record in records}
    except OSError as error:
        raise tables.HitfindFileError(path, f"cannot read ({error.strerror or error})") from None
    except (KeyError, TypeError, ValueError) as error:
        raise tables.HitfindFileError(path, f"not a truth file with per-shot blank flags (missing {error})") from None


def mean_profile_against_model(radial_paths: Sequence, simulate: dict,
                               ring_q_range_inv_a: tuple[float, float] = WATER_RING_Q_RANGE_INV_A) -> tuple:
    """The shots' mean radial profile against the simulator's background model under the mean spectrum.

    Returns (2-theta of the bins in rad, observed, model, :class:`ProfileComparison`, observed ring,
    model ring, mean wavelength in A). The background is linear in the spectrum, so the model of the
    mean spectrum is the mean of the shots' models. Background off in ``simulate`` leaves no model to
    compare with: an error.
    """
    from xfel_spread.sim import background as bg

    if not simulate["background"]["enabled"]:
        raise ConfigError("simulate.background.enabled is false: there is no background model to compare with")
    radials = [tables.read_radial(path) for path in radial_paths]
    _check_same_panel(radials, radial_paths)
    first = radials[0]
    # Sums shard by shard: a run's profiles (shots x bins) need not be in memory at once.
    profile_sum = sum(np.nansum(radial.profiles.astype(np.float64), axis=0) for radial in radials)
    profile_count = sum(np.isfinite(radial.profiles).sum(axis=0) for radial in radials)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = profile_sum / profile_count
    spectra = np.concatenate([radial.photons_per_channel for radial in radials])
    materials = [bg.water(simulate["background"]["water_thickness_mm"]), bg.air(simulate["background"]["air_path_mm"])]
    two_theta = first.bin_two_theta_rad
    finite = np.isfinite(two_theta)
    model = np.full(len(two_theta), np.nan)
    model[finite] = background_model_profile(two_theta[finite], first.energy_ev, spectra.mean(axis=0), materials,
                                             simulate["beam"]["beam_size_um"] * 1e-6, first.normal_pixel_factor)
    wavelength = mean_wavelength_a(first.energy_ev, spectra.mean(axis=0))
    return (two_theta, observed, model, compare_profiles(observed, model),
            ring_peak(observed, two_theta, wavelength, ring_q_range_inv_a),
            ring_peak(model, two_theta, wavelength, ring_q_range_inv_a), wavelength)


def score_hits(dataset: str, hits_paths: Sequence, radial_paths: Sequence, truth_paths: Sequence, simulate: dict,
               ring_q_range_inv_a: Sequence[float], summary_path, table_path, text_path, plot_path) -> str:
    """Write the hitfind score (TSV of quantity/value, aligned text, figure); return the text."""
    from pathlib import Path

    from xfel_spread.hitfind import plots

    if not len(hits_paths) == len(radial_paths) == len(truth_paths):
        raise OptionError("give one hits table, radial file and truth file per shard")
    accuracy, shots = hit_accuracy(hits_paths, truth_paths)
    try:
        summary = json.loads(Path(summary_path).read_text())
        threshold = summary["threshold_min_lit_pixels"], summary["threshold_rule"]
    except (OSError, ValueError, KeyError) as error:
        raise tables.HitfindFileError(summary_path, f"not a hitfind summary ({error})") from None
    two_theta, observed, model, comparison, observed_ring, model_ring, wavelength = mean_profile_against_model(
        radial_paths, simulate, tuple(ring_q_range_inv_a))
    quantities = [
        ("shots", len(shots)), ("blank_shots_in_truth", sum(blank for _, _, blank, _ in shots)),
        ("threshold_min_lit_pixels", threshold[0]), ("threshold_rule", threshold[1]),
        ("true_hits", accuracy.true_hits), ("missed_hits", accuracy.missed_hits),
        ("true_blanks", accuracy.true_blanks), ("false_hits", accuracy.false_hits),
        ("accuracy", accuracy.accuracy), ("hit_recall", accuracy.hit_recall), ("blank_recall", accuracy.blank_recall),
        ("profile_bins_compared", comparison.n_bins), ("profile_scale_to_model", comparison.scale),
        ("profile_correlation_with_model", comparison.correlation),
        ("profile_relative_rms_residual", comparison.relative_rms_residual),
        ("ring_q_observed_inv_a", observed_ring.q_inv_a), ("ring_q_model_inv_a", model_ring.q_inv_a),
        ("ring_intensity_observed", observed_ring.intensity), ("ring_intensity_model", model_ring.intensity),
    ]
    write_table(table_path, ("quantity", "value"), [(name, _table_cell(value)) for name, value in quantities])
    text = f"hit finding and solvent profile against the simulation, dataset {dataset}\n" + "".join(
        f"  {name:<32s} {_format(value)}\n" for name, value in quantities)
    with atomic_output(text_path, "w") as stream:
        stream.write(text)
    plots.plot_score(plot_path, dataset, 4 * math.pi * np.sin(two_theta / 2) / wavelength, observed, model,
                     comparison.scale, [lit for _, _, blank, lit in shots if not blank],
                     [lit for _, _, blank, lit in shots if blank], threshold[0])
    return text


def _format(value) -> str:
    """A score for the text report: floats to six significant digits, ``nan`` when undefined."""
    if isinstance(value, float):
        return tables._number(value) or "nan"
    return str(value)


def _table_cell(value) -> str:
    """A score for the table: floats to six significant digits, the empty cell when undefined."""
    return tables._number(value) if isinstance(value, float) else str(value)
