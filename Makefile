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

# make test: one OpenMP/MKL thread per test process unless the environment says otherwise (make
# test-fast, one process, keeps torch's default: 4:51 with one thread against 4:28). Torch's threads spin
# while they wait, and with three or four pytest processes (and their MPI ranks) on two cores the spinning
# threads took the cores from the work (tests/test_stage1_psf.py's slow tests beside two busy loops:
# 129 s wall and 116 s CPU with torch's default 2 threads, 51 s and 29 s with one). The stages set
# their own thread counts (their --threads options), which this does not change.
test: export OMP_NUM_THREADS ?= 1
test: export MKL_NUM_THREADS ?= 1
# Likewise an Open MPI rank waiting in a collective yields its core instead of polling at full speed
# (Open MPI polls unless it sees more ranks than slots; each test's mpirun sees the whole machine).
test: export OMPI_MCA_mpi_yield_when_idle ?= 1

# Everything, the slow tier (pipeline, Slurm, resume, report: pytest -m slow) included; what CI runs.
# Four pytest processes side by side, each with its own scratch directory and log: the real-Slurm test
# (mostly waiting on the plugin's status polling), then the images from elsewhere and the production-scale
# dry runs; the runs that use or extend the session's completed demo run (report first, before the pipeline
# tests extend the run); the other Snakemake and DIALS runs, each a chain of short jobs (resume, the CSPAD
# stills and geometry, stills_process, hit finding, image lists); and the rest of the suite. Their logs
# follow in that order and the target fails if any fails.
SLURM_TESTS := tests/test_slurm.py tests/test_images_pipeline.py tests/test_scale.py tests/test_images_scale.py
PIPELINE_TESTS := tests/test_report.py tests/test_pipeline.py
CHAIN_TESTS := tests/test_resume.py tests/test_cspad_pipeline.py tests/test_geometry_pipeline.py \
	tests/test_stills_process.py tests/test_hitfind.py tests/test_images_workflow.py
# Each process's pytest: quiet, no cache directory in the clone, its 12 slowest tests printed.
PYTEST := $(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=12
test: setup
	@scratch=$$(mktemp -d); \
	export TIMEFORMAT="this process and its children: %U s user + %S s system CPU in %R s"; \
	( time $(PYTEST) --basetemp="$$scratch/slurm" $(SLURM_TESTS) ) > "$$scratch/slurm.log" 2>&1 & \
	slurm_pid=$$!; \
	( time $(PYTEST) --basetemp="$$scratch/pipeline" $(PIPELINE_TESTS) ) > "$$scratch/pipeline.log" 2>&1 & \
	pipeline_pid=$$!; \
	( time $(PYTEST) --basetemp="$$scratch/chain" $(CHAIN_TESTS) ) > "$$scratch/chain.log" 2>&1 & \
	chain_pid=$$!; \
	time $(PYTEST) --basetemp="$$scratch/rest" $(addprefix --ignore=,$(SLURM_TESTS) $(PIPELINE_TESTS) $(CHAIN_TESTS)) tests; rest=$$?; \
	wait $$pipeline_pid; pipeline=$$?; wait $$chain_pid; chain=$$?; wait $$slurm_pid; slurm=$$?; \
	echo "== $(PIPELINE_TESTS) (run beside the rest)"; cat "$$scratch/pipeline.log"; \
	echo "== $(CHAIN_TESTS) (run beside the rest)"; cat "$$scratch/chain.log"; \
	echo "== $(SLURM_TESTS) (run beside the rest)"; cat "$$scratch/slurm.log"; rm -rf "$$scratch"; \
	exit $$(( rest != 0 || pipeline != 0 || chain != 0 || slurm != 0 ))

# The fast tier: every test not marked slow.
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

bench: demo
	@shopt -s nullglob; benchmarks=(benchmarks/*.py); \
	if (( $${#benchmarks[@]} == 0 )); then echo "no benchmarks/*.py to run"; fi; \
	for benchmark in "$${benchmarks[@]}"; do \
		echo "== $$benchmark"; $(VENV)/bin/python "$$benchmark" || exit 1; \
	done
