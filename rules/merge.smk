# Stage 6: conventional merging of each dataset's reindexed lattices, Friedel mates separate (one MPI
# job per dataset), the dials.scale + dials.merge cross-check, and both scored against the truth.


rule merge:
    """Filter, scale, post-refine and merge the lattices of one dataset into an MTZ with statistics."""
    input:
        settings=f"{OUTPUT_DIR}/settings/merge.yaml",
        covariance=rules.covariance.output.pickle,
        **merge_model_input(),
        experiments=stills_output_of_all_shards("reindex", "integrated_experiments"),
        reflections=stills_output_of_all_shards("reindex", "integrated_reflections"),
    output:
        mtz=f"{OUTPUT_DIR}/merge/{{dataset}}/merged.mtz",
        stats_table=f"{OUTPUT_DIR}/merge/{{dataset}}/statistics.tsv",
        stats_text=f"{OUTPUT_DIR}/merge/{{dataset}}/statistics.txt",
        stats_plot=report(f"{OUTPUT_DIR}/merge/{{dataset}}/statistics.png", caption="../report/merge_statistics.rst",
                          category="4. Merging", subcategory="{dataset}",
                          labels={"dataset": "{dataset}", "figure": "merging statistics"}),
        lattices=f"{OUTPUT_DIR}/merge/{{dataset}}/lattices.tsv",
        summary=f"{OUTPUT_DIR}/merge/{{dataset}}/summary.json",
    params:
        prefixes=integrated_prefixes,
        model=merge_model_option,
    resources:
        mpi="mpirun",
        tasks=1,
    log:
        f"{LOG_DIR}/merge/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/merge/{{dataset}}.tsv"
    shell:
        "{resources.mpi} -n {resources.tasks} {ENV_BIN}/spread-merge --config {input.settings:q}"
        " {params.prefixes} --covariance {input.covariance:q} {params.model} --mtz {output.mtz:q}"
        " --stats-table {output.stats_table:q} --stats-text {output.stats_text:q}"
        " --stats-plot {output.stats_plot:q} --lattices {output.lattices:q} --summary {output.summary:q}"
        " > {log:q} 2>&1"


rule dials_merge:
    """Cross-check: dials.scale then dials.merge on the lattices our merge accepted."""
    input:
        settings=f"{OUTPUT_DIR}/settings/dials_merge.yaml",
        lattices=rules.merge.output.lattices,
        experiments=stills_output_of_all_shards("reindex", "integrated_experiments"),
        reflections=stills_output_of_all_shards("reindex", "integrated_reflections"),
    output:
        mtz=f"{OUTPUT_DIR}/merge/{{dataset}}/dials/merged.mtz",
        summary=f"{OUTPUT_DIR}/merge/{{dataset}}/dials/summary.txt",
    params:
        prefixes=integrated_prefixes,
        work_dir=lambda wildcards: f"{OUTPUT_DIR}/merge/{wildcards.dataset}/dials/work",
    log:
        f"{LOG_DIR}/merge/dials_{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/merge/dials_{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-dials-merge --config {input.settings:q} --lattices {input.lattices:q}"
        " {params.prefixes} --work-dir {params.work_dir:q} --mtz {output.mtz:q}"
        " --log-summary {output.summary:q} > {log:q} 2>&1"


rule score_merge:
    """Merged intensities (ours and DIALS's) against the simulation's true intensities."""
    input:
        mtz=rules.merge.output.mtz,
        dials_mtz=dials_merged_mtz,
        amplitudes=rules.structure_factors.output[0],
        shards=lambda wildcards: shard_files("sim", ".h5", wildcards.dataset),
    output:
        table=f"{OUTPUT_DIR}/score/merge_{{dataset}}.tsv",
        text=f"{OUTPUT_DIR}/score/merge_{{dataset}}.txt",
        plot=report(f"{OUTPUT_DIR}/score/merge_{{dataset}}.png", caption="../report/merge_score.rst",
                    category="4. Merging", subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "merged intensities against the truth"}),
    params:
        dials_mtz=lambda wildcards, input: repeated_option("--dials-mtz", [input.dials_mtz] if input.dials_mtz else []),
        shards=lambda wildcards, input: repeated_option("--shard", input.shards),
        n_bins=config["merge"]["n_bins"],
    log:
        f"{LOG_DIR}/score/merge_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-score-merge --dataset {wildcards.dataset} --mtz {input.mtz:q} {params.dials_mtz}"
        " --amplitudes {input.amplitudes:q} {params.shards} --n-bins {params.n_bins}"
        " --table {output.table:q} --text {output.text:q} --plot {output.plot:q} > {log:q} 2>&1"
