"""launch/slurm_train.sh's LAUNCH_MODE=launcher without Slurm: stub `srun`/`scontrol` on PATH and a fake two-node
allocation on this machine (two deepspeed launchers with --no_ssh and node ranks 0 and 1, one rank each).
Slurm's warning signal reaches the batch script; the ranks must get it, checkpoint, stop, and the job requeue.
The default mode (ranks as srun tasks) and every mode under scancel and requeue: tests/test_slurm_real.py."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from dist_launch import REPO, free_port
from test_checkpoint_resume import metrics
from test_preemption import dataset_config, stopped_at

SRUN = """#!/usr/bin/env bash
# srun stand-in: the command once per node of the allocation, as tasks on this machine
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p"; r=$?; if (( r > rc )); then rc=$r; fi; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) printf 'localhost\\n127.0.0.1\\n' ;;
  requeue) echo "scontrol $*" >> "$STUB_LOG" ;;
  *) exit 1 ;;
esac
"""


def slurm_env(tmp: Path) -> dict:
    stubs = tmp / "stubs"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return dict(os.environ, LAUNCH_MODE="launcher", PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(tmp / "stub.log"),
                SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_NUM_NODES="2",
                SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
                HOSTFILE=str(tmp / "hostfile"), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_warning_signal_reaches_every_rank_checkpoints_and_requeues(tmp_path):
    cfg = dataset_config(tmp_path, steps=1000)
    env, out = slurm_env(tmp_path), tmp_path / "run"
    script = ["bash", "launch/slurm_train.sh", cfg, str(REPO / "ds_configs" / "zero1.json"),
              "--train.out_dir", str(out)]
    batch = subprocess.Popen(script, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
            assert batch.poll() is None and time.monotonic() < deadline, batch.communicate()[0][-4000:]
            time.sleep(0.1)
        os.kill(batch.pid, signal.SIGUSR1)  # Slurm's --signal=B:USR1@180 goes to the batch script only
        log, _ = batch.communicate(timeout=300)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    assert batch.returncode == 143, log[-4000:]  # a stop with a complete checkpoint, then requeued
    step = stopped_at(out)
    assert 3 <= step < 1000 and not (out / "final").exists()
    assert "sending SIGUSR1 to ranks" in log
    assert "stop requested (SIGUSR1)" in (out / "logs" / "rank0.log").read_text()
    assert "stop requested (" in (out / "logs" / "rank1.log").read_text()
    assert (tmp_path / "stub.log").read_text().count("scontrol requeue 4242") == 1
    assert "--no_ssh" in (REPO / "launch" / "node_launch.sh").read_text()

    # The requeued job continues from the checkpoint; a normal finish does not requeue.
    proc = subprocess.run([*script, "--train.steps", str(step + 2)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(metrics(out)) == list(range(1, step + 3))
    assert (out / "final" / "model.safetensors").is_file()
    assert (tmp_path / "stub.log").read_text().count("scontrol requeue") == 1
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 2


def test_forward_signals_prints_one_line_whatever_the_other_processes_are():
    """Reading every process's environment meets processes that exit meanwhile, zombies and (in containers) ones
    that may not be read; none of that may reach the job log, which once got a line per process."""
    proc = subprocess.run(["bash", "launch/forward_signals.sh", "TERM", "no-such-launch"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"{os.uname().nodename}: no rank of launch no-such-launch is running"]
