"""Hit finding on multi-panel detectors: every pixel's radial geometry from its own panel's frame, one
profile over all panels. A panel cut into abutting 2 x 2 tiles measures as the panel it was cut from,
and per-panel gain, offset and trusted range apply to their own panel. (The real CSPAD stills through hit
finding under Snakemake: tests/test_cspad_pipeline.py.)"""

import numpy as np
import pytest

from xfel_spread.hitfind.pixels import LitPixelSettings, measure_shot
from xfel_spread.hitfind.stages import geometry_of
from xfel_spread.sim.geometry import Detector, MultiPanelDetector

WAVELENGTH_A = 1.3
BEAM = {"polarization_fraction": 0.999, "polarization_normal": (0.0, 1.0, 0.0)}
#: A 96 x 80 panel of 0.5 mm pixels 25 mm from the sample reaches q = 2.5 1/A along its short side.
PANEL = Detector(96, 80, 0.5, 25.0, (23.3, 20.1), thickness_mm=0.3, attenuation_length_mm=0.4)
SENSOR = {"gain_adu_per_photon": 2.0, "adc_offset_adu": 10.0, "trusted_range": (-50.0, 60000.0)}


def panel_attrs(detector: Detector) -> dict:
    return {"pixel_size_mm": detector.pixel_size_mm, "distance_mm": detector.distance_mm,
            "n_fast": detector.n_fast, "n_slow": detector.n_slow, "beam_center_mm": detector.beam_center_mm,
            "thickness_mm": detector.thickness_mm, "attenuation_length_mm": detector.attenuation_length_mm,
            **SENSOR}


def tile_attrs(tiles: MultiPanelDetector) -> dict:
    """The /detector attributes a tiled simulated shard would have (io.shard.PANEL_ATTRS)."""
    return {**panel_attrs(PANEL), "n_fast": tiles[0].n_fast, "n_slow": tiles[0].n_slow, "n_panels": len(tiles),
            "panel_origin_mm": [list(tile.origin_mm) for tile in tiles.panels],
            "panel_fast_axis": [list(tile.fast_axis) for tile in tiles.panels],
            "panel_slow_axis": [list(tile.slow_axis) for tile in tiles.panels]}


def cut(image: np.ndarray, n_fast_tiles: int = 2, n_slow_tiles: int = 2) -> np.ndarray:
    """The panel image as the tiles' (n_panels, n_slow, n_fast), tiles in MultiPanelDetector.split's order."""
    return np.stack([tile for row in np.split(image, n_slow_tiles, axis=0) for tile in np.split(row, n_fast_tiles, axis=1)])


def synthetic_image(geometry, seed: int = 1) -> np.ndarray:
    """ADU: a water-like ring at q = 2 1/A over a flat floor, Poisson noise, and 20 bright spots."""
    rng = np.random.default_rng(seed)
    q = 4 * np.pi * np.sin(geometry.bin_two_theta_rad[geometry.bin_index] / 2) / WAVELENGTH_A
    mean_photons = (5.0 + 30.0 * np.exp(-0.5 * ((q - 2.0) / 0.25) ** 2)) * geometry.relative_factor
    photons = rng.poisson(mean_photons).astype(float)
    photons[rng.choice(photons.size, 20, replace=False)] += 400.0
    return np.round(photons * SENSOR["gain_adu_per_photon"] + SENSOR["adc_offset_adu"]).astype(np.int32).reshape(
        geometry.shape)


def test_a_panel_cut_into_tiles_measures_as_the_panel():
    single = geometry_of(panel_attrs(PANEL), BEAM, 2.0)
    tiles = MultiPanelDetector.split(PANEL, 2, 2)
    tiled = geometry_of(tile_attrs(tiles), BEAM, 2.0)
    assert single.shape == (80, 96) and tiled.shape == (4, 40, 48)
    # Pixel for pixel the same bins and collection factors; bins the same to rounding.
    order = cut(np.arange(single.n_pixels).reshape(single.shape)).reshape(-1)
    assert np.array_equal(tiled.bin_index, single.bin_index[order])
    assert np.allclose(tiled.relative_factor, single.relative_factor[order], rtol=1e-12)
    assert np.array_equal(tiled.pixels_per_bin, single.pixels_per_bin)
    assert np.allclose(tiled.bin_two_theta_rad, single.bin_two_theta_rad, rtol=1e-12, equal_nan=True)
    assert tiled.normal_pixel_factor == pytest.approx(single.normal_pixel_factor, rel=1e-12)

    image = synthetic_image(single)
    settings = LitPixelSettings()
    panel, panel_photons, _ = measure_shot(image, panel_attrs(PANEL), single, settings, WAVELENGTH_A)
    tiled_shot, tiled_photons, _ = measure_shot(cut(image), tile_attrs(tiles), tiled, settings, WAVELENGTH_A)
    assert np.array_equal(tiled_photons, panel_photons[order])
    assert tiled_shot.lit_pixels == panel.lit_pixels >= 20
    assert tiled_shot.photons == pytest.approx(panel.photons, rel=1e-12)
    assert tiled_shot.trusted_pixels == panel.trusted_pixels == single.n_pixels
    assert np.allclose(tiled_shot.profile, panel.profile, rtol=1e-9, equal_nan=True)
    assert np.isfinite(panel.ring.q_inv_a) and abs(panel.ring.q_inv_a - 2.0) < 0.1
    assert tiled_shot.ring.q_inv_a == pytest.approx(panel.ring.q_inv_a, rel=1e-9)


def test_per_panel_gain_offset_and_trusted_range_apply_to_their_own_panel():
    from xfel_spread.hitfind.pixels import photons_from_adu, trusted_mask

    image = np.full((2, 3, 4), 110, dtype=np.int32)
    image[1, 0, 0] = 5000
    detector = {"adc_offset_adu": [10.0, 0.0], "gain_adu_per_photon": [1.0, 2.0],
                "trusted_range": [(-1.0, 1e6), (-1.0, 1000.0)]}
    photons = photons_from_adu(image, detector)
    assert np.all(photons[0] == 100.0) and photons[1, 1, 1] == 55.0
    trusted = trusted_mask(image, detector)
    assert trusted.sum() == 23 and not trusted[1, 0, 0]


# The three CSPAD stills through hit finding (measure, threshold, powder) under Snakemake: tests/test_cspad_pipeline.py.
