"""The SPREAD stage's driver (xfel_spread.spread.pipeline.run_spread), its command and its scoring.

The driver runs in-process on the tiny stage-1 case of tests/stage1_cases.py (one shard, 2 lattices, 10
channels) refined by stage 1's driver; it is given three times, as shards with both lattices, only the
first and only the second converged, so that one rank holds all three, two ranks (threads sharing an
in-process communicator) hold shards 0 and 2 and shard 1, or four ranks leave one without a shard: the
outputs must be the same bytes (a sum in rank order instead of shard order would differ). The command's user errors are one line. The score is checked on known tables.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from sim_fixtures import B_SOL, D_MIN_A, K_SOL, PDB_PATH, SHARED_DATA_DIR
from stage1_cases import write_case
from xfel_spread.cli.spread import score_spread_main
from xfel_spread.mpi import SerialComm
from xfel_spread.spread.outputs import output_paths
from xfel_spread.spread.pipeline import SpreadInputs, run_spread
from xfel_spread.spread.scoring import plot_spread, score_fits, truth_on_grid
from xfel_spread.spread.tables import energy_grid, read_table, table_on_grid, table_path


class ThreadComm:
    """An in-process communicator of ``size`` ranks, one thread each (allgather, bcast through a barrier)."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.shared = rank, shared

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.shared["size"]

    def allgather(self, value):
        shared = self.shared
        shared["slots"][self.rank] = value
        shared["barrier"].wait()
        values = list(shared["slots"])
        shared["barrier"].wait()
        return values

    def bcast(self, value, root=0):
        return self.allgather(value)[root]

    def gather(self, value, root=0):
        values = self.allgather(value)
        return values if self.rank == root else None

    def Abort(self, code=1):  # noqa: N802
        raise RuntimeError(f"abort {code}")


