"""metrics.jsonl after a resume: the records of the steps redone replace those of the run that went past the
checkpoint, so a reader sees one record per step and kind, of the run that continues."""

import json
import subprocess
import sys
from pathlib import Path

from dist_launch import REPO
from mtplm.pretrain.metrics_log import MetricsLogger
from test_checkpoint_resume import WORKER, config


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_start_at_drops_later_records_and_a_torn_last_line(tmp_path):
    log = MetricsLogger(tmp_path, 0, 6, 0, "metrics.jsonl")
    for step in range(1, 6):
        log.write(step, "train", {"loss": 1.0, "head_losses": [1.0], "lr": 0.1, "grad_norm": 1.0,
                                  "tokens_per_s": 1.0}, echo=False)
        if step % 2 == 0:
            log.write(step, "valid", {"loss": 2.0, "head_losses": [2.0]}, echo=False)
    log.jsonl.write('{"kind": "train", "st')  # killed mid-write
    log.close()
    log = MetricsLogger(tmp_path, 0, 6, 0, "metrics.jsonl")
    log.start_at(2)
    log.write(3, "train", {"loss": 0.5, "head_losses": [0.5], "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0},
              echo=False)
    log.close()
    got = [(r["kind"], r["step"], r["loss"]) for r in records(tmp_path / "metrics.jsonl")]
    assert got == [("train", 1, 1.0), ("train", 2, 1.0), ("valid", 2, 2.0), ("train", 3, 0.5)]
    assert not list(tmp_path.glob(".metrics*"))  # the temporary file is gone


def run(args):
    proc = subprocess.run([sys.executable, WORKER, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_from_an_earlier_checkpoint_keeps_one_record_per_step(tmp_path):
    """Train 6 steps (checkpoints at 4 and 6 kept), resume from step 4: steps 5 and 6 are redone, and the file
    holds the first run's records up to step 4 and the resumed run's after it, once each."""
    out = tmp_path / "run"
    common = ["--config", config(tmp_path), "--train.out_dir", str(out), "--train.eval_interval", "2"]
    run(common)
    first = records(out / "metrics.jsonl")
    run(common + ["--train.resume", str(out / "checkpoints" / "step_00000004")])
    resumed = json.loads((out / "train_log.json").read_text())
    got = records(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in got] == [
        ("train", 1), ("train", 2), ("valid", 2), ("train", 3), ("train", 4), ("valid", 4), ("train", 5),
        ("train", 6), ("valid", 6)]
    assert got[:6] == first[:6]
    # tokens_per_s is measured, so the resumed run's records are told apart from the first run's by it.
    assert [{k: v for k, v in r.items() if k != "kind"} for r in got if r["kind"] == "train" and r["step"] > 4] == \
        resumed["train"]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in got if r["kind"] == "valid" and r["step"] > 4] == \
        resumed["eval"]
