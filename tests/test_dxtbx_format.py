"""FormatSPREADShard through dxtbx's real registry (the installed package's entry point) and dials.import.

Needs the package installed in the interpreter running the tests (``pip install -e .``, done by
scripts/setup.sh), since dxtbx finds Format classes only through entry points.
"""

import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

import dxtbx
from dxtbx import IncorrectFormatError
from dxtbx.format import Registry
from dxtbx.model.experiment_list import ExperimentListFactory
from libtbx.utils import Sorry
from cctbx import factor_ev_angstrom

from xfel_spread.io.dxtbx_format import FormatSPREADShard
from xfel_spread.io.shard import ShardFormatError, read_shard_metadata, write_shard

N_SLOW, N_FAST = 48, 64
PIXEL_SIZE_MM = 0.1
BEAM_CENTER_MM = (3.25, 2.35)  # nominal, fast/slow
DETECTOR = {
    "pixel_size_mm": PIXEL_SIZE_MM,
    "distance_mm": 120.0,
    "n_fast": N_FAST,
    "n_slow": N_SLOW,
    "beam_center_mm": BEAM_CENTER_MM,
    "gain_adu_per_photon": 2.0,
    "adc_offset_adu": 10.0,
    "trusted_range": (-20.0, 60000.0),
    "thickness_mm": 0.05,
    "attenuation_length_mm": 0.0175,
    "material": "Gd2O2S",
}
BEAM = {"polarization_fraction": 0.99, "polarization_normal": (0.0, 1.0, 0.0)}
ENERGY_EV = np.array([9400.0, 9450.0, 9500.0, 9550.0, 9600.0])
# Two shots with different spectra, hence different mean wavelengths.
PHOTONS = np.array([[1.0e9, 3.0e9, 4.0e9, 1.0e9, 0.0], [0.0, 0.5e9, 2.0e9, 4.0e9, 3.0e9]])
IMAGES = [
    np.arange(N_SLOW * N_FAST, dtype=np.int32).reshape(N_SLOW, N_FAST) % 50 + 10,
    np.full((N_SLOW, N_FAST), 12, dtype=np.int32),
]
# Pixel values at the trusted limits and just beyond them, to check how dxtbx masks.
TRUSTED_PROBES = {(0, 0): -21, (0, 1): -20, (0, 2): 60000, (0, 3): 60001}
for (slow, fast), value in TRUSTED_PROBES.items():
    IMAGES[1][slow, fast] = value


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "shard_00000.h5"
    write_shard(path, IMAGES, [0, 1], ENERGY_EV, PHOTONS, DETECTOR, BEAM, "nopsf")
    return str(path)


@pytest.fixture(scope="module")
def experiments(shard_path):
    return ExperimentListFactory.from_filenames([shard_path])


def weighted_wavelength(photons):
    """hc over the photon-weighted mean energy, as dxtbx's Spectrum defines the mean wavelength."""
    return factor_ev_angstrom / np.average(ENERGY_EV, weights=photons)


def test_entry_point_is_registered_under_formathdf5():
    registered = Registry.get_format_class_index().get("FormatSPREADShard")
    assert registered is not None, "package not installed: run scripts/setup.sh (pip install -e .)"
    load_class, base_classes = registered
    assert base_classes == ("FormatHDF5",)
    assert load_class() is FormatSPREADShard


def test_dxtbx_picks_the_format(shard_path):
    assert Registry.get_format_class_for_file(shard_path) is FormatSPREADShard
    assert isinstance(dxtbx.load(shard_path), FormatSPREADShard)


def test_one_still_experiment_per_shot(experiments):
    assert len(experiments) == 2
    for i, experiment in enumerate(experiments):
        assert experiment.scan is None and experiment.goniometer is None
        assert list(experiment.imageset.indices()) == [i]


def test_each_shot_has_its_spectrum_and_wavelength(shard_path, experiments):
    imageset = FormatSPREADShard.get_imageset([shard_path])
    assert len(imageset) == 2
    for i, experiment in enumerate(experiments):
        for spectrum in (imageset.get_spectrum(i), experiment.imageset.get_spectrum(0)):
            np.testing.assert_array_equal(spectrum.get_energies_eV(), ENERGY_EV)
            np.testing.assert_array_equal(spectrum.get_weights(), PHOTONS[i])
        wavelength = weighted_wavelength(PHOTONS[i])
        assert imageset.get_beam(i).get_wavelength() == pytest.approx(wavelength, rel=1e-12)
        assert experiment.beam.get_wavelength() == pytest.approx(wavelength, rel=1e-12)
        assert experiment.beam.get_s0() == pytest.approx((0.0, 0.0, -1.0 / wavelength))
    assert experiments[0].beam.get_wavelength() != pytest.approx(experiments[1].beam.get_wavelength())


def test_beam_polarization(experiments):
    beam = experiments[0].beam
    assert beam.get_polarization_fraction() == pytest.approx(BEAM["polarization_fraction"])
    assert beam.get_polarization_normal() == pytest.approx(BEAM["polarization_normal"])


