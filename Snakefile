# SPREAD analysis of the ferredoxin LY99 case: table of contents. The logic lives in the xfel_spread
# package; rules/*.smk only wire its command-line entry points together (see docs/design.md).
#
#   .venv/bin/snakemake --profile profiles/local                                    # demo config
#   .venv/bin/snakemake --profile profiles/slurm --configfile config/production.yaml  # 100,000 shots

configfile: "config/config.yaml"

# `snakemake --report report.html`: this text, then every stage's figures (see rules/report.smk).
report: "report/workflow.rst"

# First: validate the config and fill in defaults. A bad config stops the run here, with a one-line
# "FILE: key.path: problem" message, before any job is planned.
include: "rules/common.smk"

# Then the stages, in pipeline order: every name the rule files share lives in common.smk; the only
# order they depend on is a rule's `rules.NAME.output` of a rule in a file above it.
include: "rules/reference.smk"
include: "rules/simulate.smk"
include: "rules/images.smk"
include: "rules/index.smk"
include: "rules/hitfind.smk"
include: "rules/metrology.smk"
include: "rules/reindex.smk"
include: "rules/score.smk"
include: "rules/cells.smk"
include: "rules/merge.smk"
include: "rules/annulus.smk"
include: "rules/stage1.smk"
include: "rules/pixel_metrology.smk"
include: "rules/spread.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),
