"""SPREAD's per-pixel coefficients reproduce stage 1's Bragg model for the same parameters."""

import numpy as np
import pytest
import torch
from sim_fixtures import (
    B_SOL,
    D_MIN_A,
    K_SOL,
    LY99_ENERGIES_EV,
    OXIDIZED_TABLE,
    PDB_PATH,
    REDUCED_TABLE,
)

from xfel_spread.sim.forward import AmplitudeLookup
from xfel_spread.sim.structure_factors import (
    HC_EV_ANGSTROM,
    ChannelAmplitudes,
    expand_to_p1_grid,
    interpolate_fp_fdp,
    read_fp_fdp_table,
    site_decomposition,
)
from xfel_spread.spread.coefficients import (
    asu_lookup,
    bragg_coefficients,
    fold_point_spread,
)
from xfel_spread.spread.errors import SpreadInputError
from xfel_spread.stage1.likelihood import bragg_photons, shot_tensors
from xfel_spread.stage1.model import CrystalModel, c2_cell, shifted_detector
from xfel_spread.stage1.psf import DetectorPsf
from xfel_spread.stage1.synthetic import simulate_shot_pixels

#: Channels across the edge (7100.5 to 7140.5 eV).
CHANNELS = [30, 45, 50, 54, 58, 70]


@pytest.fixture(scope="module")
def shot_and_model():
    energies = LY99_ENERGIES_EV[CHANNELS]
    decomposition = site_decomposition(str(PDB_PATH), D_MIN_A, K_SOL, B_SOL, ("FE1", "FE2"),
                                       HC_EV_ANGSTROM / LY99_ENERGIES_EV.mean())
    fp1, fdp1 = interpolate_fp_fdp(read_fp_fdp_table(str(OXIDIZED_TABLE)), energies, "ox")
    fp2, fdp2 = interpolate_fp_fdp(read_fp_fdp_table(str(REDUCED_TABLE)), energies, "red")
    amplitudes = decomposition.amplitudes(np.stack([fp1, fp2]), np.stack([fdp1, fdp2]))
    table = ChannelAmplitudes(energies, decomposition.unit_cell, decomposition.space_group, decomposition.indices,
                              amplitudes.astype(np.float32))
    lookup = AmplitudeLookup(expand_to_p1_grid(table), "cpu")
    synthetic = simulate_shot_pixels(lookup, energies, decomposition.unit_cell, seed=11, n_rois=6,
                                     spread_deg=0.05, n_domains=5)
    model = CrystalModel(synthetic.true_matrix, 4)
    a, b, c, beta = c2_cell(synthetic.true_matrix)
    # A generic stage-1 result: rotated, cell and N changed, mosaic spread, detector shifted.
    values = torch.tensor([80.0, 0.01, -0.02, 0.015, a * 1.0003, b, c * 0.9998, beta + 0.01,
                           50.0, 57.0, 64.0, 0.03, 0.02], dtype=torch.float64)
    tensors = shot_tensors(synthetic.shot, 3.0, "cpu")
    detector = shifted_detector(synthetic.shot.detector, values[-1])
    every_pixel = torch.arange(tensors.fast.numel())
    with torch.no_grad():
        stage1 = bragg_photons(detector, model, values, tensors, lookup, every_pixel).numpy()
        state = model.crystal_state(values)
    intensity = table.amplitudes.astype(np.float64) ** 2
    lookup_asu = asu_lookup(table.unit_cell, table.space_group, table.indices)
    return {"stage1": stage1, "state": state, "detector": detector, "tensors": tensors, "intensity": intensity,
            "lookup": lookup_asu, "G": float(values[0]), "shot": synthetic.shot, "cell": values[4:8].numpy(),
            "lookup_p1": lookup}


def test_coefficients_reproduce_stage1_bragg(shot_and_model):
    s = shot_and_model
    t = s["tensors"]
    coefficients = bragg_coefficients(s["detector"], t.beam, s["state"], t.fast, t.slow, s["lookup"])
    ours = s["G"] * coefficients.bragg(s["intensity"], t.fast.numel())
    assert s["stage1"].max() > 10  # spots are there
    error = np.abs(ours - s["stage1"]).max() / s["stage1"].max()
    assert error < 1e-6, error
    # Several channels per pixel, and the shoebox's reflection (one column per shoebox) dominates.
    assert coefficients.dropped_fraction == 0.0
    assert len(np.unique(coefficients.channel)) == len(CHANNELS)


