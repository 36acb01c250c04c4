"""Per-channel structure factors of 1M2A (sim.structure_factors) against brute-force cctbx/mmtbx."""

import numpy as np
import pytest
from sim_fixtures import (
    B_SOL,
    D_MIN_A,
    K_SOL,
    LY99_ENERGIES_EV,
    OXIDIZED_TABLE,
    PDB_PATH,
    REDUCED_TABLE,
)

from xfel_spread.sim.crystal import orthogonalization_matrix
from xfel_spread.sim.structure_factors import (
    HC_EV_ANGSTROM,
    ModelFileError,
    compute_channel_amplitudes,
    expand_to_p1_grid,
    load_channel_amplitudes,
    save_channel_amplitudes,
)

#: Channel 54 (7124.5 eV) lies on the Fe K edge, where the oxidized and reduced sites differ most.
EDGE_CHANNEL = 54


def table_value_at(path, energy_ev):
    """(f', f'') at a half-integer energy of a 1-eV table: the mean of the two bracketing rows."""
    table = np.loadtxt(path)
    below = table[table[:, 0] == np.floor(energy_ev)][0]
    above = table[table[:, 0] == np.ceil(energy_ev)][0]
    return 0.5 * (below[1] + above[1]), 0.5 * (below[2] + above[2])


def brute_force_fmodel(energy_ev, fe1_table, fe2_table):
    """|Fmodel| (mmtbx.f_model, bulk solvent) with every atom's f'/f'' set for one channel energy."""
    import iotbx.pdb
    import mmtbx.f_model
    from cctbx.array_family import flex
    from cctbx.eltbx import henke

    pdb_input = iotbx.pdb.input(file_name=str(PDB_PATH))
    xray_structure = pdb_input.xray_structure_simple()
    mean_wavelength = HC_EV_ANGSTROM / LY99_ENERGIES_EV.mean()
    fe_factors = {"FE1": table_value_at(fe1_table, energy_ev), "FE2": table_value_at(fe2_table, energy_ev)}
    for scatterer, atom in zip(xray_structure.scatterers(), pdb_input.atoms()):
        name = atom.name.strip()
        if name in fe_factors:
            scatterer.fp, scatterer.fdp = fe_factors[name]
        else:
            factors = henke.table(scatterer.element_symbol()).at_angstrom(mean_wavelength)
            scatterer.fp, scatterer.fdp = factors.fp(), factors.fdp()
    miller_set = xray_structure.build_miller_set(anomalous_flag=True, d_min=D_MIN_A)
    fmodel = mmtbx.f_model.manager(f_obs=miller_set.array(data=flex.double(miller_set.size(), 1.0)),
                                   xray_structure=xray_structure, k_sol=K_SOL, b_sol=B_SOL)
    return np.asarray(miller_set.indices()), np.abs(np.asarray(fmodel.f_model().data()))


def test_channel_amplitudes_match_brute_force_fmodel(amplitude_table):
    energy = LY99_ENERGIES_EV[EDGE_CHANNEL]
    indices, reference = brute_force_fmodel(energy, OXIDIZED_TABLE, REDUCED_TABLE)
    assert np.array_equal(amplitude_table.indices, indices)
    assert amplitude_table.amplitudes.shape == (100, len(indices))
    assert amplitude_table.energies_ev[EDGE_CHANNEL] == energy == 7124.5
    ours = amplitude_table.amplitudes[EDGE_CHANNEL].astype(np.float64)
    rms = np.sqrt(np.mean(reference ** 2))
    # Measured: 1 - corr 5.9e-8, max |diff| 0.32 % of rms |F| (0.86 e of 268 e), rms diff 0.066 e.
    # What is left is mmtbx's FFT structure factors against the direct sum used for the Fe sites.
    assert 1 - np.corrcoef(ours, reference)[0, 1] < 2e-7
    assert np.abs(ours - reference).max() < 0.005 * rms
    assert np.sqrt(np.mean((ours - reference) ** 2)) < 0.15

    # The comparison can tell the two iron sites apart: with FE1 and FE2 given each other's table
    # (measured max |diff| 3.4 % of rms, rms diff 1.6 e) the same bounds fail.
    _, swapped = brute_force_fmodel(energy, REDUCED_TABLE, OXIDIZED_TABLE)
    assert np.abs(ours - swapped).max() > 0.005 * rms
    assert np.sqrt(np.mean((ours - swapped) ** 2)) > 0.15


def rms_bijvoet_difference(table, channel):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=table.unit_cell, space_group_symbol=table.space_group)
    indices = flex.miller_index([tuple(int(v) for v in row) for row in table.indices])
    array = miller.array(miller.set(symmetry, indices, anomalous_flag=True),
                         flex.double(table.amplitudes[channel].astype(np.float64)))
    differences = np.asarray(array.anomalous_differences().data())
    assert differences.size > 10000
    return np.sqrt(np.mean(differences ** 2))


