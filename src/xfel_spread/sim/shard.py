"""Simulate a shard of LY99 shots and write it as two datasets (without and with PSF).

Every random draw of shot ``i`` comes from generators seeded by ``(seed, i, stream)``, so a shot
is the same whichever shard, rank or process simulates it. The diffraction is computed with the
*true* detector (nominal beam centre + ``beam_center_offset_px``); the shard's metadata carries
the *nominal* one, and the truth file records both.

A fraction ``blank_fraction`` of the shots are blanks: the crystal misses the beam, so the image holds
the amorphous background and the detector noise only. Whether a shot is blank is drawn from its own
stream, so it does not depend on sharding, and no other draw changes (with fraction 0 the images are
bit-identical to a run without blanks). The truth file flags each shot ``blank``.

With ``simulate.detector.tiles`` beyond 1 x 1 the panel is cut into tiles (a
:class:`~xfel_spread.sim.geometry.MultiPanelDetector`): the diffraction and background are rendered
on the true tiles (the true beam centre, plus each tile's seeded in-plane move), the noise drawn
for every tile's pixels, the point spread applied within each tile, and the shard records the
nominal tiles (``/detector`` panel attributes, images ``(n_panels, n_slow, n_fast)``), which
``FormatSPREADShard`` gives dxtbx as a multi-panel detector.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from xfel_spread.atomic import atomic_output
from xfel_spread.config import DATASETS
from xfel_spread.io.shard import open_shard_writer
from xfel_spread.progress import Progress
from xfel_spread.sim import background as bg
from xfel_spread.sim import crystal as xtal
from xfel_spread.sim import detector_effects as effects
from xfel_spread.sim.forward import AmplitudeLookup, Beam, CrystalState, bragg_photons_sparse
from xfel_spread.sim.geometry import Detector, MultiPanelDetector
from xfel_spread.sim.spectrum import SaseModel, SpectrumFileError, read_recorded_spectra, sase_spectrum
from xfel_spread.sim.structure_factors import expand_to_p1_grid, load_channel_amplitudes

log = logging.getLogger(__name__)

#: Independent random streams of one shot.
STREAM_SPECTRUM, STREAM_CRYSTAL, STREAM_NOISE, STREAM_BLANK = 0, 1, 2, 3
#: Stream of the run-wide calibration (gain) pattern, the same for every shot.
CALIBRATION_STREAM = 2 ** 31 - 1
#: The trusted range written into the metadata: any int32 ADU from 0 up; nothing saturates.
TRUSTED_RANGE = (0, 2 ** 31 - 2)


def shot_rng(seed: int, shot_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence((seed, shot_index, stream)))


def shot_torch_seed(seed: int, shot_index: int, stream: int) -> int:
    return int(np.random.SeedSequence((seed, shot_index, stream)).generate_state(1, dtype=np.uint64)[0]) >> 1


def is_blank_shot(seed: int, shot_index: int, blank_fraction: float) -> bool:
    """Whether shot ``shot_index`` is a blank (no crystal in the beam), from its own random stream."""
    # Compare even when the fraction is 0 (never true then), so the rule has no special case.
    return bool(shot_rng(seed, shot_index, STREAM_BLANK).random() < blank_fraction)


def domains_per_crystal(length_um: float, illuminated_diameter_um: float, domain_size_a: float) -> float:
    """Mosaic domains in the illuminated cylinder of crystal (the Bragg scale of the LY99 model)."""
    illuminated = math.pi * (illuminated_diameter_um / 2) ** 2 * length_um
    domain = 4.0 / 3.0 * math.pi * (domain_size_a * 1e-4 / 2) ** 3
    return illuminated / domain


def cells_per_domain_edge(unit_cell, domain_size_a: float) -> int:
    """N (the same along a, b, c): cube root of spherical domain volume / cell volume, rounded."""
    real_space = xtal.orthogonalization_matrix(unit_cell)
    cell_volume = abs(np.linalg.det(real_space))
    domain_volume = 4.0 / 3.0 * math.pi * (domain_size_a / 2) ** 3
    return int(round((domain_volume / cell_volume) ** (1.0 / 3.0)))


@dataclass
class SimulationSetup:
    """Everything fixed for a run, resolved from the config and the amplitude table."""

    nominal_detector: Detector
    true_detector: Detector
    energies_ev: np.ndarray
    amplitudes: AmplitudeLookup
    hkl: torch.Tensor
    unit_cell: tuple
    ncells: np.ndarray
    scale: float
    n_domains: int
    mosaic_spread_deg: float
    beam_size_m: float
    polarization_fraction: float
    readout: effects.ReadoutModel
    psf_fwhm_px: float
    psf_radius_px: int
    materials: list
    seed: int
    device: torch.device
    blank_fraction: float = 0.0
    sase: SaseModel | None = None
    mosaic_model: str = "gaussian"
    recorded_spectra: np.ndarray | None = None
    #: The tiles of a multi-panel run (``simulate.detector.tiles``), nominal and true; None: one panel.
    nominal_tiles: MultiPanelDetector | None = None
    true_tiles: MultiPanelDetector | None = None
    calibration: torch.Tensor = field(init=False)

    def __post_init__(self):
        shape = (self.nominal_detector.n_slow, self.nominal_detector.n_fast)
        if self.nominal_tiles is not None:
            tile = self.nominal_tiles.panels[0]
            shape = (len(self.nominal_tiles), tile.n_slow, tile.n_fast)
        self.calibration = effects.calibration_pattern(
            shape, self.readout.calibration_noise_fraction,
            shot_torch_seed(self.seed, 0, CALIBRATION_STREAM), self.device)

    @cached_property
    def background(self) -> bg.PanelBackground:
        """Per-pixel background geometry of the true detector, built on first use."""
        detector = self.true_detector if self.true_tiles is None else self.true_tiles
        return bg.PanelBackground(detector, self.polarization_fraction, self.materials, self.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("simulate.device is cuda but torch sees no CUDA device")
    return torch.device(name)


def setup_from_config(config: dict, amplitude_table_path: str) -> SimulationSetup:
    """Build the run's :class:`SimulationSetup` from a validated config."""
    sim = config["simulate"]
    det, beam, crystal = sim["detector"], sim["beam"], sim["crystal"]
    device = resolve_device(sim["device"])
    table = load_channel_amplitudes(amplitude_table_path)
    amplitudes = AmplitudeLookup(expand_to_p1_grid(table), device)

    centre = (det["n_fast"] * det["pixel_size_mm"] / 2, det["n_slow"] * det["pixel_size_mm"] / 2)
    nominal = Detector(det["n_fast"], det["n_slow"], det["pixel_size_mm"], det["distance_mm"], centre,
                       det["thickness_mm"], det["attenuation_length_mm"])
    ncells = crystal["ncells_abc"] or [cells_per_domain_edge(table.unit_cell, crystal["domain_size_a"])] * 3
    materials = []
    if sim["background"]["enabled"]:
        materials = [bg.water(sim["background"]["water_thickness_mm"]), bg.air(sim["background"]["air_path_mm"])]
    spectrum = beam["spectrum"]
    sase, recorded = None, None
    if spectrum["source"] == "file":
        recorded = read_recorded_spectra(spectrum["file"], len(table.energies_ev))
    else:
        sase = SaseModel(spectrum["envelope_center_ev"], spectrum["envelope_fwhm_ev"], spectrum["center_jitter_ev"],
                         spectrum["n_modes"], spectrum["mode_fwhm_ev"], beam["total_photons"])
    true_detector = nominal.with_beam_center_offset_px(tuple(det["beam_center_offset_px"]))
    if det["geometry"] is not None:
        nominal, true_detector, nominal_tiles, true_tiles = geometry_tiles(det)
    else:
        nominal_tiles, true_tiles = detector_tiles(det["tiles"], nominal, true_detector)
    return SimulationSetup(
        nominal_detector=nominal,
        true_detector=true_detector,
        nominal_tiles=nominal_tiles,
        true_tiles=true_tiles,
        energies_ev=table.energies_ev,
        amplitudes=amplitudes,
        hkl=amplitudes.nonzero_indices(),
        unit_cell=table.unit_cell,
        ncells=np.asarray(ncells, dtype=np.float64),
        scale=domains_per_crystal(crystal["size_um"], crystal["illuminated_diameter_um"], crystal["domain_size_a"]),
        n_domains=crystal["n_mosaic_domains"],
        mosaic_spread_deg=crystal["mosaic_spread_deg"],
        mosaic_model=crystal["mosaic_model"],
        beam_size_m=beam["beam_size_um"] * 1e-6,
        polarization_fraction=beam["polarization_fraction"],
        readout=effects.ReadoutModel(det["gain_adu_per_photon"], det["adc_offset_adu"], det["readout_noise_adu"],
                                     det["calibration_noise_fraction"]),
        psf_fwhm_px=det["psf_fwhm_mm"] / nominal.pixel_size_mm,
        psf_radius_px=det["psf_radius_px"],
        materials=materials,
        seed=sim["seed"],
        device=device,
        blank_fraction=sim["blank_fraction"],
        sase=sase,
        recorded_spectra=recorded,
    )