def run_on_threads(size, function):
    shared = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size)}
    results, errors = [None] * size, []

    def target(rank):
        try:
            results[rank] = function(ThreadComm(rank, shared))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The tiny case, refined by stage 1 (spread-exa's driver): its shots table and refined experiments."""
    from xfel_spread.stage1.pipeline import Stage1Inputs, refine_in_batches, run_stage1

    directory = tmp_path_factory.mktemp("spread_case")
    case = write_case(directory)
    config = directory / "stage1.yaml"
    config.write_text("stage1:\n  structure_factors: model\n  device: cpu\n")
    (directory / "exa").mkdir()
    stage1_prefix = directory / "exa" / "shard_00000"
    results = run_stage1(Stage1Inputs(str(config), str(case.annulus_prefix), str(case.shard), str(stage1_prefix),
                                      amplitudes=str(case.amplitudes)), "spread-exa", refine_in_batches, SerialComm())
    assert all(result.row["converged"] == 1 for result in results)
    return case, stage1_prefix


def spread_config(path, **spread):
    """The stage's settings: the case's channels and structure factors, a coarse grid, few iterations."""
    settings = {"grid_spacing_ev": 5.0, "max_iterations": 15, "posterior_samples": 50, **spread}
    lines = ["structure_factors:", f"  d_min_a: {D_MIN_A}", f"  k_sol: {K_SOL}", f"  b_sol: {B_SOL}",
             "  channel_start_ev: 7075.5", "  channel_step_ev: 10.0", "  n_channels: 10",
             "stage1:", "  structure_factors: model", "  device: cpu", "spread:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def inputs_for(case, config, prefix, stage1_prefixes=None):
    case, default_prefix = case
    stage1_prefixes = stage1_prefixes or [default_prefix]
    shards = len(stage1_prefixes)
    return SpreadInputs(config, "psf", (str(case.annulus_prefix),) * shards, (str(case.shard),) * shards,
                        tuple(map(str, stage1_prefixes)), str(PDB_PATH), str(SHARED_DATA_DIR), str(prefix))


def with_column(stage1_prefix, prefix, name, cell):
    """A copy of the stage-1 shots table at ``prefix`` with column ``name`` of each lattice's row set to
    ``cell(lattice, old cell)``."""
    with open(f"{stage1_prefix}_shots.tsv") as stream:
        lines = stream.read().splitlines()
    column = lines[0].split("\t").index(name)
    rows = [line.split("\t") for line in lines[1:]]
    for lattice, row in enumerate(rows):
        row[column] = cell(lattice, row[column])
    with open(f"{prefix}_shots.tsv", "w") as stream:
        stream.write("\n".join([lines[0]] + ["\t".join(row) for row in rows]) + "\n")
    return prefix


def with_converged(stage1_prefix, prefix, converged):
    """A copy of the stage-1 shots table at ``prefix`` with only the lattices ``converged`` converged."""
    return with_column(stage1_prefix, prefix, "converged", lambda lattice, _: "1" if lattice in converged else "0")


def output_bytes(prefix):
    return {key: open(path, "rb").read() for key, path in output_paths(prefix).items()
            if key != "summary"}


def test_one_two_and_four_ranks_write_the_same_bytes(case, tmp_path):
    config = spread_config(tmp_path / "spread.yaml")
    _, stage1_prefix = case
    prefixes = [stage1_prefix, with_converged(stage1_prefix, tmp_path / "first", {0}),
                with_converged(stage1_prefix, tmp_path / "second", {1})]
    summary = run_spread(inputs_for(case, config, tmp_path / "one", prefixes), SerialComm())
    two = run_on_threads(2, lambda comm: run_spread(inputs_for(case, config, tmp_path / "two", prefixes), comm))
    assert two[1] is None and two[0]["ranks"] == 2
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "two")
    # More ranks than shards: the fourth holds none.
    run_on_threads(4, lambda comm: run_spread(inputs_for(case, config, tmp_path / "four", prefixes), comm))
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "four")
    one_summary, two_summary = (json.loads(open(f"{tmp_path / name}_summary.json").read()) for name in ("one", "two"))
    for drop in ("seconds", "ranks"):
        one_summary.pop(drop), two_summary.pop(drop)
    assert one_summary == two_summary

    # What the outputs hold: the shards' lattices, finite values with positive sigmas, both controls.
    assert summary["lattices"] == 4 and [shard["lattices"] for shard in summary["shards"]] == [2, 1, 1]
    assert summary["controls_run"] == ["miller_l_plus_1", "shuffled_channels"]
    # Simulated shots: spectra on the structure_factors channels already, and a truth to score against.
    assert summary["spectra_rebinned"] == 0 and summary["input_source"] == "simulate"
    assert summary["truth"].startswith("the simulation's tables")
    with open(f"{tmp_path / 'one'}_fp_fdp.tsv", newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    assert len(rows) == summary["grid_ev"][2] == len(energy_grid(7075.0, 7165.5, 5.0))
    for site in ("FE1", "FE2"):
        for part in ("fp", "fdp"):
            assert all(np.isfinite(float(row[f"{site}_{part}"])) and float(row[f"{site}_{part}_sigma"]) > 0
                       for row in rows)
    with open(f"{tmp_path / 'one'}_scales.tsv", newline="") as stream:
        scales = list(csv.DictReader(stream, delimiter="\t"))
    assert [(row["shard"], row["lattice"]) for row in scales] == [("0", "0"), ("0", "1"), ("1", "0"), ("2", "1")]
    assert all(float(row["scale"]) > 0 for row in scales)

    # Its score and figure.
    truth = [f"--truth=FE1={SHARED_DATA_DIR / 'pf-rd-ox_fftkk.out'}", f"--truth=FE2={SHARED_DATA_DIR / 'pf-rd-red_fftkk.out'}"]
    assert score_spread_main(["--dataset", "psf", "--prefix", str(tmp_path / "one"), *truth,
                              "--table", str(tmp_path / "score.tsv"), "--text", str(tmp_path / "score.txt"),
                              "--plot", str(tmp_path / "score.png")]) == 0
    assert (tmp_path / "score.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "score.tsv", newline="") as stream:
        fits = {row["fit"] for row in csv.DictReader(stream, delimiter="\t")}
    assert fits == {"start", "spread", "miller_l_plus_1", "shuffled_channels"}


def test_behind_a_point_spread_one_and_two_ranks_write_the_same_bytes(case, tmp_path):
    """With the point spread modelled (folded into the coefficients) the outputs are still the same
    bytes on any rank count, and differ from those without it."""
    import dataclasses

    config = spread_config(tmp_path / "spread.yaml", controls=False)
    _, stage1_prefix = case
    prefixes = [stage1_prefix, with_converged(stage1_prefix, tmp_path / "first", {0})]

    def inputs(name, psf=True):
        plain = inputs_for(case, config, tmp_path / name, prefixes)
        return dataclasses.replace(plain, psf_fwhm_mm=0.08, psf_radius_px=3) if psf else plain

    run_spread(inputs("one"), SerialComm())
    run_on_threads(2, lambda comm: run_spread(inputs("two"), comm))
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "two")
    run_spread(inputs("plain", psf=False), SerialComm())
    assert output_bytes(tmp_path / "one")["fp_fdp"] != output_bytes(tmp_path / "plain")["fp_fdp"]


def command_argv(case, tmp_path, config, stage1_prefix=None):
    inputs = inputs_for(case, config, tmp_path / "out", [stage1_prefix] if stage1_prefix else None)
    return ["--config", inputs.config, "--dataset", "psf", "--annulus-prefix", inputs.annulus_prefixes[0],
            "--shard", inputs.shards[0], "--stage1-prefix", inputs.stage1_prefixes[0], "--pdb", inputs.pdb,
            "--tables-dir", inputs.tables_dir, "--output-prefix", inputs.output_prefix]


#: Runs spread_main once per argv list (JSON on the command line) and prints [status, stderr] per run
#: (JSON): one process pays for the MPI, torch and cctbx imports once, for every case.
RUN_EACH = """
import contextlib, io, json, sys
from xfel_spread.cli.spread import spread_main
results = []
for argv in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = spread_main(argv)
    results.append([status, stderr.getvalue()])
print(json.dumps(results))
"""


def command_errors(*argvs) -> list[str]:
    """The error line spread-spread ends with, for each argv (each must fail with status 1)."""
    # In a child process: mpi4py initialises MPI on import, and an MPI-initialised pytest process breaks
    # every mpirun that later tests start (they exit 1 with no output).
    result = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(argvs)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = []
    for status, stderr in json.loads(result.stdout.strip().splitlines()[-1]):
        assert status == 1, stderr[-3000:]
        errors.append(stderr.strip().splitlines()[-1])
        assert errors[-1].startswith("spread-spread: error: ")
    return errors


@pytest.mark.slow  # four failing runs of the command in one process (MPI, torch and cctbx imported once)
def test_user_errors_are_one_line(case, tmp_path):
    _, stage1_prefix = case
    # A start table that does not cover the channels.
    narrow = tmp_path / "narrow.dat"
    narrow.write_text("".join(f"{energy} -1.0 3.0\n" for energy in range(7100, 7131)))
    no_lattice, no_site, narrow_table, bad_setting = command_errors(
        # No converged lattice in the stage-1 results.
        command_argv(case, tmp_path, spread_config(tmp_path / "a.yaml"),
                     str(with_converged(stage1_prefix, tmp_path / "failed", set()))),
        # A site the model lacks.
        command_argv(case, tmp_path, spread_config(tmp_path / "b.yaml", sites={"FE9": "metallic"})),
        command_argv(case, tmp_path, spread_config(tmp_path / "c.yaml", sites={"FE1": str(narrow)})),
        # A setting out of range.
        command_argv(case, tmp_path, spread_config(tmp_path / "d.yaml", refinement="dials")))
    assert "failed_shots.tsv: no converged lattices" in no_lattice
    assert "1m2a.pdb" in no_site and "FE9" in no_site
    assert "narrow.dat: table covers 7100-7130 eV" in narrow_table
    assert "d.yaml" in bad_setting and "refinement" in bad_setting


def tables_on(grid, *names):
    values = [table_on_grid(read_table(table_path(name, str(SHARED_DATA_DIR))), grid, name) for name in names]
    return np.stack([v[0] for v in values]), np.stack([v[1] for v in values])


def test_score_of_known_tables(tmp_path):
    grid = energy_grid(7070.0, 7170.0, 1.0)
    truth_tables = {"FE1": str(SHARED_DATA_DIR / "pf-rd-ox_fftkk.out"), "FE2": str(SHARED_DATA_DIR / "pf-rd-red_fftkk.out")}
    truth = truth_on_grid(grid, ("FE1", "FE2"), truth_tables)
    fits = {"start": tables_on(grid, "metallic", "metallic"), "spread": truth,
            "swapped": tables_on(grid, "reduced", "oxidized")}
    rows = {(row["fit"], row["site"]): row for row in score_fits(grid, ("FE1", "FE2"), fits, truth)}
    exact = rows[("spread", "FE1")]
    assert exact["fp_rms_error_e"] == 0 and exact["fdp_rms_error_e"] == 0 and exact["half_rise_error_ev"] == 0
    assert exact["half_rise_true_ev"] == pytest.approx(7119.9, abs=0.05)
    assert rows[("spread", "FE2")]["fp_minimum_true_ev"] == pytest.approx(7116.1, abs=0.05)
    assert rows[("spread", "FE1-FE2")]["recovers_difference"] == 1 and rows[("spread", "FE1-FE2")]["order_correct"] == 1
    # Both sites from one table: no difference; the two tables swapped: the wrong order.
    assert rows[("start", "FE1-FE2")]["recovers_difference"] == 0
    assert rows[("swapped", "FE1-FE2")]["order_correct"] == 0 and rows[("swapped", "FE1-FE2")]["recovers_difference"] == 0
    assert rows[("start", "FE1")]["half_rise_ev"] == pytest.approx(7112.5, abs=0.05)
    # The post-edge half-rise (level half-way to the last 20 eV's mean) falls on the steep part of the
    # oxidized rise, below its shoulder, and is exact for the exact fit.
    assert exact["half_rise_post_true_ev"] == pytest.approx(7119.25, abs=0.05) and exact["half_rise_post_error_ev"] == 0
    assert rows[("spread", "FE2")]["half_rise_post_true_ev"] == pytest.approx(7117.56, abs=0.05)
    # The step edge (the sharp step of the same area): oxidized 2.2 eV above reduced, metallic lowest.
    assert exact["step_edge_true_ev"] == pytest.approx(7120.64, abs=0.01) and exact["step_edge_error_ev"] == 0
    assert rows[("spread", "FE2")]["step_edge_true_ev"] == pytest.approx(7118.43, abs=0.01)
    assert rows[("start", "FE1")]["step_edge_ev"] == pytest.approx(7112.36, abs=0.01)
    with pytest.raises(ValueError, match="no true table for site"):
        truth_on_grid(grid, ("FE1", "FE3"), truth_tables)

    sigmas = {site: (np.full(len(grid), 0.2), np.full(len(grid), 0.3)) for site in ("FE1", "FE2")}
    plot_spread(str(tmp_path / "spread.png"), "psf", grid, ("FE1", "FE2"), fits, sigmas, truth, 8)
    assert (tmp_path / "spread.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("shards, threads, message", [
    ((("a",), ("s1", "s2"), ("p",)), 1, "give one --annulus-prefix, --shard and --stage1-prefix per shard"),
    ((("a",), ("s",), ("p",)), 0, "--threads must be at least 1"),
])
def test_options_are_checked_before_any_work(tmp_path, shards, threads, message):
    from xfel_spread.mpi import AgreedError

    inputs = SpreadInputs(str(tmp_path / "missing.yaml"), "psf", *shards, "m.pdb", str(tmp_path),
                          str(tmp_path / "out"), threads)
    with pytest.raises(AgreedError, match=message):
        run_spread(inputs, SerialComm())


