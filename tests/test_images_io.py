"""xfel_spread.io.images on the shared data: listing images from files and globs, the spectra sources,
masks. Nothing is copied; every test reads ../shared/data."""

import gzip
import pickle
import shutil

import h5py
import numpy as np
import pytest
from conftest import CSPAD_DIR, NANOBRAGG_DIR, RAYONIX_DIR

from xfel_spread.io.images import (
    HC_EV_A,
    ImageInputError,
    Shot,
    check_images,
    detector_shapes,
    expand_images,
    format_class_for,
    list_images,
    match_table_spectra,
    read_mask,
    read_spectra_table,
    shard_shots,
    shot_spectra,
)



def test_a_glob_lists_every_nanobragg_image_once_in_order():
    shots = list_images([str(NANOBRAGG_DIR / "image_*.img.gz"), str(NANOBRAGG_DIR / "image_000.img.gz")])
    assert [shot.path for shot in shots] == [str(NANOBRAGG_DIR / f"image_{i:03d}.img.gz") for i in range(8)]
    assert {shot.frame for shot in shots} == {0}


def test_relative_patterns_resolve_against_the_base_directory():
    assert expand_images(["image_00[0-2].img.gz"], base_dir=NANOBRAGG_DIR) == [
        str(NANOBRAGG_DIR / f"image_{i:03d}.img.gz") for i in range(3)]


def test_a_glob_matching_nothing_is_one_line_naming_it():
    with pytest.raises(ImageInputError, match=r"^/nowhere/\*\.cbf: matches no file$"):
        expand_images(["/nowhere/*.cbf"])
    with pytest.raises(ImageInputError, match=r"^/nowhere/x\.cbf: no such file$"):
        expand_images(["/nowhere/x.cbf"])


def test_dxtbx_names_the_format_of_each_shared_file():
    assert format_class_for(str(NANOBRAGG_DIR / "image_000.img.gz")).__name__ == "FormatSMVJHSim"
    assert format_class_for(str(next(CSPAD_DIR.glob("*.cbf")))).__name__ == "FormatCBFCspad"
    assert format_class_for(str(RAYONIX_DIR / "hit-20181213155134902.cbf")).__name__ == "FormatCBFFullStill"


def test_a_file_dxtbx_cannot_read_is_one_line_alone_and_skipped_among_many(tmp_path):
    junk = tmp_path / "junk.cbf"
    junk.write_bytes(b"not an image\n")
    with pytest.raises(ImageInputError) as error:
        check_images([str(junk)])
    assert str(error.value).startswith(f"{junk}: dxtbx cannot read it") and "\n" not in str(error.value)
    good = [str(path) for path in sorted(NANOBRAGG_DIR.glob("*.img.gz"))]
    check = check_images(good + [str(junk)], max_unreadable_fraction=0.2)
    assert set(check.formats) == set(good) and set(check.formats.values()) == {"FormatSMVJHSim"}
    assert list(check.unreadable) == [str(junk)]
    with pytest.raises(ImageInputError, match="junk.cbf: dxtbx cannot read it"):
        check_images(good + [str(junk)], max_unreadable_fraction=0.1)


def test_shards_split_the_list_without_reading_pixels():
    shots = [Shot(f"f{i}.cbf") for i in range(7)]
    shards = shard_shots(shots, 3)
    assert [len(shard) for shard in shards] == [3, 3, 1] and sum(shards, []) == shots


def test_the_nanobragg_spectra_table_is_read_as_written_and_matched_by_name():
    table = read_spectra_table(NANOBRAGG_DIR / "spectra.tsv")
    assert len(table) == 8 and all(len(energies) == 20 for energies, _ in table.values())
    energies, weights = table[("image_000.img.gz", 0)]
    assert energies[0] == pytest.approx(7106.989) and np.diff(energies) == pytest.approx(np.ones(19), abs=1e-3)
    assert weights.sum() == pytest.approx(1.0)
    shots = list_images([str(NANOBRAGG_DIR / "image_*.img.gz")])
    spectra = shot_spectra(shots, "table", NANOBRAGG_DIR / "spectra.tsv", energy_offset_ev=2.5)
    import json

    truth = json.loads((NANOBRAGG_DIR / "truth.json").read_text())["images"]
    for (energies, _weights), image in zip(spectra, truth):
        assert energies == pytest.approx(np.array(image["energies_ev"]) + 2.5, abs=1e-3)


