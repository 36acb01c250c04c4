# Shared by every rules/*.smk file and included before them: config validation and the parse-time checks, output
# paths, shard bookkeeping, wildcard constraints, command location and every helper the rules call.

import os
import shlex
import sys

from xfel_spread.config import DATASETS, IMAGE_DATASET, modelled_psf, shard_ranges
from xfel_spread.reference import REFERENCE_NAMES
from xfel_spread.io.images import shots_digest
from xfel_spread.workflow import NO_MODEL, RunSettingsError, check_run_settings, display_path, run_config


def config_source_name():
    """The config files that made up `config`, in merge order (later override earlier), plus --config."""
    command_line_files = {str(path) for path in workflow.overwrite_configfiles}
    # workflow.configfiles lists the --configfile files before the Snakefile's own; put that one first.
    files = sorted(map(str, workflow.configfiles), key=lambda path: path in command_line_files)
    sources = [display_path(path) for path in files]
    if workflow.config_settings.config:
        sources.append("--config")
    return " + ".join(sources) or "<config>"


try:
    # Update in place: the rules read Snakemake's own `config` object.
    config.update(run_config(config, config_source_name(), workflow.basedir))
except RunSettingsError as error:
    sys.exit(str(error))

OUTPUT_DIR = os.path.normpath(config["output_dir"])
LOG_DIR = os.path.normpath(config["log_dir"])
REFERENCE_DIR = os.path.normpath(config["reference"]["dir"])
#: Whether the shots are simulated (input.source: simulate) or images from elsewhere (input.source: images).
SIMULATED = config["input"]["source"] == "simulate"

if SIMULATED:
    RUN_DATASETS = DATASETS
    # (start, stop) shot indices of each shard; shard i holds shots start..stop-1.
    SHARD_RANGES = shard_ranges(config["simulate"]["n_shots"], config["simulate"]["shots_per_shard"])
    IMAGE_SHOTS = []
else:
    from xfel_spread.workflow import plan_image_shots

    try:
        # Every (file, frame) of input.images, globs expanded; no image file is opened except containers.
        IMAGE_SHOTS = plan_image_shots(config, config_source_name())
    except RunSettingsError as error:
        sys.exit(str(error))
    RUN_DATASETS = (IMAGE_DATASET,)
    SHARD_RANGES = shard_ranges(len(IMAGE_SHOTS), config["input"]["shots_per_shard"])

def demo_config_loaded():
    """Whether one of the config files that made up `config` is the repository's config/config.yaml."""
    demo = os.path.join(workflow.basedir, "config", "config.yaml")
    return any(os.path.isfile(path) and os.path.samefile(path, demo) for path in map(str, workflow.configfiles))


if workflow.is_main_process and not os.path.exists("config/config.yaml") and not demo_config_loaded():
    # The Snakefile's `configfile:` is relative to the working directory: run with --directory elsewhere
    # and a --configfile, Snakemake skips it without a word, and the schema's defaults fill in (unless
    # the --configfile files name the demo's config themselves).
    print(f"Note: no config/config.yaml in the working directory {os.getcwd()}, so the demo's config is not "
          f"loaded: the run is the schema's defaults under {config_source_name()}", file=sys.stderr)

if workflow.is_main_process:
    # Phil files, metrology engine, saved detector: stop here rather than in every job. A job that an
    # executor runs in its own Snakemake (a Slurm job) parses the workflow again; the main process has
    # checked, so the job does not import DIALS to check again.
    try:
        check_run_settings(config, config_source_name(), OUTPUT_DIR)
    except RunSettingsError as error:
        sys.exit(str(error))


# Shell-quoted directory of the environment's commands (spread-*), next to the Python running Snakemake.
# Rules write "{ENV_BIN}/spread-..." so they work from .venv/bin/snakemake without an activated venv and
# cluster jobs use the submitting environment. Named, not inlined, so moving the venv does not change
# the rules' shell text (which the `code` rerun trigger compares); `snakemake --lint` flags it in every
# rule, accepted with this reason in scripts/lint_workflow.py.
ENV_BIN = shlex.quote(os.path.dirname(sys.executable))

#: The {dataset} wildcard's values and the {index} wildcard's form (a five-digit shard number).
DATASET = "|".join(RUN_DATASETS)
SHARD_INDEX = r"\d{5}"

