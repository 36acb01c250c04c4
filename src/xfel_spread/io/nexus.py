"""NeXus/NXmx export of the project's shards, for programs that do not know the shard format.

:func:`write_nxmx` copies one shard (``io.shard`` layout) into an NXmx file: the images, the flat
panel's geometry, and each shot's spectrum. dxtbx reads the result with ``FormatNXmx``; CrystFEL,
xia2.ssx and careless (through DIALS) read NXmx too.

Layout (NeXus McStas frame: x = -x_DIALS, y = y_DIALS, z = -z_DIALS)::

    /entry                              NXentry, definition "NXmx"
      data/data                         NXdata: int32 (n_shots, n_slow, n_fast) ADU, a hard link to detector/data
      instrument/beam                   NXbeam
        incident_wavelength             (n_shots,) Angstrom: each shot's photon-weighted mean wavelength,
                                        attribute variant = "incident_wavelength_1Dspectrum"
        incident_wavelength_1Dspectrum  (n_channels,) Angstrom: the shard's channels
        incident_wavelength_1Dspectrum_weight   (n_shots, n_channels): photons per channel of each shot
        incident_polarization_stokes    (4,) Stokes vector of the polarization (fraction along the normal's
                                        perpendicular, as the shard's /beam attributes say)
      instrument/detector               NXdetector: data, sensor_material, sensor_thickness, saturation_value,
                                        underload_value, gain_adu_per_photon and adc_offset_adu (project fields),
                                        module (NXdetector_module) with data_origin, data_size,
                                        fast/slow_pixel_direction and module_offset (NXtransformations, mm)
      sample                            NXsample, depends_on "." (stills: no goniometer)

The channel energies keep their values exactly in ``/entry/instrument/beam`` as ``incident_energy_1Dspectrum``
(eV) too, since Angstrom round trips lose the last bits. dxtbx 3.12's NXmx reader knows only silicon,
CdTe and GaAs sensors: a shard's sensor of another material (the simulated Rayonix phosphor) is written as
``Si`` with the shard's thickness, and the real material is kept in the attribute ``xfel_spread_material``.
"""

from __future__ import annotations

import os

import numpy as np

from xfel_spread.io.images import HC_EV_A

#: Sensor materials dxtbx's NXmx reader accepts.
NXMX_MATERIALS = ("Si", "Silicon", "CdTe", "GaAs")


def _nx_group(parent, name: str, nx_class: str):
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def write_nxmx(shard_path: str | os.PathLike, nxmx_path: str | os.PathLike) -> None:
    """Write the shard at ``shard_path`` as an NXmx file at ``nxmx_path``, atomically, image by image."""
    import h5py

    from xfel_spread.atomic import atomic_path
    from xfel_spread.io.shard import read_shard_image, read_shard_metadata

    metadata = read_shard_metadata(shard_path)
    detector = metadata.detector
    n_fast, n_slow = int(detector["n_fast"]), int(detector["n_slow"])
    photons = np.asarray(metadata.photons_per_channel, dtype=np.float64)
    energy = np.asarray(metadata.energy_ev, dtype=np.float64)
    mean_energy = (photons * energy).sum(axis=1) / photons.sum(axis=1)

    with atomic_path(nxmx_path) as temporary, h5py.File(temporary, "w") as h5:
        h5.attrs["default"] = "entry"
        entry = _nx_group(h5, "entry", "NXentry")
        entry["definition"] = "NXmx"
        entry["xfel_spread_shard"] = os.path.abspath(shard_path)
        instrument = _nx_group(entry, "instrument", "NXinstrument")
        instrument["name"] = "xfel_spread simulated Rayonix-like panel"

        beam = _nx_group(instrument, "beam", "NXbeam")
        wavelengths = beam.create_dataset("incident_wavelength", data=HC_EV_A / mean_energy)
        wavelengths.attrs.update({"units": "angstrom", "variant": "incident_wavelength_1Dspectrum"})
        beam.create_dataset("incident_wavelength_1Dspectrum", data=HC_EV_A / energy).attrs["units"] = "angstrom"
        beam.create_dataset("incident_wavelength_1Dspectrum_weight", data=photons)
        beam.create_dataset("incident_energy_1Dspectrum", data=energy).attrs["units"] = "eV"
        fraction = float(metadata.beam["polarization_fraction"])
        # Stokes (I, Q, U, V) for a beam polarized in the plane normal to polarization_normal (0, 1, 0): along x.
        beam.create_dataset("incident_polarization_stokes", data=np.array([1.0, 2 * fraction - 1.0, 0.0, 0.0]))

        nx_detector = _nx_group(instrument, "detector", "NXdetector")
        data = nx_detector.create_dataset("data", shape=(metadata.n_shots, n_slow, n_fast), dtype=np.int32,
                                          chunks=(1, n_slow, n_fast), compression="gzip", compression_opts=2,
                                          shuffle=True)
        for i in range(metadata.n_shots):
            data[i] = read_shard_image(shard_path, i)
        material = str(detector["material"])
        nx_detector["sensor_material"] = material if material in NXMX_MATERIALS else "Si"
        nx_detector["sensor_material"].attrs["xfel_spread_material"] = material
        nx_detector.create_dataset("sensor_thickness", data=float(detector["thickness_mm"])).attrs["units"] = "mm"
        minimum_adu, maximum_adu = detector["trusted_range"]
        nx_detector["underload_value"] = int(minimum_adu)
        nx_detector["saturation_value"] = int(maximum_adu)
        nx_detector["gain_adu_per_photon"] = float(detector["gain_adu_per_photon"])
        nx_detector["adc_offset_adu"] = float(detector["adc_offset_adu"])
        nx_detector["depends_on"] = "."

        module = _nx_group(nx_detector, "module", "NXdetector_module")
        module["data_origin"] = np.array([0, 0], dtype=np.int64)
        module["data_size"] = np.array([n_slow, n_fast], dtype=np.int64)
        pixel_size = float(detector["pixel_size_mm"])
        beam_x_mm, beam_y_mm = detector["beam_center_mm"]
        # The DIALS origin (-beam_x, beam_y, -distance) in McStas coordinates.
        origin = np.array([beam_x_mm, beam_y_mm, float(detector["distance_mm"])])
        offset = module.create_dataset("module_offset", data=np.array([np.linalg.norm(origin)]))
        offset.attrs.update({"transformation_type": "translation", "vector": origin / np.linalg.norm(origin),
                             "offset": np.zeros(3), "units": "mm", "depends_on": "."})
        # Fast (1, 0, 0) and slow (0, -1, 0) in the DIALS frame.
        for name, vector in (("fast_pixel_direction", (-1.0, 0.0, 0.0)), ("slow_pixel_direction", (0.0, -1.0, 0.0))):
            direction = module.create_dataset(name, data=np.array([pixel_size]))
            direction.attrs.update({"transformation_type": "translation", "vector": np.array(vector),
                                    "offset": np.zeros(3), "units": "mm",
                                    "depends_on": "/entry/instrument/detector/module/module_offset"})

        nx_data = _nx_group(entry, "data", "NXdata")
        nx_data.attrs["signal"] = "data"
        nx_data["data"] = data  # a hard link: the images are stored once
        sample = _nx_group(entry, "sample", "NXsample")
        sample["depends_on"] = "."


