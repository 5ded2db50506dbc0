"""Exact resume: a run interrupted (SIGKILL between saves, or SIGTERM pre-emption) and resumed with
--train.resume auto produces the same per-step losses and weights as an uninterrupted run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_config
from dist_launch import REPO, run_ranks
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model
from mtplm.pretrain.checkpointing.checkpoint import COMPLETE, LATEST, resolve_resume
from mtplm.pretrain.checkpointing.init_from import load_initial_weights

TINY = {
    "model": {"dim": 64, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 200, "multiple_of": 16,
              "n_future_tokens": 4, "max_seq_len": 64},
    "data": {"seq_len": 16},
    "optim": {"lr": 0.003, "warmup_steps": 2},
    "train": {"steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2, "eval_interval": 0, "log_interval": 1,
              "save_interval": 2, "keep_last": 2},
}
WORKER = "tests/workers/train_synthetic.py"


def config(tmp: Path) -> str:
    path = tmp / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def run_single(args, expect_ok=True):
    proc = subprocess.run([sys.executable, WORKER, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out: Path) -> dict[int, dict]:
    """Per-step train records from metrics.jsonl; a resumed run appends, and its later records win."""
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            records[r["step"]] = r
    return records


def test_sigkill_between_saves_then_resume_is_bit_exact(tmp_path):
    cfg = config(tmp_path)
    full, broken = tmp_path / "full", tmp_path / "broken"
    run_single(["--config", cfg, "--train.out_dir", str(full)])
    proc = run_single(["--config", cfg, "--train.out_dir", str(broken), "--kill_after_step", "3"], expect_ok=False)
    assert proc.returncode == -9
    assert (broken / "checkpoints" / LATEST).read_text().strip() == "step_00000002"
    assert sorted(metrics(broken)) == [1, 2, 3]
    run_single(["--config", cfg, "--train.out_dir", str(broken), "--train.resume", "auto"])
    a, b = metrics(full), metrics(broken)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step]["loss"] == a[step]["loss"], f"step {step}"
        assert b[step]["head_losses"] == a[step]["head_losses"]
        assert b[step]["lr"] == a[step]["lr"]
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(broken / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # keep_last=2: only the two newest complete checkpoints remain
    tags = sorted(p.name for p in (broken / "checkpoints").glob("step_*"))
    assert tags == ["step_00000004", "step_00000006"]


def test_sigterm_checkpoints_and_stops_then_resumes_exactly(tmp_path):
    cfg = config(tmp_path)
    full, pre = tmp_path / "full", tmp_path / "preempted"
    run_single(["--config", cfg, "--train.out_dir", str(full), "--train.save_interval", "0"])
    run_single(["--config", cfg, "--train.out_dir", str(pre), "--train.save_interval", "0",
                "--sigterm_after_step", "3"])
    # the signal arrives during step 4; the step finishes, is checkpointed, and the run stops
    assert (pre / "checkpoints" / LATEST).read_text().strip() == "step_00000004"
    assert not (pre / "final").exists()
    run_single(["--config", cfg, "--train.out_dir", str(pre), "--train.save_interval", "0", "--train.resume", "auto"])
    a, b = metrics(full), metrics(pre)
    assert [b[s]["loss"] for s in range(1, 7)] == [a[s]["loss"] for s in range(1, 7)]


@pytest.mark.distributed
@pytest.mark.parametrize("stage, layout", [(1, []), (2, []), (3, []), (1, ["--parallel.tensor", "2"]),
                                           (1, ["--parallel.pipeline", "2"])],
                         ids=["zero1", "zero2", "zero3", "zero1-tp2", "zero1-pp2"])
def test_multiprocess_zero_resume_after_sigkill(tmp_path, stage, layout):
    cfg = config(tmp_path)
    common = ["--config", cfg, "--deepspeed_config", str(REPO / "ds_configs" / f"zero{stage}.json"), *layout]
    full, broken = tmp_path / "full", tmp_path / "broken"
    run_ranks(2, [WORKER, *common, "--train.out_dir", str(full)])
    with pytest.raises(RuntimeError, match="exit -9"):
        run_ranks(2, [WORKER, *common, "--train.out_dir", str(broken), "--kill_after_step", "3"])
    run_ranks(2, [WORKER, *common, "--train.out_dir", str(broken), "--train.resume", "auto"])
    a, b = metrics(full), metrics(broken)
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-6), f"step {step}"
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(broken / "final" / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k


def test_resume_refuses_a_different_model_and_names_the_differences(tmp_path):
    cfg = config(tmp_path)
    out = tmp_path / "run"
    run_single(["--config", cfg, "--train.out_dir", str(out), "--train.steps", "2"])
    proc = run_single(["--config", cfg, "--train.out_dir", str(out), "--train.steps", "4", "--train.resume", "auto",
                       "--model.n_future_tokens", "2"], expect_ok=False)
    assert proc.returncode != 0
    assert "model.n_future_tokens: checkpoint 4, this run 2" in proc.stderr + proc.stdout


def test_init_from_changes_the_number_of_heads(tmp_path):
    """The paper's fine-tuning recipe: continue a 4-token model as a next-token model (n'=1), keeping the trunk."""
    cfg = config(tmp_path)
    src = tmp_path / "src"
    run_single(["--config", cfg, "--train.out_dir", str(src), "--train.steps", "2"])
    dst = tmp_path / "dst"
    # trunk: n_layers - n_future_tokens = 1 block in both
    run_single(["--config", cfg, "--train.out_dir", str(dst), "--train.steps", "1", "--optim.lr", "1e-9",
                "--model.n_future_tokens", "1", "--model.n_layers", "2", "--train.init_from", str(src / "final")])
    a, b = load_file(str(src / "final" / "model.safetensors")), load_file(str(dst / "final" / "model.safetensors"))
    assert not any(k.startswith("extra_heads") for k in b)
    for k in ("layers.0.attention.wq.weight", "tok_embeddings.weight", "output.weight"):
        assert torch.allclose(a[k], b[k], atol=1e-6)
    assert torch.allclose(a["layers.1.feed_forward.w1.weight"], b["layers.1.feed_forward.w1.weight"], atol=1e-6)


def test_init_from_refuses_a_different_tying(tmp_path):
    save_model(MTPTransformer(tiny_model_config()), tmp_path / "untied")
    with pytest.raises(ValueError, match="has tie_embeddings False, this run True"):
        load_initial_weights(MTPTransformer(tiny_model_config(tie_embeddings=True)), tmp_path / "untied")


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / COMPLETE).write_text("2")
    (root / "step_00000004").mkdir()  # a save that crashed half-way: no COMPLETE marker
    assert resolve_resume("auto", tmp_path) == root / "step_00000002"
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(root / "step_00000004"), tmp_path)
