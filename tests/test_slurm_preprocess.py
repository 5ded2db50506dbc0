"""launch/slurm_preprocess.sh without Slurm: a stub `srun`/`scontrol` on PATH and the variables of a two-task array
job. The two tasks, run at once as two processes, write one dataset equal to a single run's; Slurm's warning signal
to a task's batch script stops its partition, keeping complete shards, and requeues the task, whose re-run
completes the dataset."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_data_preprocess_signals import make_inputs

from mtplm.data.preprocess import PreprocessConfig, run_preprocess
from mtplm.data.preprocess_plan import plan_units
from mtplm.data.readers import discover

REPO = Path(__file__).resolve().parents[1]
SRUN = """#!/usr/bin/env bash
# srun stand-in for a one-task step: the command, on this machine
echo "srun $*" >> "$STUB_LOG"
echo $$ > "$STUB_LOG.step.${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
"""
SCANCEL = """#!/usr/bin/env bash
# scancel --signal=SIG JOB stand-in: the signal to the job's step
echo "scancel $*" >> "$STUB_LOG"
kill -s "${1#--signal=}" "$(cat "$STUB_LOG.step.$2")"
"""


def array_env(tmp: Path, task: int) -> dict:
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(tmp / "stub.log"),
                SLURM_JOB_ID=str(100 + task), SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID=str(3 + task),
                SLURM_ARRAY_TASK_MIN="3", SLURM_ARRAY_TASK_COUNT="2", SLURM_SUBMIT_DIR=str(REPO),
                PREPROCESS=f"{sys.executable} -m mtplm.data.preprocess", PYTHONUNBUFFERED="1")


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith("partition_")}


def test_array_tasks_write_one_dataset_and_the_warning_signal_requeues(tmp_path):
    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    second = [u.shard for u in plan_units(discover([str(tmp_path / "in")], [], []), "auto", 1)[1::2]]
    script = ["bash", "launch/slurm_preprocess.sh", str(out), str(tmp_path / "in"), "--tokenizer", "bytes",
              "--workers", "1", "--shard-bytes", "1"]
    tasks = [subprocess.Popen(script, cwd=REPO, env=array_env(tmp_path, t), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for t in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not any((out / f"{name}.json").exists() for name in second):  # task 1 is under way
            assert tasks[1].poll() is None and time.monotonic() < deadline, tasks[1].communicate()[0]
            time.sleep(0.01)
        os.kill(tasks[1].pid, signal.SIGUSR1)  # Slurm's --signal=B:USR1@120 goes to the batch script only
        logs = [t.communicate(timeout=120)[0] for t in tasks]
    finally:
        for t in tasks:
            if t.poll() is None:
                os.killpg(t.pid, signal.SIGKILL)
    assert [t.returncode for t in tasks] == [0, 0], logs
    assert "partition 0 of 2 into" in logs[0] and "partition 1 of 2 into" in logs[1]
    assert "received SIGUSR1" in logs[1] and "stopped by SIGTERM: partition 1 of 2:" in logs[1], logs[1]
    stub_log = (tmp_path / "stub.log").read_text()
    assert stub_log.count("scontrol requeue 77_4") == 1 and "scontrol requeue 77_3" not in stub_log
    assert "scancel --signal=TERM 77_4" in stub_log
    assert "--num-partitions 2 --partition-index 1" in stub_log
    assert not (out / "dataset.json").exists()

    # The requeued task finishes its partition and, being the last, writes dataset.json.
    rerun = subprocess.run(script, cwd=REPO, env=array_env(tmp_path, 1), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "partition 1 of 2: resuming:" in rerun.stdout, rerun.stdout + rerun.stderr
    assert (tmp_path / "stub.log").read_text().count("scontrol requeue") == 1
    run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "ref"), tokenizer="bytes",
                                    workers=1, shard_bytes=1), log=lambda m: None)
    assert contents(out) == contents(tmp_path / "ref")
