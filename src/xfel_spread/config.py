"""Pipeline configuration: read YAML, fill in the schema's defaults, validate, report problems in one line.

The schema (``xfel_spread/data/schema.yaml``, shipped with the package) gives every key a description
and a default, so a config file only needs the keys it changes. Problems are raised as
:class:`ConfigError`, whose message is a single line ``FILE: dotted.key.path: problem``.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.resources
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from xfel_spread.errors import UserInputError

#: The two datasets every simulated shard is written as: without and with the detector point-spread
#: function. Fixed by the pipeline's purpose, so deliberately not a config key.
DATASETS = ("nopsf", "psf")

#: The one dataset of a run on images from elsewhere (input.source: images).
IMAGE_DATASET = "images"

#: Stages (STAGE_SECTIONS keys) whose settings only a run on images from elsewhere uses.
IMAGE_ONLY_STAGES = ("images",)

#: Stands in for the key path when a problem concerns the whole document.
TOP_LEVEL = "<top level>"


class ConfigError(UserInputError, ValueError):
    """A configuration that cannot be used; ``str()`` is one line naming the file and the key."""


@functools.cache
def load_schema() -> dict:
    """The configuration JSON Schema, parsed from the package data."""
    schema_text = importlib.resources.files("xfel_spread").joinpath("data/schema.yaml").read_text()
    return yaml.safe_load(schema_text)


def load_config(path_or_dict: str | Path | Mapping, source_name: str | None = None) -> dict:
    """Return the validated configuration with every default filled in.

    ``path_or_dict`` is a YAML file or an already-parsed mapping (e.g. Snakemake's ``config``); it is
    not modified. ``source_name`` is the file name used in error messages; it defaults to the path, or
    to ``"<config>"`` for a mapping.
    """
    if isinstance(path_or_dict, Mapping):
        source = source_name or "<config>"
        document = copy.deepcopy(dict(path_or_dict))
    else:
        source = source_name or str(path_or_dict)
        document = _read_yaml(Path(path_or_dict), source)

    if document is None:  # an empty file: all defaults
        document = {}
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: {TOP_LEVEL}: expected a mapping of keys, got {type(document).__name__}")

    schema = load_schema()
    config = fill_defaults(document, schema)
    problem = first_problem(config, schema)
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    return config


def fill_defaults(value: Any, schema: Mapping) -> Any:
    """Copy of ``value`` with the schema's defaults added for absent keys, recursively.

    Nested objects whose parent key is absent start from their own default (``{}``) and are then
    filled too. Values of the wrong type are returned as they are, for validation to report.
    """
    if schema.get("type") != "object" or not isinstance(value, Mapping):
        return value
    filled = dict(value)
    for key, key_schema in schema.get("properties", {}).items():
        if key not in filled and "default" in key_schema:
            filled[key] = copy.deepcopy(key_schema["default"])
        if key in filled:
            filled[key] = fill_defaults(filled[key], key_schema)
    return filled


def first_problem(config: Mapping, schema: Mapping) -> str | None:
    """``"key.path: problem"`` for the first schema violation (by key path), or None if valid."""
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda error: _sort_key(error.absolute_path))
    if not errors:
        return None
    problem = _describe(errors[0])
    if len(errors) > 1:
        problem += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return problem


def shard_ranges(n_shots: int, shots_per_shard: int) -> list[tuple[int, int]]:
    """Half-open shot-index ranges ``(start, stop)``, one per shard; the last shard may be shorter."""
    if n_shots < 1 or shots_per_shard < 1:
        raise ValueError(f"need n_shots >= 1 and shots_per_shard >= 1, got {n_shots} and {shots_per_shard}")
    n_shards = math.ceil(n_shots / shots_per_shard)
    return [(index * shots_per_shard, min((index + 1) * shots_per_shard, n_shots)) for index in range(n_shards)]


def modelled_psf(dataset: str, config: Mapping) -> tuple[float, int] | None:
    """(FWHM mm, kernel radius px) of the point spread the pixel refinement models for ``dataset``:
    the one its images were made with (``simulate.detector``) for the psf dataset when
    ``stage1.model_detector_psf`` is on; None otherwise. ``config`` holds the ``simulate`` and
    ``stage1`` sections, defaults filled. (Kept here, free of torch, for the Snakefile.)
    """
    detector = config["simulate"]["detector"]
    if dataset != "psf" or not config["stage1"]["model_detector_psf"] or detector["psf_fwhm_mm"] <= 0:
        return None
    return detector["psf_fwhm_mm"], detector["psf_radius_px"]


def _read_yaml(path: Path, source: str) -> Any:
    """Parse a YAML file, turning I/O and syntax errors into one-line :class:`ConfigError`."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config file: {error.strerror or error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: {_describe_yaml_error(error)}") from None


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """One-line summary of a PyYAML error (its own str() spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}invalid YAML: {problem}"


def _describe(error: jsonschema.ValidationError) -> str:
    """``"key.path: problem"`` for one validation error, naming the offending key for unknown keys."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(str(key) for key in error.instance if key not in allowed)
        if unknown:
            suggestion = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f" (did you mean {suggestion[0]!r}?)" if suggestion else f"; allowed keys: {', '.join(allowed)}"
            return f"{_dotted(path + [unknown[0]])}: unknown key{hint}"
    return f"{_dotted(path)}: {error.message}"


