#!/usr/bin/env bash
# Send a stop signal to the training ranks of one launch on this node, and to nothing else.
#
#   launch/forward_signals.sh SIGNAL [LAUNCH_ID]          # LAUNCH_ID defaults to $MTP_LAUNCH_ID
#
# The ranks are the processes whose environment holds MTP_LAUNCH_ID=<LAUNCH_ID> and a RANK (which the deepspeed
# launcher and torchrun set for each rank) and whose parent is not one of them (DataLoader workers are left out;
# they ignore stop signals anyway). Launchers are left alone on purpose: deepspeed's launcher and torchrun answer a
# signal by sending SIGTERM to their ranks and SIGKILL 30 s later, whatever the ranks are doing. The ranks finish
# their step, checkpoint and exit with status 143, and their launchers then exit with them.
#
# Sourced, it defines rank_pids, signal_ranks and wait_for_ranks (launch/slurm_train.sh, launch/node_launch.sh).

_is_rank() {  # PID LAUNCH_ID
  local env
  # Braces: a redirection's own error (a process gone, another user's) is printed before a 2>/dev/null after it.
  { env=$(tr '\0' '\n' < "/proc/$1/environ"); } 2>/dev/null || return 1
  grep -qxF "MTP_LAUNCH_ID=$2" <<< "$env" && grep -q '^RANK=' <<< "$env"
}

_parent() {  # PID; the field after the command name, which may itself hold spaces or parentheses
  local stat
  { stat=$(< "/proc/$1/stat"); } 2>/dev/null || return 1
  set -- ${stat##*) }
  echo "$2"
}

rank_pids() {  # LAUNCH_ID
  local dir pid
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    _is_rank "$pid" "$1" || continue
    _is_rank "$(_parent "$pid")" "$1" && continue
    echo "$pid"
  done
}

signal_ranks() {  # SIGNAL LAUNCH_ID
  local sig=${1#SIG} pids
  pids=$(rank_pids "$2")
  if [ -z "$pids" ]; then
    echo "$(hostname): no rank of launch $2 is running" >&2
    return 0
  fi
  echo "$(hostname): sending SIG${sig} to ranks" $pids >&2
  kill -s "$sig" $pids 2>/dev/null || true
}

wait_for_ranks() {  # LAUNCH_ID: a launcher may exit before its ranks (e.g. the deepspeed runner on SIGTERM)
  while [ -n "$(rank_pids "$1")" ]; do sleep 1; done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -u
  signal_ranks "${1:?usage: forward_signals.sh SIGNAL [LAUNCH_ID]}" "${2:-${MTP_LAUNCH_ID:?MTP_LAUNCH_ID is not set}}"
fi
