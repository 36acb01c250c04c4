"""Synthetic shots for the per-shot refinement: simulated with the project's simulator, as ShotPixels.

For the tests and the benchmark. A shot is drawn as ``sim.shard`` draws one: a random orientation of
the cell, a SASE spectrum, mosaic domains (``sim.crystal.mosaic_rotations``), Bragg photons from the
forward model, then Poisson and readout noise (``sim.detector_effects``) over a smooth background (a
plane of a few photons per pixel, standing in for the water ring's slow variation). Shoeboxes
(12 x 12 px by default) sit around the strongest spots of the crystal's mean orientation on the LY99
panel (``bragg_photons_sparse`` over the whole panel) and do not overlap; only their pixels get the
photons of every domain (``bragg_photons_dense``, the same expression), which keeps shots with many
domains cheap. As the I/O side of stage 1 builds them from real images, each shoebox's background is
the tilted plane fitted to its border and its observed centroid the centroid of the
background-subtracted photons. With a point spread, each shoebox's photons (Bragg and background)
are computed on the shoebox plus a margin of the kernel radius, counted (Poisson) and then spread by
the simulator's own fiber PSF (``sim.detector_effects.apply_fiber_psf``, so light from just outside a
shoebox reaches it), in the simulator's order, so that the pixels carry the spread noise; the
readout noise comes last.

On a :class:`~xfel_spread.sim.geometry.MultiPanelDetector` the strongest spots are taken over every
panel, each box lies inside one panel (pixels named by panel, fast, slow in that panel's frame), the
background plane is a function of the pixels' laboratory positions, and the point spread acts within
a panel (pixels of the margin beyond the panel's edge do not exist and give no light).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage

from xfel_spread.sim import crystal as xtal
from xfel_spread.sim import detector_effects as effects
from xfel_spread.sim.forward import AmplitudeLookup, Beam, CrystalState, bragg_photons_dense, bragg_photons_sparse
from xfel_spread.sim.geometry import Detector, MultiPanelDetector
from xfel_spread.sim.spectrum import SaseModel, sase_spectrum
from xfel_spread.stage1.model import REFERENCE_BEAM_SIZE_M, c2_cell, c2_orthogonalization, start_orientation
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.shot import ShotPixels

#: The LY99 Rayonix panel with its true beam centre (the nominal centre + 0.5 px).
LY99_DETECTOR = Detector(3840, 3840, 0.088, 141.7, (169.004, 169.004), 0.032, 0.017)
#: LY99's unit cells per domain edge and domains per crystal (its SASE pulses are SaseModel's defaults).
LY99_NCELLS = 57.0
LY99_DOMAINS_PER_CRYSTAL = 93.75
#: Gain 1 ADU/photon, offset 10 ADU, 1 ADU readout noise, no calibration error.
READOUT = effects.ReadoutModel(gain_adu_per_photon=1.0, adc_offset_adu=10.0, readout_noise_adu=1.0,
                               calibration_noise_fraction=0.0)


@dataclass
class SyntheticShot:
    """A simulated shot's pixels and its truth (G in the units of the refinement, see the model module)."""

    shot: ShotPixels
    true_matrix: np.ndarray
    true_ncells: float
    true_G: float
    true_spread_deg: float  #: root-mean-square rotation angle of the drawn mosaic domains
    true_distance_mm: float
    mosaic_rotations: np.ndarray | None = None  #: the drawn domains' rotations (n, 3, 3) about true_matrix


def fit_tilted_plane(fast: np.ndarray, slow: np.ndarray, values: np.ndarray, border: np.ndarray) -> np.ndarray:
    """The plane a + b x + c y fitted by least squares to the border pixels, at every pixel."""
    design = np.stack((np.ones(fast.size), fast, slow), axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design[border], values[border], rcond=None)
    return design @ coefficients


def strongest_boxes(image: np.ndarray, n_rois: int, size: int, threshold: float = 0.5) -> list[tuple[int, int]]:
    """Corners (x0, y0) of up to ``n_rois`` non-overlapping size x size boxes on the strongest spots."""
    labels, n_labels = ndimage.label(image > threshold)
    ids = np.arange(1, n_labels + 1)
    totals = np.asarray(ndimage.sum(image, labels, ids))
    centres = np.asarray(ndimage.center_of_mass(image, labels, ids)).reshape(-1, 2)
    n_slow, n_fast = image.shape
    occupied = np.zeros_like(image, dtype=bool)
    corners = []
    for spot in np.argsort(totals)[::-1]:
        centre_slow, centre_fast = centres[spot] + 0.5
        x0, y0 = int(round(centre_fast)) - size // 2, int(round(centre_slow)) - size // 2
        if x0 < 0 or y0 < 0 or x0 + size > n_fast or y0 + size > n_slow or occupied[y0:y0 + size, x0:x0 + size].any():
            continue
        occupied[y0:y0 + size, x0:x0 + size] = True
        corners.append((x0, y0))
        if len(corners) == n_rois:
            break
    return corners


