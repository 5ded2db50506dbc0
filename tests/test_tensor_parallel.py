"""Tensor parallelism (ours, on DeepSpeed's topology) against the single-process reference.

Each run trains the tiny n=4 model with the sequential heads for several optimizer steps and must reproduce the
naive single-process run of the same global batch (8 samples per step): losses, per-head losses, the gradient
norm and every parameter of the consolidated final model, which is gathered from the tensor shards.
"""

import os
import subprocess
import sys

import pytest
import torch

from dist_launch import REPO
from dist_training import TINY, assert_matches, ds_json, params_held, tiny_with, train
from mtplm.pretrain.config import ConfigError, TrainConfig, from_dict
from mtplm.conversion.consolidate import consolidated_state_dict
from mtplm.pretrain.parallel.layout import check_world_size

distributed = pytest.mark.distributed


@distributed
@pytest.mark.parametrize("loss_impl", ["sequential", "naive"])
def test_tp2_matches_single_process(tmp_path, reference, loss_impl):
    got = train(tmp_path, "tp2", 2, "--parallel.tensor", "2", "--train.grad_accum_steps", "4",
                "--train.loss_impl", loss_impl, "--deepspeed_config", str(ds_json(tmp_path, "zero1.json")))
    assert_matches(reference, got)


@distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_tp2_dp2_matches_single_process(tmp_path, reference, stage):
    got = train(tmp_path, f"tp2dp2z{stage}", 4, "--parallel.tensor", "2",
                "--deepspeed_config", str(ds_json(tmp_path, f"zero{stage}.json")))
    assert_matches(reference, got)
    held, shard = params_held(tmp_path, f"tp2dp2z{stage}")  # rank 0's tensor shard, and what it keeps of it
    if stage == 3:  # shards are partitioned over the data-parallel pair as soon as they are cut
        assert held == pytest.approx(shard / 2, rel=0.01)
    # The last checkpoint's tensor and ZeRO shards, consolidated offline, are the gathered final model.
    state, _, _ = consolidated_state_dict(tmp_path / f"tp2dp2z{stage}" / "checkpoints")
    final = got[1]
    assert set(final) <= set(state)
    for k in final:
        assert torch.equal(state[k], final[k]), k


@distributed
@pytest.mark.parametrize("dp, stage", [(1, 1), (2, 3)], ids=["tp2-zero1", "tp2-dp2-zero3"])
def test_tp2_tied_embeddings_matches_single_process(tmp_path, dp, stage):
    """Under ZeRO-3 the vocabulary shards are cut from the embedding zero.Init partitioned, and the output
    shares them."""
    tied = ["--model.tie_embeddings", "true"]
    ref = train(tmp_path, "ref_tied", 1, "--train.loss_impl", "naive", "--train.grad_accum_steps", "4", *tied)
    got = train(tmp_path, "tp2_tied", 2 * dp, "--parallel.tensor", "2", "--train.grad_accum_steps", str(4 // dp),
                "--deepspeed_config", str(ds_json(tmp_path, f"zero{stage}.json")), *tied)
    assert_matches(ref, got)


@pytest.mark.parametrize("model, tp, message", [
    ({"n_heads": 4, "n_kv_heads": 1}, 2, "key/value heads"),
    ({"n_heads": 2, "n_kv_heads": 2}, 4, "attention heads"),
    ({"dim": 96, "n_heads": 6, "n_kv_heads": 3, "multiple_of": 48}, 3, "vocab_pad_multiple to 192"),
])
def test_impossible_tensor_parallel_sizes_are_rejected(model, tp, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, {**tiny_with(**model), "parallel": {"tensor": tp}})


def test_world_size_must_be_a_multiple_of_tensor_parallel():
    cfg = from_dict(TrainConfig, {**TINY, "parallel": {"tensor": 2}})
    assert check_world_size(cfg, 4) == 2
    with pytest.raises(ConfigError, match="3 processes cannot be split into groups of 2"):
        check_world_size(cfg, 3)


@pytest.mark.parametrize("world, args, message", [
    ("3", ["--parallel.tensor", "2"], "3 processes cannot be split into groups of 2"),
    ("2", ["--parallel.pipeline", "2", "--deepspeed_config", "ds_configs/zero3.json"],
     "ZeRO-3 cannot run with parallel.pipeline 2"),
])
def test_trainer_refuses_impossible_layouts_before_any_process_group(tmp_path, world, args, message):
    # MASTER_PORT 1: any attempt to form a process group would fail instead of printing the reason.
    env = dict(os.environ, RANK="0", WORLD_SIZE=world, LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config", "configs/tiny.yaml", *args,
                           "--train.out_dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