#: `--channel-grid START STEP N` for the image_shard command when a stage that evaluates spectra on the
#: structure-factor channels runs (spread.enabled, or stage1.structure_factors model), so an off-grid spectrum
#: stops the run where the shards are made; "" otherwise (xfel_spread.workflow.channel_grid_option). A global in
#: the shell text, not a param: the check changes no byte of a shard, so a new grid or spread.enabled reruns no
#: shard (nor, through them, every stage); shards made before are not checked again (SPREAD still refuses).
from xfel_spread.workflow import channel_grid_option

CHANNEL_GRID_OPTION = channel_grid_option(config)

#: Whether the hitfind stage runs and index/reindex take only its hits.
HITFIND = config["hitfind"]["enabled"]

#: The two pixel refinements (rules/stage1.smk): the per-shot forward model and the batched API.
PIXEL_REFINEMENTS = ("stage1", "exa")

#: The report's own figures (rules/report.smk), one of each per dataset; neither needs the simulation's truth.
REPORT_FIGURES = ("shot", "detector_refinement")

#: The report category of the figures of the shots themselves (the shot, hit finding's plots).
SHOTS_CATEGORY = "1. Simulated shots" if SIMULATED else "1. Shots (images from elsewhere)"


wildcard_constraints:
    dataset=DATASET,
    index=SHARD_INDEX,


# --- paths -------------------------------------------------------------------------------------------


def reference_path(name):
    """Where the pipeline keeps its verified copy of reference file `name`."""
    return f"{REFERENCE_DIR}/{name}"


def shard_prefix(stage, dataset="{dataset}", index="{index}"):
    """Where shard `index` of `dataset` has its files in `stage`: OUTPUT_DIR/stage/dataset/shard_NNNNN.
    An int index is written with five digits; left out, dataset and index stay wildcards."""
    number = f"{index:05d}" if isinstance(index, int) else index
    return f"{OUTPUT_DIR}/{stage}/{dataset}/shard_{number}"


def shard_file(stage, suffix, dataset="{dataset}", index="{index}"):
    """The file of shard `index` of `dataset` in `stage` that ends in `suffix` (shard_prefix + suffix)."""
    return shard_prefix(stage, dataset, index) + suffix


def shard_prefixes(stage, dataset="{dataset}"):
    """shard_prefix of every shard of `dataset` in `stage`, in shard order."""
    return [shard_prefix(stage, dataset, index) for index in range(len(SHARD_RANGES))]


def shard_files(stage, suffix, dataset="{dataset}"):
    """shard_file `suffix` of every shard of `dataset` in `stage`, in shard order."""
    return [prefix + suffix for prefix in shard_prefixes(stage, dataset)]


def simulated_shard_path(dataset="{dataset}", index="{index}"):
    """Simulated shard `index` of `dataset` (nopsf or psf)."""
    return shard_file("sim", ".h5", dataset, index)


def shard_path(dataset="{dataset}", index="{index}"):
    """The shard every per-shard stage reads: the simulated shard, or with images from elsewhere the
    image-list shard (OUTPUT_DIR/images/images/shard_NNNNN.h5: files, frames, spectra, no pixels)."""
    return simulated_shard_path(dataset, index) if SIMULATED else shard_file("images", ".h5", dataset, index)


#: The run's image list (shot, file, frame) with images from elsewhere.
IMAGE_LIST = f"{OUTPUT_DIR}/images/list.tsv"

#: The PDB model of the merging reference, the structure_factors amplitudes and SPREAD's fixed part:
#: input.model, or the LY99 reference copy; None with `input.model: none` (workflow.check_model has made
#: sure that no planned rule then needs one).
MODEL_FILE = (None if config["input"]["model"] == NO_MODEL
              else config["input"]["model"] or reference_path("1m2a.pdb"))


#: The simulation's truth, one file per shard (shared by both datasets).
TRUTH_FILES = shard_files("sim", ".json", dataset="truth")


def report_plot(figure, dataset="{dataset}"):
    """Report figure `figure` of `dataset` (a {dataset} wildcard unless given)."""
    return f"{OUTPUT_DIR}/report/{dataset}_{figure}.png"


