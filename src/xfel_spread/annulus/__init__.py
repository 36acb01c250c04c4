"""Stage 7's input: the merged lattices' reflections in a resolution annulus, selected and counted.

- ``annulus.select``: the settings check, the lattices' chiral space group, the counts (lattices,
  shoeboxes, unique indices, multiplicity, pixels) and the text report.
- ``annulus.pipeline``: the stage, shard by shard (``select_annulus``).
"""
