#!/usr/bin/env bash
# Set up the pipeline on a fresh Debian bookworm machine (run as root, or with sudo available):
#   1. apt packages (DIALS, dxtbx, cctbx, MPI, h5py, ...), only those not yet installed;
#   2. a virtual environment .venv on Debian's /usr/bin/python3 that sees the system packages;
#   3. pip installs (Snakemake, torch, ...) constrained by constraints.txt, and this package (editable).
# Idempotent: re-running it only does what is missing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
# DIALS, dxtbx and cctbx are built for Debian's interpreter, not whatever python3 is first on PATH.
system_python=/usr/bin/python3

apt_packages=(
  dials python3-dials python3-cctbx python3-venv
  openmpi-bin libopenmpi-dev python3-mpi4py
  python3-h5py python3-matplotlib python3-scipy python3-numpy python3-yaml python3-jsonschema
  python3-sklearn  # tests only: our DBSCAN and covariance are compared with its own
  chromium         # tests only: the Snakemake report is rendered in headless Chromium
  python3-pandas   # imported by snakemake-executor-plugin-slurm when Snakemake loads it
  g++ python3-dev ninja-build  # build the sparse models' compiled loop (src/xfel_spread/sim/fused.py)
  # tests only: a single-node Slurm (scripts/slurm/single_node.sh) for tests/test_slurm.py
  slurmctld slurmd slurm-client munge
  slurm-wlm-basic-plugins  # tests only: its mpi_pmix plugin is what `srun --mpi=pmix` loads
)

say() { printf '[setup] %s\n' "$*"; }

install_missing_apt_packages() {
  local missing=()
  local package
  for package in "${apt_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if ((${#missing[@]} == 0)); then
    say "apt packages: all ${#apt_packages[@]} present"
    return
  fi
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  say "apt packages: installing ${missing[*]}"
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

create_venv() {
  if [[ -x "$venv/bin/python" ]]; then
    say "venv: $venv exists"
  else
    say "venv: creating $venv from $system_python (with system site packages)"
    "$system_python" -m venv --system-site-packages "$venv"
  fi
  # libtbx looks for its build directory under <sys.prefix>/lib/cctbx; inside a venv sys.prefix is the
  # venv, so point that path at Debian's copy (the alternative is exporting LIBTBX_BUILD everywhere).
  if [[ ! -e "$venv/lib/cctbx" ]]; then
    say "venv: linking $venv/lib/cctbx -> /usr/lib/cctbx"
    ln -s /usr/lib/cctbx "$venv/lib/cctbx"
  fi
}

pip_install() {
  say "pip: installing Python packages (constraints: constraints.txt)"
  # Packages Debian already provides (numpy, h5py, jsonschema, pyyaml) are left alone when they satisfy
  # the constraints; pip only adds what is missing.
  "$venv/bin/python" -m pip install --quiet -c "$repo_root/constraints.txt" \
    'snakemake>=9,<10' 'torch==2.13.0' pytest jsonschema pyyaml \
    snakemake-executor-plugin-slurm-jobstep throttler \
    ruff  # the Python linter of `make lint` (.ci/run)
  # The Slurm plugin without its declared dependencies, which include numpy 2 and pandas 2: see
  # constraints.txt for why it works with Debian's numpy 1.24 and pandas 1.5; the two it needs
  # besides are installed just above. `pip check` reports the declared conflict.
  "$venv/bin/python" -m pip install --quiet -c "$repo_root/constraints.txt" --no-deps \
    snakemake-executor-plugin-slurm
  "$venv/bin/python" -m pip install --quiet -c "$repo_root/constraints.txt" -e "$repo_root"
}

check_environment() {
  say "check: importing the toolchain"
  "$venv/bin/python" - <<'PY'
import numpy

import cctbx, dials.command_line.stills_process, dxtbx, h5py, jsonschema, mpi4py, snakemake, torch
import snakemake_executor_plugin_slurm  # loads its numpy and pandas modules too
import xfel_spread

# Debian's compiled DIALS/cctbx/h5py extensions are built against numpy 1.x.
if int(numpy.__version__.split(".")[0]) >= 2:
    raise SystemExit(f"numpy {numpy.__version__} at {numpy.__file__}: expected Debian's numpy 1.x")
print(f"[setup] check: numpy {numpy.__version__} ({numpy.__file__}), torch {torch.__version__}, "
      f"snakemake {snakemake.__version__}")
PY
}

install_missing_apt_packages
create_venv
pip_install
check_environment
say "done"