def simulate_shot_pixels(lookup: AmplitudeLookup, energies_ev: np.ndarray, unit_cell, seed: int, *,
                         n_rois: int = 20, shoebox: int = 12, ncells: float = LY99_NCELLS, spread_deg: float = 0.0,
                         n_domains: int = 1, total_photons: float = 1e12, background_photons: float = 5.0,
                         detector: Detector | MultiPanelDetector = LY99_DETECTOR,
                         psf: DetectorPsf | None = None, mosaic_model: str = "gaussian") -> SyntheticShot:
    """One shot simulated with the project's simulator; its start crystal is the truth. Its mosaic
    domains are drawn by ``mosaic_model`` (:func:`xfel_spread.sim.crystal.mosaic_rotations`)."""
    rng = np.random.default_rng(seed)
    true_matrix = (xtal.random_rotation(rng) @ xtal.orthogonalization_matrix(unit_cell).T).T
    photons = sase_spectrum(SaseModel(total_photons=total_photons), np.asarray(energies_ev), rng)
    beam = Beam(torch.as_tensor(energies_ev, dtype=torch.float64), torch.as_tensor(photons),
                REFERENCE_BEAM_SIZE_M, 1.0)
    rotations = xtal.mosaic_rotations(n_domains, spread_deg, rng, mosaic_model)

    def crystal(matrices):
        return CrystalState(torch.as_tensor(matrices), torch.full((3,), float(ncells), dtype=torch.float64),
                            torch.tensor(LY99_DOMAINS_PER_CRYSTAL, dtype=torch.float64))

    if isinstance(detector, MultiPanelDetector):
        return _simulate_multipanel(detector, lookup, beam, photons, crystal, true_matrix, rotations, seed, n_rois,
                                    shoebox, ncells, background_photons, energies_ev, psf)
    corners = strongest_boxes(bragg_photons_sparse(detector, beam, crystal(true_matrix[None]), lookup).numpy(),
                              n_rois, shoebox)
    fast, slow, roi = _box_pixels(corners, shoebox)

    centre = np.array([detector.n_fast, detector.n_slow]) / 2

    def plane(fast, slow):
        return background_photons * (1 + 0.2 * (fast - centre[0]) / centre[0] - 0.1 * (slow - centre[1]) / centre[1])

    domains = crystal(xtal.domain_matrices(true_matrix, rotations))
    if psf is None:
        bragg = bragg_photons_dense(detector, beam, domains, lookup, torch.as_tensor(fast), torch.as_tensor(slow))
        return _observed_shot(detector, bragg + torch.as_tensor(plane(fast, slow)), corners, fast, slow, roi, shoebox,
                              seed, energies_ev, photons, true_matrix, rotations, ncells)
    generator = torch.Generator().manual_seed(seed)
    counted = torch.cat([spread_box(detector, beam, domains, lookup, x0, y0, shoebox, psf, plane, generator)
                         for x0, y0 in corners])
    return _observed_shot(detector, counted, corners, fast, slow, roi, shoebox, seed, energies_ev, photons,
                          true_matrix, rotations, ncells, generator=generator)


