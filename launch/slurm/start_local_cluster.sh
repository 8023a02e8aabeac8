#!/usr/bin/env bash
# Start a one-node SLURM cluster on this host (munged, slurmctld, slurmd) for tests and trying the launcher:
#
#   bash launch/slurm/start_local_cluster.sh [DIR]     # DIR: state, spool, logs, slurm.conf (default: a new temp dir)
#   export SLURM_CONF=DIR/slurm.conf                    # the script prints this line last
#   sbatch --ntasks=4 --overcommit launch/pretrain_muon.sh launch/configs/tiny_cpu.yaml training.train_iters=20
#   bash launch/slurm/stop_local_cluster.sh DIR
#
# Needs root (the daemons run as root) and Debian/Ubuntu: the packages slurmctld, slurmd, slurm-client and munge
# are installed with apt-get when missing. No systemd: the daemons are started directly, with their own munge
# key and socket under DIR, so a system munged is neither needed nor touched.
#
# The node declares max(8, this machine's) CPUs and 8 stand-in GPUs (plain files), so the launcher's GPU-style
# `#SBATCH --ntasks-per-node=8 --gpus-per-node=8` header schedules as it stands. Environment: SLURM_CTLD_PORT
# and SLURM_SLURMD_PORT (default: the first free ports from 6817 and 6818), LOCAL_CLUSTER_CPUS,
# LOCAL_CLUSTER_GPUS (default 8).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { echo "start_local_cluster: $*"; }
fail() { echo "start_local_cluster: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (the SLURM daemons and munged run as root); got uid $(id -u)"

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed (offline?)"
    apt-get install -y -qq "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed"
  fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {  # $1: first candidate
  local port=$1
  while ! port_free "$port"; do port=$((port + 2)); done
  echo "$port"
}

wait_for() {  # $1: seconds, rest: a command that succeeds when ready
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

install_packages

dir=${1:-$(mktemp -d /tmp/slurm-local.XXXXXX)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[ -e "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null &&
  fail "a cluster already runs from $dir (stop it with launch/slurm/stop_local_cluster.sh $dir)"
mkdir -p "$dir"/{state,spool,log,run,munge,gpus}
chmod 700 "$dir/munge"

host=$(hostname -s)
# At least 8 CPUs, so the launcher's `#SBATCH --ntasks-per-node=8` header can be scheduled (sbatch refuses it on
# fewer CPUs even with --overcommit); the tasks share the real cores.
cpus=${LOCAL_CLUSTER_CPUS:-$(($(nproc) > 8 ? $(nproc) : 8))}
memory_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
gpus=${LOCAL_CLUSTER_GPUS:-8}
ctld_port=${SLURM_CTLD_PORT:-$(free_port 6817)}
slurmd_port=${SLURM_SLURMD_PORT:-$(free_port $((ctld_port + 1)))}
for ((i = 0; i < gpus; i++)); do : >"$dir/gpus/gpu$i"; done

substitute() {
  sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY_MB@|$memory_mb|g" \
    -e "s|@GPUS@|$gpus|g" -e "s|@LAST_GPU@|$((gpus - 1))|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" "$1"
}
substitute "$here/slurm.conf.in" >"$dir/slurm.conf"
substitute "$here/gres.conf.in" >"$dir/gres.conf"
export SLURM_CONF=$dir/slurm.conf

# munge: a fresh key and a private socket (slurm.conf's AuthInfo points the daemons and clients at it).
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" ||
  fail "munged did not start (see $dir/log/munged.log)"

slurmctld -c -i -f "$dir/slurm.conf" || fail "slurmctld did not start (see $dir/log/slurmctld.log)"
wait_for 30 scontrol ping || fail "slurmctld does not answer (see $dir/log/slurmctld.log)"
slurmd -f "$dir/slurm.conf" -N "$host" || fail "slurmd did not start (see $dir/log/slurmd.log)"
node_idle() { sinfo -h -n "$host" -o %t | grep -qx idle; }
wait_for 30 node_idle || fail "node $host is not idle after 30 s: $(sinfo -h -o '%t %E' 2>&1) (see $dir/log/slurmd.log)"

say "node $host (127.0.0.1): $cpus CPUs, $gpus stand-in GPUs, ports $ctld_port/$slurmd_port; state and logs in $dir"
echo "export SLURM_CONF=$dir/slurm.conf"
