"""Stage-1 test cases shared by several test modules: a small synthetic shard with its annulus
experiments and reflections (:func:`write_case`), an MTZ of given intensities, and the comparison of a
batched fit with a per-shot one (:func:`assert_same_fit` up to rounding, :func:`assert_identical_fit` to the bit)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sim_fixtures import (all_pixels, channel_subset, crystal_state, ly99_amplitudes, make_beam, random_orientation,
                          spot_centroids)
from xfel_spread.io.shard import write_shard
from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import AmplitudeLookup, bragg_photons_dense
from xfel_spread.sim.geometry import Detector
from xfel_spread.sim.structure_factors import HC_EV_ANGSTROM, expand_to_p1_grid, save_channel_amplitudes
from xfel_spread.stage1.model import PARAMETER_NAMES

CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
N_PIXELS, PIXEL_SIZE_MM, DISTANCE_MM = 512, 0.176, 141.7
#: The direct beam meets the panel's plane 40 mm before its first row and column.
BEAM_CENTER_MM = -40.0
CHANNELS = np.arange(5, 100, 10)  # 10 of the 100 LY99 channels, 7075.5 to 7165.5 eV
NCELLS_TRUE, G_TRUE = 57.0, 100.0
GAIN, ADC_OFFSET = 2.0, 10.0
#: Orientation seeds of the case's shots (each lights 10 or more spots on the panel).
ORIENTATION_SEEDS = (1, 4)
#: DIALS's predicted centroids (xyzcal.px) are written this far from the observed ones, along fast.
DIALS_PREDICTION_OFFSET_PX = 0.25
#: The start crystal: the truth turned by this angle (deg) and its a axis stretched by this fraction.
START_ROTATION_DEG, START_STRETCH = 0.05, 0.002


def detector_metadata() -> dict:
    return {"pixel_size_mm": PIXEL_SIZE_MM, "distance_mm": DISTANCE_MM, "n_fast": N_PIXELS, "n_slow": N_PIXELS,
            "beam_center_mm": (BEAM_CENTER_MM, BEAM_CENTER_MM), "gain_adu_per_photon": GAIN,
            "adc_offset_adu": ADC_OFFSET, "trusted_range": (0, 2 ** 31 - 2), "thickness_mm": 0.032,
            "attenuation_length_mm": 0.017, "material": "Gd2O2S"}


BEAM_METADATA = {"polarization_fraction": 1.0, "polarization_normal": (0.0, 1.0, 0.0)}


def sim_detector() -> Detector:
    meta = detector_metadata()
    return Detector(N_PIXELS, N_PIXELS, PIXEL_SIZE_MM, DISTANCE_MM, tuple(meta["beam_center_mm"]),
                    meta["thickness_mm"], meta["attenuation_length_mm"])


def rotation_about(axis, angle_deg) -> np.ndarray:
    return xtal.axis_angle_rotation(np.asarray(axis, dtype=float) / np.linalg.norm(axis), np.radians(angle_deg))


@dataclass
class Case:
    directory: Path
    shard: Path
    annulus_prefix: Path
    reindex_prefix: Path
    truth: Path
    amplitudes: Path
    mtz: Path
    true_matrices: list
    start_matrices: list
    n_reflections: list
    missing_from_mtz: int  #: reflections of the case whose index the MTZ lacks


def miller_indices_at(matrix: np.ndarray, centroids_px: np.ndarray, energies_ev) -> tuple[np.ndarray, np.ndarray]:
    """Miller indices of the spots at the centroids (pixel units): the nearest integers to the
    fractional indices at the channel that brings them closest, and that distance."""
    detector = sim_detector()
    fast_mm = centroids_px[:, 0] * PIXEL_SIZE_MM
    slow_mm = centroids_px[:, 1] * PIXEL_SIZE_MM
    origin = detector.origin_mm
    positions = np.stack((origin[0] + fast_mm, origin[1] - slow_mm, np.full(len(fast_mm), origin[2])), axis=1)
    directions = positions / np.linalg.norm(positions, axis=1, keepdims=True)
    inverse_wavelengths = np.asarray(energies_ev, dtype=np.float64)[:, None, None] / HC_EV_ANGSTROM
    fractional = inverse_wavelengths * ((directions - [0.0, 0.0, -1.0]) @ matrix.T)[None]
    distance = np.abs(fractional - np.rint(fractional)).max(axis=2)
    best = np.argmin(distance, axis=0)
    spots = np.arange(len(centroids_px))
    return np.rint(fractional[best, spots]).astype(np.int64), distance[best, spots]


def write_case(directory: Path, seeds=ORIENTATION_SEEDS, noise_seed: int = 7, beam_offset_px: float = 0.0) -> Case:
    """Write the tiny stage-1 input described in the module docstring into ``directory``.

    ``beam_offset_px``: the images are simulated with the beam centre this far (pixels, along fast
    and slow) off the one the shard's metadata and the experiments give (the detector metrology finds)."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex as cctbx_flex
    from dials.array_family import flex
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    directory.mkdir(parents=True, exist_ok=True)
    table = channel_subset(ly99_amplitudes(), CHANNELS)
    amplitudes_path = directory / "amplitudes.h5"
    save_channel_amplitudes(table, str(amplitudes_path))
    lookup = AmplitudeLookup(expand_to_p1_grid(table), "cpu")
    detector = sim_detector()
    rng = np.random.default_rng(noise_seed)
    spectra = np.stack([np.linspace(0.5, 1.5, len(CHANNELS))[::sign] * 1e11 for sign in (1, -1)][:len(seeds)])

    images, true_matrices, start_matrices, spots = [], [], [], []
    fast, slow = all_pixels(detector)
    imaged = detector.with_beam_center_offset_px((beam_offset_px, beam_offset_px)) if beam_offset_px else detector
    for shot, seed in enumerate(seeds):
        matrix = random_orientation(CELL, seed)
        bragg = bragg_photons_dense(imaged, make_beam(table.energies_ev, spectra[shot]),
                                    crystal_state(matrix, [NCELLS_TRUE] * 3, scale=G_TRUE), lookup, fast, slow)
        bragg = bragg.reshape(N_PIXELS, N_PIXELS).numpy()
        slow_grid, fast_grid = np.mgrid[0:N_PIXELS, 0:N_PIXELS]
        background = 20.0 + 0.02 * fast_grid - 0.03 * slow_grid + 5.0 * shot
        photons = rng.poisson(bragg + background)
        images.append((photons * GAIN + ADC_OFFSET).astype(np.int32))
        centroids, _ = spot_centroids(bragg, threshold=0.5, min_total=50.0)
        hkl, distance = miller_indices_at(matrix, centroids, table.energies_ev)
        keep = distance < 0.25
        spots.append((hkl[keep], centroids[keep]))
        true_matrices.append(matrix)
        stretch = np.diag([1.0 + START_STRETCH, 1.0, 1.0])
        start_matrices.append((stretch @ matrix) @ rotation_about([1.0, 2.0, 0.5], START_ROTATION_DEG).T)

    shard = directory / "shard_00000.h5"
    write_shard(shard, images, np.arange(len(seeds)), table.energies_ev, spectra, detector_metadata(),
                BEAM_METADATA, "psf")

    experiments = ExperimentListFactory.from_filenames([str(shard)])
    reflections = flex.reflection_table()
    ids, indices, centroids_all = [], [], []
    annulus = ExperimentList()
    for position, experiment in enumerate(experiments):
        a, b, c = (tuple(row) for row in start_matrices[position])
        experiment.crystal = Crystal(a, b, c, "C 1 2/m 1")
        experiment.identifier = f"lattice-{position}"
        annulus.append(experiment)
        hkl, centroids = spots[position]
        ids += [position] * len(hkl)
        indices += [tuple(int(v) for v in row) for row in hkl]
        centroids_all += [(float(x), float(y), 0.0) for x, y in centroids]
    reflections["id"] = flex.int(ids)
    reflections["miller_index"] = flex.miller_index(indices)
    reflections["xyzobs.px.value"] = flex.vec3_double(centroids_all)
    reflections["xyzcal.px"] = flex.vec3_double([(x + DIALS_PREDICTION_OFFSET_PX, y, z) for x, y, z in centroids_all])
    reflections["panel"] = flex.size_t(len(ids), 0)
    # Every other reflection was found by the spot finder; the rest were only predicted and integrated.
    reflections["flags"] = flex.size_t(len(ids), 0)
    reflections.set_flags(flex.bool([index % 2 == 0 for index in range(len(ids))]), reflections.flags.strong)
    for position, experiment in enumerate(annulus):
        reflections.experiment_identifiers()[position] = experiment.identifier

    (directory / "annulus").mkdir(exist_ok=True)
    (directory / "reindex").mkdir(exist_ok=True)
    annulus_prefix = directory / "annulus" / "shard_00000"
    annulus.as_file(f"{annulus_prefix}_annulus.expt")
    reflections.as_file(f"{annulus_prefix}_annulus.refl")
    reindex_prefix = directory / "reindex" / "shard_00000"
    annulus.as_file(f"{reindex_prefix}_integrated.expt")

    truth = directory / "truth.json"
    truth.write_text(json.dumps({"seed": 1, "shots": [
        {"shot_index": shot, "real_space_a_b_c": true_matrices[shot].tolist(), "unit_cell": list(CELL),
         "space_group": "C 1 2 1", "ncells_abc": [NCELLS_TRUE] * 3, "domains_per_crystal": G_TRUE}
        for shot in range(len(seeds))]}))

    # Merged intensities: the photon-weighted |F|^2 of every index the case observed but the first.
    symmetry = crystal.symmetry(unit_cell=CELL, space_group_symbol="C 1 2 1")
    observed = miller.set(symmetry, cctbx_flex.miller_index(indices[1:]), anomalous_flag=False)
    observed = observed.map_to_asu().unique_under_symmetry()
    model = miller.array(miller.set(symmetry, cctbx_flex.miller_index([tuple(map(int, r)) for r in table.indices]),
                                    anomalous_flag=True), cctbx_flex.double(np.mean(table.amplitudes ** 2, axis=0)))
    mean_model = model.average_bijvoet_mates()
    matched = mean_model.common_set(observed)
    mtz = directory / "merged.mtz"
    write_test_mtz(mtz, matched)
    in_mtz = {tuple(index) for index in matched.indices()}
    asu = miller.set(symmetry, cctbx_flex.miller_index(indices), anomalous_flag=False).map_to_asu()
    missing = sum(tuple(index) not in in_mtz for index in asu.indices())
    return Case(directory, shard, annulus_prefix, reindex_prefix, truth, amplitudes_path, mtz, true_matrices,
                start_matrices, [len(spot[0]) for spot in spots], missing)


