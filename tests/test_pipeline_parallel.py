"""The pipeline layout (DeepSpeed's pipeline engine over our model's blocks, heads on the last stage) against the
single-process reference: several optimizer steps of the tiny n=4 model with the sequential heads must give
the losses, per-head losses, gradient norm and final parameters of the naive single-process run of the same
global batch (8 samples per step, 4 micro-batches in flight per pipeline when there is one replica)."""

import json

import numpy as np
import pytest
import torch

from dist_launch import run_ranks
from dist_training import TINY, assert_matches, ds_json, train
from mtplm.data.synthetic import write_token_dataset
from mtplm.pretrain.config import ConfigError, TrainConfig, from_dict
from mtplm.conversion.consolidate import consolidated_state_dict
from mtplm.pretrain.ds_config import build_ds_config
from mtplm.pretrain.parallel.pipeline import meta_name

distributed = pytest.mark.distributed


def pipeline_run(tmp_path, name, world, *layout, stage=1):
    return train(tmp_path, name, world, "--parallel.pipeline", "2", *layout,
                 "--deepspeed_config", str(ds_json(tmp_path, f"zero{stage}.json")))


@distributed
@pytest.mark.parametrize("stage", [0, 1])
def test_pp2_matches_single_process(tmp_path, reference, stage):
    assert_matches(reference, pipeline_run(tmp_path, "pp2", 2, "--train.grad_accum_steps", "4", stage=stage))


@distributed
def test_pp2_dp2_matches_single_process(tmp_path, reference):
    # with activation checkpointing of the trunk blocks inside the stages (DeepSpeed's interval)
    assert_matches(reference, pipeline_run(tmp_path, "pp2dp2", 4, "--train.activation_checkpointing", "true",
                                           "--train.activation_checkpoint_interval", "2"))


@distributed
def test_pp2_tp2_matches_single_process_and_consolidates(tmp_path, reference):
    got = pipeline_run(tmp_path, "pp2tp2", 4, "--parallel.tensor", "2", "--train.grad_accum_steps", "4")
    assert_matches(reference, got)
    # The last checkpoint (per-layer files of each stage and tensor rank), consolidated offline, is the
    # single-process model's state dict.
    state, _, _ = consolidated_state_dict(tmp_path / "pp2tp2" / "checkpoints")
    ref_weights = reference[1]
    assert set(state) == set(ref_weights)
    for k, v in ref_weights.items():
        assert torch.allclose(state[k], v, rtol=1e-5, atol=1e-5), k


@distributed
def test_pp2_bf16_final_and_consolidation_are_the_fp32_masters(tmp_path):
    """bf16 with ZeRO-1: final/ and the checkpoint's consolidation (what mtp-export-hf reads) carry the
    optimizer's fp32 master weights, whose bf16 rounding is the working copy in the layer files."""
    _, final = pipeline_run(tmp_path, "pp2bf16", 2, "--train.grad_accum_steps", "4", stage="1_bf16")
    tag_dir = tmp_path / "pp2bf16" / "checkpoints" / "step_00000003"
    n_trunk = TINY["model"]["n_layers"] - TINY["model"]["n_future_tokens"]
    working = {}
    for f in tag_dir.glob("layer_*-model_00-model_states.pt"):
        layer = int(f.name[len("layer_"):].split("-")[0])
        working.update({meta_name(f"{layer}.{k}", n_trunk): v
                        for k, v in torch.load(f, map_location="cpu", weights_only=True).items()})
    state, _, _ = consolidated_state_dict(tag_dir.parent)
    assert set(final) == set(state) == set(working)
    for k, v in final.items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k]), k
        assert working[k].dtype == torch.bfloat16 and torch.equal(v.bfloat16(), working[k]), k
        if v.dim() == 2:  # trained matrices: the masters are not their bf16 rounding
            assert not torch.equal(v, working[k].float()), k


@distributed
@pytest.mark.parametrize("stage", [0, 1])
def test_pp2_tied_embeddings_match_single_process(tmp_path, stage):
    """Tied embeddings: the first and the last stage each hold the embedding (DeepSpeed's TiedLayerSpec) and
    its gradient is summed between them; the run and its consolidated checkpoint are the single-process ones."""
    tied = ("--model.tie_embeddings", "true", "--train.grad_accum_steps", "4")
    reference = train(tmp_path, "ref_tied", 1, "--train.loss_impl", "naive", *tied)
    assert_matches(reference, pipeline_run(tmp_path, "pp2tied", 2, *tied, stage=stage))
    state, _, _ = consolidated_state_dict(tmp_path / "pp2tied" / "checkpoints")
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    for k, v in reference[1].items():
        assert torch.allclose(state[k], v, rtol=1e-5, atol=1e-5), k


def test_meta_names_of_pipeline_layers():
    n_trunk = 2
    assert meta_name("0.tok_embeddings.weight", n_trunk) == "tok_embeddings.weight"
    assert meta_name("2.block.attention.wq.weight", n_trunk) == "layers.1.attention.wq.weight"
    assert meta_name("3.head_blocks.0.ffn_norm.weight", n_trunk) == "layers.2.ffn_norm.weight"
    assert meta_name("3.head_blocks.3.feed_forward.w2.weight", n_trunk) == "extra_heads.2.feed_forward.w2.weight"
    assert meta_name("3.output.weight", n_trunk) == "output.weight"
    assert meta_name("tied_modules.embedding.tok_embeddings.weight", n_trunk) == "tok_embeddings.weight"


def test_pipeline_with_zero2_or_too_many_stages_is_rejected(tmp_path):
    cfg = from_dict(TrainConfig, {**TINY, "parallel": {"pipeline": 2}})
    with pytest.raises(ConfigError, match="ZeRO-2 cannot run with parallel.pipeline 2"):
        build_ds_config(cfg, ds_json(tmp_path, "zero2.json"), dp_world_size=1, on_cpu=True)
    with pytest.raises(ConfigError, match="only 4 pipeline layers"):
        from_dict(TrainConfig, {**TINY, "parallel": {"pipeline": 5}})


@distributed
def test_pp2_trains_from_a_token_dataset_with_validation(tmp_path):
    """The launcher's path: pretrain/train.py as two ranks, micro-batches from a memory-mapped dataset (the
    first stage reads the inputs, the last the labels), validation through the pipeline's eval schedule."""
    rng = np.random.default_rng(0)
    docs = [list((np.arange(rng.integers(20, 200)) * (1 + i % 5) + i) % 199 + 1) for i in range(300)]
    data = write_token_dataset(tmp_path / "data", docs, vocab_size=200)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY, "data": {"datasets": [str(data)], "seq_len": 16, "split": [0.9, 0.1, 0.0],
                                                "num_workers": 0},
                               "train": {**TINY["train"], "steps": 12, "eval_interval": 6, "eval_iters": 4}}))
    out = tmp_path / "run"
    run_ranks(2, ["pretrain/train.py", "--config", str(cfg), "--parallel.pipeline", "2", "--train.out_dir", str(out),
                  "--deepspeed_config", str(ds_json(tmp_path, "zero1.json"))], timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [6, 12]
    assert len(steps[-1]["head_losses"]) == 4
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "logs" / "rank1.log").is_file()