def test_relative_cutoff_costs_little(shot_and_model):
    s = shot_and_model
    t = s["tensors"]
    full = bragg_coefficients(s["detector"], t.beam, s["state"], t.fast, t.slow, s["lookup"])
    sparse = bragg_coefficients(s["detector"], t.beam, s["state"], t.fast, t.slow, s["lookup"], relative_cutoff=1e-3)
    n = t.fast.numel()
    exact, approx = full.bragg(s["intensity"], n), sparse.bragg(s["intensity"], n)
    assert len(sparse.value) < len(full.value)
    # Measured at 1e-3: see the report; the bound is the cutoff itself times the terms per pixel.
    assert np.abs(approx - exact).max() / exact.max() < 1e-3
    assert 0 <= sparse.dropped_fraction < 1e-3


def test_point_spread_folds_into_the_coefficients(shot_and_model):
    s = shot_and_model
    t = s["tensors"]
    n = t.fast.numel()
    coefficients = bragg_coefficients(s["detector"], t.beam, s["state"], t.fast, t.slow, s["lookup"])
    spread = DetectorPsf(0.1, 3).spread_matrix(t.fast.numpy(), t.slow.numpy(), s["shot"].detector.pixel_size_mm, "cpu")
    folded = fold_point_spread(coefficients, spread, n)
    direct = torch.sparse.mm(spread, torch.as_tensor(s["stage1"])[:, None]).squeeze(1).numpy()
    ours = s["G"] * folded.bragg(s["intensity"], n)
    assert np.abs(ours - direct).max() / direct.max() < 1e-9


def test_assembled_lattices_reproduce_stage1_model(shot_and_model):
    """Two lattices through lattice_arrays and concatenate: SPREAD's model at the truth is stage 1's."""
    import copy

    from xfel_spread.spread.assemble import concatenate, lattice_arrays
    from xfel_spread.spread.model import unit_bragg

    s = shot_and_model
    shot = s["shot"]
    second = copy.copy(shot)
    second.trusted = np.asarray(shot.trusted).copy()
    second.trusted[::5] = False  # some untrusted pixels
    values = np.array([80.0, 0.01, -0.02, 0.015, *s["cell"], 50.0, 57.0, 64.0, 0.03, 0.02])
    lattices = [lattice_arrays(one, values, 4, s["lookup"], 3.0, relative_cutoff=0.0) for one in (shot, second)]
    data, columns = concatenate(lattices)
    assert data.n_shots == 2 and data.n_pixels == int(shot.trusted.sum() + second.trusted.sum())
    intensity = torch.as_tensor(s["intensity"][:, columns])
    ours = s["G"] * unit_bragg(intensity, data).numpy()
    expected = np.concatenate([s["stage1"][np.asarray(one.trusted, dtype=bool)] for one in (shot, second)])
    assert np.abs(ours - expected).max() / expected.max() < 1e-6
    with pytest.raises(SpreadInputError, match="no converged lattices"):
        concatenate([])


def test_compact_lattices_assemble_to_the_same_terms():
    """Lattices held compact (int16 channels, int32 pixel numbers, as the recovery benchmark holds
    them) give the same term numbers: numpy 1.x keeps int16 for channel * n_used and would wrap it."""
    from xfel_spread.spread.assemble import LatticeArrays, concatenate

    rng = np.random.default_rng(0)
    n_terms = 400

    def lattice(dtype_channel, dtype_pixel):
        return LatticeArrays(energies_ev=np.arange(100.0), data=np.ones(50), shoebox=np.zeros(50, dtype=np.int64),
                             dx=np.zeros(50), dy=np.zeros(50), readout_var=1.0, n_shoeboxes=1,
                             term_pixel=np.sort(rng.integers(0, 50, n_terms)).astype(dtype_pixel),
                             term_channel=rng.integers(0, 100, n_terms).astype(dtype_channel),
                             term_column=rng.permutation(n_terms), term_coeff=np.ones(n_terms), dropped_fraction=0.0)

    wide = [lattice(np.int64, np.int64) for _ in range(2)]
    small = [LatticeArrays(**{**vars(one), "term_channel": one.term_channel.astype(np.int16),
                              "term_pixel": one.term_pixel.astype(np.int32)}) for one in wide]
    expected, _ = concatenate(wide)
    compact, _ = concatenate(small)
    assert int(expected.term_pair.max()) > np.iinfo(np.int16).max
    assert torch.equal(compact.term_pair, expected.term_pair) and torch.equal(compact.term_pixel, expected.term_pixel)