def read_nxmx_spectra(nxmx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(channel energies in eV, photons per channel of each shot) of a file :func:`write_nxmx` wrote."""
    import h5py

    with h5py.File(nxmx_path, "r") as h5:
        beam = h5["entry/instrument/beam"]
        return beam["incident_energy_1Dspectrum"][()], beam["incident_wavelength_1Dspectrum_weight"][()]


_TO_ANGSTROM = {"angstrom": 1.0, "Angstrom": 1.0, "A": 1.0, "nm": 10.0, "m": 1.0e10}


def read_nexus_spectrum(path: str | os.PathLike, frame: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Frame ``frame``'s spectrum (energies in eV, weights) from a NeXus file's NXbeam, in the layout dxtbx's
    NeXus beam reader follows: ``incident_wavelength`` with ``incident_wavelength_weight``, or the dataset its
    ``variant`` attribute names (followed along the chain) with ``<name>_weight``; wavelengths 1-D (shared
    channels) or 2-D (per frame), weights likewise. None when the file has no spectrum there.

    dxtbx 3.12's ``FormatNXmx`` reads only the per-frame wavelength, so :mod:`xfel_spread.io.images` falls back
    on this for ``spectra: imageset``."""
    import h5py

    with h5py.File(path, "r") as h5:
        beam = None
        for candidate in ("entry/instrument/beam", "entry/sample/beam"):
            if candidate in h5:
                beam = h5[candidate]
                break
        if beam is None or "incident_wavelength" not in beam:
            return None
        name = "incident_wavelength"
        while f"{name}_weight" not in beam:
            variant = beam[name].attrs.get("variant")
            if variant is None:
                return None
            name = variant.decode() if isinstance(variant, bytes) else str(variant)
            if name not in beam:
                return None
        wavelengths, weights = beam[name], beam[f"{name}_weight"]
        units = wavelengths.attrs.get("units", "angstrom")
        units = units.decode() if isinstance(units, bytes) else str(units)
        if units not in _TO_ANGSTROM:
            return None
        values = wavelengths[frame] if wavelengths.ndim > 1 else wavelengths[()]
        weight = weights[frame] if weights.ndim > 1 else weights[()]
    energies = HC_EV_A / (np.asarray(values, dtype=np.float64) * _TO_ANGSTROM[units])
    order = np.argsort(energies)
    return energies[order], np.asarray(weight, dtype=np.float64)[order]