def write_test_mtz(path: Path, intensities) -> None:
    """An MTZ with the columns ``read_merged_mtz`` needs: IMEAN, SIGIMEAN, I(+), SIGI(+), I(-), SIGI(-)."""
    from cctbx.array_family import flex

    with_sigmas = intensities.customized_copy(sigmas=flex.double(intensities.size(), 1.0))
    dataset = with_sigmas.set_observation_type_xray_intensity().as_mtz_dataset(column_root_label="IMEAN",
                                                                               wavelength=1.74)
    anomalous = with_sigmas.generate_bijvoet_mates()
    dataset.add_miller_array(anomalous.set_observation_type_xray_intensity(), column_root_label="I")
    dataset.mtz_object().write(str(path))


def assert_identical_fit(batched, single):
    """Every field of the two ShotFits equal (NaN equal to NaN), but the seconds."""
    for field in dataclasses.fields(single):
        if field.name != "seconds":
            mine, theirs = getattr(batched, field.name), getattr(single, field.name)
            if isinstance(theirs, dict):
                mine, theirs = [mine[name] for name in theirs], list(theirs.values())
            if theirs is None:
                assert mine is None, field.name
                continue
            assert np.array_equal(mine, theirs, equal_nan=not isinstance(theirs, (str, tuple))), field.name