def test_a_table_missing_a_listed_image_is_one_line(tmp_path):
    table = tmp_path / "spectra.tsv"
    lines = (NANOBRAGG_DIR / "spectra.tsv").read_text().splitlines()
    table.write_text("\n".join(line for line in lines if not line.startswith("image_003")) + "\n")
    shots = list_images([str(NANOBRAGG_DIR / "image_*.img.gz")])
    with pytest.raises(ImageInputError, match=rf"^{table}: no spectrum for .*image_003.img.gz frame 0$"):
        match_table_spectra(table, read_spectra_table(table), shots)


def test_a_malformed_table_names_the_file_and_line(tmp_path):
    table = tmp_path / "bad.tsv"
    table.write_text("image\tenergy_ev\tweight\na.cbf\t7120\t-1\n")
    with pytest.raises(ImageInputError, match=rf"^{table}: line 2: weight -1.0 is negative"):
        read_spectra_table(table)
    table.write_text("image\tenergy\n")
    with pytest.raises(ImageInputError, match="lacks column"):
        read_spectra_table(table)


def test_monochromatic_spectra_are_one_channel_at_the_beam_wavelength():
    shots = list_images([str(CSPAD_DIR / "*.cbf")])
    spectra = shot_spectra(shots, "monochromatic", energy_offset_ev=-1.0)
    assert len(spectra) == 3
    for (energies, weights), shot in zip(spectra, shots):
        wavelength = format_class_for(shot.path).get_instance(shot.path).get_beam().get_wavelength()
        assert energies == pytest.approx([HC_EV_A / wavelength - 1.0]) and list(weights) == [1.0]


def test_imageset_spectra_of_a_format_without_one_is_one_line():
    shots = list_images([str(RAYONIX_DIR / "*.cbf")])
    with pytest.raises(ImageInputError, match=r"hit-20181213155134902.cbf: frame 0 has no spectrum \(spectra: imageset\)"):
        shot_spectra(shots, "imageset")


def test_the_rayonix_mask_pickle_fits_its_detector_and_a_wrong_shape_is_one_line(tmp_path):
    path = str(RAYONIX_DIR / "hit-20181213155134902.cbf")
    detector = format_class_for(path).get_instance(path).get_detector()
    mask = read_mask(RAYONIX_DIR / "mask_rayonix340mx_4x4.pickle", detector_shapes(detector))
    assert len(mask) == 1 and mask[0].shape == (1920, 1920) and mask[0].dtype == bool
    assert (~mask[0]).sum() == 6073
    cspad = str(next(CSPAD_DIR.glob("*.cbf")))
    cspad_shapes = detector_shapes(format_class_for(cspad).get_instance(cspad).get_detector())
    with pytest.raises(ImageInputError, match=r"mask of 1 panel\(s\) of 1920 x 1920 does not fit the detector's 64 "
                                              r"panel\(s\) of 185 x 194$"):
        read_mask(RAYONIX_DIR / "mask_rayonix340mx_4x4.pickle", cspad_shapes)


def test_hdf5_masks_dials_style_and_nexus_pixel_mask(tmp_path):
    trusted = np.ones((2, 4, 5), dtype=bool)
    trusted[1, 2, 3] = False
    with h5py.File(tmp_path / "mask.h5", "w") as h5:
        h5["mask"] = trusted
    panels = read_mask(tmp_path / "mask.h5", [(4, 5), (4, 5)])
    assert np.array_equal(np.array(panels), trusted)
    with h5py.File(tmp_path / "nexus.h5", "w") as h5:
        h5["entry/instrument/detector/pixel_mask"] = (~trusted[1]).astype(np.int32)
    assert np.array_equal(read_mask(tmp_path / "nexus.h5", [(4, 5)])[0], trusted[1])
    with pytest.raises(ImageInputError, match="does not fit"):
        read_mask(tmp_path / "nexus.h5", [(5, 4)])
    (tmp_path / "junk.pickle").write_bytes(pickle.dumps("text"))
    with pytest.raises(ImageInputError, match="junk.pickle: a mask pickle holds one 2-D flex.bool per panel"):
        read_mask(tmp_path / "junk.pickle")


def test_a_multi_image_container_counts_its_frames_through_dxtbx(tmp_path):
    # A copy of one nanoBragg image under another name is still one image (only container suffixes are opened).
    copy = tmp_path / "one.img"
    with gzip.open(NANOBRAGG_DIR / "image_000.img.gz") as source, open(copy, "wb") as target:
        shutil.copyfileobj(source, target)
    assert list_images([str(copy)]) == [Shot(str(copy), 0)]
