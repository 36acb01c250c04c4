"""Merged data and DIALS shard files for test_merge_scoring.py and test_annulus.py.

Shards of integrated lattices are built here as DIALS would write them (dxtbx models, a reflection
table with the integration columns), small enough for dials.scale to run in seconds; merged sets hold
a known truth, as our merge or dials.merge would write them.
"""

from __future__ import annotations

import numpy as np

from xfel_spread.io import mtz

#: The LY99 cell; its crystals come out of stills_process in the Patterson group C 1 2/m 1.
CELL = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
PATTERSON_GROUP = "C 1 2/m 1"


# --- building DIALS files -------------------------------------------------------------------------

def _crystal(rng):
    from cctbx import sgtbx, uctbx
    from dxtbx.model import Crystal
    from scipy.spatial.transform import Rotation

    orthogonalization = np.array(uctbx.unit_cell(CELL).orthogonalization_matrix()).reshape(3, 3)
    rotation = Rotation.random(random_state=rng).as_matrix()
    a, b, c = (rotation @ orthogonalization).T
    return Crystal(a, b, c, space_group=sgtbx.space_group_info(PATTERSON_GROUP).group())


def make_experiments(identifiers, rng, wavelengths=None):
    """Still-shot experiments (no scan, no images) with random orientations and the given identifiers."""
    from dxtbx.model import BeamFactory, DetectorFactory, Experiment, ExperimentList

    experiments = ExperimentList()
    for number, identifier in enumerate(identifiers):
        wavelength = 1.742 if wavelengths is None else wavelengths[number]
        detector = DetectorFactory.simple("PAD", 140.0, (50.0, 50.0), "+x", "-y", (0.1, 0.1), (1000, 1000))
        experiments.append(Experiment(beam=BeamFactory.simple(wavelength), detector=detector,
                                      crystal=_crystal(rng), identifier=identifier))
    return experiments


def make_reflections(ids, miller_indices, d, bboxes, intensities, identifiers, integrated=None):
    """An integrated-reflection table with the columns stills_process writes that the code reads."""
    from dials.array_family import flex

    n = len(ids)
    table = flex.reflection_table()
    table["id"] = flex.int(np.asarray(ids, dtype=np.int32))
    table["miller_index"] = flex.miller_index([tuple(int(v) for v in hkl) for hkl in miller_indices])
    table["d"] = flex.double(np.asarray(d, dtype=float))
    table["bbox"] = flex.int6([tuple(int(v) for v in box) for box in bboxes])
    table["panel"] = flex.size_t(n, 0)
    intensities = np.asarray(intensities, dtype=float)
    table["intensity.sum.value"] = flex.double(intensities)
    table["intensity.sum.variance"] = flex.double(np.maximum(intensities, 1.0))
    table["partiality"] = flex.double(n, 1.0)
    table["xyzobs.px.value"] = flex.vec3_double(n, (500.0, 500.0, 0.5))
    table["s1"] = flex.vec3_double(n, (0.0, 0.1, -0.57))
    table.set_flags(flex.bool(n, True) if integrated is None else flex.bool(list(integrated)),
                    table.flags.integrated_sum)
    for index, identifier in enumerate(identifiers):
        table.experiment_identifiers()[index] = identifier
    return table


def write_shard(prefix, experiments, reflections) -> None:
    """The shard's ``_integrated.expt``/``.refl``, as the reindex stage leaves them."""
    experiments.as_file(f"{prefix}_integrated.expt")
    reflections.as_file(f"{prefix}_integrated.refl")


def write_lattice_table(path, accepted: dict[str, bool]) -> None:
    lines = ["global_id\tidentifier\taccepted\treason"]
    lines += [f"{n}\t{identifier}\t{int(ok)}\t{'' if ok else 'cell'}" for n, (identifier, ok) in
              enumerate(accepted.items())]
    path.write_text("\n".join(lines) + "\n")


def symmetry():
    from cctbx import crystal

    return crystal.symmetry(unit_cell=CELL, space_group_symbol="C 1 2 1")


def anomalous_truth(rng, d_min: float):
    """A small true data set in C 1 2 1: anomalous asu indices and intensities whose Friedel mates
    differ by about 10 % (so both the mean and the anomalous signal are there to recover)."""
    from cctbx import miller

    anomalous_set = miller.build_set(symmetry(), anomalous_flag=True, d_min=d_min)
    pair_keys = list(anomalous_set.customized_copy(anomalous_flag=False).map_to_asu().indices())
    unique_keys = sorted(set(pair_keys))
    pair_mean = dict(zip(unique_keys, rng.gamma(2.0, 1000.0, len(unique_keys))))
    values = np.array([pair_mean[key] for key in pair_keys]) * (1.0 + 0.1 * rng.standard_normal(len(pair_keys)))
    return np.array(anomalous_set.indices()), values


def merged_from_truth(indices, values, rng=None, noise=0.0, path="<test>") -> mtz.MergedIntensities:
    """A merged set holding the truth (times 1 + noise), both mates and their mean, as a merge writes it."""
    from cctbx import miller
    from cctbx.array_family import flex

    values = np.asarray(values, dtype=float)
    if noise:
        values = values * (1.0 + noise * rng.standard_normal(len(values)))
    anomalous = miller.set(symmetry(), flex.miller_index([tuple(map(int, h)) for h in indices]),
                           anomalous_flag=True).array(data=flex.double(values), sigmas=flex.double(len(values), 1.0))
    mean = anomalous.average_bijvoet_mates()
    return mtz.MergedIntensities(
        path=path, unit_cell=CELL, space_group="C 1 2 1",
        anomalous_indices=np.array(anomalous.indices()), anomalous_intensities=values,
        anomalous_sigmas=np.ones(len(values)), mean_indices=np.array(mean.indices()),
        mean_intensities=np.array(mean.data()), mean_sigmas=np.array(mean.sigmas()))


def write_our_mtz(path, merged: mtz.MergedIntensities) -> None:
    """The MTZ layout spread-merge writes: one dataset with IMEAN/SIGIMEAN, I(+)/SIGI(+)/I(-)/SIGI(-)."""
    dataset = merged.mean_array().as_mtz_dataset(column_root_label="IMEAN", wavelength=1.74)
    dataset.add_miller_array(merged.anomalous_array(), column_root_label="I")
    dataset.mtz_object().write(str(path))


def write_dials_mtz(path, merged: mtz.MergedIntensities) -> None:
    """The MTZ layout dials.merge writes (HKL_base crystal, then XTAL/NATIVE with N(+), N(-)), by its own writer."""
    from cctbx.array_family import flex
    from dials.util.export_mtz import MergedMTZWriter

    anomalous = merged.anomalous_array()
    writer = MergedMTZWriter(anomalous.space_group(), anomalous.unit_cell())
    writer.add_crystal(crystal_name="XTAL", project_name="AUTOMATIC")
    writer.add_empty_dataset(1.74, name="NATIVE")
    writer.add_dataset(merged.mean_array(), anomalous,
                       multiplicities=anomalous.customized_copy(data=flex.int(anomalous.size(), 2), sigmas=None))
    writer.mtz_file.write(str(path))


def sorted_rows(indices, *columns):
    order = np.lexsort(np.asarray(indices).T[::-1])
    return (np.asarray(indices)[order], *(np.asarray(column)[order] for column in columns))