def test_bijvoet_differences_grow_across_the_fe_k_edge(amplitude_table):
    below = rms_bijvoet_difference(amplitude_table, 0)      # 7070.5 eV, f'' ~ 0.5
    above = rms_bijvoet_difference(amplitude_table, 99)     # 7169.5 eV, f'' ~ 3.6-3.8
    # Measured 5.8 -> 16.0 (f'' of the light atoms contributes the rest below the edge).
    assert below > 1.0
    assert above > 2 * below


# Point group 2 (unique axis b) of C 1 2 1 acting on Miller indices, and Friedel's inversion.
def twofold(hkl):
    h, k, l = hkl
    return (-h, k, -l)


def friedel(hkl):
    h, k, l = hkl
    return (-h, -k, -l)


def grid_value(grid, channel, hkl):
    offset = np.asarray(hkl) - grid.hkl_min
    if np.any(offset < 0) or np.any(offset >= grid.values.shape[1:]):
        return 0.0
    return float(grid.values[(channel, *offset)])


def test_p1_grid_symmetry_centring_and_friedel(amplitude_table):
    grid = expand_to_p1_grid(amplitude_table)
    channel = 99  # above the edge: Bijvoet pairs differ
    asu = [tuple(int(v) for v in row) for row in amplitude_table.indices]
    column = {hkl: m for m, hkl in enumerate(asu)}
    acentric_checked = 0
    centric = [hkl for hkl in asu if hkl[1] == 0]
    sample = [asu[m] for m in range(0, len(asu), 997)] + centric[::100]
    assert len(centric) > 500
    for hkl in sample:
        amplitude = float(amplitude_table.amplitudes[channel, column[hkl]])
        assert amplitude > 0
        # Every symmetry mate has the amplitude of its asymmetric-unit representative.
        assert grid_value(grid, channel, hkl) == amplitude
        assert grid_value(grid, channel, twofold(hkl)) == amplitude
        # The Bijvoet mates -h and its 2-fold image share one amplitude...
        assert grid_value(grid, channel, friedel(hkl)) == grid_value(grid, channel, twofold(friedel(hkl))) > 0
        if hkl[1] == 0:
            # ...which for the centric h0l zone is that of h itself (-h is a symmetry mate of h).
            assert grid_value(grid, channel, friedel(hkl)) == amplitude
        else:
            # ...and for acentric reflections differs from |F(h)| once f'' is large.
            assert grid_value(grid, channel, friedel(hkl)) != amplitude
            acentric_checked += 1
    assert acentric_checked >= 20

    # Exactly the C-centred indices inside the resolution sphere are non-zero, in every channel.
    h, k, l = np.meshgrid(*[np.arange(grid.hkl_min[i], grid.hkl_min[i] + grid.values.shape[1 + i]) for i in range(3)],
                          indexing="ij")
    reciprocal = np.linalg.inv(orthogonalization_matrix(amplitude_table.unit_cell))
    d_star = np.linalg.norm(np.stack((h, k, l), axis=-1) @ reciprocal.T, axis=-1)
    allowed = ((h + k) % 2 == 0) & (d_star > 0)
    inside = d_star < 1 / D_MIN_A - 1e-9
    outside = d_star > 1 / D_MIN_A + 1e-9
    nonzero = grid.values > 0
    assert nonzero[:, allowed & inside].all()
    assert not nonzero[:, ~allowed].any()      # C-centring absences (h + k odd) and F(000)
    assert not nonzero[:, outside].any()
    # Each asymmetric-unit index stands for its two 2-fold mates, except the 0k0 on the axis.
    on_axis = (amplitude_table.indices[:, 0] == 0) & (amplitude_table.indices[:, 2] == 0)
    assert nonzero[0].sum() == 2 * len(asu) - on_axis.sum()


@pytest.fixture
def fe_less_pdb(tmp_path):
    """1M2A with the FE1 atoms renamed FE3: no oxidized site to put the table on."""
    lines = PDB_PATH.read_text().splitlines(keepends=True)
    renamed = [line[:12] + "FE3 " + line[16:] if line.startswith("HETATM") and line[12:16].strip() == "FE1" else line
               for line in lines]
    assert renamed != lines
    path = tmp_path / "no_fe1.pdb"
    path.write_text("".join(renamed))
    return path


