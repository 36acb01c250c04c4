"""SPREAD's outputs against the tables the simulation used: errors, edges, order, and the controls.

The stage (:func:`xfel_spread.spread.pipeline.run_spread`) writes the refined grids (``P_fp_fdp.tsv``,
with the start table's) and the negative controls' (``P_controls.tsv``). Scored per fit (``spread``,
each control, and the start table as the baseline of knowing nothing) and site, over
:data:`SCORE_RANGE_EV`:

- rms error of f' and f'' against the true table on the grid (electrons);
- the half-rise and f'-minimum energies (:mod:`xfel_spread.spread.uncertainty`) against the true
  table's on the same grid; beside the half-rise (the issue's: half-way to the maximum), the
  post-edge half-rise (half-way to the mean of the grid's last 20 eV), which a noisy maximum does not
  bias and which falls on the steep part of the oxidized table's rise, not on its shoulder;
- for the first two sites, the difference (site 1 - site 2): rms error of the f' and f'' difference
  and whether the half-rise energies come out in the true order.

A fit *recovers the sites' difference* when its f'' difference error is below half the start's (the
start gives both sites one table, i.e. the error of claiming no difference) and the half-rise order
is right.
"""

from __future__ import annotations

import numpy as np

from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.outputs import output_paths
from xfel_spread.spread.tables import read_table, table_on_grid
from xfel_spread.spread.uncertainty import (fp_minimum_energy, half_rise_energy, half_rise_post_edge_energy,
                                            step_edge_energy)

#: Energy range (eV) of the rms errors.
SCORE_RANGE_EV = (7100.0, 7150.0)

#: Columns of the score table.
SCORE_COLUMNS = ("fit", "site", "fp_rms_error_e", "fdp_rms_error_e", "half_rise_ev", "half_rise_true_ev",
                 "half_rise_error_ev", "fp_minimum_ev", "fp_minimum_true_ev", "fp_minimum_error_ev",
                 "order_correct", "recovers_difference", "half_rise_post_ev", "half_rise_post_true_ev",
                 "half_rise_post_error_ev", "step_edge_ev", "step_edge_true_ev", "step_edge_error_ev")


def _read_tsv(path: str) -> tuple[list[str], np.ndarray]:
    try:
        with open(path) as stream:
            header = stream.readline().rstrip("\n").split("\t")
        values = np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2)
    except (OSError, ValueError) as error:
        raise SpreadInputError(f"{path}: cannot read the table ({error})") from None
    if values.shape[1] != len(header):
        raise SpreadInputError(f"{path}: {values.shape[1]} columns, header names {len(header)}")
    return header, values


def summary_lattice_count(prefix: str) -> int:
    """The number of lattices SPREAD fitted, from ``{prefix}_summary.json``; one-line SpreadInputError otherwise."""
    import json

    path = output_paths(prefix)["summary"]
    try:
        with open(path) as stream:
            return json.load(stream)["lattices"]
    except (OSError, ValueError, KeyError) as error:
        raise SpreadInputError(f"{path}: cannot read the lattice count ({error})") from None


def read_fits(prefix: str) -> tuple[np.ndarray, tuple[str, ...], dict, dict]:
    """(grid eV, site names, {fit: (f', f'')}, {site: (f' sigma, f'' sigma)}) of a stage's outputs.

    Fits: ``start`` (the start table), ``spread`` and each control of ``P_controls.tsv``; arrays
    (n_sites, n_grid)."""
    paths = output_paths(prefix)
    path = paths["fp_fdp"]
    header, values = _read_tsv(path)
    sites = tuple(name[:-len("_fp")] for name in header if name.endswith("_fp") and not name.endswith("start_fp"))
    column = {name: values[:, i] for i, name in enumerate(header)}
    grid = column["energy_ev"]
    fits = {"start": (np.stack([column[f"{s}_fp_start"] for s in sites]),
                      np.stack([column[f"{s}_fdp_start"] for s in sites])),
            "spread": (np.stack([column[f"{s}_fp"] for s in sites]), np.stack([column[f"{s}_fdp"] for s in sites]))}
    sigmas = {s: (column[f"{s}_fp_sigma"], column[f"{s}_fdp_sigma"]) for s in sites}
    control_header, control_values = _read_tsv(paths["controls"])
    controls = {name: control_values[:, i] for i, name in enumerate(control_header)}
    if not np.allclose(controls["energy_ev"], grid):
        raise SpreadInputError(f"{paths['controls']}: its energies are not those of {path}")
    names = [name[:-len(f"_{sites[0]}_fp")] for name in control_header if name.endswith(f"_{sites[0]}_fp")]
    for name in names:
        fits[name] = (np.stack([controls[f"{name}_{s}_fp"] for s in sites]),
                      np.stack([controls[f"{name}_{s}_fdp"] for s in sites]))
    return grid, sites, fits, sigmas


