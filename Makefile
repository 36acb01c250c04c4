# Entry points: make setup | demo | test | bench. Everything runs from the project's .venv.
SHELL := /bin/bash
VENV := .venv
SETUP_STAMP := $(VENV)/.setup-complete

.PHONY: setup demo test bench

setup: $(SETUP_STAMP)

# Re-run the (idempotent) set-up only when what it installs from has changed, or the venv is gone.
$(SETUP_STAMP): scripts/setup.sh pyproject.toml constraints.txt
	scripts/setup.sh
	touch $@

# The demo config (config/config.yaml) is the Snakefile's default.
demo: setup
	$(VENV)/bin/snakemake --profile profiles/local

test: setup
	$(VENV)/bin/python -m pytest -q tests

bench: demo
	@shopt -s nullglob; benchmarks=(benchmarks/*.py); \
	if (( $${#benchmarks[@]} == 0 )); then echo "no benchmarks/*.py to run"; fi; \
	for benchmark in "$${benchmarks[@]}"; do \
		echo "== $$benchmark"; $(VENV)/bin/python "$$benchmark" || exit 1; \
	done