def detector_tiles(tiles: dict, nominal: Detector, true_detector: Detector):
    """(nominal, true) tiles of ``simulate.detector.tiles``, or (None, None) for the single panel.

    The true tiles are the true panel's (true beam centre) cut the same way, each moved in its plane
    by up to ``shift_px``. Tiles must share one shape (the shard stores them as one array).
    """
    if tiles["fast"] == 1 and tiles["slow"] == 1:
        return None, None
    nominal_tiles = MultiPanelDetector.split(nominal, tiles["fast"], tiles["slow"], tiles["gap_px"])
    true_tiles = MultiPanelDetector.split(true_detector, tiles["fast"], tiles["slow"], tiles["gap_px"],
                                          tiles["shift_px"], tiles["seed"])
    shapes = {(tile.n_fast, tile.n_slow) for tile in nominal_tiles.panels}
    if len(shapes) != 1 or min(min(shape) for shape in shapes) < 1:
        raise ValueError(f"simulate.detector.tiles: {tiles['fast']} x {tiles['slow']} tiles with a {tiles['gap_px']} px "
                         f"gap give tiles of shapes {sorted(shapes)}; they must share one shape")
    return nominal_tiles, true_tiles


def geometry_tiles(det: dict):
    """(nominal, true, nominal tiles, true tiles) of ``simulate.detector.geometry``.

    The nominal tiles are the panels of the file's detector with the config's sensor (thickness and
    attenuation length); the true ones are them moved by :meth:`MultiPanelDetector.moved` (each panel
    up to ``tiles.shift_px`` in its plane, seeded by ``tiles.seed``; all by ``beam_center_offset_px``).
    The single-panel stand-ins carry the pixel size, mean distance, one tile's shape and where the beam
    meets panel 0 (nominal and true, in its own frame, mm) for the truth file. The panels must share one
    shape and one square pixel size (ValueError naming the file otherwise).
    """
    path, tiles, offset = det["geometry"], det["tiles"], tuple(det["beam_center_offset_px"])
    nominal_tiles = MultiPanelDetector.from_file(path, thickness_mm=det["thickness_mm"],
                                                 attenuation_length_mm=det["attenuation_length_mm"])
    try:
        n_slow, n_fast, pixel = nominal_tiles.uniform_panels()
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    true_tiles = nominal_tiles.moved(tiles["shift_px"], tiles["seed"], offset)
    centre_nominal = nominal_tiles.beam_centre_px()[0] * pixel
    centre_true = nominal_tiles.moved(offset_px=offset).beam_centre_px()[0] * pixel

    def stand_in(centre):
        return Detector(n_fast, n_slow, pixel, nominal_tiles.distance_mm, tuple(float(v) for v in centre),
                        det["thickness_mm"], det["attenuation_length_mm"])

    return stand_in(centre_nominal), stand_in(centre_true), nominal_tiles, true_tiles