def final_targets():
    """Everything the default target `all` asks for: the reference files, every shard of both datasets, the score
    tables of the DIALS chain, merging and both pixel refinements (which pull in index, metrology,
    reindex, the cell analysis, the merge and the annulus), the annulus summaries, the report's figures and
    SPREAD's score tables (which pull in the SPREAD stage; when spread.enabled). With images from elsewhere (no truth), the
    stages' own outputs instead of the scores: image_targets()."""
    if not SIMULATED:
        return image_targets()
    references = [reference_path(name) for name in REFERENCE_NAMES]
    shards = [shard_path(dataset, index) for dataset in DATASETS for index in range(len(SHARD_RANGES))]
    scores = [f"{OUTPUT_DIR}/score/{stage}_{dataset}.tsv"
              for stage in ("dials", "merge", "stage1", "exa") for dataset in DATASETS]
    annulus = [f"{OUTPUT_DIR}/annulus/{dataset}/summary.json" for dataset in DATASETS]
    figures = [report_plot(figure, dataset) for figure in REPORT_FIGURES for dataset in DATASETS]
    spread = [f"{OUTPUT_DIR}/score/spread_{dataset}.tsv" for dataset in DATASETS] if config["spread"]["enabled"] else []
    hitfind = [f"{OUTPUT_DIR}/{path}" for dataset in DATASETS
               for path in (f"score/hitfind_{dataset}.tsv", f"hitfind/{dataset}/powder.json")] if HITFIND else []
    return references + shards + scores + annulus + figures + spread + hitfind + pixel_metrology_targets()


def image_targets():
    """The default target with images from elsewhere: the image list, every image-list shard, both DIALS
    passes' shots tables, metrology's report, the cell clusters, the merge's statistics, the annulus, both
    pixel refinements' shots tables, hit finding's summary and powder when it is on, SPREAD's table and
    summary (each shot's spectrum rebinned onto the structure_factors channels; its fixed part from
    MODEL_FILE, input.model or LY99's; when spread.enabled) and the report's own figures (REPORT_FIGURES: shard 0's first
    integrated shot, read through dxtbx from its image file, needs one-panel images like stage 1; and in place of
    the score rules' figures, the pixel refinements' RMSDs and Z-scores and SPREAD's curves from their tables); no
    score, no truth. The stages' own figures (metrology's residuals, the cell clusters, the merging statistics, hit
    finding's shots and powder) come with the outputs asked for here."""
    dataset = IMAGE_DATASET
    shards = [shard_path(dataset, index) for index in range(len(SHARD_RANGES))]
    shots = [path for stage in ("index", "reindex") + PIXEL_REFINEMENTS for path in shard_files(stage, "_shots.tsv", dataset)]
    per_dataset = [f"{OUTPUT_DIR}/{path}" for path in (
        f"metrology/{dataset}/report.txt", f"cells/{dataset}_clusters.txt", f"merge/{dataset}/statistics.tsv",
        f"annulus/{dataset}/summary.json")]
    hitfind = [f"{OUTPUT_DIR}/hitfind/{dataset}/{name}" for name in ("summary.json", "powder.json")] if HITFIND else []
    spread = [path.replace("{dataset}", dataset) for key, path in spread_outputs().items()
              if key in ("fp_fdp", "summary") and config["spread"]["enabled"]]
    figures = [report_plot(figure, dataset) for figure in REPORT_FIGURES + PIXEL_REFINEMENTS]
    figures += [report_plot("spread", dataset)] if config["spread"]["enabled"] else []
    return [IMAGE_LIST] + shards + shots + per_dataset + hitfind + spread + figures + pixel_metrology_targets()


def pixel_metrology_targets():
    """The refined detector and report figure of every dataset when pixel_metrology.enabled, else none."""
    if not config["pixel_metrology"]["enabled"]:
        return []
    return [f"{OUTPUT_DIR}/pixel_metrology/{dataset}/{name}" for dataset in RUN_DATASETS
            for name in ("refined_detector.expt", "refinement.png")]


def repeated_option(option, values):
    """`option value` once per value, shell-quoted: how spread-* commands take one path per shard."""
    return " ".join(f"{option} {shlex.quote(str(value))}" for value in values)


# --- reference data (rules/reference.smk) ------------------------------------------------------------


