"""Entry point of the SPREAD refinement (stage 10): ``spread-spread``.

Fit each anomalous site's f', f'' on an energy grid to every converged lattice of one dataset's
pixel refinement, with standard errors, edge positions and the two negative controls, under MPI
(``mpirun -n N spread-spread ...``; the same bytes for any N). The work is
:func:`xfel_spread.spread.pipeline.run_spread` (settings, outputs: see there and docs/spread.md).
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import add_dataset_shards, add_threads_and_psf, rank_zero_reports, run_command


def spread_main(argv: list[str] | None = None) -> int:
    """``spread-spread``: refine the sites' f', f'' of one dataset."""
    parser = argparse.ArgumentParser(prog="spread-spread", description=(
        "Refine the energy dependence of each anomalous site's f' and f'' against every converged lattice of "
        "one dataset (run it under MPI: shards are shared among the ranks)."))
    parser.add_argument("--config", required=True, help="pipeline settings of the stage (YAML: sections spread, "
                                                        "stage1, structure_factors)")
    parser.add_argument("--dataset", required=True, help="dataset name, for the summary")
    add_dataset_shards(parser)
    parser.add_argument("--pdb", required=True, help="the model (PDB) whose site atoms are refined")
    parser.add_argument("--tables-dir", required=True,
                        help="directory of the named start tables (Fe_fake.dat, pf-rd-ox_fftkk.out, pf-rd-red_fftkk.out)")
    parser.add_argument("--output-prefix", required=True,
                        help="write P_fp_fdp.tsv, P_edges.tsv, P_scales.tsv, P_controls.tsv and P_summary.json")
    add_threads_and_psf(parser)
    arguments = parser.parse_args(argv)

    def action():
        from mpi4py import MPI

        from xfel_spread.spread.pipeline import SpreadInputs, run_spread

        inputs = SpreadInputs(arguments.config, arguments.dataset, tuple(arguments.annulus_prefix),
                              tuple(arguments.shard), tuple(arguments.stage1_prefix), arguments.pdb,
                              arguments.tables_dir, arguments.output_prefix, arguments.threads,
                              arguments.psf_fwhm_mm, arguments.psf_radius_px)
        with rank_zero_reports(MPI.COMM_WORLD):
            run_spread(inputs, MPI.COMM_WORLD)

    return run_command("spread-spread", action)


def _site_table(text: str) -> tuple[str, str]:
    site, separator, path = text.partition("=")
    if not separator or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=TABLE, got {text!r}")
    return site, path


def score_spread_main(argv: list[str] | None = None) -> int:
    """``spread-score-spread``: score one dataset's SPREAD outputs against the simulated tables."""
    parser = argparse.ArgumentParser(prog="spread-score-spread", description=(
        "Score one dataset's SPREAD fit and its negative controls against the f', f'' tables the simulation used."))
    parser.add_argument("--dataset", required=True, help="dataset name, for the titles")
    parser.add_argument("--prefix", required=True, help="the stage's output prefix P (P_fp_fdp.tsv, P_controls.tsv, "
                                                        "P_summary.json)")
    parser.add_argument("--truth", action="append", type=_site_table, required=True,
                        help="SITE=TABLE: the table the simulation gave a site (repeat per site)")
    parser.add_argument("--table", required=True, help="scores to write (TSV)")
    parser.add_argument("--text", required=True, help="summary to write (text)")
    parser.add_argument("--plot", required=True, help="figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.spread.scoring import score_spread, summary_lattice_count

        lattices = summary_lattice_count(arguments.prefix)
        text = score_spread(arguments.dataset, arguments.prefix, dict(arguments.truth), arguments.table,
                            arguments.text, arguments.plot, lattices)
        print(text, end="")

    return run_command("spread-score-spread", action)


if __name__ == "__main__":
    sys.exit(spread_main())