def shot_spectrum(setup: SimulationSetup, shot_index: int) -> np.ndarray:
    """Photons per channel for one shot."""
    if setup.recorded_spectra is not None:
        if shot_index >= len(setup.recorded_spectra):
            raise SpectrumFileError(f"shot {shot_index}: only {len(setup.recorded_spectra)} recorded spectra were given")
        return setup.recorded_spectra[shot_index]
    return sase_spectrum(setup.sase, setup.energies_ev, shot_rng(setup.seed, shot_index, STREAM_SPECTRUM))


@dataclass
class ShotTruth:
    """What was true for one shot; written to the truth file."""

    shot_index: int
    real_space_matrix: np.ndarray
    mosaic_rotations: np.ndarray
    #: The crystal missed the beam: the image is background and noise only (its crystal is still drawn,
    #: so the crystal fields describe the one that would have been hit).
    blank: bool = False

    def as_json(self, setup: SimulationSetup, photons: np.ndarray) -> dict:
        true_det, nominal = setup.true_detector, setup.nominal_detector
        mean_energy = float(photons @ setup.energies_ev / photons.sum())
        return {
            "shot_index": self.shot_index,
            "blank": self.blank,
            "real_space_a_b_c": self.real_space_matrix.tolist(),
            "unit_cell": list(xtal.unit_cell_from_matrix(self.real_space_matrix)),
            "space_group": "C 1 2 1",
            "ncells_abc": setup.ncells.tolist(),
            "domains_per_crystal": setup.scale,
            "mosaic_rotations": self.mosaic_rotations.tolist(),
            **({} if setup.true_tiles is None else
               {"true_tile_origin_mm": [list(tile.origin_mm) for tile in setup.true_tiles.panels]}),
            "true_beam_center_mm": list(true_det.beam_center_mm),
            "nominal_beam_center_mm": list(nominal.beam_center_mm),
            "true_beam_center_offset_px": [
                (true_det.beam_center_mm[i] - nominal.beam_center_mm[i]) / nominal.pixel_size_mm for i in (0, 1)],
            "total_photons": float(photons.sum()),
            "mean_energy_ev": mean_energy,
        }


