# Stage 3: detector metrology per dataset (dials.combine_experiments + dials.refine at hierarchy level 0
# or 1, or a saved detector applied), written as a report, positional residual maps before and after,
# and the refined detector the reindex stage gives stills_process.


rule metrology:
    """Refine the detector (or apply a saved one) against the indexed lattices of one dataset."""
    input:
        settings=f"{OUTPUT_DIR}/settings/metrology.yaml",
        phil=config["metrology"]["phil"],
        refined_experiments=stills_output_of_all_shards("index", "refined_experiments"),
        indexed_reflections=stills_output_of_all_shards("index", "indexed_reflections"),
        shots=stills_output_of_all_shards("index", "shots"),
        # A saved detector reruns metrology (and reindex) when it is replaced.
        saved_detector=[config["metrology"]["reference_geometry"]] if config["metrology"]["reference_geometry"] else [],
    output:
        report=f"{OUTPUT_DIR}/metrology/{{dataset}}/report.txt",
        summary=f"{OUTPUT_DIR}/metrology/{{dataset}}/summary.json",
        refined_detector=f"{OUTPUT_DIR}/metrology/{{dataset}}/refined_detector.expt",
        residuals=f"{OUTPUT_DIR}/metrology/{{dataset}}/residuals.tsv",
        residuals_before=report(f"{OUTPUT_DIR}/metrology/{{dataset}}/residuals_before.png",
                                caption="../report/metrology_residuals.rst", category="2. DIALS stages",
                                subcategory="{dataset}",
                                labels={"dataset": "{dataset}", "figure": "positional residuals, before"}),
        residuals_after=report(f"{OUTPUT_DIR}/metrology/{{dataset}}/residuals_after.png",
                               caption="../report/metrology_residuals.rst", category="2. DIALS stages",
                               subcategory="{dataset}",
                               labels={"dataset": "{dataset}", "figure": "positional residuals, after"}),
    params:
        prefixes=lambda wildcards: repeated_option("--shard-prefix", shard_prefixes("index", wildcards.dataset)),
        work_dir=lambda wildcards: f"{OUTPUT_DIR}/metrology/{wildcards.dataset}/work",
    log:
        f"{LOG_DIR}/metrology/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/metrology/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-metrology --config {input.settings:q} --dataset {wildcards.dataset}"
        " --phil {input.phil:q} {params.prefixes} --report {output.report:q} --summary {output.summary:q}"
        " --refined-detector {output.refined_detector:q} --residuals-table {output.residuals:q}"
        " --residuals-before {output.residuals_before:q} --residuals-after {output.residuals_after:q}"
        " --work-dir {params.work_dir:q} > {log:q} 2>&1"
