"""Stage 1 inputs and outputs: shoeboxes (geometry, overlaps, trusted mask, background plane), the
shot's spectrum and detector through dxtbx, structure-factor grids, refined experiments and the
shots table.

:func:`write_case` builds, in a directory, a tiny but complete stage-1 input: a shard of stills
simulated with the forward model itself (LY99 cell, N and distance; a 512 x 512 panel of 0.176 mm
pixels off to one side of the beam, spanning 4 to 1.9 A; 10 energy channels 10 eV apart over the
SASE band; a tilted background plane, Poisson noise, gain 2 ADU/photon and an ADC offset), the annulus experiment and
reflection files a DIALS run would give (start crystals slightly off the truth, observed centroids
of the noiseless spots), the reindex experiments, truth records, the amplitude table and a merged
MTZ. The command-line tests reuse it.
"""

from __future__ import annotations


import numpy as np
import pytest

from xfel_spread.io.shard import read_shard_image, read_shard_metadata
from xfel_spread.io import refined_shots
from xfel_spread.stage1 import io as stage1_io
from xfel_spread.stage1 import rois

from stage1_cases import (ADC_OFFSET, CELL, DISTANCE_MM, GAIN, N_PIXELS, CHANNELS, DIALS_PREDICTION_OFFSET_PX, detector_metadata, Case, write_case, write_test_mtz)

@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return write_case(tmp_path_factory.mktemp("stage1_case"))


# ---------------------------------------------------------------------------------------------
# Box geometry


def test_boxes_are_centred_on_the_centroid_and_clipped_at_the_edges():
    bounds = rois.shoebox_bounds(np.array([[100.3, 50.7], [2.2, 3.0], [254.9, 255.5]]), 12, 256, 256)
    # Centre of [94, 106) is 100, the nearest box centre to 100.3; slow: [45, 57) centred on 51 for 50.7.
    assert bounds[0].tolist() == [94, 106, 45, 57]
    # x0 = round(2.2 - 6) = -4 and y0 = -3 are clipped to 0; the far edges stay where the box ends.
    assert bounds[1].tolist() == [0, 8, 0, 9]
    # Past the far edge the box stops at the panel (256).
    assert bounds[2].tolist() == [249, 256, 250, 256]


def test_a_shared_pixel_goes_to_the_nearer_reflection_and_only_to_it():
    centroids = np.array([[10.0, 10.0], [15.0, 10.0]])
    bounds = rois.shoebox_bounds(centroids, 8, 64, 64)
    pixels = rois.assign_box_pixels(bounds, centroids, spot_radius_px=2.0)
    keys = pixels.slow * 64 + pixels.fast
    assert len(np.unique(keys)) == len(keys), "a pixel appears twice"
    # Both boxes together cover x 6..18 (box 0: 6..13, box 1: 11..18) over the same 8 rows.
    assert len(keys) == 13 * 8
    centre_x = pixels.fast + 0.5
    distance_0 = np.abs(centre_x - 10.0)
    distance_1 = np.abs(centre_x - 15.0)
    # Columns 11-13 are in both boxes: x 11.5 is nearer 10, 12.5 is as near to both (the first
    # wins), 13.5 is nearer 15.
    assert set(np.unique(pixels.fast[pixels.roi == 0])) == set(range(6, 13))
    assert set(np.unique(pixels.fast[pixels.roi == 1])) == set(range(13, 19))
    assert np.all(np.where(pixels.roi == 0, distance_0 <= distance_1, distance_1 < distance_0))
    # Pixels come grouped by box, in box order.
    assert np.all(np.diff(pixels.roi) >= 0)


def test_ties_go_to_the_first_reflection_and_other_spots_are_flagged():
    centroids = np.array([[10.0, 10.0], [13.0, 10.0]])  # the column x = 11 (centre 11.5) is equidistant
    bounds = rois.shoebox_bounds(centroids, 8, 64, 64)
    pixels = rois.assign_box_pixels(bounds, centroids, spot_radius_px=2.0)
    assert set(np.unique(pixels.fast[pixels.roi == 0])) == set(range(6, 12))
    # Pixels (11, 9) and (11, 10) belong to reflection 0 but lie 1.58 px from reflection 1's
    # centroid: inside its spot. Reflection 1's own pixels are all 2.5 px or more from (10, 10).
    flagged = {(int(x), int(y)) for x, y in zip(pixels.fast[pixels.in_other_spot], pixels.slow[pixels.in_other_spot])}
    assert flagged == {(11, 9), (11, 10)}


