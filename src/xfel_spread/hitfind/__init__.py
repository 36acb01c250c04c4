"""Hit finding: which shots hold diffraction, from the lit pixels of each image.

- ``hitfind.radial``: radius bins and collection factors of every pixel (of one panel, or of every panel
  of a multi-panel detector from its own frame), radial means, clipped radial statistics, the
  solvent-ring peak, and the simulator's background curve in the same units.
- ``hitfind.pixels``: per shot, photons from ADU, the trusted mask, lit pixels above the shot's
  solvent background, total photons, the radial profile and its solvent-ring peak; the powder sum.
- ``hitfind.threshold``: the run's hit threshold on lit pixels, from their distribution (or given).
- ``hitfind.tables``: the per-shard tables (measurements, hits), the radial/powder files, and the
  hit/miss score against a simulation's truth.
- ``hitfind.plots``: the powder pattern with its radial profile; lit pixels and ring peaks per shot.
"""
