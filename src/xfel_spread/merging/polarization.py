"""Polarization correction of the observed intensities (cctbx.xfel.merge's ``modify`` step).

Upstream applies Kahn et al. (1982), J. Appl. Cryst. 15, 330-337, eqs. 13-15, for a beam fully
polarized perpendicular to the beam's ``polarization_normal``: with 2theta the scattering angle and
phi the angle between the polarization normal and the diffracted ray projected onto the plane normal
to the beam,

    P = (1 + cos^2 2theta) / 2 + cos(2 phi) sin^2 2theta / 2,

and intensities are divided by P (variances by P^2). 2theta follows from the lattice's d and the
wavelength (Bragg's law), as upstream takes it from the cell.
"""

from __future__ import annotations

import numpy as np


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1)[:, None]


def polarization_factor(s1: np.ndarray, d: np.ndarray, lattice: np.ndarray, s0: np.ndarray,
                        polarization_normal: np.ndarray) -> np.ndarray:
    """P of each observation (diffracted beam ``s1`` (n, 3), resolution ``d``) on lattice ``lattice``.

    ``s0`` and ``polarization_normal`` are given per lattice, (m, 3).
    """
    beam, normal = _unit(s0), _unit(polarization_normal)
    wavelength = 1.0 / np.linalg.norm(s0, axis=1)
    s1x, s1y, s1z = s1[:, 0], s1[:, 1], s1[:, 2]
    bx, by, bz = (beam[:, axis][lattice] for axis in range(3))
    along_beam = s1x * bx + s1y * by + s1z * bz
    px, py, pz = s1x - along_beam * bx, s1y - along_beam * by, s1z - along_beam * bz  # s1 normal to the beam
    cos_phi = (px * normal[:, 0][lattice] + py * normal[:, 1][lattice] + pz * normal[:, 2][lattice]) \
        / np.sqrt(px * px + py * py + pz * pz)
    cos_two_phi = 2.0 * cos_phi * cos_phi - 1.0
    sin_theta = wavelength[lattice] / (2.0 * d)
    cos_two_theta = 1.0 - 2.0 * sin_theta * sin_theta
    sin_sq_two_theta = 1.0 - cos_two_theta * cos_two_theta
    return 0.5 * (1.0 + cos_two_theta * cos_two_theta) + 0.5 * cos_two_phi * sin_sq_two_theta