def test_border_pixels_of_clipped_boxes_are_their_outermost_rows_and_columns():
    centroids = np.array([[1.0, 30.0]])
    bounds = rois.shoebox_bounds(centroids, 6, 64, 64)
    assert bounds[0].tolist() == [0, 4, 27, 33]
    pixels = rois.assign_box_pixels(bounds, centroids, 1.5)
    interior = (pixels.fast > 0) & (pixels.fast < 3) & (pixels.slow > 27) & (pixels.slow < 32)
    assert np.array_equal(pixels.on_border, ~interior)


# ---------------------------------------------------------------------------------------------
# Background plane


def test_plane_fit_recovers_a_plane_exactly_despite_outliers():
    slow, fast = np.mgrid[0:12, 0:12]
    x, y = fast.ravel() - 5.5, slow.ravel() - 5.5
    values = 3.0 + 0.25 * x - 0.5 * y
    values[7] += 400.0  # a neighbouring spot's pixel
    values[20] -= 80.0  # a dead pixel
    coefficients = rois.fit_plane(x, y, values)
    np.testing.assert_allclose(coefficients, [3.0, 0.25, -0.5], rtol=0, atol=1e-9)


def test_plane_fit_says_which_points_its_last_fit_used():
    """The clipped points are the outliers; the plane's share map (stage 1's plane_holds_bragg)
    needs exactly the points the plane was fitted to."""
    slow, fast = np.mgrid[0:12, 0:12]
    x, y = fast.ravel() - 5.5, slow.ravel() - 5.5
    values = 3.0 + 0.25 * x - 0.5 * y + np.random.default_rng(2).normal(0, 0.1, x.size)
    values[[7, 30]] += 400.0
    coefficients, used = rois.fit_plane_points(x, y, values)
    assert np.array_equal(np.flatnonzero(~used), [7, 30])
    design = np.stack((np.ones(x.size), x, y), axis=1)
    np.testing.assert_allclose(coefficients, np.linalg.lstsq(design[used], values[used], rcond=None)[0], rtol=1e-12)
    assert np.array_equal(coefficients, rois.fit_plane(x, y, values))
    assert not rois.fit_plane_points(np.arange(5.0), np.arange(5.0), np.ones(5))[1].any()


def test_plane_fit_needs_three_points_off_a_line():
    assert rois.fit_plane(np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([1.0, 2.0])) is None
    assert rois.fit_plane(np.arange(5.0), np.arange(5.0), np.ones(5)) is None


def test_shoebox_background_is_a_known_plane_exactly_on_a_synthetic_image(case):
    """A plane plus a bright 3 x 3 spot at every reflection: the background is the plane at every pixel."""
    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    slow, fast = np.mgrid[0:N_PIXELS, 0:N_PIXELS]
    # Integral photons on a plane with integral slopes, so ADU and photons are exact.
    plane = 1100.0 + 1.0 * fast - 2.0 * slow
    image = plane.copy()
    for x, y, _ in np.array(annulus.reflections["xyzobs.px.value"]):
        image[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] += 500.0
    image_adu = (image * GAIN + ADC_OFFSET).astype(np.int32)
    for lattice in range(annulus.n_lattices):
        shot, counts = rois.shot_pixels(annulus, lattice, image_adu, 12)
        assert counts.no_background == 0 and shot.n_rois == case.n_reflections[lattice]
        first_row = sum(case.n_reflections[:lattice])
        np.testing.assert_array_equal(shot.strong, (first_row + np.arange(shot.n_rois)) % 2 == 0)
        np.testing.assert_allclose(shot.dials_predicted_px - shot.observed_centroid_px,
                                   [[DIALS_PREDICTION_OFFSET_PX, 0.0]] * shot.n_rois)
        np.testing.assert_array_equal(shot.data_photons, image[shot.pixel_slow, shot.pixel_fast])
        np.testing.assert_allclose(shot.background_photons, plane[shot.pixel_slow, shot.pixel_fast], rtol=0, atol=1e-9)
        # The planes were fitted to trusted border pixels, and to some of every ROI's.
        border = ((shot.pixel_fast == shot.roi_bounds[shot.pixel_roi, 0])
                  | (shot.pixel_fast == shot.roi_bounds[shot.pixel_roi, 1] - 1)
                  | (shot.pixel_slow == shot.roi_bounds[shot.pixel_roi, 2])
                  | (shot.pixel_slow == shot.roi_bounds[shot.pixel_roi, 3] - 1))
        assert not np.any(shot.background_fit & ~(border & shot.trusted))
        assert set(shot.pixel_roi[shot.background_fit]) == set(range(shot.n_rois))