def draw_crystal(setup: SimulationSetup, shot_index: int) -> ShotTruth:
    """Random orientation and mosaic domains of one shot, and whether it is a blank."""
    rng = shot_rng(setup.seed, shot_index, STREAM_CRYSTAL)
    rotation = xtal.random_rotation(rng)
    real_space = (rotation @ xtal.orthogonalization_matrix(setup.unit_cell).T).T
    rotations = xtal.mosaic_rotations(setup.n_domains, setup.mosaic_spread_deg, rng, setup.mosaic_model)
    return ShotTruth(shot_index, real_space, rotations,
                     is_blank_shot(setup.seed, shot_index, setup.blank_fraction))


def expected_photons(setup: SimulationSetup, truth: ShotTruth, photons: np.ndarray,
                     include_background: bool = True) -> torch.Tensor:
    """Noise-free photons on the panel (n_slow, n_fast): Bragg spots (none for a blank) plus amorphous
    background."""
    dtype = torch.float64
    beam = Beam(torch.as_tensor(setup.energies_ev, dtype=dtype, device=setup.device),
                torch.as_tensor(photons, dtype=dtype, device=setup.device),
                setup.beam_size_m, setup.polarization_fraction)
    if truth.blank:
        shape = tuple(setup.calibration.shape)
        blank = torch.zeros(shape, dtype=dtype, device=setup.device)
        return blank + setup.background.photons(beam) if include_background and setup.materials else blank
    crystal = CrystalState(
        torch.as_tensor(xtal.domain_matrices(truth.real_space_matrix, truth.mosaic_rotations), dtype=dtype, device=setup.device),
        torch.as_tensor(setup.ncells, dtype=dtype, device=setup.device),
        torch.tensor(setup.scale, dtype=dtype, device=setup.device))
    if setup.true_tiles is None:
        image = bragg_photons_sparse(setup.true_detector, beam, crystal, setup.amplitudes, setup.hkl)
    else:
        image = torch.stack(bragg_photons_sparse(setup.true_tiles, beam, crystal, setup.amplitudes, setup.hkl))
    if include_background and setup.materials:
        image = image + setup.background.photons(beam)
    return image


