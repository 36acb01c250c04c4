"""What the Snakefile checks while it parses, before it plans any job.

rules/common.smk calls :func:`run_config` (validate the config, fill in defaults, find the phil files)
and then :func:`check_run_settings` (the phil files, the metrology engine, a saved detector). Each
refusal is a :class:`RunSettingsError` whose message is the one line the run stops with. Both run at
every parse, so this module imports no torch and only what each check needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from xfel_spread.config import ConfigError, load_config
from xfel_spread.errors import UserInputError

#: Config sections whose ``phil`` file may be given relative to the workflow's directory.
PHIL_SECTIONS = ("index", "metrology")


class RunSettingsError(UserInputError):
    """A run the pipeline refuses at parse time; the message is one line (``Config error: ...`` or
    ``Phil error: ...``) naming the file."""


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.path.abspath(path)


def workflow_file(path: str, basedir: str) -> str:
    """``path`` itself when it exists (absolute, or relative to the working directory), else the same
    relative path inside the workflow's directory ``basedir``, where the shipped config/*.phil files live."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return display_path(os.path.join(basedir, path))


def run_config(config: Mapping, source_name: str, basedir: str) -> dict:
    """``config`` validated, with defaults filled in and its phil paths resolved by :func:`workflow_file`.

    Raises RunSettingsError ``Config error: SOURCE: key.path: problem`` for a config the schema refuses.
    """
    try:
        settled = load_config(config, source_name=source_name)
    except ConfigError as error:
        raise RunSettingsError(f"Config error: {error}") from None
    for section in PHIL_SECTIONS:
        settled[section]["phil"] = workflow_file(settled[section]["phil"], basedir)
    return settled


def check_run_settings(config: Mapping, source_name: str, output_dir: str) -> None:
    """Raise RunSettingsError unless the run can start: its phil files are valid DIALS parameter files,
    its metrology engine can run, and any saved detector exists and is not one this run writes.

    ``config`` is what :func:`run_config` returned; ``source_name`` names the config files in messages.
    """
    check_phil_files(config)
    check_metrology_engine(config, source_name)
    check_saved_detector(config, source_name, output_dir)
    check_tiles(config, source_name)
    check_model(config, source_name)


#: ``input.model`` of a run with no model of its crystal.
NO_MODEL = "none"


def check_model(config: Mapping, source_name: str) -> None:
    """Refuse an ``input.model`` the run cannot use: a model given to a simulation (which renders LY99's
    1M2A), or ``none`` (no model at all) with a stage set to need one. (A model file that does not exist
    is refused with the other input files, :func:`plan_image_shots`.)"""
    model = config["input"]["model"]
    simulated = config["input"]["source"] == "simulate"
    if model is None:
        return
    if model != NO_MODEL:
        if simulated:
            raise RunSettingsError(f"Config error: {source_name}: input.model: {model}: a model is for images from "
                                   "elsewhere; the simulation renders LY99's 1M2A (leave input.model null)")
        return
    needs = (("input.source", "simulate", simulated, "images"),
             ("merge.reference", "model", config["merge"]["reference"] == "model", "data"),
             ("stage1.structure_factors", "model", config["stage1"]["structure_factors"] == "model", "merged"),
             ("spread.enabled", "true", bool(config["spread"]["enabled"]), "false"))
    for key, value, needed, instead in needs:
        if needed:
            raise RunSettingsError(f"Config error: {source_name}: input.model is none, but {key} is {value}, which "
                                   f"needs a model; give input.model or set {key}: {instead}")


def check_tiles(config: Mapping, source_name: str) -> None:
    """Refuse tiles of unequal shapes (simulate.detector.tiles; the shard stores them as one array).
    Hit finding reads tiled shards (every panel from its own frame, ``hitfind.radial``). A detector
    geometry file (simulate.detector.geometry) must be one the simulator can render, without tiles."""
    detector = config["simulate"]["detector"]
    tiles = detector["tiles"]
    if detector["geometry"] is not None and config["input"]["source"] == "simulate":
        check_geometry(detector, source_name)
    if tiles["fast"] == 1 and tiles["slow"] == 1:
        return
    from xfel_spread.sim.geometry import Detector
    from xfel_spread.sim.shard import detector_tiles

    panel = Detector(detector["n_fast"], detector["n_slow"], detector["pixel_size_mm"], detector["distance_mm"],
                     (0.0, 0.0))
    try:
        detector_tiles(tiles, panel, panel)
    except ValueError as error:
        raise RunSettingsError(f"Config error: {source_name}: {error}") from None


