"""SASE spectra (sim.spectrum): normalisation, statistics, determinism; recorded-spectrum reader; rebinning a
spectrum at its own energies onto the structure_factors channel grid."""

import math

import numpy as np
import pytest
from sim_fixtures import LY99_ENERGIES_EV

from xfel_spread.sim.structure_factors import channel_energies
from xfel_spread.sim.spectrum import (
    FWHM_TO_SIGMA,
    SaseModel,
    SpectrumFileError,
    SpectrumGridError,
    read_recorded_spectra,
    rebin_spectrum,
    sase_spectrum,
)

N_SHOTS = 1000


@pytest.fixture(scope="module")
def many_shots():
    model = SaseModel()
    return model, np.stack([sase_spectrum(model, LY99_ENERGIES_EV, np.random.default_rng(seed)) for seed in range(N_SHOTS)])


def test_sase_spectrum_total_sign_and_determinism(many_shots):
    model, spectra = many_shots
    assert spectra.shape == (N_SHOTS, 100)
    assert np.abs(spectra.sum(axis=1) / model.total_photons - 1).max() < 1e-9
    assert spectra.min() >= 0
    again = sase_spectrum(model, LY99_ENERGIES_EV, np.random.default_rng(7))
    assert np.array_equal(again, spectra[7])
    assert not np.allclose(spectra[7], spectra[8])


def test_sase_centroid_statistics(many_shots):
    model, spectra = many_shots
    centroid = spectra @ LY99_ENERGIES_EV / spectra.sum(axis=1)
    # Centroid = envelope centre (jitter 3 eV) + exponentially weighted mean of 30 modes drawn from
    # the envelope (sigma 25 eV / 2.355): E[sum w^2 / (sum w)^2] = 2 / (n + 1) for exponential weights.
    envelope_sigma = model.envelope_fwhm_ev * FWHM_TO_SIGMA
    expected_sd = math.sqrt(model.center_jitter_ev ** 2 + envelope_sigma ** 2 * 2 / (model.n_modes + 1))
    assert expected_sd == pytest.approx(4.03, abs=0.01)
    # Measured over 1000 shots: mean 7120.03 eV, standard deviation 3.96 eV.
    assert abs(centroid.mean() - model.envelope_center_ev) < 3 * expected_sd / math.sqrt(N_SHOTS)
    assert centroid.std() == pytest.approx(expected_sd, rel=0.1)
    assert np.all(np.abs(centroid - model.envelope_center_ev) < 3 * math.hypot(model.center_jitter_ev, envelope_sigma))


def test_sase_spectra_are_spiky(many_shots):
    _, spectra = many_shots
    peak_to_mean = spectra.max(axis=1) / spectra.mean(axis=1)
    local_maxima = (np.diff(np.sign(np.diff(spectra, axis=1)), axis=1) < 0).sum(axis=1)
    # A smooth Gaussian envelope of FWHM 25 eV on these channels peaks at 3.7 x the mean, with one
    # maximum. Measured SASE: peak/mean 4.9-19 (5th percentile 7.1), 3-15 local maxima (5th percentile 7).
    smooth = np.exp(-0.5 * ((LY99_ENERGIES_EV - 7120.0) / (25.0 * FWHM_TO_SIGMA)) ** 2)
    assert smooth.max() / smooth.mean() < 3.8
    assert np.mean(peak_to_mean > 5.0) > 0.95
    assert np.mean(local_maxima >= 4) > 0.95


def test_single_mode_line_shape():
    # One mode, no jitter, no envelope width: a Gaussian of FWHM 1.5 eV binned into 1-eV channels,
    # whose variance is sigma^2 + 1/12 (measured 0.69976 eV against 0.69936 eV).
    model = SaseModel(envelope_fwhm_ev=1e-9, center_jitter_ev=0.0, n_modes=1)
    spectrum = sase_spectrum(model, LY99_ENERGIES_EV, np.random.default_rng(0))
    centroid = spectrum @ LY99_ENERGIES_EV / spectrum.sum()
    width = math.sqrt(spectrum @ (LY99_ENERGIES_EV - centroid) ** 2 / spectrum.sum())
    assert centroid == pytest.approx(7120.0, abs=1e-6)
    assert width == pytest.approx(math.sqrt((1.5 * FWHM_TO_SIGMA) ** 2 + 1 / 12), rel=2e-3)
    assert spectrum.sum() == pytest.approx(1e12, rel=1e-12)


def recorded(n_shots=3):
    rng = np.random.default_rng(0)
    return rng.exponential(1e10, (n_shots, 100))


def test_read_recorded_spectra_text_and_npy(tmp_path):
    spectra = recorded()
    text = tmp_path / "spectra.txt"
    np.savetxt(text, spectra, fmt="%.17g")
    binary = tmp_path / "spectra.npy"
    np.save(binary, spectra)
    assert np.array_equal(read_recorded_spectra(str(text), 100), spectra)
    assert np.array_equal(read_recorded_spectra(str(binary), 100), spectra)
    # One shot on one line is still one row.
    single = tmp_path / "one.txt"
    np.savetxt(single, spectra[:1])
    assert read_recorded_spectra(str(single), 100).shape == (1, 100)


