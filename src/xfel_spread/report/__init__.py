"""Figures made for the Snakemake report (``snakemake --report``) that no stage draws itself."""
