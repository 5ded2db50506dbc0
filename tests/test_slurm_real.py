"""launch/slurm_train.sh and launch/slurm_preprocess.sh under a real Slurm (tests/slurm_cluster.py: munged,
slurmctld and slurmd on this host, one node, KillWait 75 s), in the default mode: ranks as srun tasks, 2 per node.
The jobs of every case are submitted at once and run side by side; each test then checks its own.

1. Slurm's time-limit warning (--signal=B:USR1: the signal goes to the batch shell, here sent at a chosen step with
   `scancel --batch --signal=USR1`, as slurmctld does at the warning time) -> stop checkpoint, exit 143, the job
   requeues itself and its next run resumes; the losses of the two runs equal an uninterrupted job's.
2. scancel while the stop checkpoint takes 35 s to write (longer than the deepspeed launcher's 30 s before SIGKILL)
   -> the checkpoint completes within KillWait, the batch script exits 143, a new job resumes from it; the same with
   LAUNCH_MODE=launcher loses the checkpoint, and the job log says so in one line.
3. `scontrol requeue` of a running job -> stop checkpoint, Slurm requeues it, the next run resumes.
   And `scancel --batch --signal=INT` (the batch script alone) -> every rank stops with a checkpoint, exit 143.
4. slurm_preprocess.sh as a 2-task array job, USR1 to one task mid-run -> it requeues and the folder ends
   byte-identical to one uninterrupted mtp-preprocess run.
5. No job log holds a traceback or launch/forward_signals.sh noise.
Skipped, with the reason, where Slurm cannot be installed or started (root and slurm-wlm + munge needed)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_launch import REPO, free_port
from slurm_cluster import SlurmCluster, SlurmUnavailable
from test_checkpoint_resume import metrics
from test_data_preprocess_signals import make_inputs
from test_preemption import dataset_config, stopped_at
from test_slurm_preprocess import contents

from mtplm.data.preprocess import PreprocessConfig, run_preprocess
from mtplm.data.preprocess_plan import plan_units
from mtplm.data.readers import discover

pytestmark = pytest.mark.slow
STEPS = 40
WORKER = "tests/workers/train_signalled.py"
STEP_DELAY_MS = 500
SLOW_SAVE_S = 35  # deepspeed's launcher SIGKILLs its ranks 30 s after passing on a SIGTERM
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


class Jobs:
    """Every case's jobs, submitted together."""

    def __init__(self, slurm: SlurmCluster, tmp: Path):
        self.slurm, self.tmp = slurm, tmp
        self.cfg = dataset_config(tmp, steps=STEPS)
        self.ids: dict[str, str] = {}

    def train(self, name: str, *extra: str, worker_args: tuple = (), mode: str = "tasks") -> str:
        out = self.tmp / name
        env = self.slurm.env(LAUNCH_MODE=mode, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", GPUS_PER_NODE="2",
                             MASTER_PORT=str(free_port()), HOSTFILE=str(self.tmp / f"hostfile.{name}"),
                             TRAIN_SCRIPT=WORKER, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        job = self.slurm.sbatch("--oversubscribe", "--ntasks-per-node=2", f"--output={self.tmp}/{name}.log",
                                *extra, "launch/slurm_train.sh", self.cfg, str(REPO / "ds_configs" / "zero1.json"),
                                "--train.out_dir", str(out), *worker_args, cwd=REPO, env=env)
        self.ids[name] = job
        return job

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_for_step(self, name: str, step: int, timeout: float = 300) -> None:
        out, deadline = self.tmp / name, time.monotonic() + timeout
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= step):
            state = self.slurm.job(self.ids[name]).get("JobState")
            assert state not in FINISHED and time.monotonic() < deadline, f"{name}: {state}\n{self.log(name)[-3000:]}"
            time.sleep(0.5)

    def wait_done(self, job: str, restarts: int, timeout: float = 600) -> dict:
        """Until the job's run number `restarts` + 1 has finished."""
        deadline, ended = time.monotonic() + timeout, None
        while True:
            info = self.slurm.job(job)
            if info.get("JobState") in FINISHED:
                if int(info.get("Restarts", 0)) >= restarts:
                    return info
                ended = ended or time.monotonic()  # a requeue shows within a moment, or never will
                assert time.monotonic() < ended + 10, f"job {job} ended without being requeued: {info}"
            assert time.monotonic() < deadline, f"job {job} not finished: {info}"
            time.sleep(1)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    slurm = SlurmCluster(tmp / "cluster")
    try:
        slurm.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no test Slurm: {e}".splitlines()[0])
    try:
        j = Jobs(slurm, tmp)
        j.train("uninterrupted")
        # The signalled jobs take 40 steps x 0.5 s at least: each signal, sent once its job is 2 steps in, arrives
        # before the last step even while the other jobs load the machine (or the job would end with 0, not 143).
        slow = ("--step_delay_ms", str(STEP_DELAY_MS))
        j.train("warned", worker_args=slow)
        j.train("cancelled", worker_args=(*slow, "--slow_save_s", str(SLOW_SAVE_S)))
        j.train("requeued", worker_args=slow)
        j.train("batch_interrupted", worker_args=slow)
        j.train("launcher_cancelled", worker_args=(*slow, "--slow_save_s", str(SLOW_SAVE_S)), mode="launcher")
        # The signals, each once its job is under way.
        j.wait_for_step("warned", 2)
        slurm.scancel("--batch", "--signal=USR1", j.ids["warned"])  # what --signal=B:USR1@N does at the warning
        j.wait_for_step("cancelled", 2)
        slurm.scancel(j.ids["cancelled"])
        j.wait_for_step("requeued", 2)
        slurm.scontrol("requeue", j.ids["requeued"])
        j.wait_for_step("batch_interrupted", 2)
        slurm.scancel("--batch", "--signal=INT", j.ids["batch_interrupted"])
        j.wait_for_step("launcher_cancelled", 2)
        slurm.scancel(j.ids["launcher_cancelled"])
        # Submitted last, so that its warning is sent within the second its task 1 is under way.
        make_inputs(tmp / "in", n_files=800)  # a few seconds per partition
        pre = slurm.env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
        j.ids["preprocess"] = slurm.sbatch(
            "--array=0-1", "--oversubscribe", f"--output={tmp}/preprocess_%a.log", "launch/slurm_preprocess.sh",
            str(tmp / "prep"), str(tmp / "in"), "--tokenizer", "bytes", "--workers", "1", "--shard-bytes", "1",
            cwd=REPO, env=pre)
        task = f"{j.ids['preprocess']}_1"
        second = [u.shard for u in plan_units(discover([str(tmp / "in")], [], []), "auto", 1)[1::2]]
        deadline = time.monotonic() + 300
        while not any((tmp / "prep" / f"{name}.json").exists() for name in second):  # task 1 is under way
            assert time.monotonic() < deadline, (tmp / "preprocess_1.log").read_text()
            time.sleep(0.01)
        slurm.scancel("--batch", "--signal=USR1", task)
        yield j
    finally:
        slurm.stop()


