"""Entry point of the pixel metrology (``pixel_metrology``): the level-0 detector refined jointly with
stage 1's lattices from their shoebox pixels.

The rule runs it as a module (``{ENV_BIN}/python -m xfel_spread.cli.pixel_metrology``);
``pyproject.toml`` also installs it as ``spread-pixel-metrology``. The work is
:func:`xfel_spread.stage1.pixel_metrology.run_pixel_metrology`.
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import add_dataset_shards, add_structure_factor_source, add_threads_and_psf, run_command


def pixel_metrology_main(argv: list[str] | None = None) -> int:
    """``spread-pixel-metrology``: refine the detector from stage 1's lattices of one dataset; exit status."""
    parser = argparse.ArgumentParser(
        prog="spread-pixel-metrology",
        description="Refine the level-0 detector (beam centre, distance) jointly with the lattices stage 1 "
                    "refined, from their shoebox pixels; write the refined detector as an experiment list.")
    parser.add_argument("--config", required=True,
                        help="pipeline settings of the stage (YAML, sections pixel_metrology and stage1)")
    parser.add_argument("--dataset", default="", help="dataset name, for the figure's title")
    add_dataset_shards(parser)
    add_structure_factor_source(parser)
    parser.add_argument("--refined-detector", required=True, help="the refined detector to write (DIALS .expt)")
    parser.add_argument("--table", required=True, help="the detector before and after (TSV) to write")
    parser.add_argument("--summary", required=True, help="the refinement's summary (JSON) to write")
    parser.add_argument("--plot", required=True, help="the figure (PNG) to write")
    add_threads_and_psf(parser)
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.stage1.pixel_metrology import PixelMetrologyInputs, run_pixel_metrology

        summary = run_pixel_metrology(PixelMetrologyInputs(
            arguments.config, arguments.annulus_prefix, arguments.shard, arguments.stage1_prefix,
            arguments.refined_detector, arguments.table, arguments.summary, arguments.plot, arguments.dataset,
            mtz=arguments.mtz, amplitudes=arguments.amplitudes, threads=arguments.threads,
            psf_fwhm_mm=arguments.psf_fwhm_mm, psf_radius_px=arguments.psf_radius_px))
        robust = summary["uncertainty"]["robust"]
        sigma = "" if robust is None else f" (robust standard error {robust['fast_px']:.4f}, {robust['slow_px']:.4f} px)"
        print(f"spread-pixel-metrology: beam centre moved ({summary['shift_fast_px']:+.4f}, "
              f"{summary['shift_slow_px']:+.4f}) px{sigma}, distance {summary['shift_distance_mm']:+.4f} mm, from "
              f"{summary['n_kept']} of {summary['n_lattices']} lattices"
              f"{'' if summary['converged'] else ' (NOT converged: ' + summary['reason'] + ')'}", file=sys.stderr)

    return run_command("spread-pixel-metrology", action)


if __name__ == "__main__":
    sys.exit(pixel_metrology_main())
