"""DIALS experiment lists (``.expt``, JSON) and the reflection tables (``.refl``) that go with them.

Stages that need only a few fields of each experiment (identifiers, crystal vectors, space groups,
beams) read the experiment list as its JSON document rather than building dxtbx models: building and
writing 500 stills lattices as models takes about 1.5 s, their JSON 0.06 s, which matters over a few
hundred shards (and at 100,000 lattices, minutes). A document is a dict with the list
``experiment``, whose entries refer by position to the model lists (``beam``, ``crystal``, ...).

:func:`load_experiment_json` is the one place such a file is parsed; each stage words its own error
for a file that is not readable or not an experiment list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from xfel_spread.atomic import atomic_output, atomic_path
from xfel_spread.errors import UserInputError

#: Lists of models in a DIALS experiment-list document that experiments refer to by position.
MODEL_LISTS = ("beam", "detector", "goniometer", "scan", "crystal", "profile", "scaling_model", "imageset")
#: Fields of an image-set entry that may hold file names relative to the document's directory.
IMAGESET_PATH_FIELDS = ("images", "template", "mask", "gain", "pedestal", "dx", "dy")
#: Reflection-table columns :func:`read_lattices` requires of a non-empty table.
REQUIRED_REFLECTION_COLUMNS = ("id", "d", "bbox", "miller_index", "flags")


class ExperimentListError(UserInputError, ValueError):
    """An experiment list, or its reflection table, that cannot be used; the message names it in one line."""


def load_experiment_json(path: str | os.PathLike) -> dict:
    """The JSON document of an experiment-list file, as parsed and not yet checked.

    Raises OSError if the file cannot be read and ValueError (``json.JSONDecodeError``,
    ``UnicodeDecodeError``) if it is not JSON; the caller words the error for its stage.
    """
    with open(path, "rb") as stream:
        return json.load(stream)


def first_line(error: Exception) -> str:
    """The first line of an exception's text, or its type's name if it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_experiment_document(path: str | os.PathLike) -> dict:
    """A DIALS experiment list (.expt) as its JSON document, image file names made absolute.

    Raises ExperimentListError if the file cannot be read or is not an experiment list.
    """
    try:
        document = load_experiment_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExperimentListError(f"{path}: cannot read experiments ({first_line(exc)})") from None
    if not isinstance(document, dict) or document.get("__id__") != "ExperimentList":
        raise ExperimentListError(f"{path}: not a DIALS experiment list")
    directory = Path(path).resolve().parent
    for imageset in document.get("imageset", []):
        for name in IMAGESET_PATH_FIELDS:
            value = imageset.get(name)
            if isinstance(value, str):
                imageset[name] = str(directory / value)
            elif name == "images" and isinstance(value, list):
                imageset[name] = [str(directory / image) for image in value]
    return document


def experiment_identifiers(document: dict) -> list[str]:
    """The experiments' identifiers, in order."""
    return [experiment.get("identifier", "") for experiment in document.get("experiment", [])]


def subset_document(document: dict, positions: Sequence[int]) -> dict:
    """The experiment-list document of the experiments at ``positions`` (in that order), holding only
    the models they use, renumbered."""
    subset = {"__id__": "ExperimentList", "experiment": []}
    renumbering = {name: {} for name in MODEL_LISTS}
    for name in MODEL_LISTS:
        subset[name] = []
    for position in positions:
        experiment = dict(document["experiment"][int(position)])
        for name in MODEL_LISTS:
            if experiment.get(name) is None:
                continue
            old = experiment[name]
            if old not in renumbering[name]:
                renumbering[name][old] = len(subset[name])
                subset[name].append(document[name][old])
            experiment[name] = renumbering[name][old]
        subset["experiment"].append(experiment)
    return subset


def read_lattices(experiments_path: str | os.PathLike, reflections_path: str | os.PathLike):
    """Integrated lattices (experiment-list document) and their reflections; checks they belong together.

    Raises ExperimentListError naming the file that cannot be read or does not match the other.
    """
    from dials.array_family import flex

    document = read_experiment_document(experiments_path)
    try:
        reflections = flex.reflection_table.from_file(str(reflections_path))
    except Exception as exc:  # DIALS raises RuntimeError or msgpack errors
        raise ExperimentListError(f"{reflections_path}: cannot read reflections ({first_line(exc)})") from None
    if reflections.size() == 0:
        return document, reflections
    missing = [name for name in REQUIRED_REFLECTION_COLUMNS if name not in reflections]
    if missing:
        raise ExperimentListError(f"{reflections_path}: reflection table lacks column(s) {', '.join(missing)}")
    identifiers = experiment_identifiers(document)
    for index, identifier in dict(reflections.experiment_identifiers()).items():
        if index >= len(identifiers) or identifiers[index] != identifier:
            raise ExperimentListError(f"{reflections_path}: experiment {index} ({identifier}) is not the one in "
                                      f"{experiments_path}")
    return document, reflections


def select_lattices(document: dict, reflections, identifiers: Iterable[str],
                    d_range: tuple[float, float] | None = None, limit: int | None = None):
    """The given lattices and their integrated reflections, optionally only those with d_min <= d < d_max.

    ``d_range`` is (d_max, d_min). Lattices keep their order; those left without a reflection are
    dropped, at most ``limit`` are kept, and the reflections' ``id`` is renumbered to the positions in
    the returned experiment list, with the identifier map to match. Returns (document, reflections).
    """
    from dials.array_family import flex

    wanted = set(identifiers)
    names = experiment_identifiers(document)
    if reflections.size() == 0 or not wanted:
        return subset_document(document, []), flex.reflection_table()
    ids = reflections["id"].as_numpy_array()
    keep_experiment = np.array([name in wanted for name in names], dtype=bool)
    keep = (ids >= 0) & (ids < len(names))
    keep[keep] = keep_experiment[ids[keep]]
    keep &= reflections.get_flags(reflections.flags.integrated, all=False).as_numpy_array()
    if d_range is not None:
        d = reflections["d"].as_numpy_array()
        keep &= (d >= d_range[1]) & (d < d_range[0])

    present = np.unique(ids[keep])
    if limit is not None:
        present = present[:limit]
        keep &= np.isin(ids, present)
    new_id = np.full(len(names), -1, dtype=np.int64)
    new_id[present] = np.arange(len(present))

    selected = reflections.select(flex.bool(keep))
    selected["id"] = flex.int(new_id[ids[keep]].astype(np.int32))
    for old_index in list(selected.experiment_identifiers().keys()):
        del selected.experiment_identifiers()[old_index]
    for position, old_index in enumerate(present):
        selected.experiment_identifiers()[position] = names[int(old_index)]
    return subset_document(document, present), selected


def write_lattices(document: dict, reflections, experiments_path, reflections_path) -> None:
    """Write an experiment-list document and its reflections, each atomically."""
    with atomic_output(experiments_path, "w") as stream:
        stream.write(json.dumps(document))  # one call, so that json's C encoder does the work
    with atomic_path(reflections_path) as temporary:
        reflections.as_file(str(temporary))