def test_an_analytic_eta_from_stage1_reaches_the_coefficients(tmp_path):
    """Stage 1's analytic eta (the default eta_model when eta is refined) is SPREAD's too: the stage takes
    it (the coefficients' equality with stage 1's model: tests/test_spread_coefficients.py)."""
    from xfel_spread.spread.pipeline import _prepare_spread

    config = tmp_path / "eta.yaml"
    config.write_text("stage1:\n  refine: [G, rotation, cell, ncells, eta]\n")
    inputs = SpreadInputs(str(config), "psf", ("a",), ("s",), ("p",), str(PDB_PATH), str(SHARED_DATA_DIR),
                          str(tmp_path / "out"))
    stage1 = _prepare_spread(inputs)[1]
    assert stage1.analytic_mosaic and stage1.n_domains == 1
    config.write_text("stage1:\n  refine: [G, rotation, cell, ncells, eta]\n  eta_model: domains\n")
    assert _prepare_spread(inputs)[1].n_domains == 25


def test_spectra_on_the_channel_grid_are_used_as_they_are_and_others_are_rebinned(case, tmp_path):
    """shard_lattices puts every shot's spectrum on the structure_factors channels: the simulated case's
    spectra (10 channels of 10 eV from 7075.5 eV) give the same bytes; a finer grid gets them rebinned; a
    grid that does not reach them is refused in one line naming the shard and image."""
    from xfel_spread.sim.structure_factors import channel_energies
    from xfel_spread.spread.errors import SpreadInputError
    from xfel_spread.spread.pipeline import _lookup_of, _prepare_spread, _site_decomposition, shard_lattices

    written, stage1_prefix = case
    inputs = inputs_for(case, spread_config(tmp_path / "spread.yaml"), tmp_path / "out")
    settings, stage1, structure, psf, source = _prepare_spread(inputs)
    assert source == "simulate"
    lookup = _lookup_of(_site_decomposition(inputs, settings, structure))

    def lattices(grid=None):
        return shard_lattices(str(written.annulus_prefix), str(written.shard), str(stage1_prefix), lookup, stage1,
                              settings.relative_cutoff, psf, max_lattices=1, channel_grid_ev=grid)

    (plain,), (on_grid,) = lattices(), lattices(channel_energies(7075.5, 10.0, 10))
    assert not on_grid.spectrum_rebinned
    for field in ("energies_ev", "data", "shoebox", "dx", "dy", "term_pixel", "term_channel", "term_column",
                  "term_coeff"):
        assert np.array_equal(getattr(plain, field), getattr(on_grid, field)), field
    assert plain.readout_var == on_grid.readout_var

    finer = channel_energies(7070.5, 1.0, 100)
    (rebinned,) = lattices(finer)
    assert rebinned.spectrum_rebinned and np.array_equal(rebinned.energies_ev, finer)
    assert np.array_equal(rebinned.data, plain.data) and np.all(np.isfinite(rebinned.term_coeff))
    # Only the grid channels the case's channels landed on carry terms.
    assert set(np.unique(rebinned.term_channel)) <= set(np.searchsorted(finer, plain.energies_ev))

    with pytest.raises(SpreadInputError, match=rf"^{written.shard}: image \d+ \(lattice 0\): spectrum at "
                                                r"7075\.500-7165\.500 eV lies outside the channel grid") as error:
        lattices(channel_energies(7000.5, 1.0, 50))
    assert "\n" not in str(error.value)


