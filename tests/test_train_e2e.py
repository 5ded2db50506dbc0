"""End to end: the trainer on a DeepSpeed engine (CPU) for a few dozen steps; every head's loss falls."""

import json
import subprocess
import sys

from dist_launch import REPO


def test_every_head_learns(tmp_path):
    out = tmp_path / "run"
    # DeepSpeed's monitor (here its CSV writer; TensorBoard is configured the same way) gets every metric.
    ds = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "e2e"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    proc = subprocess.run(
        [sys.executable, "tests/workers/train_synthetic.py", "--config", "configs/tiny.yaml",
         "--model.vocab_size", "200", "--data.seq_len", "32", "--train.steps", "40", "--train.eval_interval", "20",
         "--train.eval_iters", "2", "--train.out_dir", str(out), "--deepspeed_config", str(tmp_path / "ds.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    first, last = log["train"][0]["head_losses"], log["train"][-1]["head_losses"]
    assert len(first) == 4
    for k, (a, b) in enumerate(zip(first, last)):
        assert b < a - 0.5, f"head {k + 1} did not learn: {a:.3f} -> {b:.3f}"
    assert [e["step"] for e in log["eval"]] == [20, 40]
    # rank-named log file, metrics file, checkpoint and consolidated model
    assert (out / "logs" / "rank0.log").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "valid"}
    assert (out / "final" / "params.json").is_file() and (out / "checkpoints" / "latest").is_file()
    monitor_files = {p.name for p in (tmp_path / "monitor").rglob("*.csv")}
    assert {"train_loss.csv", "train_head4_loss.csv", "valid_loss.csv"} <= monitor_files, monitor_files
