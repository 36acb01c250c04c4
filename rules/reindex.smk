# Stage 4: dials.stills_process again on every shard, with the detector refined by metrology.


rule reindex:
    """Index and integrate every shot of one shard with the refined detector."""
    input:
        shard=shard_path(),
        phil=config["index"]["phil"],
        **hits_table_input(),
        refined_detector=rules.metrology.output.refined_detector,
    output:
        **stills_outputs("reindex"),
    params:
        shots=lambda wildcards: SHARD_RANGES[int(wildcards.index)],
        prefix=lambda wildcards: shard_prefix("reindex", wildcards.dataset, wildcards.index),
        hits=hits_table_option,
    resources:
        mpi="mpirun",
        tasks=1,
    log:
        f"{LOG_DIR}/reindex/{{dataset}}/shard_{{index}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/reindex/{{dataset}}/shard_{{index}}.tsv"
    shell:
        "{resources.mpi} -n {resources.tasks} {ENV_BIN}/spread-stills-process --shard {input.shard:q}"
        " --shots {params.shots[0]} {params.shots[1]} --phil {input.phil:q}"
        " --reference-geometry {input.refined_detector:q}"
        " --output-prefix {params.prefix:q} {params.hits} > {log:q} 2>&1"
