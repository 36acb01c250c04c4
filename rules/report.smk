# Figures for the Snakemake report that no stage draws itself: a shot with its predicted spots, and the
# detector refinement seen in the centroid residuals before and after. Both read the first shard of each
# dataset (with images from elsewhere the image-list shard, the shot read through dxtbx from its file; one-panel
# images only) and need no truth, so both runs plan them; `snakemake --report report.html` collects them with
# every stage's plots.


rule plot_shot:
    """The first shot the reindex pass integrated in shard 0, log-scaled, with its predicted spots."""
    input:
        shard=shard_path(index=0),
        shots=first_shard_output("reindex", "shots"),
        experiments=first_shard_output("reindex", "integrated_experiments"),
        reflections=first_shard_output("reindex", "integrated_reflections"),
    output:
        report(report_plot("shot"), caption="../report/shot.rst", category=SHOTS_CATEGORY,
               subcategory="{dataset}", labels={"dataset": "{dataset}", "figure": "shot and predicted spots"}),
    params:
        prefix=lambda wildcards: shard_prefix("reindex", wildcards.dataset, 0),
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
    params:
        index_prefix=lambda wildcards: shard_prefix("index", wildcards.dataset, 0),
        reindex_prefix=lambda wildcards: shard_prefix("reindex", wildcards.dataset, 0),
    log:
        f"{LOG_DIR}/report/detector_refinement_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-plot-detector-refinement --dataset {wildcards.dataset}"
        " --index-prefix {params.index_prefix:q} --reindex-prefix {params.reindex_prefix:q}"
        " --plot {output:q} > {log:q} 2>&1"


# With images from elsewhere (no truth, so no score rule draws them): the pixel refinements' RMSDs and Z-scores
# and SPREAD's curves, from the stages' own tables. Planned by image_targets only.
for refinement in PIXEL_REFINEMENTS:

    rule:
        name: f"plot_{refinement}"
        input:
            shots=lambda wildcards, refinement=refinement: shard_files(refinement, "_shots.tsv", wildcards.dataset),
        output:
            report(report_plot(refinement), caption="../report/refinement_no_truth.rst",
                   category="5. Pixel refinement", subcategory="{dataset}",
                   labels={"dataset": "{dataset}", "figure": f"{refinement}: RMSD and Z-scores"}),
        params:
            shots=lambda wildcards, input: repeated_option("--shots", input.shots),
            refinement=refinement,
        log:
            f"{LOG_DIR}/report/{refinement}_{{dataset}}.log",
        shell:
            "{ENV_BIN}/python -m xfel_spread.cli.report refinement --dataset {wildcards.dataset}"
            " --refinement {params.refinement} {params.shots} --plot {output:q} > {log:q} 2>&1"


rule plot_spread:
    """SPREAD's f', f'' of each site with 1-sigma bands, the start tables and the two controls; no truth."""
    input:
        fp_fdp=rules.spread.output.fp_fdp,
        controls=rules.spread.output.controls,
        summary=rules.spread.output.summary,
    output:
        report(report_plot("spread"), caption="../report/spread_no_truth.rst", category="6. SPREAD",
               subcategory="{dataset}", labels={"dataset": "{dataset}", "figure": "SPREAD: f' and f'' of each site"}),
    params:
        prefix=lambda wildcards: spread_prefix(wildcards.dataset),
    log:
        f"{LOG_DIR}/report/spread_{{dataset}}.log",
    shell:
        "{ENV_BIN}/python -m xfel_spread.cli.report spread --dataset {wildcards.dataset} --prefix {params.prefix:q}"
        " --plot {output:q} > {log:q} 2>&1"
