# Stages 8-9: per-shot pixel refinement of the annulus shoeboxes, one MPI job per shard and dataset:
# `stage1` through the per-shot forward model, `exa` through the batched forward-model API (GPUs where
# the profile gives them), each scored against the simulation's truth and DIALS's starting crystals.

from xfel_spread.config import modelled_psf

PIXEL_REFINEMENTS = ("stage1", "exa")


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


def pixel_refinement_prefix(refinement, dataset, index):
    """Output prefix of shard `index` of `dataset` in `refinement` (stage1 or exa)."""
    return f"{OUTPUT_DIR}/{refinement}/{dataset}/shard_{index:05d}"


for refinement in PIXEL_REFINEMENTS:

    rule:
        name: refinement
        input:
            unpack(stage1_structure_factors),
            settings=f"{OUTPUT_DIR}/settings/stage1.yaml",
            experiments=f"{OUTPUT_DIR}/annulus/{{dataset}}/shard_{{index}}_annulus.expt",
            reflections=f"{OUTPUT_DIR}/annulus/{{dataset}}/shard_{{index}}_annulus.refl",
            shard=f"{OUTPUT_DIR}/sim/{{dataset}}/shard_{{index}}.h5",
        output:
            experiments=f"{OUTPUT_DIR}/{refinement}/{{dataset}}/shard_{{index}}_refined.expt",
            shots=f"{OUTPUT_DIR}/{refinement}/{{dataset}}/shard_{{index}}_shots.tsv",
        wildcard_constraints:
            dataset=DATASET,
            index=SHARD_INDEX,
        params:
            annulus_prefix=lambda wildcards: f"{OUTPUT_DIR}/annulus/{wildcards.dataset}/shard_{wildcards.index}",
            prefix=lambda wildcards, refinement=refinement: pixel_refinement_prefix(
                refinement, wildcards.dataset, int(wildcards.index)),
            structure_factors=structure_factor_option,
            psf=detector_psf_option,
            command=f"spread-{refinement}",
            # stage1 runs one single-threaded rank per shot stream; exa's one rank drives the device
            # and gives torch the job's threads.
            threads_option=lambda wildcards, threads, refinement=refinement: (
                f"--threads {threads}" if refinement == "exa" else ""),
        resources:
            mpi="mpirun",
            tasks=1,
        log:
            f"{LOG_DIR}/{refinement}/{{dataset}}/shard_{{index}}.log",
        benchmark:
            f"{LOG_DIR}/benchmarks/{refinement}/{{dataset}}/shard_{{index}}.tsv"
        shell:
            "{resources.mpi} -n {resources.tasks} {ENV_BIN}/{params.command} --config {input.settings:q}"
            " --annulus-prefix {params.annulus_prefix:q} --shard {input.shard:q} {params.structure_factors}"
            " --output-prefix {params.prefix:q} {params.psf} {params.threads_option} > {log:q} 2>&1"

    rule:
        name: f"score_{refinement}"
        input:
            shots=lambda wildcards, refinement=refinement: [
                pixel_refinement_prefix(refinement, wildcards.dataset, index) + "_shots.tsv"
                for index in range(len(SHARD_RANGES))],
            experiments=lambda wildcards, refinement=refinement: [
                pixel_refinement_prefix(refinement, wildcards.dataset, index) + "_refined.expt"
                for index in range(len(SHARD_RANGES))],
            truth=TRUTH_FILES,
        output:
            table=f"{OUTPUT_DIR}/score/{refinement}_{{dataset}}.tsv",
            text=f"{OUTPUT_DIR}/score/{refinement}_{{dataset}}.txt",
            plot=report(f"{OUTPUT_DIR}/score/{refinement}_{{dataset}}.png", caption=f"../report/{refinement}.rst",
                        category="5. Pixel refinement", subcategory="{dataset}",
                        labels={"dataset": "{dataset}", "figure": f"{refinement}: RMSD and misorientation"}),
        wildcard_constraints:
            dataset=DATASET,
        params:
            prefixes=lambda wildcards, refinement=refinement: repeated_option("--stage1-prefix", [
                pixel_refinement_prefix(refinement, wildcards.dataset, index) for index in range(len(SHARD_RANGES))])
            + " " + repeated_option("--dials-prefix", stills_prefixes("reindex", wildcards.dataset)),
            truth=repeated_option("--truth", TRUTH_FILES),
        log:
            f"{LOG_DIR}/score/{refinement}_{{dataset}}.log",
        shell:
            "{ENV_BIN}/spread-score-stage1 --dataset {wildcards.dataset} {params.prefixes} {params.truth}"
            " --table {output.table:q} --text {output.text:q} --plot {output.plot:q} > {log:q} 2>&1"
