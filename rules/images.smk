# Images from elsewhere (input.source: images): the run's image list, then one image-list shard per
# shots_per_shard images (files, frames, spectra, the mask's path; no pixels copied), which every
# per-shard stage reads in place of a simulated shard (shard_path in common.smk).


rule list_images:
    """Every (file, frame) of input.images, in order: the run's image list (a record; no rule reads it)."""
    output:
        IMAGE_LIST,
    params:
        images=lambda wildcards: repeated_option("--image", config["input"]["images"]),
        # The listing as planned: a new or removed file rewrites the list.
        digest=lambda wildcards: shots_digest(IMAGE_SHOTS),
    log:
        f"{LOG_DIR}/images/list.log",
    localrule: True
    shell:
        "{ENV_BIN}/python -m xfel_spread.cli.images list {params.images} --list {output:q} > {log:q} 2>&1"


rule image_shard:
    """One image-list shard: its images' files and frames, each shot's spectrum, the mask; checked by dxtbx, and
    the spectra against the structure-factor channels when SPREAD (or stage 1 with the model) is asked for."""
    input:
        settings=f"{OUTPUT_DIR}/settings/images.yaml",
        **{key: config["input"][key] for key in ("spectra_table", "mask") if config["input"][key]},
    output:
        # shard_path() with images from elsewhere; spelt out so a simulated run has no second rule for its shards.
        shard_file("images", ".h5"),
    params:
        images=lambda wildcards: repeated_option("--image", config["input"]["images"]),
        shots=lambda wildcards: SHARD_RANGES[int(wildcards.index)],
        # The shard's own shots: more files rerun only the shards whose shots changed (params trigger), and
        # the job checks that the files it lists are still these. Not the list file as an input: Snakemake
        # would then rerun the list and stop before the new shards.
        digest=lambda wildcards: shots_digest(IMAGE_SHOTS[slice(*SHARD_RANGES[int(wildcards.index)])]),
    log:
        f"{LOG_DIR}/images/{{dataset}}/shard_{{index}}.log",
    shell:
        "{ENV_BIN}/python -m xfel_spread.cli.images shard --config {input.settings:q} {params.images}"
        " --shots {params.shots[0]} {params.shots[1]} --digest {params.digest} --output {output:q}"
        " {CHANNEL_GRID_OPTION} > {log:q} 2>&1"
