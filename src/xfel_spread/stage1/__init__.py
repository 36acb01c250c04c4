"""Stages 8-9: per-shot pixel refinement of the annulus shoeboxes (the diffBragg "stage 1" idea).

``shot``
    what one lattice's refinement works on: its shoebox pixels, spectrum, detector and start crystal.
"""
