# Stage 1: per-channel structure factors, then simulated shards of shots (both datasets at once).

from xfel_spread.config import stage_settings as settings_of_stage, write_settings


rule stage_settings:
    """The config sections one stage depends on; rewritten only when they change (params trigger)."""
    output:
        f"{OUTPUT_DIR}/settings/{{stage}}.yaml",
    params:
        settings=lambda wildcards: settings_of_stage(config, wildcards.stage),
    log:
        f"{LOG_DIR}/settings/{{stage}}.log",
    localrule: True
    run:
        write_settings(params.settings, output[0])


rule structure_factors:
    """|F| of the model (input.model, LY99's 1M2A by default) for every energy channel: the simulation's two
    Fe sites with the ox/red f', f'' tables, or, for images from elsewhere, spread.sites with their start tables."""
    input:
        unpack(structure_factor_tables),
        settings=f"{OUTPUT_DIR}/settings/structure_factors.yaml",
        # A function: with `input.model: none` there is no model, and nothing plans this rule.
        pdb=lambda wildcards: MODEL_FILE,
    output:
        f"{OUTPUT_DIR}/structure_factors/amplitudes.h5",
    params:
        sites=structure_factor_site_options,
    log:
        f"{LOG_DIR}/structure_factors.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/structure_factors.tsv"
    shell:
        "{ENV_BIN}/spread-structure-factors --config {input.settings:q} --pdb {input.pdb:q} {params.sites}"
        " --output {output:q} > {log:q} 2>&1"


rule simulate:
    """One shard of shots, written without and with the detector PSF, plus its ground truth."""
    input:
        settings=f"{OUTPUT_DIR}/settings/simulate.yaml",
        amplitudes=rules.structure_factors.output[0],
        # A detector geometry file (simulate.detector.geometry): editing it re-renders the shards.
        geometry=[config["simulate"]["detector"]["geometry"]] if config["simulate"]["detector"]["geometry"] else [],
    output:
        nopsf=simulated_shard_path("nopsf"),
        psf=simulated_shard_path("psf"),
        truth=shard_file("sim", ".json", dataset="truth"),
    params:
        shots=lambda wildcards: SHARD_RANGES[int(wildcards.index)],
    threads: 2
    log:
        f"{LOG_DIR}/simulate/shard_{{index}}.log",
    benchmark:
        f"{LOG_DIR}/benchmarks/simulate/shard_{{index}}.tsv"
    shell:
        "{ENV_BIN}/spread-simulate --config {input.settings:q} --amplitudes {input.amplitudes:q}"
        " --shots {params.shots[0]} {params.shots[1]} --nopsf {output.nopsf:q} --psf {output.psf:q}"
        " --truth {output.truth:q} --threads {threads} > {log:q} 2>&1"
