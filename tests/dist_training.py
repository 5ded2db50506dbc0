"""Shared pieces of the multi-process training comparisons: a tiny n=4 model, the shipped DeepSpeed configs
with small buckets, a run of the real trainer as K ranks, and the comparison against a reference run."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_launch import REPO, run_ranks

TINY = {
    "model": {"dim": 64, "n_layers": 6, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 200, "multiple_of": 16,
              "n_future_tokens": 4, "max_seq_len": 64, "head_loss_weights": [1.0, 0.5, 0.3, 0.2]},
    "data": {"seq_len": 16},
    # eps 1e-5 (Llama's): every step trains at a real rate (warmup peaks at step 1), and Adam moves a weight by
    # about lr * g / (|g| + eps), so a gradient of ~1e-9 whose value (even sign) depends on reduction order
    # would, with eps 1e-8, become a difference of up to 2 lr; eps 1e-5 keeps that below the 1e-5 tolerance.
    "optim": {"lr": 0.003, "warmup_steps": 1, "grad_clip": 1.0, "eps": 1e-5},
    "train": {"steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2, "eval_interval": 3, "eval_iters": 2,
              "log_interval": 1},
}


def tiny_with(**model) -> dict:
    """TINY with some model keys changed."""
    return {**TINY, "model": {**TINY["model"], **model}}


def ds_json(tmp: Path, name: str) -> Path:
    """A shipped config with small buckets and no persistent parameters, so tiny models still exercise
    ZeRO-3 partitioning and several reduction buckets. (A bucket smaller than the largest parameter makes
    DeepSpeed 0.19.8 hang on gloo, with or without the sequential heads; 20000 holds the largest here.)"""
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    z = cfg["zero_optimization"]
    if z["stage"] >= 2:
        z["reduce_bucket_size"] = 20000
    if z["stage"] == 3:
        z["stage3_param_persistence_threshold"] = 0
    path = tmp / f"ds_{name}"
    path.write_text(json.dumps(cfg))
    return path


def train(tmp: Path, name: str, world: int, *args: str, sample_extra: int = 2) -> tuple[list[dict], dict]:
    """Train TINY with `world` ranks (extra args are config overrides) on samples of seq_len + sample_extra
    tokens (heads k > sample_extra have no target at the last positions); returns (per-step training records
    then validation records, final weights)."""
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp / name
    run_ranks(world, ["tests/workers/train_synthetic.py", "--config", str(cfg), "--train.out_dir", str(out),
                      "--sample_extra", str(sample_extra), *args], timeout=900)
    log = json.loads((out / "train_log.json").read_text())
    return log["train"] + log["eval"], load_file(str(out / "final" / "model.safetensors"))


def params_held(tmp: Path, name: str) -> tuple[int, int]:
    """(parameter elements rank 0 held after building its model, elements of the model) in run `name`."""
    return tuple(json.loads((tmp / name / "train_log.json").read_text())["params_held"])


def reference_run(tmp: Path) -> tuple[list[dict], dict]:
    """Single process, naive loss, the global batch of every distributed run here (micro-batch 2 x 4)."""
    return train(tmp, "ref", 1, "--train.loss_impl", "naive", "--train.grad_accum_steps", "4")


def assert_matches(reference, got, tol=1e-5, compare_weights=True):
    (ref_log, ref_w), (log, w) = reference, got
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]
    for a, b in zip(ref_log, log):
        assert b["loss"] == pytest.approx(a["loss"], rel=tol, abs=tol)
        assert b["head_losses"] == pytest.approx(a["head_losses"], rel=tol, abs=tol)
        if "grad_norm" in a:  # training records; the others are validation (every rank's validation batches
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=max(1e-4, tol / 3))  # are the same samples)
    assert w.keys() == ref_w.keys()
    for k in ref_w if compare_weights else []:
        diff = (w[k] - ref_w[k]).abs().max().item()
        assert diff <= tol * max(1.0, ref_w[k].abs().max().item()), f"{k}: parameters differ by {diff:.2e}"