def _dotted(path: list) -> str:
    """``simulate.detector.beam_center_offset_px[0]`` style rendering of a key path."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or TOP_LEVEL


def _sort_key(path) -> list[str]:
    """Order errors by key path so the reported one does not depend on validator internals."""
    return [str(part) for part in path]


#: Config sections each stage reads. A stage's settings file holds exactly these, so editing any
#: other section leaves the stage (and its outputs) untouched. Shard bookkeeping (n_shots,
#: shots_per_shard) is left out of `simulate`: a shard's content depends only on its shots.
STAGE_SECTIONS = {
    "structure_factors": {"structure_factors": None},
    "simulate": {"structure_factors": None, "simulate": ("n_shots", "shots_per_shard")},
    # The phil file is the rule's input (edits rerun through its modification time), not a setting.
    "metrology": {"metrology": ("phil",)},
    "cells": {"cells": None},
    # The cross-check has its own settings file, so editing it leaves our merge alone.
    "merge": {"merge": ("dials_crosscheck",)},
    "dials_merge": {"merge": None},
    "annulus": {"annulus": None},
    "stage1": {"stage1": None},
    # The pixel metrology refines stage 1's lattices again with its settings; `enabled` only wires the rule in.
    "pixel_metrology": {"pixel_metrology": ("enabled",), "stage1": None},
    # SPREAD rebuilds stage 1's shoeboxes and forward model and the simulation's site decomposition.
    # `enabled` only wires the stage into the default target.
    "spread": {"spread": ("enabled",), "stage1": None, "structure_factors": None},
    # Measuring shards (lit pixels, radial profiles, powder) and choosing the threshold read separate keys,
    # so a new threshold reuses the measurements; `enabled` only wires the stage into the workflow.
    # Image-list shards: how spectra and the mask are found; the file list and its sharding are shard
    # bookkeeping (the rule's params), like simulate's n_shots and shots_per_shard.
    "images": {"input": ("images", "shots_per_shard", "reference_geometry", "model", "source")},
    "hitfind_shard": {"hitfind": ("enabled", "lit_pixel_floor", "min_separation_decades", "min_lit_pixels")},
    "hitfind": {"hitfind": ("enabled", "lit_pixel_sigma", "lit_pixel_min_photons", "radial_bin_px",
                            "ring_q_range_inv_a")},
}


def stage_settings(config: Mapping, stage: str) -> dict:
    """The part of a validated ``config`` that stage ``stage`` depends on."""
    settings = {}
    for section, excluded in STAGE_SECTIONS[stage].items():
        settings[section] = {key: value for key, value in config[section].items() if key not in (excluded or ())}
    return settings


def write_settings(settings: Mapping, path: str | Path) -> None:
    """Write a stage's settings as YAML, atomically."""
    from xfel_spread.atomic import atomic_output

    with atomic_output(path, "w") as handle:
        yaml.safe_dump(dict(settings), handle, sort_keys=True)
