# Stage 2: dials.stills_process (spot finding, indexing, refinement, integration) on every shard, one
# MPI job per shard; ranks come from the profile (resources `mpi` and `tasks`).


rule index:
    """Index and integrate every shot of one shard with the nominal detector."""
    input:
        shard=shard_path(),
        phil=config["index"]["phil"],
        **hits_table_input(),
        **starting_geometry_input(),
    output:
        **stills_outputs("index"),
    params:
        shots=lambda wildcards: SHARD_RANGES[int(wildcards.index)],
        prefix=lambda wildcards: shard_prefix("index", wildcards.dataset, wildcards.index),
        # The hits table and, with images from elsewhere, input.reference_geometry, in one placeholder: a new
        # one would change the shell text, which the code trigger compares, and rerun every finished index job.
        hits=lambda wildcards, input: " ".join(option for option in (
            hits_table_option(wildcards, input), starting_geometry_option(wildcards, input)) if option),
    resources:
        mpi="mpirun",
        tasks=1,
    log:
        f"{LOG_DIR}/index/{{dataset}}/shard_{{index}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/index/{{dataset}}/shard_{{index}}.tsv"
    shell:
        "{resources.mpi} -n {resources.tasks} {ENV_BIN}/spread-stills-process --shard {input.shard:q}"
        " --shots {params.shots[0]} {params.shots[1]} --phil {input.phil:q} --output-prefix {params.prefix:q}"
        " {params.hits} > {log:q} 2>&1"