# ---------------------------------------------------------------------------------------------
# Trusted mask, units


def test_trusted_mask_excludes_out_of_range_pixels_and_other_spots(case):
    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    image = read_shard_image(case.shard, 0)
    first = np.array(annulus.reflections["xyzobs.px.value"])[0]
    x, y = int(first[0]), int(first[1])
    image = image.copy()
    image[y, x] = -5  # below the trusted minimum (0 ADU)
    shot, _ = rois.shot_pixels(annulus, 0, image, 12)
    at = (shot.pixel_fast == x) & (shot.pixel_slow == y)
    assert at.sum() == 1 and not shot.trusted[at][0]
    # Every other untrusted pixel is within 3 px (12 / 4) of a centroid other than its own.
    others = ~shot.trusted & ~at
    for index in np.flatnonzero(others):
        centre = np.array([shot.pixel_fast[index] + 0.5, shot.pixel_slow[index] + 0.5])
        distances = np.linalg.norm(shot.observed_centroid_px - centre, axis=1)
        distances[shot.pixel_roi[index]] = np.inf
        assert distances.min() < 3.0
    # Photons are (ADU - offset) / gain.
    np.testing.assert_allclose(shot.data_photons, (image[shot.pixel_slow, shot.pixel_fast] - ADC_OFFSET) / GAIN)


def test_shot_pixels_of_the_case_describe_the_shot(case):
    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    failures = []
    shots = list(rois.read_lattices(annulus, [1, 0], 12, lambda lattice, error: failures.append(error)))
    assert not failures
    assert [lattice for lattice, _, _ in shots] == [1, 0]
    for lattice, shot, counts in shots:
        assert shot.image_index == lattice and shot.shot_index == lattice
        assert shot.identifier == f"lattice-{lattice}"
        assert counts.reflections == case.n_reflections[lattice] == shot.n_rois
        np.testing.assert_allclose(shot.real_space_matrix, case.start_matrices[lattice], atol=1e-9)
        assert shot.space_group == "C 1 2/m 1"
        assert shot.gain_adu_per_photon == GAIN and shot.polarization_fraction == 1.0
        # Each ROI's pixels lie inside its box; boxes are 12 x 12 unless clipped or overlapped.
        for roi, (x0, x1, y0, y1) in enumerate(shot.roi_bounds):
            mine = shot.pixel_roi == roi
            assert np.all((shot.pixel_fast[mine] >= x0) & (shot.pixel_fast[mine] < x1))
            assert np.all((shot.pixel_slow[mine] >= y0) & (shot.pixel_slow[mine] < y1))
            assert x1 - x0 <= 12 and y1 - y0 <= 12
        # The background of the simulated plane (20 + 0.02 x - 0.03 y + 5 per shot) is found.
        expected = 20.0 + 0.02 * (shot.pixel_fast + 0.5) - 0.03 * (shot.pixel_slow + 0.5) + 5.0 * lattice
        assert np.median(np.abs(shot.background_photons - expected)) < 1.0


