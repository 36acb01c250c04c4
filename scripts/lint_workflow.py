#!/usr/bin/env python3
"""`snakemake --lint` on the workflow, failing on any lint that ACCEPTED below does not explain.

Snakemake has no way to silence one lint, so the lints this workflow keeps on purpose are listed here,
each with why; anything else (a new lint, or one of these in a rule it was not accepted for) fails:

    .venv/bin/python scripts/lint_workflow.py [snakemake options, e.g. --configfile config/production.yaml]
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Lint title -> (rules it is accepted for, or None for every rule; why it stays).
ACCEPTED = {
    "Specify a conda environment or container for each rule.": (None, (
        "jobs run in the environment Snakemake was started from (scripts/setup.sh's .venv, or the conda "
        "environment envs/spread.yaml made by hand): both profiles set use-conda: false, every command is "
        "ENV_BIN/spread-*, and envs/spread.yaml installs this package with `pip -e ..`, which only works "
        "from its own directory, not from the copy Snakemake's --software-deployment-method conda builds")),
    "Shell command directly uses variable ENV_BIN from outside of the rule": (None, (
        "ENV_BIN is where the running Python's spread-* commands are (rules/common.smk); as a param its "
        "value (the venv's path) would rerun every finished job when the venv moves (params trigger), and "
        "as {params.env_bin} the changed shell text would rerun them now (code trigger)")),
    "Shell command directly uses variable CHANNEL_GRID_OPTION from outside of the rule": ({"image_shard"}, (
        "the structure-factor grid the shard's spectra are checked against (rules/common.smk) changes no byte of "
        "the shard; as a param a new grid or spread.enabled would rerun every shard and, through them, every "
        "stage (params trigger)")),
    "Param dest is a prefix of input or output file but hardcoded": ({"reference_data"}, (
        "the reference directory is config, not derived from the output; made a function of the output, "
        "it would drop out of the recorded params and rerun reference_data in every finished run")),
}

LINTS_FOR = re.compile(r"^Lints for (?:rule (?P<rule>\S+) \(|snakefile (?P<snakefile>\S+):)")
LINT_TITLE = re.compile(r"^    \* (?P<title>.+):$")


def lints(text: str) -> list[tuple[str, str]]:
    """(rule or snakefile, lint title) for every lint in `snakemake --lint` text output."""
    found, subject = [], None
    for line in text.splitlines():
        if match := LINTS_FOR.match(line):
            subject = match["rule"] or match["snakefile"]
        elif (match := LINT_TITLE.match(line)) and subject is not None:
            found.append((subject, match["title"]))
    return found


def unexplained(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The lints in `found` that ACCEPTED does not cover."""
    def accepted(subject, title):
        rules, _ = ACCEPTED.get(title, (set(), ""))
        return rules is None or subject in rules

    return [(subject, title) for subject, title in found if not accepted(subject, title)]


def main(argv: list[str]) -> int:
    command = [sys.executable, "-m", "snakemake", "--lint", "--cores", "1", *argv]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    output = result.stdout + result.stderr
    found = lints(output)
    if result.returncode != 0 and not found:
        print(output, file=sys.stderr)
        print(f"lint_workflow: snakemake --lint failed (exit {result.returncode}) before linting", file=sys.stderr)
        return 1
    problems = unexplained(found)
    for subject, title in problems:
        print(f"lint_workflow: {subject}: {title}", file=sys.stderr)
    if problems:
        print(output, file=sys.stderr)
        return 1
    print(f"lint_workflow: {len(found)} accepted lints ({len(set(title for _, title in found))} kinds, see "
          "scripts/lint_workflow.py), none other")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