def detector_images(setup: SimulationSetup, expected: torch.Tensor, shot_index: int) -> dict[str, np.ndarray]:
    """ADU images of one shot for both datasets, sharing every random draw."""
    noisy = effects.draw_noise(expected, setup.calibration, setup.readout,
                               shot_torch_seed(setup.seed, shot_index, STREAM_NOISE))
    if noisy.photons.dim() == 3:  # tiles: the light spreads within a tile
        spread = torch.stack([effects.apply_fiber_psf(tile, setup.psf_fwhm_px, setup.psf_radius_px)
                              for tile in noisy.photons])
    else:
        spread = effects.apply_fiber_psf(noisy.photons, setup.psf_fwhm_px, setup.psf_radius_px)
    return {"nopsf": effects.to_adu(noisy.photons, noisy.readout_adu, setup.readout).cpu().numpy(),
            "psf": effects.to_adu(spread, noisy.readout_adu, setup.readout).cpu().numpy()}


def shard_metadata(setup: SimulationSetup) -> tuple[dict, dict]:
    """Detector and beam attributes of a shard (the nominal geometry the images claim)."""
    det = setup.nominal_detector
    detector = {
        "pixel_size_mm": det.pixel_size_mm, "distance_mm": det.distance_mm,
        "n_fast": det.n_fast, "n_slow": det.n_slow,
        "beam_center_mm": np.asarray(det.beam_center_mm),
        "gain_adu_per_photon": setup.readout.gain_adu_per_photon,
        "adc_offset_adu": setup.readout.adc_offset_adu,
        "trusted_range": np.asarray(TRUSTED_RANGE, dtype=np.float64),
        "thickness_mm": det.thickness_mm, "attenuation_length_mm": det.attenuation_length_mm,
        "material": "Gd2O2S",
    }
    if setup.nominal_tiles is not None:
        tiles = setup.nominal_tiles
        detector.update({
            "n_fast": int(tiles.panels[0].n_fast), "n_slow": int(tiles.panels[0].n_slow), "n_panels": len(tiles),
            "panel_origin_mm": np.array([tile.origin_mm for tile in tiles.panels], dtype=np.float64),
            "panel_fast_axis": np.array([tile.fast_axis for tile in tiles.panels], dtype=np.float64),
            "panel_slow_axis": np.array([tile.slow_axis for tile in tiles.panels], dtype=np.float64)})
    beam = {"polarization_fraction": setup.polarization_fraction,
            "polarization_normal": np.array([0.0, 1.0, 0.0])}
    return detector, beam


def simulate_shard(setup: SimulationSetup, start: int, stop: int, shard_paths: dict[str, str],
                   truth_path: str) -> None:
    """Simulate shots start..stop-1; write both datasets and the truth file, each atomically."""
    shots = list(range(start, stop))
    spectra = np.stack([shot_spectrum(setup, shot) for shot in shots])
    detector_attrs, beam_attrs = shard_metadata(setup)
    progress = Progress(len(shots), f"shard {shard_paths['nopsf']}", log.info, every_n=1, items="shots")
    truths = []
    with contextlib.ExitStack() as stack:
        writers = {dataset: stack.enter_context(open_shard_writer(
            shard_paths[dataset], shot_index=shots, energy_ev=setup.energies_ev, photons_per_channel=spectra,
            detector=detector_attrs, beam=beam_attrs, dataset=dataset)) for dataset in DATASETS}
        for shot, photons in zip(shots, spectra):
            truth = draw_crystal(setup, shot)
            images = detector_images(setup, expected_photons(setup, truth, photons), shot)
            for dataset, writer in writers.items():
                writer.append(images[dataset])
            truths.append(truth.as_json(setup, photons))
            progress.advance()
        with atomic_output(truth_path, "w") as handle:
            json.dump({"seed": setup.seed, "shots": truths}, handle, indent=1)
