#!/usr/bin/env bash
# Tokenize one corpus on many nodes: a Slurm array job, one mtp-preprocess partition per array task, all writing
# into one shared output folder.
#
#   sbatch --array=0-7 launch/slurm_preprocess.sh OUT INPUT... --tokenizer tok.model [mtp-preprocess options]
#
# Array task i runs `mtp-preprocess INPUT... --output OUT --num-partitions N --partition-index i` on its node, with
# all its cores (N: the array's size; i: counted from the array's first index, which must be contiguous). The
# partitions take every N-th unit of one plan (data/preprocess_plan.py); the last to complete writes
# OUT/dataset.json, and `mtp-data finalize OUT` does it by hand or names the partitions that are not complete.
# With --train-tokenizer, every task that starts before OUT/tokenizer.model exists trains the same one (same bytes);
# a tokenizer trained beforehand, given as --tokenizer, spends that time once.
#
# Stopping: Slurm sends SIGUSR1 to this script 120 s before the time limit (--signal=B:USR1@120). It is passed on to
# mtp-preprocess as SIGTERM (it stops at once, keeping every complete shard, and exits 143) and the array task
# requeues itself (scontrol requeue); the re-run redoes only the partition's unfinished shards. SIGTERM or SIGINT to
# this script (scancel --batch) is passed on the same way without requeueing. A failure exits with its status.
# PREPROCESS overrides the command (default: mtp-preprocess).
#SBATCH --job-name=mtp-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%A_%a.out
set -uo pipefail

OUT=${1:?usage: sbatch --array=0-N launch/slurm_preprocess.sh OUT INPUT... [mtp-preprocess options]}
shift
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ -z "${SLURM_ARRAY_TASK_COUNT:-}" ]; then
  echo "run as an array job, one task per partition: sbatch --array=0-N launch/slurm_preprocess.sh OUT INPUT..." >&2
  exit 2
fi
NUM=$SLURM_ARRAY_TASK_COUNT
INDEX=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
if (( INDEX < 0 || INDEX >= NUM )); then
  echo "array task ${SLURM_ARRAY_TASK_ID} is not within ${NUM} contiguous indices from ${SLURM_ARRAY_TASK_MIN:-0}:" \
       "submit with --array=A-B (contiguous)" >&2
  exit 2
fi
read -ra PREPROCESS <<< "${PREPROCESS:-mtp-preprocess}"
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
TASK="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
echo "array task ${TASK}: partition ${INDEX} of ${NUM} into ${OUT} on $(hostname)"

srun --ntasks=1 --nodes=1 "${PREPROCESS[@]}" "$@" --output "$OUT" --num-partitions "$NUM" --partition-index "$INDEX" &
STEP=$!

REQUEUE=0
forward() {  # SIGTERM to mtp-preprocess, by slurmd: srun would answer it by killing its task (SIGKILL)
  echo "received SIG$1: stopping partition ${INDEX} (complete shards are kept)"
  # The task's own id (the bare number may name the whole array). In the background and quiet: while Slurm ends or
  # requeues the task it has signalled mtp-preprocess itself, and scancel then waits for the task's state to change.
  scancel --signal=TERM "$TASK" 2>/dev/null &
  PASSING_ON+=($!)  # ended before this script exits: a process left in the batch step holds the job for KillWait
}
PASSING_ON=()
trap 'REQUEUE=1; forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

# A trapped signal interrupts `wait`; wait again until the step has really ended.
while kill -0 "$STEP" 2>/dev/null; do wait "$STEP"; done
wait "$STEP"
rc=$?
echo "partition ${INDEX} of ${NUM} exited with status $rc"
trap '' TERM INT USR1  # the step is over; Slurm's SIGTERM after a requeue has nothing left to stop
if (( ${#PASSING_ON[@]} )); then kill "${PASSING_ON[@]}" 2>/dev/null; fi
if [ "$REQUEUE" = 1 ] && [ "$rc" = 143 ]; then
  echo "stopped before the time limit: requeueing array task ${TASK}"
  scontrol requeue "$TASK"
  exit 0
fi
exit "$rc"
