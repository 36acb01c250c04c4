"""Stages 2-4: DIALS stills processing, detector metrology, scoring against the simulation.

The DIALS programs themselves do the crystallography; this package runs them on shards, gathers their
per-rank output into one set of files per shard, and turns refined geometry into the next stage's input.
"""
