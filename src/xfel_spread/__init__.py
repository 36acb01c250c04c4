"""Snakemake pipeline for XFEL serial crystallography SPREAD analysis (ferredoxin LY99 case).

The package holds all of the pipeline's logic; the Snakemake rules only call its command-line entry
points (``xfel_spread.cli``). See docs/design.md for the layout.
"""

__version__ = "0.1.0"
