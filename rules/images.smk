# Images from elsewhere (input.source: images): the run's image list, then one image-list shard per
# shots_per_shard images (files, frames, spectra, the mask's path; no pixels copied), which every
# per-shard stage reads in place of a simulated shard (shard_path in common.smk).


rule list_images:
    """Every (file, frame) of input.images, in order: the run's image list."""
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
    """One image-list shard: its images' files and frames, each shot's spectrum, the mask; checked by dxtbx."""
    input:
        settings=f"{OUTPUT_DIR}/settings/images.yaml",
        # Ancient: a longer list reruns only the shards whose shots changed (params.digest).
        image_list=ancient(IMAGE_LIST),
        **{key: config["input"][key] for key in ("spectra_table", "mask") if config["input"][key]},
    output:
        # shard_path() with images from elsewhere; spelt out so a simulated run has no second rule for its shards.
        shard_file("images", ".h5"),
    params:
        shots=lambda wildcards: SHARD_RANGES[int(wildcards.index)],
        digest=lambda wildcards: shots_digest(IMAGE_SHOTS[slice(*SHARD_RANGES[int(wildcards.index)])]),
    log:
        f"{LOG_DIR}/images/{{dataset}}/shard_{{index}}.log",
    shell:
        "{ENV_BIN}/python -m xfel_spread.cli.images shard --config {input.settings:q} --list {input.image_list:q}"
        " --shots {params.shots[0]} {params.shots[1]} --output {output:q} > {log:q} 2>&1"
