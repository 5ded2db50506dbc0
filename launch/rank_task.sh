#!/usr/bin/env bash
# One training rank as one Slurm task (launch/slurm_train.sh, LAUNCH_MODE=tasks; Megatron-LM's way on Slurm):
# `srun --ntasks-per-node=GPUS_PER_NODE` starts one per GPU, and no launcher stands between Slurm and the ranks.
#
#   srun ... launch/rank_task.sh MASTER_ADDR MASTER_PORT TRAIN_SCRIPT [ARGS...]
#
# Rank, local rank and world size come from Slurm (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS). The stop signals are
# ignored until the trainer installs its handler (pretrain/preemption.py, first thing in Trainer): a signal during
# start-up, where there is nothing to save, must not kill a rank, whose exit status would then read as a stop.
set -euo pipefail
: "${SLURM_PROCID:?run under srun}" "${SLURM_LOCALID:?run under srun}" "${SLURM_NTASKS:?run under srun}"
export MASTER_ADDR=$1 MASTER_PORT=$2
TRAIN_SCRIPT=$3
shift 3
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
export LOCAL_WORLD_SIZE=${SLURM_STEP_TASKS_PER_NODE%%(*}  # "8" or "8(x4)"
trap '' TERM INT USR1
exec python -u "$TRAIN_SCRIPT" "$@"