def test_select_rois_keeps_the_chosen_reflections_and_their_pixels(case):
    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    shot, _ = rois.shot_pixels(annulus, 0, read_shard_image(case.shard, 0), 12)
    keep = np.arange(shot.n_rois) % 2 == 0
    kept = rois.select_rois(shot, keep)
    assert kept.n_rois == keep.sum()
    np.testing.assert_array_equal(kept.miller_index, shot.miller_index[keep])
    assert kept.n_pixels == np.isin(shot.pixel_roi, np.flatnonzero(keep)).sum()
    assert set(np.unique(kept.pixel_roi)) == set(range(kept.n_rois))
    np.testing.assert_array_equal(kept.data_photons, shot.data_photons[np.isin(shot.pixel_roi, np.flatnonzero(keep))])
    np.testing.assert_array_equal(kept.background_fit,
                                  shot.background_fit[np.isin(shot.pixel_roi, np.flatnonzero(keep))])


# ---------------------------------------------------------------------------------------------
# Spectrum and detector


def test_spectrum_through_dxtbx_equals_the_shards(case):
    from xfel_spread.io.shard import read_shard_spectrum

    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    for lattice in range(annulus.n_lattices):
        energies, photons = rois.shot_spectrum(annulus.experiments[lattice], case.shard, lattice)
        shard_energies, shard_photons = read_shard_spectrum(case.shard, lattice)
        np.testing.assert_array_equal(energies, shard_energies)
        np.testing.assert_array_equal(photons, shard_photons)
    # The two shots have different spectra, so a lattice read against the other image is caught.
    with pytest.raises(rois.RoiInputError, match="image 1: the spectrum dxtbx reads differs from the shard's"):
        rois.shot_spectrum(annulus.experiments[0], case.shard, 1)


def test_annulus_experiments_must_read_the_given_shard(case, tmp_path):
    other = tmp_path / "other.h5"
    other.write_bytes(case.shard.read_bytes())
    with pytest.raises(rois.RoiInputError, match=r"experiment 0 reads .* not .*other\.h5"):
        rois.open_annulus_shard(case.annulus_prefix, other)
    with pytest.raises(rois.RoiInputError, match="no_such_annulus_annulus.expt: no such file"):
        rois.open_annulus_shard(tmp_path / "no_such_annulus", case.shard)


def dials_detector(fast_axis=(1.0, 0.0, 0.0), slow_axis=(0.0, -1.0, 0.0), origin=(-20.0, 21.5, -141.7)):
    from dxtbx.model.detector import DetectorFactory

    return DetectorFactory.make_detector("SENSOR_CCD", fast_axis, slow_axis, origin, (0.088, 0.088), (3840, 3840),
                                         (-1, 1e9))


def test_detector_conversion_takes_distance_and_beam_centre_from_the_origin():
    detector = rois.detector_from_dials(dials_detector(), detector_metadata(), "x.expt")
    assert detector.distance_mm == pytest.approx(141.7)
    assert detector.beam_center_mm == pytest.approx((20.0, 21.5))
    assert (detector.n_fast, detector.n_slow, detector.pixel_size_mm) == (3840, 3840, 0.088)
    assert detector.thickness_mm == 0.032 and detector.attenuation_length_mm == 0.017
    np.testing.assert_allclose(detector.origin_mm, (-20.0, 21.5, -141.7))


def test_a_tilted_panel_is_a_one_line_error_naming_the_file():
    tilt = np.radians(0.01)
    tilted = dials_detector(fast_axis=(np.cos(tilt), 0.0, np.sin(tilt)))
    with pytest.raises(rois.RoiInputError) as error:
        rois.detector_from_dials(tilted, detector_metadata(), "results/annulus/psf/shard_00000_annulus.expt")
    message = str(error.value)
    assert message.startswith("results/annulus/psf/shard_00000_annulus.expt: panel axes fast")
    assert "\n" not in message
    # Within 1e-6 the axes are accepted.
    nearly = dials_detector(fast_axis=(1.0, 0.0, 5e-7))
    rois.detector_from_dials(nearly, detector_metadata(), "x.expt")


