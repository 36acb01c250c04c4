# Hit finding and radial averages (hitfind.*): every shard measured once (lit pixels, photons, radial
# profiles, powder sum), then per dataset the hit threshold with a hits table per shard (index and reindex
# read it when hitfind.enabled), the powder pattern with its radial profile, and the score against truth.


rule hitfind_shard:
    """Lit pixels, photons, radial profile and solvent-ring peak of every shot of one shard; its powder sum."""
    input:
        settings=f"{OUTPUT_DIR}/settings/hitfind_shard.yaml",
        shard=shard_path(),
    output:
        lit=shard_file("hitfind", "_lit.tsv"),
        radial=shard_file("hitfind", "_radial.npz"),
        # Kept (not temporary): a new shard changes the dataset's sum, which then needs every shard's
        # part again. At full size a part is 118 MB, under 3 % of its shard of 500 images.
        powder=shard_file("hitfind", "_powder.npz"),
    params:
        first_shot=lambda wildcards: SHARD_RANGES[int(wildcards.index)][0],
    resources:
        # Measured peak: 2.0 GB on a full-size (3840 x 3840) shard.
        mem_mb=3000,
    log:
        f"{LOG_DIR}/hitfind/{{dataset}}/shard_{{index}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/hitfind/{{dataset}}/shard_{{index}}.tsv"
    shell:
        "{ENV_BIN}/spread-hitfind-shard --config {input.settings:q} --shard {input.shard:q}"
        " --first-shot {params.first_shot} --lit-table {output.lit:q} --radial {output.radial:q}"
        " --powder {output.powder:q} > {log:q} 2>&1"


rule hitfind:
    """The run's hit threshold, a hits table per shard and the per-shot ring peaks of one dataset."""
    input:
        settings=f"{OUTPUT_DIR}/settings/hitfind.yaml",
        lit=hitfind_files("_lit.tsv"),
    output:
        hits=shard_files("hitfind", "_hits.tsv"),
        ring_peaks=f"{OUTPUT_DIR}/hitfind/{{dataset}}/ring_peaks.tsv",
        summary=f"{OUTPUT_DIR}/hitfind/{{dataset}}/summary.json",
        shots_plot=report(f"{OUTPUT_DIR}/hitfind/{{dataset}}/shots.png", caption="../report/hitfind_shots.rst",
                          category=SHOTS_CATEGORY, subcategory="{dataset}",
                          labels={"dataset": "{dataset}", "figure": "lit pixels and ring peaks per shot"}),
    params:
        shards=lambda wildcards, input, output: " ".join((
            repeated_option("--lit-table", input.lit), repeated_option("--hits-table", output.hits))),
    log:
        f"{LOG_DIR}/hitfind/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/hitfind/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-hitfind --config {input.settings:q} {params.shards} --ring-peaks {output.ring_peaks:q}"
        " --summary {output.summary:q} --shots-plot {output.shots_plot:q} > {log:q} 2>&1"


rule powder:
    """The powder pattern (sum of every shot) of one dataset, its radial profile and solvent ring."""
    input:
        settings=f"{OUTPUT_DIR}/settings/hitfind_shard.yaml",
        radial=hitfind_files("_radial.npz"),
        powder=hitfind_files("_powder.npz"),
    output:
        powder=f"{OUTPUT_DIR}/hitfind/{{dataset}}/powder.npy",
        powder_radial=f"{OUTPUT_DIR}/hitfind/{{dataset}}/powder_radial.tsv",
        summary=f"{OUTPUT_DIR}/hitfind/{{dataset}}/powder.json",
        plot=report(f"{OUTPUT_DIR}/hitfind/{{dataset}}/powder.png", caption="../report/powder.rst",
                    category=SHOTS_CATEGORY, subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "powder pattern and radial profile"}),
    params:
        shards=lambda wildcards, input: " ".join((
            repeated_option("--radial", input.radial), repeated_option("--powder", input.powder))),
    resources:
        # Measured peak: 1.8 GB for a full-size panel.
        mem_mb=3000,
    log:
        f"{LOG_DIR}/powder/{{dataset}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/powder/{{dataset}}.tsv"
    shell:
        "{ENV_BIN}/spread-powder --config {input.settings:q} {params.shards} --powder-image {output.powder:q}"
        " --powder-radial {output.powder_radial:q} --summary {output.summary:q} --plot {output.plot:q}"
        " > {log:q} 2>&1"


rule score_hitfind:
    """Hit/miss accuracy against the truth's blank flags; the solvent profile against the background model."""
    input:
        simulate=f"{OUTPUT_DIR}/settings/simulate.yaml",
        settings=f"{OUTPUT_DIR}/settings/hitfind_shard.yaml",
        hits=rules.hitfind.output.hits,
        radial=hitfind_files("_radial.npz"),
        truth=TRUTH_FILES,
        summary=rules.hitfind.output.summary,
    output:
        table=f"{OUTPUT_DIR}/score/hitfind_{{dataset}}.tsv",
        text=f"{OUTPUT_DIR}/score/hitfind_{{dataset}}.txt",
        plot=report(f"{OUTPUT_DIR}/score/hitfind_{{dataset}}.png", caption="../report/hitfind_score.rst",
                    category=SHOTS_CATEGORY, subcategory="{dataset}",
                    labels={"dataset": "{dataset}", "figure": "hits and solvent profile against the simulation"}),
    params:
        shards=lambda wildcards, input: " ".join(
            repeated_option(option, paths) for option, paths in (
                ("--hits-table", input.hits), ("--radial", input.radial), ("--truth", input.truth))),
    log:
        f"{LOG_DIR}/score/hitfind_{{dataset}}.log",
    shell:
        "{ENV_BIN}/spread-score-hitfind --dataset {wildcards.dataset} --simulate-config {input.simulate:q}"
        " --hitfind-config {input.settings:q} {params.shards} --summary {input.summary:q}"
        " --table {output.table:q} --text {output.text:q} --plot {output.plot:q} > {log:q} 2>&1"
