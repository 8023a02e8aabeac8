#!/usr/bin/env bash
# Stop the cluster launch/slurm/start_local_cluster.sh started from DIR: `scontrol shutdown` (slurmctld and
# slurmd), then munged; each by the pid in DIR/run. With --clean, DIR is removed afterwards.
#
#   bash launch/slurm/stop_local_cluster.sh DIR [--clean]
set -uo pipefail

dir=${1:?usage: stop_local_cluster.sh DIR [--clean]}
clean=${2:-}
say() { echo "stop_local_cluster: $*"; }
[ -f "$dir/slurm.conf" ] || { echo "stop_local_cluster: error: $dir/slurm.conf not found" >&2; exit 1; }
export SLURM_CONF=$dir/slurm.conf

pid_of() { [ -f "$dir/run/$1.pid" ] && cat "$dir/run/$1.pid"; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
wait_gone() {  # $1: pid; SIGKILL after 20 s
  local pid=$1 deadline=$((SECONDS + 20))
  while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  alive "$pid" && { say "pid $pid still running after 20 s; killing it"; kill -KILL "$pid" 2>/dev/null; }
  return 0
}

ctld=$(pid_of slurmctld) slurmd=$(pid_of slurmd) munged=$(pid_of munged)
if alive "$ctld"; then
  scontrol shutdown >/dev/null 2>&1 || kill -TERM "$ctld" "$slurmd" 2>/dev/null
fi
for pid in "$ctld" "$slurmd"; do alive "$pid" && wait_gone "$pid"; done
if alive "$munged"; then
  kill -TERM "$munged" && wait_gone "$munged"
fi
say "stopped (slurmctld ${ctld:-none}, slurmd ${slurmd:-none}, munged ${munged:-none})"
if [ "$clean" = "--clean" ]; then
  rm -rf "$dir"
fi
