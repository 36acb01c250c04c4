# Stage 3: level-0 detector metrology per dataset (dials.combine_experiments + dials.refine), written
# as a report and as the phil fragment the reindex stage includes.


rule metrology:
    """Refine the whole-detector position against the indexed lattices of one dataset."""
    input:
        settings=f"{OUTPUT_DIR}/settings/metrology.yaml",
        phil=config["metrology"]["phil"],
        refined_experiments=stills_output_of_all_shards("index", "refined_experiments"),
        indexed_reflections=stills_output_of_all_shards("index", "indexed_reflections"),
        shots=stills_output_of_all_shards("index", "shots"),
    output:
        report=f"{OUTPUT_DIR}/metrology/{{dataset}}/report.txt",
        summary=f"{OUTPUT_DIR}/metrology/{{dataset}}/summary.json",
        refined_phil=f"{OUTPUT_DIR}/metrology/{{dataset}}/refined_detector.phil",
    wildcard_constraints:
        dataset=DATASET,
    params:
        prefixes=lambda wildcards: repeated_option("--shard-prefix", stills_prefixes("index", wildcards.dataset)),
        work_dir=lambda wildcards: f"{OUTPUT_DIR}/metrology/{wildcards.dataset}/work",
    log:
        f"{LOG_DIR}/metrology/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/metrology/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-metrology --config {input.settings:q} --dataset {wildcards.dataset}"
        " --phil {input.phil:q} {params.prefixes} --report {output.report:q} --summary {output.summary:q}"
        " --refined-phil {output.refined_phil:q} --work-dir {params.work_dir:q} > {log:q} 2>&1"