def mirror_copy(wildcards):
    """The mirror's copy of the file as an input, so Snakemake notices when the mirror changes."""
    mirror_dir = config["reference"]["mirror_dir"]
    return [os.path.join(mirror_dir, wildcards.name)] if mirror_dir is not None else []


def mirror_option(wildcards):
    """`--mirror DIR` for spread-fetch-reference, or nothing to download instead."""
    mirror_dir = config["reference"]["mirror_dir"]
    return f"--mirror {shlex.quote(mirror_dir)}" if mirror_dir is not None else ""


# --- hit finding (rules/hitfind.smk) -----------------------------------------------------------------


def hitfind_files(suffix):
    """Input function: file `suffix` of every shard of the job's dataset in the hitfind stage, in shard order."""
    return lambda wildcards: shard_files("hitfind", suffix, wildcards.dataset)


def hits_table_input():
    """index/reindex input `hits`: the shard's hits table when hitfind is enabled, else nothing."""
    return {"hits": shard_file("hitfind", "_hits.tsv")} if HITFIND else {}


def starting_geometry_input():
    """index input `reference_geometry`: input.reference_geometry when given, else nothing."""
    path = config["input"]["reference_geometry"]
    return {"reference_geometry": path} if path else {}


def starting_geometry_option(wildcards, input):
    """`--reference-geometry EXPT` for the index pass when input.reference_geometry is given."""
    return f"--reference-geometry {shlex.quote(input.reference_geometry)}" if "reference_geometry" in input.keys() else ""


def hits_table_option(wildcards, input):
    """index/reindex option giving spread-stills-process the hits table (empty when hitfind is off)."""
    return f"--hits-table {shlex.quote(input.hits)}" if HITFIND else ""


def merge_model_input():
    """merge input `model`: MODEL_FILE with merge.reference model, nothing with merge.reference data (no model read)."""
    return {"model": MODEL_FILE} if config["merge"]["reference"] == "model" else {}


def merge_model_option(wildcards, input):
    """`--model PDB` for spread-merge when merge_model_input gave one, else nothing."""
    return f"--model {shlex.quote(str(input.model))}" if "model" in input.keys() else ""


# --- stills_process stages: index and reindex --------------------------------------------------------


def stills_outputs(stage):
    """A stills_process rule's outputs, by name, with {dataset} and {index} wildcards."""
    from xfel_spread.io.stills import OUTPUT_SUFFIXES

    return {name: shard_file(stage, suffix) for name, suffix in OUTPUT_SUFFIXES.items()}


def stills_output_of_all_shards(stage, name):
    """Input function: output `name` of every shard of the job's dataset in `stage`."""
    from xfel_spread.io.stills import OUTPUT_SUFFIXES

    def paths(wildcards):
        return shard_files(stage, OUTPUT_SUFFIXES[name], wildcards.dataset)

    return paths


def first_shard_output(stage, name):
    """Output `name` of shard 0 of `stage` (index or reindex), with a {dataset} wildcard."""
    from xfel_spread.io.stills import OUTPUT_SUFFIXES

    return shard_file(stage, OUTPUT_SUFFIXES[name], index=0)


def integrated_prefixes(wildcards):
    """`--shard-prefix P` for every reindexed shard of the job's dataset."""
    return repeated_option("--shard-prefix", shard_prefixes("reindex", wildcards.dataset))


# --- merging (rules/merge.smk) -----------------------------------------------------------------------


def dials_merged_mtz(wildcards):
    """The cross-check's MTZ when it is enabled, else nothing."""
    if not config["merge"]["dials_crosscheck"]["enabled"]:
        return []
    return rules.dials_merge.output.mtz.format(dataset=wildcards.dataset)


# --- pixel refinement (rules/stage1.smk) -------------------------------------------------------------


def stage1_structure_factors(wildcards):
    """The |F| source of stage 1: the dataset's merged MTZ, or the model's per-channel amplitudes."""
    if config["stage1"]["structure_factors"] == "merged":
        return {"mtz": rules.merge.output.mtz.format(dataset=wildcards.dataset)}
    return {"amplitudes": rules.structure_factors.output[0]}


def structure_factor_option(wildcards, input):
    """`--mtz FILE` or `--amplitudes FILE`, whichever stage1_structure_factors chose."""
    return " ".join(f"--{name} {shlex.quote(str(input[name]))}" for name in ("mtz", "amplitudes") if name in input.keys())