def _box_pixels(corners, shoebox: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fast, slow, box index) of every pixel of the size x size boxes at ``corners`` (x0, y0), box by box."""
    grids = [np.mgrid[y0:y0 + shoebox, x0:x0 + shoebox] for x0, y0 in corners]
    slow = np.concatenate([grid[0].ravel() for grid in grids])
    fast = np.concatenate([grid[1].ravel() for grid in grids])
    return fast, slow, np.repeat(np.arange(len(corners)), shoebox * shoebox)


def _observed_shot(detector, expected: torch.Tensor, corners, fast, slow, roi, shoebox, seed, energies_ev, photons,
                   true_matrix, rotations, ncells, generator: torch.Generator | None = None,
                   **panels) -> SyntheticShot:
    """The shot as stage 1 sees it: ``expected`` photons drawn with noise, each box's background the
    tilted plane of its border, its observed centroid that of the photons above the plane; ``panels``
    (pixel_panel, roi_panel) name the boxes' panels on a multi-panel detector. With ``generator``
    the photons are already counted (and spread): only the readout noise is drawn, from it."""
    if generator is None:
        noisy = effects.draw_noise(expected, torch.ones_like(expected), READOUT, seed)
    else:
        noisy = effects.NoisyPhotons(expected, READOUT.readout_noise_adu * torch.randn(
            expected.shape, generator=generator, dtype=expected.dtype))
    adu = effects.to_adu(noisy.photons, noisy.readout_adu, READOUT).numpy()
    data = (adu - READOUT.adc_offset_adu) / READOUT.gain_adu_per_photon

    plane = np.empty_like(data)
    on_border = np.zeros(data.size, dtype=bool)
    observed = np.empty((len(corners), 2))
    for index, (x0, y0) in enumerate(corners):
        mine = roi == index
        border = np.isin(fast[mine], (x0, x0 + shoebox - 1)) | np.isin(slow[mine], (y0, y0 + shoebox - 1))
        on_border[mine] = border
        plane[mine] = fit_tilted_plane(fast[mine], slow[mine], data[mine], border)
        signal = np.clip(data[mine] - plane[mine], 0, None)
        observed[index] = (signal @ (fast[mine] + 0.5), signal @ (slow[mine] + 0.5))
        observed[index] /= signal.sum()

    shot = ShotPixels(
        shard="synthetic", shot_index=seed, image_index=0, identifier=f"synthetic-{seed}", detector=detector,
        energies_ev=np.asarray(energies_ev, dtype=np.float64), photons=photons, polarization_fraction=1.0,
        gain_adu_per_photon=READOUT.gain_adu_per_photon, real_space_matrix=true_matrix, space_group="C 1 2 1",
        miller_index=np.zeros((len(corners), 3), dtype=int),
        roi_bounds=np.array([(x0, x0 + shoebox, y0, y0 + shoebox) for x0, y0 in corners]),
        observed_centroid_px=observed, strong=np.ones(len(corners), dtype=bool),
        dials_predicted_px=observed, pixel_fast=fast, pixel_slow=slow, pixel_roi=roi,
        data_photons=data, background_photons=plane, trusted=np.ones(fast.size, dtype=bool),
        background_fit=on_border, **panels)
    return SyntheticShot(shot, true_matrix, float(ncells), LY99_DOMAINS_PER_CRYSTAL, xtal.rms_rotation_deg(rotations),
                         detector.distance_mm, np.asarray(rotations))


def strongest_panel_boxes(images, n_rois: int, size: int, threshold: float = 0.5) -> list[tuple[int, int, int]]:
    """(panel, x0, y0) of up to ``n_rois`` non-overlapping boxes, each inside one panel, on the
    strongest spots of all the panels' images."""
    spots = []
    for panel, image in enumerate(images):
        labels, n_labels = ndimage.label(image > threshold)
        if n_labels == 0:
            continue
        ids = np.arange(1, n_labels + 1)
        totals = np.asarray(ndimage.sum(image, labels, ids))
        centres = np.asarray(ndimage.center_of_mass(image, labels, ids)).reshape(-1, 2)
        spots += [(float(total), panel, centre) for total, centre in zip(totals, centres)]
    occupied = [np.zeros(image.shape, dtype=bool) for image in images]
    boxes = []
    for _, panel, centre in sorted(spots, key=lambda spot: -spot[0]):
        n_slow, n_fast = images[panel].shape
        centre_slow, centre_fast = centre + 0.5
        x0, y0 = int(round(centre_fast)) - size // 2, int(round(centre_slow)) - size // 2
        if (x0 < 0 or y0 < 0 or x0 + size > n_fast or y0 + size > n_slow
                or occupied[panel][y0:y0 + size, x0:x0 + size].any()):
            continue
        occupied[panel][y0:y0 + size, x0:x0 + size] = True
        boxes.append((panel, x0, y0))
        if len(boxes) == n_rois:
            break
    return boxes


def _simulate_multipanel(detector: MultiPanelDetector, lookup, beam, photons, crystal, true_matrix, rotations, seed,
                         n_rois, shoebox, ncells, background_photons, energies_ev, psf) -> SyntheticShot:
    """:func:`simulate_shot_pixels` on a multi-panel detector (see the module's docstring)."""
    images = [image.numpy() for image in bragg_photons_sparse(detector, beam, crystal(true_matrix[None]), lookup)]
    boxes = strongest_panel_boxes(images, n_rois, shoebox)
    fast, slow, roi = _box_pixels([(x0, y0) for _, x0, y0 in boxes], shoebox)
    roi_panel = np.array([panel for panel, _, _ in boxes], dtype=np.int64)
    panel = roi_panel[roi]

    reach = np.abs([tile.origin_mm[:2] for tile in detector.panels]).max()

    def plane(fast, slow, panel):
        position = detector.pixel_centres_mm(torch.as_tensor(fast), torch.as_tensor(slow),
                                             torch.as_tensor(panel)).numpy()
        return background_photons * (1 + 0.2 * position[:, 0] / reach - 0.1 * position[:, 1] / reach)

    domains = crystal(xtal.domain_matrices(true_matrix, rotations))
    corners = [(x0, y0) for _, x0, y0 in boxes]
    if psf is None:
        bragg = bragg_photons_dense(detector, beam, domains, lookup, torch.as_tensor(fast), torch.as_tensor(slow),
                                    torch.as_tensor(panel))
        return _observed_shot(detector, bragg + torch.as_tensor(plane(fast, slow, panel)), corners, fast, slow, roi,
                              shoebox, seed, energies_ev, photons, true_matrix, rotations, ncells,
                              pixel_panel=panel, roi_panel=roi_panel)
    generator = torch.Generator().manual_seed(seed)
    counted = torch.cat([spread_panel_box(detector, beam, domains, lookup, p, x0, y0, shoebox, psf, plane, generator)
                         for p, x0, y0 in boxes])
    return _observed_shot(detector, counted, corners, fast, slow, roi, shoebox, seed, energies_ev, photons,
                          true_matrix, rotations, ncells, generator=generator, pixel_panel=panel, roi_panel=roi_panel)


