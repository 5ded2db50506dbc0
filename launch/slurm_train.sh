#!/usr/bin/env bash
# Multi-node MTP pretraining under Slurm, pre-emption and time limits included.
#
#   sbatch --nodes=4 launch/slurm_train.sh configs/1b.yaml ds_configs/zero1_bf16.json [--section.key value ...]
#
# LAUNCH_MODE=tasks (default): every rank is a Slurm task, GPUS_PER_NODE per node (launch/rank_task.sh; Megatron-LM's
#   way). No launcher sits between Slurm and the ranks, so a stop signal gives the ranks all of Slurm's KillWait (or a
#   pre-empting partition's GraceTime) to finish their step and write the stop checkpoint.
# LAUNCH_MODE=launcher: one deepspeed launcher per node started by srun (launch/node_launch.sh: --no_ssh,
#   --node_rank $SLURM_NODEID); LAUNCH_MODE=ssh: one deepspeed launcher on the first node reaching the others over
#   pdsh/ssh (passwordless ssh; the variables every rank needs go to .deepspeed_env). On scancel, pre-emption or a
#   requeue Slurm signals the launchers too, and deepspeed's launcher SIGKILLs its ranks 30 s after a SIGTERM: a
#   stop checkpoint must then fit in 30 s, and the job ends with the launcher's status (1).
# Every mode continues from the newest complete checkpoint (--train.resume auto).
#
# Stopping: Slurm sends SIGUSR1 to this script 180 s before the time limit (--signal=B:USR1@180). It is passed on to
# every rank on every node and to nothing else (tasks: scancel --signal; launcher/ssh: launch/forward_signals.sh); the
# ranks finish the step, checkpoint and exit 143, and the job requeues itself (scontrol requeue) to continue.
# scancel, pre-emption (PreemptMode=REQUEUE or CANCEL) and `scontrol requeue` send SIGTERM to every process of the
# job: the ranks checkpoint the same way (Slurm itself requeues after a pre-emption or `scontrol requeue`). SIGTERM or
# SIGINT to this script alone (scancel --batch) is passed on as SIGTERM and does not requeue. A normal finish or a
# failure never requeues. This script exits 143 after a stop that left a complete checkpoint; after a stop that did
# not, it says so in one line and exits with the ranks' status.
#SBATCH --job-name=mtp-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail

CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG DS_CONFIG [overrides...]}
DS_CONFIG=${2:?usage: sbatch launch/slurm_train.sh CONFIG DS_CONFIG [overrides...]}
shift 2
LAUNCH_MODE=${LAUNCH_MODE:-tasks}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_PORT=${MASTER_PORT:-29500}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-pretrain/train.py}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 1
LAUNCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -f "$LAUNCH/forward_signals.sh" ]; then LAUNCH=$PWD/launch; fi  # sbatch runs a copy of this script
source "$LAUNCH/forward_signals.sh"
# Every rank of this launch carries it, so forward_signals.sh finds them (a requeued job starts new ranks).
export MTP_LAUNCH_ID="slurm-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}  # an array task's own id: the bare number
JOB=${JOB:-$SLURM_JOB_ID}                                                  # may name the whole array
case "$LAUNCH_MODE" in
  tasks|launcher|ssh) ;;
  *) echo "LAUNCH_MODE must be tasks, launcher or ssh, got '$LAUNCH_MODE'" \
          "(one deepspeed launcher per node, formerly LAUNCH_MODE=srun, is LAUNCH_MODE=launcher)" >&2; exit 2 ;;
esac
if (( GPUS_PER_NODE < 1 )); then
  echo "GPUS_PER_NODE is ${GPUS_PER_NODE}: no GPU found by nvidia-smi -L; set GPUS_PER_NODE (ranks per node)" >&2
  exit 2
fi

