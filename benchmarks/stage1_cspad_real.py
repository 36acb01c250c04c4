"""Stage 1 on the real LCLS CSPAD thermolysin stills (64 tiles), against DIALS's strong-spot RMSD.

Input: dials.stills_process's integrated experiments and reflections of the three stills in
``../shared/data/real/thermolysin_cspad/`` (e.g. with config/examples/thermolysin_cspad.phil of the
images work, ``output.composite_output=True``). What this does, per still:

- **|F|**: the stills' own integrated intensities (``intensity.sum.value``, flag ``integrated_sum``)
  merged in P 61 2 2 (each still scaled to the first by the least-squares ratio on common
  reflections, then averaged), |F| = sqrt(max(I, 0)), expanded to P1 with Friedel mates.
- **Setting** (``--setting``): ``hexagonal`` (default) refines the crystal in its own cell, a and c
  with b = a and gamma 120 (stage 1's cell model for a hexagonal space group); ``orthohexagonal``
  refines it, as stage 1's C2-only model once required, in its C-centred orthohexagonal setting:
  a_o = a, b_o = a + 2 b, c_o = c, with a, b, c and beta all free, Miller indices (h, h + 2k, l).
- **Shoeboxes**: ``--shoebox`` px boxes round each integrated reflection with |F| on the panel of its
  reflection (``stage1.rois.panel_box_pixels``: clipped at the tile's edges), trusted range and mask
  per panel from dxtbx, tilted-plane backgrounds; pixels in photons as ADU / ``--gain``.
- **Model**: the monochromatic beam (one channel at the still's wavelength; ``--bandwidth-percent``
  for a Gaussian of that FWHM over ``--channels`` channels), one domain; G, rotation, cell and N
  refined (``--refine`` to change), N starting at ``--ncells``.

Printed per still: ROIs (strong ones), seconds, convergence, and the strong-spot RMSD (overall and
radial, px) of DIALS's predictions (xyzcal.px) and of stage 1's model centroids before and after.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/stage1_cspad_real.py --experiments E.expt
       --reflections R.refl [--gain 25] [--shoebox 12] [--ncells 30] [--readout-sigma-adu 25]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.sim.geometry import MultiPanelDetector
from xfel_spread.sim.structure_factors import AmplitudeGrid
from xfel_spread.stage1.model import Stage1Settings
from xfel_spread.stage1.refine import centroid_rmsd, refine_shot, roi_beam_centres_px
from xfel_spread.stage1.rois import panel_box_pixels, panel_values, plane_backgrounds, select_rois
from xfel_spread.stage1.shot import ShotPixels

#: Hexagonal to C-centred orthohexagonal: rows of the new basis in the old, and Miller indices alike.
TO_ORTHOHEXAGONAL = np.array([[1, 0, 0], [1, 2, 0], [0, 0, 1]])
HC_EV_A = 12398.419843320026


def merged_intensities(experiments, reflections):
    """{asu hkl: mean I} of the stills' integrated intensities, each still scaled to the first."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=experiments[0].crystal.get_unit_cell(), space_group_symbol="P 61 2 2")
    per_still = []
    for lattice in range(len(experiments)):
        mine = reflections.select((reflections["id"] == lattice)
                                  & reflections.get_flags(reflections.flags.integrated_sum))
        indices = miller.set(symmetry, mine["miller_index"], anomalous_flag=False).map_to_asu().indices()
        values = {}
        for hkl, intensity in zip(indices, mine["intensity.sum.value"]):
            values.setdefault(tuple(hkl), []).append(intensity)
        per_still.append({hkl: float(np.mean(v)) for hkl, v in values.items()})
    reference = per_still[0]
    sums: dict = {}
    for still in per_still:
        common = [hkl for hkl in still if hkl in reference]
        x = np.array([still[h] for h in common])
        y = np.array([reference[h] for h in common])
        scale = float(x @ y / (x @ x)) if len(common) > 3 and x @ x > 0 else 1.0
        for hkl, value in still.items():
            sums.setdefault(hkl, []).append(scale * value)
    merged = {hkl: float(np.mean(v)) for hkl, v in sums.items()}
    asu = miller.set(symmetry, flex.miller_index(list(merged)), anomalous_flag=False)
    return symmetry, asu, np.array(list(merged.values()))


