"""Merging statistics in resolution bins: completeness, multiplicity, <I/sigma>, CC1/2 and CC_anom.

Bins are cctbx's: equal reciprocal-space volumes from d = infinity to ``d_min`` (``setup_binner`` with
``n_bins``, as cctbx.xfel.merge's resolution binner), and the complete set they are counted against
is the anomalous asymmetric unit of the model's space group in the data's average cell (I(+) and I(-)
apart, as upstream's table). Statistics are over anomalous indices observed at least
``minimum_multiplicity`` times. CC1/2 correlates the two half data sets' means of each anomalous
index, each half needing ``minimum_multiplicity`` observations as upstream's odd/even merges do;
CC_anom correlates the two halves' Bijvoet differences I(+) - I(-) where both mates qualify in both
halves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xfel_spread.atomic import atomic_path
from xfel_spread.io.tables import format_cell, write_table
from xfel_spread.merging.indices import key_d_star_sq
from xfel_spread.merging.merge import MergedIntensities

#: Columns of the statistics table (TSV), in order.
COLUMNS = ("bin", "d_max", "d_min", "n_possible", "n_measured", "completeness", "n_observations", "multiplicity",
           "mean_intensity", "mean_i_over_sigma", "cc_half", "n_cc_half", "cc_anom", "n_cc_anom")


@dataclass(frozen=True)
class ResolutionBins:
    """cctbx resolution bins: ``limits`` in 1/d^2 (n_bins + 1 values), complete-set counts per bin."""

    limits: np.ndarray
    n_possible: np.ndarray
    d_max: float  #: the complete set's lowest resolution (the first bin opens to infinity)

    @property
    def n_bins(self) -> int:
        return len(self.n_possible)

    def bin_of(self, d_star_sq_values: np.ndarray) -> np.ndarray:
        """0-based bin of each 1/d^2; -1 outside the binned range (as cctbx's ``get_i_bin`` - 1)."""
        index = np.searchsorted(self.limits, d_star_sq_values, side="right") - 1
        return np.where((index >= 0) & (index < self.n_bins), index, -1)

    def bin_range(self, which: int) -> tuple[float, float]:
        """(d_max, d_min) of bin ``which`` (0-based), Angstrom."""
        low = self.limits[which]
        return (self.d_max if which == 0 or low <= 0 else 1.0 / np.sqrt(low)), 1.0 / np.sqrt(self.limits[which + 1])


def resolution_bins(cell: Sequence[float], space_group_symbol: str, d_min: float, n_bins: int) -> ResolutionBins:
    """The bins of the complete anomalous set of ``space_group_symbol`` in ``cell`` to ``d_min``."""
    from cctbx import crystal

    complete = crystal.symmetry(unit_cell=tuple(cell), space_group_symbol=space_group_symbol).build_miller_set(
        anomalous_flag=True, d_min=d_min)
    complete.setup_binner(d_max=100000, d_min=d_min, n_bins=n_bins)
    binner = complete.binner()
    counts = np.array(binner.counts(), dtype=np.int64)[1:-1]
    return ResolutionBins(np.array(binner.limits()), counts, float(complete.d_max_min()[0]))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of paired values; NaN for fewer than two pairs or no spread."""
    if len(x) < 2:
        return float("nan")
    x_centred, y_centred = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x_centred ** 2) * np.sum(y_centred ** 2))
    return float(np.sum(x_centred * y_centred) / denominator) if denominator > 0 else float("nan")


def bijvoet_half_differences(anomalous: MergedIntensities, minimum_multiplicity: int):
    """(key, (n, 2) half-set differences I(+) - I(-)) of indices whose mates qualify in both halves."""
    qualifies = np.all(anomalous.half_multiplicity >= minimum_multiplicity, axis=1)
    plus = anomalous.select(qualifies & ~anomalous.is_minus)
    minus = anomalous.select(qualifies & anomalous.is_minus)
    common, in_plus, in_minus = np.intersect1d(plus.key, minus.key, assume_unique=True, return_indices=True)
    return common, plus.half_intensity[in_plus] - minus.half_intensity[in_minus]


def merging_statistics(anomalous: MergedIntensities, cell: Sequence[float], bins: ResolutionBins,
                       minimum_multiplicity: int) -> list[dict]:
    """One row per bin, then the overall row (``bin`` "all"), with the columns of COLUMNS."""
    measured = anomalous.select(anomalous.multiplicity >= minimum_multiplicity)
    measured_bin = bins.bin_of(key_d_star_sq(measured.key, cell))
    halves_ok = np.all(measured.half_multiplicity >= minimum_multiplicity, axis=1)
    anomalous_keys, differences = bijvoet_half_differences(anomalous, minimum_multiplicity)
    anomalous_bin = bins.bin_of(key_d_star_sq(anomalous_keys, cell))

    def row(label, in_bin: np.ndarray, in_anomalous_bin: np.ndarray, n_possible: int, d_range):
        selected = measured.select(in_bin)
        n_measured, n_observations = len(selected), int(selected.multiplicity.sum())
        cc_rows = in_bin & halves_ok
        return {
            "bin": label, "d_max": d_range[0], "d_min": d_range[1],
            "n_possible": int(n_possible), "n_measured": n_measured,
            "completeness": n_measured / n_possible if n_possible else float("nan"),
            "n_observations": n_observations,
            "multiplicity": n_observations / n_measured if n_measured else float("nan"),
            "mean_intensity": float(selected.intensity.mean()) if n_measured else float("nan"),
            "mean_i_over_sigma": float(np.mean(selected.intensity / selected.sigma)) if n_measured else float("nan"),
            "cc_half": pearson(measured.half_intensity[cc_rows, 0], measured.half_intensity[cc_rows, 1]),
            "n_cc_half": int(cc_rows.sum()),
            "cc_anom": pearson(differences[in_anomalous_bin, 0], differences[in_anomalous_bin, 1]),
            "n_cc_anom": int(in_anomalous_bin.sum()),
        }

    rows = [row(which + 1, measured_bin == which, anomalous_bin == which, bins.n_possible[which],
                bins.bin_range(which)) for which in range(bins.n_bins)]
    rows.append(row("all", measured_bin >= 0, anomalous_bin >= 0, bins.n_possible.sum(),
                    (bins.bin_range(0)[0], bins.bin_range(bins.n_bins - 1)[1])))
    return rows


def write_statistics_table(rows: Sequence[dict], path) -> None:
    """The statistics rows as TSV, atomically (an undefined value, NaN, is the empty cell)."""
    write_table(path, COLUMNS, ([_tsv_value(row[column]) for column in COLUMNS] for row in rows))


def _tsv_value(value) -> str:
    """A cell of the statistics table: floats by :func:`format_cell`, anything else as str."""
    return format_cell(value) if isinstance(value, float) else str(value)


def format_statistics(rows: Sequence[dict], title: str) -> str:
    """The statistics rows as an aligned text table under ``title``."""
    header = ("bin", "d_max", "d_min", "possible", "measured", "compl%", "n_obs", "mult", "<I>", "<I/sig>",
              "CC1/2", "n", "CCanom", "n")

    def number(value, fmt):
        return "-" if isinstance(value, float) and np.isnan(value) else format(value, fmt)

    lines = []
    for row in rows:
        lines.append((str(row["bin"]), number(row["d_max"], ".2f"), number(row["d_min"], ".2f"), str(row["n_possible"]),
                      str(row["n_measured"]), number(100 * row["completeness"], ".1f"), str(row["n_observations"]),
                      number(row["multiplicity"], ".2f"), number(row["mean_intensity"], ".4g"),
                      number(row["mean_i_over_sigma"], ".2f"), number(row["cc_half"], ".3f"), str(row["n_cc_half"]),
                      number(row["cc_anom"], ".3f"), str(row["n_cc_anom"])))
    widths = [max(len(header[column]), *(len(line[column]) for line in lines)) for column in range(len(header))]
    text = [title, "  ".join(name.rjust(width) for name, width in zip(header, widths))]
    for number_of_line, line in enumerate(lines):
        if number_of_line == len(lines) - 1:
            text.append("  ".join("-" * width for width in widths))
        text.append("  ".join(value.rjust(width) for value, width in zip(line, widths)))
    return "\n".join(text) + "\n"


def plot_statistics(rows: Sequence[dict], path, title: str) -> None:
    """Three panels against resolution: CC1/2 and CC_anom; completeness and multiplicity; <I/sigma>."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    bins = [row for row in rows if row["bin"] != "all"]
    # Bin centres in 1/d^2, where the bins are evenly spread; ticks labelled in Angstrom.
    centre = np.array([(1 / row["d_max"] ** 2 if np.isfinite(row["d_max"]) else 0.0) / 2 + 1 / row["d_min"] ** 2 / 2
                       for row in bins])

    def column(name):
        return np.array([row[name] for row in bins], dtype=float)

    figure, (left, middle, right) = pyplot.subplots(1, 3, figsize=(16, 4.8))
    figure.suptitle(title)
    left.plot(centre, column("cc_half"), "o-", label="CC1/2")
    left.plot(centre, column("cc_anom"), "s-", label="CC_anom")
    left.axhline(0, color="grey", linewidth=0.5)
    left.set_ylabel("correlation")
    left.legend()
    middle.plot(centre, 100 * column("completeness"), "o-", color="C2")
    middle.set_ylabel("completeness (%)", color="C2")
    twin = middle.twinx()
    twin.plot(centre, column("multiplicity"), "s-", color="C3")
    twin.set_ylabel("multiplicity", color="C3")
    right.plot(centre, column("mean_i_over_sigma"), "o-", color="C4")
    right.set_ylabel("<I/sigma(I)>")
    for axes in (left, middle, right):
        axes.set_xlabel("resolution (Angstrom)")
        ticks = axes.get_xticks()
        ticks = ticks[ticks > 0]
        axes.set_xticks(ticks)
        axes.set_xticklabels([f"{1 / np.sqrt(tick):.2f}" for tick in ticks])
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)
