"""Entry points of the per-shot pixel refinement (stages 8-9) and of its scoring.

``spread-stage1``: refine every lattice of one annulus shard against its shoebox pixels, one shot at
a time (``stage1.refine.refine_shot``), under MPI (``mpirun -n N spread-stage1 ...``).
``spread-exa``: the same through the batched forward-model API (``stage1.batched.refine_batch``), in
batches of ``stage1.batch_shots`` on ``stage1.device``; run one rank per GPU.
``spread-score-stage1``: the refined lattices of a dataset against the simulation's truth.

The work is :func:`xfel_spread.stage1.pipeline.run_stage1` (ranks, outputs, failures: see there).
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import add_structure_factor_source, add_threads_and_psf, rank_zero_reports, run_command


def _stage1_parser(program: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program, description=description)
    parser.add_argument("--config", required=True, help="pipeline settings of the stage (YAML, section stage1)")
    parser.add_argument("--annulus-prefix", required=True,
                        help="annulus shard prefix A: reads A_annulus.expt and A_annulus.refl")
    parser.add_argument("--shard", required=True, help="the simulated shard (HDF5) the experiments' images are in")
    add_structure_factor_source(parser)
    parser.add_argument("--output-prefix", required=True, help="write P_refined.expt, P_shots.tsv and P_domains.tsv")
    add_threads_and_psf(parser)
    return parser


def _run_stage1_command(program: str, description: str, batched: bool, argv: list[str] | None) -> int:
    """Parse the command line of ``spread-stage1``/``spread-exa`` and run the stage under MPI."""
    arguments = _stage1_parser(program, description).parse_args(argv)

    def action():
        from mpi4py import MPI

        from xfel_spread.stage1.io import output_paths
        from xfel_spread.stage1.pipeline import Stage1Inputs, refine_in_batches, refine_one_by_one, run_stage1

        inputs = Stage1Inputs(arguments.config, arguments.annulus_prefix, arguments.shard, arguments.output_prefix,
                              mtz=arguments.mtz, amplitudes=arguments.amplitudes, threads=arguments.threads,
                              psf_fwhm_mm=arguments.psf_fwhm_mm, psf_radius_px=arguments.psf_radius_px)
        with rank_zero_reports(MPI.COMM_WORLD):
            results = run_stage1(inputs, program, refine_in_batches if batched else refine_one_by_one)
        if results is not None:
            converged = sum(result.row.get("converged") == 1 for result in results)
            print(f"{program}: {converged} of {len(results)} lattices converged "
                  f"({output_paths(arguments.output_prefix)['shots']})", file=sys.stderr)

    return run_command(program, action)


def stage1_main(argv: list[str] | None = None) -> int:
    """``spread-stage1``: refine every lattice of an annulus shard, shot by shot."""
    return _run_stage1_command("spread-stage1", "Refine every lattice of one annulus shard against its shoebox "
                                                "pixels, shot by shot (run it under MPI).", False, argv)


def exa_main(argv: list[str] | None = None) -> int:
    """``spread-exa``: refine every lattice of an annulus shard through the batched forward model."""
    return _run_stage1_command("spread-exa", "Refine every lattice of one annulus shard through the batched "
                                             "forward-model API (one MPI rank per GPU).", True, argv)


def score_stage1_main(argv: list[str] | None = None) -> int:
    """``spread-score-stage1``: score the refined lattices of one dataset against the truth."""
    parser = argparse.ArgumentParser(
        prog="spread-score-stage1",
        description="Score the per-shot refinement of one dataset against the simulation's truth.")
    parser.add_argument("--dataset", required=True, help="dataset name, for the titles")
    parser.add_argument("--stage1-prefix", action="append", required=True,
                        help="output prefix of one shard's stage 1 (repeat for every shard, in order)")
    parser.add_argument("--dials-prefix", action="append", required=True,
                        help="output prefix of the same shard's reindex stage (repeat, same order)")
    parser.add_argument("--truth", action="append", required=True,
                        help="the same shard's truth JSON (repeat, same order)")
    parser.add_argument("--table", required=True, help="per-lattice scores to write (TSV)")
    parser.add_argument("--text", required=True, help="summary to write (text)")
    parser.add_argument("--plot", required=True, help="summary figure to write (PNG)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.stage1.pipeline import score_stage1

        score_stage1(arguments.dataset, arguments.stage1_prefix, arguments.dials_prefix, arguments.truth,
                     arguments.table, arguments.text, arguments.plot, echo=sys.stdout)

    return run_command("spread-score-stage1", action)


if __name__ == "__main__":
    sys.exit(stage1_main())
