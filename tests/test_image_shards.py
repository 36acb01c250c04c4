"""Image-list shards (xfel_spread.io.images): a shard of images from elsewhere holds their files, frames
and spectra, not their pixels, and dxtbx reads it through FormatSPREADShard as one multi-image still file
with the listed files' own pixels and detector, each shot's spectrum and the mask."""

import json

import numpy as np
import pytest
from conftest import CSPAD_DIR, NANOBRAGG_DIR, RAYONIX_DIR

from xfel_spread.io.images import (
    HC_EV_A,
    ImageInputError,
    Shot,
    check_spectra_on_grid,
    format_class_for,
    list_images,
    make_image_list_shard,
    read_image_list_shard,
)



def experiments_of(path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames([str(path)])


def test_nanobragg_shard_gives_dxtbx_the_files_pixels_and_the_tables_spectra(tmp_path):
    shots = list_images([str(NANOBRAGG_DIR / "image_00[2-4].img.gz")])
    shard = make_image_list_shard(tmp_path / "shard_00000.h5", shots, 2, "table", str(NANOBRAGG_DIR / "spectra.tsv"), 1.5)
    assert shard.n_shots == 3 and list(shard.shot_index) == [2, 3, 4] and shard.unreadable == ["", "", ""]
    assert (tmp_path / "shard_00000.h5").stat().st_size < 100_000  # no pixels
    experiments = experiments_of(tmp_path / "shard_00000.h5")
    assert len(experiments) == 3
    truth = json.loads((NANOBRAGG_DIR / "truth.json").read_text())["images"]
    for i, (experiment, shot) in enumerate(zip(experiments, shots)):
        imageset = experiment.imageset
        assert imageset.get_format_class().__name__ == "FormatSPREADShard" and imageset.indices()[0] == i
        original = format_class_for(shot.path).get_instance(shot.path)
        assert np.array_equal(imageset.get_raw_data(0)[0].as_numpy_array(), original.get_raw_data().as_numpy_array())
        assert experiment.detector[0].get_origin() == pytest.approx(original.get_detector()[0].get_origin())
        spectrum = imageset.get_spectrum(0)
        # One grid per shard (every shot's channels); each shot weighs only its own 20.
        assert np.array(spectrum.get_energies_eV()) == pytest.approx(shard.energy_ev) and len(shard.energy_ev) == 60
        weights = np.array(spectrum.get_weights())
        energies = np.array(truth[i + 2]["energies_ev"]) + 1.5
        assert np.array(spectrum.get_energies_eV())[weights > 0] == pytest.approx(energies, abs=1e-3)
        assert experiment.beam.get_wavelength() == pytest.approx(HC_EV_A / energies.mean(), rel=1e-7)


def test_the_rayonix_mask_becomes_the_images_static_mask(tmp_path):
    shots = list_images([str(RAYONIX_DIR / "*.cbf")])
    mask = str(RAYONIX_DIR / "mask_rayonix340mx_4x4.pickle")
    make_image_list_shard(tmp_path / "shard.h5", shots, 0, "monochromatic", mask=mask)
    experiment = experiments_of(tmp_path / "shard.h5")[0]
    assert experiment.imageset.get_format_class().__name__ == "FormatSPREADShard"
    trusted = experiment.imageset.get_mask(0)[0].as_numpy_array()
    import pickle

    with open(mask, "rb") as handle:
        expected = pickle.load(handle)[0].as_numpy_array()
    assert not trusted[~expected].any()  # every pixel the mask rejects is untrusted
    assert experiment.beam.get_wavelength() == pytest.approx(1.3038, abs=1e-4)


def test_a_cspad_shard_keeps_the_64_panels_and_a_bad_mask_shape_is_one_line(tmp_path):
    shots = list_images([str(CSPAD_DIR / "*.cbf")])
    make_image_list_shard(tmp_path / "shard.h5", shots, 0, "monochromatic")
    experiments = experiments_of(tmp_path / "shard.h5")
    assert len(experiments) == 3 and len(experiments[0].detector) == 64
    assert len(experiments[1].imageset.get_raw_data(0)) == 64
    with pytest.raises(ImageInputError, match="mask_rayonix340mx_4x4.pickle: mask of 1 panel"):
        make_image_list_shard(tmp_path / "bad.h5", shots, 0, "monochromatic",
                              mask=str(RAYONIX_DIR / "mask_rayonix340mx_4x4.pickle"))


def test_an_unreadable_file_is_recorded_in_the_shard_and_the_others_kept(tmp_path):
    junk = tmp_path / "image_999.img.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    shots = list_images([str(NANOBRAGG_DIR / "image_00[0-3].img.gz"), str(junk)])
    shard = make_image_list_shard(tmp_path / "shard.h5", shots, 0, "monochromatic", max_unreadable_fraction=0.25)
    assert [bool(reason) for reason in shard.unreadable] == [False] * 4 + [True]
    assert shard.unreadable[4].startswith(f"{junk}: dxtbx cannot read it")
    assert read_image_list_shard(tmp_path / "shard.h5").unreadable == shard.unreadable
    with pytest.raises(ImageInputError, match="image_999.img.gz: dxtbx cannot read it"):
        make_image_list_shard(tmp_path / "shard2.h5", shots, 0, "monochromatic", max_unreadable_fraction=0.1)


def test_the_shard_readers_serve_an_image_list_like_a_simulated_shard(tmp_path):
    from xfel_spread.io.shard import ShardFormatError, read_shard_image, read_shard_metadata, read_shard_spectrum

    shots = list_images([str(NANOBRAGG_DIR / "image_00[0-1].img.gz")])
    shard = make_image_list_shard(tmp_path / "shard.h5", shots, 10, "table", str(NANOBRAGG_DIR / "spectra.tsv"))
    metadata = read_shard_metadata(tmp_path / "shard.h5")
    assert metadata.n_shots == 2 and list(metadata.shot_index) == [10, 11]
    assert metadata.detector["n_fast"] == metadata.detector["n_slow"] == 1920
    assert metadata.detector["pixel_size_mm"] == pytest.approx(0.176)
    assert metadata.detector["distance_mm"] == pytest.approx(141.7)
    assert metadata.detector["beam_center_mm"] == pytest.approx((169.224, 169.048))
    image = read_shard_image(tmp_path / "shard.h5", 1)
    original = format_class_for(shots[1].path).get_instance(shots[1].path).get_raw_data().as_numpy_array()
    assert image.dtype == np.int32 and np.array_equal(image, original)
    energies, weights = read_shard_spectrum(tmp_path / "shard.h5", 0)
    assert np.array_equal(energies, shard.energy_ev) and weights.sum() == pytest.approx(1.0)
    cspad = list_images([str(CSPAD_DIR / "*.cbf")])
    make_image_list_shard(tmp_path / "cspad.h5", cspad, 0, "monochromatic")
    with pytest.raises(ShardFormatError, match=r"cspad.h5: its images' detector has 64 panels"):
        read_shard_metadata(tmp_path / "cspad.h5")


def test_the_mask_of_an_image_list_reaches_the_shard_readers(tmp_path):
    import pickle

    from xfel_spread.io.shard import read_shard_mask

    mask = RAYONIX_DIR / "mask_rayonix340mx_4x4.pickle"
    make_image_list_shard(tmp_path / "masked.h5", list_images([str(RAYONIX_DIR / "*.cbf")]), 0, "monochromatic",
                          mask=str(mask))
    with open(mask, "rb") as handle:
        expected = pickle.load(handle)[0].as_numpy_array()
    assert np.array_equal(read_shard_mask(tmp_path / "masked.h5"), expected)
    make_image_list_shard(tmp_path / "plain.h5", list_images([str(RAYONIX_DIR / "*.cbf")]), 0, "monochromatic")
    assert read_shard_mask(tmp_path / "plain.h5") is None


#: The default structure_factors channels: 7070.5, 7071.5, ..., 7169.5 eV.
DEFAULT_GRID = 7070.5 + np.arange(100.0)


def spectrum(*energies):
    return np.array(energies, dtype=float), np.ones(len(energies))


def test_spectra_on_the_channel_grid_pass_and_one_outside_is_one_line_naming_shard_image_ranges_and_keys():
    shots = [Shot("a.cbf", 0), Shot("b.h5", 3)]
    check_spectra_on_grid("s.h5", shots, [spectrum(7080.2, 7100.0), spectrum(7070.5, 7169.5)], DEFAULT_GRID)
    check_spectra_on_grid("s.h5", shots, [None, spectrum(7090.0)], DEFAULT_GRID)  # an unreadable shot has none
    with pytest.raises(ImageInputError) as refusal:
        check_spectra_on_grid("s.h5", shots, [spectrum(7080.0), spectrum(9495.0, 9505.0)], DEFAULT_GRID)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith("s.h5: b.h5 frame 3: spectrum at 9495.000-9505.000 eV (the shard's spectra "
                              "7080.000-9505.000 eV) lies outside the structure-factor channel grid 7070.500-7169.500 eV")
    assert "structure_factors.channel_start_ev, channel_step_ev or n_channels" in message


def test_the_grid_check_allows_1e6_ev_beyond_either_edge_and_no_more():
    shots = [Shot("a.cbf", 0)]
    check_spectra_on_grid("s.h5", shots, [spectrum(7070.5 - 0.9e-6, 7169.5 + 0.9e-6)], DEFAULT_GRID)
    for energy in (7070.5 - 2e-6, 7169.5 + 2e-6):
        with pytest.raises(ImageInputError, match="lies outside"):
            check_spectra_on_grid("s.h5", shots, [spectrum(energy)], DEFAULT_GRID)


def image_shard_command(tmp_path, images, spectra, grid=None, **input_settings):
    """(exit status, stderr, output path) of ``python -m xfel_spread.cli.images shard`` run in-process."""
    import contextlib
    import io

    import yaml

    from xfel_spread.cli.images import main

    settings = tmp_path / "images.yaml"
    settings.write_text(yaml.safe_dump({"input": {"source": "images", "images": [images], "spectra": spectra,
                                                  **input_settings}}))
    output = tmp_path / "shard_00000.h5"
    argv = ["shard", "--config", str(settings), "--image", images, "--shots", "0", "2", "--output", str(output)]
    argv += ["--channel-grid", *map(str, grid)] if grid else []
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stderr.getvalue(), output


def test_the_image_shard_command_refuses_spectra_off_the_grid_in_one_line_and_writes_nothing(tmp_path):
    """The CSPAD stills (one channel each at the beam's energy, far above the default grid's Fe K edge) are
    refused when a grid-using stage runs (--channel-grid) and made when none does (no option)."""
    images = str(CSPAD_DIR / "*.cbf")
    status, stderr, output = image_shard_command(tmp_path, images, "monochromatic", grid=(7070.5, 1.0, 100))
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1, stderr
    assert f"{output}: " in lines[0] and "lies outside the structure-factor channel grid 7070.500-7169.500 eV" in lines[0]
    assert "structure_factors.channel_start_ev" in lines[0]
    assert not output.exists() and list(tmp_path.iterdir()) == [tmp_path / "images.yaml"]
    status, stderr, output = image_shard_command(tmp_path, images, "monochromatic")
    assert status == 0 and output.exists(), stderr


def test_nanobraggs_spectra_lie_on_the_default_grid(tmp_path):
    images = str(NANOBRAGG_DIR / "image_00[0-1].img.gz")
    status, stderr, output = image_shard_command(tmp_path, images, "table", grid=(7070.5, 1.0, 100),
                                                 spectra_table=str(NANOBRAGG_DIR / "spectra.tsv"))
    assert status == 0 and output.exists(), stderr

