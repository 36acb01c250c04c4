"""Conventional merging of one dataset's integrated still lattices, Friedel mates kept separate.

Our own implementation of the cctbx.xfel.merge pipeline the LY99 study ran (Debian's cctbx lacks
its compiled extension), on numpy and cctbx primitives, vectorised across all lattices and
distributed with MPI:

``loading``
    lattices (cell, orientation, beam) from the ``.expt`` JSON and observations from the ``.refl``
    tables of each shard;
``polarization``
    the polarization correction of the observed intensities (upstream's ``modify`` step);
``indices``
    Miller indices packed into sortable integer keys and mapped to the model's asymmetric unit;
``reference``
    the |Fcalc|^2 reference of the PDB model (as cctbx.xfel.merge builds it) and the model/data check;
``filters``
    unit-cell Mahalanobis, space group, significance (I/sigma per resolution bin) and
    reference-correlation filters, each rejection with its reason;
``postrefine``
    per-lattice scale, B, two rotations and spot radius of the "rs" partiality model, fitted for all
    lattices at once by batched Levenberg-Marquardt (or scale only);
``error_model``
    the ev11 (Evans 2011) error model: sdfac and sdadd refined, sdb held at 0;
``merge``
    weighted means per asymmetric-unit index: I(+), I(-), IMEAN and the two lattice halves;
``statistics``
    merging statistics in resolution bins (completeness, multiplicity, I/sigma, CC1/2, CC_anom);
``output``
    the MTZ file and the JSON summary (the per-lattice table: ``xfel_spread.io.lattices``);
``parallel``
    the MPI exchanges (observations by owner of their index, gathers in canonical order), and a
    one-rank stand-in communicator for running without MPI;
``pipeline``
    the whole merge, as ``spread-merge`` runs it;
``dials_crosscheck``
    the cross-check of the merge: dials.scale and dials.merge on the lattices it accepted;
``scoring``, ``plots``
    merged intensities (ours and DIALS's) scored against the simulation's truth, and their figure.
"""
