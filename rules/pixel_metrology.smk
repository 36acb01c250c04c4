# The detector from the pixels (optional, pixel_metrology.enabled): the level-0 detector refined jointly
# with the lattices stage 1 refined, one job per dataset after stage 1 of every shard. Its refined
# detector is an experiment list that metrology.reference_geometry takes in the next run.


rule pixel_metrology:
    """Refine the beam centre and distance with stage 1's lattices of one dataset, from their pixels."""
    input:
        unpack(stage1_structure_factors),
        settings=f"{OUTPUT_DIR}/settings/pixel_metrology.yaml",
        experiments=lambda wildcards: shard_files("annulus", "_annulus.expt", wildcards.dataset),
        reflections=lambda wildcards: shard_files("annulus", "_annulus.refl", wildcards.dataset),
        shards=lambda wildcards: [shard_path(wildcards.dataset, index) for index in range(len(SHARD_RANGES))],
        stage1_experiments=lambda wildcards: shard_files("stage1", "_refined.expt", wildcards.dataset),
        stage1_shots=lambda wildcards: shard_files("stage1", "_shots.tsv", wildcards.dataset),
    output:
        refined_detector=f"{OUTPUT_DIR}/pixel_metrology/{{dataset}}/refined_detector.expt",
        table=f"{OUTPUT_DIR}/pixel_metrology/{{dataset}}/table.tsv",
        summary=f"{OUTPUT_DIR}/pixel_metrology/{{dataset}}/summary.json",
        plot=report(f"{OUTPUT_DIR}/pixel_metrology/{{dataset}}/refinement.png",
                    caption="../report/pixel_metrology.rst", category="2. DIALS stages",
                    subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "detector from the pixels, before and after"}),
    params:
        prefixes=lambda wildcards: " ".join((
            repeated_option("--annulus-prefix", shard_prefixes("annulus", wildcards.dataset)),
            repeated_option("--shard", [shard_path(wildcards.dataset, index) for index in range(len(SHARD_RANGES))]),
            repeated_option("--stage1-prefix", shard_prefixes("stage1", wildcards.dataset)))),
        structure_factors=structure_factor_option,
        psf=detector_psf_option,
    log:
        f"{LOG_DIR}/pixel_metrology/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/pixel_metrology/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/python -m xfel_spread.cli.pixel_metrology --config {input.settings:q}"
        " --dataset {wildcards.dataset} {params.prefixes} {params.structure_factors} {params.psf}"
        " --refined-detector {output.refined_detector:q} --table {output.table:q}"
        " --summary {output.summary:q} --plot {output.plot:q} > {log:q} 2>&1"