def spread_panel_box(detector: MultiPanelDetector, beam: Beam, crystal: CrystalState, lookup: AmplitudeLookup,
                     panel: int, x0: int, y0: int, size: int, psf: DetectorPsf, background,
                     generator: torch.Generator) -> torch.Tensor:
    """:func:`spread_box` on one panel of a multi-panel detector (``background(fast, slow, panel)``):
    margin pixels beyond the panel's edge do not exist and carry no light."""
    margin = psf.radius_px
    slow, fast = np.mgrid[y0 - margin:y0 + size + margin, x0 - margin:x0 + size + margin]
    tile = detector.panels[panel]
    inside = (fast >= 0) & (fast < tile.n_fast) & (slow >= 0) & (slow < tile.n_slow)
    on_panel = np.full(int(inside.sum()), panel)
    patch = torch.zeros(fast.shape, dtype=torch.float64)
    patch[torch.as_tensor(inside)] = bragg_photons_dense(
        detector, beam, crystal, lookup, torch.as_tensor(fast[inside]), torch.as_tensor(slow[inside]),
        torch.as_tensor(on_panel)) + torch.as_tensor(background(fast[inside], slow[inside], on_panel))
    return _counted_and_spread(patch, psf, tile.pixel_size_mm, size, generator)


def spread_box(detector: Detector, beam: Beam, crystal: CrystalState, lookup: AmplitudeLookup, x0: int, y0: int,
               size: int, psf: DetectorPsf, background, generator: torch.Generator) -> torch.Tensor:
    """Photons of the box at (x0, y0), Bragg plus ``background(fast, slow)``, counted with Poisson
    noise from ``generator`` and then spread by the point spread (as the simulator does), in image
    order (slow, then fast)."""
    margin = psf.radius_px
    slow, fast = np.mgrid[y0 - margin:y0 + size + margin, x0 - margin:x0 + size + margin]
    patch = bragg_photons_dense(detector, beam, crystal, lookup, torch.as_tensor(fast.ravel()),
                                torch.as_tensor(slow.ravel())).reshape(fast.shape)
    return _counted_and_spread(patch + torch.as_tensor(background(fast, slow)), psf, detector.pixel_size_mm, size,
                               generator)


def _counted_and_spread(patch: torch.Tensor, psf: DetectorPsf, pixel_size_mm: float, size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """A box's patch of expected photons (the box and a margin of the kernel radius) counted, spread
    and cut back to the box, flattened."""
    margin = psf.radius_px
    counts = torch.poisson(torch.clamp(patch, min=0.0), generator=generator)
    spread = effects.apply_fiber_psf(counts, psf.fwhm_mm / pixel_size_mm, psf.radius_px)
    return spread[margin:margin + size, margin:margin + size].reshape(-1)


def perturbed_matrix(true_matrix: np.ndarray, seed: int, rotation_deg: float = 0.05,
                     cell_fraction: float = 0.003) -> np.ndarray:
    """The crystal turned by ``rotation_deg`` about a random axis, with a, b, c and beta each changed
    by ``cell_fraction`` of their value (random signs)."""
    rng = np.random.default_rng(seed)
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    true_cell = c2_cell(true_matrix)
    cell = np.asarray(true_cell) * (1 + cell_fraction * rng.choice([-1.0, 1.0], size=4))
    orientation = xtal.axis_angle_rotation(axis, np.radians(rotation_deg)) @ start_orientation(true_matrix, true_cell)
    return c2_orthogonalization(torch.as_tensor(cell)).numpy() @ orientation.T


def with_start(shot: ShotPixels, start_matrix: np.ndarray, detector: Detector | None = None) -> ShotPixels:
    """The shot's pixels with another start crystal (and detector)."""
    return replace(shot, real_space_matrix=start_matrix, detector=shot.detector if detector is None else detector)
