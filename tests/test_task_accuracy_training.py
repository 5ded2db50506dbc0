"""train.eval_tasks: task accuracy measured during training equals what mtp-eval --tasks measures on the model
the run wrote at that step, and is logged like validation."""

import json
import os
import subprocess
import sys

import pytest

from dist_launch import REPO
from mtplm.data.tokenizer import load_tokenizer
from mtplm.inference.task_eval import evaluate_tasks, read_tasks
from mtplm.model.weights import load_model
from test_checkpoint_resume import TINY

PROMPTS = ["ab", "hello", "x = 1", "def f(", "zz", "  "]


def run(tmp_path, name, tasks_file):
    cfg = {**TINY, "model": {**TINY["model"], "vocab_size": 300},
           "train": {**TINY["train"], "steps": 4, "save_interval": 0, "eval_interval": 0}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "tests/workers/train_synthetic.py", "--config", str(tmp_path / "cfg.json"),
                           "--train.out_dir", str(out), "--data.tokenizer", "bytes",
                           "--train.eval_tasks", f"[{tasks_file}]", "--train.eval_tasks_interval", "2",
                           "--train.eval_tasks_max_new_tokens", "6"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_task_accuracy_during_training_equals_mtp_eval_on_the_written_model(tmp_path):
    # The first run finds what the model completes at step 4; the second, identical run (task answers change
    # nothing in training) is scored against answers of which exactly two in each group are right.
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"prompt": p, "answer": "?"}) + "\n" for p in PROMPTS))
    model = load_model(run(tmp_path, "first", first) / "final").eval()
    tok = load_tokenizer("bytes")
    _, completions = evaluate_tasks(model, tok, read_tasks(first), 6, batch_size=2, progress=False)
    tasks = tmp_path / "qa.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p, "answer": c if i % 3 else c + "!", "half": i < 3}) + "\n"
                             for i, (p, c) in enumerate(zip(PROMPTS, completions))))
    out = run(tmp_path, "second", tasks)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if r["kind"] == "tasks"}
    assert sorted(logged) == [2, 4]
    expected, _ = evaluate_tasks(load_model(out / "final").eval(), tok, read_tasks(tasks), 6, batch_size=4,
                                 progress=False)
    assert expected["accuracy"] == pytest.approx(4 / 6)
    assert logged[4]["qa/accuracy"] == expected["accuracy"]
    assert logged[4]["qa/half=true/accuracy"] == logged[4]["qa/half=false/accuracy"] == pytest.approx(2 / 3)
    assert "tasks step 4 | qa/accuracy 0.667" in (out / "logs" / "rank0.log").read_text()


def test_task_files_are_checked_at_config_load(tmp_path):
    from mtplm.config import ConfigError
    from mtplm.pretrain.config import TrainConfig, from_dict
    from mtplm.pretrain.preflight import check_input_files

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    cfg = from_dict(TrainConfig, {"data": {"tokenizer": "bytes"}, "train": {"eval_tasks": [str(bad)],
                                                                           "out_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=rf'train.eval_tasks\[0\]: {bad}:1: field "answer" is missing'):
        check_input_files(cfg, datasets=False)
    cfg.data.tokenizer = None
    with pytest.raises(ConfigError, match="train.eval_tasks: needs data.tokenizer"):
        check_input_files(cfg, datasets=False)
