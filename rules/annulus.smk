# Stage 7: the reflections of a resolution annulus (annulus.d_min to d_max) from the lattices the merge
# accepted, one reflection/experiment file pair per shard for the pixel-refinement stage, with counts.


def annulus_prefix(index):
    """Output prefix of shard `index` of the annulus stage, with a {dataset} wildcard."""
    return f"{OUTPUT_DIR}/annulus/{{dataset}}/shard_{index:05d}"


rule annulus:
    """Select the annulus reflections of one dataset; count lattices, shoeboxes, indices and pixels."""
    input:
        settings=f"{OUTPUT_DIR}/settings/annulus.yaml",
        lattices=rules.merge.output.lattices,
        experiments=stills_output_of_all_shards("reindex", "integrated_experiments"),
        reflections=stills_output_of_all_shards("reindex", "integrated_reflections"),
    output:
        reflections=[annulus_prefix(index) + "_annulus.refl" for index in range(len(SHARD_RANGES))],
        experiments=[annulus_prefix(index) + "_annulus.expt" for index in range(len(SHARD_RANGES))],
        summary=f"{OUTPUT_DIR}/annulus/{{dataset}}/summary.json",
        text=f"{OUTPUT_DIR}/annulus/{{dataset}}/summary.txt",
    wildcard_constraints:
        dataset=DATASET,
    params:
        shards=lambda wildcards: " ".join(
            f"--shard-prefix {shlex.quote(prefix)} --output-prefix {shlex.quote(annulus_prefix(index).format(dataset=wildcards.dataset))}"
            for index, prefix in enumerate(stills_prefixes("reindex", wildcards.dataset))),
    log:
        f"{LOG_DIR}/annulus/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/annulus/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-annulus --config {input.settings:q} --lattices {input.lattices:q} {params.shards}"
        " --summary {output.summary:q} --text {output.text:q} > {log:q} 2>&1"