def assert_same_fit(batched, single, tolerance_steps=1e-3, flat: dict[str, float] | None = None):
    """Same outcome, and parameters within ``tolerance_steps`` scaled units (a thousandth of the
    step each parameter is scaled by, about its 1-sigma on an LY99 shot); ``flat`` gives a looser
    tolerance (steps) to named parameters along which the NLL is flat."""
    assert batched.converged == single.converged and batched.reason == single.reason
    assert batched.n_rois == single.n_rois
    start = np.array([single.start[name] for name in PARAMETER_NAMES])
    assert np.allclose([batched.start[name] for name in PARAMETER_NAMES], start, rtol=1e-10)
    step = np.array([0.03 * start[0], 1e-3, 1e-3, 1e-3, *(1e-4 * start[4:8]), *(0.02 * 72,) * 3, 0.002, 0.005])
    difference = np.array([batched.final[name] - single.final[name] for name in PARAMETER_NAMES])
    tolerance = np.array([(flat or {}).get(name, tolerance_steps) for name in PARAMETER_NAMES])
    assert np.all(np.abs(difference) <= tolerance * step), dict(zip(PARAMETER_NAMES, difference / step))
    assert batched.rmsd_px == pytest.approx(single.rmsd_px, rel=1e-3, abs=1e-4)
    assert np.allclose(batched.real_space_matrix, single.real_space_matrix, rtol=0, atol=1e-2 * tolerance_steps)
