"""Stage 5: the unit cells of the reindexed lattices of one dataset.

``tdata`` lists every lattice's cell in cctbx.xfel.merge's tdata format; ``covariance`` clusters the
cells by density (DBSCAN) and writes the covariance model that merging uses to reject lattices whose
cell lies far from the main cluster (cctbx.xfel.merge's ``filter.unit_cell.cluster.covariance.file``);
``plots`` draws the clusters.
"""
