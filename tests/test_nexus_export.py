"""NXmx: the project's shards exported (xfel_spread.io.nexus) and read back by dxtbx with the same pixels,
geometry and per-shot wavelengths, spectra kept in the file; and a NeXus file made here with h5py, carrying
per-shot spectra, listed and read as images from elsewhere."""

import h5py
import numpy as np
import pytest
from test_shard_io import BEAM, DETECTOR, ENERGY_EV, PHOTONS, SHOT_INDEX, images, write

from xfel_spread.io.images import HC_EV_A, format_class_for, list_images, make_image_list_shard
from xfel_spread.io.nexus import read_nxmx_spectra, write_nxmx
from xfel_spread.io.shard import read_shard_image, read_shard_metadata


def shard_experiments(path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames([str(path)])


def test_an_exported_shard_reads_back_through_dxtbx_with_the_same_pixels_geometry_and_spectra(tmp_path):
    shard = tmp_path / "shard_00000.h5"
    write(shard)
    write_nxmx(shard, tmp_path / "shard_00000.nxs")
    instance = format_class_for(str(tmp_path / "shard_00000.nxs")).get_instance(str(tmp_path / "shard_00000.nxs"))
    assert type(instance).__name__ == "FormatNXmx" and instance.get_num_images() == 3
    original = shard_experiments(shard)
    for i, image in enumerate(images()):
        assert np.array_equal(instance.get_raw_data(i)[0].as_numpy_array(), image)
        # Each shot's wavelength is its spectrum's photon-weighted mean, as FormatSPREADShard gives it.
        assert instance.get_beam(i).get_wavelength() == pytest.approx(original[i].beam.get_wavelength(), rel=1e-12)
    panel, expected = instance.get_detector()[0], original[0].detector[0]
    assert panel.get_origin() == pytest.approx(expected.get_origin(), abs=1e-9)
    assert panel.get_fast_axis() == pytest.approx(expected.get_fast_axis())
    assert panel.get_slow_axis() == pytest.approx(expected.get_slow_axis())
    assert panel.get_pixel_size() == pytest.approx(expected.get_pixel_size())
    assert panel.get_image_size() == expected.get_image_size() == (32, 24)
    energies, photons = read_nxmx_spectra(tmp_path / "shard_00000.nxs")
    assert np.array_equal(energies, ENERGY_EV) and np.array_equal(photons, PHOTONS)
    with h5py.File(tmp_path / "shard_00000.nxs") as h5:
        wavelengths = h5["entry/instrument/beam/incident_wavelength_1Dspectrum"][()]
    assert HC_EV_A / wavelengths == pytest.approx(ENERGY_EV, rel=1e-12)


def test_a_nexus_file_with_per_shot_spectra_is_an_image_source(tmp_path):
    # An NXmx file made with h5py (here through the exporter's layout): listed frame by frame through dxtbx
    # and, with spectra: table, given per-shot spectra from a table naming its frames.
    shard = tmp_path / "shard_00000.h5"
    write(shard)
    nexus = tmp_path / "run.nxs"
    write_nxmx(shard, nexus)
    shots = list_images([str(nexus)])
    assert [(shot.path, shot.frame) for shot in shots] == [(str(nexus), frame) for frame in range(3)]
    table = tmp_path / "spectra.tsv"
    table.write_text("image\tframe\tenergy_ev\tweight\n" + "".join(
        f"run.nxs\t{frame}\t{energy}\t{weight}\n" for frame in range(3) for energy, weight in zip(ENERGY_EV, PHOTONS[frame])))
    listing = make_image_list_shard(tmp_path / "list.h5", shots, 0, "table", str(table))
    assert np.array_equal(listing.weights, PHOTONS) and listing.energy_ev == pytest.approx(ENERGY_EV)
    metadata = read_shard_metadata(tmp_path / "list.h5")
    assert metadata.detector["n_fast"] == 32 and metadata.detector["n_slow"] == 24
    for frame, image in enumerate(images()):
        assert np.array_equal(read_shard_image(tmp_path / "list.h5", frame), image)
    assert list(SHOT_INDEX) and BEAM and DETECTOR  # the shard's own metadata, as written by test_shard_io


def test_per_shot_spectra_of_a_nexus_file_come_from_its_nxbeam_with_spectra_imageset(tmp_path):
    # A NeXus file written here with h5py in the layout dxtbx's NeXus beam reader follows: one wavelength per
    # frame (what FormatNXmx reads; a 2-D incident_wavelength stops it), whose variant names each frame's own
    # channels (2-D) with their weights.
    shard = tmp_path / "shard_00000.h5"
    write(shard)
    nexus = tmp_path / "run.nxs"
    write_nxmx(shard, nexus)
    rng = np.random.default_rng(3)
    energies = 9500.0 + np.sort(rng.uniform(-50, 50, (3, 8)), axis=1)
    weights = rng.uniform(0.1, 1.0, (3, 8))
    with h5py.File(nexus, "a") as h5:
        beam = h5["entry/instrument/beam"]
        for name in list(beam):
            del beam[name]
        mean = (energies * weights).sum(axis=1) / weights.sum(axis=1)
        beam.create_dataset("incident_wavelength", data=HC_EV_A / mean).attrs.update(
            {"units": "angstrom", "variant": "incident_wavelength_spectrum"})
        beam.create_dataset("incident_wavelength_spectrum", data=HC_EV_A / energies).attrs["units"] = "angstrom"
        beam["incident_wavelength_spectrum_weight"] = weights
    shots = list_images([str(nexus)])
    listing = make_image_list_shard(tmp_path / "list.h5", shots, 0, "imageset", energy_offset_ev=2.0)
    for frame in range(3):
        shot_energies, shot_weights = listing.spectrum(frame)
        keep = shot_weights > 0
        assert shot_energies[keep] == pytest.approx(energies[frame] + 2.0, abs=1e-6)
        assert shot_weights[keep] == pytest.approx(weights[frame])
    # The exporter's own layout (variant chain to incident_wavelength_1Dspectrum) reads the same way.
    exported = tmp_path / "exported.nxs"
    write_nxmx(shard, exported)
    listing = make_image_list_shard(tmp_path / "list2.h5", list_images([str(exported)]), 0, "imageset")
    assert listing.energy_ev == pytest.approx(ENERGY_EV) and np.array_equal(listing.weights, PHOTONS)
    # Without spectra, one line naming the file and frame.
    with h5py.File(exported, "a") as h5:
        del h5["entry/instrument/beam/incident_wavelength"].attrs["variant"]
    from xfel_spread.io.images import ImageInputError

    with pytest.raises(ImageInputError, match=r"exported.nxs: frame 0 has no spectrum \(spectra: imageset\)"):
        make_image_list_shard(tmp_path / "list3.h5", list_images([str(exported)]), 0, "imageset")


def test_the_export_command_writes_the_file_and_names_a_bad_shard_in_one_line(tmp_path):
    import subprocess
    import sys

    shard = tmp_path / "shard_00000.h5"
    write(shard)
    command = [sys.executable, "-m", "xfel_spread.cli.images", "nxmx", "--shard", str(shard), "--output",
               str(tmp_path / "out.nxs")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert read_nxmx_spectra(tmp_path / "out.nxs")[1].shape == PHOTONS.shape
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    command[5] = str(tmp_path / "bad.h5")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"spread-export-nxmx: error: {tmp_path / 'bad.h5'}: ")


def test_the_projects_own_shard_is_an_image_source_with_its_spectra(tmp_path):
    shard = tmp_path / "shard_00000.h5"
    write(shard)
    shots = list_images([str(tmp_path / "shard_*.h5")])
    assert [shot.frame for shot in shots] == [0, 1, 2]
    listing = make_image_list_shard(tmp_path / "list.h5", shots, 0, "imageset")
    assert listing.energy_ev == pytest.approx(ENERGY_EV) and listing.weights == pytest.approx(PHOTONS)
    for frame, image in enumerate(images()):
        assert np.array_equal(read_shard_image(tmp_path / "list.h5", frame), image)
