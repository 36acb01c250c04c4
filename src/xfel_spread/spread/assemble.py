"""From stage-1 lattices to SPREAD's data: coefficients of each converged lattice, concatenated.

For every lattice: its shoebox pixels (:class:`xfel_spread.stage1.shot.ShotPixels`), its refined
stage-1 parameters (13 values in the order of :data:`xfel_spread.stage1.model.PARAMETER_NAMES`,
relative to the lattice's ``real_space_matrix``) and the mosaic domains stage 1 used (its free
domains' rotation vectors where ``stage1.free_domains`` refined them, ``io.mosaic_domains``). The
coefficients are computed over all shoebox pixels (so that a modelled point spread carries light
from untrusted pixels into trusted ones), then only the trusted pixels are kept, as in stage 1's
likelihood. Pixel offsets dx, dy are from the centre of the pixel's shoebox (pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xfel_spread.spread.coefficients import (
    AsuLookup,
    bragg_coefficients,
    fold_point_spread,
)
from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.spread.model import SpreadData
from xfel_spread.stage1.likelihood import shot_tensors
from xfel_spread.stage1.model import INDEX, CrystalModel, FreeDomainCrystal, shifted_detector
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.shot import ShotPixels


@dataclass
class LatticeArrays:
    """One lattice's trusted pixels and coefficient terms (local pixel and shoebox numbers)."""

    energies_ev: np.ndarray
    data: np.ndarray
    shoebox: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    readout_var: float
    n_shoeboxes: int
    term_pixel: np.ndarray
    term_channel: np.ndarray
    term_column: np.ndarray
    term_coeff: np.ndarray
    dropped_fraction: float
    #: The lattice's position in its annulus experiment list (-1: not given).
    lattice: int = -1
    #: Whether the shot's spectrum was rebinned onto the structure_factors channels (spread.pipeline).
    spectrum_rebinned: bool = False
    #: How many free domains stage 1 refined for the lattice and its model has (0: none).
    free_domains: int = 0


def lattice_arrays(shot: ShotPixels, values: np.ndarray, n_domains: int, lookup: AsuLookup,
                   readout_sigma_adu: float, relative_cutoff: float = 1e-3,
                   psf: DetectorPsf | None = None, mosaic_model: str | None = None,
                   domain_vectors_deg: np.ndarray | None = None) -> LatticeArrays:
    """The coefficients (per unit G) and trusted pixels of one stage-1 lattice: stage 1's crystal model
    (the cell in the shot's crystal system; with ``domain_vectors_deg`` (D, 3), the free domains stage 1
    refined, turned by those rotation vectors about the lattice's orientation, eta unused; else with
    ``mosaic_model``, eta as stage 1's analytic average over the rotations; else ``n_domains`` domains)."""
    tensors = shot_tensors(shot, readout_sigma_adu, "cpu")
    values_t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    model = crystal_model(shot, n_domains, mosaic_model, domain_vectors_deg)
    with torch.no_grad():
        detector = shifted_detector(shot.detector, values_t[INDEX["detz_shift_mm"]])
        state = model.crystal_state(values_t)
    coefficients = bragg_coefficients(detector, tensors.beam, state, tensors.fast, tensors.slow, lookup,
                                      relative_cutoff, panel=tensors.panel)
    n_pixels = int(tensors.fast.numel())
    if psf is not None:
        spread = psf.spread_matrix(shot.pixel_fast, shot.pixel_slow, shot.detector.pixel_size_mm, "cpu",
                                   shot.pixel_panel)
        coefficients = fold_point_spread(coefficients, spread, n_pixels, relative_cutoff)
    trusted = np.asarray(shot.trusted, dtype=bool)
    local = np.full(n_pixels, -1, dtype=np.int64)
    local[trusted] = np.arange(int(trusted.sum()))
    keep = trusted[coefficients.pixel]
    roi = np.asarray(shot.pixel_roi, dtype=np.int64)
    bounds = np.asarray(shot.roi_bounds, dtype=np.float64)
    centre_x = 0.5 * (bounds[:, 0] + bounds[:, 1] - 1)
    centre_y = 0.5 * (bounds[:, 2] + bounds[:, 3] - 1)
    return LatticeArrays(
        energies_ev=np.asarray(shot.energies_ev, dtype=np.float64),
        data=np.asarray(shot.data_photons, dtype=np.float64)[trusted],
        shoebox=roi[trusted],
        dx=(np.asarray(shot.pixel_fast) - centre_x[roi])[trusted],
        dy=(np.asarray(shot.pixel_slow) - centre_y[roi])[trusted],
        readout_var=float(tensors.readout_variance),
        n_shoeboxes=shot.n_rois,
        term_pixel=local[coefficients.pixel[keep]], term_channel=coefficients.channel[keep],
        term_column=coefficients.column[keep], term_coeff=coefficients.value[keep],
        dropped_fraction=coefficients.dropped_fraction,
        free_domains=0 if domain_vectors_deg is None else model.n_domains)


