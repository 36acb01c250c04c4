"""The HDF5 shard layout (docs/design.md): round trip, validation errors, atomic writing."""

import os
import pickle

import h5py
import numpy as np
import pytest

from xfel_spread.io.shard import (
    GZIP_LEVEL,
    ShardFormatError,
    read_shard_image,
    read_shard_metadata,
    read_shard_spectrum,
    write_shard,
)

N_SLOW, N_FAST = 24, 32  # not square, so a fast/slow swap cannot pass unnoticed
DETECTOR = {
    "pixel_size_mm": 0.089,
    "distance_mm": 141.7,
    "n_fast": N_FAST,
    "n_slow": N_SLOW,
    "beam_center_mm": (1.4685, 1.1125),
    "gain_adu_per_photon": 1.0,
    "adc_offset_adu": 10.0,
    "trusted_range": (-100.0, 65505.0),
    "thickness_mm": 0.05,
    "attenuation_length_mm": 0.0175,
    "material": "Gd2O2S",
}
BEAM = {"polarization_fraction": 1.0, "polarization_normal": (0.0, 1.0, 0.0)}
ENERGY_EV = np.linspace(9450.0, 9550.0, 6)
PHOTONS = np.array([[1.0, 5.0, 9.0, 4.0, 2.0, 0.5], [0.0, 0.0, 3.0, 8.0, 8.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
SHOT_INDEX = np.array([300, 301, 302])


def images(n_shots=len(SHOT_INDEX)):
    """Distinct int32 images: ADC offset plus noise, one bright pixel, a value beyond int16."""
    rng = np.random.default_rng(0)
    for i in range(n_shots):
        image = (10 + rng.poisson(2.0, (N_SLOW, N_FAST))).astype(np.int32)
        image[i, 2 * i] = 70000 + i
        yield image


def write(path, images_adu=None):
    write_shard(path, images() if images_adu is None else images_adu, SHOT_INDEX, ENERGY_EV, PHOTONS,
                DETECTOR, BEAM, "nopsf")


def test_round_trip(tmp_path):
    path = tmp_path / "shard_00003.h5"
    write(path)

    metadata = read_shard_metadata(path)
    assert metadata.dataset == "nopsf"
    assert metadata.n_shots == 3
    np.testing.assert_array_equal(metadata.shot_index, SHOT_INDEX)
    np.testing.assert_array_equal(metadata.energy_ev, ENERGY_EV)
    np.testing.assert_array_equal(metadata.photons_per_channel, PHOTONS)
    assert metadata.detector == DETECTOR
    assert metadata.beam == BEAM
    for i, expected in enumerate(images()):
        image = read_shard_image(path, i)
        assert image.dtype == np.int32
        np.testing.assert_array_equal(image, expected)
        energy_ev, photons = read_shard_spectrum(path, i)
        np.testing.assert_array_equal(energy_ev, ENERGY_EV)
        np.testing.assert_array_equal(photons, PHOTONS[i])


def test_layout_matches_design(tmp_path):
    path = tmp_path / "shard.h5"
    write(path)
    with h5py.File(path, "r") as h5:
        assert dict(h5.attrs) == {"format": "xfel_spread.shard", "format_version": 1, "dataset": "nopsf",
                                  "n_shots": 3}
        data = h5["data"]
        assert (data.dtype, data.shape, data.chunks) == (np.int32, (3, N_SLOW, N_FAST), (1, N_SLOW, N_FAST))
        assert (data.compression, data.compression_opts, data.shuffle) == ("gzip", GZIP_LEVEL, True)
        assert h5["shot_index"].dtype == np.int64
        assert h5["spectrum/photons"].shape == (3, len(ENERGY_EV))


def test_truncated_file_gives_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "shard.h5"
    write(path)
    os.truncate(path, os.path.getsize(path) // 2)

    for read in (read_shard_metadata, lambda p: read_shard_image(p, 0), lambda p: read_shard_spectrum(p, 0)):
        with pytest.raises(ShardFormatError) as caught:
            read(path)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: not a readable HDF5 file")
        assert "truncated" in message


def test_corrupt_image_chunk_gives_one_line_error(tmp_path):
    path = tmp_path / "shard.h5"
    write(path)
    with h5py.File(path, "r") as h5:
        chunk = h5["data"].id.get_chunk_info(1)
    with open(path, "r+b") as stream:
        stream.seek(chunk.byte_offset)
        stream.write(b"\xff" * chunk.size)

    np.testing.assert_array_equal(read_shard_image(path, 0), next(images()))
    with pytest.raises(ShardFormatError, match=r"^\S+shard\.h5: corrupt shard \(.*\)$"):
        read_shard_image(path, 1)


def test_error_survives_pickling(tmp_path):
    error = ShardFormatError(tmp_path / "shard.h5", "missing dataset /data")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.path) == (ShardFormatError, str(error), error.path)


def test_missing_dataset(tmp_path):
    path = tmp_path / "shard.h5"
    write(path)
    with h5py.File(path, "a") as h5:
        del h5["spectrum/photons"]
    with pytest.raises(ShardFormatError, match=r"shard\.h5: missing dataset /spectrum/photons$"):
        read_shard_metadata(path)


def test_files_that_are_not_shards(tmp_path):
    other_hdf5 = tmp_path / "other.h5"
    with h5py.File(other_hdf5, "w") as h5:
        h5["data"] = np.zeros((1, 2, 2), np.int32)
    with pytest.raises(ShardFormatError, match=r"other\.h5: not a shard \(root attribute format=None"):
        read_shard_metadata(other_hdf5)

    text = tmp_path / "notes.txt"
    text.write_text("not HDF5\n")
    with pytest.raises(ShardFormatError, match=r"notes\.txt: not a readable HDF5 file"):
        read_shard_image(text, 0)


def test_shot_out_of_range(tmp_path):
    path = tmp_path / "shard.h5"
    write(path)
    with pytest.raises(IndexError, match="shot 3 out of range"):
        read_shard_image(path, 3)


def test_exception_while_writing_leaves_no_file(tmp_path):
    def images_then_crash():
        yield next(images())
        raise RuntimeError("simulator crashed")

    with pytest.raises(RuntimeError, match="simulator crashed"):
        write(tmp_path / "shard.h5", images_then_crash())
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_shard(tmp_path):
    path = tmp_path / "shard.h5"
    write(path)
    with pytest.raises(ValueError, match="got 2 images for 3 shots"):
        write(path, images(n_shots=2))
    assert list(tmp_path.iterdir()) == [path]
    np.testing.assert_array_equal(read_shard_image(path, 2), list(images())[2])


@pytest.mark.parametrize(
    "bad_image, error",
    [
        (np.zeros((N_SLOW, N_FAST), np.int64), TypeError),
        (np.zeros((N_FAST, N_SLOW), np.int32), ValueError),
    ],
)
def test_image_of_wrong_type_or_shape_is_refused(tmp_path, bad_image, error):
    with pytest.raises(error):
        write(tmp_path / "shard.h5", [bad_image])
    assert list(tmp_path.iterdir()) == []


def test_incomplete_detector_metadata_is_refused(tmp_path):
    detector = {key: value for key, value in DETECTOR.items() if key != "material"}
    with pytest.raises(ValueError, match=r"missing \['material'\]"):
        write_shard(tmp_path / "shard.h5", images(), SHOT_INDEX, ENERGY_EV, PHOTONS, detector, BEAM, "nopsf")