def bad_input_cases(tmp_path, fe_less_pdb):
    garbage = tmp_path / "garbage.pdb"
    garbage.write_bytes(b"this is not a PDB file\nATOM  garbage here 1.2.3\n\x01\x02\n")
    two_columns = tmp_path / "two_columns.out"
    np.savetxt(two_columns, np.loadtxt(OXIDIZED_TABLE)[:, :2])
    short_table = tmp_path / "short.out"
    table = np.loadtxt(REDUCED_TABLE)
    np.savetxt(short_table, table[(table[:, 0] > 7000) & (table[:, 0] < 7100)])  # channels reach 7169.5
    ox, red, pdb = str(OXIDIZED_TABLE), str(REDUCED_TABLE), str(PDB_PATH)
    return {
        "missing pdb": ((str(tmp_path / "missing.pdb"), ox, red), tmp_path / "missing.pdb"),
        "garbage pdb": ((str(garbage), ox, red), garbage),
        "two-column table": ((pdb, str(two_columns), red), two_columns),
        "table short of the channels": ((pdb, ox, str(short_table)), short_table),
        "no FE1 atoms": ((str(fe_less_pdb), ox, red), fe_less_pdb),
    }


@pytest.mark.parametrize("case", ["missing pdb", "garbage pdb", "two-column table", "table short of the channels",
                                  "no FE1 atoms"])
def test_bad_inputs_raise_one_line_model_file_error(case, tmp_path, fe_less_pdb):
    paths, culprit = bad_input_cases(tmp_path, fe_less_pdb)[case]
    with pytest.raises(ModelFileError) as raised:
        # A coarse d_min keeps the cases that fail late (after Fmodel) fast.
        compute_channel_amplitudes(*paths, LY99_ENERGIES_EV, 6.0, K_SOL, B_SOL)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{culprit}: ")


def test_save_load_round_trip(amplitude_table, tmp_path):
    path = tmp_path / "amplitudes.h5"
    save_channel_amplitudes(amplitude_table, str(path))
    loaded = load_channel_amplitudes(str(path))
    assert loaded.unit_cell == amplitude_table.unit_cell
    assert loaded.space_group == amplitude_table.space_group == "C 1 2 1"
    for name in ("energies_ev", "indices", "amplitudes"):
        assert np.array_equal(getattr(loaded, name), getattr(amplitude_table, name)), name
        assert getattr(loaded, name).dtype == getattr(amplitude_table, name).dtype, name
    assert np.allclose(loaded.wavelengths_a, HC_EV_ANGSTROM / LY99_ENERGIES_EV)
    assert [p.name for p in tmp_path.iterdir()] == ["amplitudes.h5"]  # no temporary left behind


def test_load_rejects_other_files(tmp_path):
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["data"] = np.zeros(3)
    for path in (other, tmp_path / "missing.h5", PDB_PATH):
        with pytest.raises(ModelFileError) as raised:
            load_channel_amplitudes(str(path))
        assert "\n" not in str(raised.value) and str(raised.value).startswith(f"{path}: ")


def test_sites_are_named_by_their_atoms_not_by_ly99s(fe_less_pdb):
    """compute_site_amplitudes puts each table on the atoms named for it: 1M2A with FE1 renamed FE3 and the
    table given for FE3 gives LY99's amplitudes exactly; a third site (one cluster's FE2 renamed FE4) given
    the same table as FE2 changes nothing; a site name no atom has is one line naming the model."""
    from xfel_spread.sim.structure_factors import compute_site_amplitudes

    expected = compute_channel_amplitudes(str(PDB_PATH), str(OXIDIZED_TABLE), str(REDUCED_TABLE), LY99_ENERGIES_EV,
                                          6.0, K_SOL, B_SOL)
    renamed = compute_site_amplitudes(str(fe_less_pdb), {"FE3": str(OXIDIZED_TABLE), "FE2": str(REDUCED_TABLE)},
                                      LY99_ENERGIES_EV, 6.0, K_SOL, B_SOL)
    assert np.array_equal(renamed.indices, expected.indices)
    assert np.array_equal(renamed.amplitudes, expected.amplitudes)

    lines = fe_less_pdb.read_text().splitlines(keepends=True)
    three = [line[:12] + "FE4 " + line[16:] if line.startswith("HETATM") and line[12:16].strip() == "FE2"
             and line[21] == "B" else line for line in lines]
    assert three != lines
    three_sites = fe_less_pdb.with_name("three_sites.pdb")
    three_sites.write_text("".join(three))
    split = compute_site_amplitudes(str(three_sites), {"FE3": str(OXIDIZED_TABLE), "FE2": str(REDUCED_TABLE),
                                                       "FE4": str(REDUCED_TABLE)}, LY99_ENERGIES_EV, 6.0, K_SOL, B_SOL)
    assert np.allclose(split.amplitudes, expected.amplitudes, rtol=1e-6, atol=1e-4)

    with pytest.raises(ModelFileError) as raised:
        compute_site_amplitudes(str(PDB_PATH), {"ZN1": str(OXIDIZED_TABLE)}, LY99_ENERGIES_EV, 6.0, K_SOL, B_SOL)
    assert str(raised.value) == f"{PDB_PATH}: no atom named ZN1 for the anomalous site"
