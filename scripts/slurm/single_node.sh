#!/usr/bin/env bash
# A throw-away single-node Slurm on this machine, for tests (tests/test_slurm.py) and trying the
# profile profiles/slurm without a cluster. Needs root and Debian's slurmctld, slurmd, slurm-client
# and munge (scripts/setup.sh installs them).
#   scripts/slurm/single_node.sh up     # write the config, start munged, slurmctld, slurmd; wait for idle
#   scripts/slurm/single_node.sh down   # cancel jobs, stop the three daemons, remove config and state
#
# The config goes to Slurm's default path /etc/slurm/slurm.conf: inside a job, the Snakemake job-step
# plugin drops every SLURM_* variable (SLURM_CONF included) before calling srun, so srun must find the
# config where it looks by default. An existing config that this script did not write is left alone.
#
# Choices, each the simplest that works in a container without systemd or cgroups:
#   proctrack/linuxproc + task/none  track and place processes without cgroups;
#   select/cons_tres                 hands out single cores (and memory), so several jobs share the node;
#   accounting_storage/none          no slurmdbd: sacct has nothing to read, so Snakemake must check job
#                                    states with squeue (profile: slurm-status-command: squeue) and keep
#                                    finished jobs visible for MinJobAge (300 s here; the plugin wants at
#                                    least 3 x its init-seconds-before-status-checks);
#   DefMemPerCPU                     a job that asks for no memory gets this much per CPU, not the node.
# The node's CPUs, sockets and memory come from `slurmd -C` (what slurmd itself detects), so a 2-core
# machine declares 2 CPUs: enough for the test's 2-rank MPI steps, which queue behind each other.
set -euo pipefail

conf_dir=/etc/slurm
conf="$conf_dir/slurm.conf"
state_dir="${SPREAD_SLURM_STATE_DIR:-/var/tmp/spread-slurm}"  # spool, state, logs and pid files
marker="# Written by scripts/slurm/single_node.sh (a throw-away single-node Slurm)."
partition=debug
wait_seconds=60

say() { printf '[slurm] %s\n' "$*"; }
die() { printf '[slurm] error: %s\n' "$*" >&2; exit 1; }

write_config() {
  local host node_line
  host="$(hostname -s)"
  # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  node_line="$(slurmd -C | head -n 1)"
  [[ "$node_line" == NodeName=* ]] || die "slurmd -C printed no NodeName line: $node_line"
  if [[ -e "$conf" ]] && ! grep -qxF "$marker" "$conf"; then
    die "$conf exists and was not written by this script; not overwriting a site config"
  fi
  mkdir -p "$conf_dir" "$state_dir/ctld" "$state_dir/d"
  cat > "$conf.partial" <<EOF
$marker
ClusterName=spread
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state_dir/ctld
SlurmdSpoolDir=$state_dir/d
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmdPidFile=$state_dir/slurmd.pid
SlurmctldLogFile=$state_dir/slurmctld.log
SlurmdLogFile=$state_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
DefMemPerCPU=1000
$node_line State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$conf.partial" "$conf"
  say "config: $conf ($node_line)"
}

start_munge() {
  # Debian's package creates the key; munged runs as its own user and wants its socket directory.
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ -s /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    say "munged: already running (left running by down)"
  else
    runuser -u munge -- munged
    touch "$state_dir/munged.ours"  # so that down stops this munged and no other
    say "munged: started"
  fi
}

wait_until_idle() {
  local waited=0 state
  while ((waited < wait_seconds)); do
    state="$(sinfo --noheader --nodes="$(hostname -s)" --format=%T 2>/dev/null || true)"
    if [[ "$state" == idle ]]; then
      say "node $(hostname -s) idle after ${waited} s"
      return
    fi
    sleep 1
    waited=$((waited + 1))
  done
  die "node not idle after ${wait_seconds} s (state: ${state:-none}); see $state_dir/slurmctld.log and slurmd.log"
}

up() {
  ((EUID == 0)) || die "needs root (munged, slurmctld and slurmd are started here)"
  write_config
  start_munge
  slurmctld
  slurmd
  wait_until_idle
}

stop_daemon() {  # stop_daemon NAME PIDFILE: signal the pid in the file, wait for it to exit
  local name="$1" pid_file="$2" pid
  [[ -s "$pid_file" ]] || return 0
  pid="$(cat "$pid_file")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    say "$name: stopped (pid $pid)"
  fi
  rm -f "$pid_file"
}

down() {
  scancel --full --quiet --partition="$partition" 2>/dev/null || true
  stop_daemon slurmd "$state_dir/slurmd.pid"
  stop_daemon slurmctld "$state_dir/slurmctld.pid"
  if [[ -e "$state_dir/munged.ours" ]]; then
    stop_daemon munged /run/munge/munged.pid
  fi
  if [[ -e "$conf" ]] && grep -qxF "$marker" "$conf"; then
    rm -f "$conf"
  fi
  rm -rf "$state_dir"
  say "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
