"""mtp-recipe end to end at the tiny preset: generation, mtp-preprocess, mtp-train (n = 1, 2), mtp-eval, table
and plot; a re-run retrains and re-evaluates nothing. Which n wins is not asserted (a handful of steps). The bytes
recipe's self-speculative decoding reproduces plain greedy decoding; a recipe's models train under a launcher
with a parallel layout; a stopped recipe checkpoints every model in training."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dist_launch import REPO


def recipe(*args):
    return subprocess.run([sys.executable, "-m", "mtplm.recipes.run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("name, groups", [("polynomial", [str(m) for m in range(1, 11)]), ("induction", None)])
def test_recipe_tiny_end_to_end(tmp_path, name, groups):
    out = tmp_path / name
    proc = recipe(name, "--preset", "tiny", "--out", str(out), "--seeds", "1", "--n", "1", "2", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 trunk blocks + 1 head blocks" in proc.stdout and "2 trunk blocks + 2 head blocks" in proc.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["n"], r["seed"]) for r in rows] == [(1, 1), (2, 1)]
    assert rows[0]["parameters"] == rows[1]["parameters"] > 0  # parameter-matched
    assert [len(r["val_head_losses"]) for r in rows] == [1, 2]
    assert all(r["tokens_seen"] == 4 * 4 * 64 for r in rows)  # steps x micro-batch x seq_len
    for r in rows:
        assert 0 <= r["accuracy"] <= 1
        if groups:
            assert sorted(r["accuracy_by"], key=int) == sorted(r["digit_accuracy_by"], key=int) == groups
            assert all(0 <= v <= 1 for v in r["digit_accuracy_by"].values())
        else:
            assert [p["step"] for p in r["curve"]] == [2, 4] and r["curve"][-1]["positions"] > 0
            # random_name_accuracy is 1 where every repeated name has only itself before it (short tiny stories)
            assert 0 <= r["copies_a_name"] <= 1 and 0 < r["random_name_accuracy"] <= 1
    table = (out / "results.md").read_text()
    assert "| 1 | 1 |" in table and "| 2 | 1 |" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(list(out.glob("models/*/*eval*.json"))) == 4  # two evaluations per model
    evals = {p: p.stat().st_mtime_ns for p in out.glob("models/*/*eval*.json")}
    again = recipe(name, "--preset", "tiny", "--out", str(out), "--seeds", "1", "--n", "1", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained already") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("models/*/*eval*.json")} == evals

    other = recipe(name, "--preset", "cpu", "--out", str(out))
    assert other.returncode == 1 and "holds another run" in other.stderr and "preset" in other.stderr


def test_bytes_recipe_decodes_held_out_code_as_plain_greedy_decoding(tmp_path):
    """n = 1 and a parameter-matched n = 8 model on the standard library's code; the n = 8 model decodes the
    held-out prompts with k = 0..7 drafts, each output equal to plain greedy decoding's (float32, eager)."""
    out = tmp_path / "bytes"
    proc = recipe("bytes", "--preset", "tiny", "--out", str(out), "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 trunk blocks + 1 head blocks" in proc.stdout and "1 trunk blocks + 8 head blocks" in proc.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["n"], len(r["val_head_losses"])) for r in rows] == [(1, 1), (8, 8)]
    assert rows[0]["parameters"] == rows[1]["parameters"] and "decoding" not in rows[0]
    d = rows[1]["decoding"]
    assert [e["k"] for e in d["eager"]] == list(range(8)) and "compiled" not in d  # the tiny preset: eager only
    assert all(e["differ"] == 0 and 1 <= e["tokens_per_forward"] <= e["k"] + 1 for e in d["eager"])
    assert [len(e["acceptance"]) for e in d["eager"]] == list(range(8))
    held = [json.loads(line)["file"] for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    assert len(held) == 2 and not set(held) & {json.loads(line).get("file") for line in
                                             (out / "data" / "train.jsonl").read_text().splitlines()}
    assert "tokens/forward" in (out / "results.md").read_text()
    assert recipe("bytes", "--preset", "paper", "--out", str(tmp_path / "p")).returncode == 2  # none: refused


def test_recipe_models_train_under_a_launcher_with_a_parallel_layout(tmp_path):
    """--launcher starts each model's ranks (torchrun, two CPU processes here); the mtp-train options after --
    give them a layout (tensor parallelism over the two)."""
    out = tmp_path / "poly"
    proc = recipe("polynomial", "--preset", "tiny", "--out", str(out), "--seeds", "1", "--n", "2",
                  "--launcher", f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2",
                  "--", "--parallel.tensor", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "models" / "tiny_n2_seed1" / "train.out").read_text()
    assert "world 2 on CPU" in log and "tensor-parallel 2" in log
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["tokens_seen"] == 4 * 4 * 64 and len(rows[0]["val_head_losses"]) == 2
    bad = recipe("polynomial", "--preset", "tiny", "--out", str(tmp_path / "bad"), "--seeds", "1", "--n", "1",
                 "--launcher", "no-such-launcher --nproc_per_node 2")
    assert bad.returncode == 1 and "cannot start 'no-such-launcher'" in bad.stderr


@pytest.mark.parametrize("sig, whole_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c", "sigterm-to-mtp-recipe"])
def test_a_stopped_recipe_checkpoints_every_model_in_training(tmp_path, sig, whole_group, code):
    """Ctrl-C reaches the whole process group; `kill PID` (SIGTERM) mtp-recipe alone, which passes it on to the
    --jobs trainers. Either way each model in training saves a checkpoint, nothing is left running, and the
    recipe says how to go on. (The tiny preset with more steps than it reaches before the signal; not many more:
    the recipe logs every steps/20, and the signal waits for each model's first logged step.)"""
    out = tmp_path / "induction"
    proc = subprocess.Popen([sys.executable, "-m", "mtplm.recipes.run", "induction", "--preset", "tiny", "--out",
                             str(out), "--seeds", "1", "2", "--n", "1", "--jobs", "2", "--set", "steps=2000"],
                            cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def training():  # models that have logged a training step
            return [m for m in out.glob("models/*/metrics.jsonl") if '"kind": "train"' in m.read_text()]

        deadline = time.monotonic() + 400  # a bound on a hang, not a timing assertion
        while len(training()) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and len(training()) == 2, proc.stderr.read() if proc.poll() is not None else ""
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    assert f"mtp-recipe: stopped by {signal.Signals(sig).name}; the models in training saved a checkpoint" in err
    for model in sorted((out / "models").iterdir()):
        latest = model / "checkpoints" / "latest"
        assert latest.is_file(), model.name
        step = model / "checkpoints" / latest.read_text().strip()
        assert (step / "COMPLETE").is_file() and not (model / "final").exists(), model.name
    with pytest.raises(ProcessLookupError):  # every trainer has exited
        os.killpg(proc.pid, 0)
