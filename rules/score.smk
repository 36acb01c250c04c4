# Scoring of stages 2-4 against the simulation's truth (simulated data only).


rule score_dials:
    """Indexing rate, misorientation, cell and beam-centre errors of index and reindex, per dataset."""
    input:
        index_shots=stills_output_of_all_shards("index", "shots"),
        index_experiments=stills_output_of_all_shards("index", "integrated_experiments"),
        reindex_shots=stills_output_of_all_shards("reindex", "shots"),
        reindex_experiments=stills_output_of_all_shards("reindex", "integrated_experiments"),
        truth=TRUTH_FILES,
        metrology=rules.metrology.output.summary,
        image_shard=shard_path(index=0),
    output:
        table=f"{OUTPUT_DIR}/score/dials_{{dataset}}.tsv",
        text=f"{OUTPUT_DIR}/score/dials_{{dataset}}.txt",
        plot=report(f"{OUTPUT_DIR}/score/dials_{{dataset}}.png", caption="../report/dials_score.rst",
                    category="2. DIALS stages", subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "index and reindex against the truth"}),
    params:
        shards=lambda wildcards: " ".join((
            repeated_option("--index-prefix", shard_prefixes("index", wildcards.dataset)),
            repeated_option("--reindex-prefix", shard_prefixes("reindex", wildcards.dataset)))),
        truth=repeated_option("--truth", TRUTH_FILES),
    log:
        f"{LOG_DIR}/score/dials_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-score-dials --dataset {wildcards.dataset} {params.shards}"
        " {params.truth} --metrology-summary {input.metrology:q}"
        " --table {output.table:q} --text {output.text:q} --image-shard {input.image_shard:q}"
        " --plot {output.plot:q} > {log:q} 2>&1"