def test_an_annulus_shard_with_a_tilted_panel_is_refused_whole(case, tmp_path):
    import shutil

    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(f"{case.annulus_prefix}_annulus.expt", check_format=False)
    panel = experiments[1].detector[0]
    tilt = np.radians(0.5)
    panel.set_frame((np.cos(tilt), 0.0, np.sin(tilt)), panel.get_slow_axis(), panel.get_origin())
    prefix = tmp_path / "tilted"
    experiments.as_file(f"{prefix}_annulus.expt")
    shutil.copy(f"{case.annulus_prefix}_annulus.refl", f"{prefix}_annulus.refl")
    with pytest.raises(rois.RoiInputError, match=r"tilted_annulus\.expt: panel axes fast \(0\.99996"):
        rois.open_annulus_shard(prefix, case.shard)


# ---------------------------------------------------------------------------------------------
# Structure factors


def test_mtz_amplitude_grid_holds_sqrt_imean_for_every_symmetry_mate_and_channel(tmp_path):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=CELL, space_group_symbol="C 1 2 1")
    indices = flex.miller_index([(1, 1, 0), (2, 0, 1), (3, 1, -2), (0, 2, 0)])
    intensities = miller.array(miller.set(symmetry, indices, anomalous_flag=False), flex.double([4.0, 9.0, 2.25, -3.0]))
    mtz = tmp_path / "merged.mtz"
    write_test_mtz(mtz, intensities)
    energies = np.array([7100.0, 7101.0, 7102.0])
    grid = stage1_io.amplitude_grid_from_mtz(mtz, energies)
    assert grid.values.shape[0] == 3

    def amplitude(hkl):
        offset = np.asarray(hkl) - grid.hkl_min
        return grid.values[:, offset[0], offset[1], offset[2]]

    # C2 (unique axis b): (h, k, l), (-h, k, -l); Friedel mates (-h, -k, -l), (h, -k, l); and C-centring.
    for hkl, expected in (((1, 1, 0), 2.0), ((2, 0, 1), 3.0), ((3, 1, -2), 1.5)):
        h, k, l = hkl
        for mate in ((h, k, l), (-h, k, -l), (-h, -k, -l), (h, -k, l)):
            np.testing.assert_allclose(amplitude(mate), expected, rtol=1e-6)
    # IMEAN < 0 gives F = 0; an index not in the MTZ has none either.
    np.testing.assert_array_equal(amplitude((0, 2, 0)), 0.0)
    present = rois.rois_with_amplitude(grid, np.array([[1, 1, 0], [-1, -1, 0], [0, 2, 0], [5, 5, 5], [99, 0, 0]]))
    assert present.tolist() == [True, True, False, False, False]


def test_model_amplitude_grid_must_be_on_the_shards_channels(case):
    energies = read_shard_metadata(case.shard).energy_ev
    grid = stage1_io.amplitude_grid_from_model(case.amplitudes, energies)
    assert grid.values.shape[0] == len(CHANNELS)
    with pytest.raises(stage1_io.Stage1FileError, match=r"amplitudes\.h5: channels \(10 from .* are not the shard's"):
        stage1_io.amplitude_grid_from_model(case.amplitudes, energies + 0.5)
    with pytest.raises(stage1_io.Stage1FileError, match="give the merged MTZ"):
        stage1_io.load_amplitude_grid("merged", energies, amplitudes_path=case.amplitudes)


