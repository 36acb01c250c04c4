# Stages 8-9: per-shot pixel refinement of the annulus shoeboxes, one MPI job per shard and dataset:
# `stage1` through the per-shot forward model, `exa` through the batched forward-model API (GPUs where
# the profile gives them), each scored against the simulation's truth and DIALS's starting crystals.

for refinement in PIXEL_REFINEMENTS:

    rule:
        name: refinement
        input:
            unpack(stage1_structure_factors),
            settings=f"{OUTPUT_DIR}/settings/stage1.yaml",
            experiments=shard_file("annulus", "_annulus.expt"),
            reflections=shard_file("annulus", "_annulus.refl"),
            shard=shard_path(),
        output:
            experiments=shard_file(refinement, "_refined.expt"),
            shots=shard_file(refinement, "_shots.tsv"),
            domains=shard_file(refinement, "_domains.tsv"),
        params:
            annulus_prefix=lambda wildcards: shard_prefix("annulus", wildcards.dataset, wildcards.index),
            prefix=lambda wildcards, refinement=refinement: shard_prefix(
                refinement, wildcards.dataset, wildcards.index),
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
            shots=lambda wildcards, refinement=refinement: shard_files(refinement, "_shots.tsv", wildcards.dataset),
            experiments=lambda wildcards, refinement=refinement: shard_files(
                refinement, "_refined.expt", wildcards.dataset),
            truth=TRUTH_FILES,
        output:
            table=f"{OUTPUT_DIR}/score/{refinement}_{{dataset}}.tsv",
            text=f"{OUTPUT_DIR}/score/{refinement}_{{dataset}}.txt",
            plot=report(f"{OUTPUT_DIR}/score/{refinement}_{{dataset}}.png", caption=f"../report/{refinement}.rst",
                        category="5. Pixel refinement", subcategory="{dataset}",
                        labels={"dataset": "{dataset}", "figure": f"{refinement}: RMSD and misorientation"}),
        params:
            prefixes=lambda wildcards, refinement=refinement: " ".join((
                repeated_option("--stage1-prefix", shard_prefixes(refinement, wildcards.dataset)),
                repeated_option("--dials-prefix", shard_prefixes("reindex", wildcards.dataset)))),
            truth=repeated_option("--truth", TRUTH_FILES),
        log:
            f"{LOG_DIR}/score/{refinement}_{{dataset}}.log",
        shell:
            "{ENV_BIN}/spread-score-stage1 --dataset {wildcards.dataset} {params.prefixes} {params.truth}"
            " --table {output.table:q} --text {output.text:q} --plot {output.plot:q} > {log:q} 2>&1"