def test_a_model_of_another_crystal_is_refused_in_one_line(case, tmp_path):
    """SPREAD's fixed part comes from the model: lattices whose cell is not the model's (e.g. the LY99
    default under images of another crystal) stop it in one line naming the model."""
    from xfel_spread.spread.errors import SpreadInputError
    from xfel_spread.spread.pipeline import _lookup_of, _prepare_spread, _site_decomposition, shard_lattices

    written, stage1_prefix = case
    inputs = inputs_for(case, spread_config(tmp_path / "spread.yaml"), tmp_path / "out")
    settings, stage1, structure, psf, _ = _prepare_spread(inputs)
    decomposition = _site_decomposition(inputs, settings, structure)

    def lattices(model_cell):
        return shard_lattices(str(written.annulus_prefix), str(written.shard), str(stage1_prefix),
                              _lookup_of(decomposition), stage1, settings.relative_cutoff, psf, max_lattices=1,
                              model_cell=model_cell, model_path="model.pdb")

    assert len(lattices(decomposition.unit_cell)) == 1
    with pytest.raises(SpreadInputError, match=r"^model\.pdb: the model's cell \(93\.40 93\.40 131\.20 90\.00 90\.00 "
                                               r"120\.00\) is not the lattices'") as error:
        lattices((93.4, 93.4, 131.2, 90.0, 90.0, 120.0))
    assert "\n" not in str(error.value)