def test_spectra_elsewhere_are_put_on_the_models_channels(case):
    """Images from elsewhere carry spectra on their own energies: with the model's |F| stage 1 puts every
    shot's spectrum on the table's channels (total and mean energy kept) and reads its lattices so; with
    merged |F| the shard's own channels stay. A spectrum off the table's channels is one line naming the
    shard and image, before any lattice is read."""
    from dataclasses import replace

    from xfel_spread.sim.spectrum import SpectrumGridError

    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    table = stage1_io.stage1_channels("model", annulus.metadata.energy_ev + 0.25, case.amplitudes)
    np.testing.assert_array_equal(table, annulus.metadata.energy_ev)  # the case's table is on its shard's
    np.testing.assert_array_equal(stage1_io.stage1_channels("merged", annulus.metadata.energy_ev + 0.25, None),
                                  annulus.metadata.energy_ev + 0.25)
    assert rois.annulus_on_channels(annulus, table) is annulus  # already on them
    assert rois.annulus_on_channels(annulus, table + 0.5e-6) is annulus  # within rebin_spectrum's bound
    # The same shard as a beamline's: its spectra a quarter of a channel step up, on 9 of the 10 channels.
    step = float(np.diff(table).min())
    elsewhere = replace(annulus, metadata=replace(annulus.metadata, energy_ev=table[:-1] + 0.25 * step,
                                                  photons_per_channel=annulus.metadata.photons_per_channel[:, :-1]))
    moved = rois.annulus_on_channels(elsewhere, table)
    np.testing.assert_array_equal(moved.metadata.energy_ev, table)
    before, after = elsewhere.metadata.photons_per_channel, moved.metadata.photons_per_channel
    np.testing.assert_allclose(after.sum(axis=1), before.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(after @ table / after.sum(axis=1),
                               before @ elsewhere.metadata.energy_ev / before.sum(axis=1), rtol=1e-12)
    shot, _ = rois.shot_pixels(annulus, 0, read_shard_image(case.shard, 0), 12)
    assert rois.shot_on_channels(shot, table, case.shard) is shot
    energies, photons = shot.energies_ev[:-1] + 0.25 * step, shot.photons[:-1]
    shifted = rois.shot_on_channels(replace(shot, energies_ev=energies, photons=photons), table, case.shard)
    np.testing.assert_array_equal(shifted.energies_ev, table)
    assert shifted.photons.sum() == pytest.approx(photons.sum(), rel=1e-12)
    assert shifted.photons @ table == pytest.approx(photons @ energies, rel=1e-12)
    # Channels of no weight may lie outside; a lit one may not.
    dark = replace(annulus, metadata=replace(annulus.metadata, energy_ev=annulus.metadata.energy_ev + 50 * step,
                                             photons_per_channel=np.zeros_like(before[:, :1]).repeat(10, axis=1)))
    assert rois.annulus_on_channels(dark, table).metadata.photons_per_channel.sum() == 0
    outside = replace(elsewhere, metadata=replace(elsewhere.metadata, energy_ev=table[:-1] + 2 * step))
    with pytest.raises(SpectrumGridError) as raised:
        rois.annulus_on_channels(outside, table)
    assert str(raised.value).startswith(f"{case.shard}: image 0: spectrum at ")
    assert "\n" not in str(raised.value)


def test_a_model_of_another_crystal_is_refused_in_one_line(case):
    """The model's |F| are only used for lattices of its own crystal: LY99's under thermolysin's cell
    (the default model under real images of something else) stops the job."""
    energies = read_shard_metadata(case.shard).energy_ev
    ly99 = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
    grid = stage1_io.load_amplitude_grid("model", energies, amplitudes_path=case.amplitudes,
                                         lattice_cells=[ly99, (67.5, 59.6, 47.3, 90.0, 110.1, 90.0)], lattices_source="a.expt")
    assert grid.values.shape[0] == len(CHANNELS)
    thermolysin = (93.4, 93.4, 131.2, 90.0, 90.0, 120.0)
    with pytest.raises(stage1_io.Stage1FileError,
                       match=r"amplitudes\.h5: the model's cell \(.*\) is not the lattices' \(93\.40 93\.40 131\.20 90\.00 "
                             r"90\.00 120\.00, median of 2 in t\.expt\): the model does not describe this crystal"):
        stage1_io.load_amplitude_grid("model", energies, amplitudes_path=case.amplitudes,
                                      lattice_cells=[thermolysin, thermolysin], lattices_source="t.expt")


def test_case_mtz_lacks_exactly_the_reflections_it_was_built_without(case):
    energies = read_shard_metadata(case.shard).energy_ev
    grid = stage1_io.amplitude_grid_from_mtz(case.mtz, energies)
    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    hkl = np.array(annulus.reflections["miller_index"].as_vec3_double(), dtype=np.int64)
    assert (~rois.rois_with_amplitude(grid, hkl)).sum() == case.missing_from_mtz >= 1


# ---------------------------------------------------------------------------------------------
# Outputs


def test_refined_experiments_replace_converged_crystals_and_move_detectors(case, tmp_path):
    from dxtbx.model.experiment_list import ExperimentList

    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    refined_matrix = case.true_matrices[0]
    results = [stage1_io.LatticeResult(0, {"converged": 1}, refined_matrix, 0.25),
               stage1_io.LatticeResult(1, {"converged": 0})]
    path = tmp_path / "out_refined.expt"
    stage1_io.write_refined_experiments(annulus.experiments, results, path)
    written = ExperimentList.from_file(str(path), check_format=False)
    assert [experiment.identifier for experiment in written] == ["lattice-0", "lattice-1"]
    np.testing.assert_allclose(np.array(written[0].crystal.get_real_space_vectors()), refined_matrix, atol=1e-9)
    assert written[0].crystal.get_space_group().info().type().lookup_symbol() == "C 1 2/m 1"
    np.testing.assert_allclose(np.array(written[1].crystal.get_real_space_vectors()), case.start_matrices[1], atol=1e-9)
    assert written[0].detector[0].get_distance() == pytest.approx(DISTANCE_MM + 0.25)
    assert written[1].detector[0].get_distance() == pytest.approx(DISTANCE_MM)
    assert written[0].imageset.indices()[0] == 0 and written[1].imageset.indices()[0] == 1
    # The start experiments are untouched.
    assert annulus.experiments[0].detector[0].get_distance() == pytest.approx(DISTANCE_MM)


def test_shots_table_round_trip(tmp_path):
    rows = [stage1_io.failed_lattice_result(0, 10, 0, "id-0", "no shoebox to refine\t(detail)\n", 0, 3, 0),
            stage1_io.LatticeResult(1, {"shot": 11, "image": 1, "identifier": "id-1", "converged": 1, "reason": "",
                                        "G": 93.75, "rmsd_radial_after_px": float("nan"), "seconds": 1.5})]
    path = tmp_path / "x_shots.tsv"
    stage1_io.write_shots_table(rows, path)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(refined_shots.SHOT_COLUMNS)
    read = refined_shots.read_refined_shots(path)
    assert read[0]["reason"] == "no shoebox to refine (detail)" and read[0]["converged"] == 0
    assert read[0]["n_rois_no_f"] == 3 and read[0]["G"] is None
    assert read[1]["G"] == 93.75 and read[1]["rmsd_radial_after_px"] is None and read[1]["seconds"] == 1.5
    assert not list(tmp_path.glob(".*partial"))


def test_lattices_on_one_image_share_one_read_and_failures_do_not_stop_the_others(case, monkeypatch):
    annulus = rois.open_annulus_shard(case.annulus_prefix, case.shard)
    reads = []

    def counting_read(path, index, multi_panel=False):
        reads.append(index)
        if index == 1:
            raise OSError("corrupt chunk")
        return read_shard_image(path, index, multi_panel)

    monkeypatch.setattr(rois, "read_shard_image", counting_read)
    failures = []
    shots = list(rois.read_lattices(annulus, [0, 1], 12, lambda lattice, error: failures.append((lattice, str(error)))))
    assert reads == [0, 1]
    assert [lattice for lattice, _, _ in shots] == [0] and failures == [(1, "corrupt chunk")]
    # Two lattices said to be on image 0: one read for both. (Lattice 1's experiment really reads
    # image 1, whose spectrum differs from image 0's: the spectrum check catches the mix-up.)
    reads.clear()
    failures.clear()
    monkeypatch.setattr(rois.AnnulusShard, "image_index", lambda self, lattice: 0)
    shots = list(rois.read_lattices(annulus, [0, 1], 12, lambda lattice, error: failures.append((lattice, str(error)))))
    assert reads == [0] and [lattice for lattice, _, _ in shots] == [0]
    assert failures == [(1, f"{case.shard}: image 0: the spectrum dxtbx reads differs from the shard's")]
