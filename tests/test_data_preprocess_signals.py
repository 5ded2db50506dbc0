"""Ctrl-C or a cluster's SIGTERM to mtp-preprocess's process group (main process and 2 workers): one line
saying what was completed, exit 128 + signal, no traceback, and the same command then finishes the job with
exactly the bytes of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mtplm.data.preprocess import PreprocessConfig, run_preprocess


def make_inputs(folder, n_files=200):
    folder.mkdir()
    for i in range(n_files):
        with open(folder / f"f{i:03d}.jsonl", "w") as f:
            for j in range(20):
                f.write(json.dumps({"text": f"doc {i}.{j} " + "payload " * (200 + (i * 7 + j) % 50)}) + "\n")


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_process_group_stops_in_one_line_and_rerun_completes(tmp_path, signum):
    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mtplm.data.preprocess", str(tmp_path / "in"), "--output", str(out),
           "--tokenizer", "bytes", "--workers", "2", "--shard-bytes", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(out.glob("shard_*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C or scancel does: main process and workers together
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # hung: leave no process behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    assert f"stopped by {signal.Signals(signum).name}" in lines[0] and "re-run the same command to continue" in lines[0]
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tmp"))
    n_shards = len(list(out.glob("shard_*.json")))
    assert f"has {n_shards} complete shards holding {n_shards} of 200 inputs" in lines[0]

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"resuming: {n_shards} of 200 inputs" in rerun.stdout, rerun.stderr
    run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "ref"), tokenizer="bytes",
                                    workers=1, shard_bytes=1), log=lambda m: None)
    assert contents(out) == contents(tmp_path / "ref")
