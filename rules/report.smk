# Figures for the Snakemake report that no stage draws itself: a simulated shot with its predicted
# spots, and the detector refinement seen in the centroid residuals before and after. Both read the
# first shard of each dataset; `snakemake --report report.html` collects them with every stage's plots.


def first_shard_output(stage, name):
    """Output `name` of shard 0 of `stage` (index or reindex), with a {dataset} wildcard."""
    from xfel_spread.dials.stills import OUTPUT_SUFFIXES

    return f"{OUTPUT_DIR}/{stage}/{{dataset}}/shard_00000{OUTPUT_SUFFIXES[name]}"


rule plot_shot:
    """The first shot the reindex pass integrated in shard 0, log-scaled, with its predicted spots."""
    input:
        shard=f"{OUTPUT_DIR}/sim/{{dataset}}/shard_00000.h5",
        shots=first_shard_output("reindex", "shots"),
        experiments=first_shard_output("reindex", "integrated_experiments"),
        reflections=first_shard_output("reindex", "integrated_reflections"),
    output:
        report(report_plot("shot"), caption="../report/shot.rst", category="1. Simulated shots",
               subcategory="{dataset}", labels={"dataset": "{dataset}", "figure": "shot and predicted spots"}),
    wildcard_constraints:
        dataset=DATASET,
    params:
        prefix=lambda wildcards: stills_prefix("reindex", wildcards.dataset, 0),
    log:
        f"{LOG_DIR}/report/shot_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-plot-shot --dataset {wildcards.dataset} --shard {input.shard:q}"
        " --reindex-prefix {params.prefix:q} --plot {output:q} > {log:q} 2>&1"


rule plot_detector_refinement:
    """Observed - predicted centroids of shard 0's indexed spots, index pass against reindex pass."""
    input:
        index_experiments=first_shard_output("index", "refined_experiments"),
        index_reflections=first_shard_output("index", "indexed_reflections"),
        reindex_experiments=first_shard_output("reindex", "refined_experiments"),
        reindex_reflections=first_shard_output("reindex", "indexed_reflections"),
    output:
        report(report_plot("detector_refinement"), caption="../report/detector_refinement.rst",
               category="2. DIALS stages", subcategory="{dataset}",
               labels={"dataset": "{dataset}", "figure": "detector refinement, before and after"}),
    wildcard_constraints:
        dataset=DATASET,
    params:
        index_prefix=lambda wildcards: stills_prefix("index", wildcards.dataset, 0),
        reindex_prefix=lambda wildcards: stills_prefix("reindex", wildcards.dataset, 0),
    log:
        f"{LOG_DIR}/report/detector_refinement_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-plot-detector-refinement --dataset {wildcards.dataset}"
        " --index-prefix {params.index_prefix:q} --reindex-prefix {params.reindex_prefix:q}"
        " --plot {output:q} > {log:q} 2>&1"