def with_domains(stage1_prefix, prefix, vectors_deg, eta_deg=None):
    """A copy of the stage-1 shots table at ``prefix`` with lattice 0's eta the RMS angle of ``vectors_deg``
    (or ``eta_deg``), and a domains table giving lattice 0 those domains."""
    from xfel_spread.io.mosaic_domains import write_domain_vectors

    rms = float(np.sqrt((vectors_deg ** 2).sum(axis=1).mean()))
    eta = f"{rms if eta_deg is None else eta_deg:.10g}"
    with_column(stage1_prefix, prefix, "eta_deg", lambda lattice, old: eta if lattice == 0 else old)
    write_domain_vectors({0: vectors_deg}, f"{prefix}_domains.tsv")
    return prefix


def test_stage1s_free_domains_are_spreads_model_of_their_lattices(case, tmp_path):
    """A lattice with free domains in the stage-1 domains table is modelled by them (the coefficients of
    lattice_arrays given its vectors; their equality with stage 1's model: test_spread_coefficients), a
    lattice without by the shots table alone; domains the shots table does not match are refused in one
    line naming the file."""
    from xfel_spread.io.mosaic_domains import read_domain_vectors
    from xfel_spread.spread.assemble import lattice_arrays
    from xfel_spread.spread.errors import SpreadInputError
    from xfel_spread.spread.pipeline import (_lookup_of, _prepare_spread, _site_decomposition, converged_parameters,
                                             shard_lattices)
    from xfel_spread.stage1.rois import open_annulus_shard, read_lattices, select_rois

    written, stage1_prefix = case
    inputs = inputs_for(case, spread_config(tmp_path / "spread.yaml"), tmp_path / "out")
    settings, stage1, structure, psf, _ = _prepare_spread(inputs)
    lookup = _lookup_of(_site_decomposition(inputs, settings, structure))

    def lattices(prefix):
        return shard_lattices(str(written.annulus_prefix), str(written.shard), str(prefix), lookup, stage1,
                              settings.relative_cutoff, psf)

    vectors = np.random.default_rng(3).normal(0.0, 0.03, (4, 3))
    vectors -= vectors.mean(axis=0)
    prefix = with_domains(stage1_prefix, tmp_path / "free", vectors)
    plain, free = lattices(stage1_prefix), lattices(prefix)
    assert [one.free_domains for one in plain] == [0, 0] and [one.free_domains for one in free] == [4, 0]
    assert np.array_equal(free[0].data, plain[0].data) and not np.array_equal(free[0].term_coeff, plain[0].term_coeff)
    for field in ("term_pixel", "term_channel", "term_column", "term_coeff"):
        assert np.array_equal(getattr(free[1], field), getattr(plain[1], field)), field
    # Lattice 0's arrays are lattice_arrays' of its shot given the table's vectors (as written: 10 digits).
    annulus = open_annulus_shard(str(written.annulus_prefix), str(written.shard))
    ((_, shot, _),) = read_lattices(annulus, [0], stage1.shoebox_size_px, lambda lattice, error: None)
    direct = lattice_arrays(select_rois(shot, lookup.columns(shot.miller_index) >= 0),
                            converged_parameters(f"{prefix}_shots.tsv")[0], stage1.n_domains, lookup,
                            stage1.readout_sigma_adu, settings.relative_cutoff, psf,
                            stage1.mosaic_model if stage1.analytic_mosaic else None,
                            read_domain_vectors(f"{prefix}_domains.tsv")[0])
    assert np.abs(direct.term_coeff - free[0].term_coeff).max() <= 1e-9 * np.abs(direct.term_coeff).max()

    with pytest.raises(SpreadInputError, match=rf"^{prefix}_domains\.tsv: lattice 0's domains turn 0\.0\d+ deg RMS, "
                                                r"its eta in .* is 0\.2 \(files of different runs\?\)$"):
        lattices(with_domains(stage1_prefix, tmp_path / "free", vectors, eta_deg=0.2))
    unconverged = with_converged(with_domains(stage1_prefix, tmp_path / "free", vectors), tmp_path / "free", [1])
    with pytest.raises(SpreadInputError, match=rf"^{unconverged}_domains\.tsv: domains of lattice 0, which "
                                                r".* does not hold as converged"):
        lattices(unconverged)