def test_raw_data(experiments):
    for i, experiment in enumerate(experiments):
        raw = experiment.imageset.get_raw_data(0)[0]
        assert raw.focus() == (N_SLOW, N_FAST)
        np.testing.assert_array_equal(raw.as_numpy_array(), IMAGES[i])


def test_detector_geometry(experiments):
    panel = experiments[0].detector[0]
    assert len(experiments[0].detector) == 1
    assert panel.get_fast_axis() == pytest.approx((1.0, 0.0, 0.0))
    assert panel.get_slow_axis() == pytest.approx((0.0, -1.0, 0.0))
    assert panel.get_image_size() == (N_FAST, N_SLOW)
    assert panel.get_pixel_size() == pytest.approx((PIXEL_SIZE_MM, PIXEL_SIZE_MM))
    assert panel.get_distance() == pytest.approx(DETECTOR["distance_mm"])
    for experiment in experiments:
        s0 = experiment.beam.get_s0()
        assert experiment.detector[0].get_beam_centre(s0) == pytest.approx(BEAM_CENTER_MM)


def test_sensor_model_has_no_parallax_correction(experiments):
    panel = experiments[0].detector[0]
    assert panel.get_px_mm_strategy().name() == "SimplePxMmStrategy"
    assert panel.get_thickness() == pytest.approx(DETECTOR["thickness_mm"])
    assert panel.get_material() == DETECTOR["material"]
    assert panel.get_mu() == pytest.approx(1.0 / DETECTOR["attenuation_length_mm"])
    # Without parallax correction, millimetres and pixels differ by the pixel size only.
    assert panel.pixel_to_millimeter((10.0, 20.0)) == pytest.approx((1.0, 2.0))


def test_trusted_range_is_inclusive(experiments):
    mask = experiments[1].imageset.get_mask(0)[0]
    assert {pixel: mask[pixel] for pixel in TRUSTED_PROBES} == {
        (0, 0): False, (0, 1): True, (0, 2): True, (0, 3): False}


def test_corrected_data_is_photons(experiments):
    corrected = experiments[1].imageset.get_corrected_data(0)[0]
    expected = (IMAGES[1] - DETECTOR["adc_offset_adu"]) / DETECTOR["gain_adu_per_photon"]
    np.testing.assert_allclose(corrected.as_numpy_array(), expected)


def test_dials_import_writes_two_stills(shard_path, tmp_path):
    # The /usr/bin/dials.* launchers run /usr/bin/python3, which does not see this package's entry
    # point; run the same program with the test interpreter instead.
    result = subprocess.run(
        [sys.executable, "-m", "dials.command_line.dials_import", shard_path, "output.experiments=imported.expt"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "num stills: 2" in result.stdout

    imported = ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"))
    assert len(imported) == 2
    for i, experiment in enumerate(imported):
        assert list(experiment.imageset.indices()) == [i]
        assert experiment.imageset.get_format_class() is FormatSPREADShard
        assert experiment.beam.get_wavelength() == pytest.approx(weighted_wavelength(PHOTONS[i]), rel=1e-12)
        np.testing.assert_array_equal(experiment.imageset.get_spectrum(0).get_weights(), PHOTONS[i])
    with open(tmp_path / "imported.expt") as stream:
        assert {image for imageset in json.load(stream)["imageset"] for image in imageset["images"]} == {shard_path}


def test_truncated_shard(shard_path, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(open(shard_path, "rb").read()[: os.path.getsize(shard_path) // 2])
    # HDF5 refuses to open it at all, so dxtbx cannot tell it is a shard; understand() must say no
    # rather than raise. (dials.import still shows a traceback for it: dxtbx 3.12's own
    # FormatHDF5PAL.understand, asked before ours, does not catch the OSError.)
    assert FormatSPREADShard.understand(str(truncated)) is False
    with pytest.raises(IncorrectFormatError):
        FormatSPREADShard(str(truncated))
    # Our reader names the file and the problem on one line.
    with pytest.raises(ShardFormatError, match=rf"^{re.escape(str(truncated))}: not a readable HDF5 file \(.*truncated.*\)$"):
        read_shard_metadata(truncated)


def test_broken_shard_is_one_line_sorry(shard_path, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(open(shard_path, "rb").read())
    with h5py.File(broken, "a") as h5:
        del h5["spectrum/photons"]

    with pytest.raises(ShardFormatError, match=r"broken\.h5: missing dataset /spectrum/photons$") as caught:
        dxtbx.load(str(broken))
    assert isinstance(caught.value, Sorry)

    result = subprocess.run(
        [sys.executable, "-m", "dials.command_line.dials_import", str(broken)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(f"{broken}: missing dataset /spectrum/photons")


def test_shot_without_photons_is_one_line_sorry(tmp_path):
    path = tmp_path / "dark.h5"
    write_shard(path, IMAGES, [0, 1], ENERGY_EV, [PHOTONS[0], np.zeros_like(PHOTONS[1])], DETECTOR, BEAM, "nopsf")
    with pytest.raises(Sorry, match=r"dark\.h5: shot 1 has no photons in its spectrum$"):
        dxtbx.load(str(path))
