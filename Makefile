# Entry points: make setup | demo | lint | test | test-fast | bench. Everything runs from the project's .venv.
SHELL := /bin/bash
VENV := .venv
SETUP_STAMP := $(VENV)/.setup-complete

.PHONY: setup demo lint test test-fast bench

setup: $(SETUP_STAMP)

# Re-run the (idempotent) set-up only when what it installs from has changed, or the venv is gone.
$(SETUP_STAMP): scripts/setup.sh pyproject.toml constraints.txt
	scripts/setup.sh
	touch $@

# The demo config (config/config.yaml) is the Snakefile's default.
demo: setup
	$(VENV)/bin/snakemake --profile profiles/local

# ruff on the Python code (config in pyproject.toml), then `snakemake --lint` on the rules, failing on any
# lint that scripts/lint_workflow.py does not list with its reason.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python scripts/lint_workflow.py

# Everything, the slow tier (pipeline, Slurm, resume, report: pytest -m slow) included; what CI runs.
# The real-Slurm test spends most of its minutes waiting on the Slurm plugin's status polling, so it runs
# in a pytest process of its own beside the rest of the suite (its output follows the suite's); the
# target fails if either fails.
test: setup
	@slurm_dir=$$(mktemp -d); \
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --basetemp="$$slurm_dir/tmp" tests/test_slurm.py > "$$slurm_dir/log" 2>&1 & \
	slurm_pid=$$!; \
	$(VENV)/bin/python -m pytest -q --ignore=tests/test_slurm.py tests; suite=$$?; \
	wait $$slurm_pid; slurm=$$?; \
	echo "== tests/test_slurm.py (run beside the suite)"; cat "$$slurm_dir/log"; rm -rf "$$slurm_dir"; \
	exit $$(( suite != 0 || slurm != 0 ))

# The fast tier: every test not marked slow.
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

bench: demo
	@shopt -s nullglob; benchmarks=(benchmarks/*.py); \
	if (( $${#benchmarks[@]} == 0 )); then echo "no benchmarks/*.py to run"; fi; \
	for benchmark in "$${benchmarks[@]}"; do \
		echo "== $$benchmark"; $(VENV)/bin/python "$$benchmark" || exit 1; \
	done
