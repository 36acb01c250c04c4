# Stage 10: SPREAD, one MPI job per dataset: each anomalous site's f', f'' on an energy grid, refined
# against every converged lattice of the pixel refinement `spread.refinement` chose (ranks share the
# shards; the same bytes for any rank count), with the two negative controls; then scored against the
# tables the simulation used (docs/spread.md).


rule spread:
    input:
        unpack(spread_start_tables),
        settings=f"{OUTPUT_DIR}/settings/spread.yaml",
        experiments=lambda wildcards: shard_files("annulus", "_annulus.expt", wildcards.dataset),
        reflections=lambda wildcards: shard_files("annulus", "_annulus.refl", wildcards.dataset),
        shards=lambda wildcards: [shard_path(wildcards.dataset, index) for index in range(len(SHARD_RANGES))],
        shots=lambda wildcards: shard_files(SPREAD_REFINEMENT, "_shots.tsv", wildcards.dataset),
        # Each converged lattice's free mosaic domains (stage1.free_domains; the header alone when off).
        domains=lambda wildcards: shard_files(SPREAD_REFINEMENT, "_domains.tsv", wildcards.dataset),
        pdb=lambda wildcards: MODEL_FILE,  # a function: with `input.model: none` nothing plans this rule
    output:
        **spread_outputs(),
    params:
        shards=spread_shard_options,
        # The named start tables are reference copies, beside the LY99 model whatever input.model says.
        tables_dir=lambda wildcards: os.path.dirname(reference_path("1m2a.pdb")),
        prefix=lambda wildcards: spread_prefix(wildcards.dataset),
        psf=detector_psf_option,
    resources:
        mpi="mpirun",
        tasks=1,
    log:
        f"{LOG_DIR}/spread/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/spread/{{dataset}}.tsv"
    shell:
        "{resources.mpi} -n {resources.tasks} {ENV_BIN}/spread-spread --config {input.settings:q}"
        " --dataset {wildcards.dataset} {params.shards} --pdb {input.pdb:q} --tables-dir {params.tables_dir:q}"
        " --output-prefix {params.prefix:q} {params.psf} > {log:q} 2>&1"


rule score_spread:
    input:
        unpack(spread_truth_tables),
        fp_fdp=rules.spread.output.fp_fdp,
        controls=rules.spread.output.controls,
        summary=rules.spread.output.summary,
    output:
        table=f"{OUTPUT_DIR}/score/spread_{{dataset}}.tsv",
        text=f"{OUTPUT_DIR}/score/spread_{{dataset}}.txt",
        plot=report(f"{OUTPUT_DIR}/score/spread_{{dataset}}.png", caption="../report/spread.rst",
                    category="6. SPREAD", subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "SPREAD: f' and f'' of each site"}),
    params:
        prefix=lambda wildcards: spread_prefix(wildcards.dataset),
        truth=spread_truth_option,
    log:
        f"{LOG_DIR}/score/spread_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-score-spread --dataset {wildcards.dataset} --prefix {params.prefix:q} {params.truth}"
        " --table {output.table:q} --text {output.text:q} --plot {output.plot:q} > {log:q} 2>&1"