def check_geometry(detector: Mapping, source_name: str) -> None:
    """Refuse a simulate.detector.geometry the simulator cannot render (unreadable, panels of several
    shapes or pixel sizes) or given with tiles."""
    from xfel_spread.sim.shard import geometry_tiles

    tiles = detector["tiles"]
    if tiles["fast"] != 1 or tiles["slow"] != 1:
        raise RunSettingsError(f"Config error: {source_name}: simulate.detector.geometry and simulate.detector.tiles "
                               f"{tiles['fast']} x {tiles['slow']} are both given; the geometry file names the panels")
    if not os.path.isfile(detector["geometry"]):
        raise RunSettingsError(f"Config error: {source_name}: simulate.detector.geometry: {detector['geometry']}: "
                               "no such file")
    try:
        geometry_tiles(detector)
    except ValueError as error:
        raise RunSettingsError(f"Config error: {source_name}: simulate.detector.geometry: {error}") from None


def check_phil_files(config: Mapping) -> None:
    """Refuse a DIALS phil file with an unknown parameter or a bad value (``Phil error: PATH: problem``)."""
    from xfel_spread.dials.phil import PhilFileError, check_phil_file

    try:
        check_phil_file(config["index"]["phil"], "stills_process")
        check_phil_file(config["metrology"]["phil"], "refine")
    except PhilFileError as error:
        raise RunSettingsError(f"Phil error: {error}") from None


def check_metrology_engine(config: Mapping, source_name: str) -> None:
    """Refuse a refinement engine that cannot run here (missing, or too many lattices for it)."""
    from xfel_spread.dials.metrology import MetrologyError, plan_refinement

    try:
        plan_refinement(config["metrology"]["engine"], config["metrology"]["max_lattices"])
    except MetrologyError as error:
        raise RunSettingsError(f"Config error: {source_name}: {error}") from None


def check_saved_detector(config: Mapping, source_name: str, output_dir: str) -> None:
    """Refuse a metrology.reference_geometry that is not there, or one this run's metrology writes under
    ``output_dir`` (a job that would need its own output)."""
    path = config["metrology"]["reference_geometry"]
    if path is None:
        return
    if not os.path.isfile(path):
        raise RunSettingsError(f"Config error: {source_name}: metrology.reference_geometry: {path}: no such file")
    metrology_dir = os.path.abspath(f"{output_dir}/metrology")
    if os.path.commonpath([os.path.abspath(path), metrology_dir]) == metrology_dir:
        raise RunSettingsError(f"Config error: {source_name}: metrology.reference_geometry: {path} is written by "
                               "this run's metrology; copy it elsewhere first")


def plan_image_shots(config: Mapping, source_name: str) -> list:
    """Every shot (:class:`xfel_spread.io.images.Shot`) of ``input.images``, for a run on images from
    elsewhere, after checking the files the ``input`` section names. Globs are expanded and sorted; only
    multi-image containers are opened (to count frames), so 100,000 single-image files plan in a second.

    Raises RunSettingsError ``Input error: SOURCE: input.KEY: problem`` (one line)."""
    from xfel_spread.io.images import ImageInputError, list_images

    settings = config["input"]

    def refuse(key: str, problem: str):
        return RunSettingsError(f"Input error: {source_name}: input.{key}: {problem}")

    if not settings["images"]:
        raise refuse("images", "source: images needs at least one file or glob")
    if settings["spectra"] == "table" and settings["spectra_table"] is None:
        raise refuse("spectra_table", "spectra: table needs the table's path")
    for key in ("spectra_table", "mask", "reference_geometry", "model"):
        if key == "model" and settings[key] == NO_MODEL:
            continue
        if settings[key] is not None and not os.path.isfile(settings[key]):
            raise refuse(key, f"{settings[key]}: no such file")
    try:
        return list_images(settings["images"])
    except ImageInputError as error:
        raise refuse("images", str(error)) from None




def grid_stage_runs(config: Mapping) -> bool:
    """Whether a stage that evaluates each shot's spectrum on the structure-factor channels
    (structure_factors.channel_start_ev, channel_step_ev, n_channels) runs: SPREAD (spread.enabled), or the
    pixel refinements with stage1.structure_factors model."""
    return bool(config["spread"]["enabled"]) or config["stage1"]["structure_factors"] == "model"


def channel_grid_option(config: Mapping) -> str:
    """``--channel-grid START STEP N`` (the structure_factors channels) for the image_shard command when the
    run uses images from elsewhere and :func:`grid_stage_runs`, so a shard whose spectra lie outside the grid
    stops where it is made rather than when SPREAD reads it; else "" (no check: e.g. monochromatic images at
    another energy, indexed and merged without a model, spread.enabled false)."""
    if config["input"]["source"] != "images" or not grid_stage_runs(config):
        return ""
    grid = config["structure_factors"]
    return f"--channel-grid {grid['channel_start_ev']!r} {grid['channel_step_ev']!r} {grid['n_channels']}"