def orthohexagonal_grid(symmetry, asu, intensities, transform=TO_ORTHOHEXAGONAL) -> AmplitudeGrid:
    """|F| on a dense P1 grid indexed in the setting of ``transform`` (one channel): the orthohexagonal
    one by default, the hexagonal one itself with the identity."""
    from cctbx import miller
    from cctbx.array_family import flex

    array = miller.array(asu, data=flex.double(np.sqrt(np.maximum(intensities, 0.0))))
    p1 = array.expand_to_p1().generate_bijvoet_mates()
    hkl = np.array(p1.indices(), dtype=np.int64).reshape(-1, 3) @ transform.T
    values = p1.data().as_numpy_array()
    low = hkl.min(axis=0)
    grid = np.zeros((1, *(hkl.max(axis=0) - low + 1)))
    grid[0, hkl[:, 0] - low[0], hkl[:, 1] - low[1], hkl[:, 2] - low[2]] = values
    return AmplitudeGrid(grid, low)


def beam_spectrum(energy_ev: float, bandwidth_percent: float, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(energies, weights) of the model's beam: one channel, or ``n_channels`` over +-2 sigma of a Gaussian
    of ``bandwidth_percent`` FWHM (weights summing to 1e12 photons, as the one channel has)."""
    if bandwidth_percent <= 0 or n_channels <= 1:
        return np.array([energy_ev]), np.array([1e12])
    sigma = energy_ev * bandwidth_percent / 100 / 2.3548
    energies = energy_ev + np.linspace(-2 * sigma, 2 * sigma, n_channels)
    weights = np.exp(-0.5 * ((energies - energy_ev) / sigma) ** 2)
    return energies, 1e12 * weights / weights.sum()


def still_pixels(experiment, table, lookup_grid: AmplitudeGrid, shoebox: int, gain: float,
                 transform=TO_ORTHOHEXAGONAL, space_group: str = "C 1 2 1", bandwidth_percent: float = 0.0,
                 n_channels: int = 1) -> ShotPixels:
    """The still's shoeboxes on the CSPAD tiles, in the setting of ``transform`` (crystal of ``space_group``)."""
    detector = MultiPanelDetector.from_dxtbx(experiment.detector)
    images = [np.asarray(panel.as_numpy_array(), dtype=np.float64) for panel in experiment.imageset.get_raw_data(0)]
    masks = [np.asarray(panel.as_numpy_array(), dtype=bool) for panel in experiment.imageset.get_mask(0)]
    hkl = np.array(table["miller_index"].as_vec3_double(), dtype=np.int64).reshape(-1, 3) @ transform.T
    offset = hkl - lookup_grid.hkl_min
    inside = np.all((offset >= 0) & (offset < np.array(lookup_grid.values.shape[1:])), axis=1)
    has_f = np.zeros(len(hkl), dtype=bool)
    has_f[inside] = lookup_grid.values[0, offset[inside, 0], offset[inside, 1], offset[inside, 2]] > 0
    roi_panel = table["panel"].as_numpy_array().astype(np.int64)
    centroids = np.array(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, :2]
    bounds, pixels = panel_box_pixels(detector, roi_panel, centroids, shoebox)
    adu = panel_values(images, pixels.panel, pixels.slow, pixels.fast)
    ranges = np.array([panel.get_trusted_range() for panel in experiment.detector])
    mask = panel_values([m.astype(np.float64) for m in masks], pixels.panel, pixels.slow, pixels.fast) > 0
    trusted = ((adu > ranges[pixels.panel, 0]) & (adu < ranges[pixels.panel, 1]) & mask & ~pixels.in_other_spot)
    photons = adu / gain
    background, has_background = plane_backgrounds(pixels, photons, trusted, len(hkl), centroids)
    strong = (table["flags"].as_numpy_array() & int(table.flags.strong)) != 0
    matrix = transform @ np.array([list(v) for v in experiment.crystal.get_real_space_vectors()])
    beam_energies, beam_photons = beam_spectrum(HC_EV_A / experiment.beam.get_wavelength(), bandwidth_percent,
                                                n_channels)
    shot = ShotPixels(
        shard="cbf", shot_index=0, image_index=0, identifier=experiment.identifier, detector=detector,
        energies_ev=beam_energies, photons=beam_photons,
        polarization_fraction=float(experiment.beam.get_polarization_fraction()), gain_adu_per_photon=gain,
        real_space_matrix=matrix, space_group=space_group, miller_index=hkl, roi_bounds=bounds,
        observed_centroid_px=centroids, strong=strong,
        dials_predicted_px=np.array(table["xyzcal.px"], dtype=np.float64).reshape(-1, 3)[:, :2],
        pixel_fast=pixels.fast, pixel_slow=pixels.slow, pixel_roi=pixels.roi, data_photons=photons,
        background_photons=background, trusted=trusted, pixel_panel=pixels.panel, roi_panel=roi_panel)
    return select_rois(shot, has_background & has_f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", required=True)
    parser.add_argument("--reflections", required=True)
    parser.add_argument("--gain", type=float, default=25.0, help="ADU per photon (DIALS's regression setting)")
    parser.add_argument("--shoebox", type=int, default=12)
    parser.add_argument("--ncells", type=float, default=30.0)
    parser.add_argument("--readout-sigma-adu", type=float, default=25.0)
    parser.add_argument("--refine", nargs="+", default=["G", "rotation", "cell", "ncells"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strong-only", action="store_true", help="shoeboxes round the strong spots only")
    parser.add_argument("--mosaic-domains", type=int, default=None, help="domains of the model (with eta refined)")
    parser.add_argument("--eta-deg", type=float, default=None, help="start eta (degrees)")
    parser.add_argument("--max-iterations", type=int, default=None, help="L-BFGS-B iterations (schema default if absent)")
    parser.add_argument("--stills", type=int, nargs="+", default=None, help="refine only these stills (all merge)")
    parser.add_argument("--eta-model", choices=["domains", "analytic"], default=None,
                        help="stage1.eta_model when eta is refined (analytic: the closed-form Gaussian average)")
    parser.add_argument("--bandwidth-percent", type=float, default=0.0,
                        help="model the beam as a Gaussian of this FWHM (percent of the energy) instead of one channel")
    parser.add_argument("--channels", type=int, default=5, help="channels of that Gaussian")
    parser.add_argument("--setting", choices=["hexagonal", "orthohexagonal"], default="hexagonal",
                        help="refine the crystal in its own hexagonal cell (a, c; b = a) or, as stage 1's C2 model "
                             "once had to, in the C-centred orthohexagonal one (a, b, c, beta free)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(arguments.experiments, check_format=True)
    reflections = flex.reflection_table.from_file(arguments.reflections)
    symmetry, asu, intensities = merged_intensities(experiments, reflections)
    transform = TO_ORTHOHEXAGONAL if arguments.setting == "orthohexagonal" else np.eye(3, dtype=np.int64)
    space_group = "C 1 2 1" if arguments.setting == "orthohexagonal" else "P 61 2 2"
    grid = orthohexagonal_grid(symmetry, asu, intensities, transform)
    if arguments.bandwidth_percent > 0 and arguments.channels > 1:  # the same |F| in every channel
        grid = AmplitudeGrid(np.repeat(grid.values, arguments.channels, axis=0), grid.hkl_min)
    lookup = AmplitudeLookup(grid, "cpu")
    print(f"{len(experiments)} stills, {len(intensities)} merged unique reflections (P 61 2 2), "
          f"shoebox {arguments.shoebox} px, gain {arguments.gain} ADU/photon, refining {arguments.refine}, "
          f"N from {arguments.ncells}, readout {arguments.readout_sigma_adu} ADU"
          + (", strong spots only" if arguments.strong_only else "") + f", {arguments.setting} setting"
          + (f", {arguments.channels} channels of {arguments.bandwidth_percent} % FWHM" if arguments.bandwidth_percent > 0 else "")
          + (f", {arguments.mosaic_domains} domains" if arguments.mosaic_domains else ""))
    section = {"refine": arguments.refine, "readout_sigma_adu": arguments.readout_sigma_adu,
               "initial": {"ncells": [arguments.ncells] * 3}}
    if arguments.mosaic_domains is not None:
        section["mosaic_domains"] = arguments.mosaic_domains
    if arguments.eta_deg is not None:
        section["initial"]["eta_deg"] = arguments.eta_deg
    if arguments.max_iterations is not None:
        section["max_iterations"] = arguments.max_iterations
    if arguments.eta_model is not None:
        section["eta_model"] = arguments.eta_model
    settings = Stage1Settings.from_config(section)
    for lattice, experiment in enumerate(experiments):
        if arguments.stills is not None and lattice not in arguments.stills:
            continue
        table = reflections.select((reflections["id"] == lattice)
                                   & reflections.get_flags(reflections.flags.integrated_sum))
        if arguments.strong_only:
            table = table.select(table.get_flags(table.flags.strong))
        started = time.perf_counter()
        shot = still_pixels(experiment, table, grid, arguments.shoebox, arguments.gain, transform, space_group,
                            arguments.bandwidth_percent, arguments.channels)
        setup = time.perf_counter() - started
        strong = np.asarray(shot.strong, dtype=bool)
        centres = roi_beam_centres_px(shot)
        dials_all, dials_radial = centroid_rmsd(shot.dials_predicted_px[strong], shot.observed_centroid_px[strong],
                                                centres[strong])
        fit = refine_shot(shot, lookup, settings)
        panels = len(set(shot.roi_panel.tolist()))
        print(f"still {lattice} ({experiment.imageset.get_path(0).split('/')[-1]}): {shot.n_rois} ROIs "
              f"({int(strong.sum())} strong) on {panels} tiles, {shot.n_pixels} px ({int(shot.trusted.sum())} trusted); "
              f"ROIs {setup:.1f} s, refinement {fit.seconds:.1f} s, converged {fit.converged} {fit.reason}; "
              f"iterations {fit.n_iterations}")
        print(f"    strong-spot RMSD (px) overall / radial: DIALS {dials_all:.3f} / {dials_radial:.3f}; stage 1 start "
              f"{fit.strong_rmsd_px_start:.3f} / {fit.strong_radial_rmsd_px_start:.3f}; stage 1 refined "
              f"{fit.strong_rmsd_px:.3f} / {fit.strong_radial_rmsd_px:.3f}")
        print(f"    N {fit.final['Na']:.1f} {fit.final['Nb']:.1f} {fit.final['Nc']:.1f}, G {fit.final['G']:.3g}, cell "
              f"a {fit.final['a']:.3f} " + (f"b/sqrt3 {fit.final['b'] / np.sqrt(3):.3f}" if arguments.setting == "orthohexagonal"
                                            else f"b {fit.final['b']:.3f}") + f" c {fit.final['c']:.3f} "
              f"beta {fit.final['beta_deg']:.3f}, eta {fit.final['eta_deg']:.4f} deg, detz_shift "
              f"{fit.final.get('detz_shift_mm', 0.0):.3f} mm; Z sigma {fit.z_score_sigma_start:.2f} -> {fit.z_score_sigma_final:.2f}")


if __name__ == "__main__":
    main()