def test_a_stage1_output_without_its_domains_table(case, tmp_path):
    """A stage-1 output written before the domains table existed: SPREAD models its lattices by the shots
    table when the free domains are off, and asks for the table in one line when they are on."""
    import dataclasses
    import shutil

    from xfel_spread.spread.errors import SpreadInputError
    from xfel_spread.spread.pipeline import _lookup_of, _prepare_spread, _site_decomposition, shard_lattices

    written, stage1_prefix = case
    inputs = inputs_for(case, spread_config(tmp_path / "spread.yaml"), tmp_path / "out")
    settings, stage1, structure, psf, _ = _prepare_spread(inputs)
    lookup = _lookup_of(_site_decomposition(inputs, settings, structure))
    older = tmp_path / "older"
    shutil.copy(f"{stage1_prefix}_shots.tsv", f"{older}_shots.tsv")

    def lattices(stage1_settings):
        return shard_lattices(str(written.annulus_prefix), str(written.shard), str(older), lookup, stage1_settings,
                              settings.relative_cutoff, psf, max_lattices=1)

    assert [one.free_domains for one in lattices(stage1)] == [0]
    with pytest.raises(SpreadInputError, match=rf"^{older}_domains\.tsv: no such file, but stage1\.free_domains is on"
                                                r".*--forcerun stage1 exa\)$"):
        lattices(dataclasses.replace(stage1, free_domains=25))
