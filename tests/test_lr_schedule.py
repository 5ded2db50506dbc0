"""The learning rate each optimizer step applies, read from the torch optimizer's param groups as it steps
(tests/workers/train_lr_probe.py), equals the closed form in README's Training section, also across a resume;
and the rate logged for a step (console, metrics.jsonl, DeepSpeed's monitor) is the one that step applied."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_launch import REPO, run_ranks

PROBE = "tests/workers/train_lr_probe.py"
LR, MIN_RATIO, STEPS = 0.003, 0.1, 6
TINY = {
    "model": {"dim": 64, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 200, "multiple_of": 16,
              "n_future_tokens": 4, "max_seq_len": 64},
    "data": {"seq_len": 16},
    "optim": {"lr": LR, "min_lr_ratio": MIN_RATIO},
    "train": {"steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 2, "eval_interval": 0, "log_interval": 1,
              "save_interval": 2},
}


def expected_lr(s: int, warmup: int, total: int = STEPS, peak: float = LR, m: float = MIN_RATIO) -> float:
    """Step s (1-based): linear warmup reaching the peak at step `warmup`, cosine to peak * m at step `total`."""
    if s <= warmup:
        return peak * s / warmup
    return peak * (m + (1 - m) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2)


def run(tmp: Path, out: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    (tmp / "tiny.json").write_text(json.dumps(TINY))
    proc = subprocess.run([sys.executable, PROBE, "--config", str(tmp / "tiny.json"), "--train.out_dir", str(out),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def applied(out: Path) -> list[tuple[int, float]]:
    """(step, lr) per optimizer step in the order they ran (a step redone after a resume twice); every param
    group, and every call of the torch optimizer within one step (ZeRO steps it once per group), has one rate."""
    rates: dict[tuple[int, int], set] = {}
    for line in (out / "applied_lr.jsonl").read_text().splitlines():
        r = json.loads(line)
        rates.setdefault((r["pid"], r["step"]), set()).update(r["lr"])
    assert all(len(v) == 1 for v in rates.values()), rates
    return [(step, v.pop()) for (_, step), v in rates.items()]


def logged(out: Path) -> dict[int, float]:
    """The lr of each step's train record in metrics.jsonl (a resumed run's later records win)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["kind"] == "train"}


@pytest.mark.parametrize("warmup, ds_json", [(0, None), (1, None), (3, "zero1.json"), (8, None)],
                         ids=["no-warmup", "warmup1", "warmup3-zero1", "warmup-longer-than-run"])
def test_applied_rate_follows_the_closed_form_across_a_resume(tmp_path, warmup, ds_json):
    args = ["--optim.warmup_steps", str(warmup)]
    if ds_json:
        # DeepSpeed's monitor (its CSV writer; TensorBoard is fed the same events) must get the applied rate too
        ds = json.loads((REPO / "ds_configs" / ds_json).read_text())
        ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "lr"}
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        args += ["--deepspeed_config", str(tmp_path / "ds.json")]
    out = tmp_path / "run"
    # killed after step 3, resumed from the step-2 checkpoint: step 3 runs twice and must apply the same rate
    assert run(tmp_path, out, *args, "--kill_after_step", "3", expect_ok=False).returncode == -9
    proc = run(tmp_path, out, *args, "--train.resume", "auto")
    steps = applied(out)
    assert [s for s, _ in steps] == [1, 2, 3, 3, 4, 5, 6]
    for s, lr in steps:
        assert lr == pytest.approx(expected_lr(s, warmup), rel=1e-12, abs=0), f"step {s}"
    assert steps[0][1] > 0  # the first step always trains
    final = dict(steps)
    assert logged(out) == final  # exactly the applied value, not the next step's
    console = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+)/\d+ \| .*? \| lr ([0-9.e+-]+)", proc.stderr)}
    assert console == {s: float(f"{final[s]:.2e}") for s in (3, 4, 5, 6)}
    if ds_json:
        with open(next((tmp_path / "monitor").rglob("train_lr.csv"))) as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit()]
        assert {int(r[0]): float(r[1]) for r in rows} == pytest.approx(final, rel=1e-6)


def test_resume_with_a_changed_schedule_follows_the_new_config_from_its_first_step(tmp_path):
    """The checkpoint keeps the position on the schedule; the curve is the config's (ZeRO-1 loads the optimizer
    state, with the rate it was saved with, after the scheduler: the new rate must still win)."""
    args = ["--optim.warmup_steps", "2", "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json")]
    out = tmp_path / "run"
    run(tmp_path, out, *args, "--kill_after_step", "3", expect_ok=False)
    run(tmp_path, out, *args, "--train.resume", "auto", "--train.steps", "9", "--optim.lr", "0.001")
    steps = applied(out)
    assert [s for s, _ in steps] == [1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    for s, lr in steps[:3]:
        assert lr == pytest.approx(expected_lr(s, 2), rel=1e-12)
    for s, lr in steps[3:]:
        assert lr == pytest.approx(expected_lr(s, 2, total=9, peak=0.001), rel=1e-12), f"step {s}"


@pytest.mark.distributed
def test_pipeline_layout_applies_and_logs_the_same_schedule(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    out = tmp_path / "run"
    run_ranks(2, [PROBE, "--config", str(tmp_path / "tiny.json"), "--train.out_dir", str(out),
                  "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json"), "--parallel.pipeline", "2",
                  "--optim.warmup_steps", "2"])
    steps = applied(out)
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))
    for s, lr in steps:
        assert lr == pytest.approx(expected_lr(s, 2), rel=1e-12), f"step {s}"
    assert logged(out) == dict(steps)
