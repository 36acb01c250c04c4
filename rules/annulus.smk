# Stage 7: the reflections of a resolution annulus (annulus.d_min to d_max) from the lattices the merge
# accepted, one reflection/experiment file pair per shard for the pixel-refinement stage, with counts.


rule annulus:
    """Select the annulus reflections of one dataset; count lattices, shoeboxes, indices and pixels."""
    input:
        settings=f"{OUTPUT_DIR}/settings/annulus.yaml",
        lattices=rules.merge.output.lattices,
        experiments=stills_output_of_all_shards("reindex", "integrated_experiments"),
        reflections=stills_output_of_all_shards("reindex", "integrated_reflections"),
    output:
        reflections=shard_files("annulus", "_annulus.refl"),
        experiments=shard_files("annulus", "_annulus.expt"),
        summary=f"{OUTPUT_DIR}/annulus/{{dataset}}/summary.json",
        text=f"{OUTPUT_DIR}/annulus/{{dataset}}/summary.txt",
    params:
        shards=lambda wildcards: " ".join(
            f"--shard-prefix {shlex.quote(prefix)} --output-prefix {shlex.quote(output_prefix)}"
            for prefix, output_prefix in zip(shard_prefixes("reindex", wildcards.dataset),
                                             shard_prefixes("annulus", wildcards.dataset))),
    log:
        f"{LOG_DIR}/annulus/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/annulus/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-annulus --config {input.settings:q} --lattices {input.lattices:q} {params.shards}"
        " --summary {output.summary:q} --text {output.text:q} > {log:q} 2>&1"