HOSTFILE=${HOSTFILE:-hostfile.${SLURM_JOB_ID}}
scontrol show hostnames "${SLURM_JOB_NODELIST}" | awk -v s="$GPUS_PER_NODE" '{print $1 " slots=" s}' > "$HOSTFILE"
MASTER_ADDR=$(head -n 1 "$HOSTFILE" | awk '{print $1}')
NUM_NODES=$(wc -l < "$HOSTFILE")
ARGS=(--config "$CONFIG" --deepspeed_config "$DS_CONFIG" --train.resume auto "$@")
echo "nodes: ${NUM_NODES} x ${GPUS_PER_NODE} GPUs, master ${MASTER_ADDR}:${MASTER_PORT}, launch ${LAUNCH_MODE}" \
     "(run $((${SLURM_RESTART_COUNT:-0} + 1)) of job ${SLURM_JOB_ID})"

case "$LAUNCH_MODE" in
  tasks)
    srun --nodes="$NUM_NODES" --ntasks=$((NUM_NODES * GPUS_PER_NODE)) --ntasks-per-node="$GPUS_PER_NODE" \
        --wait=60 "$LAUNCH/rank_task.sh" "$MASTER_ADDR" "$MASTER_PORT" "$TRAIN_SCRIPT" "${ARGS[@]}" &
    ;;
  launcher)
    srun --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 "$LAUNCH/node_launch.sh" "$HOSTFILE" "$GPUS_PER_NODE" \
        "$MASTER_ADDR" "$MASTER_PORT" "$TRAIN_SCRIPT" "${ARGS[@]}" &
    ;;
  ssh)
    # Variables the launcher must carry to every node (ssh sessions start with a bare environment).
    : > .deepspeed_env
    for var in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV HF_HOME OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS \
               MTP_LAUNCH_ID $(compgen -e | grep -E '^(NCCL_|FI_|UCX_|TORCH_)' || true); do
      if [ -n "${!var:-}" ]; then echo "${var}=${!var}" >> .deepspeed_env; fi
    done
    python -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" \
        --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        "$TRAIN_SCRIPT" "${ARGS[@]}" &
    ;;
esac
STEP=$!

STOPPED_BY=
REQUEUE=0
PASSING_ON=()
forward() {  # SIGNAL: to every rank on every node, and to nothing else
  STOPPED_BY=${STOPPED_BY:-SIG$1}
  echo "received SIG$1: passing it on to the ranks on every node"
  if [ "$LAUNCH_MODE" = tasks ]; then
    # To every task of the job's steps, by slurmd; not through srun, which answers SIGTERM or SIGINT by ending its
    # tasks itself (SIGKILL). In the background and quiet: while Slurm ends or requeues the job it has signalled
    # the tasks itself, and scancel then waits for the job's state to change.
    scancel --signal="$([ "$1" = INT ] && echo TERM || echo "$1")" "$JOB" 2>/dev/null &
  else
    srun --overlap --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 "$LAUNCH/forward_signals.sh" \
        "$1" "$MTP_LAUNCH_ID" &
  fi
  PASSING_ON+=($!)  # ended before this script exits: a process left in the batch step holds the job for KillWait
}
trap 'REQUEUE=1; forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

# A trapped signal interrupts `wait`; wait again until the launch has really ended.
while kill -0 "$STEP" 2>/dev/null; do wait "$STEP"; done
wait "$STEP"
rc=$?
if [ "$LAUNCH_MODE" != tasks ]; then
  wait_for_ranks "$MTP_LAUNCH_ID"  # on this node (ssh mode: the pdsh launcher may exit before its ranks)
fi
echo "launch exited with status $rc"
trap '' TERM INT USR1  # the ranks are gone; Slurm's SIGTERM after a requeue has nothing left to stop
if (( ${#PASSING_ON[@]} )); then kill "${PASSING_ON[@]}" 2>/dev/null; fi
# 143: the ranks stopped on request after a complete checkpoint.
if [ -n "$STOPPED_BY" ] && [ "$rc" != 143 ]; then
  echo "stopped by ${STOPPED_BY}, but the ranks exited with status ${rc}: the stop checkpoint is not complete;" \
       "the next run resumes from the newest complete checkpoint (checkpoints/latest)"
elif [ "$REQUEUE" = 1 ] && [ "$rc" = 143 ]; then
  echo "stopped before the time limit with a checkpoint: requeueing job ${JOB}"
  scontrol requeue "$JOB"
fi
exit "$rc"