def detector_psf_option(wildcards):
    """`--psf-fwhm-mm F --psf-radius-px R` where the dataset's spread is modelled (config.modelled_psf)."""
    psf = modelled_psf(wildcards.dataset, config)
    return "" if psf is None else f"--psf-fwhm-mm {psf[0]} --psf-radius-px {psf[1]}"


# --- SPREAD (rules/spread.smk) -------------------------------------------------------------------------

#: The pixel refinement whose converged lattices SPREAD reads (spread.refinement: stage1 or exa).
SPREAD_REFINEMENT = config["spread"]["refinement"]

#: The start tables that `spread.sites` may name, kept among the reference files.
SPREAD_NAMED_TABLES = {"oxidized": "pf-rd-ox_fftkk.out", "reduced": "pf-rd-red_fftkk.out", "metallic": "Fe_fake.dat"}


def spread_prefix(dataset="{dataset}"):
    """Output prefix of the SPREAD stage for `dataset`: OUTPUT_DIR/spread/dataset/spread."""
    return f"{OUTPUT_DIR}/spread/{dataset}/spread"


def spread_outputs():
    """The SPREAD rule's outputs, by name, with a {dataset} wildcard (spread.outputs.output_paths)."""
    from xfel_spread.spread.outputs import output_paths

    return output_paths(spread_prefix())


def spread_start_tables(wildcards):
    """Every start table `spread.sites` uses, as inputs: the reference copies of the named ones, and paths."""
    tables = {spread_start_table(choice) for choice in config["spread"]["sites"].values()}
    return {f"start_table_{i}": table for i, table in enumerate(sorted(tables))}


def spread_shard_options(wildcards):
    """`--annulus-prefix A --shard S --stage1-prefix P` of every shard of the job's dataset, in shard order."""
    dataset = wildcards.dataset
    return " ".join((repeated_option("--annulus-prefix", shard_prefixes("annulus", dataset)),
                     repeated_option("--shard", [shard_path(dataset, index) for index in range(len(SHARD_RANGES))]),
                     repeated_option("--stage1-prefix", shard_prefixes(SPREAD_REFINEMENT, dataset))))


def spread_start_table(choice):
    """The file of a spread.sites start table: the reference copy of a named one, or the path given."""
    return reference_path(SPREAD_NAMED_TABLES[choice]) if choice in SPREAD_NAMED_TABLES else choice


def structure_factor_sites():
    """Atom name -> f', f'' table of the amplitude table's anomalous sites: the two the simulation gives the
    oxidized and reduced tables, or, for images from elsewhere (whose truth nobody knows), spread.sites with
    their start tables, so that a model of another crystal needs no atom named as LY99's."""
    if config["input"]["source"] == "images":
        return {name: spread_start_table(choice) for name, choice in config["spread"]["sites"].items()}
    atoms = config["structure_factors"]
    return {atoms["fe_oxidized_atom"]: reference_path("pf-rd-ox_fftkk.out"),
            atoms["fe_reduced_atom"]: reference_path("pf-rd-red_fftkk.out")}


def structure_factor_tables(wildcards):
    """The structure_factors rule's site tables, as inputs."""
    return {f"site_table_{i}": table for i, table in enumerate(dict.fromkeys(structure_factor_sites().values()))}


def structure_factor_site_options(wildcards):
    """`--site ATOM=TABLE` for every site of structure_factor_sites."""
    return " ".join(f"--site {shlex.quote(f'{name}={table}')}" for name, table in structure_factor_sites().items())


def spread_truth_tables(wildcards):
    """The tables the simulation gave its two sites (structure_factors.fe_oxidized_atom, fe_reduced_atom)."""
    return {"oxidized": reference_path("pf-rd-ox_fftkk.out"), "reduced": reference_path("pf-rd-red_fftkk.out")}


def spread_truth_option(wildcards, input):
    """`--truth SITE=TABLE` for both simulated sites."""
    atoms = config["structure_factors"]
    pairs = ((atoms["fe_oxidized_atom"], input.oxidized), (atoms["fe_reduced_atom"], input.reduced))
    return " ".join(f"--truth {shlex.quote(f'{site}={table}')}" for site, table in pairs)