def crystal_model(shot: ShotPixels, n_domains: int, mosaic_model: str | None = None,
                  domain_vectors_deg: np.ndarray | None = None) -> CrystalModel:
    """Stage 1's crystal model of a lattice (see :func:`lattice_arrays`)."""
    if domain_vectors_deg is None:
        return CrystalModel(shot.real_space_matrix, n_domains, mosaic_model=mosaic_model, space_group=shot.space_group)
    vectors = np.radians(np.asarray(domain_vectors_deg, dtype=np.float64).reshape(-1, 3))
    model = FreeDomainCrystal(shot.real_space_matrix, len(vectors), space_group=shot.space_group)
    model.vectors = torch.as_tensor(vectors)
    return model


def concatenate(lattices: Sequence[LatticeArrays], source: str = "stage-1 results") -> tuple[SpreadData, np.ndarray]:
    """All lattices as one :class:`SpreadData` and the asymmetric-unit columns it uses.

    ``term_pair`` indexes ``channel * n_used + position`` of the column in the returned ``columns``.
    Shoeboxes without trusted pixels are dropped. Every lattice must have the same channel energies.
    """
    if not lattices:
        raise SpreadInputError(f"{source}: no converged lattices to refine")
    energies = lattices[0].energies_ev
    for lattice in lattices[1:]:
        if lattice.energies_ev.shape != energies.shape or not np.allclose(lattice.energies_ev, energies,
                                                                          rtol=0, atol=1e-6):
            raise SpreadInputError(f"{source}: the lattices' spectra have different channel energies")
    columns = np.unique(np.concatenate([lattice.term_column for lattice in lattices]))
    n_used = len(columns)
    parts = {name: [] for name in ("data", "shoebox", "dx", "dy", "readout", "shot", "pixel", "pair", "coeff")}
    pixel_offset = box_offset = 0
    for shot_number, lattice in enumerate(lattices):
        boxes_used, box_local = np.unique(lattice.shoebox, return_inverse=True)
        parts["data"].append(lattice.data)
        parts["shoebox"].append(box_local.reshape(-1) + box_offset)
        parts["dx"].append(lattice.dx)
        parts["dy"].append(lattice.dy)
        parts["readout"].append(np.full(len(lattice.data), lattice.readout_var))
        parts["shot"].append(np.full(len(boxes_used), shot_number))
        # int64 before the arithmetic: compact lattices (int16 channels, int32 pixels) would overflow.
        parts["pixel"].append(lattice.term_pixel.astype(np.int64) + pixel_offset)
        parts["pair"].append(lattice.term_channel.astype(np.int64) * n_used + np.searchsorted(columns, lattice.term_column))
        parts["coeff"].append(lattice.term_coeff)
        pixel_offset += len(lattice.data)
        box_offset += len(boxes_used)

    def joined(name, dtype):
        return torch.as_tensor(np.concatenate(parts[name]).astype(dtype))

    data = SpreadData(joined("data", np.float64), joined("shoebox", np.int64), joined("dx", np.float64),
                      joined("dy", np.float64), joined("readout", np.float64), joined("shot", np.int64),
                      joined("pixel", np.int64), joined("pair", np.int64), joined("coeff", np.float64),
                      len(lattices))
    return data, columns