@pytest.mark.parametrize("mosaic_model", ["gaussian", "nanobragg"])
def test_coefficients_reproduce_stage1_with_its_analytic_eta(shot_and_model, mosaic_model):
    """stage1.eta_model analytic (one domain, eta averaged over the rotations in closed form): the
    coefficients, and lattice_arrays on the shot, give stage 1's Bragg photons of that model."""
    from xfel_spread.spread.assemble import lattice_arrays

    s = shot_and_model
    t = s["tensors"]
    shot = s["shot"]
    model = CrystalModel(shot.real_space_matrix, 1, mosaic_model=mosaic_model)
    values = torch.tensor([80.0, 0.01, -0.02, 0.015, *s["cell"], 50.0, 57.0, 64.0, 0.03, 0.02], dtype=torch.float64)
    every_pixel = torch.arange(t.fast.numel())
    with torch.no_grad():
        stage1 = bragg_photons(s["detector"], model, values, t, s["lookup_p1"], every_pixel).numpy()
        state = model.crystal_state(values)
    assert state.mosaic_variance is not None and stage1.max() > 10
    coefficients = bragg_coefficients(s["detector"], t.beam, state, t.fast, t.slow, s["lookup"])
    ours = s["G"] * coefficients.bragg(s["intensity"], t.fast.numel())
    assert np.abs(ours - stage1).max() / stage1.max() < 1e-6
    # With eta 0 the average is the single domain's transform: a different model, so the test can fail.
    sharp = CrystalModel(shot.real_space_matrix, 1)
    with torch.no_grad():
        unblurred = bragg_photons(s["detector"], sharp, values, t, s["lookup_p1"], every_pixel).numpy()
    assert np.abs(unblurred - stage1).max() / stage1.max() > 1e-2

    arrays = lattice_arrays(shot, values.numpy(), 1, s["lookup"], 3.0, relative_cutoff=0.0,
                            mosaic_model=mosaic_model)
    from xfel_spread.spread.assemble import concatenate
    from xfel_spread.spread.model import unit_bragg

    data, columns = concatenate([arrays])
    assembled = s["G"] * unit_bragg(torch.as_tensor(s["intensity"][:, columns]), data).numpy()
    expected = stage1[np.asarray(shot.trusted, dtype=bool)]
    assert np.abs(assembled - expected).max() / expected.max() < 1e-6


def test_coefficients_reproduce_stage1_with_its_free_domains(shot_and_model):
    """stage1.free_domains: lattice_arrays given the domains' rotation vectors (P_domains.tsv) gives stage 1's
    Bragg photons of that FreeDomainCrystal; the analytic eta at the domains' RMS angle (SPREAD's model of
    such a lattice before it read the domains) is another model, so the test can fail."""
    from xfel_spread.spread.assemble import concatenate, lattice_arrays
    from xfel_spread.spread.model import unit_bragg
    from xfel_spread.stage1.model import FreeDomainCrystal

    s = shot_and_model
    t = s["tensors"]
    shot = s["shot"]
    vectors_deg = np.random.default_rng(5).normal(0.0, 0.03, (6, 3))
    vectors_deg -= vectors_deg.mean(axis=0)
    rms_deg = float(np.sqrt((vectors_deg ** 2).sum(axis=1).mean()))
    values = torch.tensor([80.0, 0.01, -0.02, 0.015, *s["cell"], 50.0, 57.0, 64.0, rms_deg, 0.02], dtype=torch.float64)
    model = FreeDomainCrystal(shot.real_space_matrix, len(vectors_deg))
    model.vectors = torch.as_tensor(np.radians(vectors_deg))
    every_pixel = torch.arange(t.fast.numel())
    with torch.no_grad():
        stage1 = bragg_photons(s["detector"], model, values, t, s["lookup_p1"], every_pixel).numpy()
        analytic = bragg_photons(s["detector"], CrystalModel(shot.real_space_matrix, 1, mosaic_model="gaussian"),
                                 values, t, s["lookup_p1"], every_pixel).numpy()
    assert stage1.max() > 10
    trusted = np.asarray(shot.trusted, dtype=bool)
    expected = stage1[trusted]

    def assembled(**model_options):
        arrays = lattice_arrays(shot, values.numpy(), 1, s["lookup"], 3.0, relative_cutoff=0.0, **model_options)
        data, columns = concatenate([arrays])
        return arrays, s["G"] * unit_bragg(torch.as_tensor(s["intensity"][:, columns]), data).numpy()

    arrays, ours = assembled(mosaic_model="gaussian", domain_vectors_deg=vectors_deg)
    assert arrays.free_domains == 6
    assert np.abs(ours - expected).max() / expected.max() < 1e-6
    plain, eta_model = assembled(mosaic_model="gaussian")
    assert plain.free_domains == 0
    assert np.abs(eta_model - analytic[trusted]).max() / expected.max() < 1e-6
    assert np.abs(eta_model - expected).max() / expected.max() > 1e-2
