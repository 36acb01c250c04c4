# Stage 5: unit-cell analysis of the reindexed lattices of each dataset: every cell in cctbx.xfel.merge's
# tdata format, then density clustering into a covariance model that the merge uses as a cell filter.


rule tdata:
    """One line per reindexed lattice: a b c alpha beta gamma and the space group."""
    input:
        experiments=stills_output_of_all_shards("reindex", "integrated_experiments"),
    output:
        f"{OUTPUT_DIR}/cells/{{dataset}}.tdata",
    params:
        experiments=lambda wildcards, input: repeated_option("--experiments", input.experiments),
    log:
        f"{LOG_DIR}/cells/tdata_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-tdata {params.experiments} --output {output:q} > {log:q} 2>&1"


rule covariance:
    """DBSCAN clusters of the cells, their covariance pickle (component 0 = main cluster) and a plot."""
    input:
        settings=f"{OUTPUT_DIR}/settings/cells.yaml",
        tdata=rules.tdata.output[0],
    output:
        pickle=f"{OUTPUT_DIR}/cells/{{dataset}}_covariance.pickle",
        summary=f"{OUTPUT_DIR}/cells/{{dataset}}_clusters.txt",
        plot=report(f"{OUTPUT_DIR}/cells/{{dataset}}_clusters.png", caption="../report/cells.rst",
                    category="3. Unit cells", subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "cell clusters"}),
    log:
        f"{LOG_DIR}/cells/covariance_{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/cells/covariance_{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-covariance --config {input.settings:q} --tdata {input.tdata:q}"
        " --pickle {output.pickle:q} --summary {output.summary:q} --plot {output.plot:q} > {log:q} 2>&1"