def losses(out: Path) -> list[float]:
    m = metrics(out)
    assert sorted(m) == list(range(1, STEPS + 1)), sorted(m)
    return [m[s]["loss"] for s in range(1, STEPS + 1)]


def test_time_limit_warning_checkpoints_requeues_and_the_job_matches_an_uninterrupted_one(jobs):
    assert jobs.wait_done(jobs.ids["uninterrupted"], 0)["JobState"] == "COMPLETED", jobs.log("uninterrupted")
    info = jobs.wait_done(jobs.ids["warned"], 1)
    log = jobs.log("warned")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "received SIGUSR1" in log and "launch exited with status 143" in log, log[-4000:]
    assert f"requeueing job {jobs.ids['warned']}" in log
    first = (jobs.tmp / "warned" / "logs" / "rank0.log").read_text()
    assert "stop requested (SIGUSR1)" in first and "resumed from" in first, first[-3000:]
    assert losses(jobs.tmp / "warned") == pytest.approx(losses(jobs.tmp / "uninterrupted"), rel=1e-6, abs=1e-6)
    assert (jobs.tmp / "warned" / "final" / "model.safetensors").is_file()


def test_scancel_gives_a_slow_stop_checkpoint_all_of_killwait_and_a_new_job_resumes_it(jobs):
    info = jobs.wait_done(jobs.ids["cancelled"], 0)
    log = jobs.log("cancelled")
    assert info["JobState"] == "CANCELLED", info
    assert f"checkpoint save: {SLOW_SAVE_S} s more" in log and "launch exited with status 143" in log, log[-4000:]
    assert "the stop checkpoint is not complete" not in log
    out = jobs.tmp / "cancelled"
    step = stopped_at(out)  # `latest` names a complete checkpoint: the slow save finished
    assert 3 <= step < STEPS
    assert "stop requested (SIGTERM)" in (out / "logs" / "rank1.log").read_text()
    again = jobs.train("cancelled")
    assert jobs.wait_done(again, 0)["JobState"] == "COMPLETED", jobs.log("cancelled")[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in (out / "logs" / "rank0.log").read_text()
    assert losses(out) == pytest.approx(losses(jobs.tmp / "uninterrupted"), rel=1e-6, abs=1e-6)


def test_a_signal_to_the_batch_script_alone_stops_every_rank_with_a_checkpoint_and_exit_143(jobs):
    """`scancel --batch --signal=INT`: the batch script passes it on (as SIGTERM: srun would kill its tasks on
    either); the job ends with the script's 143 and is not requeued."""
    info = jobs.wait_done(jobs.ids["batch_interrupted"], 0)
    log = jobs.log("batch_interrupted")
    assert info["ExitCode"] == "143:0" and info["Restarts"] == "0", (info, log[-4000:])
    assert "received SIGINT" in log and "requeueing" not in log
    out = jobs.tmp / "batch_interrupted"
    assert 3 <= stopped_at(out) < STEPS
    for rank in (0, 1):
        assert "stop requested (SIGTERM)" in (out / "logs" / f"rank{rank}.log").read_text()


def test_deepspeed_launcher_mode_cuts_a_slow_stop_checkpoint_at_30_s_and_says_so_in_one_line(jobs):
    """What the default mode avoids: LAUNCH_MODE=launcher under scancel. deepspeed's launch.py gets Slurm's SIGTERM
    too and SIGKILLs its ranks 30 s later, mid-save; the job must not claim a clean stop."""
    assert jobs.wait_done(jobs.ids["launcher_cancelled"], 0)["JobState"] == "CANCELLED"
    log = jobs.log("launcher_cancelled")
    line = [x for x in log.splitlines() if "the stop checkpoint is not complete" in x]
    assert len(line) == 1 and line[0].startswith("stopped by SIGTERM, but the ranks exited with status "), log[-4000:]
    assert "launch exited with status 143" not in log
    checkpoints = jobs.tmp / "launcher_cancelled" / "checkpoints"
    assert not (checkpoints / "latest").exists()  # the only save was cut off: nothing claims to be complete
    assert not list(checkpoints.glob("step_*/COMPLETE"))


def test_scontrol_requeue_of_a_running_job_stops_with_a_checkpoint_and_the_next_run_resumes(jobs):
    info = jobs.wait_done(jobs.ids["requeued"], 1)
    log = jobs.log("requeued")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "launch exited with status 143" in log and "DUE TO JOB REQUEUE" in log, log[-4000:]
    rank0 = (jobs.tmp / "requeued" / "logs" / "rank0.log").read_text()
    assert "stop requested (SIGTERM)" in rank0 and "resumed from" in rank0, rank0[-3000:]
    assert losses(jobs.tmp / "requeued") == pytest.approx(losses(jobs.tmp / "uninterrupted"), rel=1e-6, abs=1e-6)


def test_preprocess_array_task_warned_mid_run_requeues_and_the_folder_equals_one_run(jobs, tmp_path):
    array = jobs.ids["preprocess"]
    assert jobs.wait_done(f"{array}_0", 0)["JobState"] == "COMPLETED"
    info = jobs.wait_done(f"{array}_1", 1)
    log = (jobs.tmp / "preprocess_1.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "received SIGUSR1" in log and f"requeueing array task {array}_1" in log, log
    assert "partition 1 of 2: resuming:" in log and "stopped by SIGTERM: partition 1 of 2:" in log, log
    run_preprocess(PreprocessConfig(inputs=[str(jobs.tmp / "in")], output=str(tmp_path / "ref"), tokenizer="bytes",
                                    workers=1, shard_bytes=1), log=lambda m: None)
    assert contents(jobs.tmp / "prep") == contents(tmp_path / "ref")


def test_job_logs_hold_no_traceback_and_no_signal_forwarder_noise(jobs):
    """The default mode's jobs and the preprocessing array; launcher mode under scancel is left out: a rank whose
    peer was SIGKILLed mid-save does end with a traceback there."""
    for name in ("uninterrupted", "warned", "cancelled", "requeued", "batch_interrupted"):
        jobs.wait_done(jobs.ids[name], 0)
    logs = [p for p in sorted(jobs.tmp.glob("*.log")) if p.name != "launcher_cancelled.log"]
    assert len(logs) == 7
    for path in logs:
        text = path.read_text(errors="replace")
        assert "Traceback" not in text and "/proc/" not in text and "forward_signals.sh:" not in text, \
            f"{path.name}:\n{text[-3000:]}"
    # launcher mode passes signals on with forward_signals.sh: one line per node, nothing about other processes
    text = jobs.log("launcher_cancelled")
    assert "/proc/" not in text and "forward_signals.sh:" not in text and "sending SIGTERM to ranks" in text


def test_a_recipe_trains_its_models_as_srun_tasks(jobs, tmp_path):
    """mtp-recipe inside an allocation with --launcher "srun ... launch/rank_task.sh ADDR PORT": each model's ranks
    are srun tasks (tensor parallelism over the two), as the README shows."""
    out, log = tmp_path / "recipe", tmp_path / "recipe.log"
    launcher = f"srun --ntasks=2 --oversubscribe launch/rank_task.sh 127.0.0.1 {free_port()}"
    cmd = (f"{sys.executable} -m mtplm.recipes.run polynomial --preset tiny --out {out} --seeds 1 --n 2 "
           f"--launcher '{launcher}' -- --parallel.tensor 2")
    env = jobs.slurm.env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    job = jobs.slurm.sbatch("--ntasks=2", "--oversubscribe", f"--output={log}", "--wrap", cmd, cwd=REPO, env=env)
    info = jobs.wait_done(job, 0)
    assert info.get("ExitCode") == "0:0", log.read_text()[-3000:]
    train_log = (out / "models" / "tiny_n2_seed1" / "train.out").read_text()
    assert "world 2 on CPU" in train_log and "tensor-parallel 2" in train_log
    assert (out / "results.md").is_file()
