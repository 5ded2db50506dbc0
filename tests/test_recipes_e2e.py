"""mtp-recipe end to end at the tiny preset: generation, mtp-preprocess, mtp-train (n = 1, 2), mtp-eval, table
and plot; a re-run retrains and re-evaluates nothing. Which n wins is not asserted (a handful of steps)."""

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
    table = (out / "results.md").read_text()
    assert "| 1 | 1 |" in table and "| 2 | 1 |" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(list(out.glob("models/*/*eval*.json"))) == 4  # two evaluations per model
    evals = {p: p.stat().st_mtime_ns for p in out.glob("models/*/*eval*.json")}
    again = recipe(name, "--preset", "tiny", "--out", str(out), "--seeds", "1", "--n", "1", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained already") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("models/*/*eval*.json")} == evals

    other = recipe(name, "--preset", "quick", "--out", str(out))
    assert other.returncode == 1 and "holds another run" in other.stderr and "preset" in other.stderr


@pytest.mark.parametrize("sig, whole_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c", "sigterm-to-mtp-recipe"])
def test_a_stopped_recipe_checkpoints_every_model_in_training(tmp_path, sig, whole_group, code):
    """Ctrl-C reaches the whole process group; `kill PID` (SIGTERM) mtp-recipe alone, which passes it on to the
    --jobs trainers. Either way each model in training saves a checkpoint, nothing is left running, and the
    recipe says how to go on. (The quick preset: its models train long enough to be stopped mid-run.)"""
    out = tmp_path / "induction"
    proc = subprocess.Popen([sys.executable, "-m", "mtplm.recipes.run", "induction", "--preset", "quick", "--out",
                             str(out), "--seeds", "1", "2", "--n", "1", "--jobs", "2"], cwd=REPO, text=True,
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
