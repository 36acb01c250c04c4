# Reference data: the 1M2A model and the Fe f' and f'' tables, copied from reference.mirror_dir when one is
# configured, otherwise downloaded; always checked against the sha256 recorded in xfel_spread.reference.

import re

# Runs on the submitting host: cluster compute nodes often cannot reach the internet.
localrules: reference_data


rule reference_data:
    """Obtain one verified reference file."""
    input:
        mirror_copy,
    output:
        reference_path("{name}"),
    wildcard_constraints:
        name="|".join(re.escape(name) for name in REFERENCE_NAMES),
    params:
        dest=REFERENCE_DIR,
        mirror=mirror_option,
    log:
        f"{LOG_DIR}/reference/{{name}}.log",
    shell:
        "{ENV_BIN}/spread-fetch-reference --dest {params.dest:q} {params.mirror} {wildcards.name:q} > {log:q} 2>&1"