def truth_on_grid(grid: np.ndarray, sites: tuple[str, ...], truth_tables: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The true f', f'' (n_sites, n_grid) of every site from ``{site: table path}``."""
    missing = [site for site in sites if site not in truth_tables]
    if missing:
        raise SpreadInputError(f"no true table for site(s) {', '.join(missing)} (the simulation's sites: "
                               f"{', '.join(truth_tables)})")
    values = [table_on_grid(read_table(truth_tables[site]), grid, truth_tables[site]) for site in sites]
    return np.stack([v[0] for v in values]), np.stack([v[1] for v in values])


def score_fits(grid: np.ndarray, sites: tuple[str, ...], fits: dict, truth: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """One row (:data:`SCORE_COLUMNS`) per fit and site, and per fit one row of the first two sites'
    difference (``site`` ``A-B``)."""
    middle = (grid >= SCORE_RANGE_EV[0]) & (grid <= SCORE_RANGE_EV[1])
    true_fp, true_fdp = truth

    def rms(values):
        return float(np.sqrt(np.mean(values[middle] ** 2)))

    def edges(fp, fdp):
        return half_rise_energy(grid, fdp), fp_minimum_energy(grid, fp)

    rows = []
    baseline = None
    for fit_name, (fp, fdp) in fits.items():
        for s, site in enumerate(sites):
            rise, minimum = edges(fp[s], fdp[s])
            true_rise, true_minimum = edges(true_fp[s], true_fdp[s])
            post, true_post = half_rise_post_edge_energy(grid, fdp[s]), half_rise_post_edge_energy(grid, true_fdp[s])
            step, true_step = step_edge_energy(grid, fdp[s]), step_edge_energy(grid, true_fdp[s])
            rows.append({"fit": fit_name, "site": site, "fp_rms_error_e": rms(fp[s] - true_fp[s]),
                         "fdp_rms_error_e": rms(fdp[s] - true_fdp[s]), "half_rise_ev": rise,
                         "half_rise_true_ev": true_rise, "half_rise_error_ev": rise - true_rise,
                         "fp_minimum_ev": minimum, "fp_minimum_true_ev": true_minimum,
                         "fp_minimum_error_ev": minimum - true_minimum, "order_correct": "", "recovers_difference": "",
                         "half_rise_post_ev": post, "half_rise_post_true_ev": true_post,
                         "half_rise_post_error_ev": post - true_post,
                         "step_edge_ev": step, "step_edge_true_ev": true_step, "step_edge_error_ev": step - true_step})
        if len(sites) < 2:
            continue
        (rise_a, min_a), (rise_b, min_b) = edges(fp[0], fdp[0]), edges(fp[1], fdp[1])
        (true_rise_a, true_min_a), (true_rise_b, true_min_b) = (edges(true_fp[0], true_fdp[0]),
                                                                edges(true_fp[1], true_fdp[1]))
        difference_error = rms((fdp[0] - fdp[1]) - (true_fdp[0] - true_fdp[1]))
        if baseline is None:
            baseline = difference_error if fit_name == "start" else rms(true_fdp[0] - true_fdp[1])
        order = bool(np.sign(rise_a - rise_b) == np.sign(true_rise_a - true_rise_b))
        rows.append({"fit": fit_name, "site": f"{sites[0]}-{sites[1]}",
                     "fp_rms_error_e": rms((fp[0] - fp[1]) - (true_fp[0] - true_fp[1])),
                     "fdp_rms_error_e": difference_error, "half_rise_ev": rise_a - rise_b,
                     "half_rise_true_ev": true_rise_a - true_rise_b,
                     "half_rise_error_ev": (rise_a - rise_b) - (true_rise_a - true_rise_b),
                     "fp_minimum_ev": min_a - min_b, "fp_minimum_true_ev": true_min_a - true_min_b,
                     "fp_minimum_error_ev": (min_a - min_b) - (true_min_a - true_min_b),
                     "order_correct": int(order),
                     "recovers_difference": int(order and difference_error < 0.5 * baseline),
                     "half_rise_post_ev": "", "half_rise_post_true_ev": "", "half_rise_post_error_ev": "",
                     "step_edge_ev": "", "step_edge_true_ev": "", "step_edge_error_ev": ""})
    return rows


def format_score(dataset: str, rows: list[dict], lattices: int | None = None) -> str:
    """The score as text: one line per fit and site, then a plain sentence per fit on the difference."""
    lines = [f"SPREAD {dataset}" + (f" ({lattices} lattices)" if lattices is not None else "")
             + f": errors against the simulated tables over {SCORE_RANGE_EV[0]:g}-{SCORE_RANGE_EV[1]:g} eV"]
    for row in rows:
        if "-" in row["site"]:
            continue
        lines.append(f"  {row['fit']:<18} {row['site']:<5} rms f' {row['fp_rms_error_e']:.2f} e, f'' "
                     f"{row['fdp_rms_error_e']:.2f} e; half-rise {row['half_rise_ev']:.1f} eV (true "
                     f"{row['half_rise_true_ev']:.1f}), f' minimum {row['fp_minimum_ev']:.1f} eV (true "
                     f"{row['fp_minimum_true_ev']:.1f})")
    for row in rows:
        if "-" not in row["site"]:
            continue
        verdict = "recovers" if row["recovers_difference"] else "does not recover"
        lines.append(f"  {row['fit']}: {verdict} the sites' difference ({row['site']} f'' rms error "
                     f"{row['fdp_rms_error_e']:.2f} e; half-rise difference {row['half_rise_ev']:+.1f} eV, true "
                     f"{row['half_rise_true_ev']:+.1f}, order {'right' if row['order_correct'] else 'wrong'})")
    return "\n".join(lines) + "\n"


def write_score_table(rows: list[dict], path: str) -> None:
    """The rows as TSV (:data:`SCORE_COLUMNS`), atomically."""
    from xfel_spread.atomic import atomic_output

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    with atomic_output(path, "w") as stream:
        stream.write("\t".join(SCORE_COLUMNS) + "\n")
        for row in rows:
            stream.write("\t".join(cell(row[column]) for column in SCORE_COLUMNS) + "\n")


def plot_spread(path: str, dataset: str, grid: np.ndarray, sites: tuple[str, ...], fits: dict, sigmas: dict,
                truth: tuple[np.ndarray, np.ndarray] | None, lattices: int | None = None) -> None:
    """Each site's refined f' and f'' with 1-sigma bands, beside the true and start tables and the controls."""
    from xfel_spread.plotting import pyplot, save_png

    plt = pyplot()
    figure, axes = plt.subplots(2, len(sites), figsize=(5.5 * len(sites), 7), sharex=True, squeeze=False)
    control_styles = [":", "-."]
    for s, site in enumerate(sites):
        for part, (axis, label) in enumerate(zip(axes[:, s], ("f'", "f''"))):
            fitted = fits["spread"][part][s]
            sigma = sigmas[site][part]
            axis.fill_between(grid, fitted - sigma, fitted + sigma, color="C0", alpha=0.3, lw=0)
            axis.plot(grid, fitted, color="C0", label="SPREAD (1 sigma band)")
            if truth is not None:
                axis.plot(grid, truth[part][s], color="k", label="simulated (truth)")
            axis.plot(grid, fits["start"][part][s], color="C3", ls="--", label="start")
            controls = [name for name in fits if name not in ("start", "spread")]
            for i, name in enumerate(controls):
                axis.plot(grid, fits[name][part][s], color="0.5", lw=0.8, ls=control_styles[i % 2],
                          label=f"control: {name.replace('_', ' ')}")
            axis.set_ylabel(f"{label} (electrons)")
            axis.set_title(f"{site} {label}")
            axis.grid(alpha=0.3)
        axes[1, s].set_xlabel("photon energy (eV)")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(f"SPREAD {dataset}" + (f": {lattices} lattices" if lattices is not None else ""))
    save_png(figure, path)


def score_spread(dataset: str, prefix: str, truth_tables: dict[str, str], table: str, text_path: str, plot: str,
                 lattices: int | None = None) -> str:
    """Score a stage's outputs (prefix P) against ``{site: true table}``; write table, text and figure."""
    from xfel_spread.atomic import atomic_output

    grid, sites, fits, sigmas = read_fits(prefix)
    truth = truth_on_grid(grid, sites, truth_tables)
    rows = score_fits(grid, sites, fits, truth)
    write_score_table(rows, table)
    text = format_score(dataset, rows, lattices)
    with atomic_output(text_path, "w") as stream:
        stream.write(text)
    plot_spread(plot, dataset, grid, sites, fits, sigmas, truth, lattices)
    return text
