"""Pre-emption as clusters do it: SIGTERM to the whole process group (DataLoader workers and launcher included),
followed by a resume that continues exactly; and a checkpoint save that fails on one rank."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_launch import REPO, free_port, run_ranks
from mtplm.data.synthetic import write_token_dataset
from mtplm.pretrain.checkpointing.checkpoint import COMPLETE, LATEST
from mtplm.pretrain.preemption import StopSignal
from test_checkpoint_resume import TINY, metrics

WORKER = "tests/workers/train_signalled.py"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def dataset_config(tmp: Path, **train) -> str:
    """TINY on a real dataset folder read by 2 DataLoader workers per rank."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 200, (int(n),), generator=g).tolist()
            for n in torch.randint(10, 60, (300,), generator=g)]
    data = write_token_dataset(tmp / "data", docs, vocab_size=200)
    cfg = {**TINY, "data": {**TINY["data"], "datasets": [str(data)], "num_workers": 2},
           "train": {**TINY["train"], "save_interval": 0, **train}}
    path = tmp / "tiny_data.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run_group(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run cmd as the leader of a new process group and wait until every process of the group is gone (a
    launcher may exit before its ranks)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = proc.communicate(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"processes of {cmd} still running:\n{out[-3000:]}")
        time.sleep(0.2)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def stopped_at(out: Path) -> int:
    tag = (out / "checkpoints" / LATEST).read_text().strip()
    assert (out / "checkpoints" / tag / COMPLETE).is_file()
    return int(tag.split("_")[1])


@contextlib.contextmanager
def signal_dispositions(dispositions: dict):
    """Set the dispositions a test that signals itself relies on, and restore the inherited ones after: a
    background job of a non-interactive shell (`nohup bash .ci/run &`) inherits SIGINT ignored, for example."""
    inherited = {sig: signal.signal(sig, handler) for sig, handler in dispositions.items()}
    try:
        yield
    finally:
        for sig, handler in inherited.items():
            signal.signal(sig, handler)


def test_repeated_stop_signals_repeat_the_request_and_a_second_ctrl_c_interrupts():
    """A launcher passes SIGTERM on to ranks that already got it from the scheduler: that must not kill them."""
    interactive = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                   signal.SIGUSR1: signal.SIG_DFL}
    with signal_dispositions(interactive):
        stop = StopSignal()
        try:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):
                os.kill(os.getpid(), sig)
            assert stop.requested and stop.name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            stop.restore()
        assert {sig: signal.getsignal(sig) for sig in interactive} == interactive


def test_group_sigterm_with_dataloader_workers_checkpoints_and_resumes_exactly(tmp_path):
    cfg = dataset_config(tmp_path)
    full, pre = tmp_path / "full", tmp_path / "preempted"
    proc = run_group([sys.executable, WORKER, "--config", cfg, "--train.out_dir", str(full)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc = run_group([sys.executable, WORKER, "--config", cfg, "--train.out_dir", str(pre),
                      "--group_sigterm_after_step", "2"])
    # the step in progress finishes, is checkpointed, and the run stops; the workers did not die of the signal
    assert proc.returncode == 143, proc.stdout[-3000:]
    assert stopped_at(pre) == 3
    assert "stop requested (SIGTERM); checkpointing at step 3" in (pre / "logs" / "rank0.log").read_text()
    assert not (pre / "final").exists()
    proc = run_group([sys.executable, WORKER, "--config", cfg, "--train.out_dir", str(pre), "--train.resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    a, b = metrics(full), metrics(pre)
    assert sorted(b) == list(range(1, 7))
    assert [b[s]["loss"] for s in range(1, 7)] == [a[s]["loss"] for s in range(1, 7)]
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(pre / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.distributed
def test_group_sigterm_to_deepspeed_launcher_with_two_ranks_checkpoints_and_resumes(tmp_path):
    """`deepspeed` (runner -> deepspeed.launcher.launch -> 2 ranks, each with 2 DataLoader workers) in one process
    group, all signalled at once: the runner dies, launch.py signals its ranks again and waits for them."""
    cfg = dataset_config(tmp_path)
    common = ["--config", cfg, "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json")]
    full, pre = tmp_path / "full", tmp_path / "preempted"
    run_ranks(2, [WORKER, *common, "--train.out_dir", str(full)])
    def launcher(*args):  # `deepspeed --num_gpus 2 ...`; with the CPU accelerator a "GPU" is a process
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, *common, *args]

    proc = run_group(launcher("--train.out_dir", str(pre), "--group_sigterm_after_step", "2"))
    step = stopped_at(pre)
    assert step == 3, proc.stdout[-3000:]
    for rank in (0, 1):
        assert "stop requested (SIGTERM)" in (pre / "logs" / f"rank{rank}.log").read_text()
    assert not (pre / "final").exists()
    proc = run_group(launcher("--train.out_dir", str(pre), "--train.resume", "auto"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    a, b = metrics(full), metrics(pre)
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-6), f"step {s}"
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(pre / "final" / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.distributed
def test_save_that_fails_on_one_rank_fails_every_rank_and_keeps_latest(tmp_path):
    """Rank 1's ZeRO optimizer shard of step 4 cannot be written (a full disk, simulated by the worker), so only
    rank 1's write fails."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY, "train": {**TINY["train"], "keep_last": 0}}))
    out = tmp_path / "run"
    blocked = out / "checkpoints" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with pytest.raises(RuntimeError) as failed:
        run_ranks(2, [WORKER, "--config", str(cfg), "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json"),
                      "--train.out_dir", str(out), "--disk_full_at", str(blocked)], timeout=300)
    report = str(failed.value)
    assert "[timed out]" not in report
    for rank in (0, 1):
        assert f"----- rank {rank} (exit 1) -----" in report  # every rank fails, none waits for the others
        log = (out / "logs" / f"rank{rank}.log").read_text()
        assert f"checkpoint {blocked.parent} was not saved: rank 1 could not write {blocked}" in log, log[-2000:]
    assert (out / "checkpoints" / LATEST).read_text().strip() == "step_00000002"
    assert not (blocked.parent / COMPLETE).exists()
    assert metrics(out).keys() == {1, 2, 3, 4}


def test_exit_status_after_a_requested_stop():
    """Ctrl-C ends like an interrupted shell command (130); SIGTERM and Slurm's warning signal end with 143, on
    which launch/slurm_train.sh requeues; a rank stopped by another rank's signal too."""
    from mtplm.pretrain.train import exit_status
    from mtplm.pretrain.trainer import TrainResult

    assert exit_status(TrainResult(step=3)) == 0
    assert exit_status(TrainResult(step=3, stopped_by_signal=True, stop_signal=signal.SIGINT)) == 130
    for sig in (signal.SIGTERM, signal.SIGUSR1, None):
        assert exit_status(TrainResult(step=3, stopped_by_signal=True, stop_signal=sig)) == 143
