"""The driver of the ``pixel_metrology`` stage: the level-0 detector refined from stage 1's pixels.

:func:`run_pixel_metrology` (``spread-pixel-metrology``) takes up to ``pixel_metrology.max_lattices``
lattices that stage 1 refined (converged) in a dataset's annulus shards, in shard and lattice order,
rebuilds their shoeboxes exactly as stage 1 did (:func:`~xfel_spread.stage1.pipeline.prepared_lattices`),
starts each from its stage-1 crystal, and refines the panel jointly with them
(:func:`~xfel_spread.stage1.metrology.refine_detector`). It writes:

``refined_detector.expt``
    An experiment list holding only the refined detector (the annulus experiments' detector with its
    origin moved by the refined beam-centre and distance shifts), the file ``metrology.reference_geometry``
    and ``dials.stills_process``'s ``input.reference_geometry`` take.
``table.tsv``
    The detector before and after: beam centre (fast, slow; px and mm), distance (mm), and the change.
``summary.json``
    The same, with the lattices used, kept and left out (and why), the summed NLL before and after,
    the optimizer's outcome, the refined shift's standard errors (``uncertainty``: ``model`` and
    ``robust``, :func:`~xfel_spread.stage1.metrology.detector_uncertainty`; null where not computed)
    and the wall seconds.
``refinement.png``
    The beam-centre shift (px) and the distance shift (mm), for the report.

The stage refines one detector, every lattice carrying the same starting one (that of the reindex
pass): a single axis-aligned panel (the forward model's), or a tiled detector moved as one rigid body
(every panel by the same laboratory vector: the direct beam ``shift`` pixels further along the
laboratory fast and slow axes, the detector ``shift[2]`` mm further from the sample; in the written
detector the hierarchy's root moves; the table's beam centre is where the beam meets panel 0's plane,
measured from panel 0's origin along the laboratory axes). A detector that does not converge is
still written, with ``converged: false`` and the reason in the summary: the run's user decides
whether to use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from xfel_spread.errors import OptionError, UserInputError
from xfel_spread.sim.geometry import MultiPanelDetector
from xfel_spread.stage1.pipeline import PixelModelOptions

logger = logging.getLogger("xfel_spread.stage1")


class PixelMetrologyError(UserInputError, ValueError):
    """Inputs the pixel metrology cannot use (no converged lattice, several detectors, ...)."""


@dataclass(frozen=True)
class PixelMetrologySettings:
    """The ``pixel_metrology`` config section (``enabled`` only wires the rule in)."""

    max_lattices: int = 200
    refine_distance: bool = True
    max_iterations: int = 2000
    method: str = "profile"
    uncertainty: bool = True

    @classmethod
    def from_config(cls, section: dict) -> PixelMetrologySettings:
        return cls(int(section.get("max_lattices", cls.max_lattices)),
                   bool(section.get("refine_distance", cls.refine_distance)),
                   int(section.get("max_iterations", cls.max_iterations)),
                   str(section.get("method", cls.method)),
                   bool(section.get("uncertainty", cls.uncertainty)))


@dataclass(frozen=True)
class PixelMetrologyInputs(PixelModelOptions):
    """The files and options of one run (the command line of ``spread-pixel-metrology``)."""

    config: str
    annulus_prefixes: Sequence[str]
    shards: Sequence[str]
    stage1_prefixes: Sequence[str]
    refined_detector: str
    table: str
    summary: str
    plot: str
    dataset: str = ""


@dataclass
class Lattice:
    """One lattice of the joint refinement: where it comes from and its shoeboxes."""

    shard: int
    lattice: int
    identifier: str
    shot: object  #: ShotPixels, starting from stage 1's crystal


def stage1_lattices(annulus, grid, stage1_prefix: str, shard: int, wanted: int, shoebox_size_px: int) -> list[Lattice]:
    """Up to ``wanted`` lattices of one annulus shard that stage 1 refined, their shoeboxes rebuilt as
    stage 1 built them, each starting from its stage-1 crystal (``P_refined.expt``)."""
    from dxtbx.model.experiment_list import ExperimentList

    from xfel_spread.io.refined_shots import read_refined_shots
    from xfel_spread.stage1.io import output_paths
    from xfel_spread.stage1.pipeline import prepared_lattices
    from xfel_spread.stage1.rois import real_space_matrix

    paths = output_paths(stage1_prefix)
    for path in (paths["experiments"], paths["shots"]):
        if not path.is_file():
            raise PixelMetrologyError(f"{path}: no such file (stage 1's output)")
    rows = read_refined_shots(paths["shots"])
    refined = ExperimentList.from_file(str(paths["experiments"]), check_format=False)
    if len(rows) != annulus.n_lattices or len(refined) != annulus.n_lattices:
        raise PixelMetrologyError(f"{stage1_prefix}: stage 1 has {len(rows)} rows and {len(refined)} experiments, "
                                  f"the annulus shard {annulus.n_lattices} lattices")
    converged = [position for position, row in enumerate(rows) if row.get("converged") == 1][:wanted]
    lattices = []
    for lattice, shot, _, _ in prepared_lattices(annulus, grid, converged, shoebox_size_px, []):
        shot = replace(shot, real_space_matrix=real_space_matrix(refined[lattice].crystal))
        lattices.append(Lattice(shard, lattice, shot.identifier, shot))
    return lattices


def moved_dials_detector(dials_detector, shift: np.ndarray):
    """A copy of a dxtbx detector with the beam centre moved by ``shift[0:2]`` pixels (fast, slow) and
    the panel moved ``shift[2]`` mm away from the sample: origin x - f p, y + s p, z - d (the forward
    model's beam centre is (-origin_x, origin_y), its distance -origin_z). A multi-panel detector moves
    by the same vector as a whole: its hierarchy's root does, carrying every panel."""
    from dxtbx.model import Detector

    from xfel_spread.stage1.metrology import level0_translation_mm

    detector = Detector.from_dict(dials_detector.to_dict())
    if len(detector) > 1:
        root = detector.hierarchy()
        vector = level0_translation_mm(shift, detector[0].get_pixel_size()[0]).numpy()
        root.set_frame(root.get_fast_axis(), root.get_slow_axis(),
                       tuple(float(a + b) for a, b in zip(root.get_origin(), vector)))
        return detector
    panel = detector[0]
    pixel = panel.get_pixel_size()[0]
    x, y, z = panel.get_origin()
    panel.set_frame(panel.get_fast_axis(), panel.get_slow_axis(),
                    (x - shift[0] * pixel, y + shift[1] * pixel, z - shift[2]))
    return detector


def detector_rows(before, after) -> list[dict]:
    """Beam centre (px, mm) and distance (mm) of two forward-model detectors, and the change (of a
    multi-panel detector: where the direct beam meets panel 0's plane, from panel 0's origin along the
    laboratory fast and slow axes, which its level-0 move shifts by the refined pixels whatever panel 0's
    own axes; and the panels' mean distance)."""
    from xfel_spread.sim.geometry import FAST_AXIS, SLOW_AXIS

    pixel = before.pixel_size_mm

    def centre_mm(detector):
        if isinstance(detector, MultiPanelDetector):
            tables = {name: value.detach().numpy() for name, value in detector.tables("cpu").items()
                      if name in ("fast", "slow")}
            fast_px, slow_px = detector.beam_centre_px()[0]
            along = pixel * (fast_px * tables["fast"][0] + slow_px * tables["slow"][0])
            return np.array([along @ np.asarray(FAST_AXIS), along @ np.asarray(SLOW_AXIS)])
        return np.asarray(detector.beam_center_mm, dtype=np.float64)

    quantities = (("beam_centre_fast_px", lambda d: centre_mm(d)[0] / pixel),
                  ("beam_centre_slow_px", lambda d: centre_mm(d)[1] / pixel),
                  ("beam_centre_fast_mm", lambda d: centre_mm(d)[0]),
                  ("beam_centre_slow_mm", lambda d: centre_mm(d)[1]),
                  ("distance_mm", lambda d: d.distance_mm))
    return [{"quantity": name, "before": float(value(before)), "after": float(value(after)),
             "change": float(value(after) - value(before))} for name, value in quantities]


def write_table(rows: Sequence[dict], path) -> None:
    from xfel_spread.atomic import atomic_output

    with atomic_output(path, "w") as stream:
        stream.write("quantity\tbefore\tafter\tchange\n")
        for row in rows:
            stream.write(f"{row['quantity']}\t{row['before']:.6f}\t{row['after']:.6f}\t{row['change']:.6f}\n")


def plot_refinement(path, dataset: str, shift: np.ndarray, n_lattices: int, converged: bool,
                    sigma: np.ndarray | None = None) -> None:
    """The refined beam-centre shift (px) in the detector plane and the distance shift (mm), with
    ``sigma`` (fast px, slow px, distance mm; the robust standard errors) as error bars when given."""
    from xfel_spread.plotting import pyplot, save_png

    figure, (left, right) = pyplot().subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": (3, 1)})
    reach = max(0.1, 1.3 * float(np.max(np.abs(shift[:2]))))
    left.axhline(0, color="0.8", lw=0.8)
    left.axvline(0, color="0.8", lw=0.8)
    left.annotate("", xy=(shift[0], shift[1]), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": "C0"})
    left.plot([0], [0], "o", color="0.4", label="before (stage 1's detector)")
    left.plot([shift[0]], [shift[1]], "o", color="C0", label=f"after ({shift[0]:+.4f}, {shift[1]:+.4f}) px")
    if sigma is not None:
        left.errorbar([shift[0]], [shift[1]], xerr=[sigma[0]], yerr=[sigma[1]], fmt="none", ecolor="C0", capsize=3,
                      label=f"robust standard error ({sigma[0]:.4f}, {sigma[1]:.4f}) px")
    left.set_xlim(-reach, reach)
    left.set_ylim(-reach, reach)
    left.set_aspect("equal")
    left.set_xlabel("beam-centre shift, fast (px)")
    left.set_ylabel("beam-centre shift, slow (px)")
    left.legend(loc="upper left", fontsize=8)
    distance_sigma = None if sigma is None or not np.isfinite(sigma[2]) else float(sigma[2])
    right.bar([0], [shift[2]], color="C1", yerr=None if distance_sigma is None else [distance_sigma], capsize=4)
    right.axhline(0, color="0.6", lw=0.8)
    right.set_xticks([])
    right.set_ylabel("distance shift (mm)")
    spread_mm = "" if distance_sigma is None else f" +- {distance_sigma:.4f}"
    right.set_title(f"{shift[2]:+.4f}{spread_mm} mm", fontsize=9)
    state = "converged" if converged else "NOT converged"
    figure.suptitle(f"{dataset}: detector from the pixels of {n_lattices} lattices ({state})", fontsize=10)
    save_png(figure, path)


def run_pixel_metrology(inputs: PixelMetrologyInputs) -> dict:
    """Refine the level-0 detector from stage 1's lattices and write the four outputs (module docstring).

    Returns the summary. User errors (missing files, no lattice, several detectors, a multi-panel
    detector) are raised as one-line UserInputErrors."""
    import torch

    from xfel_spread.atomic import atomic_output
    from xfel_spread.config import load_config
    from xfel_spread.dials.metrology import write_detector
    from xfel_spread.sim.forward import AmplitudeLookup
    from xfel_spread.sim.geometry import Detector
    from xfel_spread.stage1.io import load_amplitude_grid, stage1_channels
    from xfel_spread.stage1.metrology import moved_detector, refine_detector
    from xfel_spread.stage1.model import Stage1Settings
    from xfel_spread.stage1.pipeline import check_source, detector_psf, resolve_device
    from xfel_spread.stage1.rois import annulus_on_channels, open_annulus_shard

    if inputs.threads < 1:
        raise OptionError(f"--threads must be at least 1, got {inputs.threads}")
    if not (len(inputs.annulus_prefixes) == len(inputs.shards) == len(inputs.stage1_prefixes)) \
            or not inputs.annulus_prefixes:
        raise OptionError(f"give one --shard and one --stage1-prefix per --annulus-prefix (got "
                          f"{len(inputs.annulus_prefixes)}, {len(inputs.shards)}, {len(inputs.stage1_prefixes)})")
    torch.set_num_threads(inputs.threads)
    config = load_config(inputs.config)
    settings = Stage1Settings.from_config(config["stage1"], inputs.config)
    options = PixelMetrologySettings.from_config(config.get("pixel_metrology", {}))
    check_source(settings.structure_factors, inputs.config, inputs.mtz, inputs.amplitudes)
    psf = detector_psf(inputs.psf_fwhm_mm, inputs.psf_radius_px)
    device = resolve_device(settings.device, 0, inputs.config)

    lattices, grid, first_experiment = [], None, None
    for shard, (annulus_prefix, shard_path, stage1_prefix) in enumerate(
            zip(inputs.annulus_prefixes, inputs.shards, inputs.stage1_prefixes)):
        if len(lattices) >= options.max_lattices:
            break
        annulus = open_annulus_shard(annulus_prefix, shard_path)
        if annulus.n_lattices == 0:
            continue
        annulus = annulus_on_channels(annulus, stage1_channels(settings.structure_factors, annulus.metadata.energy_ev,
                                                               inputs.amplitudes))
        if grid is None:
            grid = load_amplitude_grid(settings.structure_factors, annulus.metadata.energy_ev, inputs.mtz,
                                       inputs.amplitudes,
                                       [experiment.crystal.get_unit_cell().parameters() for experiment in annulus.experiments],
                                       str(annulus.experiments_path))
            first_experiment = annulus.experiments[0]
        lattices += stage1_lattices(annulus, grid, stage1_prefix, shard, options.max_lattices - len(lattices),
                                    settings.shoebox_size_px)
    if not lattices:
        raise PixelMetrologyError(f"{inputs.stage1_prefixes[0]}...: no lattice that stage 1 refined in "
                                  f"{len(inputs.stage1_prefixes)} shard(s); nothing to refine the detector with")
    detectors = {lattice.shot.detector for lattice in lattices}
    if len(detectors) != 1:
        raise PixelMetrologyError(f"{inputs.annulus_prefixes[0]}...: the lattices carry {len(detectors)} different "
                                  "detectors; the detector refinement starts from one")
    start = detectors.pop()
    if isinstance(start, MultiPanelDetector):
        try:
            _ = start.pixel_size_mm
        except ValueError as error:
            raise PixelMetrologyError(f"{inputs.annulus_prefixes[0]}: {error}; the pixel metrology's shift is in "
                                      "pixels of one size") from None
    logger.info("pixel metrology: %d lattices from %d shard(s), device %s, distance %s", len(lattices),
                len(inputs.stage1_prefixes), device, "refined" if options.refine_distance else "fixed")
    amplitudes = AmplitudeLookup(grid, device)
    fit = refine_detector([lattice.shot for lattice in lattices], amplitudes, settings, psf,
                          refine_distance=options.refine_distance, max_iterations=options.max_iterations,
                          method=options.method, uncertainty=options.uncertainty)
    shift = np.asarray(fit.shift, dtype=np.float64)
    after = moved_detector(start, torch.as_tensor(shift, dtype=torch.float64))
    if not isinstance(start, MultiPanelDetector):
        after = Detector(start.n_fast, start.n_slow, start.pixel_size_mm, float(after.distance_mm),
                         tuple(float(v) for v in after.beam_center_mm), start.thickness_mm,
                         start.attenuation_length_mm)
    rows = detector_rows(start, after)

    write_detector(moved_dials_detector(first_experiment.detector, shift), inputs.refined_detector)
    write_table(rows, inputs.table)
    kept = set(fit.kept)
    summary = {
        "dataset": inputs.dataset, "converged": fit.converged, "reason": fit.reason,
        "shift_fast_px": float(shift[0]), "shift_slow_px": float(shift[1]), "shift_distance_mm": float(shift[2]),
        "refine_distance": options.refine_distance, "method": options.method, "detector": rows,
        "n_lattices": len(lattices), "n_kept": len(kept),
        "left_out": [{"shard": lattice.shard, "lattice": lattice.lattice, "identifier": lattice.identifier,
                      "reason": fit.single_fits[position].reason}
                     for position, lattice in enumerate(lattices) if position not in kept],
        # NaN when no lattice converged on the starting detector: null, as JSON has no NaN.
        "nll_start": _finite_or_none(fit.nll_start), "nll_final": _finite_or_none(fit.nll_final), "iterations": fit.n_iterations,
        "evaluations": fit.n_evaluations, "seconds": fit.seconds,
        "uncertainty": {"model": _sigmas(fit.sigma_model), "robust": _sigmas(fit.sigma_robust)},
    }
    with atomic_output(inputs.summary, "w") as stream:
        json.dump(summary, stream, indent=1)
    plot_refinement(inputs.plot, inputs.dataset, shift, len(kept), fit.converged, fit.sigma_robust)
    return summary


def _sigmas(sigma) -> dict | None:
    """Standard errors (fast px, slow px, distance mm) as a JSON object; None where not computed."""
    if sigma is None:
        return None
    return {name: _finite_or_none(value) for name, value in zip(("fast_px", "slow_px", "distance_mm"), sigma)}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
