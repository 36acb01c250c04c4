"""Thin command-line entry points that the Snakemake rules call (one module per command)."""