def bad_spectra_files(tmp_path):
    spectra = recorded()
    wrong_columns = tmp_path / "wrong_columns.txt"
    np.savetxt(wrong_columns, spectra[:, :99])
    negative = tmp_path / "negative.npy"
    bad = spectra.copy()
    bad[1, 40] = -5.0
    np.save(negative, bad)
    all_zero = tmp_path / "zero_shot.txt"
    bad = spectra.copy()
    bad[2] = 0.0
    np.savetxt(all_zero, bad)
    not_numbers = tmp_path / "words.txt"
    not_numbers.write_text("these are\nnot spectra\n")
    return [wrong_columns, negative, all_zero, not_numbers, tmp_path / "missing.npy"]


def test_read_recorded_spectra_rejects_bad_files(tmp_path):
    for path in bad_spectra_files(tmp_path):
        with pytest.raises(SpectrumFileError) as raised:
            read_recorded_spectra(str(path), 100)
        message = str(raised.value)
        assert "\n" not in message, message
        assert message.startswith(f"{path}: "), message


#: The structure_factors section's default channels: 100 of 1 eV from 7070.5 eV.
DEFAULT_GRID = channel_energies(7070.5, 1.0, 100)

#: One nanoBragg still's spectrum as ../shared/data/external/nanobragg/spectra.tsv gives it: 20 channels of
#: 1 eV from 7106.989 eV, here with uneven weights.
NANOBRAGG_ENERGIES = 7106.989 + np.arange(20.0)
NANOBRAGG_WEIGHTS = np.exp(-0.5 * ((NANOBRAGG_ENERGIES - 7114.0) / 4.0) ** 2)


def test_a_spectrum_on_the_grid_is_returned_as_given():
    weights = sase_spectrum(SaseModel(), LY99_ENERGIES_EV, np.random.default_rng(3))
    energies, rebinned = rebin_spectrum(LY99_ENERGIES_EV, weights, DEFAULT_GRID, "shard_00000.h5: image 0")
    # The same arrays, so simulated shots do not change by a bit.
    assert energies is LY99_ENERGIES_EV and rebinned is weights


def test_rebinning_keeps_the_total_weight_and_the_mean_energy():
    energies, rebinned = rebin_spectrum(NANOBRAGG_ENERGIES, NANOBRAGG_WEIGHTS, DEFAULT_GRID)
    assert np.array_equal(energies, DEFAULT_GRID) and rebinned.shape == (100,)
    assert rebinned.min() >= 0
    assert rebinned.sum() == pytest.approx(NANOBRAGG_WEIGHTS.sum(), rel=1e-12)
    mean_in = np.average(NANOBRAGG_ENERGIES, weights=NANOBRAGG_WEIGHTS)
    mean_out = np.average(energies, weights=rebinned)
    # The linear share keeps the first moment exactly, well within half a channel.
    assert abs(mean_out - mean_in) < 1e-9
    # Every input channel lands on the two grid channels around it: 7106.5 ... 7126.5 eV.
    lit = energies[rebinned > 0]
    assert lit.min() == 7106.5 and lit.max() == 7126.5


def test_a_spectrum_on_grid_energies_of_another_count_is_moved_exactly():
    """Channels at grid energies (a subset of the grid) keep their weights in those channels."""
    subset = DEFAULT_GRID[30:50]
    weights = np.linspace(1.0, 2.0, 20)
    energies, rebinned = rebin_spectrum(subset, weights, DEFAULT_GRID)
    assert np.allclose(rebinned[30:50], weights, rtol=1e-12, atol=0)
    assert np.all(rebinned[:30] == 0) and np.all(rebinned[50:] == 0)


def test_rebinning_onto_a_coarser_grid_conserves_weight_and_mean():
    grid = channel_energies(7075.5, 10.0, 10)
    energies, rebinned = rebin_spectrum(NANOBRAGG_ENERGIES, NANOBRAGG_WEIGHTS, grid)
    assert rebinned.sum() == pytest.approx(NANOBRAGG_WEIGHTS.sum(), rel=1e-12)
    mean_in = np.average(NANOBRAGG_ENERGIES, weights=NANOBRAGG_WEIGHTS)
    assert abs(np.average(energies, weights=rebinned) - mean_in) < 0.5 * 10.0


def test_a_spectrum_outside_the_grid_is_refused_in_one_line_naming_the_shot():
    with pytest.raises(SpectrumGridError, match=r"^images/shard_00001\.h5: image 2: spectrum at 7106\.989-7125\.989 eV "
                                                r"lies outside the channel grid 7000\.500-7099\.500 eV") as error:
        rebin_spectrum(NANOBRAGG_ENERGIES, NANOBRAGG_WEIGHTS, channel_energies(7000.5, 1.0, 100),
                       "images/shard_00001.h5: image 2")
    assert "\n" not in str(error.value)
    with pytest.raises(SpectrumGridError, match="weights"):
        rebin_spectrum(NANOBRAGG_ENERGIES, NANOBRAGG_WEIGHTS[:5], DEFAULT_GRID, "s")
