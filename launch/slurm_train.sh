#!/usr/bin/env bash
# Multi-node MTP pretraining under Slurm with the deepspeed launcher.
#
#   sbatch --nodes=4 launch/slurm_train.sh configs/1b.yaml ds_configs/zero1_bf16.json [--section.key value ...]
#
# It writes a hostfile from the allocation, a .deepspeed_env with the variables every rank needs, and
# starts `deepspeed` on the first node, which reaches the others over ssh (pdsh). Slurm's time-limit
# warning (--signal) reaches the trainer as SIGTERM: it checkpoints and exits, and resubmitting the same
# job continues with --train.resume auto.
#SBATCH --job-name=mtp-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG DS_CONFIG [overrides...]}
DS_CONFIG=${2:?usage: sbatch launch/slurm_train.sh CONFIG DS_CONFIG [overrides...]}
shift 2
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_PORT=${MASTER_PORT:-29500}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

HOSTFILE="hostfile.${SLURM_JOB_ID:-local}"
scontrol show hostnames "${SLURM_JOB_NODELIST}" | awk -v s="$GPUS_PER_NODE" '{print $1 " slots=" s}' > "$HOSTFILE"
MASTER_ADDR=$(head -n 1 "$HOSTFILE" | awk '{print $1}')
NUM_NODES=$(wc -l < "$HOSTFILE")

# Variables the launcher must carry to every node (ssh sessions start with a bare environment).
: > .deepspeed_env
for var in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV HF_HOME OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS \
           $(compgen -e | grep -E '^(NCCL_|FI_|UCX_|TORCH_)' || true); do
  if [ -n "${!var:-}" ]; then echo "${var}=${!var}" >> .deepspeed_env; fi
done

echo "nodes: ${NUM_NODES} x ${GPUS_PER_NODE} GPUs, master ${MASTER_ADDR}:${MASTER_PORT}"
# The launcher runs in the background so this shell can forward Slurm's warning signal to it.
deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    pretrain/train.py --config "$CONFIG" --deepspeed_config "$DS_CONFIG" --train.resume auto "$@" &
LAUNCHER=$!
trap 'echo "forwarding SIGTERM to the launcher"; kill -TERM "$LAUNCHER"' TERM
wait "$LAUNCHER" || wait "$LAUNCHER"
