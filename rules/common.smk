# Shared by all rule files: config validation, output paths, shard bookkeeping, command location.

import os
import shlex
import sys

from xfel_spread.config import DATASETS, ConfigError, load_config, shard_ranges
from xfel_spread.reference import REFERENCE_NAMES


def config_source_name():
    """The config files that made up `config`, in merge order (later override earlier), plus --config."""
    command_line_files = {str(path) for path in workflow.overwrite_configfiles}
    # workflow.configfiles lists the --configfile files before the Snakefile's own; put that one first.
    files = sorted(map(str, workflow.configfiles), key=lambda path: path in command_line_files)
    sources = [display_path(path) for path in files]
    if workflow.config_settings.config:
        sources.append("--config")
    return " + ".join(sources) or "<config>"


def display_path(path):
    """`path` relative to the working directory when it lies inside it, else absolute."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.path.abspath(path)


try:
    # Update in place: the rules read Snakemake's own `config` object.
    config.update(load_config(config, source_name=config_source_name()))
except ConfigError as error:
    sys.exit(f"Config error: {error}")

OUTPUT_DIR = os.path.normpath(config["output_dir"])
LOG_DIR = os.path.normpath(config["log_dir"])
REFERENCE_DIR = os.path.normpath(config["reference"]["dir"])
# (start, stop) shot indices of each shard; shard i holds shots start..stop-1.
SHARD_RANGES = shard_ranges(config["simulate"]["n_shots"], config["simulate"]["shots_per_shard"])


# Shell-quoted directory of the environment's commands (spread-*), next to the Python running Snakemake.
# Rules write "{ENV_BIN}/spread-..." so they work from .venv/bin/snakemake without an activated venv and
# cluster jobs use the submitting environment. Named, not inlined, so moving the venv does not change
# the rules' shell text (which the `code` rerun trigger compares).
ENV_BIN = shlex.quote(os.path.dirname(sys.executable))


def reference_path(name):
    """Where the pipeline keeps its verified copy of reference file `name`."""
    return f"{REFERENCE_DIR}/{name}"


def shard_path(dataset, index):
    """Simulated shard `index` of `dataset` (nopsf or psf)."""
    return f"{OUTPUT_DIR}/sim/{dataset}/shard_{index:05d}.h5"


#: The report's own figures (rules/report.smk), one of each per dataset.
REPORT_FIGURES = ("shot", "detector_refinement")


def report_plot(figure, dataset="{dataset}"):
    """Report figure `figure` of `dataset` (a {dataset} wildcard unless given)."""
    return f"{OUTPUT_DIR}/report/{dataset}_{figure}.png"


def final_targets():
    """Everything `rule all` asks for: the reference files, every shard of both datasets, the score
    tables of the DIALS chain, merging and both pixel refinements (which pull in index, metrology,
    reindex, the cell analysis, the merge and the annulus), the annulus summaries and the report's figures."""
    references = [reference_path(name) for name in REFERENCE_NAMES]
    shards = [shard_path(dataset, index) for dataset in DATASETS for index in range(len(SHARD_RANGES))]
    scores = [f"{OUTPUT_DIR}/score/{stage}_{dataset}.tsv"
              for stage in ("dials", "merge", "stage1", "exa") for dataset in DATASETS]
    annulus = [f"{OUTPUT_DIR}/annulus/{dataset}/summary.json" for dataset in DATASETS]
    figures = [report_plot(figure, dataset) for figure in REPORT_FIGURES for dataset in DATASETS]
    hitfind = [f"{OUTPUT_DIR}/{path}" for dataset in DATASETS
               for path in (f"score/hitfind_{dataset}.tsv", f"hitfind/{dataset}/powder.json")] if HITFIND else []
    return references + shards + scores + annulus + figures + hitfind


#: Whether the hitfind stage runs and index/reindex take only its hits.
HITFIND = config["hitfind"]["enabled"]


def hits_table_input():
    """index/reindex input `hits`: the shard's hits table when hitfind is enabled, else nothing."""
    return {"hits": f"{OUTPUT_DIR}/hitfind/{{dataset}}/shard_{{index}}_hits.tsv"} if HITFIND else {}


def hits_table_option(wildcards, input):
    """index/reindex option giving spread-stills-process the hits table (empty when hitfind is off)."""
    return f"--hits-table {shlex.quote(input.hits)}" if HITFIND else ""


def workflow_file(path):
    """`path` itself when it exists (absolute, or relative to the working directory), else the same
    relative path inside the workflow's directory, where the shipped config/*.phil files live."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return display_path(os.path.join(workflow.basedir, path))


for section in ("index", "metrology"):
    config[section]["phil"] = workflow_file(config[section]["phil"])


def check_phil_files():
    """Stop before any job if a DIALS phil file has an unknown parameter or a bad value."""
    from xfel_spread.dials.phil import PhilFileError, check_phil_file

    try:
        check_phil_file(config["index"]["phil"], "stills_process")
        check_phil_file(config["metrology"]["phil"], "refine")
    except PhilFileError as error:
        sys.exit(f"Phil error: {error}")


check_phil_files()


def check_metrology_engine():
    """Stop before any job if the refinement engine cannot run (missing, or too many lattices)."""
    from xfel_spread.dials.metrology import MetrologyError, plan_refinement

    try:
        plan_refinement(config["metrology"]["engine"], config["metrology"]["max_lattices"])
    except MetrologyError as error:
        sys.exit(f"Config error: {config_source_name()}: {error}")


check_metrology_engine()


def check_saved_detector():
    """Stop before any job if metrology.reference_geometry names a file that is not there, or one that
    this run's metrology writes (a job that needs its own output)."""
    path = config["metrology"]["reference_geometry"]
    if path is None:
        return
    if not os.path.isfile(path):
        sys.exit(f"Config error: {config_source_name()}: metrology.reference_geometry: {path}: no such file")
    metrology_dir = os.path.abspath(f"{OUTPUT_DIR}/metrology")
    if os.path.commonpath([os.path.abspath(path), metrology_dir]) == metrology_dir:
        sys.exit(f"Config error: {config_source_name()}: metrology.reference_geometry: {path} is written by this "
                 "run's metrology; copy it elsewhere first")


check_saved_detector()


def stills_prefix(stage, dataset, index):
    """Output prefix of shard `index` of `dataset` in a stills_process stage (index or reindex)."""
    return f"{OUTPUT_DIR}/{stage}/{dataset}/shard_{index:05d}"


def stills_outputs(stage):
    """A stills_process rule's outputs, by name, with {dataset} and {index} wildcards."""
    from xfel_spread.dials.stills import OUTPUT_SUFFIXES

    prefix = f"{OUTPUT_DIR}/{stage}/{{dataset}}/shard_{{index}}"
    return {name: prefix + suffix for name, suffix in OUTPUT_SUFFIXES.items()}


def stills_prefixes(stage, dataset):
    """Output prefixes of every shard of `dataset` in a stills_process stage, in shard order."""
    return [stills_prefix(stage, dataset, index) for index in range(len(SHARD_RANGES))]


def stills_output_of_all_shards(stage, name):
    """Input function: output `name` of every shard of the job's dataset in `stage`."""
    from xfel_spread.dials.stills import OUTPUT_SUFFIXES

    def paths(wildcards):
        return [prefix + OUTPUT_SUFFIXES[name] for prefix in stills_prefixes(stage, wildcards.dataset)]

    return paths


def repeated_option(option, values):
    """`option value` once per value, shell-quoted: how spread-* commands take one path per shard."""
    return " ".join(f"{option} {shlex.quote(str(value))}" for value in values)
