"""The SPREAD stage's output files: one prefix per dataset, these suffixes.

A module of its own, without torch or cctbx, because Snakemake reads it while it parses the workflow
(rules/common.smk's ``spread_outputs``), on every run and dry run and in every Slurm job. The stage's
writers (spread.pipeline, spread.run) and its score's readers (spread.scoring) name the files through it.
"""

#: Output name -> suffix after the stage's prefix (rules/spread.smk's outputs; spread.run.write_results).
OUTPUT_SUFFIXES = {"fp_fdp": "_fp_fdp.tsv", "edges": "_edges.tsv", "scales": "_scales.tsv",
                   "controls": "_controls.tsv", "summary": "_summary.json"}


def output_paths(prefix: str) -> dict[str, str]:
    """Output name -> the file of the stage's outputs with ``prefix``."""
    return {name: f"{prefix}{suffix}" for name, suffix in OUTPUT_SUFFIXES.items()}
