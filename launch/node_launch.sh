#!/usr/bin/env bash
# One node's share of a job, started on every node by `srun --ntasks-per-node=1` (launch/slurm_train.sh): the
# deepspeed launcher without ssh for this node's ranks (node rank SLURM_NODEID of the hostfile's nodes).
#
#   launch/node_launch.sh HOSTFILE GPUS_PER_NODE MASTER_ADDR MASTER_PORT TRAIN_SCRIPT [ARGS...]
#
# Slurm signals every process of the step (scancel, the time limit). The launcher is started with the stop signals
# ignored: deepspeed's runner would otherwise exit at once and end the step (Slurm then kills the ranks before
# they checkpoint), and its ranks inherit SIGUSR1 ignored until the trainer installs its handler. This script
# forwards what it receives to this node's ranks and exits only when the launcher and every rank are gone.
set -uo pipefail
source "$(dirname "$0")/forward_signals.sh"
: "${MTP_LAUNCH_ID:?MTP_LAUNCH_ID is not set}" "${SLURM_NODEID:?SLURM_NODEID is not set (run under srun)}"
HOSTFILE=$1 GPUS_PER_NODE=$2 MASTER_ADDR=$3 MASTER_PORT=$4
shift 4

(trap '' TERM INT USR1; exec python -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh \
    --node_rank "$SLURM_NODEID" --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" "$@") &
LAUNCHER=$!
for sig in TERM INT USR1; do
  trap "signal_ranks $sig \"\$MTP_LAUNCH_ID\"" "$sig"
done
# A trapped signal interrupts `wait`; wait again until the launcher has really exited.
while kill -0 "$LAUNCHER" 2>/dev/null; do wait "$LAUNCHER"; done
wait "$LAUNCHER"  # its exit status (bash keeps it after the loop's wait reaped it)
rc=$?
wait_for_ranks "$MTP_LAUNCH_ID"
exit "$rc"
